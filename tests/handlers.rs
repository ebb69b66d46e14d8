//! `app = "exec"` against a real master and a real handler process (Python, standard library):
//! events and commands, binary data through `b64`, timers, a handler killed with SIGKILL while
//! clients talk (they stay, and the replay rebuilds its state), garbage and a 10 MiB line (skipped,
//! memory bounded), a handler that stops reading (back-pressure, memory bounded), a reload that
//! changes the command, and a command that cannot run.

mod common;

use common::*;
use std::io::Write;
use std::path::Path;
use std::time::{Duration, Instant};
use tungstenite::Message;

/// A handler that echoes, and answers a few words: `pid`, `count` (connections it knows of),
/// `version` (its first argument), `timer`, `garbage`, `stall`.
const PROBE: &str = r#"
import json, os, sys, time
sys.stderr.write("probe starting\n")
sys.stderr.flush()
conns = set()
closes = 0
handoffs = 0
adopted = []
pending = b""
def write(cmds):
    os.write(1, "".join(json.dumps(c) + "\n" for c in cmds).encode())
while True:
    chunk = os.read(0, 1 << 16)
    if not chunk:
        break
    *lines, pending = (pending + chunk).split(b"\n")
    cmds = []
    for line in lines:
        if not line.strip():
            continue
        ev = json.loads(line)
        kind = ev.get("event")
        if kind == "connect" and ev.get("decide"):
            q = ev["query"] or ""
            if "let=me" in q:
                cmds.append({"cmd": "accept", "conn": ev["conn"], "user": "ada", "subscribe": ["news"]})
                conns.add(ev["conn"])
            elif "slow" not in q:
                cmds.append({"cmd": "reject", "conn": ev["conn"], "status": 401, "reason": "no " + ev["headers"].get("x-who", "?")})
        elif kind == "connect":
            conns.add(ev["conn"])
        elif kind == "adopt":
            conns.add(ev["conn"])
            adopted.append(ev)
        elif kind == "close":
            conns.discard(ev["conn"])
            closes += 1
        elif kind == "handoff":
            conns.discard(ev["conn"])
            handoffs += 1
        elif kind == "timer":
            cmds.append({"cmd": "broadcast", "data": "tick " + ev["timer"]})
        elif kind == "message":
            c, d = ev["conn"], ev["data"]
            if d == "pid":
                cmds.append({"cmd": "send", "conn": c, "data": str(os.getpid())})
            elif d == "count":
                cmds.append({"cmd": "send", "conn": c, "data": str(len(conns))})
            elif d == "adopted":
                cmds.append({"cmd": "send", "conn": c, "data": json.dumps(adopted)})
            elif d == "version":
                cmds.append({"cmd": "send", "conn": c, "data": (sys.argv[1:] or ["v1"])[0]})
            elif d == "news":
                cmds.append({"cmd": "publish", "topic": "news", "data": "news!"})
                cmds.append({"cmd": "send_user", "user": "ada", "data": "hi ada"})
            elif d == "timer":
                cmds.append({"cmd": "add_timer", "timer": "t1", "after": 0.05})
            elif d == "garbage":
                os.write(1, b"not json\n{\"cmd\": \"fly\"}\n\xff\xfe\n")
                os.write(1, b"x" * (10 << 20) + b"\n")
                cmds.append({"cmd": "send", "conn": c, "data": "after garbage"})
            elif d == "stall":
                time.sleep(3600)
            else:
                cmds.append({"cmd": "send", "conn": c, "data": d})
    if cmds:
        write(cmds)
# Cleaning up takes a while: the worker waits for it.
time.sleep(0.2)
with open("bye.txt", "w") as f:
    f.write("%d closes\n" % closes + "%d handoffs\n" % handoffs * (handoffs > 0))
"#;

/// One `exec` worker running [`PROBE`] (argv `args` after the script), with `extra` keys.
fn start(count: usize, args: &str, extra: &str) -> Server {
    let (dir, config) = Server::config("exec", count, "");
    std::fs::write(dir.path().join("probe.py"), PROBE).unwrap();
    let text = std::fs::read_to_string(&config).unwrap().replace(
        "app = \"exec\"",
        &format!("app = \"exec\"\ncommand = [\"python3\", \"probe.py\"{args}]\n{extra}"),
    );
    std::fs::write(&config, text).unwrap();
    Server::start_with(wsd_bin(), dir, config)
}

/// The pid of the handler serving `c`.
fn handler_pid(c: &mut Client) -> i32 {
    c.send_text("pid");
    c.recv_text().parse().expect("a pid")
}

#[test]
fn messages_and_binary_round_trip_and_timers_fire() {
    let server = start(2, "", "");
    // The handler's stderr is in the log, tagged with its worker.
    wait_for("the handler's stderr in the log", DEADLINE, || {
        let log = server.master_output();
        let tagged = |l: &&str| l.contains("exec#") && l.contains("] handler: probe starting");
        (log.lines().filter(tagged).count() == 2).then_some(())
    });
    let mut clients: Vec<Client> = (0..4).map(|_| server.connect()).collect();
    for (i, c) in clients.iter_mut().enumerate() {
        c.send_text(&format!("hello {i}\nwith a newline"));
        assert_eq!(c.recv_text(), format!("hello {i}\nwith a newline"));
        let bytes = vec![0u8, 1, 2, 255, b'\n', i as u8];
        c.send(Message::binary(bytes.clone())).unwrap();
        assert_eq!(c.recv(), Message::binary(bytes));
    }
    // A timer the handler adds comes back to it as an event; it broadcasts on it.
    clients[0].send_text("timer");
    for c in &mut clients {
        assert_eq!(c.recv_text(), "tick t1");
    }
}

#[test]
fn a_killed_handler_is_restarted_and_its_clients_stay() {
    let server = start(1, "", "");
    let mut clients: Vec<Client> = (0..3).map(|_| server.connect()).collect();
    let mut last = clients.last_mut().unwrap();
    last.send_text("count");
    assert_eq!(last.recv_text(), "3");
    let old = handler_pid(last);

    // Under load: every client has echoes in flight when the handler dies.
    for c in &mut clients {
        for n in 0..50 {
            c.send_text(&format!("before {n}"));
        }
    }
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(old),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    server.wait_for_log("handler closed its stdout");
    server.wait_for_log("starting it again");

    // Each client is still connected, and is answered by the new handler (echoes that were
    // in the dead one's pipe are lost with it).
    for c in &mut clients {
        c.send_text("after");
        loop {
            let got = c.recv_text();
            if got == "after" {
                break;
            }
            assert!(got.starts_with("before "), "{got}");
        }
    }
    last = clients.last_mut().unwrap();
    let new = handler_pid(last);
    assert_ne!(new, old);
    // The replay told the new handler of every open connection.
    last.send_text("count");
    assert_eq!(last.recv_text(), "3");
}

#[test]
fn garbage_and_a_ten_mib_line_are_skipped_and_memory_stays_bounded() {
    let mut server = start(1, "", "");
    let worker = server.worker_pids()[0];
    let mut a = server.connect();
    let mut b = server.connect();
    a.send_text("garbage");
    assert_eq!(a.recv_text(), "after garbage");
    b.send_text("still served");
    assert_eq!(b.recv_text(), "still served");
    let log = server.master_output();
    assert!(
        log.contains("handler line skipped: not a JSON command"),
        "{log}"
    );
    assert!(log.contains("unknown variant `fly`"), "{log}");
    assert!(
        log.contains("\\xff\\xfe"),
        "the bad bytes are escaped: {log}"
    );
    assert!(
        log.contains("10485760-byte line, over the limit; skipped"),
        "{log}"
    );
    // The 10 MiB line was never held whole.
    let peak = proc_status_bytes(worker, "VmHWM");
    assert!(peak > 0 && peak < 32 << 20, "worker peak RSS {peak}");
}

#[test]
fn a_handler_that_stops_reading_holds_the_clients_not_the_memory() {
    let mut server = start(1, "", "handler_queue = \"1MiB\"");
    let worker = server.worker_pids()[0];
    let mut a = server.connect();
    a.send_text("stall");

    // A raw client writes 64 KiB messages as fast as the socket takes them, for 3 s or 256 MiB.
    let mut flood = RawClient::upgrade(server.port);
    flood.stream.set_nonblocking(true).unwrap();
    let frame = masked_frame(true, 1, &vec![b'a'; 64 << 10]);
    let (mut sent, mut blocked_since) = (0usize, None::<Instant>);
    let start = Instant::now();
    while sent < 256 << 20 && start.elapsed() < Duration::from_secs(20) {
        match flood.stream.write(&frame[sent % frame.len()..]) {
            Ok(n) => {
                sent += n;
                blocked_since = None;
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                let since = *blocked_since.get_or_insert_with(Instant::now);
                if since.elapsed() > Duration::from_secs(3) {
                    break;
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(e) => panic!("the flood's socket failed: {e}"),
        }
    }
    assert!(
        sent < 256 << 20,
        "the worker kept reading ({sent} bytes) from a client whose handler is stalled"
    );
    let peak = proc_status_bytes(worker, "VmHWM");
    eprintln!("the flood wrote {sent} bytes before TCP held it; worker peak RSS {peak}");
    assert!(peak > 0 && peak < 48 << 20, "worker peak RSS {peak}");
    let st = server.status();
    assert_eq!(st["workers"][0]["pid"], worker, "the worker is alive");
}

/// A reload with a new command: the new workers run it, and the open connection is handed to
/// them. The old handler hears `handoff` (not `close`), the new one `adopt`, with the topics.
#[test]
fn reload_with_a_new_command_starts_it_on_the_new_workers() {
    let mut server = start(1, "", "");
    let mut c = server.connect();
    c.send_text("version");
    assert_eq!(c.recv_text(), "v1");
    let old = server.worker_pid(0);
    let text = std::fs::read_to_string(&server.config).unwrap();
    let text = text.replace("\"probe.py\"]", "\"probe.py\", \"v2\"]");
    std::fs::write(&server.config, text).unwrap();
    let out = server.wsd(&["reload"]);
    assert!(out.status.success(), "{out:?}");
    wait_for("the old worker to exit", DEADLINE, || {
        exited(old).then_some(())
    });
    // The same connection, served by the new handler.
    c.send_text("version");
    assert_eq!(c.recv_text(), "v2");
    c.send_text("count");
    assert_eq!(c.recv_text(), "1");
    c.send_text("adopted");
    let adopted: serde_json::Value = serde_json::from_str(&c.recv_text()).unwrap();
    let a = &adopted[0];
    assert_eq!(a["event"], "adopt", "{adopted}");
    assert!(
        a["from"]
            .as_str()
            .is_some_and(|f| f.split('-').count() == 4),
        "{a}"
    );
    assert_eq!(a["path"], "/", "{a}");
    assert_eq!(a["topics"], serde_json::json!([]), "{a}");
    let bye = std::fs::read_to_string(server.dir.path().join("bye.txt")).expect("bye.txt");
    assert_eq!(bye, "0 closes\n1 handoffs\n");
}

#[test]
fn a_command_that_cannot_run_is_refused_or_backed_off() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("workers.toml");
    std::fs::write(dir.path().join("handler.py"), "print()").unwrap();
    let config = |command: &str| {
        format!(
            "[[worker]]\nlisten = \"websocket://127.0.0.1:0\"\ncount = 1\n\
             app = \"exec\"\ncommand = {command}\n"
        )
    };
    let (ok, err) = check_config(&file, &config(r#"["./handler.py"]"#));
    assert!(!ok);
    assert!(err.contains("workers.toml:1:"), "{err}");
    assert!(err.contains("is not an executable file"), "{err}");
    let (ok, err) = check_config(&file, &config(r#"["no-such-handler-anywhere"]"#));
    assert!(!ok && err.contains("not found in PATH"), "{err}");
    let (ok, err) = check_config(
        &file,
        "[[worker]]\nlisten = \"127.0.0.1:0\"\napp = \"exec\"\n",
    );
    assert!(!ok && err.contains("needs command"), "{err}");

    // A program that runs but fails at once (python3 without its script) passes check; the
    // worker logs it, backs off, and keeps its clients.
    let (dir, config) = Server::config(
        "exec",
        1,
        "command = [\"python3\", \"missing-script.py\"]\n",
    );
    let mut server = Server::start_with(wsd_bin(), dir, config);
    server.wait_for_log("starting it again in");
    let worker = server.worker_pids()[0];
    let mut c = server.connect();
    c.send_text("nobody answers, but the connection stays");
    c.send(Message::Ping(vec![1].into())).unwrap();
    match c.read().unwrap() {
        Message::Pong(p) => assert_eq!(&p[..], &[1]),
        other => panic!("unexpected {other:?}"),
    }
    assert_eq!(server.worker_pids(), vec![worker]);
    assert!(Path::new(&format!("/proc/{worker}")).exists());
}

#[test]
fn the_handler_decides_upgrades() {
    let server = start(1, "", "authorize = true\nconnect_timeout = 1");
    let port = server.port;
    // Accepted: bound to the user and subscribed to the topics the handler named.
    let (mut ada, _) = Client::connect_with(port, "/?let=me", &[]).expect("accepted");
    ada.send_text("news");
    assert_eq!(ada.recv_text(), "news!");
    assert_eq!(ada.recv_text(), "hi ada");
    // Refused with the handler's status and reason, which saw the request's headers.
    let no = http_exchange(
        port,
        upgrade_request_to("/?who", "X-Who: bob\r\n").as_bytes(),
        DEADLINE,
    );
    assert_eq!(no.status, 401, "{no:?}");
    assert!(no.body.contains("no bob"), "{no:?}");
    // Undecided: 503 after connect_timeout, and the worker serves on.
    let slow = http_exchange(port, upgrade_request_to("/?slow", "").as_bytes(), DEADLINE);
    assert_eq!(slow.status, 503, "{slow:?}");
    ada.send_text("still here");
    assert_eq!(ada.recv_text(), "still here");
}

#[test]
fn a_stopping_worker_tells_its_handler_every_close_then_eof() {
    let mut server = start(1, "", "");
    let mut clients: Vec<Client> = (0..3).map(|_| server.connect()).collect();
    for c in &mut clients {
        c.send_text("ready");
        assert_eq!(c.recv_text(), "ready");
    }
    // Each client answers the Close 1001 of the stop.
    let closers: Vec<_> = (clients.into_iter())
        .map(|mut c| std::thread::spawn(move || c.expect_close()))
        .collect();
    let out = server.wsd(&["stop"]);
    assert!(out.status.success(), "{out:?}");
    for t in closers {
        assert_eq!(t.join().unwrap(), 1001);
    }
    assert_eq!(server.wait_exit(DEADLINE), 0);
    // The handler read every close, then EOF, and finished by itself before its worker exited.
    let bye = std::fs::read_to_string(server.dir.path().join("bye.txt")).expect("bye.txt");
    assert_eq!(bye, "3 closes\n");
}
