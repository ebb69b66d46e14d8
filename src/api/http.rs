//! A small, strict HTTP/1.1 server side for the API: requests with a `Content-Length` body (or
//! none), keep-alive, and nothing else. It is sans-I/O: the worker's loop feeds it the bytes it
//! read and writes the bytes it answers with.
//!
//! Strict, because its clients are backends and their HTTP libraries, never browsers: no
//! chunked bodies (411), no `Expect: 100-continue` dance (the body is simply read), no
//! pipelining beyond one request at a time (the next is parsed after the answer is queued).
//! Everything that could make a connection hold memory is bounded before it is read: the
//! head by [`MAX_HEAD`], the body by `max_body`.

use std::fmt::Write as _;

/// The largest request head (request line and headers).
pub const MAX_HEAD: usize = 16 << 10;
/// Headers read per request at most.
const MAX_HEADERS: usize = 32;

/// The methods the API answers; anything else is 405.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    /// `GET`.
    Get,
    /// `HEAD`: a `GET` without the body.
    Head,
    /// `POST`.
    Post,
    /// Any other method.
    Other,
}

/// One complete request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// Its method.
    pub method: Method,
    /// The path, without the query.
    pub path: String,
    /// The query string after `?`, if any (still percent-encoded).
    pub query: Option<String>,
    /// The `Authorization: Bearer` credential, if one was sent.
    pub bearer: Option<Vec<u8>>,
    /// The body (`Content-Length` bytes).
    pub body: Vec<u8>,
    /// The client wants the connection kept open after the answer.
    pub keep_alive: bool,
}

/// A request that cannot be served; each is answered with its status and the connection is
/// closed, since what follows it on the connection cannot be trusted to be a request.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HttpError {
    /// Not HTTP/1.x, or a malformed head.
    #[error("malformed request: {0}")]
    Malformed(&'static str),
    /// The head is larger than [`MAX_HEAD`], or has too many headers.
    #[error("request head too large")]
    HeadTooLarge,
    /// A body without a length (chunked).
    #[error("a body needs a Content-Length (chunked bodies are not accepted)")]
    LengthRequired,
    /// A body larger than `max_body`.
    #[error("request body of {got} bytes is larger than the {limit}-byte limit")]
    BodyTooLarge {
        /// Its declared length.
        got: usize,
        /// The limit.
        limit: usize,
    },
}

impl HttpError {
    /// The status it is answered with.
    pub fn status(&self) -> u16 {
        match self {
            HttpError::Malformed(_) => 400,
            HttpError::HeadTooLarge => 431,
            HttpError::LengthRequired => 411,
            HttpError::BodyTooLarge { .. } => 413,
        }
    }
}

/// Where one connection's current request is.
#[derive(Debug)]
enum State {
    /// Reading the head.
    Head,
    /// The head is read; `len` body bytes follow it (from `at` in the buffer).
    Body {
        head: Box<Request>,
        at: usize,
        len: usize,
    },
}

/// Reads requests from one connection's bytes.
#[derive(Debug)]
pub struct Reader {
    buf: Vec<u8>,
    state: State,
    max_body: usize,
}

impl Reader {
    /// A reader for a connection whose bodies may be `max_body` bytes at most.
    pub fn new(max_body: usize) -> Reader {
        Reader {
            buf: Vec::new(),
            state: State::Head,
            max_body,
        }
    }

    /// Nothing of a request has arrived: the connection is idle between requests.
    pub fn is_idle(&self) -> bool {
        self.buf.is_empty() && matches!(self.state, State::Head)
    }

    /// Bytes the reader could take now without passing its bounds: the rest of the head, or
    /// the rest of the body.
    pub fn room(&self) -> usize {
        match &self.state {
            State::Head => MAX_HEAD.saturating_sub(self.buf.len()).max(1),
            State::Body { at, len, .. } => (at + len).saturating_sub(self.buf.len()).max(1),
        }
    }

    /// Takes bytes read from the connection.
    pub fn feed(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    /// The next complete request, `Ok(None)` if more bytes are needed.
    pub fn next(&mut self) -> Result<Option<Request>, HttpError> {
        if let State::Head = self.state {
            let Some((head, used, len)) = self.parse_head()? else {
                return Ok(None);
            };
            self.state = State::Body {
                head: Box::new(head),
                at: used,
                len,
            };
        }
        let State::Body { at, len, .. } = self.state else {
            unreachable!("set above")
        };
        if self.buf.len() < at + len {
            return Ok(None);
        }
        let State::Body { mut head, .. } = std::mem::replace(&mut self.state, State::Head) else {
            unreachable!("matched above")
        };
        head.body = self.buf[at..at + len].to_vec();
        self.buf.drain(..at + len);
        if self.buf.is_empty() {
            // A keep-alive connection between requests holds no buffer.
            self.buf = Vec::new();
        }
        Ok(Some(*head))
    }

    /// The head, the bytes it took, and the body's length.
    fn parse_head(&self) -> Result<Option<(Request, usize, usize)>, HttpError> {
        let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut req = httparse::Request::new(&mut headers);
        let used = match req.parse(&self.buf) {
            Ok(httparse::Status::Complete(n)) => n,
            Ok(httparse::Status::Partial) if self.buf.len() >= MAX_HEAD => {
                return Err(HttpError::HeadTooLarge);
            }
            Ok(httparse::Status::Partial) => return Ok(None),
            Err(httparse::Error::TooManyHeaders) => return Err(HttpError::HeadTooLarge),
            Err(_) => return Err(HttpError::Malformed("not an HTTP/1.1 request")),
        };
        if used > MAX_HEAD {
            return Err(HttpError::HeadTooLarge);
        }
        let method = match req.method {
            Some("GET") => Method::Get,
            Some("HEAD") => Method::Head,
            Some("POST") => Method::Post,
            _ => Method::Other,
        };
        let target = req.path.unwrap_or("/");
        let (path, query) = match target.split_once('?') {
            Some((p, q)) => (p.to_string(), Some(q.to_string())),
            None => (target.to_string(), None),
        };
        let http10 = req.version == Some(0);
        let mut keep_alive = !http10;
        let mut len = 0usize;
        let mut bearer = None;
        let mut seen_length = false;
        for h in req.headers.iter() {
            let name = h.name;
            if name.eq_ignore_ascii_case("content-length") {
                let v = std::str::from_utf8(h.value)
                    .ok()
                    .and_then(|v| v.trim().parse::<usize>().ok())
                    .ok_or(HttpError::Malformed("bad Content-Length"))?;
                if seen_length && v != len {
                    return Err(HttpError::Malformed("two different Content-Lengths"));
                }
                seen_length = true;
                len = v;
            } else if name.eq_ignore_ascii_case("transfer-encoding") {
                return Err(HttpError::LengthRequired);
            } else if name.eq_ignore_ascii_case("connection") {
                let v = String::from_utf8_lossy(h.value).to_ascii_lowercase();
                if v.split(',').any(|t| t.trim() == "close") {
                    keep_alive = false;
                } else if v.split(',').any(|t| t.trim() == "keep-alive") {
                    keep_alive = true;
                }
            } else if name.eq_ignore_ascii_case("authorization") {
                bearer = self::bearer(h.value).map(<[u8]>::to_vec);
            }
        }
        if len > self.max_body {
            return Err(HttpError::BodyTooLarge {
                got: len,
                limit: self.max_body,
            });
        }
        let request = Request {
            method,
            path,
            query,
            bearer,
            body: Vec::new(),
            keep_alive,
        };
        Ok(Some((request, used, len)))
    }
}

/// The credential of an `Authorization: Bearer <credential>` header value.
pub fn bearer(value: &[u8]) -> Option<&[u8]> {
    let scheme = value.get(..7)?;
    scheme
        .eq_ignore_ascii_case(b"bearer ")
        .then(|| value[7..].trim_ascii())
}

/// An answer: a status and a JSON body.
#[derive(Debug, Clone, PartialEq)]
pub struct Response {
    /// The status code.
    pub status: u16,
    /// The body's media type.
    pub content_type: &'static str,
    /// The body.
    pub body: Vec<u8>,
    /// `Allow`, for a 405.
    pub allow: Option<&'static str>,
}

impl Response {
    /// A JSON answer.
    pub fn json(status: u16, value: &serde_json::Value) -> Response {
        let mut body = value.to_string().into_bytes();
        body.push(b'\n');
        Response {
            status,
            content_type: "application/json",
            body,
            allow: None,
        }
    }

    /// The bytes on the wire; `keep_alive` false says the connection closes after it, and
    /// `head_only` leaves the body out (a `HEAD` request) while still stating its length.
    pub fn encode(&self, keep_alive: bool, head_only: bool) -> Vec<u8> {
        let mut head = format!(
            "HTTP/1.1 {} {}\r\nContent-Type: {}\r\nContent-Length: {}\r\nCache-Control: no-store\r\n",
            self.status,
            reason(self.status),
            self.content_type,
            self.body.len()
        );
        if let Some(allow) = self.allow {
            let _ = write!(head, "Allow: {allow}\r\n");
        }
        if !keep_alive {
            head.push_str("Connection: close\r\n");
        }
        head.push_str("\r\n");
        let mut out = head.into_bytes();
        if !head_only {
            out.extend_from_slice(&self.body);
        }
        out
    }
}

/// The reason phrase of the statuses the API uses.
fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        400 => "Bad Request",
        401 => "Unauthorized",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        411 => "Length Required",
        413 => "Content Too Large",
        415 => "Unsupported Media Type",
        422 => "Unprocessable Content",
        429 => "Too Many Requests",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        503 => "Service Unavailable",
        _ => "Unknown",
    }
}

/// The value of `key` in a query string (`a=1&b=x%20y`), decoded as a form.
pub fn query_value(query: Option<&str>, key: &str) -> Option<String> {
    crate::proto::query::value(query?, key).map(|v| v.into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read_all(bytes: &[u8], max_body: usize) -> Result<Vec<Request>, HttpError> {
        let mut r = Reader::new(max_body);
        let mut out = Vec::new();
        // Byte by byte: a request split anywhere parses the same.
        for b in bytes {
            r.feed(std::slice::from_ref(b));
            while let Some(req) = r.next()? {
                out.push(req);
            }
        }
        Ok(out)
    }

    #[test]
    fn keep_alive_requests_with_bodies_parse_in_turn() {
        let two = b"POST /api/publish HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer k3y\r\n\
                    Content-Length: 2\r\n\r\n{}GET /api/stats?group=chat HTTP/1.1\r\n\r\n";
        let got = read_all(two, 100).unwrap();
        assert_eq!(got.len(), 2);
        assert_eq!(got[0].method, Method::Post);
        assert_eq!(got[0].body, b"{}");
        assert_eq!(got[0].bearer.as_deref(), Some(&b"k3y"[..]));
        assert!(got[0].keep_alive);
        assert_eq!(got[1].path, "/api/stats");
        assert_eq!(
            query_value(got[1].query.as_deref(), "group").as_deref(),
            Some("chat")
        );
        let close = read_all(b"GET / HTTP/1.0\r\n\r\n", 0).unwrap();
        assert!(!close[0].keep_alive);
    }

    #[test]
    fn what_cannot_be_served_is_an_error_with_its_status() {
        let status = |bytes: &[u8]| read_all(bytes, 10).unwrap_err().status();
        assert_eq!(
            status(b"POST / HTTP/1.1\r\nContent-Length: 11\r\n\r\n"),
            413
        );
        assert_eq!(
            status(b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"),
            411
        );
        assert_eq!(status(b"\x16\x03\x01garbage\r\n\r\n"), 400);
        assert_eq!(status(b"POST / HTTP/1.1\r\nContent-Length: x\r\n\r\n"), 400);
        let mut big = b"GET / HTTP/1.1\r\nX: ".to_vec();
        big.resize(MAX_HEAD + 10, b'a');
        assert_eq!(status(&big), 431);
    }

    #[test]
    fn responses_state_their_length_and_queries_decode() {
        let r = Response::json(404, &serde_json::json!({"error": "no"}));
        let wire = String::from_utf8(r.encode(false, false)).unwrap();
        assert!(wire.starts_with("HTTP/1.1 404 Not Found\r\n"), "{wire}");
        assert!(wire.contains("Content-Length: 15\r\n") && wire.contains("Connection: close"));
        assert!(wire.ends_with("{\"error\":\"no\"}\n"));
        assert_eq!(
            query_value(Some("a=1&topic=room%2F1+x"), "topic").as_deref(),
            Some("room/1 x")
        );
        assert_eq!(
            query_value(Some("topic=%zz"), "topic").as_deref(),
            Some("%zz")
        );
        assert_eq!(query_value(None, "topic"), None);
    }
}
