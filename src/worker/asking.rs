//! Questions one worker asks the others of its host over the bus, and the answers it gets:
//! how many subscribers a topic has, who is there, a user's connections, the counters, whether
//! the worker serves. The API asks them to answer for the whole host; a question from another
//! host (through Redis) carries out its action and wants no answer.
//!
//! Asking rides the mesh's order: a question sent after a publish reaches each peer after the
//! publish, so "how many subscribers" counts exactly those the publish reached.

use super::event_loop::Loop;
use crate::ConnId;
use crate::bus::wire::{BusMessage, Origin};
use bytes::Bytes;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

/// What is asked. Each answer is JSON: a number for the counts, a list for presence, an
/// object for the counters and health.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum Question {
    /// The subscribers of these topics here, summed (a topic named twice counts twice).
    Subscribers(Vec<String>),
    /// The open connections here.
    Connections,
    /// The number of connections of a user here.
    UserConnections(String),
    /// The connections of a user here: `[{"conn": id}]`.
    UserConns(String),
    /// Whether a connection is still open, after what was sent before.
    IsOpen(ConnId),
    /// The subscribers of a topic here: connection ids and users.
    Presence(String),
    /// This worker's counters.
    Stats,
    /// Whether this worker serves (not stopping).
    Health,
    /// Close a connection or every connection of a user; answer how many.
    Disconnect {
        conn: Option<ConnId>,
        user: Option<String>,
        code: u16,
        reason: String,
    },
}

impl Question {
    /// The question on the wire, wanting an answer to `id` (0: none).
    pub fn ask(&self, id: u32) -> BusMessage {
        let json = serde_json::to_vec(self).expect("a question serializes");
        BusMessage::Ask(id, Bytes::from(json))
    }
}

impl Loop {
    /// A question from `from`: answered, if it wants an answer, to the worker that asked.
    pub(super) fn on_ask(&mut self, from: Origin, id: u32, body: &[u8]) {
        let question: Question = match serde_json::from_slice(body) {
            Ok(q) => q,
            Err(e) => {
                log::warn!("bus: a question this worker does not know: {e}");
                return;
            }
        };
        let answer = self.answer(&question);
        if id == 0 {
            return;
        }
        let reply = BusMessage::Answer(id, Bytes::from(answer.to_string()));
        if from.host == self.ctx.bus.origin.host {
            self.ctx.bus.send_to_slot(from.slot as usize, &reply);
        } else {
            self.ctx.bus.send_to_host(from.host, from.slot, &reply);
        }
    }

    /// This worker's answer to `q`, doing what it asks.
    pub(super) fn answer(&mut self, q: &Question) -> Value {
        let ctx = &mut self.ctx;
        match q {
            Question::Subscribers(topics) => topics
                .iter()
                .map(|t| ctx.topics.members(t).len())
                .sum::<usize>()
                .into(),
            Question::Connections => ctx.connection_count().into(),
            Question::UserConnections(uid) => ctx.users.members(uid).len().into(),
            Question::UserConns(uid) => {
                let ids = ctx.users.members(uid);
                let rows = ids.into_iter().filter_map(|id| ctx.global_id(id));
                Value::Array(rows.map(|g| json!({ "conn": g.to_string() })).collect())
            }
            Question::IsOpen(id) => ctx.is_open(*id).into(),
            Question::Presence(topic) => {
                let members = ctx.topics.members(topic);
                let rows: Vec<Value> = members
                    .into_iter()
                    .filter_map(|id| {
                        let conn = ctx.global_id(id)?.to_string();
                        let (user, info) = (ctx.user_of(id), ctx.user_info(id));
                        Some(json!({ "conn": conn, "user": user, "info": info }))
                    })
                    .collect();
                Value::Array(rows)
            }
            Question::Stats => {
                self.refresh_counters();
                let c = &self.ctx.counters;
                json!({
                    "worker": self.ctx.worker_id,
                    "pid": std::process::id(),
                    "connections": c.connections,
                    "messages_in": c.total_request,
                    "messages_out": c.messages_out,
                    "bytes_in": c.bytes_in,
                    "bytes_out": c.bytes_out,
                    "send_fail": c.send_fail,
                    "bus_dropped": c.bus_dropped,
                    "bus": c.bus_state,
                    "memory": c.memory,
                })
            }
            Question::Health => json!({ "serving": self.stopping.mode().is_none() }),
            Question::Disconnect {
                conn,
                user,
                code,
                reason,
            } => {
                let ids = match (conn, user) {
                    (Some(id), _) => vec![*id],
                    (None, Some(uid)) => ctx.users.members(uid),
                    (None, None) => Vec::new(),
                };
                let open: Vec<ConnId> = ids.into_iter().filter(|&id| ctx.is_open(id)).collect();
                for &id in &open {
                    ctx.close_with(id, *code, reason);
                }
                open.len().into()
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn questions_travel_as_json() {
        for q in [
            Question::Subscribers(vec!["a".into(), "b".into()]),
            Question::Connections,
            Question::IsOpen(ConnId { serial: 9, idx: 3 }),
            Question::Disconnect {
                conn: None,
                user: Some("ada".into()),
                code: 4000,
                reason: "bye".into(),
            },
        ] {
            let BusMessage::Ask(7, body) = q.ask(7) else {
                panic!("an ask")
            };
            assert_eq!(serde_json::from_slice::<Question>(&body).unwrap(), q);
        }
    }
}
