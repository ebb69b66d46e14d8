//! Test helpers: a real `wsd` master on an OS-chosen port in its own temp dir, real WebSocket
//! clients, and cleanup that kills every process a test started, even when it fails.
#![allow(dead_code)]

use nix::sys::signal::{Signal, kill, killpg};
use nix::unistd::Pid;
use serde_json::Value;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};
use tungstenite::{Message, WebSocket};

/// Tells tests/library.rs's binary to act as the wsd program, not as the test driver
/// (ignored by the wsd binary).
pub const LIBRARY_SERVER_ENV: &str = "WSD_LIBRARY_SERVER";

pub const DEADLINE: Duration = Duration::from_secs(30);

pub fn wsd_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_wsd"))
}

/// Polls `f` until it returns Some, or panics after `deadline` with `what`.
pub fn wait_for<T>(what: &str, deadline: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let end = Instant::now() + deadline;
    loop {
        if let Some(v) = f() {
            return v;
        }
        if Instant::now() > end {
            panic!("timed out after {deadline:?} waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

pub fn alive(pid: i32) -> bool {
    kill(Pid::from_raw(pid), None).is_ok()
}

/// `st`, a `status --json`, if every worker in it has reported and is idle.
fn all_idle(st: Value) -> Option<Value> {
    let ws = st["workers"].as_array()?;
    (ws.iter())
        .all(|w| w["status"] == "idle" && w["pid"].as_i64() > Some(0))
        .then_some(st)
}

/// A master started by a test, killed with all its workers when dropped.
pub struct Server {
    pub dir: tempfile::TempDir,
    pub config: PathBuf,
    pub bin: PathBuf,
    child: Option<Child>,
    /// Every pid seen (master and workers), killed on drop.
    seen: Vec<i32>,
    pub port: u16,
}

impl Server {
    /// Writes a config with one group of `app` × `count` on a free port, plus `extra` lines.
    pub fn config(app: &str, count: usize, extra: &str) -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().expect("temp dir");
        let config = dir.path().join("workers.toml");
        std::fs::write(
            &config,
            format!("[server]\nstop_timeout = \"5s\"\n\n[[worker]]\nlisten = \"websocket://127.0.0.1:0\"\ncount = {count}\napp = \"{app}\"\n{extra}\n"),
        )
        .unwrap();
        (dir, config)
    }

    pub fn start(app: &str, count: usize) -> Server {
        Self::start_extra(app, count, "")
    }

    /// Starts `app` × `count` with `extra` lines added to its `[[worker]]` table.
    pub fn start_extra(app: &str, count: usize, extra: &str) -> Server {
        let (dir, config) = Self::config(app, count, extra);
        Self::start_with(wsd_bin(), dir, config)
    }

    /// Starts `bin -c config start` in the foreground, in its own process group.
    pub fn start_with(bin: PathBuf, dir: tempfile::TempDir, config: PathBuf) -> Server {
        Self::start_with_env(bin, dir, config, &[])
    }

    /// As [`Server::start_with`], with extra environment variables for the master.
    pub fn start_with_env(
        bin: PathBuf,
        dir: tempfile::TempDir,
        config: PathBuf,
        env: &[(&str, &Path)],
    ) -> Server {
        let out = std::fs::File::create(dir.path().join("master.out")).unwrap();
        let child = Command::new(&bin)
            .envs(env.iter().copied())
            .args(["-c", config.to_str().unwrap(), "start"])
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .process_group(0)
            .env(LIBRARY_SERVER_ENV, "1")
            .spawn()
            .expect("spawn wsd");
        let mut s = Server {
            dir,
            config,
            bin,
            seen: vec![child.id() as i32],
            child: Some(child),
            port: 0,
        };
        let st = s.wait_started();
        let listen = st["groups"][0]["listen"].as_str().unwrap().to_string();
        s.port = listen.rsplit(':').next().unwrap().parse().unwrap();
        s
    }

    /// As [`Server::wait_ready`], failing at once if the master exits first (a configuration
    /// it refused, say), with what it said.
    fn wait_started(&mut self) -> Value {
        let st = wait_for("all workers idle", DEADLINE, || {
            if let Some(how) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                panic!(
                    "the master exited at start ({how}):\n{}",
                    self.master_output()
                );
            }
            all_idle(self.try_status()?)
        });
        self.remember(&st);
        st
    }

    /// Waits until every worker has reported, and returns that status.
    pub fn wait_ready(&mut self) -> Value {
        let st = wait_for("all workers idle", DEADLINE, || {
            all_idle(self.try_status()?)
        });
        self.remember(&st);
        st
    }

    fn remember(&mut self, st: &Value) {
        for w in st["workers"].as_array().into_iter().flatten() {
            if let Some(pid) = w["pid"].as_i64()
                && pid > 0
                && !self.seen.contains(&(pid as i32))
            {
                self.seen.push(pid as i32);
            }
        }
    }

    pub fn master_pid(&self) -> i32 {
        self.seen[0]
    }

    pub fn wsd(&self, args: &[&str]) -> Output {
        Command::new(&self.bin)
            .arg("-c")
            .arg(&self.config)
            .args(args)
            .env(LIBRARY_SERVER_ENV, "1")
            .stdin(Stdio::null())
            .output()
            .expect("run wsd")
    }

    pub fn try_status(&mut self) -> Option<Value> {
        let out = self.wsd(&["status", "--json"]);
        if !out.status.success() {
            return None;
        }
        let v: Value = serde_json::from_slice(&out.stdout).ok()?;
        self.remember(&v);
        Some(v)
    }

    pub fn status(&mut self) -> Value {
        self.try_status().expect("status --json")
    }

    pub fn worker_pids(&mut self) -> Vec<i32> {
        worker_pids_in(&self.status())
    }

    pub fn url(&self) -> String {
        format!("ws://127.0.0.1:{}/", self.port)
    }

    pub fn connect(&self) -> Client {
        Client::connect(self.port)
    }

    /// Waits for the foreground master to exit; returns its exit code.
    pub fn wait_exit(&mut self, deadline: Duration) -> i32 {
        let child = self.child.as_mut().expect("foreground master");
        let code = wait_for("master to exit", deadline, || {
            child.try_wait().ok().flatten()
        });
        code.code().unwrap_or(-1)
    }

    pub fn master_output(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("master.out")).unwrap_or_default()
    }

    /// Runs `wsd upgrade --binary next` on a thread of its own (it answers once the upgrade is
    /// done or has failed), and waits for the new master it starts: the thread, and that
    /// master's pid.
    pub fn upgrade_in_background(&self, next: PathBuf) -> (std::thread::JoinHandle<Output>, i32) {
        let (bin, config) = (wsd_bin(), self.config.clone());
        let upgrade = std::thread::spawn(move || {
            Command::new(bin)
                .arg("-c")
                .arg(config)
                .arg("upgrade")
                .arg("--binary")
                .arg(next)
                .output()
                .expect("run wsd upgrade")
        });
        let new_master = wait_for("the new master to start", DEADLINE, || {
            let out = self.master_output();
            let at = out.find("upgrading: started ")?;
            let line = out[at..].lines().next()?;
            line.rsplit("as pid ").next()?.trim().parse().ok()
        });
        (upgrade, new_master)
    }

    /// Waits until the master's output (its log and its workers') contains `text`.
    pub fn wait_for_log(&self, text: &str) {
        wait_for(&format!("the log to say {text:?}"), DEADLINE, || {
            self.master_output().contains(text).then_some(())
        });
    }

    pub fn seen_pids(&self) -> Vec<i32> {
        self.seen.clone()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(child) = &mut self.child {
            let _ = killpg(Pid::from_raw(child.id() as i32), Signal::SIGKILL);
        }
        for &pid in &self.seen {
            let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
        }
        if let Some(mut child) = self.child.take() {
            let _ = child.wait();
        }
        if std::thread::panicking() {
            eprintln!("--- master output ---\n{}", self.master_output());
        }
    }
}

/// A blocking WebSocket client with generous timeouts.
pub struct Client {
    pub ws: WebSocket<TcpStream>,
}

impl Client {
    pub fn connect(port: u16) -> Client {
        Self::try_connect(port).expect("websocket connect")
    }

    /// Upgrades on `target` (path and query) with extra request headers (names in lowercase);
    /// returns the client and the server's `101` response.
    pub fn connect_with(
        port: u16,
        target: &str,
        headers: &[(&'static str, &str)],
    ) -> Result<(Client, tungstenite::handshake::client::Response), tungstenite::Error> {
        use tungstenite::client::IntoClientRequest;
        let mut request = format!("ws://127.0.0.1:{port}{target}").into_client_request()?;
        for &(name, value) in headers {
            let value = value.parse().expect("a header value");
            request.headers_mut().append(name, value);
        }
        let stream = TcpStream::connect(("127.0.0.1", port))?;
        with_timeouts(&stream)?;
        let (ws, response) = tungstenite::client(request, stream).map_err(|e| match e {
            tungstenite::HandshakeError::Failure(e) => e,
            tungstenite::HandshakeError::Interrupted(_) => unreachable!("a blocking stream"),
        })?;
        Ok((Client { ws }, response))
    }

    /// A socket call with a timeout returns EINTR when the process is stopped and resumed,
    /// even for a signal it does not handle (signal(7)): a handshake cut so says nothing of
    /// the server, and is made again on a new connection.
    pub fn try_connect(port: u16) -> Result<Client, String> {
        let mut tries = 0;
        loop {
            let stream = TcpStream::connect(("127.0.0.1", port)).map_err(|e| e.to_string())?;
            with_timeouts(&stream).unwrap();
            match tungstenite::client(format!("ws://127.0.0.1:{port}/"), stream) {
                Ok((ws, _)) => return Ok(Client { ws }),
                Err(tungstenite::HandshakeError::Failure(tungstenite::Error::Io(e)))
                    if e.kind() == std::io::ErrorKind::Interrupted && tries < 3 =>
                {
                    tries += 1;
                }
                Err(e) => return Err(e.to_string()),
            }
        }
    }

    pub fn send_text(&mut self, text: &str) {
        self.send(Message::text(text)).expect("send");
    }

    /// Sends `msg`, surviving an EINTR ([`send`]).
    pub fn send(&mut self, msg: Message) -> tungstenite::Result<()> {
        send(&mut self.ws, msg)
    }

    /// The next message or control frame, read again after an EINTR ([`read`]).
    pub fn read(&mut self) -> tungstenite::Result<Message> {
        read(&mut self.ws)
    }

    /// The next data message (pings are answered by tungstenite and skipped).
    pub fn recv(&mut self) -> Message {
        loop {
            match self.read().expect("read") {
                Message::Ping(_) | Message::Pong(_) => continue,
                m => return m,
            }
        }
    }

    pub fn recv_text(&mut self) -> String {
        match self.recv() {
            Message::Text(t) => t.to_string(),
            other => panic!("expected text, got {other:?}"),
        }
    }

    /// Reads until the server's Close frame; returns its code.
    pub fn expect_close(&mut self) -> u16 {
        loop {
            match self.read() {
                Ok(Message::Close(Some(f))) => return u16::from(f.code),
                Ok(Message::Close(None)) => return 1005,
                Ok(_) => continue,
                Err(e) => panic!("connection ended without a close frame: {e}"),
            }
        }
    }
}

/// Sends `msg` on `ws`. A socket call with a timeout returns EINTR when the process is stopped
/// and resumed (a busy or paused machine), even with no signal handler: the message is queued
/// by then, and only its flush is done again.
pub fn send<S: Read + Write>(ws: &mut WebSocket<S>, msg: Message) -> tungstenite::Result<()> {
    let mut sent = ws.send(msg);
    while matches!(&sent, Err(e) if interrupted(e)) {
        sent = ws.flush();
    }
    sent
}

/// The next message or control frame on `ws`, read again after an EINTR (see [`send`]).
pub fn read<S: Read + Write>(ws: &mut WebSocket<S>) -> tungstenite::Result<Message> {
    loop {
        match ws.read() {
            Err(e) if interrupted(&e) => continue,
            other => return other,
        }
    }
}

/// The call was cut short by EINTR (see [`send`]).
pub fn interrupted(e: &tungstenite::Error) -> bool {
    matches!(e, tungstenite::Error::Io(e) if e.kind() == std::io::ErrorKind::Interrupted)
}

/// A raw TCP client that speaks frames by hand, for what tungstenite's client will not send.
pub struct RawClient {
    pub stream: TcpStream,
}

impl RawClient {
    pub fn upgrade(port: u16) -> RawClient {
        let mut stream = TcpStream::connect(("127.0.0.1", port)).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(15)))
            .unwrap();
        stream
            .write_all(
                b"GET /raw?x=1 HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
                  Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
            )
            .unwrap();
        let mut head = Vec::new();
        let mut b = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            stream.read_exact(&mut b).expect("read upgrade response");
            head.push(b[0]);
        }
        let head = String::from_utf8_lossy(&head);
        assert!(head.starts_with("HTTP/1.1 101"), "{head}");
        assert!(head.contains("s3pPLMBiTxaQ9kYGzzhZRbK+xOo="), "{head}");
        RawClient { stream }
    }

    /// Sends one masked frame.
    pub fn frame(&mut self, fin: bool, opcode: u8, payload: &[u8]) {
        let f = masked_frame(fin, opcode, payload);
        self.stream.write_all(&f).unwrap();
    }

    /// Reads one unmasked server frame: (fin, opcode, payload).
    pub fn read_frame(&mut self) -> (bool, u8, Vec<u8>) {
        let mut h = [0u8; 2];
        self.stream.read_exact(&mut h).expect("frame header");
        assert_eq!(h[1] & 0x80, 0, "server frames are not masked");
        let len = match h[1] & 0x7f {
            126 => {
                let mut l = [0u8; 2];
                self.stream.read_exact(&mut l).unwrap();
                u16::from_be_bytes(l) as usize
            }
            127 => {
                let mut l = [0u8; 8];
                self.stream.read_exact(&mut l).unwrap();
                u64::from_be_bytes(l) as usize
            }
            n => n as usize,
        };
        let mut payload = vec![0u8; len];
        self.stream.read_exact(&mut payload).unwrap();
        (h[0] & 0x80 != 0, h[0] & 0x0f, payload)
    }

    /// True once the server has closed the TCP connection.
    pub fn closed_by_server(&mut self) -> bool {
        let mut b = [0u8; 1];
        matches!(self.stream.read(&mut b), Ok(0) | Err(_))
    }
}

/// Kills a process that is not a child of the test (a daemon) when the test ends, pass or fail.
pub struct KillOnDrop(pub i32);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if self.0 > 0 && alive(self.0) {
            let _ = kill(Pid::from_raw(self.0), Signal::SIGKILL);
        }
    }
}

/// The pid a pid file records, or 0 if it is missing or unreadable.
pub fn pid_in(pid_file: &Path) -> i32 {
    std::fs::read_to_string(pid_file)
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0)
}

pub fn port_is_free(port: u16) -> bool {
    std::net::TcpListener::bind(("127.0.0.1", port)).is_ok()
}

/// A port the OS just handed out on 127.0.0.1, with nothing listening on it now.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

/// Runs `wsd -c config start`, which must be refused (exit 1); returns its stdout and stderr.
pub fn refused_start(config: &Path) -> (String, String) {
    let out = Command::new(wsd_bin())
        .arg("-c")
        .arg(config)
        .arg("start")
        .output()
        .expect("run wsd start");
    let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    assert_eq!(out.status.code(), Some(1), "{stdout}{stderr}");
    (stdout, stderr)
}

/// Writes `text` to `file` and runs `wsd -c file check`: whether it passed, and its stderr.
pub fn check_config(file: &Path, text: &str) -> (bool, String) {
    std::fs::write(file, text).unwrap();
    let out = Command::new(wsd_bin())
        .arg("-c")
        .arg(file)
        .arg("check")
        .output()
        .expect("run wsd check");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

pub fn path_exists(p: &Path) -> bool {
    p.exists()
}

/// A tiny deterministic pseudo-random generator (xorshift64), so "random" input is the same on
/// every run and a failing seed can be replayed.
pub struct XorShift(u64);

impl XorShift {
    pub fn new(seed: u64) -> XorShift {
        // Spread small seeds over the state; the state must never be zero.
        XorShift(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }

    pub fn bytes(&mut self, n: usize) -> Vec<u8> {
        let mut out = Vec::with_capacity(n + 8);
        while out.len() < n {
            out.extend_from_slice(&self.next_u64().to_le_bytes());
        }
        out.truncate(n);
        out
    }
}

/// Raises this process's soft RLIMIT_NOFILE (inherited by servers started afterwards) so that
/// `need` descriptors fit; panics if the hard limit is too low.
pub fn raise_fd_limit(need: u64) {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).unwrap();
    if hard < need {
        panic!("need {need} file descriptors, the hard limit is {hard}");
    }
    if soft < need {
        setrlimit(Resource::RLIMIT_NOFILE, hard.min(16_384).max(need), hard).unwrap();
    }
}

/// Open file descriptors of process `pid` (0 if it cannot be read).
pub fn fd_count(pid: i32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0)
}

/// A `kB` field of `/proc/PID/status` (`VmRSS`, `VmHWM`), in bytes; 0 if unreadable.
pub fn proc_status_bytes(pid: i32, field: &str) -> u64 {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    text.lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kib| kib * 1024)
}

/// Sum of a numeric field over every worker of a status.
pub fn workers_sum(st: &Value, field: &str) -> u64 {
    st["workers"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|w| w[field].as_u64().unwrap_or(0))
        .sum()
}

/// A valid upgrade request for `/`, with `extra` header lines (each ending in `\r\n`).
pub fn upgrade_request(extra: &str) -> String {
    upgrade_request_to("/", extra)
}

/// A valid upgrade request for `target` (path and query), with `extra` header lines.
pub fn upgrade_request_to(target: &str, extra: &str) -> String {
    format!(
        "GET {target} HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n{extra}\r\n"
    )
}

/// The mask key of every frame a test client sends.
pub const MASK: [u8; 4] = [0x12, 0x34, 0x56, 0x78];

/// The first byte of a frame: FIN and opcode.
fn first_byte(fin: bool, opcode: u8) -> u8 {
    (if fin { 0x80 } else { 0 }) | opcode
}

/// One masked client frame, as bytes (for writing from another thread or in bulk).
pub fn masked_frame(fin: bool, opcode: u8, payload: &[u8]) -> Vec<u8> {
    wsd::testing::client_frame(first_byte(fin, opcode), payload, MASK)
}

/// The header (with mask key [`MASK`]) of a masked client frame claiming `len` bytes.
pub fn masked_header(fin: bool, opcode: u8, len: u64) -> Vec<u8> {
    let mut f = Vec::new();
    let len = usize::try_from(len).expect("a length this machine can address");
    wsd::testing::put_client_header(&mut f, first_byte(fin, opcode), len, MASK);
    f
}

/// The code of a close frame's payload (1005 when it has none).
pub fn close_code(payload: &[u8]) -> u16 {
    if payload.len() >= 2 {
        u16::from_be_bytes([payload[0], payload[1]])
    } else {
        1005
    }
}

/// An HTTP answer the server gave instead of (or before) upgrading.
#[derive(Debug)]
pub struct HttpAnswer {
    pub status: u16,
    /// Status line and headers, without the blank line.
    pub head: String,
    pub body: String,
    /// The server closed the connection after the answer (EOF or reset).
    pub closed: bool,
}

impl HttpAnswer {
    /// A header's value (case-insensitive name).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.head.lines().skip(1).find_map(|l| {
            let (n, v) = l.split_once(':')?;
            n.trim().eq_ignore_ascii_case(name).then_some(v.trim())
        })
    }

    pub fn parse(raw: &[u8], closed: bool) -> HttpAnswer {
        let text = String::from_utf8_lossy(raw).into_owned();
        let (head, body) = text
            .split_once("\r\n\r\n")
            .map_or((text.clone(), String::new()), |(h, b)| {
                (h.to_string(), b.to_string())
            });
        let status = head
            .strip_prefix("HTTP/1.1 ")
            .and_then(|r| r.get(..3))
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        HttpAnswer {
            status,
            head,
            body,
            closed,
        }
    }
}

/// Sends `request` on a new connection and reads until the server ends it (or `deadline`
/// passes, then `closed` is false). Write errors are ignored: the server may answer and
/// close before it has read everything.
pub fn http_exchange(port: u16, request: &[u8], deadline: Duration) -> HttpAnswer {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    let _ = stream.write_all(request);
    let (raw, closed) = read_to_end_within(&mut stream, deadline);
    HttpAnswer::parse(&raw, closed)
}

/// One backend API request on its own connection (`Connection: close`), with `key` as its
/// bearer key if given.
pub fn api_call(
    port: u16,
    method: &str,
    target: &str,
    key: Option<&str>,
    body: &str,
) -> HttpAnswer {
    let auth = key.map_or(String::new(), |k| format!("Authorization: Bearer {k}\r\n"));
    let request = format!(
        "{method} {target} HTTP/1.1\r\nHost: x\r\n{auth}Content-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    http_exchange(port, request.as_bytes(), DEADLINE)
}

/// Reads until EOF or reset; false in the second place if `deadline` passed first.
pub fn read_to_end_within(stream: &mut TcpStream, deadline: Duration) -> (Vec<u8>, bool) {
    let end = Instant::now() + deadline;
    let mut raw = Vec::new();
    let mut buf = [0u8; 16 << 10];
    loop {
        let left = end.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return (raw, false);
        }
        stream
            .set_read_timeout(Some(left.max(Duration::from_millis(10))))
            .unwrap();
        match stream.read(&mut buf) {
            Ok(0) => return (raw, true),
            Ok(n) => raw.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(_) => return (raw, true),
        }
    }
}

impl RawClient {
    /// Upgrades with `extra` header lines; on refusal, the server's HTTP answer.
    pub fn try_upgrade(port: u16, extra: &str) -> Result<RawClient, HttpAnswer> {
        let mut stream = TcpStream::connect(("127.0.0.1", port)).expect("connect");
        stream
            .set_read_timeout(Some(Duration::from_secs(15)))
            .unwrap();
        if stream.write_all(upgrade_request(extra).as_bytes()).is_err() {
            // Dropped before the request was even sent.
            return Err(HttpAnswer::parse(b"", true));
        }
        RawClient::finish_upgrade(stream)
    }

    /// Reads the answer to an upgrade request already written on `stream`.
    pub fn finish_upgrade(mut stream: TcpStream) -> Result<RawClient, HttpAnswer> {
        let mut head = Vec::new();
        let mut b = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            match stream.read(&mut b) {
                Ok(1) => head.push(b[0]),
                _ => return Err(HttpAnswer::parse(&head, true)),
            }
        }
        if head.starts_with(b"HTTP/1.1 101 ") {
            return Ok(RawClient { stream });
        }
        // Refused: the body follows, then the server closes.
        let (body, closed) = read_to_end_within(&mut stream, Duration::from_secs(15));
        head.extend_from_slice(&body);
        Err(HttpAnswer::parse(&head, closed))
    }

    /// Like [`RawClient::read_frame`], but an error instead of a panic when the connection
    /// ends or the read times out.
    pub fn try_read_frame(&mut self) -> std::io::Result<(bool, u8, Vec<u8>)> {
        let mut h = [0u8; 2];
        self.stream.read_exact(&mut h)?;
        let len = match h[1] & 0x7f {
            126 => {
                let mut l = [0u8; 2];
                self.stream.read_exact(&mut l)?;
                u16::from_be_bytes(l) as u64
            }
            127 => {
                let mut l = [0u8; 8];
                self.stream.read_exact(&mut l)?;
                u64::from_be_bytes(l)
            }
            n => n as u64,
        };
        if h[1] & 0x80 != 0 || len > 64 << 20 {
            return Err(std::io::Error::other(format!(
                "not a server frame: header {h:02x?}, length {len}"
            )));
        }
        let mut payload = vec![0u8; len as usize];
        self.stream.read_exact(&mut payload)?;
        Ok((h[0] & 0x80 != 0, h[0] & 0x0f, payload))
    }

    /// Reads frames until a Close: its code, and how many frames came before it. `None` if
    /// the connection ended (or a read timed out) without one.
    pub fn read_until_close(&mut self) -> (Option<u16>, usize) {
        let mut before = 0;
        loop {
            match self.try_read_frame() {
                Ok((_, 0x8, payload)) => return (Some(close_code(&payload)), before),
                Ok(_) => before += 1,
                Err(_) => return (None, before),
            }
        }
    }
}

impl Server {
    /// Starts `bin` (a wsd program, e.g. a test binary that re-executes itself as the server)
    /// with one group of `app` × `count` plus `extra` lines.
    pub fn start_program(bin: PathBuf, app: &str, count: usize, extra: &str) -> Server {
        let (dir, config) = Self::config(app, count, extra);
        Self::start_with(bin, dir, config)
    }

    /// The worker pid of slot `slot`.
    pub fn worker_pid(&mut self, slot: usize) -> i32 {
        self.worker_pids()[slot]
    }
}

/// True once process `pid` has exited, counting a zombie as exited: an orphaned worker is
/// reparented to a pid 1 that may take seconds to reap it, and `kill(pid, 0)` (what [`alive`]
/// asks) still succeeds on a zombie.
pub fn exited(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state follows the command name, which is in parentheses and may contain spaces.
        Ok(stat) => stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_some_and(|state| state == "Z" || state == "X"),
        Err(_) => true,
    }
}

/// The worker pids a `status --json` lists, in slot order.
pub fn worker_pids_in(st: &Value) -> Vec<i32> {
    st["workers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| w["pid"].as_i64().unwrap() as i32)
        .collect()
}

/// The port of the first group in a `status --json`.
pub fn listen_port_in(st: &Value) -> u16 {
    st["groups"][0]["listen"]
        .as_str()
        .unwrap()
        .rsplit(':')
        .next()
        .unwrap()
        .parse()
        .unwrap()
}

/// Runs a `harness = false` suite under libtest's command line (`cargo test NAME`, `--skip`,
/// `--exact`, `--list`, `--ignored`, ...) and exits with its status. Such suites are wsd
/// programs themselves, so `main` must first decide whether this process is the server, and
/// only then run the tests. They run one at a time on the main thread, whatever
/// `--test-threads` says: each test owns a whole tree of server processes and watches its
/// pids, descriptors and timing.
pub fn run_suite(tests: &[(&str, fn())]) -> ! {
    let mut args = libtest_mimic::Arguments::from_args();
    args.test_threads = Some(1);
    let trials = tests
        .iter()
        .map(|&(name, test)| {
            libtest_mimic::Trial::test(name, move || {
                test();
                Ok(())
            })
        })
        .collect();
    libtest_mimic::run(&args, trials).exit()
}

/// Which worker pid holds each client, keyed by the client's local port, from the server's
/// own `wsd connections --json`.
pub fn connection_owners(server: &Server) -> std::collections::HashMap<u16, i32> {
    let out = server.wsd(&["connections", "--json"]);
    assert!(out.status.success(), "{out:?}");
    let view: Value = serde_json::from_slice(&out.stdout).unwrap();
    view["conns"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            let port = r["remote"].as_str().unwrap().rsplit(':').next().unwrap();
            (port.parse().unwrap(), r["pid"].as_i64().unwrap() as i32)
        })
        .collect()
}

/// The `relay` test app: shows each client its global id (`id ID`), forwards `to ID TEXT`
/// with `send_to`, and hands `all TEXT` to the other workers' `on_bus_message`, which
/// broadcast it locally as `bus from slot N: TEXT`.
pub fn relay_app(w: &mut wsd::Worker) {
    w.on_connect(|ctx, conn| {
        let id = ctx.global_id(conn).expect("an open connection");
        let _ = ctx.send(conn, format!("id {id}"));
    });
    w.on_message(|ctx, conn, msg| {
        let text = msg.as_text().unwrap_or_default().to_string();
        if let Some(rest) = text.strip_prefix("to ") {
            let (to, body) = rest.split_once(' ').unwrap_or((rest, ""));
            match to.parse::<wsd::GlobalId>() {
                Ok(to) => {
                    let _ = ctx.send_to(to, body.to_string());
                }
                Err(e) => {
                    let _ = ctx.send(conn, format!("error {e}"));
                }
            }
        } else if let Some(body) = text.strip_prefix("all ") {
            let from = ctx.worker_id();
            ctx.bus_send_all(format!("{from}:{body}").into_bytes());
            let _ = ctx.send(conn, "sent");
        }
    });
    w.on_bus_message(|ctx, from, data| {
        let text = String::from_utf8_lossy(&data).to_string();
        ctx.broadcast_local(format!("bus from slot {}: {text}", from.slot));
    });
}

/// Names a file holding a slot: while it exists, a worker of that slot that starts waits in
/// `on_worker_start`, as a new build that is slow to start would (for a minute at most).
pub const HOLD_START_ENV: &str = "WSD_TEST_HOLD_START";

pub fn hold_start_if_marked(slot: usize) {
    let Some(marker) = std::env::var_os(HOLD_START_ENV) else {
        return;
    };
    let held = |m: &std::ffi::OsStr| {
        let text = std::fs::read_to_string(m).ok();
        text.and_then(|t| t.trim().parse::<usize>().ok()) == Some(slot)
    };
    let until = std::time::Instant::now() + Duration::from_secs(60);
    while held(&marker) && std::time::Instant::now() < until {
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Names a file holding N: the worker that adopts its N-th connection deletes the file and
/// aborts, as a new build that crashes on its first clients would.
pub const CRASH_ENV: &str = "WSD_TEST_CRASH_ON_ADOPT";

pub fn crash_if_marked() {
    use std::sync::atomic::AtomicUsize;
    static ADOPTED: AtomicUsize = AtomicUsize::new(0);
    let n = ADOPTED.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
    let Some(marker) = std::env::var_os(CRASH_ENV) else {
        return;
    };
    let at = std::fs::read_to_string(&marker)
        .ok()
        .and_then(|t| t.trim().parse::<usize>().ok());
    if at == Some(n) {
        let _ = std::fs::remove_file(&marker);
        std::process::abort();
    }
}

/// Gives a test's blocking socket 15 s read and write timeouts: a server that stops answering
/// fails the test instead of hanging it.
pub fn with_timeouts(stream: &TcpStream) -> std::io::Result<()> {
    stream.set_read_timeout(Some(Duration::from_secs(15)))?;
    stream.set_write_timeout(Some(Duration::from_secs(15)))
}
