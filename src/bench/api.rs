//! `wsd bench api`: a backend publishes through an HTTP API, and N subscribers on one or two
//! hosts receive; publishes/s, deliveries/s, missing deliveries and publish→delivery latency.
//!
//! This is how a real-time server is fed in production: not by a WebSocket client sending to
//! the others, as `broadcast` measures, but by the application's backend calling the server
//! (wsd's `POST /api/publish`), with the server's hosts joined by a bus (wsd's Redis bus) so
//! that a publish on one host reaches subscribers on every host. The parts:
//!
//! - Subscribers ([`Subscribers`], in client processes like every mode's connections) are
//!   split evenly over the hosts given by `--url`: subscriber `i` (counted over all hosts)
//!   joins topic `i % T` of `--topics T`, so each topic has subscribers on every host and each
//!   publish crosses the bus. They speak wsd's `pubsub` app (`{"subscribe":T}`, then each
//!   publish's `data` as it was given), or socket.io over Engine.IO ([`super::socketio`]) to
//!   measure socket.io the same way.
//! - The publisher ([`super::publisher`]) is a process of its own with a few keep-alive HTTP
//!   connections to one host's API. Publish `j` goes to topic `j % T` with `data` =
//!   `"<ts> <j>"`: open loop at `--rate`, `ts` its scheduled time, so a server that stalls
//!   shows as latency rather than as a slower publisher; or flat out (`--flat`), `--depth`
//!   requests in flight per connection, `ts` its send time.
//! - Each delivery is checked (the publish's topic must be the subscriber's) and timed from
//!   `ts`, on the clock every process shares ([`super::Clock`]).
//!
//! Missing deliveries are those expected (each accepted publish times its topic's ready
//! subscribers) that did not arrive within [`DRAIN_NS`] of the last publish. The server's CPU
//! may cover several hosts (`--config` and `--host-config`, or `--pid`), and the CPU of what
//! is neither server nor client (Redis, a publishing backend) is reported apart.

use super::broadcast::DRAIN_NS;
use super::client::{Driver, Out, Pool};
use super::http::Endpoint;
use super::report::{self, Counts, Span, Summary};
use super::server::ServerRun;
use super::shard::Workload;
use super::socketio::{self, Packet};
use super::wire::{self, BadReply, Frame};
use super::{Plan, Target, Work};
use crate::proto::frame::CONTINUATION;
use clap::ValueEnum;
use hdrhistogram::Histogram;
use serde_json::json;

/// A timestamp that could not be read from a delivery's first frame.
const NO_STAMP: u64 = u64::MAX;

/// The subscribers' protocol.
#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    /// wsd's `pubsub` app.
    Wsd,
    /// socket.io 4 (Engine.IO v4) over WebSocket, rooms joined with a `join` event.
    Socketio,
}

impl std::fmt::Display for Protocol {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Protocol::Wsd => "wsd",
            Protocol::Socketio => "socket.io",
        })
    }
}

/// What an `api` run is asked to do, besides what every mode has.
#[derive(Debug, Clone)]
pub struct Settings {
    /// The hosts the subscribers are split over (the plan's target is the first).
    pub hosts: Vec<Target>,
    pub api: Endpoint,
    /// The publish endpoint's path.
    pub path: String,
    pub key: String,
    /// Publishes per second, or `None` for flat out.
    pub rate: Option<u64>,
    pub topics: usize,
    /// Topics are `<prefix>-<k>`.
    pub prefix: String,
    pub http_conns: usize,
    /// Flat out: requests in flight per HTTP connection.
    pub depth: usize,
    pub protocol: Protocol,
    /// The wsd configs of the hosts after the first (`--config`): their masters and workers
    /// count in the server's CPU.
    pub host_configs: Vec<std::path::PathBuf>,
    /// Processes whose CPU is reported apart from the server's: Redis, and a backend that
    /// publishes for the server (socket.io's emitter).
    pub redis_pids: Vec<i32>,
    pub backend_pids: Vec<i32>,
}

impl Settings {
    /// Topic `k`'s name.
    pub fn topic(&self, k: usize) -> String {
        format!("{}-{k}", self.prefix)
    }

    /// How many of `total` publishes (publish `j` to topic `j % topics`) go to topic `k`.
    pub fn publishes_to(&self, k: usize, total: u64) -> u64 {
        let t = self.topics as u64;
        total / t + u64::from((k as u64) < total % t)
    }
}

/// Where a subscriber is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Waiting for the upgrade, or (socket.io) for the namespace's answer.
    Connecting,
    /// Asked to join its topic; waiting for the acknowledgement.
    Joining,
    Ready,
}

/// The subscribers of one client process.
pub struct Subscribers {
    settings: Settings,
    /// The global index of connection 0 (its topic follows from it).
    first: usize,
    state: Vec<State>,
    ready: usize,
    /// This process's ready subscribers on each topic.
    ready_per_topic: Vec<u64>,
    /// The timestamp of the delivery each connection is in the middle of (fragmented ones).
    stamp: Vec<u64>,
    secs: u64,
    t0: Option<u64>,
    last_delivery: Option<u64>,
    /// Publishes accepted in all, once the coordinator has said.
    published: Option<u64>,
    counts: Counts,
    latency: Histogram<u64>,
}

impl Subscribers {
    pub fn new(settings: &Settings, first: usize, n: usize, secs: u64) -> Subscribers {
        Subscribers {
            settings: settings.clone(),
            first,
            state: vec![State::Connecting; n],
            ready: 0,
            ready_per_topic: vec![0; settings.topics],
            stamp: vec![NO_STAMP; n],
            secs,
            t0: None,
            last_delivery: None,
            published: None,
            counts: Counts::default(),
            latency: report::histogram(),
        }
    }

    fn topic_of(&self, id: usize) -> usize {
        (self.first + id) % self.settings.topics
    }

    fn topic_json(&self, id: usize) -> String {
        serde_json::Value::from(self.settings.topic(self.topic_of(id))).to_string()
    }

    fn join(&mut self, id: usize, out: &mut Out<'_>) {
        let topic = self.topic_json(id);
        let ask = match self.settings.protocol {
            Protocol::Wsd => format!("{{\"subscribe\":{topic}}}").into_bytes(),
            Protocol::Socketio => socketio::join(&topic),
        };
        out.put_text(&ask);
        self.state[id] = State::Joining;
    }

    fn joined(&mut self, id: usize) {
        self.state[id] = State::Ready;
        self.ready += 1;
        let topic = self.topic_of(id);
        self.ready_per_topic[topic] += 1;
    }

    /// Deliveries this process should get for the publishes accepted so far, once known.
    fn expected(&self) -> Option<u64> {
        let total = self.published?;
        Some(
            self.ready_per_topic
                .iter()
                .enumerate()
                .map(|(k, &n)| n * self.settings.publishes_to(k, total))
                .sum(),
        )
    }

    /// A delivery's first frame: its timestamp, after checking that its publish was for this
    /// subscriber's topic.
    fn stamp(&self, id: usize, data: &[u8]) -> Result<u64, BadReply> {
        let stamp = wire::leading_decimal(data);
        let digits = data.iter().take_while(|b| b.is_ascii_digit()).count();
        let seq = data
            .get(digits + 1..)
            .filter(|_| data.get(digits) == Some(&b' '))
            .and_then(wire::leading_decimal);
        let (Some(stamp), Some(seq)) = (stamp, seq) else {
            return Err(BadReply::NoStamp(preview(data)));
        };
        let topic = (seq % self.settings.topics as u64) as usize;
        if topic != self.topic_of(id) {
            return Err(BadReply::Unexpected {
                want: format!("publishes to {}", self.settings.topic(self.topic_of(id))),
                got: format!("publish {seq}, to {}", self.settings.topic(topic)),
            });
        }
        Ok(stamp)
    }

    /// A delivery's frame (the first, a continuation, or the last).
    fn deliver(
        &mut self,
        id: usize,
        frame: &Frame<'_>,
        data: &[u8],
        now: u64,
    ) -> Result<(), BadReply> {
        if frame.opcode != CONTINUATION {
            self.stamp[id] = self.stamp(id, data)?;
        }
        // Counted even before this process hears `go`: the publisher, in another process,
        // may have heard it first, and nothing is published before it.
        if frame.fin {
            self.counts.messages += 1;
            self.counts.bytes += frame.payload.len() as u64;
            self.last_delivery = Some(now);
            self.latency
                .saturating_record(now.saturating_sub(self.stamp[id]));
        }
        Ok(())
    }
}

fn preview(payload: &[u8]) -> String {
    String::from_utf8_lossy(&payload[..payload.len().min(80)]).into_owned()
}

impl Driver for Subscribers {
    fn opened(&mut self, id: usize, _handshake_ns: u64, out: &mut Out<'_>, _now: u64) {
        match self.settings.protocol {
            Protocol::Wsd => self.join(id, out),
            Protocol::Socketio => out.put_text(socketio::CONNECT),
        }
    }

    fn data(
        &mut self,
        id: usize,
        frame: Frame<'_>,
        out: &mut Out<'_>,
        now: u64,
    ) -> Result<(), BadReply> {
        let payload = frame.payload;
        if frame.opcode == CONTINUATION {
            return self.deliver(id, &frame, payload, now);
        }
        match self.settings.protocol {
            Protocol::Wsd => {
                if self.state[id] == State::Ready {
                    return self.deliver(id, &frame, payload, now);
                }
                if payload.starts_with(b"{\"error\"") {
                    return Err(BadReply::ServerError(preview(payload)));
                }
                let ack = format!("{{\"subscribed\":{}}}", self.topic_json(id));
                if payload != ack.as_bytes() {
                    return Err(BadReply::Unexpected {
                        want: ack,
                        got: preview(payload),
                    });
                }
                self.joined(id);
                Ok(())
            }
            Protocol::Socketio => match socketio::parse(payload) {
                Packet::Delivery(data) if self.state[id] == State::Ready => {
                    self.deliver(id, &frame, data, now)
                }
                Packet::Ping => {
                    out.put_text(socketio::PONG);
                    Ok(())
                }
                Packet::Open | Packet::Other => Ok(()),
                Packet::Connected if self.state[id] == State::Connecting => {
                    self.join(id, out);
                    Ok(())
                }
                Packet::Joined(room) if self.state[id] == State::Joining => {
                    let mine = self.settings.topic(self.topic_of(id));
                    if room != mine.as_bytes() {
                        return Err(BadReply::Unexpected {
                            want: format!("joined {mine}"),
                            got: preview(payload),
                        });
                    }
                    self.joined(id);
                    Ok(())
                }
                Packet::ConnectError | Packet::Closed => {
                    Err(BadReply::ServerError(preview(payload)))
                }
                _ => Err(BadReply::Unexpected {
                    want: format!("nothing of this kind while {:?}", self.state[id]),
                    got: preview(payload),
                }),
            },
        }
    }
}

impl Workload for Subscribers {
    fn ready(&self, _pool: &Pool) -> usize {
        self.ready
    }

    fn go(&mut self, t0: u64, _now: u64, _pool: &mut Pool) {
        self.t0 = Some(t0);
    }

    fn published(&mut self, total: u64) {
        self.published = Some(total);
    }

    fn done(&self, now: u64, _pool: &Pool) -> bool {
        let Some(t0) = self.t0 else { return false };
        if now >= t0 + self.secs * super::SEC + DRAIN_NS {
            return true;
        }
        // A subscriber that fails after it was ready leaves its deliveries missing; the run
        // then ends at the drain's deadline.
        self.expected()
            .is_some_and(|expected| self.counts.messages >= expected)
    }

    fn measured(&self, pool: &Pool) -> (usize, usize) {
        (self.ready, pool.open())
    }

    fn counts(&self) -> Counts {
        Counts {
            expected: self.expected().unwrap_or(0),
            ..self.counts
        }
    }

    fn latency(&self) -> &Histogram<u64> {
        &self.latency
    }

    fn span(&self) -> Option<Span> {
        Some(Span {
            from: self.t0?,
            to: self.last_delivery?,
        })
    }
}

/// Publishes per second: those the API accepted, over the scheduled window or the time
/// they really took.
fn publishes_per_sec(plan: &Plan, s: &Summary) -> f64 {
    let took = s.publishing.map_or(0.0, |p| p.secs());
    s.counts.answered as f64 / took.max(plan.secs as f64)
}

/// Deliveries per second: over the time they really took when the server (or the client)
/// fell behind and the last came after the scheduled window.
fn deliveries_per_sec(plan: &Plan, s: &Summary) -> f64 {
    report::per_sec(s.counts.messages, plan.secs, s)
}

/// The server's CPU seconds over the measured window, if its processes were given.
fn server_cpu(s: &Summary) -> Option<f64> {
    cpu_of(s.server.as_ref()?)
}

fn cpu_of(run: &ServerRun) -> Option<f64> {
    Some(super::server::cpu_secs(run.go.as_ref()?, run.end.as_ref()?))
}

/// The `api` mode's own figures for `--json`.
pub fn json(plan: &Plan, s: &Summary) -> serde_json::Value {
    let Work::Api(a) = &plan.work else {
        return json!({});
    };
    let missing = s.counts.expected.saturating_sub(s.counts.messages);
    let cpu = server_cpu(s);
    let mut v = json!({
        "protocol": a.protocol,
        "hosts": a.hosts.iter().map(Target::url).collect::<Vec<_>>(),
        "api": format!("http://{}{}", a.api.authority, a.path),
        "http_conns": a.http_conns,
        "rate": a.rate,
        "flat": a.rate.is_none(),
        "depth": a.rate.is_none().then_some(a.depth),
        "topics": a.topics,
        "sent": s.counts.sent,
        "published": s.counts.answered,
        "late": s.counts.late,
        "publishes_per_sec": publishes_per_sec(plan, s).round(),
        "answer_latency_us": report::quantiles_us(&s.answer_latency),
        "expected": s.counts.expected,
        "delivered": s.counts.messages,
        "missing": missing,
        "unexpected": s.counts.messages.saturating_sub(s.counts.expected),
        "deliveries_per_sec": deliveries_per_sec(plan, s).round(),
        "deliveries_per_cpu_sec": cpu
            .filter(|&c| c > 0.0)
            .map(|c| (s.counts.messages as f64 / c).round()),
    });
    for (name, run) in &s.others {
        v[name.as_str()] = json!({
            "pids": run.procs.workers,
            "cpu_secs": cpu_of(run).map(|c| report::round(c, 3)),
        });
    }
    v
}

/// The `api` mode's rows of the table.
pub fn rows(plan: &Plan, s: &Summary, _url: &str) -> String {
    let Work::Api(a) = &plan.work else {
        return String::new();
    };
    let v = json(plan, s);
    let urls: Vec<String> = a.hosts.iter().map(Target::url).collect();
    let pace = match a.rate {
        Some(r) => format!("{r} publishes/s"),
        None => format!("flat out, {} in flight per connection", a.depth),
    };
    let mut t = format!(
        "wsd bench api ({})  {}\n\
         \x20 {} subscribers on {} topic(s) over {} host(s), {pace} for {} s to {} ({} connection(s))\n\
         subscribers  {} ready, {} open at the end\n\
         published    {} accepted of {} sent, {:.0}/s ({} sent late)\n",
        a.protocol,
        urls.join(" "),
        plan.conns,
        a.topics,
        a.hosts.len(),
        plan.secs,
        v["api"].as_str().unwrap_or(""),
        a.http_conns,
        s.ready,
        s.open,
        s.counts.answered,
        s.counts.sent,
        publishes_per_sec(plan, s),
        s.counts.late,
    );
    t += &report::latency_row("answered", &s.answer_latency);
    t += &format!(
        "expected     {} deliveries\n\
         delivered    {}, {:.0} deliveries/s\n\
         missing      {}\n",
        s.counts.expected,
        s.counts.messages,
        deliveries_per_sec(plan, s),
        v["missing"],
    );
    t += &report::latency_row("latency", &s.latency);
    if let Some(per) = v["deliveries_per_cpu_sec"].as_f64() {
        t += &format!("server work  {per:.0} deliveries per server CPU second\n");
    }
    for (name, run) in &s.others {
        if let Some(cpu) = cpu_of(run) {
            t += &format!(
                "{name:<12} {cpu:.2} s of CPU (pids {:?})\n",
                run.procs.workers
            );
        }
    }
    t
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(topics: usize, protocol: Protocol) -> Settings {
        Settings {
            hosts: vec![Target::parse("ws://127.0.0.1:1/").unwrap()],
            api: Endpoint::parse("http://127.0.0.1:2").unwrap(),
            path: "/api/publish".into(),
            key: "k".into(),
            rate: Some(10),
            topics,
            prefix: "bench".into(),
            http_conns: 1,
            depth: 1,
            protocol,
            host_configs: Vec::new(),
            redis_pids: Vec::new(),
            backend_pids: Vec::new(),
        }
    }

    #[test]
    fn publishes_spread_over_the_topics_in_turn() {
        let s = settings(4, Protocol::Wsd);
        let per: Vec<u64> = (0..4).map(|k| s.publishes_to(k, 10)).collect();
        assert_eq!(per, [3, 3, 2, 2]);
        assert_eq!(s.topic(3), "bench-3");
    }

    #[test]
    fn deliveries_are_checked_against_the_subscribers_topic() {
        let s = settings(4, Protocol::Wsd);
        // Connections 0 and 1 of this process are subscribers 6 and 7: topics 2 and 3.
        let subs = Subscribers::new(&s, 6, 2, 1);
        assert_eq!(subs.stamp(0, b"12345 10").unwrap(), 12345);
        assert!(matches!(
            subs.stamp(1, b"12345 10"),
            Err(BadReply::Unexpected { .. })
        ));
        assert_eq!(subs.stamp(1, b"99 7\"]").unwrap(), 99, "socket.io's tail");
        assert!(matches!(subs.stamp(0, b"hello"), Err(BadReply::NoStamp(_))));
        assert!(matches!(subs.stamp(0, b"12 "), Err(BadReply::NoStamp(_))));
    }

    #[test]
    fn expected_deliveries_follow_the_ready_subscribers_topics() {
        let s = settings(4, Protocol::Socketio);
        let mut subs = Subscribers::new(&s, 0, 6, 1);
        for id in [0, 1, 4] {
            subs.joined(id); // topics 0, 1 and 0
        }
        assert_eq!(subs.expected(), None, "not before the publisher has said");
        subs.published = Some(10);
        assert_eq!(subs.expected(), Some(2 * 3 + 3));
    }
}
