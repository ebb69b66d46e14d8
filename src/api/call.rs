//! What an API request asks, read from its method, path, query and JSON body into a [`Call`]
//! for a group, or the [`ApiError`] that answers it instead. Nothing here touches a
//! connection: the worker carries a `Call` out over the bus, as a hook's `publish` or
//! `send_to` would be, or relays the request to a worker of the group it names.

use super::http::{Method, Request, Response, query_value};
use crate::Message;
use crate::apps::MAX_TOPIC_LEN;
use crate::bus::GlobalId;
use crate::close;
use crate::config::Secret;
use serde::Deserialize;
use serde_json::{Value, json};

/// The endpoint `path` names, for logs and metrics: `publish`, ..., or `other`.
pub fn endpoint_name(path: &str) -> &'static str {
    match path {
        "/api/publish" => "publish",
        "/api/broadcast" => "broadcast",
        "/api/send" => "send",
        "/api/disconnect" => "disconnect",
        "/api/presence" => "presence",
        "/api/user" => "user",
        "/api/stats" => "stats",
        "/health" => "health",
        _ => "other",
    }
}

/// Whom a `send` or `disconnect` is for.
#[derive(Debug, Clone, PartialEq)]
pub enum Target {
    /// One connection, by the id hooks and `presence` show.
    Conn(GlobalId),
    /// Every connection of a user.
    User(String),
}

/// One API request, understood.
#[derive(Debug, Clone, PartialEq)]
pub enum Call {
    /// `POST /api/publish`: each message to its topic's subscribers.
    Publish(Vec<(String, Message)>),
    /// `POST /api/broadcast`: to every connection.
    Broadcast(Message),
    /// `POST /api/send`.
    Send(Target, Message),
    /// `POST /api/disconnect`.
    Disconnect {
        /// Whom.
        target: Target,
        /// The close code.
        code: u16,
        /// The close reason.
        reason: String,
    },
    /// `GET /api/presence?topic=`.
    Presence(String),
    /// `GET /api/user?user=`: whether a user is online, and where.
    User(String),
    /// `GET /api/stats`.
    Stats,
    /// `GET /health` (no key needed).
    Health,
}

impl Call {
    /// The call sends messages or closes connections: its answer waits until Redis has what
    /// it sent to other hosts, so that the caller's next call comes after it there too.
    pub fn sends(&self) -> bool {
        matches!(
            self,
            Call::Publish(_) | Call::Broadcast(_) | Call::Send(..) | Call::Disconnect { .. }
        )
    }
}

/// A call and the group it is for: `None` when the request names none.
#[derive(Debug, Clone, PartialEq)]
pub struct Addressed {
    pub group: Option<String>,
    pub call: Call,
}

/// Why a request gets a 4xx. Each answers `{"error": "..."}` with its status, and costs only
/// that request.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// No `Authorization: Bearer` key, or not one of `[api] keys`.
    #[error("missing or wrong API key (Authorization: Bearer <key>)")]
    Unauthorized,
    /// No such endpoint.
    #[error("no endpoint {0}")]
    NotFound(String),
    /// The endpoint exists with another method.
    #[error("{path} takes {allow}")]
    MethodNotAllowed {
        /// The path.
        path: String,
        /// The method it takes.
        allow: &'static str,
    },
    /// The body is not the JSON the endpoint takes.
    #[error("bad JSON body: {0}")]
    BadJson(#[from] serde_json::Error),
    /// `group` names no group of this server.
    #[error("unknown group {given:?}: the groups are {}", known.join(", "))]
    UnknownGroup {
        /// The name given.
        given: String,
        /// The groups there are.
        known: Vec<String>,
    },
    /// A batch whose messages name different groups.
    #[error("a batch publishes to one group: its messages name {0:?} and {1:?}")]
    MixedGroups(String, String),
    /// A topic that cannot exist: empty, or longer than a topic may be.
    #[error("bad topic {0:?}: a topic is 1 to {MAX_TOPIC_LEN} bytes")]
    BadTopic(String),
    /// A required query parameter is missing.
    #[error("missing query parameter {0:?}")]
    MissingParameter(&'static str),
    /// `conn` is not a connection id.
    #[error(transparent)]
    BadConn(#[from] crate::bus::BadGlobalId),
    /// Both or neither of `user` and `conn`.
    #[error("name exactly one of \"user\" and \"conn\"")]
    WhichTarget,
    /// `data` is neither a string nor `{"b64": "..."}` with valid base64.
    #[error("data must be a string, or {{\"b64\": \"...\"}} for binary: {0}")]
    BadData(#[from] crate::json_data::BadData),
    /// A close code a server may not send.
    #[error("close code {0} cannot be sent: use 1000-1003, 1007-1014 or 3000-4999")]
    BadCode(u16),
    /// A close reason longer than a Close frame carries.
    #[error("close reason is {0} bytes; at most 123")]
    LongReason(usize),
    /// An empty batch.
    #[error("nothing to publish: the batch is empty")]
    EmptyBatch,
}

impl ApiError {
    /// The status it is answered with.
    pub fn status(&self) -> u16 {
        match self {
            ApiError::Unauthorized => 401,
            ApiError::NotFound(_) | ApiError::UnknownGroup { .. } => 404,
            ApiError::MethodNotAllowed { .. } => 405,
            ApiError::BadJson(_) | ApiError::MissingParameter(_) => 400,
            _ => 422,
        }
    }

    /// The answer.
    pub fn response(&self) -> Response {
        let mut r = Response::json(self.status(), &json!({ "error": self.to_string() }));
        if let ApiError::MethodNotAllowed { allow, .. } = self {
            r.allow = Some(allow);
        }
        r
    }
}

/// Reads `req` as a call, checking its key against `keys` and its method.
pub fn understand(req: &Request, keys: &[Secret]) -> Result<Addressed, ApiError> {
    let path = req.path.as_str();
    let (allow, needs_key) = match path {
        "/health" => ("GET, HEAD", false),
        "/api/presence" | "/api/stats" | "/api/user" => ("GET, HEAD", true),
        "/api/publish" | "/api/broadcast" | "/api/send" | "/api/disconnect" => ("POST", true),
        _ => return Err(ApiError::NotFound(path.chars().take(200).collect())),
    };
    // A wrong key learns nothing, not even which methods a path takes.
    if needs_key {
        let presented = req.bearer.as_deref().unwrap_or_default();
        if !keys.iter().any(|k| k.matches(presented)) {
            return Err(ApiError::Unauthorized);
        }
    }
    let method_ok = match req.method {
        Method::Get | Method::Head => allow.starts_with("GET"),
        Method::Post => allow == "POST",
        Method::Other => false,
    };
    if !method_ok {
        return Err(ApiError::MethodNotAllowed {
            path: path.to_string(),
            allow,
        });
    }
    read(path, req.query.as_deref(), &req.body)
}

/// Reads an endpoint's query and body as a call, whose key and method have been checked (by
/// [`understand`], or by the worker that relayed it).
pub fn read(path: &str, query: Option<&str>, body: &[u8]) -> Result<Addressed, ApiError> {
    let mut named: Option<String> = None;
    // The messages of a batch that name a group must all name the same one.
    let mut group = |given: Option<String>| match (&named, given) {
        (Some(before), Some(g)) if *before != g => Err(ApiError::MixedGroups(before.clone(), g)),
        (_, Some(g)) => {
            named = Some(g);
            Ok(())
        }
        (_, None) => Ok(()),
    };
    let call = read_call(path, query, body, &mut group)?;
    Ok(Addressed { group: named, call })
}

fn read_call(
    path: &str,
    query: Option<&str>,
    body: &[u8],
    group: &mut impl FnMut(Option<String>) -> Result<(), ApiError>,
) -> Result<Call, ApiError> {
    match path {
        "/health" => {
            group(query_value(query, "group"))?;
            Ok(Call::Health)
        }
        "/api/stats" => {
            group(query_value(query, "group"))?;
            Ok(Call::Stats)
        }
        "/api/presence" => {
            group(query_value(query, "group"))?;
            let topic = query_value(query, "topic").ok_or(ApiError::MissingParameter("topic"))?;
            Ok(Call::Presence(checked_topic(topic)?))
        }
        "/api/user" => {
            group(query_value(query, "group"))?;
            let user = query_value(query, "user").ok_or(ApiError::MissingParameter("user"))?;
            if user.is_empty() {
                return Err(ApiError::MissingParameter("user"));
            }
            Ok(Call::User(user))
        }
        "/api/publish" => {
            let items: OneOrMany = serde_json::from_slice(body)?;
            let items = match items {
                OneOrMany::One(p) => vec![p],
                OneOrMany::Many(ps) if ps.is_empty() => return Err(ApiError::EmptyBatch),
                OneOrMany::Many(ps) => ps,
            };
            let mut out = Vec::with_capacity(items.len());
            for p in items {
                group(p.group)?;
                out.push((checked_topic(p.topic)?, message(p.data)?));
            }
            Ok(Call::Publish(out))
        }
        "/api/broadcast" => {
            let b: Broadcast = serde_json::from_slice(body)?;
            group(b.group)?;
            Ok(Call::Broadcast(message(b.data)?))
        }
        "/api/send" => {
            let s: Send = serde_json::from_slice(body)?;
            group(s.group)?;
            Ok(Call::Send(target(s.user, s.conn)?, message(s.data)?))
        }
        "/api/disconnect" => {
            let d: Disconnect = serde_json::from_slice(body)?;
            group(d.group)?;
            let code = d.code.unwrap_or(close::NORMAL);
            if !close::allowed(code) {
                return Err(ApiError::BadCode(code));
            }
            let reason = d.reason.unwrap_or_default();
            if reason.len() > 123 {
                return Err(ApiError::LongReason(reason.len()));
            }
            Ok(Call::Disconnect {
                target: target(d.user, d.conn)?,
                code,
                reason,
            })
        }
        _ => Err(ApiError::NotFound(path.chars().take(200).collect())),
    }
}

#[derive(Deserialize)]
#[serde(untagged)]
enum OneOrMany {
    One(Publish),
    Many(Vec<Publish>),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Publish {
    group: Option<String>,
    topic: String,
    data: Value,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Broadcast {
    group: Option<String>,
    data: Value,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Send {
    group: Option<String>,
    user: Option<String>,
    conn: Option<String>,
    data: Value,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Disconnect {
    group: Option<String>,
    user: Option<String>,
    conn: Option<String>,
    code: Option<u16>,
    reason: Option<String>,
}

fn checked_topic(topic: String) -> Result<String, ApiError> {
    if topic.is_empty() || topic.len() > MAX_TOPIC_LEN {
        return Err(ApiError::BadTopic(topic.chars().take(64).collect()));
    }
    Ok(topic)
}

fn target(user: Option<String>, conn: Option<String>) -> Result<Target, ApiError> {
    match (user, conn) {
        (Some(u), None) if !u.is_empty() => Ok(Target::User(u)),
        (None, Some(c)) => Ok(Target::Conn(c.parse()?)),
        _ => Err(ApiError::WhichTarget),
    }
}

fn message(data: Value) -> Result<Message, ApiError> {
    Ok(crate::json_data::message_of(data)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &str = "0123456789abcdef";

    fn req(method: Method, target: &str, body: &str) -> Request {
        let (path, query) = match target.split_once('?') {
            Some((p, q)) => (p.to_string(), Some(q.to_string())),
            None => (target.to_string(), None),
        };
        Request {
            method,
            path,
            query,
            bearer: Some(KEY.as_bytes().to_vec()),
            body: body.as_bytes().to_vec(),
            keep_alive: true,
        }
    }

    fn call(method: Method, target: &str, body: &str) -> Result<Call, ApiError> {
        understand(&req(method, target, body), &[Secret::new(KEY)]).map(|a| a.call)
    }

    #[test]
    fn the_group_named_is_read_and_a_batch_names_one() {
        let group = |target: &str, body: &str| {
            let m = if body.is_empty() {
                Method::Get
            } else {
                Method::Post
            };
            understand(&req(m, target, body), &[Secret::new(KEY)]).map(|a| a.group)
        };
        assert_eq!(group("/api/stats", "").unwrap(), None);
        assert_eq!(
            group("/api/stats?group=feed", "").unwrap(),
            Some("feed".into())
        );
        assert_eq!(
            group("/health?group=feed", "").unwrap(),
            Some("feed".into())
        );
        let one = r#"{"group":"feed","topic":"a","data":"1"}"#;
        assert_eq!(group("/api/publish", one).unwrap(), Some("feed".into()));
        let same = r#"[{"topic":"a","data":"1"},{"group":"feed","topic":"b","data":"2"}]"#;
        assert_eq!(group("/api/publish", same).unwrap(), Some("feed".into()));
        let mixed =
            r#"[{"group":"chat","topic":"a","data":"1"},{"group":"feed","topic":"b","data":"2"}]"#;
        let e = group("/api/publish", mixed).unwrap_err();
        assert!(
            matches!(e, ApiError::MixedGroups(..)) && e.status() == 422,
            "{e}"
        );
    }

    #[test]
    fn publishes_one_or_a_batch_of_text_or_binary() {
        assert_eq!(
            call(
                Method::Post,
                "/api/publish",
                r#"{"topic":"room","data":"hi"}"#
            )
            .unwrap(),
            Call::Publish(vec![("room".into(), Message::from("hi"))])
        );
        let batch =
            r#"[{"group":"chat","topic":"a","data":"1"},{"topic":"b","data":{"b64":"AAEC"}}]"#;
        assert_eq!(
            call(Method::Post, "/api/publish", batch).unwrap(),
            Call::Publish(vec![
                ("a".into(), Message::from("1")),
                ("b".into(), Message::from(vec![0u8, 1, 2]))
            ])
        );
    }

    #[test]
    fn each_bad_request_has_its_status() {
        let status = |m, t, b| call(m, t, b).unwrap_err().status();
        assert_eq!(status(Method::Post, "/api/publish", "{nope"), 400);
        assert_eq!(status(Method::Post, "/api/publish", "[]"), 422);
        assert_eq!(
            status(Method::Post, "/api/publish", r#"{"topic":"","data":"1"}"#),
            422
        );
        assert_eq!(
            status(Method::Post, "/api/publish", r#"{"topic":"a","data":5}"#),
            422
        );
        assert_eq!(
            status(
                Method::Post,
                "/api/publish",
                r#"{"topic":"a","data":{"b64":"!!"}}"#
            ),
            422
        );
        assert_eq!(status(Method::Get, "/api/publish", ""), 405);
        assert_eq!(status(Method::Post, "/api/stats", ""), 405);
        assert_eq!(status(Method::Get, "/api/nothing", ""), 404);
        assert_eq!(status(Method::Get, "/api/presence", ""), 400);
        assert_eq!(
            status(
                Method::Post,
                "/api/send",
                r#"{"user":"a","conn":"1-2-3-4","data":"x"}"#
            ),
            422
        );
        assert_eq!(
            status(
                Method::Post,
                "/api/send",
                r#"{"conn":"not-an-id","data":"x"}"#
            ),
            422
        );
        assert_eq!(
            status(
                Method::Post,
                "/api/disconnect",
                r#"{"user":"a","code":1005}"#
            ),
            422
        );
        let mut wrong = req(Method::Get, "/api/stats", "");
        wrong.bearer = Some(b"0123456789abcdeX".to_vec());
        let e = understand(&wrong, &[Secret::new(KEY)]).unwrap_err();
        assert_eq!(e.status(), 401);
        wrong.bearer = None;
        wrong.path = "/health".into();
        assert_eq!(
            understand(&wrong, &[Secret::new(KEY)]).unwrap().call,
            Call::Health
        );
    }

    #[test]
    fn targets_and_close_codes_are_read() {
        assert_eq!(
            call(
                Method::Post,
                "/api/disconnect",
                r#"{"user":"ada","code":4000,"reason":"bye"}"#
            )
            .unwrap(),
            Call::Disconnect {
                target: Target::User("ada".into()),
                code: 4000,
                reason: "bye".into()
            }
        );
        let id = "00000000000000ab-1-2-3";
        assert_eq!(
            call(
                Method::Post,
                "/api/send",
                &format!(r#"{{"conn":"{id}","data":"x"}}"#)
            )
            .unwrap(),
            Call::Send(Target::Conn(id.parse().unwrap()), Message::from("x"))
        );
        assert_eq!(
            call(Method::Get, "/api/presence?topic=room%201", "").unwrap(),
            Call::Presence("room 1".into())
        );
    }
}
