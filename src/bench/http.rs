//! HTTP/1.1 from the client's side, reduced to what the API publisher needs: `POST` requests
//! with a `Content-Length` body on a keep-alive connection, several in flight (pipelined),
//! and answers read back in order.
//!
//! Like [`super::wire`], it keeps the client cheaper than the server: the request head up to
//! its `Content-Length` is made once per run and copied, the body is written straight into
//! the connection's send buffer, and an answer is read in place from the connection's
//! receive buffer; only a refusal's body is kept, for the report.

use super::BenchError;
use std::fmt;

/// Answer heads longer than this are refused (a real one is ~150 bytes).
const MAX_HEAD: usize = 8 << 10;
/// Answer bodies longer than this are refused (the API answers a few dozen bytes).
const MAX_BODY: usize = 1 << 20;
/// How much of a refusal's body the report keeps.
const PREVIEW: usize = 120;

/// Where to send requests: `http://HOST:PORT[/PATH]`.
#[derive(Debug, Clone)]
pub struct Endpoint {
    pub addr: std::net::SocketAddr,
    /// `HOST:PORT`, for the `Host` header.
    pub authority: String,
}

impl Endpoint {
    /// Parses `http://HOST:PORT` (port 80 when none is given); a path is not taken, since
    /// the mode knows its endpoint.
    pub fn parse(url: &str) -> Result<Endpoint, BenchError> {
        use std::net::ToSocketAddrs;
        let bad = |why: &str| BenchError::Url(format!("{url}: {why}"));
        let rest = url
            .strip_prefix("http://")
            .ok_or_else(|| bad("only http:// URLs"))?;
        let authority = rest.split('/').next().unwrap_or("");
        if authority.is_empty() {
            return Err(bad("no host"));
        }
        let authority = if authority
            .rsplit_once(':')
            .is_some_and(|(_, p)| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()))
        {
            authority.to_string()
        } else {
            format!("{authority}:80")
        };
        let addr = authority
            .to_socket_addrs()
            .map_err(|e| bad(&e.to_string()))?
            .next()
            .ok_or_else(|| bad("resolves to no address"))?;
        Ok(Endpoint { addr, authority })
    }
}

/// A `POST` to one path with one key, made once: [`Post::put`] appends a whole request.
#[derive(Debug, Clone)]
pub struct Post {
    /// Everything up to the `Content-Length` value.
    head: Vec<u8>,
}

impl Post {
    pub fn new(endpoint: &Endpoint, path: &str, key: &str) -> Post {
        let auth = if key.is_empty() {
            String::new()
        } else {
            format!("Authorization: Bearer {key}\r\n")
        };
        let head = format!(
            "POST {path} HTTP/1.1\r\nHost: {}\r\n{auth}Content-Type: application/json\r\n\
             Content-Length: ",
            endpoint.authority
        );
        Post {
            head: head.into_bytes(),
        }
    }

    /// Appends the request with `body` to `out`.
    pub fn put(&self, out: &mut Vec<u8>, body: &[u8]) {
        out.extend_from_slice(&self.head);
        super::wire::put_decimal(out, body.len() as u64);
        out.extend_from_slice(b"\r\n\r\n");
        out.extend_from_slice(body);
    }
}

/// One answer, read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    pub status: u16,
    /// The server closes the connection after it.
    pub close: bool,
    /// The start of the body, when the status is not 200 (for the report).
    pub refusal: Option<String>,
}

/// An answer that cannot be read: the connection cannot go on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AnswerError {
    /// Not an HTTP/1.x answer.
    Malformed(String),
    /// No `Content-Length` (chunked, or read to the close): the API never answers so.
    NoLength,
    /// A head or body beyond what an API answer can be.
    TooLarge,
}

impl fmt::Display for AnswerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AnswerError::Malformed(why) => write!(f, "a malformed HTTP answer: {why}"),
            AnswerError::NoLength => f.write_str("an HTTP answer without Content-Length"),
            AnswerError::TooLarge => f.write_str("an HTTP answer too large for an API's"),
        }
    }
}

impl std::error::Error for AnswerError {}

/// The first whole answer in `buf` and the bytes it takes, or `None` if `buf` ends inside it.
pub fn next_answer(buf: &[u8]) -> Result<Option<(Answer, usize)>, AnswerError> {
    let mut headers = [httparse::EMPTY_HEADER; 24];
    let mut res = httparse::Response::new(&mut headers);
    let head = match res.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) if buf.len() > MAX_HEAD => {
            return Err(AnswerError::TooLarge);
        }
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(e) => return Err(AnswerError::Malformed(e.to_string())),
    };
    let status = res.code.unwrap_or(0);
    let mut len = None;
    let mut close = res.version == Some(0);
    for h in res.headers.iter() {
        if h.name.eq_ignore_ascii_case("content-length") {
            let v = std::str::from_utf8(h.value).ok().map(str::trim);
            len = Some(
                v.and_then(|v| v.parse::<usize>().ok())
                    .ok_or_else(|| AnswerError::Malformed("bad Content-Length".into()))?,
            );
        } else if h.name.eq_ignore_ascii_case("connection") {
            close = h.value.eq_ignore_ascii_case(b"close");
        }
    }
    let len = len.ok_or(AnswerError::NoLength)?;
    if len > MAX_BODY {
        return Err(AnswerError::TooLarge);
    }
    if buf.len() < head + len {
        return Ok(None);
    }
    let body = &buf[head..head + len];
    let refusal = (status != 200).then(|| {
        let text = String::from_utf8_lossy(&body[..body.len().min(PREVIEW)]);
        text.trim().to_string()
    });
    Ok(Some((
        Answer {
            status,
            close,
            refusal,
        },
        head + len,
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_carry_their_length_and_key() {
        let e = Endpoint::parse("http://127.0.0.1:8080").unwrap();
        assert_eq!(e.addr, "127.0.0.1:8080".parse().unwrap());
        let p = Post::new(&e, "/api/publish", "k3y");
        let mut out = Vec::new();
        p.put(&mut out, b"{\"a\":1}");
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "POST /api/publish HTTP/1.1\r\nHost: 127.0.0.1:8080\r\nAuthorization: Bearer k3y\r\n\
             Content-Type: application/json\r\nContent-Length: 7\r\n\r\n{\"a\":1}"
        );
        assert_eq!(
            Endpoint::parse("http://localhost/x").unwrap().authority,
            "localhost:80"
        );
        assert!(Endpoint::parse("ws://127.0.0.1:1").is_err());
    }

    #[test]
    fn pipelined_answers_are_read_in_turn() {
        let two = b"HTTP/1.1 200 OK\r\nContent-Length: 16\r\n\r\n{\"delivered\":10}\
                    HTTP/1.1 401 Unauthorized\r\nContent-Length: 13\r\nConnection: close\r\n\r\n{\"error\":\"k\"}";
        let (a, n) = next_answer(two).unwrap().unwrap();
        assert_eq!((a.status, a.close, a.refusal), (200, false, None));
        let (b, m) = next_answer(&two[n..]).unwrap().unwrap();
        assert_eq!((b.status, b.close), (401, true));
        assert_eq!(b.refusal.as_deref(), Some("{\"error\":\"k\"}"));
        assert_eq!(n + m, two.len());
        assert_eq!(next_answer(&two[..n - 1]).unwrap(), None);
        assert_eq!(next_answer(b"HTTP/1.1 200 OK\r\n"), Ok(None));
        assert_eq!(
            next_answer(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"),
            Err(AnswerError::NoLength)
        );
        assert!(matches!(
            next_answer(b"SSH-2.0\r\n\r\n"),
            Err(AnswerError::Malformed(_))
        ));
    }
}
