//! What a run counts and how it is shown: error tallies, message counts, the latency
//! histogram, and the closing table (or one JSON object with `--json`). What is common to
//! every mode (connections, latency, errors, the server's CPU) is here; each mode's module
//! adds its own figures (`json`, `rows`).
//!
//! Errors are tallied by kind, with the first few distinct reasons kept as samples, because
//! "312 errors" says nothing and 10,000 copies of the same reason drown the output.

use super::server::{self, ServerRun};
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

/// Messages counted in the measured window. Echo and latency: `messages` are replies, `sent`
/// requests. Broadcast and api: `messages` are deliveries to subscribers, `sent` what the
/// publisher sent. Connect: `messages` are handshakes done, `sent` connects begun. Idle: the
/// one echo (and, apart, the echoes asked for again).
#[derive(Debug, Default, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub struct Counts {
    pub messages: u64,
    /// Payload bytes of `messages`.
    pub bytes: u64,
    pub sent: u64,
    /// Latency: sends that left later than scheduled (see `latency::LATE_NS`).
    #[serde(default)]
    pub late: u64,
    /// Latency: text messages the server sent on its own (a timer's push), not echoes.
    #[serde(default)]
    pub pushes: u64,
    /// Api: publishes the API accepted (answered 200).
    #[serde(default)]
    pub answered: u64,
    /// Api: deliveries expected for the publishes accepted, by the subscribers' topics.
    #[serde(default)]
    pub expected: u64,
    /// Idle with `--again-when`: connections asked to echo once more, and those that did.
    #[serde(default)]
    pub again_asked: u64,
    #[serde(default)]
    pub again_echoed: u64,
}

impl Counts {
    pub fn add(&mut self, other: &Counts) {
        self.messages += other.messages;
        self.bytes += other.bytes;
        self.sent += other.sent;
        self.late += other.late;
        self.pushes += other.pushes;
        self.answered += other.answered;
        self.expected += other.expected;
        self.again_asked += other.again_asked;
        self.again_echoed += other.again_echoed;
    }
}

/// What the connections agreed on in their handshakes, and the bytes they moved: for the
/// TLS and compression figures. Summed over the client processes.
#[derive(Debug, Default, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Link {
    /// The first connection's TLS version, cipher suite and key exchange.
    pub tls: Option<String>,
    /// The first `Sec-WebSocket-Extensions` answer.
    pub extension: Option<String>,
    /// Connections opened, and those of them that agreed on permessage-deflate.
    pub opened: u64,
    pub deflating: u64,
    /// Payload bytes of the data frames sent, before and after compression.
    pub sent_payload: u64,
    pub sent_wire: u64,
    /// Payload bytes of the data frames received, as they came and once inflated.
    pub received_wire: u64,
    pub received_payload: u64,
}

impl Link {
    /// A connection's handshake is done: its TLS (if any), its extension answer, and whether
    /// that answer agreed on permessage-deflate.
    pub fn opened(
        &mut self,
        tls: Option<&rustls::ClientConnection>,
        extension: Option<&[u8]>,
        deflating: bool,
    ) {
        self.opened += 1;
        self.deflating += u64::from(deflating);
        if self.opened == 1 {
            self.tls = tls.map(super::tls::describe);
            self.extension = extension.map(|e| String::from_utf8_lossy(e).into_owned());
        }
    }

    pub fn sent(&mut self, payload: usize, wire: usize) {
        self.sent_payload += payload as u64;
        self.sent_wire += wire as u64;
    }

    pub fn received(&mut self, wire: usize, payload: usize) {
        self.received_wire += wire as u64;
        self.received_payload += payload as u64;
    }

    pub fn merge(&mut self, other: &Link) {
        if self.opened == 0 {
            self.tls.clone_from(&other.tls);
            self.extension.clone_from(&other.extension);
        }
        self.opened += other.opened;
        self.deflating += other.deflating;
        self.sent_payload += other.sent_payload;
        self.sent_wire += other.sent_wire;
        self.received_wire += other.received_wire;
        self.received_payload += other.received_payload;
    }
}

/// A stretch of time on the run's common clock (ns); over several client processes, from
/// the earliest start to the latest end.
#[derive(Debug, Default, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub struct Span {
    pub from: u64,
    pub to: u64,
}

impl Span {
    pub fn merge(a: Option<Span>, b: Option<Span>) -> Option<Span> {
        match (a, b) {
            (Some(a), Some(b)) => Some(Span {
                from: a.from.min(b.from),
                to: a.to.max(b.to),
            }),
            (a, b) => a.or(b),
        }
    }

    pub fn secs(&self) -> f64 {
        self.to.saturating_sub(self.from) as f64 / 1e9
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
    /// `connect`: the burst's handshakes (`latency` holds the sustained phase's).
    pub burst_latency: Histogram<u64>,
    /// From the first connect to the last connection up (or failed).
    pub connecting: Option<Span>,
    /// What the workloads marked (`latency`: first and last send).
    pub span: Option<Span>,
    /// When measuring began (ns on the common clock).
    pub t0: u64,
    pub server: Option<ServerRun>,
    /// The client processes' own CPU time (`start` and `go` sampled as the server's).
    pub client: Option<ServerRun>,
    /// What the connections agreed on, and the bytes they moved.
    pub link: Link,
    /// `api`: how long the API took to answer each publish.
    pub answer_latency: Histogram<u64>,
    /// `api`: from `go` to the publisher's last answer.
    pub publishing: Option<Span>,
    /// Processes that are neither server nor client, sampled as the server is, by name
    /// (`api`: `redis`, `backend`).
    pub others: Vec<(String, ServerRun)>,
}

/// `count` per second over the scheduled `secs`, or over the workload's span (from `t0`) when
/// it ran past them.
pub fn per_sec(count: u64, secs: u64, s: &Summary) -> f64 {
    let took = s
        .span
        .map_or(0.0, |sp| sp.to.saturating_sub(s.t0) as f64 / 1e9);
    count as f64 / took.max(secs as f64)
}

/// A duration in nanoseconds, in the unit that reads best.
pub fn human_ns(ns: u64) -> String {
    match ns {
        0..1_000_000 => format!("{:.0} µs", ns as f64 / 1e3),
        1_000_000..1_000_000_000 => format!("{:.2} ms", ns as f64 / 1e6),
        _ => format!("{:.2} s", ns as f64 / 1e9),
    }
}

/// Latency percentiles in µs, one decimal.
pub fn quantiles_us(h: &Histogram<u64>) -> serde_json::Value {
    let us = |ns: u64| (ns as f64 / 100.0).round() / 10.0;
    json!({
        "p50": us(h.value_at_quantile(0.50)),
        "p90": us(h.value_at_quantile(0.90)),
        "p99": us(h.value_at_quantile(0.99)),
        "p999": us(h.value_at_quantile(0.999)),
        "max": us(h.max()),
        "mean": (h.mean() / 100.0).round() / 10.0,
        "samples": h.len(),
    })
}

/// `x` rounded to `digits` decimals.
pub fn round(x: f64, digits: i32) -> f64 {
    let k = 10f64.powi(digits);
    (x * k).round() / k
}

/// `x / n`, or `None` when there is nothing to divide by.
pub fn per(x: f64, n: u64) -> Option<f64> {
    (n > 0).then(|| x / n as f64)
}

/// The figures of a run as one JSON object (what `--json` prints).
pub fn to_json(plan: &Plan, s: &Summary) -> serde_json::Value {
    let mut v = json!({
        "mode": plan.mode(),
        "url": plan.target.url(),
        "payload": plan.payload,
        "conns": plan.conns,
        "secs": plan.secs,
        "ready": s.ready,
        "open_at_end": s.open,
        "connecting_secs": s.connecting.map(|c| round(c.secs(), 3)),
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
        Work::Echo { .. } => super::echo::json(plan, s),
        Work::Connect { .. } => super::connect::json(plan, s),
        Work::Idle { .. } => super::idle::json(plan, s),
        Work::Latency { .. } => super::latency::json(plan, s),
        Work::Broadcast { .. } => super::broadcast::json(plan, s),
        Work::Api(_) => super::api::json(plan, s),
    };
    if let (Some(v), serde_json::Value::Object(extra)) = (v.as_object_mut(), extra) {
        v.extend(extra);
    }
    if let Some(server) = server_json(plan, s) {
        v["server"] = server;
    }
    if let Some(client) = &s.client {
        let mut c = json!({ "processes": client.procs.workers.len() });
        cpu_json(plan, s, client, &mut c);
        v["client"] = c;
        v["cores_busy"] = cores_json(plan, client);
    }
    if plan.target.tls.is_some() {
        v["tls"] = json!(s.link.tls);
    }
    if plan.target.deflate {
        v["deflate"] = deflate_json(&s.link);
    }
    v
}

/// How busy each core of the machine was (0 to 1, whatever kept it so): over the measured
/// window, and for `connect` over the burst. A core at 1.0 limited the figure.
fn cores_json(plan: &Plan, run: &ServerRun) -> serde_json::Value {
    let busy = |from: Option<&server::Sample>, to: Option<&server::Sample>| {
        from.zip(to).map(|(a, b)| {
            server::cores_busy(a, b)
                .into_iter()
                .map(|x| round(x, 2))
                .collect::<Vec<_>>()
        })
    };
    let (from, to) = match plan.work {
        Work::Idle { .. } => (Some(&run.start), run.end.as_ref()),
        _ => (run.go.as_ref(), run.end.as_ref()),
    };
    let mut v = json!({ "window": busy(from, to) });
    if let Work::Connect { .. } = plan.work {
        v["burst"] = json!(busy(Some(&run.start), run.go.as_ref()));
    }
    v
}

/// permessage-deflate: what was agreed, on how many connections, and the ratios (payload
/// bytes before compression over bytes on the wire; 1.0 where nothing was compressed).
pub fn deflate_json(link: &Link) -> serde_json::Value {
    let ratio = |payload: u64, wire: u64| per(payload as f64, wire).map(|r| round(r, 2));
    json!({
        "offered": super::deflate::OFFER.trim_end()
            .trim_start_matches("Sec-WebSocket-Extensions: "),
        "agreed": link.extension,
        "connections": link.deflating,
        "of": link.opened,
        "received_payload_bytes": link.received_payload,
        "received_wire_bytes": link.received_wire,
        "received_ratio": ratio(link.received_payload, link.received_wire),
        "sent_payload_bytes": link.sent_payload,
        "sent_wire_bytes": link.sent_wire,
        "sent_ratio": ratio(link.sent_payload, link.sent_wire),
    })
}

/// The server's processes and the CPU time they spent while the run measured. The window
/// is the measured seconds (from `go` to the last client's report; broadcast and latency
/// include their drain); `connect` also has its burst (before `go`), and `idle` counts from
/// before the first connect to the end of the hold.
pub fn server_json(plan: &Plan, s: &Summary) -> Option<serde_json::Value> {
    let run = s.server.as_ref()?;
    let mut v = json!({
        "master": run.procs.masters.first(),
        "masters": run.procs.masters,
        "workers": run.procs.workers,
    });
    cpu_json(plan, s, run, &mut v);
    if let Work::Idle { .. } = plan.work {
        v["memory"] = super::idle::memory_json(run, plan.conns);
    }
    Some(v)
}

/// The CPU time `run`'s processes spent while the run measured, per message or handshake,
/// into `v`.
fn cpu_json(plan: &Plan, s: &Summary, run: &ServerRun, v: &mut serde_json::Value) {
    let (from, to) = match plan.work {
        Work::Idle { .. } => (Some(&run.start), run.held.as_ref()),
        _ => (run.go.as_ref(), run.end.as_ref()),
    };
    if let (Some(from), Some(to)) = (from, to) {
        let cpu = server::cpu_secs(from, to);
        v["cpu_secs"] = json!(round(cpu, 3));
        let (_, system) = server::cpu_split(from, to);
        v["cpu_system_secs"] = json!(round(system, 3));
        let gone = server::gone(from, to);
        if gone > 0 {
            v["processes_gone"] = json!(gone);
        }
        v["cpu_window_secs"] = json!(round(server::window_secs(from, to), 3));
        match plan.work {
            Work::Echo { .. } | Work::Latency { .. } | Work::Broadcast { .. } | Work::Api(_) => {
                let m = per(cpu, s.counts.messages).map(|x| round(x * 1e6, 3));
                v["cpu_secs_per_million"] = json!(m);
            }
            Work::Connect { .. } => {
                let us = per(cpu, s.counts.messages).map(|x| round(x * 1e6, 1));
                v["cpu_us_per_handshake"] = json!(us);
            }
            Work::Idle { .. } => {}
        }
    }
    if let (Work::Connect { .. }, Some(go)) = (&plan.work, &run.go) {
        let cpu = server::cpu_secs(&run.start, go);
        v["burst_cpu_secs"] = json!(round(cpu, 3));
        let us = per(cpu, s.ready as u64).map(|x| round(x * 1e6, 1));
        v["burst_cpu_us_per_upgrade"] = json!(us);
        // How much of one core the burst kept busy, over the time from the first connect to
        // the last upgrade: near 100 %, that side set the pace.
        let busy = s.connecting.map(|c| c.secs()).filter(|&secs| secs > 0.0);
        v["burst_busy_pct"] = json!(busy.map(|secs| round(cpu / secs * 100.0, 0)));
    }
}

/// The closing table, or the JSON object with `--json`, on stdout.
pub fn print(plan: &Plan, s: &Summary) {
    if plan.json {
        println!("{}", to_json(plan, s));
    } else {
        print!("{}", table(plan, s));
    }
}

/// A table row of latency percentiles.
pub fn latency_row(label: &str, h: &Histogram<u64>) -> String {
    format!(
        "{label:<12} p50 {}  p90 {}  p99 {}  p99.9 {}  max {}  ({} samples)\n",
        human_ns(h.value_at_quantile(0.50)),
        human_ns(h.value_at_quantile(0.90)),
        human_ns(h.value_at_quantile(0.99)),
        human_ns(h.value_at_quantile(0.999)),
        human_ns(h.max()),
        h.len(),
    )
}

fn table(plan: &Plan, s: &Summary) -> String {
    let url = plan.target.url();
    let mut t = match &plan.work {
        Work::Echo { .. } => super::echo::rows(plan, s, &url),
        Work::Connect { .. } => super::connect::rows(plan, s, &url),
        Work::Idle { .. } => super::idle::rows(plan, s, &url),
        Work::Latency { .. } => super::latency::rows(plan, s, &url),
        Work::Broadcast { .. } => super::broadcast::rows(plan, s, &url),
        Work::Api(_) => super::api::rows(plan, s, &url),
    };
    if let Some(v) = server_json(plan, s) {
        t += &server_rows(&v);
    }
    if let Some(client) = &s.client {
        let mut v = json!({});
        cpu_json(plan, s, client, &mut v);
        t += &cpu_rows("client cpu", "burst client", &v);
        let cores = cores_json(plan, client);
        for (label, key) in [("cores busy", "window"), ("burst cores", "burst")] {
            if let Some(busy) = cores[key].as_array() {
                let each: Vec<String> = busy
                    .iter()
                    .map(|b| format!("{:.0} %", b.as_f64().unwrap_or(0.0) * 100.0))
                    .collect();
                t += &format!("{label:<12} {}\n", each.join(", "));
            }
        }
    }
    if let Some(tls) = &s.link.tls {
        t += &format!("tls          {tls}\n");
    }
    if plan.target.deflate {
        let d = deflate_json(&s.link);
        let agreed = d["agreed"].as_str().unwrap_or("not agreed");
        t += &format!(
            "deflate      {agreed} ({} of {} connections)\n\
             \x20 ratio      {} received ({} → {} bytes), {} sent\n",
            d["connections"],
            d["of"],
            d["received_ratio"],
            d["received_payload_bytes"],
            d["received_wire_bytes"],
            d["sent_ratio"],
        );
    }
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

/// The server's rows of the table, from its JSON figures.
fn server_rows(v: &serde_json::Value) -> String {
    let workers = v["workers"].as_array().map_or(0, Vec::len);
    let master = match v["masters"].as_array().map_or(0, Vec::len) {
        0 => String::new(),
        1 => " + master".to_string(),
        n => format!(" + {n} masters"),
    };
    let mut t = format!("server       {workers} process(es){master}\n");
    t += &cpu_rows("server cpu", "burst cpu", v);
    if v["memory"].is_object() {
        t += &super::idle::memory_rows(&v["memory"]);
    }
    t
}

/// The CPU rows of the table (server's or client's), from their JSON figures.
fn cpu_rows(label: &str, burst_label: &str, v: &serde_json::Value) -> String {
    let mut t = String::new();
    let f = |key: &str| v[key].as_f64();
    if let (Some(cpu), Some(window)) = (f("cpu_secs"), f("cpu_window_secs")) {
        t += &format!("{label:<12} {cpu:.2} s in {window:.2} s");
        if let Some(system) = f("cpu_system_secs").filter(|_| cpu > 0.0) {
            t += &format!(" ({:.0} % in the kernel)", system / cpu * 100.0);
        }
        if let Some(m) = f("cpu_secs_per_million") {
            t += &format!(", {m:.2} s per million messages");
        }
        if let Some(us) = f("cpu_us_per_handshake") {
            t += &format!(", {us:.1} µs per handshake");
        }
        t += "\n";
        if let Some(gone) = v["processes_gone"].as_u64() {
            t += &format!(
                "{:<12} {gone} process(es) ended during the run: their CPU is not counted\n",
                ""
            );
        }
    }
    if let Some(cpu) = f("burst_cpu_secs") {
        t += &format!("{burst_label:<12} {cpu:.2} s");
        if let Some(us) = f("burst_cpu_us_per_upgrade") {
            t += &format!(", {us:.1} µs per upgrade");
        }
        if let Some(busy) = f("burst_busy_pct") {
            t += &format!(", {busy:.0} % of a core");
        }
        t += "\n";
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
    fn spans_merge_to_the_earliest_start_and_latest_end() {
        let a = Some(Span { from: 5, to: 9 });
        let b = Some(Span { from: 3, to: 7 });
        assert_eq!(Span::merge(a, b), Some(Span { from: 3, to: 9 }));
        assert_eq!(Span::merge(None, b), b);
        assert_eq!(Span::merge(None, None), None);
        assert_eq!(
            Span {
                from: 0,
                to: 1_500_000_000
            }
            .secs(),
            1.5
        );
    }

    #[test]
    fn durations_read_in_their_unit() {
        assert_eq!(human_ns(350_000), "350 µs");
        assert_eq!(human_ns(1_250_000), "1.25 ms");
        assert_eq!(human_ns(2_000_000_000), "2.00 s");
    }
}
