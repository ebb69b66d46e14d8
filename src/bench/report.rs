//! What a run counts and how it is shown: error tallies, message counts, the latency
//! histogram, the progress line and the closing table (or one JSON object with `--json`).
//!
//! Errors are tallied by kind, with the first few distinct reasons kept as samples, because
//! "312 errors" says nothing and 10,000 copies of the same reason drown the output.

use super::{Plan, Work};
use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};
use serde_json::json;
use std::fmt;

/// Distinct error reasons kept for the report.
const SAMPLES: usize = 5;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// connect(2) failed, or did not finish in time.
    Connect,
    /// The upgrade was refused, malformed, or did not finish in time.
    Handshake,
    /// A frame or message the protocol does not allow (or the app's protocol did not expect).
    Protocol,
    /// The server closed or reset an open connection during the run.
    Closed,
}

impl fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ErrorKind::Connect => "connect",
            ErrorKind::Handshake => "handshake",
            ErrorKind::Protocol => "protocol",
            ErrorKind::Closed => "closed",
        })
    }
}

/// Errors counted during a run, by kind.
#[derive(Debug, Default, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Errors {
    pub connect: u64,
    pub handshake: u64,
    pub protocol: u64,
    pub closed: u64,
    pub samples: Vec<String>,
}

impl Errors {
    pub fn add(&mut self, kind: ErrorKind, why: impl fmt::Display) {
        *match kind {
            ErrorKind::Connect => &mut self.connect,
            ErrorKind::Handshake => &mut self.handshake,
            ErrorKind::Protocol => &mut self.protocol,
            ErrorKind::Closed => &mut self.closed,
        } += 1;
        if self.samples.len() < SAMPLES {
            let line = format!("{kind}: {why}");
            if !self.samples.contains(&line) {
                self.samples.push(line);
            }
        }
    }

    pub fn merge(&mut self, other: &Errors) {
        self.connect += other.connect;
        self.handshake += other.handshake;
        self.protocol += other.protocol;
        self.closed += other.closed;
        for s in &other.samples {
            if self.samples.len() < SAMPLES && !self.samples.contains(s) {
                self.samples.push(s.clone());
            }
        }
    }

    pub fn total(&self) -> u64 {
        self.connect + self.handshake + self.protocol + self.closed
    }
}

/// Messages counted in the measured window. Echo: `messages` are replies, `sent` requests.
/// Broadcast: `messages` are deliveries to subscribers, `sent` what the publisher sent.
#[derive(Debug, Default, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub struct Counts {
    pub messages: u64,
    /// Payload bytes of `messages`.
    pub bytes: u64,
    pub sent: u64,
}

impl Counts {
    pub fn add(&mut self, other: &Counts) {
        self.messages += other.messages;
        self.bytes += other.bytes;
        self.sent += other.sent;
    }
}

/// A latency histogram in nanoseconds, 1 µs to 100 s, three significant figures.
pub fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1_000, 100_000_000_000, 3).expect("valid bounds")
}

/// A histogram as (value, count) pairs, to cross a pipe between processes.
pub fn to_pairs(h: &Histogram<u64>) -> Vec<(u64, u64)> {
    h.iter_recorded()
        .map(|v| (v.value_iterated_to(), v.count_at_value()))
        .collect()
}

pub fn add_pairs(h: &mut Histogram<u64>, pairs: &[(u64, u64)]) {
    for &(value, count) in pairs {
        h.saturating_record_n(value, count);
    }
}

/// The result of a whole run, summed over every client process.
pub struct Summary {
    /// Connections ready when measuring began (broadcast: subscribers, without the publisher).
    pub ready: usize,
    /// Connections still open at the end.
    pub open: usize,
    pub counts: Counts,
    pub errors: Errors,
    pub latency: Histogram<u64>,
}

/// A duration in nanoseconds, in the unit that reads best.
pub fn human_ns(ns: u64) -> String {
    match ns {
        0..1_000_000 => format!("{:.0} µs", ns as f64 / 1e3),
        1_000_000..1_000_000_000 => format!("{:.2} ms", ns as f64 / 1e6),
        _ => format!("{:.2} s", ns as f64 / 1e9),
    }
}

fn quantiles_us(h: &Histogram<u64>) -> serde_json::Value {
    let us = |ns: u64| (ns as f64 / 100.0).round() / 10.0;
    json!({
        "p50": us(h.value_at_quantile(0.50)),
        "p99": us(h.value_at_quantile(0.99)),
        "p999": us(h.value_at_quantile(0.999)),
        "max": us(h.max()),
        "mean": (h.mean() / 100.0).round() / 10.0,
        "samples": h.len(),
    })
}

/// The figures of a run as one JSON object (what `--json` prints).
pub fn to_json(plan: &Plan, s: &Summary) -> serde_json::Value {
    let secs = plan.secs as f64;
    let mut v = json!({
        "url": format!("ws://{}{}", plan.target.addr, plan.target.path),
        "conns": plan.conns,
        "secs": plan.secs,
        "ready": s.ready,
        "open_at_end": s.open,
        "latency_us": quantiles_us(&s.latency),
        "errors": {
            "total": s.errors.total(),
            "connect": s.errors.connect,
            "handshake": s.errors.handshake,
            "protocol": s.errors.protocol,
            "closed": s.errors.closed,
            "samples": s.errors.samples,
        },
    });
    let extra = match &plan.work {
        Work::Echo { size, depth } => json!({
            "mode": "echo",
            "size": size,
            "depth": depth,
            "messages": s.counts.messages,
            "msgs_per_sec": (s.counts.messages as f64 / secs).round(),
            "mb_per_sec": (s.counts.bytes as f64 / secs / 1e4).round() / 100.0,
        }),
        Work::Broadcast { rate, app, topic } => {
            let expected = s.counts.sent * plan.conns as u64;
            json!({
                "mode": "broadcast",
                "app": app,
                "topic": topic,
                "rate": rate,
                "sent": s.counts.sent,
                "expected": expected,
                "delivered": s.counts.messages,
                "missing": expected.saturating_sub(s.counts.messages),
                "deliveries_per_sec": (s.counts.messages as f64 / secs).round(),
            })
        }
    };
    if let (Some(v), serde_json::Value::Object(extra)) = (v.as_object_mut(), extra) {
        v.extend(extra);
    }
    v
}

/// The closing table, or the JSON object with `--json`, on stdout.
pub fn print(plan: &Plan, s: &Summary) {
    if plan.json {
        println!("{}", to_json(plan, s));
    } else {
        print!("{}", table(plan, s));
    }
}

fn table(plan: &Plan, s: &Summary) -> String {
    let secs = plan.secs as f64;
    let url = format!("ws://{}{}", plan.target.addr, plan.target.path);
    let h = &s.latency;
    let mut t = match &plan.work {
        Work::Echo { size, depth } => format!(
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
        ),
        Work::Broadcast { rate, app, .. } => {
            let expected = s.counts.sent * plan.conns as u64;
            format!(
                "wsd bench broadcast ({app})  {url}  {} subscribers + 1 publisher, {rate} msgs/s, {} s\n\
                 subscribers  {} ready, {} open at the end\n\
                 published    {}\n\
                 expected     {expected} deliveries\n\
                 delivered    {}, {:.0} deliveries/s\n\
                 missing      {}\n",
                plan.conns,
                plan.secs,
                s.ready,
                s.open,
                s.counts.sent,
                s.counts.messages,
                s.counts.messages as f64 / secs,
                expected.saturating_sub(s.counts.messages),
            )
        }
    };
    t += &format!(
        "latency      p50 {}  p99 {}  p99.9 {}  max {}  ({} samples)\n",
        human_ns(h.value_at_quantile(0.50)),
        human_ns(h.value_at_quantile(0.99)),
        human_ns(h.value_at_quantile(0.999)),
        human_ns(h.max()),
        h.len(),
    );
    let e = &s.errors;
    t += &format!(
        "errors       {} (connect {}, handshake {}, protocol {}, closed {})\n",
        e.total(),
        e.connect,
        e.handshake,
        e.protocol,
        e.closed
    );
    for sample in &e.samples {
        t += &format!("  e.g. {sample}\n");
    }
    t
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_count_by_kind_and_keep_a_few_distinct_reasons() {
        let mut e = Errors::default();
        for i in 0..20 {
            e.add(ErrorKind::Connect, format!("refused {}", i % 7));
        }
        e.add(ErrorKind::Closed, "reset");
        assert_eq!((e.connect, e.closed, e.total()), (20, 1, 21));
        assert_eq!(e.samples.len(), SAMPLES);
        let mut sum = Errors::default();
        sum.merge(&e);
        sum.merge(&e);
        assert_eq!(sum.total(), 42);
        assert_eq!(sum.samples, e.samples);
    }

    #[test]
    fn histograms_survive_the_trip_through_pairs() {
        let mut h = histogram();
        for v in [1_500, 20_000, 20_000, 3_000_000, 7_000_000_000] {
            h.saturating_record(v);
        }
        let mut back = histogram();
        add_pairs(&mut back, &to_pairs(&h));
        assert_eq!(back.len(), h.len());
        assert_eq!(back.value_at_quantile(0.5), h.value_at_quantile(0.5));
        assert_eq!(back.max(), h.max());
    }

    #[test]
    fn durations_read_in_their_unit() {
        assert_eq!(human_ns(350_000), "350 µs");
        assert_eq!(human_ns(1_250_000), "1.25 ms");
        assert_eq!(human_ns(2_000_000_000), "2.00 s");
    }
}
