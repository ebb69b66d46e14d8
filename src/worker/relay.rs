//! API requests for the other groups, over the bridges of `bus::bridges`.
//!
//! The API's worker relays a request that names another group, as it came (path, query and
//! body), to a worker of that group, and answers with what comes back. That worker reads it
//! as its own API would and carries it out over its own group's bus: its mesh, its Redis
//! channels, its presence. The key and the method were checked by the worker that took the
//! request; only the master makes bridges, between its own workers.

use super::asking::Question;
use super::event_loop::Loop;
use super::gather::{Compose, Outcome, ReplyTo};
use crate::api::call::{self, ApiError};
use crate::api::http::Request;
use crate::bus::bridges::BridgeRef;
use crate::bus::wire::BusMessage;
use bytes::Bytes;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

/// Messages taken from one bridge per loop turn.
const BRIDGE_BUDGET: usize = 64;

/// A request relayed to another group's worker, in an `Ask`. The answer is
/// `{"status": N, "body": {...}}`.
#[derive(Debug, Serialize, Deserialize)]
pub(super) struct Relayed {
    path: String,
    query: Option<String>,
    body: String,
}

impl Relayed {
    /// `req` as it came; its body was read as JSON already, so it is UTF-8.
    pub(super) fn of(req: &Request) -> Relayed {
        Relayed {
            path: req.path.clone(),
            query: req.query.clone(),
            body: String::from_utf8_lossy(&req.body).into_owned(),
        }
    }

    fn health() -> Relayed {
        Relayed {
            path: "/health".into(),
            query: None,
            body: String::new(),
        }
    }

    fn ask(&self, id: u32) -> BusMessage {
        let json = serde_json::to_vec(self).expect("a request serializes");
        BusMessage::Ask(id, Bytes::from(json))
    }
}

impl Loop {
    /// Bridge `idx` is readable: requests relayed to this worker, or answers to those it
    /// relayed. One with more waiting than a turn's budget is read again next turn.
    pub(super) fn bridge_ready(&mut self, idx: usize) {
        let Some(serial) = self.bridges.serial_of(idx) else {
            return;
        };
        let got = self
            .bridges
            .receive(idx, BRIDGE_BUDGET, self.poll.registry());
        for msg in got.messages {
            match msg {
                BusMessage::Ask(id, body) => self.run_relayed((idx, serial), id, &body),
                BusMessage::Answer(id, body) => self.on_answer(id, &body),
                _ => log::warn!("a bridge carries only API requests and answers; skipped"),
            }
        }
        if got.more && !self.bridges_again.contains(&idx) {
            self.bridges_again.push(idx);
        }
    }

    /// Relays `req` to a worker of `group`; its answer goes to `reply_to`, or a 503 if no
    /// worker of the group takes it or answers in time.
    pub(super) fn relay(&mut self, group: &str, req: Relayed, reply_to: ReplyTo) {
        let id = self.gatherings.id();
        let origin = self.ctx.bus.origin;
        let sent = match self.bridges.pick(group) {
            Some(to) => self.bridges.send(to, origin, &req.ask(id)),
            None => false,
        };
        let compose = Compose::Relayed(group.to_string());
        self.gather(id, reply_to, usize::from(sent), compose);
    }

    /// `/health` naming no group: this group's workers, and every other group's through a
    /// relayed `/health`. 200 only if all of them serve.
    pub(super) fn health_everywhere(&mut self, others: &[String], reply_to: ReplyTo) {
        let id = self.gatherings.id();
        let origin = self.ctx.bus.origin;
        let mut wanted = self.ctx.bus.send_to_peers(&Question::Health.ask(id));
        let mut reached = true;
        for group in others {
            let sent = match self.bridges.pick(group) {
                Some(to) => self.bridges.send(to, origin, &Relayed::health().ask(id)),
                None => false,
            };
            wanted += usize::from(sent);
            reached &= sent;
        }
        let serving = self.stopping.mode().is_none() && reached;
        self.gather(id, reply_to, wanted, Compose::Health(serving));
    }

    /// A request the API's worker relayed here: carried out as this group's own API would,
    /// and answered over the same bridge.
    fn run_relayed(&mut self, bridge: BridgeRef, id: u32, body: &[u8]) {
        let mut sends = false;
        let outcome = match serde_json::from_slice::<Relayed>(body) {
            Ok(r) => match call::read(&r.path, r.query.as_deref(), r.body.as_bytes()) {
                Ok(a)
                    if a.group
                        .as_deref()
                        .is_none_or(|g| g == self.ctx.worker_name()) =>
                {
                    sends = a.call.sends();
                    self.api_carry_out(a.call)
                }
                Ok(a) => Outcome::Now(
                    ApiError::UnknownGroup {
                        given: a.group.unwrap_or_default(),
                        known: vec![self.ctx.worker_name().to_string()],
                    }
                    .response(),
                ),
                Err(e) => Outcome::Now(e.response()),
            },
            Err(e) => {
                log::warn!("bridge: a relayed request this worker cannot read: {e}");
                return self.relay_answer(bridge, id, 400, &json!({ "error": e.to_string() }));
            }
        };
        match outcome {
            Outcome::Now(r) if !sends => {
                let body = serde_json::from_slice(&r.body).unwrap_or(Value::Null);
                self.relay_answer(bridge, id, r.status, &body);
            }
            wait => self.ask_for(wait, ReplyTo::Relay { bridge, id }, sends),
        }
    }

    /// Sends the answer to relayed request `id` back over its bridge.
    pub(super) fn relay_answer(&mut self, bridge: BridgeRef, id: u32, status: u16, body: &Value) {
        let answer = json!({ "status": status, "body": body });
        let msg = BusMessage::Answer(id, Bytes::from(answer.to_string()));
        self.bridges.send(bridge, self.ctx.bus.origin, &msg);
    }
}
