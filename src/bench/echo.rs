//! `wsd bench echo`: every connection keeps `depth` text messages in flight and sends the next
//! as each reply comes back (closed loop), like uWebSockets' load_test.
//!
//! The frames are built and masked once and copied into the send buffer for every message
//! (with `--payload json`, the variants in turn). An echo server answers in order, so a
//! connection's send times fit a ring of `depth` slots: the reply pops the oldest, giving its
//! round trip without any per-message allocation.

use super::client::{Driver, Out, Pool};
use super::payload::Messages;
use super::report::{self, Counts, Summary};
use super::shard::Workload;
use super::wire::{BadReply, Frame};
use super::{Plan, Work};
use hdrhistogram::Histogram;
use serde_json::json;
use std::collections::VecDeque;

pub struct Echo {
    messages: Messages,
    /// The message sent next (of `messages`, in turn).
    next: usize,
    size: usize,
    depth: usize,
    /// Send times of the messages in flight, per connection (capacity `depth`, never grown).
    rings: Vec<VecDeque<u64>>,
    /// Replies are counted until this time (ns); after it nothing more is sent.
    end: u64,
    measuring: bool,
    counts: Counts,
    latency: Histogram<u64>,
}

impl Echo {
    pub fn new(conns: usize, messages: Messages, depth: usize, secs: u64) -> Echo {
        Echo {
            size: messages.size(),
            messages,
            next: 0,
            depth,
            rings: (0..conns).map(|_| VecDeque::with_capacity(depth)).collect(),
            end: secs * 1_000_000_000,
            measuring: false,
            counts: Counts::default(),
            latency: report::histogram(),
        }
    }
}

impl Driver for Echo {
    /// Nothing is sent before `go`: connecting thousands of clients is not part of the figure.
    fn opened(&mut self, _id: usize, _handshake_ns: u64, _out: &mut Out<'_>, _now: u64) {}

    fn data(
        &mut self,
        id: usize,
        frame: Frame<'_>,
        out: &mut Out<'_>,
        now: u64,
    ) -> Result<(), BadReply> {
        if !frame.echo_of(self.size)? {
            return Ok(());
        }
        let sent = self.rings[id].pop_front().ok_or(BadReply::Unasked)?;
        if !self.measuring || now >= self.end {
            return Ok(());
        }
        self.counts.messages += 1;
        self.counts.bytes += self.size as u64;
        self.latency.saturating_record(now.saturating_sub(sent));
        out.put(&self.messages, self.next);
        self.next = (self.next + 1) % self.messages.len();
        self.rings[id].push_back(now);
        self.counts.sent += 1;
        Ok(())
    }
}

impl Workload for Echo {
    fn ready(&self, pool: &Pool) -> usize {
        pool.open()
    }

    fn go(&mut self, t0: u64, now: u64, pool: &mut Pool) {
        self.end += t0;
        self.measuring = true;
        for id in 0..pool.len() {
            if !pool.is_open(id) {
                continue;
            }
            let (messages, depth, next) = (&self.messages, self.depth, &mut self.next);
            pool.send(id, |out| {
                for _ in 0..depth {
                    out.put(messages, *next);
                    *next = (*next + 1) % messages.len();
                }
            });
            self.rings[id].extend(std::iter::repeat_n(now, depth));
            self.counts.sent += depth as u64;
        }
    }

    fn done(&self, now: u64, _pool: &Pool) -> bool {
        self.measuring && now >= self.end
    }

    fn counts(&self) -> Counts {
        self.counts
    }

    fn latency(&self) -> &Histogram<u64> {
        &self.latency
    }
}

/// Echo's own figures for `--json`.
pub fn json(plan: &Plan, s: &Summary) -> serde_json::Value {
    let Work::Echo { size, depth } = plan.work else {
        return json!({});
    };
    let secs = plan.secs as f64;
    json!({
        "size": size,
        "depth": depth,
        "messages": s.counts.messages,
        "msgs_per_sec": (s.counts.messages as f64 / secs).round(),
        "mb_per_sec": report::round(s.counts.bytes as f64 / secs / 1e6, 2),
    })
}

/// Echo's rows of the table.
pub fn rows(plan: &Plan, s: &Summary, url: &str) -> String {
    let Work::Echo { size, depth } = plan.work else {
        return String::new();
    };
    let secs = plan.secs as f64;
    format!(
        "wsd bench echo  {url}  {} connections, {size}-byte text, depth {depth}, {} s\n\
         connections  {} ready, {} open at the end\n\
         messages     {} echoed, {:.0} msgs/s\n\
         throughput   {:.2} MB/s of payload each way\n",
        plan.conns,
        plan.secs,
        s.ready,
        s.open,
        s.counts.messages,
        s.counts.messages as f64 / secs,
        s.counts.bytes as f64 / secs / 1e6,
    ) + &report::latency_row("latency", &s.latency)
}
