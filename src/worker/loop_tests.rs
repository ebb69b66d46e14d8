//! The event loop driven whole, in a thread of the test process: the test plays the master on
//! the channel (and keeps its own copy of the listening socket, as the master does) and the
//! clients on the listener. For what only the worker can show: how a stop treats each kind of
//! connection, and how stronger stops take over from weaker ones.

use super::Worker;
use crate::bench::wire;
use crate::control::{ConnInfo, ConnStage, FromWorker};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::net::UnixStream;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use tungstenite::{Message, WebSocket};

const UPGRADE_HEAD: &[u8] = b"GET /late HTTP/1.1\r\nHost: h\r\nUpgrade: websocket\r\n";
const UPGRADE_TAIL: &[u8] =
    b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
    Sec-WebSocket-Version: 13\r\n\r\n";

struct Master {
    port: u16,
    channel: UnixStream,
    lines: BufReader<UnixStream>,
    worker: JoinHandle<i32>,
    /// The master's copy of the listening socket: it outlives the worker's.
    _listener: TcpListener,
}

/// Starts an echo worker and waits for its `ready`.
fn start() -> Master {
    start_app(|echo| {
        echo.on_message(|ctx, conn, msg| {
            let _ = ctx.send(conn, msg);
        });
    })
}

/// Starts a worker with the hooks `app` sets and waits for its `ready`.
fn start_app(app: fn(&mut Worker)) -> Master {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let workers_copy = listener.try_clone().unwrap();
    let (channel, workers_end) = UnixStream::pair().unwrap();
    let worker = std::thread::spawn(move || {
        let mut worker = Worker::new("websocket://127.0.0.1:0");
        app(&mut worker);
        super::event_loop::run(
            worker,
            0,
            workers_copy,
            workers_end,
            crate::bus::Bus::detached(),
            None,
            Vec::new(),
        )
    });
    let mut master = Master {
        port,
        lines: BufReader::new(channel.try_clone().unwrap()),
        channel,
        worker,
        _listener: listener,
    };
    assert!(matches!(master.next(), FromWorker::Ready));
    master
}

impl Master {
    fn tell(&mut self, line: &str) {
        self.channel.write_all(line.as_bytes()).unwrap();
        self.channel.write_all(b"\n").unwrap();
    }

    fn next(&mut self) -> FromWorker {
        let mut line = String::new();
        self.lines.read_line(&mut line).unwrap();
        serde_json::from_str(&line).unwrap()
    }

    fn list_connections(&mut self, query: u64) -> Vec<ConnInfo> {
        self.tell(&format!(r#"{{"cmd":"list_connections","query":{query}}}"#));
        let mut rows = Vec::new();
        loop {
            if let FromWorker::Connections {
                query: q,
                conns,
                last,
            } = self.next()
            {
                assert_eq!(q, query);
                rows.extend(conns);
                if last {
                    return rows;
                }
            }
        }
    }

    /// Waits for the worker's loop to return its exit code.
    fn exit_code(self) -> i32 {
        self.worker.join().unwrap()
    }
}

/// A client that has upgraded and had one message echoed.
fn client(port: u16) -> WebSocket<TcpStream> {
    let socket = TcpStream::connect(("127.0.0.1", port)).unwrap();
    socket
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let url = format!("ws://127.0.0.1:{port}/p?x=1");
    let (mut ws, _) = tungstenite::client(url, socket).unwrap();
    ws.send(Message::text("hello")).unwrap();
    assert_eq!(ws.read().unwrap(), Message::text("hello"));
    ws
}

/// Reads up to the server's Close (answering it) and returns its code and when it came.
fn close_code(ws: &mut WebSocket<TcpStream>) -> (u16, Instant) {
    loop {
        if let Message::Close(frame) = ws.read().unwrap() {
            let _ = ws.flush();
            return (frame.map_or(0, |f| f.code.into()), Instant::now());
        }
    }
}

#[test]
fn a_close_stop_spreads_1001_over_the_window_and_lets_handshakes_finish() {
    let mut master = start();
    let mut midway = TcpStream::connect(("127.0.0.1", master.port)).unwrap();
    midway.write_all(UPGRADE_HEAD).unwrap();
    let clients: Vec<_> = (0..10).map(|_| client(master.port)).collect();

    let rows = master.list_connections(5);
    assert_eq!(rows.len(), 11);
    let handshaking: Vec<_> = rows
        .iter()
        .filter(|r| r.state == ConnStage::Handshake)
        .collect();
    assert_eq!(handshaking.len(), 1);
    assert_eq!(handshaking[0].path, "/");
    let open = rows.iter().find(|r| r.state == ConnStage::Open).unwrap();
    assert_eq!(open.path, "/p?x=1");
    assert_eq!((open.messages_in, open.messages_out), (1, 1));
    assert_eq!((open.bytes_in, open.bytes_out, open.send_queue), (5, 5, 0));
    assert!(open.remote.starts_with("127.0.0.1:") && open.id.parse::<u32>().is_ok());

    let stopped_at = Instant::now();
    master.tell(r#"{"cmd":"stop","mode":"close","spread_ms":1000}"#);
    let waiting: Vec<_> = clients
        .into_iter()
        .map(|mut ws| std::thread::spawn(move || close_code(&mut ws)))
        .collect();

    // The client caught mid-handshake is kept (the answer comes after the stop was handled),
    // finishes its upgrade and is then closed like the others.
    let rows = master.list_connections(6);
    assert_eq!(
        rows.iter()
            .filter(|r| r.state == ConnStage::Handshake)
            .count(),
        1
    );
    midway.write_all(UPGRADE_TAIL).unwrap();
    midway
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut got = Vec::new();
    let close_1001 = [0x88, 22, 0x03, 0xe9];
    while !got.windows(4).any(|w| w == close_1001) {
        let mut buf = [0; 512];
        let n = midway.read(&mut buf).unwrap();
        assert!(n > 0, "reset before its Close: {got:?}");
        got.extend_from_slice(&buf[..n]);
    }
    assert!(got.starts_with(b"HTTP/1.1 101 "));
    drop(midway);

    let mut after: Vec<Duration> = waiting
        .into_iter()
        .map(|t| {
            let (code, at) = t.join().unwrap();
            assert_eq!(code, 1001);
            at - stopped_at
        })
        .collect();
    after.sort();
    // Never early: the k-th close is due once k of the 11 (10 + the late one) turns have
    // passed, so its client sees it no sooner.
    for (k, at) in after.iter().enumerate() {
        assert!(*at >= Duration::from_millis(90) * k as u32, "{after:?}");
    }
    assert_eq!(master.exit_code(), 0, "exits once every client is gone");
}

#[test]
fn stronger_stops_take_over_from_weaker_ones() {
    let mut master = start();
    let port = master.port;
    let mut clients: Vec<_> = (0..3).map(|_| client(port)).collect();

    master.tell(r#"{"cmd":"stop","mode":"drain","spread_ms":0}"#);
    // Draining: the listener is no longer served, the clients still are.
    let mut newcomer = TcpStream::connect(("127.0.0.1", port)).unwrap();
    newcomer.write_all(UPGRADE_HEAD).unwrap();
    newcomer.write_all(UPGRADE_TAIL).unwrap();
    newcomer
        .set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    assert!(
        newcomer.read(&mut [0; 64]).is_err(),
        "no answer after the stop"
    );
    clients[0].send(Message::text("still")).unwrap();
    assert_eq!(clients[0].read().unwrap(), Message::text("still"));

    // Close over a minute: the first of three goes at once, the next only after 20 s.
    master.tell(r#"{"cmd":"stop","mode":"close","spread_ms":60000}"#);
    assert_eq!(close_code(&mut clients[0]).0, 1001);
    let open = |rows: Vec<ConnInfo>| rows.iter().filter(|r| r.state == ConnStage::Open).count();
    assert_eq!(open(master.list_connections(1)), 2);

    // A weaker stop changes nothing; a fast one closes the rest and exits without waiting.
    master.tell(r#"{"cmd":"stop","mode":"drain","spread_ms":0}"#);
    assert_eq!(open(master.list_connections(2)), 2);
    let fast_at = Instant::now();
    master.tell(r#"{"cmd":"stop","mode":"fast","spread_ms":0}"#);
    assert_eq!(master.exit_code(), 0);
    assert!(fast_at.elapsed() < Duration::from_secs(5));
    for ws in &mut clients[1..] {
        assert_eq!(close_code(ws).0, 1001);
    }
}

/// Upgrades and sends `frames` in the same write; returns what came after the `101` up to
/// and including the server's Close, and the Close's code.
fn upgrade_and_send(port: u16, frames: &[u8]) -> (Vec<u8>, u16) {
    let mut socket = TcpStream::connect(("127.0.0.1", port)).unwrap();
    socket
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    socket
        .write_all(&[UPGRADE_HEAD, UPGRADE_TAIL, frames].concat())
        .unwrap();
    let mut got = Vec::new();
    loop {
        let mut buf = [0; 512];
        let n = socket.read(&mut buf).unwrap();
        assert!(n > 0, "no Close before EOF: {got:?}");
        got.extend_from_slice(&buf[..n]);
        let Some(head) = wire::check_response(&got).unwrap() else {
            continue;
        };
        let mut at = head;
        while let Some((frame, used)) = wire::next_frame(&got[at..]).unwrap() {
            at += used;
            if frame.opcode == crate::proto::frame::CLOSE {
                let code = u16::from_be_bytes([frame.payload[0], frame.payload[1]]);
                return (got[head..at].to_vec(), code);
            }
        }
    }
}

#[test]
fn a_panicking_on_error_closes_only_its_connection() {
    let mut master = start_app(|w| {
        w.on_message(|ctx, conn, msg| {
            assert_ne!(msg.as_text(), Some("boom"), "the app has a bug");
            let _ = ctx.send(conn, msg);
        });
        w.on_error(|_, _, err| panic!("on_error has a bug too: {err}"));
    });
    let mut bystander = client(master.port);

    // A hook's panic, then the protocol's own failure: each closes its connection with its
    // code, and `on_error`'s panic is not reported to `on_error` again.
    let mut panicker = client(master.port);
    panicker.send(Message::text("boom")).unwrap();
    assert_eq!(close_code(&mut panicker).0, 1011);
    const RSV1: [u8; 6] = [0xc1, 0x80, 0, 0, 0, 0];
    let (_, code) = upgrade_and_send(master.port, &RSV1);
    assert_eq!(code, 1002);
    // Both in one read: the panic closes with 1011, and nothing more reaches the app.
    let mut frames = wire::text_frame(b"boom");
    frames.extend(wire::text_frame(b"after"));
    frames.extend(RSV1);
    let (frames, code) = upgrade_and_send(master.port, &frames);
    assert_eq!(code, 1011);
    assert!(!frames.windows(5).any(|w| w == b"after"), "{frames:?}");

    bystander.send(Message::text("still here")).unwrap();
    assert_eq!(bystander.read().unwrap(), Message::text("still here"));
    master.tell(r#"{"cmd":"stop","mode":"fast","spread_ms":0}"#);
    assert_eq!(master.exit_code(), 0);
}

/// How long a test waits for what a busy machine may delay, and for what it may delay longer.
const SHORT: Duration = Duration::from_secs(10);
const LONG: Duration = Duration::from_secs(30);

/// Polls `done` until it holds; panics with `what` once `within` has passed.
fn wait_until(what: &str, within: Duration, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + within;
    while !done() {
        assert!(Instant::now() < deadline, "{what}");
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// Holds the worker in a hook (on "busy") while `act` has a second client send its last
/// bytes, so the worker finds them and the end of input in one readiness event. Returns the
/// master too: dropping it would stop the worker, which would end every connection anyway.
macro_rules! while_the_worker_is_busy {
    ($act:expr) => {{
        use std::sync::atomic::{AtomicBool, Ordering};
        static BUSY: AtomicBool = AtomicBool::new(false);
        static RELEASE: AtomicBool = AtomicBool::new(false);
        let master = start_app(|w| {
            w.on_message(|ctx, conn, msg| {
                if msg.as_text() == Some("busy") {
                    BUSY.store(true, Ordering::SeqCst);
                    wait_until("the test never released the hook", LONG, || {
                        RELEASE.load(Ordering::SeqCst)
                    });
                }
                let _ = ctx.send(conn, msg);
            });
        });
        let mut busy = client(master.port);
        let mut leaver = client(master.port);
        busy.send(Message::text("busy")).unwrap();
        wait_until("the hook never ran", LONG, || BUSY.load(Ordering::SeqCst));
        $act(&mut leaver);
        RELEASE.store(true, Ordering::SeqCst);
        assert_eq!(busy.read().unwrap(), Message::text("busy"));
        (master, leaver)
    }};
}

#[test]
fn data_and_end_of_input_in_one_event_are_both_read() {
    let (_master, mut leaver) = while_the_worker_is_busy!(|ws: &mut WebSocket<TcpStream>| {
        ws.send(Message::text("bye")).unwrap();
        ws.get_ref().shutdown(std::net::Shutdown::Write).unwrap();
    });
    // The connection ends; it must not stay open with nothing left to wake it. The echo
    // comes first: the client only shut its sending side.
    assert_eq!(leaver.read().unwrap(), Message::text("bye"));
    match leaver.read() {
        Err(tungstenite::Error::Io(e)) => panic!("the worker kept the connection: {e}"),
        other => assert!(other.is_err(), "{other:?}"),
    }
}

#[test]
fn a_close_and_end_of_input_in_one_event_are_answered() {
    let (_master, mut leaver) = while_the_worker_is_busy!(|ws: &mut WebSocket<TcpStream>| {
        ws.send(Message::text("bye")).unwrap();
        ws.close(None).unwrap();
        ws.flush().unwrap();
        ws.get_ref().shutdown(std::net::Shutdown::Write).unwrap();
    });
    // The echo and the answer to the Close still go out: a clean closing handshake.
    assert_eq!(leaver.read().unwrap(), Message::text("bye"));
    loop {
        match leaver.read() {
            Ok(Message::Close(_)) => {}
            Err(tungstenite::Error::ConnectionClosed) => break,
            other => panic!("no clean close: {other:?}"),
        }
    }
}

#[test]
fn a_reset_is_reported_to_on_error_as_a_socket_error() {
    use std::sync::Mutex;
    static ERRORS: Mutex<Vec<String>> = Mutex::new(Vec::new());
    let master = start_app(|w| {
        w.on_message(|ctx, conn, msg| {
            let _ = ctx.send(conn, msg);
        });
        w.on_error(|_, _, err| {
            if matches!(err, super::ConnError::Io(_)) {
                ERRORS.lock().unwrap().push(err.to_string());
            }
        });
    });
    let mut bystander = client(master.port);
    let ws = client(master.port);
    // Linger 0: closing sends a reset instead of a FIN.
    let socket = socket2::SockRef::from(ws.get_ref());
    socket.set_linger(Some(Duration::ZERO)).unwrap();
    drop(ws);

    wait_until("on_error never heard of the reset", SHORT, || {
        !ERRORS.lock().unwrap().is_empty()
    });
    // A round trip of another client ends the turn: a second report would be in by then.
    bystander.send(Message::text("still here")).unwrap();
    assert_eq!(bystander.read().unwrap(), Message::text("still here"));
    let errors = ERRORS.lock().unwrap().clone();
    assert_eq!(errors.len(), 1, "{errors:?}");
    assert!(errors[0].starts_with("socket error: "), "{errors:?}");
}

#[test]
fn a_stop_gives_a_silent_connection_close_timeout_not_handshake_timeout() {
    let mut master = start_app(|w| {
        w.handshake_timeout = Duration::from_secs(3600);
        w.close_timeout = Duration::from_secs(1);
    });
    let mut silent = TcpStream::connect(("127.0.0.1", master.port)).unwrap();
    // Accepted before the stop: wait until the worker lists it.
    let mut query = 0;
    wait_until("never accepted", SHORT, || {
        query += 1;
        master.list_connections(query).len() == 1
    });
    master.tell(r#"{"cmd":"stop","mode":"close","spread_ms":0}"#);
    silent
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    match silent.read(&mut [0; 64]) {
        Ok(0) => {}
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
        other => panic!("the silent connection was kept through the stop: {other:?}"),
    }
    assert_eq!(master.exit_code(), 0);
}

#[test]
fn a_listen_queue_longer_than_one_accept_batch_is_all_answered() {
    // Connected while the worker is held in a hook, these clients wait in the listen queue
    // together and the edge-triggered listener signals them once: the worker must come back
    // for the ones past its first batch without another client arriving.
    let count = super::event_loop::ACCEPT_BATCH * 3 / 2;
    let mut queued = Vec::new();
    let (_master, _leaver) = while_the_worker_is_busy!(|leaver: &mut WebSocket<TcpStream>| {
        let port = leaver.get_ref().peer_addr().unwrap().port();
        for _ in 0..count {
            let mut socket = TcpStream::connect(("127.0.0.1", port)).unwrap();
            socket
                .write_all(&[UPGRADE_HEAD, UPGRADE_TAIL].concat())
                .unwrap();
            queued.push(socket);
        }
    });
    for (n, socket) in queued.iter_mut().enumerate() {
        socket.set_read_timeout(Some(LONG)).unwrap();
        let mut got = Vec::new();
        while wire::check_response(&got).unwrap().is_none() {
            let mut buf = [0; 512];
            let read = socket.read(&mut buf);
            let read = read.unwrap_or_else(|e| panic!("client {n} of {count}: no 101: {e}"));
            assert!(read > 0, "client {n} of {count}: closed before its 101");
            got.extend_from_slice(&buf[..read]);
        }
    }
}

/// A handoff whose closing record and end of line are read together is reported taken once:
/// a second `Taken` would end the master's wait on the next handoff to this worker before it
/// had taken anything, and the group's hold with it.
#[test]
fn a_handoff_is_reported_taken_once() {
    use crate::bus::bridges::Peer;
    use crate::control::ToWorker;
    use crate::handoff::line::Line;
    use std::os::fd::{AsRawFd, OwnedFd};

    let mut master = start();
    let (giver, taker) = UnixStream::pair().unwrap();
    let mut line = Line::new(OwnedFd::from(giver)).unwrap();
    line.push(&[], None);
    assert!(line.flush().unwrap(), "an empty record fits the socket");
    drop(line);
    let from = Peer {
        group: "g".into(),
        slot: 1,
        pid: 1,
    };
    let adopt = crate::control::line(&ToWorker::Adopt {
        from: Some(from),
        returnable: false,
        protocol: crate::handoff::line::PROTOCOL,
    });
    let sent = crate::sys::send_with_fd(master.channel.as_raw_fd(), &adopt, taker.as_raw_fd());
    assert_eq!(sent.unwrap(), adopt.len());
    drop(taker);
    while !matches!(master.next(), FromWorker::Taken) {}
    master.tell(r#"{"cmd":"list_connections","query":1}"#);
    loop {
        match master.next() {
            FromWorker::Connections { .. } => break,
            FromWorker::Taken => panic!("a second Taken for one handoff"),
            _ => {}
        }
    }
    master.tell(r#"{"cmd":"stop","mode":"close","spread_ms":0}"#);
    assert_eq!(master.exit_code(), 0);
}
