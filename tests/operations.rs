//! Operating a running server: rolling reload, stop modes, the connections view, log reopen,
//! and a worker killed under traffic. Real `wsd` processes, real sockets, real signals.

mod common;

use common::*;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde_json::Value;
use std::collections::HashMap;
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
    if let Err(e) = c.ws.send(Message::text(msg.clone())) {
        tally
            .failures
            .lock()
            .unwrap()
            .push(format!("send {n}: {e}"));
        return;
    }
    loop {
        match c.ws.read() {
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
    // A client that stays connected is told to go with 1001 when its worker is replaced.
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
    assert_eq!(resident.expect_close(), 1001);
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
        c.ws.send(Message::text(msg.clone()))
            .map_err(|e| format!("send {seq}: {e}"))?;
        match c.ws.read() {
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
    let out = server.wsd(&["connections", "--json"]);
    assert!(out.status.success(), "{}", text(&out));
    let view: Value = serde_json::from_slice(&out.stdout).unwrap();
    let owner: HashMap<u16, i32> = view["conns"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            let port = r["remote"].as_str().unwrap().rsplit(':').next().unwrap();
            (port.parse().unwrap(), r["pid"].as_i64().unwrap() as i32)
        })
        .collect();
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
