//! The publisher of `wsd bench api`: a process of its own, publishing through a backend HTTP
//! API on a few keep-alive connections, on one mio loop.
//!
//! A process of its own, because an open-loop schedule must not wait behind thousands of
//! subscribers' reads: when a publish is due, this loop is free to send it. It takes orders
//! from the coordinator and reports like a shard (see [`super::shard`]).
//!
//! - At `--rate R` publish `j` is due at `t0 + j/R` and is written when due, whatever the
//!   server has answered: requests are pipelined on the connection with the fewest waiting,
//!   so a server that answers slowly shows as latency, not as a slower publisher. A send more
//!   than [`LATE_NS`] behind its schedule is counted as late (the client, not the server, was
//!   slow).
//! - Flat out (`--flat`), each connection keeps `--depth` requests in flight until the window
//!   ends: as many publishes as the API will take.
//!
//! Each answer is timed from the publish's timestamp (scheduled, or sent when flat out) and
//! checked: anything but 200 is counted as an error, with its body as a sample. When
//! everything is sent and answered (or [`ANSWER_GRACE_NS`] has passed), the publisher tells
//! how many publishes the API accepted, so subscribers know how many deliveries to expect.

use super::api::Settings;
use super::client::{EXTRA, TIMER};
use super::http::{self, Post};
use super::latency::LATE_NS;
use super::report::{self, Counts, ErrorKind, Errors, Link, Span};
use super::shard::{self, Lines, Progress, Report};
use super::{Clock, SEC, wire};
use hdrhistogram::Histogram;
use mio::net::TcpStream;
use mio::unix::{SourceFd, pipe};
use mio::{Events, Interest, Poll, Token};
use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::time::Duration;

/// How long, after the window, answers still outstanding are waited for.
pub const ANSWER_GRACE_NS: u64 = 10 * SEC;
/// Connecting to the API may take this long.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Progress reports while waiting for `go`.
const WAITING_REPORT_NS: u64 = SEC / 4;

/// One HTTP connection to the API.
struct Conn {
    sock: Option<TcpStream>,
    out: Vec<u8>,
    written: usize,
    /// Answer bytes not yet consumed.
    carry: Vec<u8>,
    /// The timestamps of the publishes waiting for an answer, oldest first.
    waiting: VecDeque<u64>,
}

/// The publisher's state.
struct Publisher<'a> {
    settings: &'a Settings,
    post: Post,
    /// Each topic's name as a JSON string, made once.
    topics: Vec<Vec<u8>>,
    conns: Vec<Conn>,
    /// Publishes sent so far (the next one's number).
    seq: u64,
    /// Rate mode: publishes to send in all.
    total: Option<u64>,
    t0: u64,
    /// When sending ends (flat out).
    end: u64,
    body: Vec<u8>,
    counts: Counts,
    errors: Errors,
    answers: Histogram<u64>,
    last_answer: Option<u64>,
    scratch: Vec<u8>,
}

/// Runs the publisher to the end; returns what it could not survive.
pub fn run(
    settings: &Settings,
    secs: u64,
    clock: Clock,
    up: &mut pipe::Sender,
    down: &mut pipe::Receiver,
) -> io::Result<()> {
    let mut poll = Poll::new()?;
    let mut events = Events::with_capacity(64);
    poll.registry().register(down, EXTRA, Interest::READABLE)?;
    let timer = crate::sys::timer_fd()?;
    let timer_fd = timer.as_raw_fd();
    poll.registry()
        .register(&mut SourceFd(&timer_fd), TIMER, Interest::READABLE)?;
    let mut p = Publisher {
        settings,
        post: Post::new(&settings.api, &settings.path, &settings.key),
        topics: (0..settings.topics)
            .map(|k| {
                serde_json::Value::from(settings.topic(k))
                    .to_string()
                    .into_bytes()
            })
            .collect(),
        conns: Vec::with_capacity(settings.http_conns),
        seq: 0,
        total: settings.rate.map(|r| r * secs),
        t0: 0,
        end: 0,
        body: Vec::with_capacity(128),
        counts: Counts::default(),
        errors: Errors::default(),
        answers: report::histogram(),
        last_answer: None,
        scratch: vec![0; 64 << 10],
    };
    let began = clock.now();
    for i in 0..settings.http_conns {
        let sock = connect(settings).and_then(|s| {
            let mut s = TcpStream::from_std(s);
            let both = Interest::READABLE | Interest::WRITABLE;
            poll.registry().register(&mut s, Token(i), both)?;
            Ok(s)
        });
        let sock = sock.map_err(|e| p.errors.add(ErrorKind::Connect, e)).ok();
        p.conns.push(Conn {
            sock,
            out: Vec::new(),
            written: 0,
            carry: Vec::new(),
            waiting: VecDeque::new(),
        });
    }
    let connecting = Some(Span {
        from: began,
        to: clock.now(),
    });
    let mut orders = Lines::default();
    let mut started = false;
    let mut next_report = 0;
    let mut armed: Option<u64> = None;
    loop {
        let now = clock.now();
        if now >= next_report {
            shard::send(up, &p.progress())?;
            next_report = if started {
                p.t0 + (now.saturating_sub(p.t0) / SEC + 1) * SEC
            } else {
                now + WAITING_REPORT_NS
            };
        }
        let mut wake = next_report;
        if started {
            if let Some(at) = p.send_due(now) {
                wake = wake.min(at);
                if armed != Some(at) {
                    crate::sys::arm_timer(&timer, at.saturating_sub(now))?;
                    armed = Some(at);
                }
            }
            if p.finished(now) {
                break;
            }
        }
        let timeout = Duration::from_nanos(wake.saturating_sub(now).min(SEC / 10));
        match poll.poll(&mut events, Some(timeout)) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
        let mut ordered = false;
        for ev in events.iter() {
            match ev.token() {
                EXTRA => ordered = true,
                TIMER => {}
                Token(i) if i < p.conns.len() => {
                    if ev.is_readable() || ev.is_read_closed() || ev.is_error() {
                        p.read(i, clock.now());
                    }
                    p.flush(i);
                }
                _ => {}
            }
        }
        if !ordered {
            continue;
        }
        while let Some(order) = orders.next(down)? {
            match order.split_once(' ') {
                Some(("go", at)) => {
                    p.t0 = at.parse().map_err(io::Error::other)?;
                    p.end = p.t0 + secs * SEC;
                    started = true;
                    next_report = p.t0 + SEC;
                }
                // Its own total, passed back to every process.
                Some(("sent", _)) => {}
                None if order == "stop" => return Ok(()),
                _ => return Err(io::Error::other(format!("unknown order {order:?}"))),
            }
        }
        if orders.closed {
            return Err(io::Error::other("the coordinator went away"));
        }
    }
    shard::send(
        up,
        &Report::Published {
            sent: p.counts.answered,
        },
    )?;
    shard::send(
        up,
        &Report::Done {
            ready: 0,
            open: 0,
            counts: p.counts,
            errors: p.errors.clone(),
            latency: Vec::new(),
            connecting,
            span: None,
            burst_latency: Vec::new(),
            link: Box::new(Link::default()),
            answers: report::to_pairs(&p.answers),
            publishing: p.last_answer.map(|to| Span { from: p.t0, to }),
        },
    )
}

/// A blocking connect (on loopback, before anything is measured), then non-blocking.
fn connect(settings: &Settings) -> io::Result<std::net::TcpStream> {
    let s = std::net::TcpStream::connect_timeout(&settings.api.addr, CONNECT_TIMEOUT)?;
    s.set_nodelay(true)?;
    s.set_nonblocking(true)?;
    Ok(s)
}

impl Publisher<'_> {
    fn progress(&self) -> Report {
        let open = self.conns.iter().filter(|c| c.sock.is_some()).count();
        Report::Progress(Progress {
            prepared: true,
            ready: open,
            open,
            failed: self.conns.len() - open,
            errors: self.errors.total(),
            counts: self.counts,
        })
    }

    /// Publish `seq`'s scheduled time (rate) or `now` (flat out).
    fn stamp(&self, seq: u64, now: u64) -> u64 {
        match self.settings.rate {
            Some(r) => self.t0 + (u128::from(seq) * u128::from(SEC) / u128::from(r)) as u64,
            None => now,
        }
    }

    /// Sends what is due by `now`; returns when the next publish is due (rate mode).
    fn send_due(&mut self, now: u64) -> Option<u64> {
        match self.total {
            Some(total) => {
                while self.seq < total && self.stamp(self.seq, now) <= now {
                    let Some(i) = self.least_waiting() else { break };
                    let stamp = self.stamp(self.seq, now);
                    if now.saturating_sub(stamp) > LATE_NS {
                        self.counts.late += 1;
                    }
                    self.put(i, stamp);
                }
                self.flush_all();
                (self.seq < total).then(|| self.stamp(self.seq, now))
            }
            None => {
                if now < self.end {
                    for i in 0..self.conns.len() {
                        while self.conns[i].sock.is_some()
                            && self.conns[i].waiting.len() < self.settings.depth
                        {
                            self.put(i, now);
                        }
                    }
                    self.flush_all();
                }
                None
            }
        }
    }

    /// The open connection with the fewest publishes waiting.
    fn least_waiting(&self) -> Option<usize> {
        (0..self.conns.len())
            .filter(|&i| self.conns[i].sock.is_some())
            .min_by_key(|&i| self.conns[i].waiting.len())
    }

    /// Appends publish `self.seq`, stamped `stamp`, to connection `i`'s output.
    fn put(&mut self, i: usize, stamp: u64) {
        let seq = self.seq;
        let k = (seq % self.settings.topics as u64) as usize;
        let b = &mut self.body;
        b.clear();
        b.extend_from_slice(b"{\"topic\":");
        b.extend_from_slice(&self.topics[k]);
        b.extend_from_slice(b",\"data\":\"");
        wire::put_decimal(b, stamp);
        b.push(b' ');
        wire::put_decimal(b, seq);
        b.extend_from_slice(b"\"}");
        let c = &mut self.conns[i];
        self.post.put(&mut c.out, &self.body);
        c.waiting.push_back(stamp);
        self.seq += 1;
        self.counts.sent += 1;
    }

    fn flush_all(&mut self) {
        for i in 0..self.conns.len() {
            self.flush(i);
        }
    }

    /// Writes what connection `i` has to send until done or the socket would block.
    fn flush(&mut self, i: usize) {
        let c = &mut self.conns[i];
        let Some(sock) = c.sock.as_mut() else { return };
        while c.written < c.out.len() {
            match sock.write(&c.out[c.written..]) {
                Ok(n) => c.written += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return self.fail(i, ErrorKind::Closed, e),
            }
        }
        c.out.clear();
        c.written = 0;
    }

    /// Reads connection `i`'s answers until the socket is drained.
    fn read(&mut self, i: usize, now: u64) {
        loop {
            let Some(sock) = self.conns[i].sock.as_mut() else {
                return;
            };
            let n = match sock.read(&mut self.scratch) {
                Ok(0) => return self.fail(i, ErrorKind::Closed, "the API closed the connection"),
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return self.fail(i, ErrorKind::Closed, e),
            };
            let mut carry = std::mem::take(&mut self.conns[i].carry);
            carry.extend_from_slice(&self.scratch[..n]);
            let used = self.answers_in(i, &carry, now);
            carry.drain(..used);
            if self.conns[i].sock.is_some() {
                self.conns[i].carry = carry;
            }
        }
    }

    /// Takes every whole answer at the start of `buf` for connection `i`; the bytes used.
    fn answers_in(&mut self, i: usize, buf: &[u8], now: u64) -> usize {
        let mut used = 0;
        loop {
            let (answer, n) = match http::next_answer(&buf[used..]) {
                Ok(Some(a)) => a,
                Ok(None) => return used,
                Err(e) => {
                    self.fail(i, ErrorKind::Protocol, e);
                    return buf.len();
                }
            };
            used += n;
            let Some(stamp) = self.conns[i].waiting.pop_front() else {
                self.fail(i, ErrorKind::Protocol, "an HTTP answer to no request");
                return buf.len();
            };
            self.answers.saturating_record(now.saturating_sub(stamp));
            self.last_answer = Some(now);
            if answer.status == 200 {
                self.counts.answered += 1;
            } else {
                let why = answer.refusal.unwrap_or_default();
                self.errors.add(
                    ErrorKind::Protocol,
                    format!("HTTP {}: {why}", answer.status),
                );
            }
            if answer.close {
                self.fail(
                    i,
                    ErrorKind::Closed,
                    "the API closed the connection after an answer",
                );
                return buf.len();
            }
        }
    }

    /// Connection `i` is lost; the publishes waiting on it are counted lost with it.
    fn fail(&mut self, i: usize, kind: ErrorKind, why: impl std::fmt::Display) {
        let c = &mut self.conns[i];
        if c.sock.take().is_none() {
            return;
        }
        let lost = c.waiting.len();
        c.waiting.clear();
        c.out = Vec::new();
        c.carry = Vec::new();
        c.written = 0;
        let why = if lost > 0 {
            format!("{why} ({lost} publishes unanswered)")
        } else {
            why.to_string()
        };
        self.errors.add(kind, why);
    }

    /// Everything is sent and answered, or the time for it is over.
    fn finished(&self, now: u64) -> bool {
        let sent = match self.total {
            Some(total) => self.seq >= total,
            None => now >= self.end,
        };
        let open = self.conns.iter().any(|c| c.sock.is_some());
        let waiting = self.conns.iter().any(|c| !c.waiting.is_empty());
        (sent || !open) && !waiting || now >= self.end + ANSWER_GRACE_NS
    }
}
