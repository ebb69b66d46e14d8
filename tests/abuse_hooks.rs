//! Hostile clients against hooks of our own: a client that never reads while the app pushes to
//! it (send buffer limits, `on_buffer_full` / `on_buffer_drain`), and forged client addresses
//! (`trusted_proxies`, `ctx.remote_addr`, `max_connections_per_ip`).
//!
//! Like tests/library.rs this binary is itself a wsd program: run with `WSD_LIBRARY_SERVER=1`
//! it is the server (app `abuse`, configured by the test's workers.toml); otherwise it is the
//! test driver. `harness = false` because a forking master must be its process's main thread.

mod common;

use common::*;
use serde_json::{Value, json};
use std::cell::{Cell, RefCell};
use std::io::Write;
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// Size of each message the flood pushes: small next to `max_send_buffer`.
const CHUNK: usize = 64 << 10;
/// `max_send_buffer` of the flood tests.
const LIMIT: usize = 1 << 20;

/// What the app saw of the flood, reported to "stats".
#[derive(Default)]
struct Flood {
    /// Largest `ctx.buffered_amount` seen after a send or in `on_buffer_full`.
    max_buffered: usize,
    full: u64,
    drain: u64,
    /// Sends queued / refused with `BufferFull`.
    sent: u64,
    refused: u64,
    /// Why the flood stopped (a send failed otherwise than `BufferFull`).
    ended: Option<String>,
}

/// The app under test:
/// * "flood": push CHUNK-byte binary messages to this connection every millisecond until a
///   send fails for another reason than a full buffer;
/// * "stats": the flood's numbers as JSON;
/// * "whoami": `ctx.remote_addr` as "IP PORT";
/// * anything else is echoed.
fn abuse_app(worker: &mut wsd::Worker) {
    let stats: Rc<RefCell<Flood>> = Rc::default();
    let chunk = wsd::Bytes::from(vec![0x5a; CHUNK]);
    let s = stats.clone();
    worker.on_message(move |ctx, conn, msg| match msg.as_text() {
        Some("flood") => {
            let me: Rc<Cell<Option<wsd::TimerId>>> = Rc::default();
            let (mine, s, chunk) = (me.clone(), s.clone(), chunk.clone());
            let id = ctx.add_timer(Duration::from_millis(1), move |ctx| {
                let sent = ctx.send(conn, chunk.clone());
                let mut st = s.borrow_mut();
                match sent {
                    Ok(()) => st.sent += 1,
                    Err(wsd::SendError::BufferFull) => st.refused += 1,
                    Err(e) => {
                        st.ended = Some(e.to_string());
                        if let Some(id) = mine.take() {
                            ctx.del_timer(id);
                        }
                        return;
                    }
                }
                if let Some(b) = ctx.buffered_amount(conn) {
                    st.max_buffered = st.max_buffered.max(b);
                }
            });
            me.set(Some(id));
        }
        Some("stats") => {
            let st = s.borrow();
            let report = json!({
                "max_buffered": st.max_buffered,
                "full": st.full,
                "drain": st.drain,
                "sent": st.sent,
                "refused": st.refused,
                "ended": st.ended,
            });
            let _ = ctx.send(conn, report.to_string());
        }
        Some("whoami") => {
            let addr = ctx
                .remote_addr(conn)
                .expect("an open connection has an address");
            let _ = ctx.send(conn, format!("{} {}", addr.ip(), addr.port()));
        }
        _ => {
            let _ = ctx.send(conn, msg);
        }
    });
    let s = stats.clone();
    worker.on_buffer_full(move |ctx, conn| {
        let mut st = s.borrow_mut();
        st.full += 1;
        if let Some(b) = ctx.buffered_amount(conn) {
            st.max_buffered = st.max_buffered.max(b);
        }
    });
    worker.on_buffer_drain(move |_ctx, _conn| stats.borrow_mut().drain += 1);
}

fn server_program() -> ! {
    wsd::Runner::new().app("abuse", abuse_app).run()
}

/// One worker of the `abuse` app (so every client meets the same state), plus `extra`.
fn start(extra: &str) -> Server {
    Server::start_program(std::env::current_exe().unwrap(), "abuse", 1, extra)
}

/// Asks for the flood's numbers; also returns how long the answer took.
fn stats(b: &mut Client) -> (Value, Duration) {
    let t = Instant::now();
    b.send_text("stats");
    let v = serde_json::from_str(&b.recv_text()).expect("stats JSON");
    (v, t.elapsed())
}

fn num(v: &Value, key: &str) -> u64 {
    v[key].as_u64().unwrap_or_else(|| panic!("no {key} in {v}"))
}

/// The most an echo may take while another client is flooded (a busy 2-core box included);
/// a server that blocked on the slow reader would take until a deadline.
const PROMPT: Duration = Duration::from_secs(2);

/// Client B echoes a few messages and returns the slowest round trip.
fn slowest_echo(b: &mut Client, n: usize) -> Duration {
    (0..n)
        .map(|i| {
            let t = Instant::now();
            b.send_text(&format!("echo {i}"));
            assert_eq!(b.recv_text(), format!("echo {i}"));
            t.elapsed()
        })
        .max()
        .unwrap_or_default()
}

/// Starts the app with `extra`; client A asks for the flood and never reads, while client B
/// polls the stats until `done` holds. Returns both clients, the stats, and B's slowest round
/// trip over the polling and 20 more echoes.
fn flood_until(
    extra: &str,
    what: &str,
    done: impl Fn(&Value) -> bool,
) -> (Server, RawClient, Client, Value) {
    let server = start(extra);
    let mut a = RawClient::upgrade(server.port);
    a.frame(true, 0x1, b"flood");
    let mut b = server.connect();
    let mut slowest = Duration::ZERO;
    let st = wait_for(what, DEADLINE, || {
        let (st, took) = stats(&mut b);
        slowest = slowest.max(took);
        done(&st).then_some(st)
    });
    slowest = slowest.max(slowest_echo(&mut b, 20));
    eprintln!("{what}: {st}; B's slowest round trip {slowest:?}");
    assert!(slowest < PROMPT, "B waited {slowest:?} while A was flooded");
    (server, a, b, st)
}

fn a_client_that_never_reads_is_held_to_max_send_buffer() {
    // A's queue fills to half the limit (on_buffer_full) and then refuses sends; meanwhile B
    // is answered promptly.
    let (mut server, mut a, mut b, st) = flood_until(
        "max_send_buffer = \"1MiB\"",
        "A's send buffer to overflow",
        |st| num(st, "refused") > 0,
    );
    assert!(num(&st, "full") >= 1, "on_buffer_full fired: {st}");
    assert_eq!(num(&st, "drain"), 0, "A has not read yet: {st}");
    let max = num(&st, "max_buffered") as usize;
    assert!(
        (LIMIT / 2..=LIMIT).contains(&max),
        "the queue reached {max}, limit {LIMIT}: {st}"
    );
    assert!(st["ended"].is_null(), "drop policy keeps A open: {st}");
    wait_for("status to count the refused sends", DEADLINE, || {
        let st = server.try_status()?;
        (workers_sum(&st, "send_fail") > 0).then_some(())
    });

    // A starts reading: whole messages arrive (a refused send never cuts a frame), the queue
    // empties and on_buffer_drain fires, though the flood goes on.
    let stop = Arc::new(AtomicBool::new(false));
    let stop2 = stop.clone();
    let reader = std::thread::spawn(move || {
        let mut frames = 0u64;
        while !stop2.load(Ordering::Relaxed) {
            let (fin, op, payload) = a.try_read_frame().expect("A reads the flood");
            assert_eq!((fin, op, payload.len()), (true, 0x2, CHUNK));
            assert!(payload[0] == 0x5a && payload[CHUNK - 1] == 0x5a);
            frames += 1;
        }
        frames
    });
    let st = wait_for("on_buffer_drain once A reads", DEADLINE, || {
        let (st, _) = stats(&mut b);
        (num(&st, "drain") >= 1).then_some(st)
    });
    stop.store(true, Ordering::Relaxed);
    let frames = reader.join().expect("A read whole frames");
    eprintln!("drained after {frames} frames: {st}");
    assert!(frames > 0);
    assert!(
        num(&st, "max_buffered") as usize <= LIMIT,
        "never over the limit: {st}"
    );
    assert!(slowest_echo(&mut b, 5) < PROMPT);
}

fn with_the_close_policy_a_client_that_never_reads_is_closed_1008() {
    let (mut server, mut a, mut b, st) = flood_until(
        "max_send_buffer = \"1MiB\"\nsend_buffer_policy = \"close\"\nclose_timeout = 60",
        "A's connection to be closed for overflowing",
        |st| st["ended"].is_string(),
    );
    assert_eq!(
        num(&st, "refused"),
        1,
        "the first refused send closes: {st}"
    );
    assert_eq!(st["ended"], "connection is closing", "{st}");
    assert!(num(&st, "max_buffered") as usize <= LIMIT, "{st}");

    // A gets every message that was queued, then Close 1008, within a bounded time.
    let started = Instant::now();
    let (code, frames) = a.read_until_close();
    eprintln!(
        "A read {frames} messages and close {code:?} in {:?}",
        started.elapsed()
    );
    assert_eq!(code, Some(1008));
    assert_eq!(
        frames as u64,
        num(&st, "sent"),
        "every queued message arrived before the close"
    );
    assert!(started.elapsed() < DEADLINE);
    // A completes the closing handshake; the server then ends the connection.
    a.stream
        .write_all(&masked_frame(true, 0x8, &1008u16.to_be_bytes()))
        .unwrap();
    let (rest, closed) = read_to_end_within(&mut a.stream, Duration::from_secs(15));
    assert!(closed && rest.is_empty(), "EOF after the closing handshake");
    // send_fail counts the refused send and the one that then found A closing.
    wait_for("status to count both failed sends", DEADLINE, || {
        let st = server.try_status()?;
        (workers_sum(&st, "send_fail") == 2 && workers_sum(&st, "connections") == 1).then_some(())
    });
    assert!(slowest_echo(&mut b, 5) < PROMPT);
}

/// Upgrades with `headers` and asks the app who we are.
fn whoami(port: u16, headers: &str) -> Result<(RawClient, String), HttpAnswer> {
    let mut c = RawClient::try_upgrade(port, headers)?;
    c.frame(true, 0x1, b"whoami");
    let (_, op, payload) = c.read_frame();
    assert_eq!(op, 0x1);
    Ok((c, String::from_utf8(payload).unwrap()))
}

fn whoami_ok(port: u16, headers: &str) -> (RawClient, String) {
    whoami(port, headers).unwrap_or_else(|ans| panic!("{headers:?} was refused: {ans:?}"))
}

fn forwarded_addresses_are_believed_only_from_trusted_proxies() {
    // Trusted: the forwarded address is the client's, for hooks and for the per-address cap.
    let server = start("trusted_proxies = [\"127.0.0.1\"]\nmax_connections_per_ip = 2");
    let port = server.port;
    let (first, me) = whoami_ok(port, "X-Forwarded-For: 203.0.113.9\r\n");
    assert_eq!(me, "203.0.113.9 0");
    let (_real, me) = whoami_ok(port, "X-Real-IP: 198.51.100.7\r\n");
    assert_eq!(me, "198.51.100.7 0");
    // The nearest hop that is not a trusted proxy counts.
    let (_second, me) = whoami_ok(
        port,
        "X-Forwarded-For: 192.0.2.1, 203.0.113.9, 127.0.0.1\r\n",
    );
    assert_eq!(me, "203.0.113.9 0");
    // A third for 203.0.113.9 is over max_connections_per_ip: 429, and closed.
    let refused = whoami(port, "X-Forwarded-For: 203.0.113.9\r\n")
        .err()
        .expect("a third connection for one address is refused");
    assert_eq!(refused.status, 429, "{refused:?}");
    assert!(refused.closed, "{refused:?}");
    // Another address is not affected.
    let (_other, me) = whoami_ok(port, "X-Forwarded-For: 203.0.113.10\r\n");
    assert_eq!(me, "203.0.113.10 0");
    // The proxy itself, forwarding nothing, is itself.
    let (_direct, me) = whoami_ok(port, "");
    assert!(me.starts_with("127.0.0.1 ") && !me.ends_with(" 0"), "{me}");
    // Once one of the two leaves, 203.0.113.9 may connect again.
    drop(first);
    let (_again, me) = wait_for("a slot for 203.0.113.9 to free", DEADLINE, || {
        whoami(port, "X-Forwarded-For: 203.0.113.9\r\n").ok()
    });
    assert_eq!(me, "203.0.113.9 0");
    drop(server);

    // Not trusted: the headers are ignored, for hooks and for the cap.
    let server = start("max_connections_per_ip = 2");
    let port = server.port;
    let (_one, me) = whoami_ok(port, "X-Forwarded-For: 203.0.113.9\r\n");
    assert!(me.starts_with("127.0.0.1 ") && !me.ends_with(" 0"), "{me}");
    let (_two, me) = whoami_ok(port, "X-Real-IP: 198.51.100.7\r\n");
    assert!(me.starts_with("127.0.0.1 "), "{me}");
    // A third direct connection from 127.0.0.1 is dropped at accept, whatever it claims.
    let dropped = whoami(port, "X-Forwarded-For: 203.0.113.11\r\n")
        .err()
        .expect("a third direct connection is dropped");
    assert!(
        dropped.status == 0 && dropped.closed,
        "dropped without an answer: {dropped:?}"
    );
}

fn main() {
    if std::env::var_os(LIBRARY_SERVER_ENV).is_some() {
        server_program();
    }
    run_suite(&[
        (
            "a_client_that_never_reads_is_held_to_max_send_buffer",
            a_client_that_never_reads_is_held_to_max_send_buffer,
        ),
        (
            "with_the_close_policy_a_client_that_never_reads_is_closed_1008",
            with_the_close_policy_a_client_that_never_reads_is_closed_1008,
        ),
        (
            "forwarded_addresses_are_believed_only_from_trusted_proxies",
            forwarded_addresses_are_believed_only_from_trusted_proxies,
        ),
    ]);
}
