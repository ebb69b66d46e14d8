//! The handler protocol, version [`VERSION`]: one JSON object per line each way
//! (`docs/handlers.md`). Events go to the handler ([`Event`], written with [`line`]); commands
//! come back ([`Command`], read with [`read_command`]). Nothing here touches a socket or a
//! pipe.

use crate::bus::GlobalId;
use crate::json_data::{self, BadData};
use crate::proto::close;
use crate::{Message, apps::MAX_TOPIC_LEN};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::collections::BTreeMap;
use std::time::Duration;

/// The protocol's version, sent in `worker_start`.
pub const VERSION: u32 = 1;

/// What happened, for the handler. Connection ids are [`GlobalId`]s in their text form.
#[derive(Debug, Serialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum Event<'a> {
    /// The handler has (re)started: first line it reads.
    WorkerStart {
        protocol: u32,
        group: &'a str,
        worker: usize,
        /// The handler's start in this worker: 1, then 2 after a restart, ...
        generation: u64,
    },
    /// A client connected (or, with `decide`, asks to: the handler must `accept` or
    /// `reject` it). `replay`: the connection was open before this handler started.
    Connect {
        conn: String,
        path: &'a str,
        query: Option<&'a str>,
        /// Names in lower case.
        headers: BTreeMap<String, &'a str>,
        remote: String,
        user: Option<&'a str>,
        #[serde(skip_serializing_if = "std::ops::Not::not")]
        decide: bool,
        #[serde(skip_serializing_if = "std::ops::Not::not")]
        replay: bool,
    },
    /// A message from a client.
    Message {
        #[serde(serialize_with = "as_text")]
        conn: GlobalId,
        data: json_data::Data<'a>,
    },
    /// A client is gone.
    Close { conn: String },
    /// A connection handed over by the worker this one replaces (a reload or an upgrade),
    /// open all along: `from` is its id there, `conn` here. Like a replayed `connect`, with
    /// the topics it is subscribed to.
    Adopt {
        conn: String,
        from: &'a str,
        path: &'a str,
        query: Option<&'a str>,
        remote: String,
        user: Option<&'a str>,
        topics: &'a [String],
    },
    /// The connection now lives in another worker (this one is being replaced): forget it.
    /// No `close` follows; the other worker's handler gets an `adopt`.
    Handoff { conn: String },
    /// A timer the handler added is due.
    Timer { timer: &'a str },
}

/// Who a `connect` event is about.
pub struct Connecting<'a> {
    pub conn: String,
    /// The request target: path and query.
    pub target: &'a str,
    /// The request's headers (none for a replay: they are not kept).
    pub headers: &'a [(String, String)],
    pub remote: String,
    pub user: Option<&'a str>,
}

impl<'a> Connecting<'a> {
    /// Its `connect` event: the target split into path and query, and the headers the
    /// handler is given, named in lower case.
    pub fn event(self, decide: bool, replay: bool) -> Event<'a> {
        let (path, query) = match self.target.split_once('?') {
            Some((p, q)) => (p, Some(q)),
            None => (self.target, None),
        };
        let headers = (self.headers.iter())
            .filter(|(n, _)| !is_mechanics(n))
            .map(|(n, v)| (n.to_ascii_lowercase(), v.as_str()))
            .collect();
        Event::Connect {
            conn: self.conn,
            path,
            query,
            headers,
            remote: self.remote,
            user: self.user,
            decide,
            replay,
        }
    }
}

/// Whether a request header is the upgrade's mechanics, which the handler is not given.
fn is_mechanics(name: &str) -> bool {
    [
        "host",
        "connection",
        "upgrade",
        "sec-websocket-key",
        "sec-websocket-version",
        "sec-websocket-extensions",
    ]
    .iter()
    .any(|m| name.eq_ignore_ascii_case(m))
}

/// `event` as a line, newline included.
pub fn line(event: &Event<'_>) -> Vec<u8> {
    let mut out = Vec::new();
    write_line(&mut out, event);
    out
}

/// Appends `event` to `out` as a line, newline included. A message, the event a busy handler
/// reads most, is written by hand: only its data needs escaping.
pub fn write_line(out: &mut Vec<u8>, event: &Event<'_>) {
    match event {
        Event::Message { conn, data } => {
            out.extend_from_slice(br#"{"event":"message","conn":""#);
            out.extend_from_slice(conn.text().as_bytes());
            out.extend_from_slice(br#"","data":"#);
            serde_json::to_writer(&mut *out, data).expect("a message serializes");
            out.push(b'}');
        }
        _ => serde_json::to_writer(&mut *out, event).expect("an event serializes"),
    }
    out.push(b'\n');
}

/// A connection id in its text form, from the stack rather than a string.
fn as_text<S: serde::Serializer>(id: &GlobalId, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(id.text().as_str())
}

/// What the handler asks.
#[derive(Debug, Clone, PartialEq)]
pub enum Command {
    Send {
        conn: GlobalId,
        data: Message,
    },
    Broadcast {
        data: Message,
    },
    Publish {
        topic: String,
        data: Message,
    },
    Subscribe {
        conn: GlobalId,
        topic: String,
    },
    Unsubscribe {
        conn: GlobalId,
        topic: String,
    },
    SendUser {
        user: String,
        data: Message,
    },
    BindUser {
        conn: GlobalId,
        user: String,
    },
    Close {
        conn: GlobalId,
        code: u16,
        reason: String,
    },
    AddTimer {
        timer: String,
        after: Duration,
        repeat: bool,
    },
    DelTimer {
        timer: String,
    },
    /// The decision on a `connect` with `decide`: upgrade it, bound to `user` if given and
    /// subscribed to `subscribe`.
    Accept {
        conn: GlobalId,
        user: Option<String>,
        subscribe: Vec<String>,
    },
    /// Refuse the upgrade with an HTTP status (4xx or 5xx).
    Reject {
        conn: GlobalId,
        status: u16,
        reason: String,
    },
}

/// A command line, read: its `id` (echoed in the answer) and the command or why it is not one.
#[derive(Debug)]
pub struct Read {
    pub id: Option<Value>,
    pub command: Result<Command, BadCommand>,
}

/// Why a line is not a command. The handler gets it as `{"id", "ok": false, "error"}` when the
/// line had an `id`; it is logged either way.
#[derive(Debug, thiserror::Error)]
pub enum BadCommand {
    #[error("not a JSON command: {0}")]
    Json(#[from] serde_json::Error),
    #[error("bad conn: {0}")]
    Conn(#[from] crate::bus::BadGlobalId),
    #[error("bad data: {0}")]
    Data(#[from] BadData),
    #[error("a topic is 1 to {MAX_TOPIC_LEN} bytes")]
    Topic,
    #[error("close code {0} cannot be sent: use 1000-1003, 1007-1014 or 3000-4999")]
    Code(u16),
    #[error("a close reason is at most 123 bytes")]
    Reason,
    #[error("after must be a number of seconds, 0.001 to one year")]
    After,
    #[error("reject needs a status from 400 to 599")]
    Status,
    #[error("{0} must not be empty")]
    Empty(&'static str),
}

/// The line as it comes; every field a command may have. The connection id is read in place
/// (it is parsed, not kept).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Raw<'a> {
    cmd: Name,
    #[serde(default)]
    id: Option<Value>,
    #[serde(borrow)]
    conn: Option<std::borrow::Cow<'a, str>>,
    data: Option<Value>,
    topic: Option<String>,
    user: Option<String>,
    code: Option<u16>,
    reason: Option<String>,
    timer: Option<String>,
    after: Option<f64>,
    #[serde(default)]
    repeat: bool,
    #[serde(default)]
    subscribe: Vec<String>,
    status: Option<u16>,
}

#[derive(Deserialize, Clone, Copy)]
#[serde(rename_all = "snake_case")]
enum Name {
    Send,
    Broadcast,
    Publish,
    Subscribe,
    Unsubscribe,
    SendUser,
    BindUser,
    Close,
    AddTimer,
    DelTimer,
    Accept,
    Reject,
}

/// Reads one line (without its newline).
pub fn read_command(line: &[u8]) -> Read {
    let raw: Raw = match serde_json::from_slice(line) {
        Ok(r) => r,
        Err(e) => {
            // Still answer the id of a line that is JSON but not a command.
            let id = serde_json::from_slice::<Value>(line)
                .ok()
                .and_then(|v| v.get("id").cloned());
            return Read {
                id,
                command: Err(e.into()),
            };
        }
    };
    Read {
        id: raw.id.clone(),
        command: command(raw),
    }
}

fn command(r: Raw<'_>) -> Result<Command, BadCommand> {
    let missing = |key: &'static str| {
        BadCommand::Json(<serde_json::Error as serde::de::Error>::missing_field(key))
    };
    let conn = |c: Option<std::borrow::Cow<'_, str>>| -> Result<GlobalId, BadCommand> {
        Ok(c.ok_or_else(|| missing("conn"))?.parse()?)
    };
    let data = |d: Option<Value>| -> Result<Message, BadCommand> {
        Ok(json_data::message_of(d.ok_or_else(|| missing("data"))?)?)
    };
    let topic = |t: Option<String>| -> Result<String, BadCommand> {
        let t = t.ok_or_else(|| missing("topic"))?;
        if t.is_empty() || t.len() > MAX_TOPIC_LEN {
            return Err(BadCommand::Topic);
        }
        Ok(t)
    };
    let text = |v: Option<String>, key: &'static str| -> Result<String, BadCommand> {
        let v = v.ok_or_else(|| missing(key))?;
        if v.is_empty() {
            return Err(BadCommand::Empty(key));
        }
        Ok(v)
    };
    Ok(match r.cmd {
        Name::Send => Command::Send {
            conn: conn(r.conn)?,
            data: data(r.data)?,
        },
        Name::Broadcast => Command::Broadcast {
            data: data(r.data)?,
        },
        Name::Publish => Command::Publish {
            topic: topic(r.topic)?,
            data: data(r.data)?,
        },
        Name::Subscribe => Command::Subscribe {
            conn: conn(r.conn)?,
            topic: topic(r.topic)?,
        },
        Name::Unsubscribe => Command::Unsubscribe {
            conn: conn(r.conn)?,
            topic: topic(r.topic)?,
        },
        Name::SendUser => Command::SendUser {
            user: text(r.user, "user")?,
            data: data(r.data)?,
        },
        Name::BindUser => Command::BindUser {
            conn: conn(r.conn)?,
            user: text(r.user, "user")?,
        },
        Name::Close => {
            let code = r.code.unwrap_or(close::NORMAL);
            if !close::allowed(code) {
                return Err(BadCommand::Code(code));
            }
            let reason = r.reason.unwrap_or_default();
            if reason.len() > 123 {
                return Err(BadCommand::Reason);
            }
            Command::Close {
                conn: conn(r.conn)?,
                code,
                reason,
            }
        }
        Name::AddTimer => {
            let after = r.after.ok_or_else(|| missing("after"))?;
            if !(0.001..=31_536_000.0).contains(&after) {
                return Err(BadCommand::After);
            }
            Command::AddTimer {
                timer: text(r.timer, "timer")?,
                after: Duration::from_secs_f64(after),
                repeat: r.repeat,
            }
        }
        Name::DelTimer => Command::DelTimer {
            timer: text(r.timer, "timer")?,
        },
        Name::Accept => Command::Accept {
            conn: conn(r.conn)?,
            user: r.user.filter(|u| !u.is_empty()),
            subscribe: (r.subscribe.into_iter())
                .map(|t| topic(Some(t)))
                .collect::<Result<_, _>>()?,
        },
        Name::Reject => {
            let status = r.status.unwrap_or(403);
            if !(400..=599).contains(&status) {
                return Err(BadCommand::Status);
            }
            Command::Reject {
                conn: conn(r.conn)?,
                status,
                reason: r.reason.unwrap_or_else(|| "refused by the handler".into()),
            }
        }
    })
}

/// The answer to a command that had an `id`, as a line.
pub fn answer(id: &Value, outcome: Result<(), String>) -> Vec<u8> {
    let v = match outcome {
        Ok(()) => serde_json::json!({ "id": id, "ok": true }),
        Err(e) => serde_json::json!({ "id": id, "ok": false, "error": e }),
    };
    let mut out = v.to_string().into_bytes();
    out.push(b'\n');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const CONN: &str = "00000000000000ab-1-2-3";

    #[test]
    fn commands_are_read_with_their_ids() {
        let r = read_command(
            format!(r#"{{"cmd":"send","id":7,"conn":"{CONN}","data":{{"b64":"AAE="}}}}"#)
                .as_bytes(),
        );
        assert_eq!(r.id, Some(Value::from(7)));
        assert_eq!(
            r.command.unwrap(),
            Command::Send {
                conn: CONN.parse().unwrap(),
                data: Message::from(vec![0u8, 1])
            }
        );
        let r = read_command(br#"{"cmd":"add_timer","timer":"t","after":0.5,"repeat":true}"#);
        assert_eq!(
            r.command.unwrap(),
            Command::AddTimer {
                timer: "t".into(),
                after: Duration::from_millis(500),
                repeat: true
            }
        );
        let r = read_command(format!(r#"{{"cmd":"reject","conn":"{CONN}"}}"#).as_bytes());
        assert!(matches!(r.command, Ok(Command::Reject { status: 403, .. })));
    }

    #[test]
    fn bad_lines_say_why_and_keep_their_id() {
        let why = |line: &str| {
            read_command(line.as_bytes())
                .command
                .unwrap_err()
                .to_string()
        };
        assert!(why("garbage").contains("not a JSON command"));
        assert!(why(r#"{"cmd":"fly"}"#).contains("unknown variant"));
        assert!(why(r#"{"cmd":"send","data":"x"}"#).contains("missing field `conn`"));
        assert!(why(r#"{"cmd":"send","conn":"x","data":"x"}"#).contains("bad conn"));
        let close = format!(r#"{{"cmd":"close","conn":"{CONN}","code":1005}}"#);
        assert!(why(&close).contains("close code 1005"));
        assert!(why(r#"{"cmd":"publish","topic":"","data":"x"}"#).contains("topic"));
        let r = read_command(br#"{"id":"x9","cmd":"nope"}"#);
        assert_eq!(r.id, Some(Value::from("x9")));
        assert!(r.command.is_err());
    }

    /// The message event written by hand is the one serde writes.
    #[test]
    fn a_message_is_written_as_serde_would() {
        for msg in [
            Message::from("a\"b\\c\n\u{1}é"),
            Message::from(vec![0u8, 255]),
        ] {
            let event = Event::Message {
                conn: CONN.parse().unwrap(),
                data: json_data::Data(&msg),
            };
            let mut serde = serde_json::to_vec(&event).unwrap();
            serde.push(b'\n');
            assert_eq!(line(&event), serde);
        }
    }

    #[test]
    fn events_are_one_line_each() {
        let text = line(&Event::Message {
            conn: CONN.parse().unwrap(),
            data: json_data::Data(&Message::from("a\nb")),
        });
        assert_eq!(text.iter().filter(|&&b| b == b'\n').count(), 1);
        let v: Value = serde_json::from_slice(&text).unwrap();
        assert_eq!(v["event"], "message");
        assert_eq!(v["data"], "a\nb");
        let start = line(&Event::WorkerStart {
            protocol: VERSION,
            group: "chat",
            worker: 0,
            generation: 1,
        });
        let v: Value = serde_json::from_slice(&start).unwrap();
        assert_eq!(v["protocol"], 1);
    }
}
