//! The upgrade as wsd and the app decide it, after the admission checks (`admission.rs`): the
//! subprotocol, chosen in the group's order of preference among those the client offered;
//! then the app's `on_upgrade` hook, which reads the request through [`UpgradeRequest`] (a
//! borrowed view, so the request is not copied for it) and answers with a [`Decision`].
//!
//! What the app asks for is checked here before anything is sent: a header that could break
//! the response is dropped, a subprotocol the client did not offer falls back to wsd's choice,
//! a status outside 4xx/5xx becomes 500. Each is logged, as the app erred.

use super::conn::{Agreed, Extra};
use crate::ConnId;
use crate::config::GroupConfig;
use crate::proto::handshake::{self, Answer, Reject, Request};
use std::any::Any;
use std::borrow::Cow;
use std::fmt;
use std::net::SocketAddr;

/// A client's WebSocket upgrade request, as the `on_upgrade` hook sees it (see
/// [`Worker::on_upgrade`](crate::Worker::on_upgrade)). It borrows the parsed request: reading
/// it copies nothing, except query values that have escapes to decode.
pub struct UpgradeRequest<'a> {
    request: &'a Request,
    remote: SocketAddr,
}

impl<'a> UpgradeRequest<'a> {
    pub(super) fn new(request: &'a Request, remote: SocketAddr) -> UpgradeRequest<'a> {
        UpgradeRequest { request, remote }
    }

    /// The request method: always `GET`, the only one that can be upgraded (others get 405
    /// before any hook runs).
    pub fn method(&self) -> &'static str {
        "GET"
    }

    /// The request target as sent: path and query (`/chat?room=1`), escapes kept. This is
    /// what [`Context::path`](crate::Context::path) returns once the connection is open.
    pub fn target(&self) -> &'a str {
        &self.request.path
    }

    /// The path, without the query, as sent (escapes kept): `/chat`.
    pub fn path(&self) -> &'a str {
        let target = self.target();
        target.split_once('?').map_or(target, |(path, _)| path)
    }

    /// The query as sent, after the `?` (escapes kept), if the target has one.
    pub fn query_string(&self) -> Option<&'a str> {
        self.target().split_once('?').map(|(_, query)| query)
    }

    /// The query's `name=value` pairs in order, repeated names kept, decoded as a form
    /// (`application/x-www-form-urlencoded`): `+` is a space, `%XX` a byte, and bytes that
    /// are not UTF-8 become U+FFFD. A `%` not followed by two hex digits stays as it is, and a
    /// pair without `=` has an empty value.
    pub fn query_pairs(&self) -> impl Iterator<Item = (Cow<'a, str>, Cow<'a, str>)> + 'a {
        crate::proto::query::pairs(self.query_string().unwrap_or(""))
    }

    /// The first value of query parameter `name` (decoded, as in
    /// [`query_pairs`](Self::query_pairs)).
    pub fn query(&self, name: &str) -> Option<Cow<'a, str>> {
        self.query_pairs().find(|(n, _)| n == name).map(|(_, v)| v)
    }

    /// Every value of query parameter `name`, in order.
    pub fn query_all(&self, name: &str) -> Vec<Cow<'a, str>> {
        self.query_pairs()
            .filter(|(n, _)| n == name)
            .map(|(_, v)| v)
            .collect()
    }

    /// The first header called `name` (in any case), its value trimmed. A value that is not
    /// UTF-8 is not kept.
    pub fn header(&self, name: &str) -> Option<&'a str> {
        self.headers()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v)
    }

    /// Every header in the order sent, repeated ones included: `(name, value)`.
    pub fn headers(&self) -> impl Iterator<Item = (&'a str, &'a str)> + 'a {
        self.request
            .headers
            .iter()
            .map(|(n, v)| (n.as_str(), v.as_str()))
    }

    /// The value of cookie `name`, from the `Cookie` header(s) (the first, if repeated).
    pub fn cookie(&self, name: &str) -> Option<&'a str> {
        self.cookies().find(|(n, _)| *n == name).map(|(_, v)| v)
    }

    /// Every cookie the client sent, `(name, value)` in order: the `Cookie` headers split at
    /// `;`, each pair at its first `=`, trimmed, and a value's surrounding double quotes
    /// removed. Values are not decoded further (a cookie's encoding is its setter's business);
    /// a piece without `=` is skipped.
    pub fn cookies(&self) -> impl Iterator<Item = (&'a str, &'a str)> + 'a {
        self.headers()
            .filter(|(n, _)| n.eq_ignore_ascii_case("cookie"))
            .flat_map(|(_, v)| cookie_pairs(v))
    }

    /// The client's address: the peer's, or the one a trusted proxy forwarded (with port 0),
    /// as [`Context::remote_addr`](crate::Context::remote_addr) will return it.
    pub fn remote_addr(&self) -> SocketAddr {
        self.remote
    }

    /// The `Origin` header, which browsers send.
    pub fn origin(&self) -> Option<&'a str> {
        self.request.origin.as_deref()
    }

    /// The subprotocols the client offered (`Sec-WebSocket-Protocol`), in its order.
    pub fn protocols(&self) -> &'a [String] {
        &self.request.protocols
    }

    /// The extensions the client offered (`Sec-WebSocket-Extensions`), one entry per header
    /// line, as sent.
    pub fn extensions(&self) -> &'a [String] {
        &self.request.extensions
    }
}

impl fmt::Debug for UpgradeRequest<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("UpgradeRequest")
            .field("target", &self.target())
            .field("remote", &self.remote)
            .field("protocols", &self.protocols())
            .finish_non_exhaustive()
    }
}

/// One `Cookie` header's pairs.
fn cookie_pairs(header: &str) -> impl Iterator<Item = (&str, &str)> {
    header.split(';').filter_map(|piece| {
        let (name, value) = piece.split_once('=')?;
        let value = value.trim();
        let value = value
            .strip_prefix('"')
            .and_then(|v| v.strip_suffix('"'))
            .unwrap_or(value);
        Some((name.trim(), value)).filter(|(name, _)| !name.is_empty())
    })
}

/// What the `on_upgrade` hook answers: accept (the default), optionally with response headers,
/// a subprotocol and the connection's state, or reject with an HTTP status and a short reason.
///
/// ```
/// # struct User { name: String }
/// let yes = wsd::Decision::accept()
///     .with_header("Set-Cookie", "session=abc; HttpOnly")
///     .with_protocol("v2.chat")
///     .with_state(User { name: "ada".into() });
/// let no = wsd::Decision::reject(401, "missing or unknown token")
///     .with_header("WWW-Authenticate", "Bearer");
/// assert!(yes.is_accept() && !no.is_accept());
/// ```
pub struct Decision {
    outcome: Outcome,
    headers: Vec<(String, String)>,
}

enum Outcome {
    Accept {
        protocol: Option<String>,
        state: Option<Box<dyn Any>>,
    },
    Reject {
        status: u16,
        why: String,
    },
}

impl Decision {
    /// Upgrade the connection: `101 Switching Protocols`, then `on_connect`.
    pub fn accept() -> Decision {
        Decision {
            outcome: Outcome::Accept {
                protocol: None,
                state: None,
            },
            headers: Vec::new(),
        }
    }

    /// Refuse the upgrade with HTTP `status` (400–599; another is sent as 500 and logged).
    /// The body is one line, `STATUS REASON: why` (`401 Unauthorized: unknown token`), and
    /// the connection closes after it.
    pub fn reject(status: u16, why: impl Into<String>) -> Decision {
        Decision {
            outcome: Outcome::Reject {
                status,
                why: why.into(),
            },
            headers: Vec::new(),
        }
    }

    /// Adds a response header: to the `101` (a `Set-Cookie`, say) or to the refusal (a
    /// `WWW-Authenticate`). A name that is not a token, a value with a line break or another
    /// control character, and the headers wsd writes itself (`Upgrade`, `Connection`,
    /// `Content-Length`, `Content-Type`, `Transfer-Encoding`, `Sec-WebSocket-*`) are logged
    /// and left out.
    pub fn with_header(mut self, name: impl Into<String>, value: impl Into<String>) -> Decision {
        self.headers.push((name.into(), value.into()));
        self
    }

    /// Answers with this subprotocol instead of the one wsd chose from the group's
    /// `subprotocols`. It must be one the client offered ([`UpgradeRequest::protocols`]);
    /// otherwise wsd's choice stands and the mistake is logged. Ignored on a rejection.
    pub fn with_protocol(mut self, protocol: impl Into<String>) -> Decision {
        if let Outcome::Accept { protocol: p, .. } = &mut self.outcome {
            *p = Some(protocol.into());
        }
        self
    }

    /// The connection's state from its first moment: what [`Context::state`] returns for it
    /// (in `on_connect` already), until it is dropped after `on_close`. Dropped at once on a
    /// rejection.
    ///
    /// [`Context::state`]: crate::Context::state
    pub fn with_state<T: 'static>(mut self, state: T) -> Decision {
        if let Outcome::Accept { state: s, .. } = &mut self.outcome {
            *s = Some(Box::new(state));
        }
        self
    }

    /// Whether this accepts the upgrade.
    pub fn is_accept(&self) -> bool {
        matches!(self.outcome, Outcome::Accept { .. })
    }
}

impl Default for Decision {
    /// [`Decision::accept`].
    fn default() -> Decision {
        Decision::accept()
    }
}

impl fmt::Debug for Decision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut d = f.debug_struct("Decision");
        match &self.outcome {
            Outcome::Accept { protocol, state } => d
                .field("accept", &true)
                .field("protocol", protocol)
                .field("state", &state.is_some()),
            Outcome::Reject { status, why } => d.field("reject", status).field("why", why),
        };
        d.field("headers", &self.headers).finish()
    }
}

/// A checked decision, ready for the session.
pub(super) enum Verdict {
    Accept {
        /// The `101`'s extras: the subprotocol's name and the app's headers.
        answer: Answer,
        agreed: Agreed,
        /// The state, and the subprotocol's name when it is not one of the group's; `None`
        /// when there is neither.
        extra: Option<Box<Extra>>,
    },
    Reject {
        reject: Reject,
        headers: Vec<(String, String)>,
    },
}

/// Headers wsd writes itself, which an app may not set.
const RESERVED: [&str; 5] = [
    "upgrade",
    "connection",
    "content-length",
    "content-type",
    "transfer-encoding",
];

/// The subprotocol wsd chooses: the first of the group's `subprotocols` the client offered,
/// as its place in that list. `Err` is the refusal when the group requires one and none fits.
pub(super) fn negotiate(
    settings: &GroupConfig,
    request: &Request,
) -> Result<Option<usize>, Reject> {
    let listed = &settings.subprotocols;
    let chosen = listed.iter().position(|p| request.protocols.contains(p));
    if chosen.is_none() && settings.require_subprotocol {
        let why = format!(
            "no subprotocol this server speaks was offered; offer one of: {}",
            listed.join(", ")
        );
        return Err(Reject {
            status: 400,
            why: why.into(),
        });
    }
    Ok(chosen)
}

impl Decision {
    /// Checks the app's decision for connection `id` against `request`, given the group's
    /// `listed` subprotocols and wsd's own choice among them. Without a hook, the decision is
    /// a plain [`Decision::accept`]: wsd's choice, no headers, no state.
    pub(super) fn settle(
        self,
        id: ConnId,
        request: &Request,
        listed: &[String],
        chosen: Option<usize>,
    ) -> Verdict {
        let headers = checked_headers(id, self.headers);
        match self.outcome {
            Outcome::Reject { status, why } => {
                let status = if (400..=599).contains(&status) {
                    status
                } else {
                    log::warn!(
                        "on_upgrade rejected connection {id} with status {status}, which is not \
                         4xx or 5xx; sending 500"
                    );
                    500
                };
                let reject = Reject {
                    status,
                    why: why.into(),
                };
                Verdict::Reject { reject, headers }
            }
            Outcome::Accept { protocol, state } => {
                let own = protocol.and_then(|p| {
                    if request.protocols.contains(&p) {
                        return Some(p);
                    }
                    let fallback = chosen.map_or("none", |i| listed[i].as_str());
                    log::warn!(
                        "on_upgrade chose subprotocol {} for connection {id}, which the client \
                         did not offer; answering with {fallback}",
                        crate::escaped(p.as_bytes())
                    );
                    None
                });
                let name = own.or_else(|| chosen.map(|i| listed[i].clone()));
                let (agreed, other) = name
                    .as_deref()
                    .map_or((Agreed::NONE, None), |n| keep(listed, n));
                let extra = (other.is_some() || state.is_some()).then(|| {
                    Box::new(Extra {
                        protocol: other,
                        state,
                        grant: None,
                    })
                });
                let answer = Answer {
                    protocol: name,
                    headers,
                    ..Answer::default()
                };
                Verdict::Accept {
                    answer,
                    agreed,
                    extra,
                }
            }
        }
    }
}

/// How a connection keeps subprotocol `name`: by its place in the group's list when it is
/// there (and the place fits in the field), by name otherwise.
fn keep(listed: &[String], name: &str) -> (Agreed, Option<Box<str>>) {
    let place = listed.iter().position(|l| l == name);
    match place.and_then(Agreed::listed) {
        Some(agreed) => (agreed, None),
        None => (Agreed::OTHER, Some(name.into())),
    }
}

/// The app's headers that can be sent; the others are logged and dropped.
fn checked_headers(id: ConnId, headers: Vec<(String, String)>) -> Vec<(String, String)> {
    headers
        .into_iter()
        .filter(|(name, value)| {
            let lower = name.to_ascii_lowercase();
            let why = if !handshake::header_name_ok(name) {
                "its name is not a token"
            } else if !handshake::header_value_ok(value) {
                "its value holds a line break or another control character"
            } else if RESERVED.contains(&lower.as_str()) || lower.starts_with("sec-websocket-") {
                "wsd writes it itself"
            } else {
                return true;
            };
            log::warn!(
                "on_upgrade header {}: {} for connection {id} left out: {why}",
                crate::escaped(name.as_bytes()),
                crate::escaped(value.as_bytes())
            );
            false
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(target: &str, headers: &[(&str, &str)], protocols: &[&str]) -> Request {
        Request {
            path: target.into(),
            origin: None,
            key: String::new(),
            forwarded_for: None,
            real_ip: None,
            protocols: protocols.iter().map(|p| p.to_string()).collect(),
            extensions: Vec::new(),
            headers: headers
                .iter()
                .map(|(n, v)| (n.to_string(), v.to_string()))
                .collect(),
        }
    }

    fn view(req: &Request) -> UpgradeRequest<'_> {
        UpgradeRequest::new(req, "10.0.0.1:5000".parse().unwrap())
    }

    #[test]
    fn a_connection_without_state_pays_one_pointer() {
        use std::mem::size_of;
        assert_eq!(size_of::<Option<Box<Extra>>>(), size_of::<usize>());
        assert_eq!(size_of::<Agreed>(), 2, "fits beside the flags of Conn");
    }

    #[test]
    fn queries_decode_as_forms_and_keep_repeated_names() {
        let req = request(
            "/chat?token=a%2Bb+c&room=1&room=2&flag&=empty&bad=%zz%4&utf=%C3%A9%FF&&x=1=2",
            &[],
            &[],
        );
        let r = view(&req);
        assert_eq!(r.path(), "/chat");
        assert_eq!(
            r.query_string(),
            Some("token=a%2Bb+c&room=1&room=2&flag&=empty&bad=%zz%4&utf=%C3%A9%FF&&x=1=2")
        );
        assert_eq!(r.query("token").as_deref(), Some("a+b c"));
        assert_eq!(r.query("room").as_deref(), Some("1"));
        assert_eq!(r.query_all("room"), ["1", "2"]);
        assert_eq!(r.query("flag").as_deref(), Some(""));
        assert_eq!(r.query("").as_deref(), Some("empty"));
        assert_eq!(r.query("bad").as_deref(), Some("%zz%4"), "bad escapes stay");
        assert_eq!(r.query("utf").as_deref(), Some("é\u{fffd}"));
        assert_eq!(r.query("x").as_deref(), Some("1=2"), "split at the first =");
        assert_eq!(r.query("missing"), None);
        assert!(matches!(r.query("room"), Some(Cow::Borrowed(_))), "no copy");
        assert_eq!(r.query_pairs().count(), 8);
        let escaped_path = request("/a%20b?q=%61", &[], &[]);
        let names: Vec<_> = view(&escaped_path).query_pairs().collect();
        assert_eq!(names, [(Cow::from("q"), Cow::from("a"))]);
        let none = request("/plain", &[], &[]);
        assert_eq!(view(&none).path(), "/plain");
        assert_eq!(view(&none).query_string(), None);
        assert_eq!(view(&none).query_pairs().count(), 0);
    }

    #[test]
    fn cookies_split_trim_and_unquote() {
        let req = request(
            "/",
            &[
                ("Host", "x"),
                (
                    "Cookie",
                    "sid=abc; theme=\"dark\";  empty=; novalue; =anon; a=b=c",
                ),
                ("cookie", "late=1; sid=second"),
            ],
            &[],
        );
        let r = view(&req);
        assert_eq!(r.cookie("sid"), Some("abc"), "the first wins");
        assert_eq!(r.cookie("theme"), Some("dark"));
        assert_eq!(r.cookie("empty"), Some(""));
        assert_eq!(r.cookie("a"), Some("b=c"));
        assert_eq!(r.cookie("late"), Some("1"));
        assert_eq!(r.cookie("novalue"), None);
        assert_eq!(r.cookies().count(), 6);
        assert_eq!(
            r.header("COOKIE"),
            Some("sid=abc; theme=\"dark\";  empty=; novalue; =anon; a=b=c")
        );
        assert_eq!(r.headers().count(), 3);
        assert_eq!(r.header("host"), Some("x"));
        assert_eq!(r.method(), "GET");
        assert_eq!(r.remote_addr().port(), 5000);
    }

    fn settings(listed: &[&str], require: bool) -> GroupConfig {
        let mut g = GroupConfig::new(crate::config::Listen::parse("127.0.0.1:0").unwrap());
        g.subprotocols = listed.iter().map(|p| p.to_string()).collect();
        g.require_subprotocol = require;
        g
    }

    #[test]
    fn the_server_prefers_its_own_order() {
        let g = settings(&["v2.chat", "v1.chat"], false);
        let pick = |offered: &[&str]| negotiate(&g, &request("/", &[], offered));
        assert_eq!(pick(&["v1.chat", "v2.chat"]), Ok(Some(0)));
        assert_eq!(pick(&["x", "v1.chat"]), Ok(Some(1)));
        assert_eq!(pick(&["x"]), Ok(None));
        assert_eq!(pick(&["V2.CHAT"]), Ok(None), "names match exactly");
        let g = settings(&["v2.chat", "v1.chat"], true);
        let refused = negotiate(&g, &request("/", &[], &["x"])).unwrap_err();
        assert_eq!(refused.status, 400);
        assert!(refused.why.contains("v2.chat, v1.chat"), "{}", refused.why);
    }

    #[test]
    fn decisions_are_checked_before_anything_is_sent() {
        let id = ConnId { serial: 1, idx: 0 };
        let listed = ["v2.chat".to_string(), "v1.chat".to_string()];
        let req = request("/", &[], &["v1.chat", "mine", "v2.chat"]);
        let accept = |d: Decision| match d.settle(id, &req, &listed, Some(0)) {
            Verdict::Accept {
                answer,
                agreed,
                extra,
            } => (answer, agreed, extra),
            Verdict::Reject { .. } => panic!("rejected"),
        };
        let (answer, agreed, extra) = accept(
            Decision::accept()
                .with_header("Set-Cookie", "a=b; Path=/")
                .with_header("Bad Name", "x")
                .with_header("X-Split", "a\r\nInjected: yes")
                .with_header("connection", "keep-alive")
                .with_header("Sec-WebSocket-Accept", "forged")
                .with_header("X-Tab", "a\tb"),
        );
        assert_eq!(
            answer.headers,
            [
                ("Set-Cookie".to_string(), "a=b; Path=/".to_string()),
                ("X-Tab".to_string(), "a\tb".to_string())
            ]
        );
        assert_eq!(answer.protocol.as_deref(), Some("v2.chat"));
        assert_eq!(
            (agreed, extra.is_none()),
            (Agreed::listed(0).unwrap(), true)
        );

        let (answer, agreed, extra) = accept(Decision::accept().with_protocol("v1.chat"));
        assert_eq!(
            (answer.protocol.as_deref(), agreed),
            (Some("v1.chat"), Agreed::listed(1).unwrap())
        );
        assert!(extra.is_none(), "a listed protocol costs no allocation");

        let (answer, agreed, extra) =
            accept(Decision::accept().with_protocol("mine").with_state(7u8));
        assert_eq!(
            (answer.protocol.as_deref(), agreed),
            (Some("mine"), Agreed::OTHER)
        );
        let extra = extra.unwrap();
        assert_eq!(extra.protocol.as_deref(), Some("mine"));
        assert_eq!(extra.state.unwrap().downcast_ref::<u8>(), Some(&7));

        let (answer, agreed, _) = accept(Decision::accept().with_protocol("not-offered"));
        assert_eq!(
            (answer.protocol.as_deref(), agreed),
            (Some("v2.chat"), Agreed::listed(0).unwrap())
        );

        for (status, sent) in [(401, 401), (503, 503), (200, 500), (101, 500), (600, 500)] {
            match Decision::reject(status, "no")
                .with_state(1)
                .settle(id, &req, &listed, None)
            {
                Verdict::Reject { reject, .. } => assert_eq!(reject.status, sent),
                Verdict::Accept { .. } => panic!("accepted"),
            }
        }
        match Decision::accept().settle(id, &req, &listed, Some(1)) {
            Verdict::Accept {
                answer,
                agreed,
                extra,
            } => {
                assert_eq!(answer.protocol.as_deref(), Some("v1.chat"));
                assert_eq!(
                    (agreed, extra.is_none()),
                    (Agreed::listed(1).unwrap(), true)
                );
            }
            Verdict::Reject { .. } => panic!("rejected"),
        }
    }
}
