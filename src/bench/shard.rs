//! One client process ("shard"): its share of the connections on its own mio loop, taking
//! orders from the coordinator and reporting back, one JSON line each way over a pipe.
//!
//! A process may hold no more files than RLIMIT_NOFILE's hard limit, so a run of more
//! connections needs several processes. They all run this loop, even when one would do, so
//! that the path a 100-connection smoke test takes is the path a 100,000-connection run takes.
//!
//! The conversation: the shard reports progress while it connects; once every shard is ready
//! the coordinator says `go <t0>`; the shard measures, reports once a second, and ends with
//! `Done` (its counts, errors and latency histogram). In a broadcast run the shard holding the
//! publisher reports `Published` when it has sent everything, and the coordinator passes the
//! total on (`sent <n>`) so subscribers can stop as soon as they have every message. A run
//! whose end the coordinator decides (`idle`: after it has read the server's memory) ends
//! with `stop`, or with `again` (`idle --again-when`): one more echo on every connection,
//! after which the shard ends by itself. An `api` run's publisher is a process of its own
//! with no WebSocket connection ([`super::publisher`]); it holds the same conversation.

use super::client::{self, Driver, Pool};
use super::payload::{self, Messages};
use super::report::{self, Counts, Errors, Link, Span};
use super::{Clock, Plan, SEC, Work};
use hdrhistogram::Histogram;
use mio::Interest;
use mio::unix::{SourceFd, pipe};
use serde::{Deserialize, Serialize};
use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::time::Duration;

/// Progress reports while connecting, so the coordinator can say `go` soon after all are up.
const CONNECTING_REPORT_NS: u64 = SEC / 4;

/// A workload on top of the connection pool: what `go` does, and when the run is over.
pub trait Workload: Driver {
    /// Connections ready to be measured.
    fn ready(&self, pool: &Pool) -> usize;
    /// Measuring starts at `t0` (ns on the common clock); `now` is about the same.
    fn go(&mut self, t0: u64, now: u64, pool: &mut Pool);
    /// Work due by `now`; returns when it next wants to be called.
    fn tick(&mut self, _now: u64, _pool: &mut Pool) -> Option<u64> {
        None
    }
    /// Once this process's publisher has sent all it will: how many messages.
    fn published_here(&self, _pool: &Pool) -> Option<u64> {
        None
    }
    /// The coordinator says how many messages the publisher sent in all.
    fn published(&mut self, _total: u64) {}
    /// The coordinator says `again` (`idle --again-when`): every connection echoes once more.
    fn again(&mut self, _now: u64, _pool: &mut Pool) {}
    fn done(&self, now: u64, pool: &Pool) -> bool;
    /// For the final report: connections that were measured (broadcast: subscribers that
    /// were ready), and how many of them are still open.
    fn measured(&self, pool: &Pool) -> (usize, usize) {
        (self.ready(pool), pool.open())
    }
    fn counts(&self) -> Counts;
    fn latency(&self) -> &Histogram<u64>;
    /// A second histogram, for the final report: `connect`'s burst handshakes.
    fn burst_latency(&self) -> Option<&Histogram<u64>> {
        None
    }
    /// The first and last moments of the workload's own activity (`latency`: its sends).
    fn span(&self) -> Option<Span> {
        None
    }
}

/// Where a shard stands (sent each second), or, summed over the shards, where the run does.
#[derive(Debug, Default, Clone, Copy, Serialize, Deserialize)]
pub struct Progress {
    /// Every connection has been tried and is ready or failed.
    pub prepared: bool,
    pub ready: usize,
    pub open: usize,
    pub failed: usize,
    pub errors: u64,
    pub counts: Counts,
}

impl Progress {
    /// Adds `other` in: prepared only if both are.
    pub fn add(&mut self, other: &Progress) {
        self.prepared &= other.prepared;
        self.ready += other.ready;
        self.open += other.open;
        self.failed += other.failed;
        self.errors += other.errors;
        self.counts.add(&other.counts);
    }
}

/// Shard → coordinator.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Report {
    Progress(Progress),
    Published {
        sent: u64,
    },
    Done {
        ready: usize,
        open: usize,
        counts: Counts,
        errors: Errors,
        latency: Vec<(u64, u64)>,
        /// From the first connect to the moment every connection was up or had failed.
        #[serde(default)]
        connecting: Option<Span>,
        #[serde(default)]
        span: Option<Span>,
        #[serde(default)]
        burst_latency: Vec<(u64, u64)>,
        #[serde(default)]
        link: Box<Link>,
        /// `api`'s publisher: how long the API took to answer each publish.
        #[serde(default)]
        answers: Vec<(u64, u64)>,
        /// `api`'s publisher: from `go` to the last answer.
        #[serde(default)]
        publishing: Option<Span>,
    },
    /// The shard could not run at all.
    Failed {
        why: String,
    },
}

/// This shard's part of the run.
pub struct Share {
    /// Global index of its first connection (spreads source addresses).
    pub first: usize,
    /// Connections it opens (for broadcast, subscribers).
    pub conns: usize,
    /// It also runs the broadcast publisher.
    pub publisher: bool,
    /// `connect`: the connections it cycles in the sustained phase.
    pub slots: usize,
    /// `api`: the host (index into its URLs) its connections go to.
    pub host: usize,
}

/// Runs a shard to the end; the exit code for its process.
pub fn main(
    plan: &Plan,
    share: &Share,
    clock: Clock,
    mut up: pipe::Sender,
    mut down: pipe::Receiver,
) -> i32 {
    let _ = up.set_nonblocking(false);
    let (up, down) = (&mut up, &mut down);
    let (n, first) = (share.conns, share.first);
    let messages = |size| Messages::new(payload::payloads(plan.payload, size));
    let result = match &plan.work {
        Work::Echo { size, depth } => {
            let echo = super::echo::Echo::new(n, messages(*size), *depth, plan.secs);
            run(plan, n, first, echo, clock, up, down)
        }
        Work::Connect { .. } => {
            let connect = super::connect::Connect::new(n, share.slots, plan.secs);
            run(plan, n, first, connect, clock, up, down)
        }
        Work::Idle { size, .. } => {
            let idle = super::idle::Idle::new(n, messages(*size));
            run(plan, n, first, idle, clock, up, down)
        }
        Work::Latency { rate, size, .. } => {
            let m = messages(*size);
            let latency = super::latency::Latency::new(first, n, plan.conns, *rate, m, plan.secs);
            run(plan, n, first, latency, clock, up, down)
        }
        Work::Broadcast {
            rate,
            app,
            topic,
            size,
        } => {
            let b = super::broadcast::Broadcast::new(
                *app,
                topic,
                n,
                share.publisher,
                *rate,
                plan.secs,
                plan.payload,
                *size,
            );
            let sockets = n + usize::from(share.publisher);
            run(plan, sockets, first, b, clock, up, down)
        }
        Work::Api(a) if share.publisher => super::publisher::run(a, plan.secs, clock, up, down),
        Work::Api(a) => {
            let subscribers = super::api::Subscribers::new(a, first, n, plan.secs);
            run_on(
                &a.hosts[share.host],
                plan,
                n,
                first,
                subscribers,
                clock,
                up,
                down,
            )
        }
    };
    match result {
        Ok(()) => 0,
        Err(e) => {
            let _ = send(up, &Report::Failed { why: e.to_string() });
            2
        }
    }
}

/// Sends one report line to the coordinator.
pub fn send(up: &mut pipe::Sender, report: &Report) -> io::Result<()> {
    let mut line = serde_json::to_vec(report).map_err(io::Error::other)?;
    line.push(b'\n');
    up.write_all(&line)
}

fn run(
    plan: &Plan,
    sockets: usize,
    first: usize,
    work: impl Workload,
    clock: Clock,
    up: &mut pipe::Sender,
    down: &mut pipe::Receiver,
) -> io::Result<()> {
    run_on(&plan.target, plan, sockets, first, work, clock, up, down)
}

/// [`run`] with connections to `target` rather than the plan's.
#[allow(clippy::too_many_arguments)]
fn run_on(
    target: &super::Target,
    plan: &Plan,
    sockets: usize,
    first: usize,
    mut work: impl Workload,
    clock: Clock,
    up: &mut pipe::Sender,
    down: &mut pipe::Receiver,
) -> io::Result<()> {
    let mut pool = Pool::new(target, first, sockets, clock)?;
    pool.registry()
        .register(down, client::EXTRA, Interest::READABLE)?;
    // Scheduled sends (latency, the broadcast publisher) wake on a timerfd: a poll timeout
    // is rounded up to whole milliseconds, which would add up to 1 ms of the client's own
    // lateness to every latency measured from the schedule.
    let timer = crate::sys::timer_fd()?;
    let timer_fd = timer.as_raw_fd();
    pool.registry()
        .register(&mut SourceFd(&timer_fd), client::TIMER, Interest::READABLE)?;
    let mut armed: Option<u64> = None;
    let spin = matches!(plan.work, Work::Latency { spin: true, .. });
    let mut orders = Lines::default();
    let mut t0: Option<u64> = None;
    let mut next_report = 0;
    let mut next_sweep = SEC;
    let mut published_sent = false;
    let mut stopped = false;
    let began = clock.now();
    let mut settled_at: Option<u64> = None;
    loop {
        let now = clock.now();
        pool.start_wave(now);
        if settled_at.is_none() && pool.settled() {
            settled_at = Some(now);
        }
        if now >= next_sweep {
            pool.sweep(now);
            next_sweep = now + SEC;
        }
        let mut wake = next_report.min(next_sweep);
        if t0.is_some() {
            if let Some(at) = work.tick(now, &mut pool) {
                wake = wake.min(at);
                if spin {
                    wake = now;
                } else if armed != Some(at) {
                    crate::sys::arm_timer(&timer, at.saturating_sub(now))?;
                    armed = Some(at);
                }
            }
            if !published_sent && let Some(sent) = work.published_here(&pool) {
                send(up, &Report::Published { sent })?;
                published_sent = true;
            }
            if stopped || work.done(now, &pool) {
                break;
            }
        }
        let prepared = pool.settled() && work.ready(&pool) + pool.failed() >= pool.len();
        if now >= next_report {
            send(up, &progress(&work, &pool, prepared))?;
            next_report = match t0 {
                // Aligned to whole seconds of the run, so the coordinator's lines add up.
                Some(t0) => t0 + (now.saturating_sub(t0) / SEC + 1) * SEC,
                None => now + CONNECTING_REPORT_NS,
            };
        }
        let timeout = Duration::from_nanos(wake.saturating_sub(now).min(SEC / 10));
        if !pool.turn(&mut work, timeout)? {
            continue;
        }
        while let Some(order) = orders.next(down)? {
            match order.split_once(' ') {
                Some(("go", at)) => {
                    let at = at.parse().map_err(io::Error::other)?;
                    t0 = Some(at);
                    work.go(at, clock.now(), &mut pool);
                    next_report = at + SEC;
                }
                Some(("sent", n)) => work.published(n.parse().map_err(io::Error::other)?),
                None if order == "stop" => stopped = true,
                None if order == "again" => work.again(clock.now(), &mut pool),
                _ => return Err(io::Error::other(format!("unknown order {order:?}"))),
            }
        }
        if orders.closed {
            return Err(io::Error::other("the coordinator went away"));
        }
    }
    let (ready, open) = work.measured(&pool);
    send(
        up,
        &Report::Done {
            ready,
            open,
            counts: work.counts(),
            errors: pool.errors.clone(),
            latency: report::to_pairs(work.latency()),
            connecting: settled_at.map(|to| Span { from: began, to }),
            span: work.span(),
            burst_latency: work.burst_latency().map_or_else(Vec::new, report::to_pairs),
            link: Box::new(pool.link().clone()),
            answers: Vec::new(),
            publishing: None,
        },
    )
}

fn progress(work: &impl Workload, pool: &Pool, prepared: bool) -> Report {
    Report::Progress(Progress {
        prepared,
        ready: work.ready(pool),
        open: pool.open(),
        failed: pool.failed(),
        errors: pool.errors.total(),
        counts: work.counts(),
    })
}

/// Newline-separated messages from a non-blocking pipe.
#[derive(Default)]
pub struct Lines {
    buf: Vec<u8>,
    pub closed: bool,
}

impl Lines {
    /// The next whole line, reading more if needed; `None` when none is complete yet.
    pub fn next(&mut self, from: &mut impl Read) -> io::Result<Option<String>> {
        loop {
            if let Some(i) = self.buf.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = self.buf.drain(..=i).collect();
                return Ok(Some(String::from_utf8_lossy(&line[..i]).into_owned()));
            }
            if self.closed {
                return Ok(None);
            }
            let mut chunk = [0u8; 16 << 10];
            match from.read(&mut chunk) {
                Ok(0) => self.closed = true,
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(None),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_come_whole_across_reads_and_end_at_eof() {
        let mut lines = Lines::default();
        let mut input: &[u8] = b"go 12\nsent 3\npart";
        assert_eq!(lines.next(&mut input).unwrap().as_deref(), Some("go 12"));
        assert_eq!(lines.next(&mut input).unwrap().as_deref(), Some("sent 3"));
        assert_eq!(lines.next(&mut input).unwrap(), None);
        assert!(lines.closed);
    }

    #[test]
    fn reports_are_one_json_line_each() {
        let r = Report::Published { sent: 7 };
        let text = serde_json::to_string(&r).unwrap();
        assert_eq!(text, r#"{"kind":"published","sent":7}"#);
        assert!(matches!(
            serde_json::from_str(&text).unwrap(),
            Report::Published { sent: 7 }
        ));
    }
}
