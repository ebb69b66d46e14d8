//! The opening handshake (RFC 6455 §4.2): parse a client's HTTP/1.1 upgrade request and answer
//! `101 Switching Protocols` or a short, honest HTTP error.
//!
//! Written on `httparse` rather than a full HTTP stack because a WebSocket server needs one
//! request per connection and must bound it: `max_header_bytes` caps what a client may send
//! before the upgrade, and every wrong request gets a status line a human can read (`426` for
//! a browser that typed the URL, `426` + `Sec-WebSocket-Version: 13` for an old client, `403`
//! for a foreign origin) instead of a dropped connection.
//!
//! A plain `GET` or `HEAD` (no `Upgrade: websocket`) is handed to the owner as a
//! [`FileRequest`]: a group with `static_dir` answers it with a file, any other refuses it
//! ([`FileRequest::refusal`]).

use bytes::Bytes;
use ipnet::IpNet;
use std::borrow::Cow;
use std::net::{IpAddr, SocketAddr};

/// Headers read from one request at most (more is a 431).
const MAX_HEADERS: usize = 64;

/// What a client asked for in a valid upgrade request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Request {
    /// Path and query, as sent.
    pub path: String,
    pub origin: Option<String>,
    pub key: String,
    pub forwarded_for: Option<String>,
    pub real_ip: Option<String>,
    /// The subprotocols offered (`Sec-WebSocket-Protocol`), in the client's order.
    pub protocols: Vec<String>,
    /// The `Sec-WebSocket-Extensions` values, as sent, one per header line.
    pub extensions: Vec<String>,
    /// Every header, name and value as sent (values trimmed; a value that is not UTF-8 is
    /// left out).
    pub headers: Vec<(String, String)>,
}

/// What the `101` says beyond the handshake itself: the subprotocol and extensions agreed,
/// and any headers the app adds (`Set-Cookie`, say).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Answer {
    pub protocol: Option<String>,
    pub extensions: Option<String>,
    pub headers: Vec<(String, String)>,
}

/// A request wsd will not upgrade, and the HTTP answer it gets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Reject {
    pub status: u16,
    /// One line for the body and the log: wsd's own reasons are static, an app's are its own.
    pub why: Cow<'static, str>,
}

/// A plain HTTP `GET` or `HEAD`: a browser asking for a page, not for a WebSocket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct FileRequest {
    /// `HEAD`: answer with the headers only.
    pub head: bool,
    /// The request target, as sent (percent-escapes and query included).
    pub path: String,
}

impl FileRequest {
    /// The answer where no files are served: 426 for a `GET`, 405 for a `HEAD`.
    pub(crate) fn refusal(&self) -> Reject {
        if self.head {
            Reject::fixed(405, "only GET can be upgraded to a WebSocket")
        } else {
            Reject::fixed(426, "this is a WebSocket endpoint; upgrade the request")
        }
    }
}

pub(crate) enum Parsed {
    /// The request's headers have not all arrived.
    Partial,
    /// A valid upgrade request of `usize` bytes; anything after it is WebSocket frames.
    Upgrade(Request, usize),
    /// A plain `GET`/`HEAD` without `Upgrade: websocket`.
    Fetch(FileRequest),
    Reject(Reject),
}

const fn reject(status: u16, why: &'static str) -> Parsed {
    Parsed::Reject(Reject::fixed(status, why))
}

/// Parses the request at the front of `buf`.
pub(crate) fn parse(buf: &[u8], max_header_bytes: usize) -> Parsed {
    let too_big = reject(431, "request headers too large");
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    let used = match req.parse(buf) {
        Ok(httparse::Status::Partial) if buf.len() > max_header_bytes => return too_big,
        Ok(httparse::Status::Partial) => return Parsed::Partial,
        Ok(httparse::Status::Complete(n)) if n > max_header_bytes => return too_big,
        Ok(httparse::Status::Complete(n)) => n,
        Err(httparse::Error::TooManyHeaders) => return too_big,
        Err(_) => return reject(400, "malformed HTTP request"),
    };
    let header = |name: &str| {
        req.headers
            .iter()
            .find(|h| h.name.eq_ignore_ascii_case(name))
            .and_then(|h| std::str::from_utf8(h.value).ok())
            .map(str::trim)
    };
    let has_token = |name: &str, token: &str| {
        header(name).is_some_and(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
    };
    let method = req.method.unwrap_or("");
    if matches!(method, "GET" | "HEAD") && !has_token("Upgrade", "websocket") {
        return Parsed::Fetch(FileRequest {
            head: method == "HEAD",
            path: req.path.unwrap_or("/").to_string(),
        });
    }
    if method != "GET" {
        return reject(405, "only GET can be upgraded to a WebSocket");
    }
    if req.version != Some(1) {
        return reject(400, "WebSocket needs HTTP/1.1");
    }
    if !has_token("Connection", "upgrade") {
        return reject(400, "Connection header must contain Upgrade");
    }
    // Two keys or two hosts: which one the client meant is anyone's guess (RFC 6455 4.2.1,
    // RFC 9112 3.2).
    let repeated = |name: &str| {
        let named = req
            .headers
            .iter()
            .filter(|h| h.name.eq_ignore_ascii_case(name));
        named.count() > 1
    };
    if ["Host", "Sec-WebSocket-Key", "Sec-WebSocket-Version"]
        .iter()
        .any(|n| repeated(n))
    {
        return reject(
            400,
            "Host and Sec-WebSocket-Key/Version must be sent once each",
        );
    }
    if header("Sec-WebSocket-Version") != Some("13") {
        return reject(426, "unsupported WebSocket version; this server speaks 13");
    }
    let key = match header("Sec-WebSocket-Key") {
        Some(k) if valid_key(k) => k.to_string(),
        _ => return reject(400, "missing or malformed Sec-WebSocket-Key"),
    };
    if header("Host").is_none() {
        return reject(400, "missing Host header");
    }
    let values = |name: &'static str| {
        req.headers
            .iter()
            .filter(move |h| h.name.eq_ignore_ascii_case(name))
            .filter_map(|h| std::str::from_utf8(h.value).ok())
            .map(str::trim)
    };
    let request = Request {
        path: req.path.unwrap_or("/").to_string(),
        origin: header("Origin").map(str::to_string),
        key,
        forwarded_for: header("X-Forwarded-For").map(str::to_string),
        real_ip: header("X-Real-IP").map(str::to_string),
        protocols: values("Sec-WebSocket-Protocol")
            .flat_map(|v| v.split(','))
            .map(str::trim)
            .filter(|p| !p.is_empty())
            .map(str::to_string)
            .collect(),
        extensions: values("Sec-WebSocket-Extensions")
            .map(str::to_string)
            .collect(),
        headers: req
            .headers
            .iter()
            .filter_map(|h| Some((h.name.to_string(), std::str::from_utf8(h.value).ok()?)))
            .map(|(name, value)| (name, value.trim().to_string()))
            .collect(),
    };
    Parsed::Upgrade(request, used)
}

/// A key is 16 bytes in base64: 24 characters ending in `==`.
fn valid_key(key: &str) -> bool {
    let b = key.as_bytes();
    b.len() == 24
        && b.ends_with(b"==")
        && b[..22]
            .iter()
            .all(|c| c.is_ascii_alphanumeric() || *c == b'+' || *c == b'/')
}

/// The `101 Switching Protocols` answer, with what `answer` agreed.
pub(crate) fn accept(req: &Request, answer: &Answer) -> Bytes {
    use std::fmt::Write;
    let accept = tungstenite::handshake::derive_accept_key(req.key.as_bytes());
    let mut out = format!(
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Accept: {accept}\r\n"
    );
    if let Some(p) = &answer.protocol {
        let _ = write!(out, "Sec-WebSocket-Protocol: {p}\r\n");
    }
    if let Some(e) = &answer.extensions {
        let _ = write!(out, "Sec-WebSocket-Extensions: {e}\r\n");
    }
    for (name, value) in &answer.headers {
        let _ = write!(out, "{name}: {value}\r\n");
    }
    out.push_str("\r\n");
    out.into()
}

impl Reject {
    /// A refusal with one of wsd's own reasons.
    pub(crate) const fn fixed(status: u16, why: &'static str) -> Reject {
        Reject {
            status,
            why: Cow::Borrowed(why),
        }
    }

    /// The full HTTP response; the connection closes after it.
    pub(crate) fn response(&self) -> Bytes {
        self.response_with(&[])
    }

    /// The full HTTP response with extra header lines (an app's, checked by the caller: see
    /// [`header_name_ok`] and [`header_value_ok`]).
    pub(crate) fn response_with(&self, headers: &[(String, String)]) -> Bytes {
        use std::fmt::Write;
        let (reason, extra) = match self.status {
            400 => ("Bad Request", ""),
            401 => ("Unauthorized", ""),
            403 => ("Forbidden", ""),
            404 => ("Not Found", ""),
            405 => ("Method Not Allowed", "Allow: GET\r\n"),
            409 => ("Conflict", ""),
            410 => ("Gone", ""),
            426 => (
                "Upgrade Required",
                "Upgrade: websocket\r\nSec-WebSocket-Version: 13\r\n",
            ),
            429 => ("Too Many Requests", ""),
            431 => ("Request Header Fields Too Large", ""),
            500 => ("Internal Server Error", ""),
            503 => ("Service Unavailable", ""),
            _ => ("Error", ""),
        };
        let connection = if self.status == 426 {
            "Upgrade, close"
        } else {
            "close"
        };
        let body = format!("{} {reason}: {}\n", self.status, self.why);
        let mut out = format!("HTTP/1.1 {} {reason}\r\n{extra}", self.status);
        for (name, value) in headers {
            let _ = write!(out, "{name}: {value}\r\n");
        }
        let _ = write!(
            out,
            "Connection: {connection}\r\nContent-Type: text/plain; charset=utf-8\r\n\
             Content-Length: {}\r\n\r\n{body}",
            body.len()
        );
        out.into()
    }
}

/// An HTTP header name: a token (RFC 9110 §5.1), so it cannot end the line or the head.
pub(crate) fn header_name_ok(name: &str) -> bool {
    is_token(name)
}

/// An HTTP header value that cannot end the line or the head: no CR, LF, NUL or other
/// control character but tab, and no space or tab at either end.
pub(crate) fn header_value_ok(value: &str) -> bool {
    let edge = |c: Option<char>| !matches!(c, Some(' ' | '\t'));
    edge(value.chars().next())
        && edge(value.chars().next_back())
        && value
            .bytes()
            .all(|b| b == b'\t' || (b >= 0x20 && b != 0x7f))
}

/// A token (RFC 9110 §5.6.2): what header names and subprotocol names (RFC 6455 §4.1) are made
/// of. Not empty; letters, digits and ``!#$%&'*+-.^_`|~``.
pub(crate) fn is_token(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

/// Whether a browser page from `origin` may connect. No list allows all; a request without
/// `Origin` (not from a browser) is allowed, as a browser always sends one. Entries match
/// exactly (ignoring case), and `https://*.example.com` matches any subdomain.
pub(crate) fn origin_allowed(origin: Option<&str>, allowed: &[String]) -> bool {
    let Some(origin) = origin else { return true };
    allowed.is_empty()
        || allowed.iter().any(|a| match a.split_once("*.") {
            Some((scheme, domain)) => {
                let o = origin.to_ascii_lowercase();
                o.strip_prefix(&scheme.to_ascii_lowercase())
                    .and_then(|host| host.strip_suffix(&domain.to_ascii_lowercase()))
                    .is_some_and(|sub| sub.ends_with('.') && sub.len() > 1)
            }
            None => a.eq_ignore_ascii_case(origin),
        })
}

/// The client's address: the peer's, unless the peer is a trusted proxy, in which case the
/// nearest untrusted hop of `X-Forwarded-For` (or `X-Real-IP`).
pub(crate) fn client_ip(peer: IpAddr, req: &Request, trusted: &[IpNet]) -> IpAddr {
    let is_trusted = |ip: &IpAddr| trusted.iter().any(|net| net.contains(ip));
    if !is_trusted(&peer) {
        return peer;
    }
    if let Some(list) = &req.forwarded_for {
        let mut nearest = peer;
        for hop in list.rsplit(',') {
            let Some(ip) = parse_ip(hop) else { break };
            nearest = ip;
            if !is_trusted(&ip) {
                break;
            }
        }
        return nearest;
    }
    req.real_ip.as_deref().and_then(parse_ip).unwrap_or(peer)
}

fn parse_ip(s: &str) -> Option<IpAddr> {
    let s = s.trim();
    s.parse::<IpAddr>()
        .ok()
        .or_else(|| s.parse::<SocketAddr>().ok().map(|a| a.ip()))
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = "GET /chat?room=1 HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n\
        Connection: keep-alive, Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
        Sec-WebSocket-Version: 13\r\nOrigin: https://app.example.com\r\n\r\n";

    fn status(req: &str) -> u16 {
        match parse(req.as_bytes(), 8192) {
            Parsed::Reject(r) => r.status,
            Parsed::Upgrade(..) => 101,
            Parsed::Fetch(f) => f.refusal().status,
            Parsed::Partial => 0,
        }
    }

    #[test]
    fn a_valid_request_upgrades_with_the_rfc_accept_key() {
        let with_frames = format!("{GOOD}\u{81}");
        let Parsed::Upgrade(req, used) = parse(with_frames.as_bytes(), 8192) else {
            panic!("not an upgrade")
        };
        assert_eq!(used, GOOD.len());
        assert_eq!(req.path, "/chat?room=1");
        assert_eq!(req.origin.as_deref(), Some("https://app.example.com"));
        let resp = String::from_utf8(accept(&req, &Answer::default()).to_vec()).unwrap();
        assert!(resp.contains("Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n"));
        assert!(resp.ends_with("\r\n\r\n") && !resp.contains("Sec-WebSocket-Protocol"));
        let answer = Answer {
            protocol: Some("v2.chat".into()),
            extensions: Some("permessage-deflate".into()),
            headers: vec![("Set-Cookie".into(), "a=b".into())],
        };
        let resp = String::from_utf8(accept(&req, &answer).to_vec()).unwrap();
        assert!(resp.contains("\r\nSec-WebSocket-Protocol: v2.chat\r\n"));
        assert!(resp.contains("\r\nSec-WebSocket-Extensions: permessage-deflate\r\n"));
        assert!(resp.ends_with("\r\nSet-Cookie: a=b\r\n\r\n"));
    }

    #[test]
    fn offered_subprotocols_extensions_and_headers_are_kept() {
        let req = GOOD.replace(
            "Origin:",
            "Sec-WebSocket-Protocol: v1.chat, v2.chat\r\nSec-WebSocket-Protocol: x\r\n\
             Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits\r\n\
             Cookie: a=1; b=2\r\nOrigin:",
        );
        let Parsed::Upgrade(req, _) = parse(req.as_bytes(), 8192) else {
            panic!("not an upgrade")
        };
        assert_eq!(req.protocols, ["v1.chat", "v2.chat", "x"]);
        assert_eq!(
            req.extensions,
            ["permessage-deflate; client_max_window_bits"]
        );
        assert!(req.headers.contains(&("Cookie".into(), "a=1; b=2".into())));
        assert_eq!(req.headers.len(), 10);
    }

    #[test]
    fn wrong_requests_get_the_right_status() {
        assert_eq!(status(&GOOD[..40]), 0);
        assert_eq!(status("GET / HTTP/1.1\r\nHost: x\r\n\r\n"), 426);
        assert_eq!(status(&GOOD.replace("Version: 13", "Version: 8")), 426);
        assert_eq!(status(&GOOD.replace("GET", "POST")), 405);
        assert_eq!(status(&GOOD.replace("HTTP/1.1", "HTTP/1.0")), 400);
        assert_eq!(
            status(&GOOD.replace("keep-alive, Upgrade", "keep-alive")),
            400
        );
        assert_eq!(
            status(&GOOD.replace("dGhlIHNhbXBsZSBub25jZQ==", "short")),
            400
        );
        assert_eq!(status(&GOOD.replace("Host: x\r\n", "")), 400);
        for twice in [
            "Host: y\r\n",
            "sec-websocket-key: AAAAAAAAAAAAAAAAAAAAAA==\r\n",
        ] {
            assert_eq!(
                status(&GOOD.replace("Host: x\r\n", &format!("Host: x\r\n{twice}"))),
                400
            );
        }
        assert_eq!(status("\x16\x03\x01garbage\r\n\r\n"), 400);
        let huge = GOOD.replace("Host: x", &format!("Host: {}", "x".repeat(9000)));
        assert_eq!(status(&huge), 431);
        assert_eq!(status(&huge[..8500]), 431, "too big even before it ends");
        let resp = Reject::fixed(426, "w").response();
        let resp = String::from_utf8(resp.to_vec()).unwrap();
        assert!(resp.starts_with("HTTP/1.1 426 Upgrade Required\r\n"));
        assert!(resp.contains("\r\nSec-WebSocket-Version: 13\r\n"));
        assert!(resp.ends_with("\r\n\r\n426 Upgrade Required: w\n"));
    }

    #[test]
    fn refusals_carry_their_reason_and_extra_headers() {
        let r = Reject {
            status: 401,
            why: format!("unknown token {}", 7).into(),
        };
        let headers = [("WWW-Authenticate".to_string(), "Bearer".to_string())];
        let resp = String::from_utf8(r.response_with(&headers).to_vec()).unwrap();
        assert!(resp.starts_with("HTTP/1.1 401 Unauthorized\r\nWWW-Authenticate: Bearer\r\n"));
        assert!(resp.contains("\r\nContent-Length: 34\r\n"), "{resp}");
        assert!(resp.ends_with("\r\n\r\n401 Unauthorized: unknown token 7\n"));
        for name in ["Set-Cookie", "X-A.b_c~1", "!#$%&'*+-.^_`|~"] {
            assert!(header_name_ok(name), "{name}");
        }
        for name in ["", "Bad Name", "a:b", "a\r\nb", "é", "a(b)", "\"q\""] {
            assert!(!header_name_ok(name), "{name}");
        }
        for value in ["", "a=b; Path=/; HttpOnly", "a\tb", "café"] {
            assert!(header_value_ok(value), "{value:?}");
        }
        for value in ["a\r\nb", "a\nb", "a\rb", "a\0b", "\u{7f}", " a", "a\t"] {
            assert!(!header_value_ok(value), "{value:?}");
        }
    }

    #[test]
    fn plain_get_and_head_are_file_requests() {
        let fetch = |req: &str| match parse(req.as_bytes(), 8192) {
            Parsed::Fetch(f) => Some(f),
            _ => None,
        };
        let f = fetch("GET /a%20b.html?x=1 HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
        assert_eq!(f.path, "/a%20b.html?x=1");
        assert!(!f.head);
        assert_eq!(
            f.refusal().status,
            426,
            "unchanged where no files are served"
        );
        let f = fetch("HEAD / HTTP/1.0\r\n\r\n").unwrap();
        assert!(f.head);
        assert_eq!(f.refusal().status, 405);
        // A raw target is kept as sent, for the file server to judge.
        assert_eq!(fetch("GET /../x HTTP/1.1\r\n\r\n").unwrap().path, "/../x");
        assert!(fetch(GOOD).is_none(), "an upgrade stays an upgrade");
        assert!(fetch("POST / HTTP/1.1\r\nHost: x\r\n\r\n").is_none());
        assert!(
            fetch(&GOOD.replace("GET", "HEAD")).is_none(),
            "HEAD + Upgrade: 405"
        );
        let resp = Reject::fixed(404, "no such file").response();
        assert!(resp.starts_with(b"HTTP/1.1 404 Not Found\r\n"));
    }

    #[test]
    fn origins() {
        let list = vec!["https://a.com".to_string(), "https://*.b.org".to_string()];
        assert!(origin_allowed(Some("https://A.com"), &list));
        assert!(origin_allowed(Some("https://x.b.org"), &list));
        assert!(origin_allowed(Some("https://x.y.b.org"), &list));
        assert!(!origin_allowed(Some("https://b.org"), &list));
        assert!(!origin_allowed(Some("https://evilb.org"), &list));
        assert!(!origin_allowed(Some("http://x.b.org"), &list));
        assert!(!origin_allowed(Some("https://a.com.evil"), &list));
        assert!(origin_allowed(None, &list));
        assert!(origin_allowed(Some("https://any"), &[]));
    }

    #[test]
    fn forwarded_addresses_count_only_from_trusted_proxies() {
        let trusted: Vec<IpNet> = vec!["10.0.0.0/8".parse().unwrap()];
        let mut req = Request {
            path: "/".into(),
            origin: None,
            key: String::new(),
            forwarded_for: Some("1.1.1.1, 2.2.2.2, 10.0.0.7".into()),
            real_ip: Some("3.3.3.3".into()),
            protocols: Vec::new(),
            extensions: Vec::new(),
            headers: Vec::new(),
        };
        let proxy: IpAddr = "10.1.1.1".parse().unwrap();
        let stranger: IpAddr = "8.8.8.8".parse().unwrap();
        assert_eq!(
            client_ip(proxy, &req, &trusted),
            "2.2.2.2".parse::<IpAddr>().unwrap()
        );
        assert_eq!(client_ip(stranger, &req, &trusted), stranger);
        req.forwarded_for = None;
        assert_eq!(
            client_ip(proxy, &req, &trusted),
            "3.3.3.3".parse::<IpAddr>().unwrap()
        );
        req.real_ip = Some("nonsense".into());
        assert_eq!(client_ip(proxy, &req, &trusted), proxy);
    }
}
