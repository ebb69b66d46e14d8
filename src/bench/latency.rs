//! `wsd bench latency`: open loop at a fixed rate, so latency is measured the way a user
//! meets it.
//!
//! Message i (of R a second in all) is due at `t0 + i/R` and goes on connection `i mod N`,
//! whatever the server is doing; its latency is the reply's arrival minus that *scheduled*
//! time. A closed loop (echo) sends the next message only when the last reply is back, so a
//! server stall of a second costs it one slow sample; here every message that should have
//! gone during the stall carries the stall in its latency (no coordinated omission). If the
//! client itself falls behind, it sends late but still measures from the schedule, and
//! counts the late sends so the figure can be judged.
//!
//! A server may also push messages of its own (the `clock-echo` app's 5-second clock): a
//! whole text message that is not the payload sent is counted as a push and otherwise
//! ignored, so latency can be measured with a timer firing on the server.
//!
//! The schedule is global: with several client processes, each sends the messages whose
//! connection it holds. An echo server answers a connection's messages in order, so their
//! scheduled times (and which of the payloads each carries) wait in a per-connection ring,
//! as in `echo`; the frames are built and masked once.

use super::client::{Driver, Out, Pool};
use super::payload::Messages;
use super::report::{self, Counts, Span, Summary};
use super::shard::Workload;
use super::wire::{BadReply, Frame};
use super::{Plan, Work};
use hdrhistogram::Histogram;
use serde_json::json;
use std::collections::VecDeque;

/// A send this far behind its schedule is counted as late: the client, not the server, was
/// behind. (The loop wakes for the schedule on a timerfd, so on time is within tens of µs.)
pub const LATE_NS: u64 = 1_000_000;

/// How long to wait for the last replies once everything is sent.
const DRAIN_NS: u64 = super::broadcast::DRAIN_NS;

pub struct Latency {
    /// What the messages carry, in turn; each echo must come back the same.
    messages: Messages,
    /// This process holds connections `first..first + conns` of `all`.
    first: usize,
    conns: usize,
    all: usize,
    rate: u64,
    secs: u64,
    t0: Option<u64>,
    /// The next message (global index) this process sends.
    next: u64,
    /// Scheduled times of the messages in flight, and which payload each carries, per
    /// connection.
    rings: Vec<VecDeque<(u64, usize)>>,
    in_flight: u64,
    counts: Counts,
    latency: Histogram<u64>,
    /// Actual times of the first and last send.
    sends: Option<Span>,
}

impl Latency {
    pub fn new(
        first: usize,
        conns: usize,
        all: usize,
        rate: u64,
        messages: Messages,
        secs: u64,
    ) -> Latency {
        Latency {
            messages,
            first,
            conns,
            all,
            rate,
            secs,
            t0: None,
            next: first as u64,
            rings: (0..conns).map(|_| VecDeque::with_capacity(4)).collect(),
            in_flight: 0,
            counts: Counts::default(),
            latency: report::histogram(),
            sends: None,
        }
    }

    fn total(&self) -> u64 {
        self.rate * self.secs
    }

    fn due(&self, i: u64) -> u64 {
        self.t0.unwrap_or(0) + (u128::from(i) * 1_000_000_000 / u128::from(self.rate)) as u64
    }

    /// The message after `i` that goes on one of this process's connections.
    fn after(&self, i: u64) -> u64 {
        let (all, first) = (self.all as u64, self.first as u64);
        if i % all + 1 < first + self.conns as u64 {
            i + 1
        } else {
            (i / all + 1) * all + first
        }
    }
}

impl Driver for Latency {
    /// Nothing is sent before `go`.
    fn opened(&mut self, _id: usize, _handshake_ns: u64, _out: &mut Out<'_>, _now: u64) {}

    fn data(
        &mut self,
        id: usize,
        frame: Frame<'_>,
        _out: &mut Out<'_>,
        now: u64,
    ) -> Result<(), BadReply> {
        let whole_text = frame.opcode == crate::proto::frame::TEXT && frame.fin;
        let expected = self.rings[id]
            .front()
            .map(|&(_, i)| self.messages.payload(i));
        if whole_text && Some(frame.payload) != expected {
            self.counts.pushes += 1;
            return Ok(());
        }
        if !frame.echo_of(self.messages.size())? {
            return Ok(());
        }
        let (due, _) = self.rings[id].pop_front().ok_or(BadReply::Unasked)?;
        self.in_flight -= 1;
        self.counts.messages += 1;
        self.counts.bytes += self.messages.size() as u64;
        self.latency.saturating_record(now.saturating_sub(due));
        Ok(())
    }
}

impl Workload for Latency {
    fn ready(&self, pool: &Pool) -> usize {
        pool.open()
    }

    fn go(&mut self, t0: u64, now: u64, pool: &mut Pool) {
        self.t0 = Some(t0);
        self.tick(now, pool);
    }

    /// Sends every message that is due, each stamped (in its ring) with its scheduled time.
    fn tick(&mut self, now: u64, pool: &mut Pool) -> Option<u64> {
        self.t0?;
        let total = self.total();
        while self.next < total {
            let due = self.due(self.next);
            if due > now {
                return Some(due);
            }
            let id = (self.next % self.all as u64) as usize - self.first;
            if pool.is_open(id) {
                let which = (self.next / self.all as u64) as usize % self.messages.len();
                pool.send(id, |out| out.put(&self.messages, which));
                self.rings[id].push_back((due, which));
                self.in_flight += 1;
                self.counts.sent += 1;
                if now - due > LATE_NS {
                    self.counts.late += 1;
                }
                let at = Some(Span { from: now, to: now });
                self.sends = Span::merge(self.sends, at);
            }
            self.next = self.after(self.next);
        }
        None
    }

    fn done(&self, now: u64, _pool: &Pool) -> bool {
        let Some(t0) = self.t0 else { return false };
        let all_sent = self.next >= self.total();
        (all_sent && self.in_flight == 0) || now >= t0 + self.secs * 1_000_000_000 + DRAIN_NS
    }

    fn counts(&self) -> Counts {
        self.counts
    }

    fn latency(&self) -> &Histogram<u64> {
        &self.latency
    }

    fn span(&self) -> Option<Span> {
        self.sends
    }
}

/// Messages sent per second over the scheduled window, or over the time the sends really
/// took if the client fell behind.
fn achieved(plan: &Plan, s: &Summary) -> f64 {
    report::per_sec(s.counts.sent, plan.secs, s)
}

/// Latency's own figures for `--json`.
pub fn json(plan: &Plan, s: &Summary) -> serde_json::Value {
    let Work::Latency { rate, size, .. } = plan.work else {
        return json!({});
    };
    json!({
        "rate": rate,
        "size": size,
        "spin": matches!(plan.work, Work::Latency { spin: true, .. }),
        "sent": s.counts.sent,
        "achieved_rate": achieved(plan, s).round(),
        "late": s.counts.late,
        "replies": s.counts.messages,
        "unanswered": s.counts.sent.saturating_sub(s.counts.messages),
        "pushes": s.counts.pushes,
    })
}

/// Latency's rows of the table.
pub fn rows(plan: &Plan, s: &Summary, url: &str) -> String {
    let Work::Latency { rate, size, .. } = plan.work else {
        return String::new();
    };
    format!(
        "wsd bench latency  {url}  {} connections, {rate} msgs/s scheduled, {size}-byte text, {} s\n\
         connections  {} ready, {} open at the end\n\
         sent         {}, {:.0} msgs/s achieved, {} late (over {} ms behind the schedule)\n\
         replies      {}, {} unanswered; {} pushes from the server\n",
        plan.conns,
        plan.secs,
        s.ready,
        s.open,
        s.counts.sent,
        achieved(plan, s),
        s.counts.late,
        LATE_NS / 1_000_000,
        s.counts.messages,
        s.counts.sent.saturating_sub(s.counts.messages),
        s.counts.pushes,
    ) + &report::latency_row("latency", &s.latency)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_process_sends_the_messages_of_its_own_connections() {
        // 10 connections over two processes: 0..4 and 4..10.
        let one = || Messages::new(vec![b"x".to_vec()]);
        let a = Latency::new(0, 4, 10, 100, one(), 1);
        let b = Latency::new(4, 6, 10, 100, one(), 1);
        let walk = |l: &Latency| {
            let mut i = l.next;
            std::iter::from_fn(move || {
                let now = i;
                i = l.after(i);
                Some(now)
            })
            .take(8)
            .collect::<Vec<_>>()
        };
        assert_eq!(walk(&a), [0, 1, 2, 3, 10, 11, 12, 13]);
        assert_eq!(walk(&b), [4, 5, 6, 7, 8, 9, 14, 15]);
    }

    #[test]
    fn messages_are_due_on_a_fixed_schedule() {
        let mut l = Latency::new(0, 1, 1, 4, Messages::new(vec![b"x".to_vec()]), 1);
        l.t0 = Some(1_000);
        assert_eq!(l.due(0), 1_000);
        assert_eq!(l.due(3), 1_000 + 750_000_000);
        assert_eq!(l.total(), 4);
    }
}
