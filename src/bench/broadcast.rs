//! `wsd bench broadcast`: N subscribers, one publisher sending R messages a second, and the
//! delivery latency of every message at every subscriber.
//!
//! The publisher is open loop: message i is due at `t0 + i/R` whatever the server does, and it
//! carries that scheduled time (ns on the run's common clock, see [`super::Clock`]), so a
//! server that stalls shows as latency instead of quietly slowing the publisher down
//! (coordinated omission). Subscribers may live in other client processes; they read the
//! timestamp back out of each delivery:
//! - `chat` (every text message goes to everyone, the sender too): the payload is
//!   `"<ts> <seq>"`; the publisher's own copies are read and ignored.
//! - `pubsub`: subscribers send `{"subscribe":T}` and count as ready at `{"subscribed":T}`;
//!   the publisher sends `{"publish":T,"data":"<ts> <seq>"}` and subscribers get
//!   `{"topic":T,"data":"<ts> <seq>"}`.
//!
//! With `--payload json` the message is a chat-events document of about `--size` bytes
//! (2048 by default) that starts with `"ts":<ts>,"msg":<seq>,`: the whole payload for `chat`,
//! the `data` object for `pubsub`. The documents cycle through [`payload::VARIANTS`]
//! variants, so a server compressing with context takeover meets a realistic stream.

use super::client::{Driver, Out, Pool};
use super::payload::{self, Kind};
use super::report::{self, Counts, Span, Summary};
use super::shard::Workload;
use super::wire::{self, BadReply, Frame};
use super::{App, Plan, Work};
use crate::proto::frame::CONTINUATION;
use hdrhistogram::Histogram;
use serde_json::json;

/// How long subscribers wait for late deliveries once the publisher is done.
pub const DRAIN_NS: u64 = 5_000_000_000;

/// A timestamp that could not be read from a delivery's first frame.
const NO_STAMP: u64 = u64::MAX;

pub struct Broadcast {
    app: App,
    /// Subscribers of this process are connections `0..subscribers`.
    subscribers: usize,
    /// This process's publisher connection, if it has it (the last one).
    publisher: Option<usize>,
    subscribe: Vec<u8>,
    topic_json: String,
    /// `--payload json`: the size of the documents sent.
    json: Option<usize>,
    subscribed: Vec<bool>,
    ready: usize,
    /// The timestamp of the delivery each connection is in the middle of (fragmented ones).
    stamp: Vec<u64>,
    rate: u64,
    secs: u64,
    t0: Option<u64>,
    /// When the last delivery arrived.
    last_delivery: Option<u64>,
    seq: u64,
    /// Messages the publisher sent in all, once the coordinator has said.
    published: Option<u64>,
    payload: Vec<u8>,
    counts: Counts,
    latency: Histogram<u64>,
}

impl Broadcast {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        app: App,
        topic: &str,
        subscribers: usize,
        with_publisher: bool,
        rate: u64,
        secs: u64,
        payload: Kind,
        size: usize,
    ) -> Broadcast {
        let topic_json = serde_json::Value::from(topic).to_string();
        let conns = subscribers + usize::from(with_publisher);
        Broadcast {
            app,
            subscribers,
            publisher: with_publisher.then_some(subscribers),
            subscribe: format!("{{\"subscribe\":{topic_json}}}").into_bytes(),
            topic_json,
            json: (payload == Kind::Json).then_some(if size == 0 { 2048 } else { size }),
            subscribed: vec![false; conns],
            ready: 0,
            stamp: vec![NO_STAMP; conns],
            rate,
            secs,
            t0: None,
            last_delivery: None,
            seq: 0,
            published: None,
            payload: Vec::with_capacity(128),
            counts: Counts::default(),
            latency: report::histogram(),
        }
    }

    fn total(&self) -> u64 {
        self.secs * self.rate
    }

    fn due(&self, seq: u64) -> u64 {
        self.t0.unwrap_or(0) + (u128::from(seq) * 1_000_000_000 / u128::from(self.rate)) as u64
    }

    /// Message `seq`'s payload, stamped with its scheduled time, in `p`.
    fn message(&self, p: &mut Vec<u8>, seq: u64) {
        p.clear();
        if self.app == App::Pubsub {
            p.extend_from_slice(b"{\"publish\":");
            p.extend_from_slice(self.topic_json.as_bytes());
            p.extend_from_slice(b",\"data\":");
        }
        if let Some(size) = self.json {
            let head = format!("\"ts\":{},\"msg\":{seq},", self.due(seq));
            let variant = seq % payload::VARIANTS as u64;
            p.extend_from_slice(&payload::json_with(variant, size, &head));
        } else {
            let quote = self.app == App::Pubsub;
            if quote {
                p.push(b'"');
            }
            wire::put_decimal(p, self.due(seq));
            p.push(b' ');
            wire::put_decimal(p, seq);
            if quote {
                p.push(b'"');
            }
        }
        if self.app == App::Pubsub {
            p.push(b'}');
        }
    }
}

/// The send time carried by a delivery's payload: its leading number (`chat`), the number
/// its `data` string starts with (`pubsub`), or its first `"ts"` (`--payload json`).
fn stamp_of(payload: &[u8]) -> Option<u64> {
    if let Some(ts) = wire::leading_decimal(payload) {
        return Some(ts);
    }
    // The first of the two keys, in one pass: chat's JSON events put `"ts":` first, pubsub's
    // envelope has `"data":"` early; neither needs the rest of a large message read.
    (0..payload.len())
        .filter(|&i| payload[i] == b'"')
        .find_map(|i| {
            let rest = &payload[i..];
            [&b"\"data\":\""[..], b"\"ts\":"]
                .iter()
                .filter(|key| rest.starts_with(key))
                .find_map(|key| wire::leading_decimal(&rest[key.len()..]))
        })
}

fn preview(payload: &[u8]) -> String {
    String::from_utf8_lossy(&payload[..payload.len().min(80)]).into_owned()
}

impl Driver for Broadcast {
    fn opened(&mut self, id: usize, _handshake_ns: u64, out: &mut Out<'_>, _now: u64) {
        if Some(id) == self.publisher || self.app == App::Chat {
            self.subscribed[id] = true;
            self.ready += 1;
        } else {
            out.put_text(&self.subscribe);
        }
    }

    fn data(
        &mut self,
        id: usize,
        frame: Frame<'_>,
        _out: &mut Out<'_>,
        now: u64,
    ) -> Result<(), BadReply> {
        let payload = frame.payload;
        if payload.starts_with(b"{\"error\"") {
            return Err(BadReply::ServerError(preview(payload)));
        }
        if Some(id) == self.publisher {
            return Ok(()); // chat sends the publisher its own messages back
        }
        if !self.subscribed[id] {
            let ack = format!("{{\"subscribed\":{}}}", self.topic_json);
            if payload != ack.as_bytes() {
                return Err(BadReply::Unexpected {
                    want: ack,
                    got: preview(payload),
                });
            }
            self.subscribed[id] = true;
            self.ready += 1;
            return Ok(());
        }
        if frame.opcode != CONTINUATION {
            self.stamp[id] = stamp_of(payload).unwrap_or(NO_STAMP);
            if self.stamp[id] == NO_STAMP {
                return Err(BadReply::NoStamp(preview(payload)));
            }
        }
        // Counted even before this process hears `go`: the publisher, in another process,
        // may have heard it first, and nothing is published before it.
        if frame.fin {
            self.counts.messages += 1;
            self.counts.bytes += payload.len() as u64;
            self.last_delivery = Some(now);
            self.latency
                .saturating_record(now.saturating_sub(self.stamp[id]));
        }
        Ok(())
    }
}

impl Workload for Broadcast {
    fn ready(&self, _pool: &Pool) -> usize {
        self.ready
    }

    fn go(&mut self, t0: u64, now: u64, pool: &mut Pool) {
        self.t0 = Some(t0);
        self.tick(now, pool);
    }

    /// The publisher sends every message that is due, in one write.
    fn tick(&mut self, now: u64, pool: &mut Pool) -> Option<u64> {
        let id = self.publisher?;
        let total = self.total();
        if self.seq >= total || !pool.is_open(id) {
            return None;
        }
        let first = self.seq;
        let mut last = first;
        while last < total && self.due(last) <= now {
            last += 1;
        }
        if last > first {
            let mut payload = std::mem::take(&mut self.payload);
            let this = &*self;
            pool.send(id, |out| {
                for seq in first..last {
                    this.message(&mut payload, seq);
                    out.put_text(&payload);
                }
            });
            self.payload = payload;
            self.seq = last;
            self.counts.sent = last;
        }
        (last < total).then(|| self.due(last))
    }

    fn published_here(&self, pool: &Pool) -> Option<u64> {
        let id = self.publisher?;
        (self.t0.is_some() && (self.seq >= self.total() || !pool.is_open(id))).then_some(self.seq)
    }

    fn published(&mut self, total: u64) {
        self.published = Some(total);
    }

    fn done(&self, now: u64, pool: &Pool) -> bool {
        let Some(t0) = self.t0 else { return false };
        if now >= t0 + self.secs * 1_000_000_000 + DRAIN_NS {
            return true;
        }
        let Some(total) = self.published else {
            return false;
        };
        let live = self.subscribers.saturating_sub(pool.failed()) as u64;
        self.counts.messages >= total * live
    }

    fn measured(&self, pool: &Pool) -> (usize, usize) {
        let publisher = self
            .publisher
            .map_or(0, |id| usize::from(self.subscribed[id]));
        let open = (0..self.subscribers).filter(|&id| pool.is_open(id)).count();
        (self.ready - publisher, open)
    }

    fn counts(&self) -> Counts {
        self.counts
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

/// Deliveries per second: over the time they really took when the server (or the client) fell
/// behind and the last came after the scheduled window.
fn achieved(plan: &Plan, s: &Summary) -> f64 {
    report::per_sec(s.counts.messages, plan.secs, s)
}

/// Broadcast's own figures for `--json`.
pub fn json(plan: &Plan, s: &Summary) -> serde_json::Value {
    let Work::Broadcast {
        rate, app, topic, ..
    } = &plan.work
    else {
        return json!({});
    };
    let expected = s.counts.sent * plan.conns as u64;
    json!({
        "app": app,
        "topic": topic,
        "rate": rate,
        "sent": s.counts.sent,
        "expected": expected,
        "delivered": s.counts.messages,
        "missing": expected.saturating_sub(s.counts.messages),
        "deliveries_per_sec": achieved(plan, s).round(),
    })
}

/// Broadcast's rows of the table.
pub fn rows(plan: &Plan, s: &Summary, url: &str) -> String {
    let Work::Broadcast { rate, app, .. } = &plan.work else {
        return String::new();
    };
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
        achieved(plan, s),
        expected.saturating_sub(s.counts.messages),
    ) + &report::latency_row("latency", &s.latency)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stamps_are_read_back_from_both_protocols() {
        assert_eq!(stamp_of(b"123456789 17"), Some(123_456_789));
        let pubsub = br#"{"topic":"bench","data":"987654321 3"}"#;
        assert_eq!(stamp_of(pubsub), Some(987_654_321));
        assert_eq!(stamp_of(br#"{"topic":"x"}"#), None);
        assert_eq!(stamp_of(b"hello"), None);
        let json = br#"{"topic":"bench","data":{"ts":55,"msg":1,"events":[{"ts":9}]}}"#;
        assert_eq!(stamp_of(json), Some(55));
    }

    #[test]
    fn the_publisher_stamps_each_message_with_its_scheduled_time() {
        let mut b = Broadcast::new(App::Pubsub, "room \"1\"", 0, true, 4, 1, Kind::Text, 0);
        b.t0 = Some(1_000);
        let mut payload = Vec::new();
        b.message(&mut payload, 2);
        assert_eq!(
            String::from_utf8(payload.clone()).unwrap(),
            r#"{"publish":"room \"1\"","data":"500001000 2"}"#
        );
        let mut b = Broadcast::new(App::Chat, "t", 0, true, 4, 1, Kind::Json, 0);
        b.t0 = Some(1_000);
        b.message(&mut payload, 2);
        assert_eq!(payload.len(), 2048);
        assert_eq!(stamp_of(&payload), Some(500_001_000));
        serde_json::from_slice::<serde_json::Value>(&payload).unwrap();
    }
}
