//! Answers that need what other workers know: a question goes to the host's other workers
//! (`asking.rs`) or to Redis (`bus::directory`), and the answers are gathered here until all
//! have come or [`GATHER_TIMEOUT`] passes, then put together and sent to whoever asked: a
//! backend's API request (here, or relayed from another group's worker), or a client that
//! asked who is on a topic. An API call that sends is also answered only once Redis has what
//! it sent to other hosts (`bus::cluster`, "Order").

use super::asking::Question;
use super::event_loop::Loop;
use crate::ConnId;
use crate::api::http::Response;
use crate::bus::directory::Kind;
use serde_json::{Value, json};
use std::collections::{BTreeSet, HashMap};
use std::time::{Duration, Instant};

/// How long an answer waits for the other workers (or Redis).
pub const GATHER_TIMEOUT: Duration = Duration::from_secs(2);
/// How much longer an answer relayed from another group waits: that group's worker gathers
/// for up to [`GATHER_TIMEOUT`] itself, and its answer must still be taken.
const RELAY_MARGIN: Duration = Duration::from_secs(1);

/// A question a hook asked, to start after the hook: what, and who gets the answer.
pub(crate) struct Pending {
    pub what: Wanted,
    pub reply_to: ReplyTo,
}

/// What a hook asked.
pub(crate) enum Wanted {
    /// Who is subscribed to a topic.
    Presence(String),
    /// Where a user is connected.
    User(String),
}

/// Code to run with an answer: the app's callback.
pub(crate) type Then = Box<dyn FnOnce(&mut crate::Context, &Value)>;

/// Who gets the answer.
pub(crate) enum ReplyTo {
    /// An API connection (index, serial), the place of the answer among its pipelined ones,
    /// and how it asked.
    Api {
        conn: (usize, u32),
        seq: u64,
        endpoint: &'static str,
        keep_alive: bool,
        head_only: bool,
    },
    /// A WebSocket client, as a text message.
    Client(ConnId),
    /// The app, through a callback it gave (`Context::user_connections`).
    Hook(Then),
    /// The API's worker of another group, which relayed the request over a bridge.
    Relay {
        bridge: crate::bus::bridges::BridgeRef,
        id: u32,
    },
}

/// How the answers are put together.
pub(super) enum Compose {
    /// `{key: N}` (`delivered`, `disconnected`): this worker's count plus each answer's (a
    /// number, or `true` for one).
    Count(&'static str, usize),
    /// `{"topic", "scope", "count", "users", "subscribers": [...]}`: the rows given plus each
    /// answer's. `cluster`: the answer is Redis's, for every host.
    Presence {
        topic: String,
        rows: Vec<Value>,
        cluster: bool,
    },
    /// `{"user", "scope", "online", "connections": [...]}`, as presence.
    User {
        user: String,
        rows: Vec<Value>,
        cluster: bool,
    },
    /// `{"workers": [...]}`: this worker's counters plus each answer.
    Stats(Value),
    /// 200 if this worker and every answer serve (a peer's, or a relayed group's), else
    /// 503.
    Health(bool),
    /// Another group's answer to a relayed request, as it is; 503 if none came.
    Relayed(String),
    /// An answer known already (status and body), given once Redis has what the call sent.
    Ready(u16, Value),
}

impl Compose {
    /// How long its answers may take.
    fn patience(&self) -> Duration {
        match self {
            Compose::Relayed(_) | Compose::Health(_) => GATHER_TIMEOUT + RELAY_MARGIN,
            _ => GATHER_TIMEOUT,
        }
    }
}

/// What carrying out a call gives: the answer now, or a question for the other workers (or
/// for Redis) and how to put their answers together.
pub(super) enum Outcome {
    Now(Response),
    Ask {
        question: Question,
        /// Only this slot of the host, not every worker.
        slot: Option<u16>,
        compose: Compose,
    },
    /// Redis's records for a topic or user, cluster-wide; the host's workers when Redis cannot
    /// be asked (`host` says what to ask them, and how to put that together).
    Lookup {
        kind: Kind,
        name: String,
        compose: Compose,
        host: (Question, Compose),
    },
}

/// An answer waiting for others.
pub(super) struct Gathering {
    pub reply_to: ReplyTo,
    pub wanted: usize,
    pub answers: Vec<Value>,
    pub deadline: Instant,
    pub compose: Compose,
}

/// The answers being gathered, by question id.
#[derive(Default)]
pub(super) struct Gatherings {
    waiting: HashMap<u32, Gathering>,
    next_id: u32,
}

impl Gatherings {
    /// A fresh question id (never 0: that means "no answer wanted").
    pub fn id(&mut self) -> u32 {
        self.next_id = self.next_id.wrapping_add(1).max(1);
        self.next_id
    }

    pub fn wait(&mut self, id: u32, g: Gathering) {
        self.waiting.insert(id, g);
    }

    /// An answer to `id`; the gathering if it is now complete.
    pub fn answer(&mut self, id: u32, answer: Value) -> Option<Gathering> {
        let g = self.waiting.get_mut(&id)?;
        g.answers.push(answer);
        if g.answers.len() < g.wanted {
            return None;
        }
        self.waiting.remove(&id)
    }

    /// The gatherings whose time is up.
    pub fn overdue(&mut self, now: Instant) -> Vec<Gathering> {
        let late: Vec<u32> = (self.waiting.iter())
            .filter(|(_, g)| g.deadline <= now)
            .map(|(&id, _)| id)
            .collect();
        late.iter()
            .filter_map(|id| self.waiting.remove(id))
            .collect()
    }

    pub fn next_deadline(&self) -> Option<Instant> {
        self.waiting.values().map(|g| g.deadline).min()
    }
}

impl Loop {
    /// Starts gathering: answers now if nothing is awaited, else when they come.
    pub(super) fn gather(&mut self, id: u32, reply_to: ReplyTo, wanted: usize, compose: Compose) {
        let g = Gathering {
            reply_to,
            wanted,
            answers: Vec::with_capacity(wanted),
            deadline: Instant::now() + compose.patience(),
            compose,
        };
        if wanted == 0 {
            return self.gathered(g);
        }
        self.gatherings.wait(id, g);
    }

    /// Sends the question of `outcome` and gathers the answers for `reply_to`. A call that
    /// `sends` is answered only once Redis has taken what this worker sent it, too: the
    /// caller's next call, whichever worker of the host takes it, reaches Redis after it
    /// (workers publish on connections of their own, at their own pace).
    pub(super) fn ask_for(&mut self, outcome: Outcome, reply_to: ReplyTo, sends: bool) {
        let id = self.gatherings.id();
        let redis = usize::from(sends && self.ctx.bus.flush(id));
        let (question, slot, compose) = match outcome {
            Outcome::Now(r) => {
                let body = serde_json::from_slice(&r.body).unwrap_or(Value::Null);
                return self.gather(id, reply_to, redis, Compose::Ready(r.status, body));
            }
            Outcome::Ask {
                question,
                slot,
                compose,
            } => (question, slot, compose),
            Outcome::Lookup {
                kind,
                name,
                compose,
                host,
            } => {
                if self.ctx.bus.lookup(id, kind, &name) {
                    return self.gather(id, reply_to, 1 + redis, compose);
                }
                (host.0, None, host.1)
            }
        };
        let msg = question.ask(id);
        let wanted = match slot {
            Some(s) => usize::from(self.ctx.bus.send_to_slot(s as usize, &msg)),
            None => self.ctx.bus.send_to_peers(&msg),
        };
        self.gather(id, reply_to, wanted + redis, compose);
    }

    /// An answer from another worker, or from Redis, to question `id`.
    pub(super) fn on_answer(&mut self, id: u32, body: &[u8]) {
        let answer = serde_json::from_slice(body).unwrap_or(Value::Null);
        if let Some(g) = self.gatherings.answer(id, answer) {
            self.gathered(g);
        }
    }

    /// Answers what is overdue with what came.
    pub(super) fn gather_sweep(&mut self, now: Instant) {
        for g in self.gatherings.overdue(now) {
            self.gathered(g);
        }
    }

    /// Puts the answers together and sends the result.
    fn gathered(&mut self, g: Gathering) {
        let missing = g.wanted.saturating_sub(g.answers.len());
        let (status, mut body) = self.compose(g.compose, g.answers, missing);
        if missing > 0 {
            body["unanswered_workers"] = missing.into();
        }
        match g.reply_to {
            ReplyTo::Api {
                conn,
                seq,
                endpoint,
                keep_alive,
                head_only,
            } => self.api_gathered(conn, seq, endpoint, status, &body, keep_alive, head_only),
            ReplyTo::Client(id) => {
                // A client tells this answer from a publish by its `presence` key.
                if let Some(topic) = body.get("topic").cloned() {
                    body["presence"] = topic;
                }
                let _ = self.ctx.send(id, body.to_string());
            }
            ReplyTo::Relay { bridge, id } => self.relay_answer(bridge, id, status, &body),
            ReplyTo::Hook(then) => {
                let ctx = &mut self.ctx;
                let run = std::panic::AssertUnwindSafe(|| then(ctx, &body));
                if std::panic::catch_unwind(run).is_err() {
                    log::error!("a callback given to user_connections or is_online panicked");
                }
            }
        }
    }

    /// Starts the questions this turn's hooks asked.
    pub(super) fn start_asks(&mut self) {
        for Pending { what, reply_to } in std::mem::take(&mut self.ctx.asks) {
            let outcome = match what {
                Wanted::Presence(topic) => self.presence_outcome(topic),
                Wanted::User(user) => self.user_outcome(user),
            };
            self.ask_for(outcome, reply_to, false);
        }
    }

    /// Where `user` is connected: Redis's records for the cluster, or the host's workers.
    pub(super) fn user_outcome(&mut self, user: String) -> Outcome {
        let question = Question::UserConns(user.clone());
        let Value::Array(rows) = self.answer(&question) else {
            unreachable!("a user's connections are a list")
        };
        Outcome::Lookup {
            kind: Kind::User,
            name: user.clone(),
            compose: Compose::User {
                user: user.clone(),
                rows: Vec::new(),
                cluster: true,
            },
            host: (
                question,
                Compose::User {
                    user,
                    rows,
                    cluster: false,
                },
            ),
        }
    }

    fn compose(&self, compose: Compose, answers: Vec<Value>, missing: usize) -> (u16, Value) {
        match compose {
            Compose::Count(key, local) => {
                let count = |a: &Value| a.as_u64().unwrap_or(u64::from(a.as_bool() == Some(true)));
                let total = local as u64 + answers.iter().map(count).sum::<u64>();
                (200, json!({ key: total }))
            }
            Compose::Presence {
                topic,
                rows,
                cluster,
            } => match rows_of(rows, answers) {
                Ok(rows) => {
                    let users: BTreeSet<&str> =
                        rows.iter().filter_map(|r| r["user"].as_str()).collect();
                    let body = json!({
                        "topic": topic,
                        "scope": if cluster { "cluster" } else { "host" },
                        "count": rows.len(),
                        "users": users,
                        "subscribers": rows,
                    });
                    (200, body)
                }
                Err(why) => (503, json!({ "error": why })),
            },
            Compose::User {
                user,
                rows,
                cluster,
            } => match rows_of(rows, answers) {
                Ok(rows) => {
                    let conns: Vec<&Value> = rows.iter().map(|r| &r["conn"]).collect();
                    let body = json!({
                        "user": user,
                        "scope": if cluster { "cluster" } else { "host" },
                        "online": !conns.is_empty(),
                        "connections": conns,
                    });
                    (200, body)
                }
                Err(why) => (503, json!({ "error": why })),
            },
            Compose::Stats(local) => {
                let mut workers = vec![local];
                workers.extend(answers);
                workers.sort_by_key(|w| w["worker"].as_u64());
                let sum = |k: &str| workers.iter().filter_map(|w| w[k].as_u64()).sum::<u64>();
                let body = json!({
                    "group": self.ctx.worker_name(),
                    "host": format!("{:016x}", self.ctx.bus.origin.host),
                    "connections": sum("connections"),
                    "messages_in": sum("messages_in"),
                    "messages_out": sum("messages_out"),
                    "workers": workers,
                });
                (200, body)
            }
            Compose::Health(serving) => {
                // A peer answers `{"serving"}`, a relayed group `{"status", "body"}`.
                let serves = |a: &Value| a["serving"] == Value::Bool(true) || a["status"] == 200;
                let all = serving && missing == 0 && answers.iter().all(serves);
                let workers = 1
                    + (answers.iter())
                        .map(|a| a["body"]["workers"].as_u64().unwrap_or(1))
                        .sum::<u64>();
                if all {
                    (200, json!({ "status": "ok", "workers": workers }))
                } else {
                    (503, json!({ "status": "unavailable", "workers": workers }))
                }
            }
            Compose::Relayed(group) => match answers.into_iter().next() {
                Some(mut a) if a["status"].is_u64() => {
                    let status = a["status"].as_u64().unwrap_or(503) as u16;
                    (status, a["body"].take())
                }
                _ => {
                    let why = format!("no worker of group {group:?} answered");
                    (503, json!({ "error": why }))
                }
            },
            Compose::Ready(status, body) => (status, body),
        }
    }
}

/// `rows` plus the rows of each answer (lists); an answer that is `{"error": ...}` (Redis
/// could not say) makes the whole an error.
fn rows_of(mut rows: Vec<Value>, answers: Vec<Value>) -> Result<Vec<Value>, String> {
    for a in answers {
        match a {
            Value::Array(more) => rows.extend(more),
            Value::Object(o) if o.contains_key("error") => {
                return Err(format!("presence unavailable: {}", o["error"]));
            }
            _ => {}
        }
    }
    Ok(rows)
}
