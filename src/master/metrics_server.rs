//! `[metrics] listen`: the master answers Prometheus (`GET /metrics`) and health checks
//! (`GET /health`) on a small HTTP listener of its own.
//!
//! The master, because it alone sees every group and worker: the workers report their
//! counters to it every second, so a scrape reads those reports and never reaches into the
//! data path. `/health` is the master's own view: 200 when every slot's worker is ready, 503
//! while the server starts, stops or has a slot waiting for its worker. Requests are parsed by
//! the API's strict HTTP reader; each connection gets one answer and is closed.

use crate::api::http::{self, Method, Response};
use mio::net::{TcpListener, TcpStream};
use mio::{Interest, Registry, Token};
use slab::Slab;
use std::io::{self, Read, Write};
use std::time::{Duration, Instant};

/// The listener's token in the master's poll.
pub const LISTENER: Token = Token(2);
/// Connection tokens: `CONN_BASE + key`, between the CLI's clients and the workers' channels.
pub const CONN_BASE: usize = 1 << 18;
/// Scrapers served at once; more wait in the accept queue.
const MAX_CONNS: usize = 16;
/// A scraper must send its request within this time.
const TIMEOUT: Duration = Duration::from_secs(10);

struct Conn {
    stream: TcpStream,
    reader: http::Reader,
    out: Vec<u8>,
    deadline: Instant,
}

/// What a request asks the master for.
pub enum Ask {
    /// `GET /metrics`.
    Metrics { head_only: bool },
    /// `GET /health`.
    Health { head_only: bool },
}

/// The metrics listener and its connections.
pub struct MetricsServer {
    listener: TcpListener,
    /// `http://HOST:PORT`, as bound.
    pub url: String,
    conns: Slab<Conn>,
}

impl MetricsServer {
    /// Binds `addr` (before any fork: the workers close their copy).
    pub fn bind(addr: std::net::SocketAddr) -> io::Result<MetricsServer> {
        MetricsServer::serve(std::net::TcpListener::bind(addr)?)
    }

    /// Serves on a bound socket (one the master this one replaces had: `wsd upgrade`).
    pub fn serve(std: std::net::TcpListener) -> io::Result<MetricsServer> {
        std.set_nonblocking(true)?;
        let url = format!("http://{}", std.local_addr()?);
        Ok(MetricsServer {
            listener: TcpListener::from_std(std),
            url,
            conns: Slab::new(),
        })
    }

    /// The listening socket, for the master that replaces this one.
    pub fn fd(&self) -> std::os::fd::RawFd {
        use std::os::fd::AsRawFd;
        self.listener.as_raw_fd()
    }

    pub fn register(&mut self, registry: &Registry) -> io::Result<()> {
        registry.register(&mut self.listener, LISTENER, Interest::READABLE)
    }

    /// Takes new scrapers, up to [`MAX_CONNS`].
    pub fn accept(&mut self, registry: &Registry) {
        while self.conns.len() < MAX_CONNS {
            let Ok((mut stream, _)) = self.listener.accept() else {
                return;
            };
            let entry = self.conns.vacant_entry();
            let token = Token(CONN_BASE + entry.key());
            if registry
                .register(&mut stream, token, Interest::READABLE | Interest::WRITABLE)
                .is_ok()
            {
                entry.insert(Conn {
                    stream,
                    reader: http::Reader::new(0),
                    out: Vec::new(),
                    deadline: Instant::now() + TIMEOUT,
                });
            }
        }
    }

    /// Connection `key` is ready: what it asks, once its request is whole.
    pub fn ready(&mut self, key: usize, registry: &Registry) -> Option<Ask> {
        let c = self.conns.get_mut(key)?;
        if !c.out.is_empty() {
            self.write(key, registry);
            return None;
        }
        let mut buf = [0u8; 4096];
        loop {
            match c.stream.read(&mut buf) {
                Ok(0) => {
                    self.close(key, registry);
                    return None;
                }
                Ok(n) => c.reader.feed(&buf[..n]),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => {
                    self.close(key, registry);
                    return None;
                }
            }
        }
        let req = match c.reader.next() {
            Ok(Some(req)) => req,
            Ok(None) => return None,
            Err(e) => {
                let body = serde_json::json!({ "error": e.to_string() });
                self.answer(key, &Response::json(e.status(), &body), false, registry);
                return None;
            }
        };
        let head_only = req.method == Method::Head;
        let get = matches!(req.method, Method::Get | Method::Head);
        match (req.path.as_str(), get) {
            ("/metrics", true) => Some(Ask::Metrics { head_only }),
            ("/health", true) => Some(Ask::Health { head_only }),
            ("/metrics" | "/health", false) => {
                let body = serde_json::json!({ "error": "use GET" });
                let mut r = Response::json(405, &body);
                r.allow = Some("GET, HEAD");
                self.answer(key, &r, false, registry);
                None
            }
            _ => {
                let body = serde_json::json!({ "error": "try /metrics or /health" });
                self.answer(key, &Response::json(404, &body), false, registry);
                None
            }
        }
    }

    /// Sends `r` on `key` and closes it once written.
    pub fn answer(&mut self, key: usize, r: &Response, head_only: bool, registry: &Registry) {
        if let Some(c) = self.conns.get_mut(key) {
            c.out = r.encode(false, head_only);
            self.write(key, registry);
        }
    }

    fn write(&mut self, key: usize, registry: &Registry) {
        let Some(c) = self.conns.get_mut(key) else {
            return;
        };
        while !c.out.is_empty() {
            match c.stream.write(&c.out) {
                Ok(0) => break,
                Ok(n) => {
                    c.out.drain(..n);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => break,
            }
        }
        self.close(key, registry);
    }

    fn close(&mut self, key: usize, registry: &Registry) {
        if self.conns.contains(key) {
            let mut c = self.conns.remove(key);
            let _ = registry.deregister(&mut c.stream);
        }
        self.accept(registry);
    }

    /// Drops scrapers past their deadline.
    pub fn expire(&mut self, now: Instant, registry: &Registry) {
        let late: Vec<usize> = self
            .conns
            .iter()
            .filter(|(_, c)| c.deadline <= now)
            .map(|(k, _)| k)
            .collect();
        for key in late {
            self.close(key, registry);
        }
    }

    /// The earliest deadline, for the master's poll timeout.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.conns.iter().map(|(_, c)| c.deadline).min()
    }
}
