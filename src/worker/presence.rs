//! Presence and users on the data path: what a subscription, a departure or a user binding
//! writes to the cluster's records (`bus::directory`, with `[server] bus`), the join and leave
//! events subscribers get, the periodic refresh that keeps a live worker's records from
//! expiring, and a subscriber's question "who is here?".
//!
//! Without a cluster bus nothing is written: presence is asked of the host's workers, which
//! know their own subscribers.

use super::context::Context;
use super::event_loop::Loop;
use super::gather::{Compose, Outcome, Pending, ReplyTo, Wanted};
use crate::ConnId;
use crate::bus::GlobalId;
use crate::bus::directory::{Kind, REFRESH, Record};
use crate::config::Presence;
use serde_json::{Value, json};
use std::time::Instant;

/// A group's presence settings, as the worker applies them.
#[derive(Debug, Clone, Default)]
pub(crate) struct PresencePolicy {
    pub topics: Presence,
    pub events: bool,
}

/// When the worker last refreshed its records, and whether Redis was reachable then.
#[derive(Debug)]
pub(super) struct Refresh {
    next: Instant,
    link_was_up: bool,
}

impl Default for Refresh {
    fn default() -> Refresh {
        Refresh {
            next: Instant::now() + REFRESH,
            link_was_up: false,
        }
    }
}

impl Context {
    /// The id of `conn` on the whole bus, open or not (for records of one that has gone).
    fn bus_id(&self, conn: ConnId) -> String {
        GlobalId {
            host: self.bus.origin.host,
            slot: self.bus.origin.slot,
            conn,
        }
        .to_string()
    }

    /// What presence shows of `conn`: its user and its token's info.
    fn presence_row(&self, conn: ConnId) -> Value {
        json!({ "user": self.user_of(conn), "info": self.user_info(conn) })
    }

    /// `conn` subscribed to `topic`: recorded, and announced if the group says so and
    /// `announce` (not for a connection the slot's previous worker handed over, which has
    /// been there all along).
    pub(crate) fn presence_join(&mut self, conn: ConnId, topic: &str, announce: bool) {
        if !self.presence.topics.covers(topic) {
            return;
        }
        let announce = announce && self.presence.events;
        if !self.bus.has_cluster() && !announce {
            return;
        }
        let row = self.presence_row(conn);
        let id = self.bus_id(conn);
        if self.bus.has_cluster() {
            self.bus.record(Record::Put {
                kind: Kind::Topic,
                name: topic.to_string(),
                conn: id.clone(),
                value: row.to_string(),
            });
        }
        if announce {
            self.announce("join", topic, &id, row);
        }
    }

    /// `conn` left `topic` (unsubscribed, or gone: called while what it carried is still
    /// readable, so the leave shows its user).
    pub(crate) fn presence_leave(&mut self, conn: ConnId, topic: &str) {
        if !self.presence.topics.covers(topic) {
            return;
        }
        if !self.bus.has_cluster() && !self.presence.events {
            return;
        }
        let id = self.bus_id(conn);
        if self.bus.has_cluster() {
            self.bus.record(Record::Delete {
                kind: Kind::Topic,
                name: topic.to_string(),
                conn: id.clone(),
            });
        }
        if self.presence.events {
            let row = self.presence_row(conn);
            self.announce("leave", topic, &id, row);
        }
    }

    /// `conn` is bound to `user` now (`Put`), or no longer (`Delete`): recorded in Redis.
    pub(crate) fn record_user(&mut self, conn: ConnId, user: &str, bound: bool) {
        if !self.bus.has_cluster() {
            return; // Without Redis, users are asked of the host's workers.
        }
        let (name, conn) = (user.to_string(), self.bus_id(conn));
        self.bus.record(if bound {
            Record::Put {
                kind: Kind::User,
                name,
                conn,
                value: "{}".into(),
            }
        } else {
            Record::Delete {
                kind: Kind::User,
                name,
                conn,
            }
        });
    }

    /// A join or leave event to the topic's subscribers, on every worker and host.
    fn announce(&mut self, event: &str, topic: &str, conn: &str, row: Value) {
        let msg = json!({
            "event": event,
            "topic": topic,
            "conn": conn,
            "user": row["user"],
            "info": row["info"],
        });
        self.publish(topic, msg.to_string());
    }

    /// Asks who is subscribed to `topic` for `conn`, which gets the answer as a message
    /// `{"topic", "scope", "count", "users", "subscribers"}`. False (nothing asked) if `topic`
    /// keeps no presence or `conn` is not subscribed to it.
    pub fn ask_presence(&mut self, conn: ConnId, topic: &str) -> bool {
        let allowed =
            self.presence.topics.covers(topic) && self.topics.of(conn).iter().any(|t| t == topic);
        if allowed {
            self.asks.push(Pending {
                what: Wanted::Presence(topic.to_string()),
                reply_to: ReplyTo::Client(conn),
            });
        }
        allowed
    }
}

impl Loop {
    /// Who is on `topic`: Redis's records for the cluster when the topic keeps presence (and
    /// there is a cluster bus), else the host's workers, which know their own subscribers.
    pub(super) fn presence_outcome(&mut self, topic: String) -> Outcome {
        let question = super::asking::Question::Presence(topic.clone());
        let Value::Array(rows) = self.answer(&question) else {
            unreachable!("presence answers a list")
        };
        if !self.ctx.presence.topics.covers(&topic) {
            return Outcome::Ask {
                question,
                slot: None,
                compose: Compose::Presence {
                    topic,
                    rows,
                    cluster: false,
                },
            };
        }
        Outcome::Lookup {
            kind: Kind::Topic,
            name: topic.clone(),
            compose: Compose::Presence {
                topic: topic.clone(),
                rows: Vec::new(),
                cluster: true,
            },
            host: (
                question,
                Compose::Presence {
                    topic,
                    rows,
                    cluster: false,
                },
            ),
        }
    }

    /// From the sweep: every [`REFRESH`], push the expiry of this worker's records on; when
    /// Redis has just become reachable (first time, or after an outage that may have lost
    /// them), write them all afresh.
    pub(super) fn refresh_records(&mut self, now: Instant) {
        let up = self.ctx.bus.state() == crate::control::BusState::Up;
        let fresh = up && !self.refresh.link_was_up;
        self.refresh.link_was_up = up;
        if !up || (!fresh && now < self.refresh.next) {
            return;
        }
        self.refresh.next = now + REFRESH;
        let ctx = &mut self.ctx;
        let topics: Vec<String> = (ctx.topics.names())
            .filter(|t| ctx.presence.topics.covers(t))
            .cloned()
            .collect();
        let users: Vec<String> = ctx.users.names().cloned().collect();
        for (kind, names) in [(Kind::Topic, topics), (Kind::User, users)] {
            for name in names {
                let rec = if fresh {
                    let table = match kind {
                        Kind::Topic => &ctx.topics,
                        Kind::User => &ctx.users,
                    };
                    let entries = (table.members(&name).into_iter())
                        .map(|id| {
                            let value = match kind {
                                Kind::Topic => ctx.presence_row(id).to_string(),
                                Kind::User => "{}".to_string(),
                            };
                            (ctx.bus_id(id), value)
                        })
                        .collect();
                    Record::Replace {
                        kind,
                        name,
                        entries,
                    }
                } else {
                    Record::Refresh { kind, name }
                };
                ctx.bus.record(rec);
            }
        }
    }
}
