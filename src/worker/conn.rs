//! One client connection's state machine: handshaking → open → closing → gone.
//!
//! Handshaking drives tungstenite's non-blocking server handshake. Open reads frames until the
//! socket would block. Closing covers both ways out: a clean close handshake (we or the client
//! sent Close, tungstenite finishes it) and a failed connection (we sent our close code, flush
//! it, shut down our side and discard input until the client goes, so the close frame is not
//! lost to a TCP reset).

use super::message::ConnError;
use mio::net::TcpStream;
use std::cell::RefCell;
use std::io::{self, Read};
use std::net::{Shutdown, SocketAddr};
use std::rc::Rc;
use std::time::Instant;
use tungstenite::handshake::server::{Callback, ErrorResponse, Request, Response, ServerHandshake};
use tungstenite::handshake::{HandshakeError, MidHandshake};
use tungstenite::protocol::CloseFrame;
use tungstenite::protocol::frame::coding::CloseCode;
use tungstenite::{WebSocket, protocol::WebSocketConfig};

pub(crate) type Ws = WebSocket<TcpStream>;
type Handshake = MidHandshake<ServerHandshake<TcpStream, Upgrade>>;

pub(crate) enum Phase {
    /// `None` only for the instant the handshake is being driven.
    Handshaking(Option<Handshake>),
    Open(Ws),
}

pub(crate) struct Conn {
    pub serial: u32,
    pub phase: Phase,
    pub remote: SocketAddr,
    /// Request path of the upgrade (`/` until the handshake completes).
    pub path: String,
    pub since: Instant,
    /// When we sent Close (app close, shutdown, or failure); the connection is dropped if the
    /// client has not finished the close by `close_timeout` after it.
    pub closing_since: Option<Instant>,
    /// We failed this connection: after our close frame is flushed, input is discarded.
    pub failed: bool,
    /// Listed in the context's dirty list (has output to flush).
    pub dirty: bool,
}

/// Result of driving a handshake one step.
pub(crate) enum HandshakeStep {
    Pending,
    Done,
    Failed(String),
}

impl Conn {
    pub fn new(
        serial: u32,
        stream: TcpStream,
        remote: SocketAddr,
        config: WebSocketConfig,
        seen: &Rc<RefCell<String>>,
    ) -> Conn {
        let upgrade = Upgrade { seen: seen.clone() };
        Conn {
            serial,
            phase: Phase::Handshaking(Some(ServerHandshake::start(stream, upgrade, Some(config)))),
            remote,
            path: String::from("/"),
            since: Instant::now(),
            closing_since: None,
            failed: false,
            dirty: false,
        }
    }

    pub fn ws(&mut self) -> Option<&mut Ws> {
        match &mut self.phase {
            Phase::Open(ws) => Some(ws),
            Phase::Handshaking(_) => None,
        }
    }

    pub fn is_open(&self) -> bool {
        matches!(self.phase, Phase::Open(_))
    }

    /// Drives the upgrade; on success the connection is open.
    pub fn drive_handshake(&mut self, seen: &Rc<RefCell<String>>) -> HandshakeStep {
        let Phase::Handshaking(slot) = &mut self.phase else {
            return HandshakeStep::Done;
        };
        let Some(mid) = slot.take() else {
            return HandshakeStep::Failed("handshake lost".into());
        };
        match mid.handshake() {
            Ok(ws) => {
                self.path = std::mem::take(&mut *seen.borrow_mut());
                self.phase = Phase::Open(ws);
                HandshakeStep::Done
            }
            Err(HandshakeError::Interrupted(mid)) => {
                *slot = Some(mid);
                HandshakeStep::Pending
            }
            Err(HandshakeError::Failure(e)) => HandshakeStep::Failed(e.to_string()),
        }
    }

    /// Starts a close handshake with `code`. Returns false if the socket is already unusable.
    pub fn start_close(&mut self, code: CloseCode, reason: &str) -> bool {
        if self.closing_since.is_none() {
            self.closing_since = Some(Instant::now());
        }
        let Some(ws) = self.ws() else { return false };
        let frame = CloseFrame {
            code,
            reason: reason.into(),
        };
        match ws.close(Some(frame)) {
            Ok(()) => true,
            Err(tungstenite::Error::Io(e)) => e.kind() == io::ErrorKind::WouldBlock,
            Err(_) => false,
        }
    }

    /// Fails the connection: our close code goes out, then we stop listening to the client.
    pub fn fail(&mut self, err: &ConnError) -> bool {
        self.failed = true;
        if matches!(err, ConnError::Io(_)) {
            return false;
        }
        let reason = match err {
            ConnError::HookPanicked => "internal error".to_string(),
            other => truncate(&other.to_string(), 120),
        };
        self.start_close(err.code(), &reason)
    }

    /// Writes what is queued. `Ok(true)`: all out; `Ok(false)`: the socket is full, wait for
    /// writable; `Err`: the connection is over (cleanly or not).
    pub fn flush(&mut self) -> Result<bool, ()> {
        let failed = self.failed;
        let Some(ws) = self.ws() else { return Ok(true) };
        match ws.flush() {
            Ok(()) => {
                if failed {
                    // Our close frame is out: send FIN, keep reading until the client goes.
                    let _ = ws.get_mut().shutdown(Shutdown::Write);
                }
                Ok(true)
            }
            Err(tungstenite::Error::Io(e)) if e.kind() == io::ErrorKind::WouldBlock => Ok(false),
            Err(_) => Err(()),
        }
    }

    /// For a failed connection: reads and discards input. `true` once the client has gone.
    pub fn drain(&mut self) -> bool {
        let Some(ws) = self.ws() else { return true };
        let mut sink = [0u8; 4096];
        loop {
            match ws.get_mut().read(&mut sink) {
                Ok(0) => return true,
                Ok(_) => continue,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return false,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => return true,
            }
        }
    }
}

fn truncate(s: &str, max: usize) -> String {
    let mut end = s.len().min(max);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s[..end].to_string()
}

/// The handshake callback: records the request path for the connection.
pub(crate) struct Upgrade {
    seen: Rc<RefCell<String>>,
}

impl Callback for Upgrade {
    fn on_request(self, request: &Request, response: Response) -> Result<Response, ErrorResponse> {
        let uri = request.uri();
        *self.seen.borrow_mut() = uri.path_and_query().map_or("/", |p| p.as_str()).to_string();
        Ok(response)
    }
}
