//! Operating a running server: rolling reload, stop modes, the connections view, log reopen,
//! and a worker killed under traffic. Real `wsd` processes, real sockets, real signals.

mod common;

use common::*;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde_json::Value;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};
use tungstenite::Message;

fn pids_of(st: &Value, group: &str) -> Vec<i32> {
    st["workers"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|w| w["name"] == group && w["status"] != "stopping")
        .map(|w| w["pid"].as_i64().unwrap() as i32)
        .collect()
}

fn reload(server: &Server) -> std::process::Output {
    server.wsd(&["reload"])
}

fn text(out: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// What a stream of short-lived clients saw.
#[derive(Default)]
struct Tally {
    served: AtomicU64,
    closed_1001: AtomicU64,
    failures: std::sync::Mutex<Vec<String>>,
}

/// One short-lived client: upgrade, one echo (or the reload's Close 1001), close.
fn one_visit(port: u16, n: u64, tally: &Tally) {
    let mut c = match Client::try_connect(port) {
        Ok(c) => c,
        Err(e) => {
            tally
                .failures
                .lock()
                .unwrap()
                .push(format!("connect {n}: {e}"));
            return;
        }
    };
    let msg = format!("visit {n}");
    if let Err(e) = c.send(Message::text(msg.clone())) {
        tally
            .failures
            .lock()
            .unwrap()
            .push(format!("send {n}: {e}"));
        return;
    }
    loop {
        match c.read() {
            Ok(Message::Text(t)) if t.as_str() == msg => {
                tally.served.fetch_add(1, Ordering::Relaxed);
                let _ = c.ws.close(None);
                return;
            }
            Ok(Message::Close(Some(f))) if u16::from(f.code) == 1001 => {
                tally.closed_1001.fetch_add(1, Ordering::Relaxed);
                return;
            }
            Ok(Message::Ping(_) | Message::Pong(_)) => continue,
            Ok(other) => {
                tally
                    .failures
                    .lock()
                    .unwrap()
                    .push(format!("visit {n}: got {other:?}"));
                return;
            }
            Err(e) => {
                tally
                    .failures
                    .lock()
                    .unwrap()
                    .push(format!("read {n}: {e}"));
                return;
            }
        }
    }
}

#[test]
fn reload_replaces_every_worker_and_refuses_no_client() {
    let mut server = Server::start_extra("echo", 4, "");
    let port = server.port;
    // A client that stays connected is handed to the new workers: it never notices.
    let mut resident = server.connect();
    resident.send_text("here");
    assert_eq!(resident.recv_text(), "here");

    let tally = Arc::new(Tally::default());
    let done = Arc::new(AtomicBool::new(false));
    let visitors: Vec<_> = (0..2)
        .map(|t| {
            let (tally, done) = (tally.clone(), done.clone());
            std::thread::spawn(move || {
                let mut n = t;
                while !done.load(Ordering::Relaxed) {
                    one_visit(port, n, &tally);
                    n += 2;
                    std::thread::sleep(Duration::from_millis(5));
                }
            })
        })
        .collect();
    // Traffic before, during and after three reloads in a row.
    wait_for("visitors served", DEADLINE, || {
        (tally.served.load(Ordering::Relaxed) >= 20).then_some(())
    });
    let mut before = pids_of(&server.status(), "echo");
    for round in 0..3 {
        let out = reload(&server);
        assert!(out.status.success(), "reload {round}: {}", text(&out));
        assert!(
            text(&out).contains("echo: 4 worker(s) replaced"),
            "{}",
            text(&out)
        );
        let after = pids_of(&server.wait_ready(), "echo");
        assert_eq!(after.len(), 4);
        for pid in &after {
            assert!(
                !before.contains(pid),
                "round {round}: {pid} was not replaced"
            );
        }
        for pid in &before {
            wait_for("old worker gone", DEADLINE, || (!alive(*pid)).then_some(()));
        }
        before = after;
    }
    let served_then = tally.served.load(Ordering::Relaxed);
    wait_for("visitors served after the reloads", DEADLINE, || {
        (tally.served.load(Ordering::Relaxed) >= served_then + 20).then_some(())
    });
    done.store(true, Ordering::Relaxed);
    for v in visitors {
        v.join().unwrap();
    }
    let failures = tally.failures.lock().unwrap();
    assert!(
        failures.is_empty(),
        "{} refused or broken visits (served {}), first: {:?}",
        failures.len(),
        tally.served.load(Ordering::Relaxed),
        &failures[..failures.len().min(5)]
    );
    resident.send_text("still here");
    assert_eq!(resident.recv_text(), "still here");
    // Still serving, on the last reload's workers.
    let mut c = server.connect();
    c.send_text("after");
    assert_eq!(c.recv_text(), "after");
}

#[test]
fn reload_changes_count_and_a_bad_file_changes_nothing() {
    let mut server = Server::start_extra("echo", 2, "");
    let config = std::fs::read_to_string(&server.config).unwrap();

    std::fs::write(&server.config, config.replace("count = 2", "count = 3")).unwrap();
    let out = reload(&server);
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        text(&out).contains("echo: 2 -> 3 worker(s)"),
        "{}",
        text(&out)
    );
    let st = server.wait_ready();
    assert_eq!(pids_of(&st, "echo").len(), 3);
    assert_eq!(st["groups"][0]["count"], 3);
    let port = server.port;
    assert!(
        st["workers"]
            .as_array()
            .unwrap()
            .iter()
            .all(|w| w["listen"].as_str().unwrap().ends_with(&format!(":{port}")))
    );

    // A bad file: refused with the place and the reason, and nothing changes.
    let running = pids_of(&st, "echo");
    std::fs::write(&server.config, config.replace("count = 2", "count = 0")).unwrap();
    let out = reload(&server);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let line = config.lines().position(|l| l == "count = 2").unwrap() + 1;
    assert!(
        text(&out).contains(&format!("workers.toml:{line}:")) && text(&out).contains("count"),
        "{}",
        text(&out)
    );
    assert_eq!(pids_of(&server.status(), "echo"), running);

    // A file with no group at all (truncated, say) would leave nothing running: refused too,
    // as `check` refuses it.
    let no_groups = config.split("[[worker]]").next().unwrap().to_string();
    std::fs::write(&server.config, &no_groups).unwrap();
    let out = reload(&server);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(text(&out).contains("no [[worker]] group"), "{}", text(&out));
    let out = server.wsd(&["check"]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(text(&out).contains("nothing would run"), "{}", text(&out));
    assert_eq!(pids_of(&server.status(), "echo"), running);

    // Fewer slots: the extra worker is retired.
    std::fs::write(&server.config, config.replace("count = 2", "count = 1")).unwrap();
    let out = reload(&server);
    assert!(out.status.success(), "{}", text(&out));
    let st = server.wait_ready();
    assert_eq!(pids_of(&st, "echo").len(), 1);
    for pid in running {
        wait_for("old worker gone", DEADLINE, || (!alive(pid)).then_some(()));
    }
    let mut c = server.connect();
    c.send_text("one left");
    assert_eq!(c.recv_text(), "one left");
}

#[test]
fn a_group_that_is_not_reloadable_keeps_its_workers() {
    let extra = "name = \"keep\"\nreloadable = false\n\n[[worker]]\nname = \"fresh\"\n\
                 listen = \"websocket://127.0.0.1:0\"\ncount = 1\napp = \"echo\"\n";
    let mut server = Server::start_extra("echo", 2, extra);
    let st = server.status();
    let (keep, fresh) = (pids_of(&st, "keep"), pids_of(&st, "fresh"));
    // A signal does what the command does.
    kill(Pid::from_raw(server.master_pid()), Signal::SIGUSR1).unwrap();
    let st = wait_for("fresh replaced", DEADLINE, || {
        let st = server.try_status()?;
        let now = pids_of(&st, "fresh");
        (now.len() == 1 && now != fresh).then_some(st)
    });
    assert_eq!(pids_of(&st, "keep"), keep);
    server.wait_for_log("reload done");
    let out = reload(&server);
    assert!(
        text(&out).contains("keep: kept (reloadable = false)"),
        "{}",
        text(&out)
    );
    assert_eq!(pids_of(&server.status(), "keep"), keep);
}

/// Sequence-numbered echo on one connection until told to stop; returns how many round
/// trips it made, or the first error (a lost, reordered or broken reply).
fn echo_sequence(
    mut c: Client,
    stop: Arc<AtomicBool>,
    progress: Arc<AtomicU64>,
) -> Result<u64, String> {
    let mut seq = 0u64;
    while !stop.load(Ordering::Relaxed) {
        seq += 1;
        let msg = format!("seq {seq}");
        c.send(Message::text(msg.clone()))
            .map_err(|e| format!("send {seq}: {e}"))?;
        match c.read() {
            Ok(Message::Text(t)) if t.as_str() == msg => {}
            Ok(other) => return Err(format!("after seq {seq}: got {other:?}")),
            Err(e) => return Err(format!("read {seq}: {e}")),
        }
        progress.fetch_add(1, Ordering::Relaxed);
    }
    Ok(seq)
}

#[test]
fn a_worker_killed_under_traffic_is_back_within_a_second_and_others_lose_nothing() {
    raise_fd_limit(4096);
    let mut server = Server::start("echo", 4);
    let clients: Vec<Client> = (0..200).map(|_| server.connect()).collect();
    // Which worker holds which client, from the server's own connections view.
    let owner = connection_owners(&server);
    assert_eq!(owner.len(), 200, "every client is listed once");
    let victim = *owner.values().next().unwrap();
    let slot = server.status()["workers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|w| w["pid"] == victim)
        .unwrap()["slot"]
        .as_u64()
        .unwrap();

    let stop = Arc::new(AtomicBool::new(false));
    let progress = Arc::new(AtomicU64::new(0));
    let runs: Vec<_> = clients
        .into_iter()
        .map(|c| {
            let pid = owner[&c.ws.get_ref().local_addr().unwrap().port()];
            let (stop, progress) = (stop.clone(), progress.clone());
            (
                pid,
                std::thread::spawn(move || echo_sequence(c, stop, progress)),
            )
        })
        .collect();
    wait_for("traffic flowing", DEADLINE, || {
        (progress.load(Ordering::Relaxed) >= 2000).then_some(())
    });
    let killed_at = Instant::now();
    kill(Pid::from_raw(victim), Signal::SIGKILL).unwrap();
    wait_for("the slot's new worker", DEADLINE, || {
        let st = server.try_status()?;
        st["workers"].as_array()?.iter().find_map(|w| {
            (w["slot"] == slot && w["pid"].as_i64()? > 0 && w["pid"] != victim).then_some(())
        })
    });
    let respawned_in = killed_at.elapsed();
    let at_kill = progress.load(Ordering::Relaxed);
    wait_for("traffic after the kill", DEADLINE, || {
        (progress.load(Ordering::Relaxed) >= at_kill + 4000).then_some(())
    });
    stop.store(true, Ordering::Relaxed);
    let mut others = 0;
    for (pid, run) in runs {
        let result = run.join().unwrap();
        if pid == victim {
            assert!(
                result.is_err(),
                "a client of the killed worker cannot go on"
            );
        } else {
            let n = result.unwrap_or_else(|e| panic!("client of live worker {pid}: {e}"));
            assert!(n > 0);
            others += 1;
        }
    }
    assert!(others > 0 && others < 200);
    assert!(
        respawned_in <= Duration::from_secs(1),
        "slot {slot} came back after {respawned_in:?}"
    );
    let st = server.wait_ready();
    assert!(
        st["groups"][0]["exits"]["killed by SIGKILL"].as_u64() == Some(1),
        "{st}"
    );
}

/// A config with `server` lines added to its `[server]` table.
fn config_with_server(
    app: &str,
    count: usize,
    server: &str,
) -> (tempfile::TempDir, std::path::PathBuf) {
    let (dir, config) = Server::config(app, count, "");
    let text = std::fs::read_to_string(&config).unwrap();
    std::fs::write(
        &config,
        text.replacen("[server]\n", &format!("[server]\n{server}\n"), 1),
    )
    .unwrap();
    (dir, config)
}

#[test]
fn stop_spreads_its_close_frames_over_close_spread() {
    let (dir, config) = config_with_server("echo", 1, "close_spread = \"2s\"");
    let mut server = Server::start_with(wsd_bin(), dir, config);
    let clients: Vec<Client> = (0..20).map(|_| server.connect()).collect();
    wait_for("20 connections", DEADLINE, || {
        (workers_sum(&server.status(), "connections") == 20).then_some(())
    });
    let readers: Vec<_> = clients
        .into_iter()
        .map(|mut c| std::thread::spawn(move || (c.expect_close(), Instant::now())))
        .collect();
    assert!(server.wsd(&["stop"]).status.success());
    let mut closes: Vec<(u16, Instant)> = readers.into_iter().map(|r| r.join().unwrap()).collect();
    assert!(closes.iter().all(|(code, _)| *code == 1001));
    closes.sort_by_key(|(_, at)| *at);
    // Twenty closes due evenly over 2 s: the first and the last are at least ~1.5 s apart
    // (a lower bound the server's own schedule sets, whatever the machine's load).
    let spread = closes[19].1 - closes[0].1;
    assert!(
        spread >= Duration::from_millis(1400),
        "closes came within {spread:?}"
    );
    assert_eq!(server.wait_exit(DEADLINE), 0);
}

/// Clients that never answer a Close: a draining stop would wait `close_timeout` (here far
/// beyond the test's deadline) for them; a fast stop does not wait.
fn silent_clients(port: u16, n: usize) -> Vec<RawClient> {
    (0..n).map(|_| RawClient::upgrade(port)).collect()
}

fn fast_stop_setup() -> Server {
    let (dir, config) = config_with_server("echo", 2, "");
    let text = std::fs::read_to_string(&config).unwrap();
    let text = text.replace("stop_timeout = \"5s\"", "stop_timeout = \"300s\"");
    std::fs::write(&config, format!("{text}close_timeout = \"300s\"\n")).unwrap();
    Server::start_with(wsd_bin(), dir, config)
}

#[test]
fn stop_fast_and_sigint_skip_the_drain() {
    for how in ["stop --fast", "SIGINT"] {
        let mut server = fast_stop_setup();
        let mut silent = silent_clients(server.port, 6);
        wait_for("6 connections", DEADLINE, || {
            (workers_sum(&server.status(), "connections") == 6).then_some(())
        });
        if how == "SIGINT" {
            kill(Pid::from_raw(server.master_pid()), Signal::SIGINT).unwrap();
        } else {
            let out = server.wsd(&["stop", "--fast"]);
            assert!(out.status.success(), "{}", text(&out));
        }
        assert_eq!(server.wait_exit(DEADLINE), 0, "{how}");
        for c in &mut silent {
            // The Close was written once on the way out.
            let (code, _) = c.read_until_close();
            assert_eq!(code, Some(1001), "{how}");
        }
        assert!(server.master_output().contains("fast"), "{how}");
    }
}

#[test]
fn stops_racing_each_other_all_succeed_or_say_not_running() {
    // A stop that meets the master as it exits (its connection reset in the backlog) counts as
    // stopped; one that comes after says "not running". Never an I/O error.
    for _ in 0..3 {
        let mut server = Server::start("echo", 1);
        let outs: Vec<_> = std::thread::scope(|s| {
            let stops: Vec<_> = (0..10).map(|_| s.spawn(|| server.wsd(&["stop"]))).collect();
            stops.into_iter().map(|t| t.join().unwrap()).collect()
        });
        for out in &outs {
            assert!(
                out.status.success() || text(out).contains("not running"),
                "{}",
                text(out)
            );
        }
        assert!(outs.iter().any(|o| o.status.success()));
        assert_eq!(server.wait_exit(DEADLINE), 0);
    }
}

#[test]
fn a_plain_stop_after_stop_g_closes_the_clients() {
    let mut server = Server::start("echo", 1);
    let mut c = server.connect();
    c.send_text("x");
    assert_eq!(c.recv_text(), "x");
    let mut drain = std::process::Command::new(wsd_bin())
        .args(["-c", server.config.to_str().unwrap(), "stop", "-g"])
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let _drain_reap = KillOnDrop(drain.id() as i32);
    server.wait_for_log("waiting for clients to leave");
    // New clients are refused at once, not left in an accept queue nobody serves...
    let port = server.port;
    wait_for(
        "the port to refuse new clients",
        DEADLINE,
        || match std::net::TcpStream::connect(("127.0.0.1", port)) {
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => Some(()),
            _ => None,
        },
    );
    // ...and the client is not closed by a draining stop...
    c.send_text("still");
    assert_eq!(c.recv_text(), "still");
    // ...but a plain stop issued meanwhile closes it.
    assert!(server.wsd(&["stop"]).status.success());
    assert_eq!(c.expect_close(), 1001);
    assert_eq!(server.wait_exit(DEADLINE), 0);
    // The `stop -g` command returns too, once the master is gone.
    assert!(drain.wait().unwrap().success());
}

#[test]
fn connections_lists_every_client_with_its_counters() {
    let mut server = Server::start("echo", 2);
    let mut chatty = server.connect();
    for m in ["hello", "world"] {
        chatty.send_text(m);
        assert_eq!(chatty.recv_text(), m);
    }
    let quiet: Vec<Client> = (0..2).map(|_| server.connect()).collect();
    let workers = server.worker_pids();
    let out = server.wsd(&["connections", "--json"]);
    assert!(out.status.success(), "{}", text(&out));
    let view: Value = serde_json::from_slice(&out.stdout).unwrap();
    let rows = view["conns"].as_array().unwrap();
    assert_eq!(rows.len(), 3, "{view}");
    assert_eq!(view["missing"].as_array().map(Vec::len), Some(0));
    let me = chatty.ws.get_ref().local_addr().unwrap().to_string();
    let row = rows
        .iter()
        .find(|r| r["remote"] == me.as_str())
        .expect("the chatty client");
    assert_eq!(row["messages_in"], 2);
    assert_eq!(row["messages_out"], 2);
    // Message payload bytes: two 5-byte texts each way.
    assert_eq!(row["bytes_in"], 10, "{row}");
    assert_eq!(row["bytes_out"], 10, "{row}");
    assert_eq!(row["state"], "open");
    assert_eq!(row["path"], "/");
    assert_eq!(row["send_queue"], 0);
    assert!(row["age_secs"].as_f64().unwrap() >= 0.0);
    assert!(
        rows.iter()
            .all(|r| workers.contains(&(r["pid"].as_i64().unwrap() as i32)))
    );
    assert!(
        rows.iter()
            .all(|r| r["worker"].as_str().unwrap().starts_with("echo#"))
    );
    for q in &quiet {
        let addr = q.ws.get_ref().local_addr().unwrap().to_string();
        let r = rows.iter().find(|r| r["remote"] == addr.as_str()).unwrap();
        assert_eq!(r["messages_in"], 0);
    }
    // Status shows each slot's listen queue against its backlog, and queued bytes.
    let st = server.status();
    for w in st["workers"].as_array().unwrap() {
        assert_eq!(w["backlog"], 1024, "{w}");
        assert!(w["accept_queue"].as_u64().unwrap() <= 1024, "{w}");
        assert!(w["send_queue"].is_u64(), "{w}");
    }
    let table = server.wsd(&["connections"]);
    let table = String::from_utf8_lossy(&table.stdout).to_string();
    assert!(
        table.contains("3 connection(s)") && table.contains(&me),
        "{table}"
    );
}

#[test]
fn reopen_logs_moves_master_and_workers_to_a_new_file() {
    let (dir, config) = Server::config("echo", 2, "");
    let wsd = |args: &[&str]| {
        std::process::Command::new(wsd_bin())
            .arg("-c")
            .arg(&config)
            .args(args)
            .output()
            .unwrap()
    };
    let out = wsd(&["start", "-d"]);
    let master = pid_in(&dir.path().join("wsd.pid"));
    let _reap = KillOnDrop(master);
    assert!(out.status.success(), "{}", text(&out));
    let st: Value = serde_json::from_slice(&wsd(&["status", "--json"]).stdout).unwrap();
    let workers: Vec<i32> = st["workers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| w["pid"].as_i64().unwrap() as i32)
        .collect();
    let _reap_workers: Vec<KillOnDrop> = workers.iter().map(|&p| KillOnDrop(p)).collect();
    let log = dir.path().join("wsd.log");
    let rotated = dir.path().join("wsd.log.1");
    std::fs::rename(&log, &rotated).unwrap();
    let out = wsd(&["reopen-logs"]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("2 worker(s)"), "{}", text(&out));
    let new_log = || std::fs::read_to_string(&log).unwrap_or_default();
    // Each worker writes to the new file from now on.
    for pid in &workers {
        wait_for("a worker line in the new log", DEADLINE, || {
            new_log()
                .lines()
                .any(|l| l.contains(&format!("[{pid}] reopened log file")))
                .then_some(())
        });
    }
    let old_size = std::fs::metadata(&rotated).unwrap().len();
    kill(Pid::from_raw(workers[0]), Signal::SIGKILL).unwrap();
    wait_for("the master's line in the new log", DEADLINE, || {
        new_log().contains("killed by SIGKILL").then_some(())
    });
    assert_eq!(std::fs::metadata(&rotated).unwrap().len(), old_size);
    assert!(wsd(&["stop"]).status.success());
    // A foreground master has no log file to reopen, and says so.
    let server = Server::start("echo", 1);
    let out = server.wsd(&["reopen-logs"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out).contains("not started with -d"), "{}", text(&out));
}

#[test]
fn idle_control_clients_cannot_crowd_out_the_cli() {
    let mut s = Server::start("echo", 1);
    let master = s.master_pid();
    let fds_before = fd_count(master);
    let socket = s.dir.path().join("wsd.sock");
    // Four times as many silent clients as the master keeps: the newest push out the oldest.
    let idle: Vec<std::os::unix::net::UnixStream> = (0..256)
        .map(|_| std::os::unix::net::UnixStream::connect(&socket).expect("connect"))
        .collect();
    let st = s.status();
    assert_eq!(st["groups"][0]["count"], 1, "status answered: {st}");
    let fds = fd_count(master);
    assert!(
        fds <= fds_before + 64 + 2,
        "master holds {fds} fds with {} idle clients (before: {fds_before})",
        idle.len()
    );
    // The evicted ones were closed by the master: reading them gives EOF at once.
    let mut evicted = 0;
    for mut c in idle.into_iter().take(64) {
        c.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        if std::io::Read::read(&mut c, &mut [0u8; 16]).unwrap_or(1) == 0 {
            evicted += 1;
        }
    }
    assert_eq!(evicted, 64, "the oldest idle clients are closed");
}

#[test]
fn a_control_client_that_sends_nothing_is_dropped() {
    let s = Server::start("echo", 1);
    let socket = s.dir.path().join("wsd.sock");
    let connected = Instant::now();
    let mut silent = std::os::unix::net::UnixStream::connect(&socket).expect("connect");
    silent
        .set_read_timeout(Some(Duration::from_secs(60)))
        .unwrap();
    let n = std::io::Read::read(&mut silent, &mut [0u8; 16]).expect("read until closed");
    assert_eq!(n, 0, "the master closes the connection without a reply");
    // Not refused on arrival: it had its 10 s to ask.
    assert!(
        connected.elapsed() >= Duration::from_secs(9),
        "closed after {:?}",
        connected.elapsed()
    );
}

#[test]
fn client_text_in_the_log_is_escaped_so_it_cannot_forge_lines() {
    let server = Server::start("clock", 1);
    let mut c = server.connect();
    c.send_text("hi\n2026-11-24 10:00:00.000 WARN  master[1] forged\x1b[2J");
    server.wait_for_log("Message From client: hi\\n2026-11-24");
    let log = server.master_output();
    assert!(
        log.contains(
            "Message From client: hi\\n2026-11-24 10:00:00.000 WARN  master[1] forged\\u{1b}[2J\n"
        ),
        "{log}"
    );
    assert!(
        !log.lines()
            .any(|l| l.starts_with("2026-11-24 10:00:00.000")),
        "a client's text began a log line of its own:\n{log}"
    );
    assert!(!log.contains('\x1b'), "a raw escape reached the log");
}

/// `wsd`'s binary copied into `dir`, so another user can run it whatever the permissions of the
/// checkout it was built in.
fn wsd_copy_in(dir: &std::path::Path) -> std::path::PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let bin = dir.join("wsd");
    std::fs::copy(wsd_bin(), &bin).unwrap();
    std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o755)).unwrap();
    bin
}

/// A process the test started, killed by its pid and reaped if the test ends before it exits.
struct Started(std::process::Child);

impl Drop for Started {
    fn drop(&mut self) {
        if matches!(self.0.try_wait(), Ok(None)) {
            let _ = kill(Pid::from_raw(self.0.id() as i32), Signal::SIGKILL);
            let _ = self.0.wait();
        }
    }
}

/// Runs `cmd` to its end (within [`DEADLINE`]): its pid, exit code and stderr.
fn run_to_end(cmd: &mut std::process::Command) -> (i32, Option<i32>, String) {
    use std::process::Stdio;
    let mut p = Started(
        cmd.stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn"),
    );
    let pid = p.0.id() as i32;
    let status = wait_for("the command to exit", DEADLINE, || {
        p.0.try_wait().ok().flatten()
    });
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut p.0.stderr.take().unwrap(), &mut stderr).unwrap();
    (pid, status.code(), stderr)
}

#[test]
fn the_control_socket_is_owner_only_from_the_moment_it_exists() {
    use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify};
    use std::os::unix::fs::{FileTypeExt, PermissionsExt};
    let (dir, config) = Server::config("echo", 1, "");
    // The master starts with the widest file-mode mask: a socket made by a bare bind would be
    // 0777 until something changed its mode.
    let wrapper = dir.path().join("wsd-umask-000");
    std::fs::write(
        &wrapper,
        format!(
            "#!/bin/sh\numask 000\nexec '{}' \"$@\"\n",
            wsd_bin().display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&wrapper, std::fs::Permissions::from_mode(0o755)).unwrap();
    let watch = Inotify::init(InitFlags::IN_NONBLOCK | InitFlags::IN_CLOEXEC).unwrap();
    watch
        .add_watch(
            dir.path(),
            AddWatchFlags::IN_CREATE | AddWatchFlags::IN_ATTRIB,
        )
        .unwrap();
    let server = Server::start_with(wrapper, dir, config);
    let socket = server.dir.path().join("wsd.sock");
    let meta = std::fs::metadata(&socket).unwrap();
    assert!(meta.file_type().is_socket());
    assert_eq!(meta.permissions().mode() & 0o7777, 0o600, "{socket:?}");
    // The mode it has now is the one it was created with: its attributes never changed.
    let mut seen = Vec::new();
    while let Ok(events) = watch.read_events() {
        seen.extend(
            events
                .into_iter()
                .filter(|e| e.name.as_deref() == Some(std::ffi::OsStr::new("wsd.sock")))
                .map(|e| e.mask),
        );
    }
    assert!(
        seen.first() == Some(&AddWatchFlags::IN_CREATE)
            && seen.iter().all(|m| !m.contains(AddWatchFlags::IN_ATTRIB)),
        "created, then never changed: {seen:?}"
    );
}

#[test]
fn a_peer_of_another_user_is_refused_by_its_credentials() {
    use std::os::unix::fs::PermissionsExt;
    use std::os::unix::process::CommandExt;
    if !nix::unistd::geteuid().is_root() {
        println!("skipped: running a client as uid 65534 needs root");
        return;
    }
    let mut server = Server::start("echo", 1);
    let dir = server.dir.path().to_path_buf();
    let socket = dir.join("wsd.sock");
    let bin = wsd_copy_in(&dir);
    // A directory others may pass through, a config they may read: the socket's own mode is
    // the only barrier left.
    let open = |p: &std::path::Path, mode| {
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).unwrap()
    };
    open(&dir, 0o755);
    open(&server.config, 0o644);
    let status_as_nobody = || {
        run_to_end(
            std::process::Command::new(&bin)
                .arg("-c")
                .arg(&server.config)
                .arg("status")
                .env(LIBRARY_SERVER_ENV, "1")
                .uid(65534)
                .gid(65534),
        )
    };
    let (_, code, stderr) = status_as_nobody();
    assert_eq!(code, Some(1), "{stderr}");
    assert_eq!(
        stderr,
        format!("wsd: permission denied on {}\n", socket.display())
    );

    // Misconfigured: the socket opened to everyone. Its peer's credentials still decide.
    open(&socket, 0o666);
    let (pid, code, stderr) = status_as_nobody();
    assert_eq!(code, Some(1), "{stderr}");
    assert_eq!(
        stderr,
        "wsd: permission denied: uid 65534 may not command this master\n"
    );
    server.wait_for_log(&format!("refused uid 65534 (pid {pid})"));
    assert!(
        server.master_output().lines().any(|l| l.contains(" WARN ")
            && l.contains(&format!("control socket: refused uid 65534 (pid {pid})"))),
        "{}",
        server.master_output()
    );
    // The master carries on, and serves root.
    let st = server.status();
    assert_eq!(st["groups"][0]["count"], 1, "{st}");
}
