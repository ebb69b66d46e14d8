//! Hostile and broken clients against the real `wsd` binary: slowloris handshakes, oversized
//! frames, clients that never answer pings, random bytes, a full worker, and wrong HTTP
//! requests. Each test starts its own server (killed on drop, pass or fail) and bounds every
//! wait; time only passes on purpose where the behaviour under test is about time.
//!
//! Tests that need hooks of their own (slow readers, `ctx.remote_addr`) are in
//! tests/abuse_hooks.rs.

mod common;

use common::*;
use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::{Duration, Instant};

/// `ErrorKind`s a read with a timeout gives when nothing arrived.
fn timed_out(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
    )
}

/// A good client still gets its messages echoed.
fn echoes(server: &Server, what: &str) {
    let mut c = server.connect();
    c.send_text(what);
    assert_eq!(c.recv_text(), what);
}

#[test]
fn slowloris_handshakes_are_dropped_while_good_clients_are_served() {
    const STALLED: usize = 500;
    const GOOD: usize = 50;
    const HANDSHAKE: Duration = Duration::from_secs(2);
    raise_fd_limit(2048);
    let mut server = Server::start_extra(
        "echo",
        2,
        "handshake_timeout = 2\nmax_connections_per_ip = 0",
    );
    let pids = server.worker_pids();
    let fds_before: usize = pids.iter().map(|&p| fd_count(p)).sum();

    // Half an upgrade request each (every fifth sends nothing at all), then silence.
    let half =
        b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n";
    let mut stalled: Vec<(TcpStream, Instant)> = (0..STALLED)
        .map(|i| {
            let mut s = TcpStream::connect(("127.0.0.1", server.port)).expect("connect");
            if i % 5 != 0 {
                s.write_all(half).unwrap();
            }
            (s, Instant::now())
        })
        .collect();
    let last_stalled = Instant::now();

    // Meanwhile, well-behaved clients connect and are served.
    let mut good: Vec<Client> = (0..GOOD).map(|_| server.connect()).collect();
    for (i, c) in good.iter_mut().enumerate() {
        c.send_text(&format!("good {i}"));
    }
    for (i, c) in good.iter_mut().enumerate() {
        assert_eq!(c.recv_text(), format!("good {i}"));
    }
    // Nobody is dropped early: before the timeout can have run out for the last stalled
    // connection, it is still open (checked only if this machine got here in time).
    if last_stalled.elapsed() < HANDSHAKE - Duration::from_millis(500) {
        let (s, _) = stalled.last_mut().unwrap();
        s.set_nonblocking(true).unwrap();
        let mut b = [0u8; 1];
        match s.read(&mut b) {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            other => panic!(
                "a stalled handshake ended after only {:?}: {other:?}",
                last_stalled.elapsed()
            ),
        }
        s.set_nonblocking(false).unwrap();
    }

    // Every stalled connection is closed by the server, without an answer, within the
    // timeout (swept once a second) plus a generous margin.
    let deadline = last_stalled + HANDSHAKE + Duration::from_secs(10);
    for (i, (s, connected)) in stalled.iter_mut().enumerate() {
        let left = deadline.saturating_duration_since(Instant::now());
        s.set_read_timeout(Some(left.max(Duration::from_millis(10))))
            .unwrap();
        let mut b = [0u8; 256];
        match s.read(&mut b) {
            Ok(0) => {}
            Err(e) if !timed_out(&e) => {} // reset: closed too
            Ok(n) => panic!(
                "stalled connection {i} got an answer: {:?}",
                String::from_utf8_lossy(&b[..n])
            ),
            Err(_) => panic!(
                "stalled connection {i} still open {:?} after it connected",
                connected.elapsed()
            ),
        }
        assert!(
            connected.elapsed() >= HANDSHAKE - Duration::from_millis(100),
            "stalled connection {i} closed after only {:?}",
            connected.elapsed()
        );
    }
    drop(stalled);

    // The good clients were never affected, and only they count as connections.
    for (i, c) in good.iter_mut().enumerate() {
        c.send_text(&format!("still good {i}"));
        assert_eq!(c.recv_text(), format!("still good {i}"));
    }
    wait_for("status to count only the good clients", DEADLINE, || {
        let st = server.try_status()?;
        (workers_sum(&st, "connections") == GOOD as u64
            && workers_sum(&st, "accepted") >= (STALLED + GOOD) as u64)
            .then_some(())
    });
    wait_for(
        "the workers to hold no descriptor for a stalled connection",
        DEADLINE,
        || {
            let fds: usize = pids.iter().map(|&p| fd_count(p)).sum();
            (fds <= fds_before + GOOD + 4).then_some(())
        },
    );
    drop(good);
    wait_for("status to count 0 connections", DEADLINE, || {
        let st = server.try_status()?;
        (workers_sum(&st, "connections") == 0).then_some(())
    });
    wait_for("the workers' descriptors to be back", DEADLINE, || {
        let fds: usize = pids.iter().map(|&p| fd_count(p)).sum();
        (fds <= fds_before + 4).then_some(())
    });
    assert_eq!(server.worker_pids(), pids, "no worker died");
}

/// Writes `head` and then each of `body` to `stream` from a thread; stops early when the
/// server ends the connection or `stop` is set. Returns the bytes written and the error that
/// stopped it, if any.
fn write_in_background(
    stream: &TcpStream,
    head: Vec<u8>,
    body: Vec<Arc<[u8]>>,
    stop: Arc<AtomicBool>,
) -> thread::JoinHandle<(u64, Option<io::ErrorKind>)> {
    let mut w = stream.try_clone().unwrap();
    // A server that stops reading (back-pressure) shows up as a write that times out.
    w.set_write_timeout(Some(Duration::from_secs(3))).unwrap();
    thread::spawn(move || {
        let mut sent = 0u64;
        for buf in std::iter::once(&head[..]).chain(body.iter().map(|b| &b[..])) {
            let mut at = 0;
            while at < buf.len() {
                if stop.load(Ordering::Relaxed) {
                    return (sent, None);
                }
                let end = (at + (256 << 10)).min(buf.len());
                match w.write(&buf[at..end]) {
                    Ok(n) => {
                        at += n;
                        sent += n as u64;
                    }
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => return (sent, Some(e.kind())),
                }
            }
        }
        (sent, None)
    })
}

/// The worker's peak RSS stayed within `margin` of `before`, and the same worker still serves.
fn assert_unharmed(server: &mut Server, pid: i32, before: u64, margin: u64, what: &str) {
    let peak = proc_status_bytes(pid, "VmHWM");
    eprintln!("{what}: RSS before {before}, peak {peak}");
    assert!(peak < before + margin, "{what}: RSS {before} -> {peak}");
    assert_eq!(server.worker_pid(0), pid, "{what}: the same worker");
    echoes(server, "still fine");
}

/// The worker's RSS as the master last heard it, from a report made after now: a fresh
/// client is accepted, and status must count it.
fn fresh_reported_memory(server: &mut Server) -> u64 {
    let accepted = workers_sum(&server.status(), "accepted");
    echoes(server, "report please");
    wait_for("a report after the fresh client", DEADLINE, || {
        let st = server.try_status()?;
        (workers_sum(&st, "accepted") > accepted).then(|| workers_sum(&st, "memory"))
    })
}

/// 1 MiB messages and frames, and time for the client to hear the 1009.
const ONE_MIB_LIMITS: &str =
    "max_message_size = \"1MiB\"\nmax_frame_size = \"1MiB\"\nclose_timeout = 30";

#[test]
fn a_64_mib_frame_into_a_1_mib_limit_closes_1009_without_buffering_it() {
    const CLAIMED: u64 = 64 << 20;
    let mut server = Server::start_extra("echo", 1, ONE_MIB_LIMITS);
    let pid = server.worker_pid(0);
    let reported_before = fresh_reported_memory(&mut server);
    let rss_before = proc_status_bytes(pid, "VmRSS");
    assert!(reported_before > 0 && rss_before > 0);

    let mut raw = RawClient::upgrade(server.port);
    // A binary frame that claims 64 MiB, and then that much payload, as fast as it goes.
    let chunk: Arc<[u8]> = vec![0u8; 1 << 20].into();
    let body = vec![chunk; (CLAIMED >> 20) as usize];
    let writer = write_in_background(
        &raw.stream,
        masked_header(true, 0x2, CLAIMED),
        body,
        Arc::new(AtomicBool::new(false)),
    );
    let (_, op, payload) = raw
        .try_read_frame()
        .expect("a close frame, not a dropped connection");
    assert_eq!(
        (op, close_code(&payload)),
        (0x8, 1009),
        "{:?}",
        String::from_utf8_lossy(&payload)
    );
    // Our side is shut down at once (FIN), long before close_timeout.
    let (rest, closed) = read_to_end_within(&mut raw.stream, Duration::from_secs(10));
    assert!(closed && rest.is_empty(), "then EOF: {rest:?}");
    // The server reads and discards what we keep sending; our writes may also fail once it
    // drops us. Either way the writer ends.
    let (sent, err) = writer.join().unwrap();
    assert!(
        sent > 0 && (sent >= CLAIMED || err.is_some()),
        "{sent} {err:?}"
    );

    // Memory stayed bounded: nowhere near the 64 MiB the frame claimed.
    let peak = proc_status_bytes(pid, "VmHWM");
    let reported_after = fresh_reported_memory(&mut server);
    eprintln!(
        "wrote {sent} bytes ({err:?}); RSS before {rss_before}, peak {peak}; \
         status memory before {reported_before}, after {reported_after}"
    );
    assert!(
        peak < rss_before + (16 << 20) && peak < 64 << 20,
        "peak RSS {peak} (was {rss_before})"
    );
    assert!(
        reported_after < reported_before + (16 << 20) && reported_after < 64 << 20,
        "status memory {reported_after} (was {reported_before})"
    );
    assert_eq!(server.worker_pid(0), pid);
    echoes(&server, "still fine");
}

#[test]
fn fragments_adding_up_past_max_message_size_close_1009() {
    const FRAGMENT: usize = 900 << 10;
    let mut server = Server::start_extra("echo", 1, ONE_MIB_LIMITS);
    let pid = server.worker_pid(0);
    let rss_before = proc_status_bytes(pid, "VmRSS");
    let mut raw = RawClient::upgrade(server.port);
    // Each fragment is within max_frame_size; the second already takes the message past
    // max_message_size. Twenty more follow (18 MiB in all).
    let payload = vec![b'x'; FRAGMENT];
    let first = masked_frame(false, 0x2, &payload);
    let more: Arc<[u8]> = masked_frame(false, 0x0, &payload).into();
    let stop = Arc::new(AtomicBool::new(false));
    let writer = write_in_background(&raw.stream, first, vec![more; 20], stop.clone());
    let (_, op, payload) = raw.try_read_frame().expect("a close frame");
    assert_eq!((op, close_code(&payload)), (0x8, 1009));
    let (rest, closed) = read_to_end_within(&mut raw.stream, Duration::from_secs(10));
    assert!(closed && rest.is_empty(), "then EOF: {rest:?}");
    stop.store(true, Ordering::Relaxed);
    writer.join().unwrap();
    assert_unharmed(
        &mut server,
        pid,
        rss_before,
        16 << 20,
        "fragments past the limit",
    );
}

#[test]
fn a_client_ignoring_pings_is_closed_1001_and_one_answering_them_stays() {
    const IDLE: Duration = Duration::from_secs(3);
    const CLOSE: Duration = Duration::from_secs(2);
    let server = Server::start_extra(
        "echo",
        1,
        "ping_interval = 1\nidle_timeout = 3\nclose_timeout = 2",
    );

    // This client answers pings (tungstenite queues the Pong and writes it on the next read)
    // but sends no data. Pongs are input, so it is never idle.
    let mut answering = server.connect();
    answering
        .ws
        .get_mut()
        .set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let answering = thread::spawn(move || {
        let start = Instant::now();
        let mut pings = 0;
        while start.elapsed() < IDLE + Duration::from_secs(3) {
            match answering.read() {
                Ok(tungstenite::Message::Ping(p)) => {
                    assert!(p.is_empty(), "keepalive pings are empty");
                    pings += 1;
                }
                Ok(other) => panic!("the answering client got {other:?}"),
                Err(tungstenite::Error::Io(e)) if timed_out(&e) => {}
                Err(e) => panic!(
                    "the answering client was dropped after {:?}: {e}",
                    start.elapsed()
                ),
            }
        }
        answering
            .ws
            .get_mut()
            .set_read_timeout(Some(Duration::from_secs(15)))
            .unwrap();
        answering.send_text("still here");
        assert_eq!(answering.recv_text(), "still here");
        pings
    });

    // This one reads but never answers.
    let mut raw = RawClient::upgrade(server.port);
    let upgraded = Instant::now();
    let mut pings = 0;
    let close = loop {
        let (fin, op, payload) = raw
            .try_read_frame()
            .expect("pings, then a close frame, before the connection ends");
        assert!(fin);
        match op {
            0x9 => {
                assert!(payload.is_empty(), "keepalive pings are empty");
                pings += 1;
            }
            0x8 => break payload,
            other => panic!("unexpected opcode {other:#x}"),
        }
    };
    let waited = upgraded.elapsed();
    eprintln!("{pings} pings, then closed after {waited:?}");
    assert!(pings >= 1, "at least one Ping before the close");
    assert_eq!(close_code(&close), 1001);
    assert_eq!(&close[2..], b"idle timeout");
    assert!(
        waited >= IDLE - Duration::from_secs(1) && waited <= IDLE + Duration::from_secs(5),
        "closed after {waited:?}"
    );
    // It does not answer the Close either: the server drops it after close_timeout.
    let close_sent = Instant::now();
    let (rest, ended) = read_to_end_within(&mut raw.stream, CLOSE + Duration::from_secs(8));
    let lingered = close_sent.elapsed();
    assert!(
        ended && rest.is_empty(),
        "dropped, nothing more sent: {rest:?}"
    );
    assert!(
        lingered >= CLOSE - Duration::from_secs(1),
        "dropped {lingered:?} after the Close, before close_timeout"
    );

    let pings = answering.join().expect("the answering client stayed open");
    assert!(pings >= 1, "the answering client was pinged");
}

#[test]
fn random_bytes_instead_of_a_handshake_get_400_or_a_close() {
    let mut server = Server::start_extra("echo", 1, "handshake_timeout = 3\nclose_timeout = 30");
    let pid = server.worker_pid(0);
    for seed in 1..=8u64 {
        // Even seeds start like a real request, so the junk lands in the headers.
        let mut junk = XorShift::new(seed).bytes(4096);
        if seed % 2 == 0 {
            junk.splice(
                0..0,
                b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n".iter().copied(),
            );
        }
        let ans = http_exchange(server.port, &junk, Duration::from_secs(15));
        assert!(
            ans.closed,
            "seed {seed}: the connection stays open: {ans:?}"
        );
        assert!(
            matches!(ans.status, 0 | 400 | 431),
            "seed {seed}: {:?}",
            ans.head
        );
        eprintln!("seed {seed}: status {}", ans.status);
        if ans.status == 0 {
            assert!(ans.head.is_empty(), "seed {seed}: {:?}", ans.head);
        }
    }
    assert_eq!(server.worker_pid(0), pid, "the worker survived");
    echoes(&server, "after the junk");
}

#[test]
fn random_bytes_after_the_handshake_close_the_connection_only() {
    let mut server = Server::start_extra("echo", 1, "close_timeout = 30");
    let pid = server.worker_pid(0);
    let mut good = server.connect();
    let mut codes = Vec::new();
    // Odd seeds: plain junk (mostly reserved bits set). Even seeds: the first header is made
    // plausible so the decoder gets further: a text frame of junk (bad UTF-8), a binary frame
    // with a huge 64-bit length, or any opcode without reserved bits.
    for seed in 1..=12u64 {
        let mut raw = RawClient::upgrade(server.port);
        let mut rng = XorShift::new(seed);
        // Up to 8 MiB of junk: a frame the junk happens to make valid just leads to the next.
        let mut body: Vec<Arc<[u8]>> = Vec::new();
        for i in 0..128 {
            let mut chunk = rng.bytes(64 << 10);
            if i == 0 {
                match seed % 6 {
                    2 => chunk[..2].copy_from_slice(&[0x81, 0x80 | 125]),
                    4 => {
                        chunk[..2].copy_from_slice(&[0x82, 0x80 | 127]);
                        chunk[2] &= 0x7f;
                        chunk[2] |= 0x01;
                    }
                    0 => {
                        chunk[0] &= 0x8f;
                        chunk[1] |= 0x80;
                    }
                    _ => {}
                }
            }
            body.push(chunk.into());
        }
        let stop = Arc::new(AtomicBool::new(false));
        let writer = write_in_background(&raw.stream, Vec::new(), body, stop.clone());
        let code = loop {
            match raw.try_read_frame() {
                Ok((_, 0x8, payload)) => break Some(close_code(&payload)),
                Ok(_) => {} // an echo or a Pong for junk that formed a valid frame
                Err(e) if timed_out(&e) => panic!("seed {seed}: the connection stays open"),
                Err(_) => break None, // closed without a close frame
            }
        };
        if code.is_some() {
            let (_, closed) = read_to_end_within(&mut raw.stream, Duration::from_secs(10));
            assert!(closed, "seed {seed}: no EOF after the close frame");
        }
        stop.store(true, Ordering::Relaxed);
        writer.join().unwrap();
        assert!(
            matches!(code, None | Some(1002 | 1007 | 1009)),
            "seed {seed}: close code {code:?}"
        );
        codes.push(code);
        good.send_text(&format!("after seed {seed}"));
        assert_eq!(good.recv_text(), format!("after seed {seed}"));
    }
    eprintln!("close codes for the seeds: {codes:?}");
    for code in [1002, 1007, 1009] {
        assert!(
            codes.contains(&Some(code)),
            "some junk is answered with {code}: {codes:?}"
        );
    }
    assert_eq!(server.worker_pid(0), pid, "the worker survived");
    echoes(&server, "after the junk");
    wait_for("only the good client to remain", DEADLINE, || {
        let st = server.try_status()?;
        (workers_sum(&st, "connections") == 1).then_some(())
    });
}

#[test]
fn at_max_connections_the_next_client_waits_until_a_slot_frees() {
    let mut server = Server::start_extra("echo", 1, "max_connections = 5");
    let mut clients: Vec<Client> = (0..5).map(|_| server.connect()).collect();
    for (i, c) in clients.iter_mut().enumerate() {
        c.send_text(&format!("client {i}"));
        assert_eq!(c.recv_text(), format!("client {i}"));
    }
    // The sixth gets through TCP (the kernel's backlog) but nobody answers its upgrade.
    let mut sixth = TcpStream::connect(("127.0.0.1", server.port)).expect("connect");
    sixth
        .write_all(upgrade_request("").as_bytes())
        .expect("send upgrade request");
    sixth
        .set_read_timeout(Some(Duration::from_millis(1500)))
        .unwrap();
    let mut b = [0u8; 64];
    match sixth.read(&mut b) {
        Err(e) if timed_out(&e) => {}
        other => panic!("the sixth client was answered at the cap: {other:?}"),
    }
    let st = server.status();
    assert_eq!(workers_sum(&st, "connections"), 5, "{st}");

    // Two leave: the waiting client is accepted, upgraded, and served.
    clients.truncate(3);
    sixth
        .set_read_timeout(Some(Duration::from_secs(15)))
        .unwrap();
    let mut sixth = RawClient::finish_upgrade(sixth)
        .unwrap_or_else(|ans| panic!("the waiting client was refused: {ans:?}"));
    sixth.frame(true, 0x1, b"finally");
    assert_eq!(sixth.read_frame(), (true, 0x1, b"finally".to_vec()));
    // A new client takes the last slot.
    let mut fifth = server.connect();
    fifth.send_text("me too");
    assert_eq!(fifth.recv_text(), "me too");
    for c in &mut clients {
        c.send_text("still");
        assert_eq!(c.recv_text(), "still");
    }
    wait_for("status to count 5 connections", DEADLINE, || {
        let st = server.try_status()?;
        (workers_sum(&st, "connections") == 5).then_some(())
    });
}

/// Checks an HTTP error answer: its status, one line of body, and the connection closed.
fn assert_refused(ans: &HttpAnswer, status: u16) {
    assert_eq!(ans.status, status, "{ans:?}");
    assert!(ans.closed, "the server closes after the answer: {ans:?}");
    assert!(
        ans.body.ends_with('\n') && ans.body.trim_end().lines().count() == 1,
        "one line of body: {:?}",
        ans.body
    );
    assert_eq!(
        ans.header("Content-Length")
            .and_then(|v| v.parse::<usize>().ok()),
        Some(ans.body.len()),
        "{ans:?}"
    );
}

/// Within this a refused client must see EOF: the server half-closes right after its answer
/// (`close_timeout` is set far longer, so waiting for it would fail).
const ANSWER_AND_CLOSE: Duration = Duration::from_secs(10);

#[test]
fn wrong_http_requests_get_the_right_status_and_are_closed() {
    let mut server = Server::start_extra("echo", 1, "max_header_bytes = 1024\nclose_timeout = 60");
    let pid = server.worker_pid(0);
    let port = server.port;

    let plain = http_exchange(
        port,
        b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n",
        ANSWER_AND_CLOSE,
    );
    assert_refused(&plain, 426);
    assert!(plain.head.starts_with("HTTP/1.1 426 Upgrade Required\r\n"));

    let v8 = upgrade_request("").replace("Sec-WebSocket-Version: 13", "Sec-WebSocket-Version: 8");
    let v8 = http_exchange(port, v8.as_bytes(), ANSWER_AND_CLOSE);
    assert_refused(&v8, 426);
    assert_eq!(v8.header("Sec-WebSocket-Version"), Some("13"), "{v8:?}");

    let post = upgrade_request("").replacen("GET", "POST", 1);
    assert_refused(&http_exchange(port, post.as_bytes(), ANSWER_AND_CLOSE), 405);

    let huge = upgrade_request(&format!("X-Padding: {}\r\n", "a".repeat(2048)));
    assert_refused(&http_exchange(port, huge.as_bytes(), ANSWER_AND_CLOSE), 431);

    // A TLS ClientHello-ish start, and a request line that is not HTTP.
    for garbage in [
        &b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03garbage\r\n\r\n"[..],
        b"HELLO THERE\r\n\r\n",
    ] {
        assert_refused(&http_exchange(port, garbage, ANSWER_AND_CLOSE), 400);
    }

    // A request just under the header limit still upgrades.
    let mut ok = RawClient::try_upgrade(port, &format!("X-Padding: {}\r\n", "a".repeat(700)))
        .expect("a request under max_header_bytes upgrades");
    ok.frame(true, 0x1, b"fits");
    assert_eq!(ok.read_frame(), (true, 0x1, b"fits".to_vec()));

    assert_eq!(server.worker_pid(0), pid);
    echoes(&server, "after the bad requests");
}

#[test]
fn only_allowed_origins_upgrade() {
    let server = Server::start_extra(
        "echo",
        1,
        "allowed_origins = [\"https://good.example\"]\nclose_timeout = 60",
    );
    let port = server.port;
    let evil = RawClient::try_upgrade(port, "Origin: https://evil.example\r\n")
        .err()
        .expect("a foreign origin is refused");
    assert_refused(&evil, 403);

    for origin in ["Origin: https://good.example\r\n", ""] {
        let mut c = RawClient::try_upgrade(port, origin)
            .unwrap_or_else(|ans| panic!("{origin:?} was refused: {ans:?}"));
        c.frame(true, 0x1, b"welcome");
        assert_eq!(
            c.read_frame(),
            (true, 0x1, b"welcome".to_vec()),
            "{origin:?}"
        );
    }
}

#[test]
fn trickled_handshakes_are_cut_at_handshake_timeout_though_bytes_keep_coming() {
    const TRICKLERS: usize = 20;
    const HANDSHAKE: Duration = Duration::from_secs(2);
    let server = Server::start_extra(
        "echo",
        1,
        "handshake_timeout = 2\nmax_connections_per_ip = 0",
    );
    // One byte of a (valid) upgrade request every 100 ms each: it would take ~15 s to finish.
    let request = upgrade_request("");
    let request = request.as_bytes();
    let mut tricklers: Vec<(TcpStream, Instant, Option<Duration>)> = (0..TRICKLERS)
        .map(|_| {
            let s = TcpStream::connect(("127.0.0.1", server.port)).expect("connect");
            s.set_nonblocking(true).unwrap();
            (s, Instant::now(), None)
        })
        .collect();
    let deadline = Instant::now() + HANDSHAKE + Duration::from_secs(10);
    let mut at = 0;
    while tricklers.iter().any(|t| t.2.is_none()) {
        assert!(
            Instant::now() < deadline,
            "trickling clients still connected after {:?}",
            deadline - HANDSHAKE - Duration::from_secs(10)
        );
        assert!(at < request.len(), "a trickled request was completed");
        for (s, connected, closed) in tricklers.iter_mut().filter(|t| t.2.is_none()) {
            let mut b = [0u8; 256];
            match s.read(&mut b) {
                Ok(0) => *closed = Some(connected.elapsed()),
                Ok(n) => panic!(
                    "a trickling client got an answer: {:?}",
                    String::from_utf8_lossy(&b[..n])
                ),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    if s.write(&request[at..at + 1]).is_err() {
                        *closed = Some(connected.elapsed());
                    }
                }
                Err(_) => *closed = Some(connected.elapsed()),
            }
        }
        at += 1;
        thread::sleep(Duration::from_millis(100));
    }
    for (_, _, closed) in &tricklers {
        let closed = closed.unwrap();
        assert!(
            closed >= HANDSHAKE - Duration::from_millis(100),
            "cut after only {closed:?}"
        );
    }
    echoes(&server, "after the tricklers");
}

#[test]
fn an_echo_flood_from_a_client_that_never_reads_is_held_to_max_send_buffer() {
    const FLOOD: usize = 64 << 20;
    let mut server = Server::start_extra("echo", 1, "max_send_buffer = \"1MiB\"");
    let pid = server.worker_pid(0);
    let rss_before = proc_status_bytes(pid, "VmRSS");
    let raw = RawClient::upgrade(server.port);
    // 4 KiB binary messages, each echoed, none read.
    let message = masked_frame(true, 0x2, &[7u8; 4096]);
    let chunk: Arc<[u8]> = message.repeat((1 << 20) / message.len()).into();
    let writer = write_in_background(
        &raw.stream,
        Vec::new(),
        vec![chunk; FLOOD >> 20],
        Arc::new(AtomicBool::new(false)),
    );
    let (sent, err) = writer.join().unwrap();
    eprintln!("sent {sent} bytes ({err:?})");
    // The worker stops reading a client whose replies pile up, so TCP flow control stops
    // the flood long before 64 MiB: the writer's send times out.
    assert!(sent > 0 && sent < FLOOD as u64, "{sent} {err:?}");
    assert!(
        matches!(
            err,
            Some(io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut)
        ),
        "{err:?}"
    );
    assert_unharmed(
        &mut server,
        pid,
        rss_before,
        16 << 20,
        "an echo flood, never read",
    );
}

/// Pongs for a client that never reads pile up like any reply: the worker stops reading it
/// once its queue is past the high-water mark (found by this test: they once grew without
/// limit).
#[test]
fn a_ping_flood_from_a_client_that_never_reads_keeps_memory_bounded() {
    const FLOOD: usize = 96 << 20;
    let mut server = Server::start_extra("echo", 1, "close_timeout = 30");
    let pid = server.worker_pid(0);
    let rss_before = proc_status_bytes(pid, "VmRSS");
    let raw = RawClient::upgrade(server.port);
    // Pings with the largest payload a control frame may carry, as fast as they go; the
    // client never reads a Pong.
    let ping = masked_frame(true, 0x9, &[b'p'; 125]);
    let chunk: Arc<[u8]> = ping.repeat((1 << 20) / ping.len()).into();
    let body = vec![chunk; FLOOD >> 20];
    let writer = write_in_background(
        &raw.stream,
        Vec::new(),
        body,
        Arc::new(AtomicBool::new(false)),
    );
    let (sent, err) = writer.join().unwrap();
    eprintln!("sent {sent} bytes of pings ({err:?})");
    assert_unharmed(
        &mut server,
        pid,
        rss_before,
        32 << 20,
        "Pongs for a client that reads none",
    );
}
