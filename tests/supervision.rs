//! Supervision from the outside: a master killed with `kill -9`, a stale pid file that names an
//! unrelated live process, and a group whose workers die at start.
//!
//! Like `tests/library.rs`, this test binary is itself a wsd program: run with
//! `WSD_LIBRARY_SERVER=1` it is the server (the built-in apps plus `crash_at_start`, whose
//! workers exit with status 3 in `on_worker_start`); otherwise it is the test driver.
//! `harness = false` because a forking master must be the main thread of its process.

mod common;

use common::*;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

/// The respawn delays of one slot before the master gives up: 100 ms doubling
/// (`supervisor::MIN_BACKOFF`), one per death until the fifth (`BOOT_FAILURES`).
const BACKOFF_MS: [u64; 4] = [100, 200, 400, 800];

fn server_program() -> ! {
    wsd::Runner::new()
        .app("crash_at_start", |w| {
            w.on_worker_start(|_| std::process::exit(3));
        })
        .app("hang_on_message", |w| {
            // A worker stuck in a hook for good: only SIGKILL ends it.
            w.on_message(|_, _, _| std::thread::sleep(Duration::from_secs(3600)));
        })
        .app("crash_when_marked", |w| {
            // Echo, but a worker started while the marker file exists dies at start: a new
            // build that cannot come up, as a reload meets it.
            w.on_worker_start(|_| {
                let marker = std::env::var_os(MARKER_ENV).expect("marker path");
                if Path::new(&marker).exists() {
                    std::process::exit(3);
                }
            });
            w.on_message(|ctx, conn, msg| {
                let _ = ctx.send(conn, msg);
            });
        })
        .app("chat_crash_when_marked", |w| {
            // Chat, and "who" answers the worker's slot; a worker whose slot is written in the
            // marker file dies at start.
            w.on_worker_start(|ctx| {
                let marker = std::env::var_os(MARKER_ENV).expect("marker path");
                if std::fs::read_to_string(marker).is_ok_and(|s| s == ctx.worker_id().to_string()) {
                    std::process::exit(3);
                }
            });
            w.on_message(|ctx, conn, msg| {
                if msg.as_text() == Some("who") {
                    let _ = ctx.send(conn, ctx.worker_id().to_string());
                } else {
                    ctx.broadcast(msg);
                }
            });
        })
        .run()
}

const MARKER_ENV: &str = "WSD_TEST_CRASH_MARKER";

fn this_program() -> PathBuf {
    std::env::current_exe().expect("the test binary's path")
}

/// Runs `this_program -c config args` as the CLI.
fn cli(config: &Path, args: &[&str]) -> Output {
    Command::new(this_program())
        .arg("-c")
        .arg(config)
        .args(args)
        .env(LIBRARY_SERVER_ENV, "1")
        .stdin(Stdio::null())
        .output()
        .expect("run the CLI")
}

fn echo_round_trip(server: &Server) {
    let mut client = server.connect();
    client.send_text("still here");
    assert_eq!(client.recv_text(), "still here");
}

fn kill_9_of_the_master_takes_every_worker_and_start_works_again() {
    let mut first = Server::start_program(this_program(), "echo", 4, "");
    let workers = first.worker_pids();
    assert_eq!(workers.len(), 4);
    let pid_file = first.dir.path().join("wsd.pid");
    let socket = first.dir.path().join("wsd.sock");

    kill(Pid::from_raw(first.master_pid()), Signal::SIGKILL).unwrap();
    // waitpid: the master is dead from here on.
    assert_eq!(first.wait_exit(DEADLINE), -1, "killed by a signal");
    let dead_at = Instant::now();
    wait_for(
        "every worker to die within 1 s of its master",
        Duration::from_secs(1),
        || workers.iter().all(|&w| exited(w)).then_some(()),
    );
    println!("  workers gone {:?} after the master", dead_at.elapsed());
    assert!(
        pid_file.exists() && socket.exists(),
        "kill -9 leaves the pid file and the control socket behind"
    );

    // Start again on the same config, in the same directory.
    let dir = std::mem::replace(&mut first.dir, tempfile::tempdir().unwrap());
    let mut second = Server::start_with(this_program(), dir, first.config.clone());
    assert_eq!(pid_in(&pid_file), second.master_pid());
    echo_round_trip(&second);
    let out = second.wsd(&["stop"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(second.wait_exit(DEADLINE), 0);
}

fn a_stale_pid_file_naming_a_live_process_blocks_nothing_and_it_is_never_signalled() {
    let (dir, config) = Server::config("echo", 1, "");
    let pid_file = dir.path().join("wsd.pid");
    let mut sleeper = Command::new("sleep").arg("600").spawn().unwrap();
    let sleep_pid = sleeper.id() as i32;
    let _kill = KillOnDrop(sleep_pid);
    std::fs::write(&pid_file, format!("{sleep_pid}\n")).unwrap();
    let mut sleeping = || sleeper.try_wait().unwrap().is_none();

    for command in ["stop", "status"] {
        let out = cli(&config, &[command]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "wsd {command}: {err}");
        let expected = format!(
            "not running (stale pid file {} names pid {sleep_pid}, which is not a running wsd master)",
            pid_file.display()
        );
        assert!(err.contains(&expected), "wsd {command}: {err}");
        assert!(sleeping(), "wsd {command} left the sleep process alone");
    }

    let mut server = Server::start_with(this_program(), dir, config);
    assert_eq!(pid_in(&pid_file), server.master_pid());
    echo_round_trip(&server);
    let out = server.wsd(&["stop"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(server.wait_exit(DEADLINE), 0);
    assert!(!pid_file.exists(), "pid file removed at stop");
    assert!(sleeping(), "the unrelated process outlived start and stop");
    sleeper.kill().unwrap();
    sleeper.wait().unwrap();
}

/// The local time at the start of a log line (`2026-11-24 10:00:00.123 INFO  master[..] ..`).
fn logged_at(line: &str) -> chrono::NaiveDateTime {
    let stamp = line
        .get(..23)
        .unwrap_or_else(|| panic!("short line: {line}"));
    chrono::NaiveDateTime::parse_from_str(stamp, "%Y-%m-%d %H:%M:%S%.3f")
        .unwrap_or_else(|e| panic!("{e}: {line}"))
}

fn a_group_that_dies_at_start_stops_the_master_after_backing_off() {
    let (dir, config) = Server::config("crash_at_start", 2, "");
    let output = dir.path().join("master.out");
    let out = std::fs::File::create(&output).unwrap();
    let mut master = Command::new(this_program())
        .arg("-c")
        .arg(&config)
        .arg("start")
        .stdout(out.try_clone().unwrap())
        .stderr(out)
        .process_group(0)
        .env(LIBRARY_SERVER_ENV, "1")
        .env_remove("RUST_LOG")
        .spawn()
        .unwrap();
    let _kill = KillOnDrop(master.id() as i32);

    let status = wait_for("the crash-looping master to give up", DEADLINE, || {
        master.try_wait().unwrap()
    });
    let log = std::fs::read_to_string(&output).unwrap();
    assert_eq!(status.code(), Some(1), "{log}");
    assert!(
        log.contains(
            "every worker of group \"crash_at_start\" failed at start 5 times in a row; giving up"
        ),
        "{log}"
    );
    assert!(log.contains("exited with status 3"), "{log}");

    let started: Vec<&str> = log
        .lines()
        .filter(|l| l.contains(" worker crash_at_start#") && l.contains(" started, pid "))
        .collect();
    let slot0: Vec<chrono::NaiveDateTime> = started
        .iter()
        .filter(|l| l.contains(" worker crash_at_start#0 started"))
        .map(|l| logged_at(l))
        .collect();
    assert!(
        slot0.len() >= 5,
        "slot 0 started {} times: {log}",
        slot0.len()
    );
    for (i, (pair, backoff)) in slot0.windows(2).zip(BACKOFF_MS).enumerate() {
        let gap = (pair[1] - pair[0]).num_milliseconds();
        assert!(
            gap * 10 >= backoff as i64 * 9,
            "start {} of slot 0 came {gap} ms after the previous one, backoff is {backoff} ms: {log}",
            i + 2
        );
    }

    let pids: Vec<i32> = started
        .iter()
        .map(|l| l.rsplit(' ').next().unwrap().parse().unwrap())
        .collect();
    for pid in pids {
        assert!(exited(pid), "worker pid {pid} outlived its master");
    }
    assert!(!dir.path().join("wsd.pid").exists(), "pid file removed");
    assert!(
        !dir.path().join("wsd.sock").exists(),
        "control socket removed"
    );
}

fn a_reload_whose_new_worker_dies_at_start_keeps_the_old_workers() {
    let (dir, config) = Server::config("crash_when_marked", 2, "");
    let marker = dir.path().join("crash-now");
    let mut server = Server::start_with_env(
        this_program(),
        dir,
        config.clone(),
        &[(MARKER_ENV, marker.as_path())],
    );
    let before = server.worker_pids();
    std::fs::write(&marker, "").unwrap();
    let out = cli(&config, &["reload"]);
    let said = String::from_utf8_lossy(&out.stderr).to_string();
    assert_eq!(out.status.code(), Some(1), "{said}");
    assert!(
        said.contains("reload failed") && said.contains("exited with status 3 before it was ready"),
        "{said}"
    );
    // The old workers still serve every slot.
    let st = server.wait_ready();
    let now: Vec<i32> = st["workers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| w["pid"].as_i64().unwrap() as i32)
        .collect();
    assert_eq!(now, before);
    echo_round_trip(&server);
    // Fixed: the next reload goes through.
    std::fs::remove_file(&marker).unwrap();
    let out = cli(&config, &["reload"]);
    assert!(out.status.success(), "{out:?}");
    let st = server.wait_ready();
    let ws = st["workers"].as_array().unwrap();
    assert!(
        ws.iter()
            .all(|w| !before.contains(&(w["pid"].as_i64().unwrap() as i32)))
    );
    echo_round_trip(&server);
}

fn a_worker_stuck_past_stop_timeout_is_killed_and_the_stop_completes() {
    let (dir, config) = Server::config("hang_on_message", 2, "");
    let text = std::fs::read_to_string(&config).unwrap();
    let text = text.replace(
        "stop_timeout = \"5s\"",
        "stop_timeout = \"2s\"\nclose_spread = \"500ms\"",
    );
    std::fs::write(&config, text).unwrap();
    let mut server = Server::start_with(this_program(), dir, config.clone());
    let workers = server.worker_pids();
    let mut client = server.connect();
    client.send_text("hang");
    // The stuck worker stops reporting; wait until the master sees it.
    wait_for("a busy worker", DEADLINE, || {
        let st = server.try_status()?;
        st["workers"]
            .as_array()?
            .iter()
            .any(|w| w["status"] == "busy")
            .then_some(())
    });
    let out = cli(&config, &["stop"]);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(server.wait_exit(DEADLINE), 0);
    let log = server.master_output();
    assert!(
        log.contains("still running after stop_timeout; killing it"),
        "{log}"
    );
    assert!(log.contains("killed by SIGKILL"), "{log}");
    for pid in workers {
        wait_for("worker gone", DEADLINE, || exited(pid).then_some(()));
    }
}

/// Starts `chat_crash_when_marked` with `count` workers.
fn start_marked_chat(count: usize) -> (Server, PathBuf, PathBuf) {
    let (dir, config) = Server::config("chat_crash_when_marked", count, "");
    let marker = dir.path().join("crash-slot");
    let server = Server::start_with_env(
        this_program(),
        dir,
        config.clone(),
        &[(MARKER_ENV, marker.as_path())],
    );
    (server, config, marker)
}

/// One client on each of the group's `count` slots (the kernel spreads connections over
/// them; clients landing on a slot already covered are dropped).
fn one_client_per_slot(server: &Server, count: usize) -> Vec<Client> {
    let mut on: Vec<Option<Client>> = (0..count).map(|_| None).collect();
    wait_for("a client on every slot", DEADLINE, || {
        let mut c = server.connect();
        c.send_text("who");
        let slot: usize = c.recv_text().parse().unwrap();
        on[slot].get_or_insert(c);
        on.iter().all(Option::is_some).then_some(())
    });
    on.into_iter().flatten().collect()
}

/// A message from any one client reaches every client: the group is on one bus.
fn every_slot_hears_every_slot(clients: &mut [Client]) {
    for from in 0..clients.len() {
        let text = format!("from slot {from}");
        clients[from].send_text(&text);
        for (slot, c) in clients.iter_mut().enumerate() {
            assert_eq!(c.recv_text(), text, "slot {slot} on the bus");
        }
    }
}

fn slot_pids(st: &serde_json::Value) -> Vec<(u64, i64)> {
    let ws = st["workers"].as_array().unwrap();
    ws.iter()
        .map(|w| (w["slot"].as_u64().unwrap(), w["pid"].as_i64().unwrap()))
        .collect()
}

fn a_reload_failing_after_a_new_worker_keeps_the_rest_and_one_bus() {
    let (mut server, config, marker) = start_marked_chat(3);
    let before = server.worker_pids();
    // Slot 0's new worker comes up; slot 1's dies at start.
    std::fs::write(&marker, "1").unwrap();
    let out = cli(&config, &["reload"]);
    let said = String::from_utf8_lossy(&out.stderr).to_string();
    assert_eq!(out.status.code(), Some(1), "{said}");
    assert!(said.contains("chat_crash_when_marked#1"), "{said}");
    // The reload stops where it failed: slot 0 has its new worker, slots 1 and 2 keep their
    // old ones, and all three share the group's bus (the new worker took over slot 0's ends).
    std::fs::remove_file(&marker).unwrap();
    let st = server.wait_ready();
    let now = slot_pids(&st);
    assert_eq!(now.len(), 3, "{now:?}");
    let kept = |slot: u64| {
        now.iter()
            .any(|&(s, pid)| s == slot && pid == before[slot as usize] as i64)
    };
    assert!(!kept(0) && kept(1) && kept(2), "{before:?} -> {now:?}");
    every_slot_hears_every_slot(&mut one_client_per_slot(&server, 3));
}

fn a_reload_failing_at_its_first_worker_keeps_the_old_workers_on_their_bus() {
    let (mut server, config, marker) = start_marked_chat(2);
    let before = slot_pids(&server.status());
    std::fs::write(&marker, "0").unwrap();
    let out = cli(&config, &["reload"]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    std::fs::remove_file(&marker).unwrap();
    assert_eq!(
        slot_pids(&server.wait_ready()),
        before,
        "the old workers stay"
    );
    // A worker respawned later joins them on their bus, not the failed reload's.
    let (_, slot0) = before.iter().find(|(slot, _)| *slot == 0).unwrap();
    kill(Pid::from_raw(*slot0 as i32), Signal::SIGKILL).unwrap();
    wait_for("slot 0 respawned", DEADLINE, || {
        let st = server.try_status()?;
        let now = slot_pids(&st);
        let ready = st["workers"]
            .as_array()?
            .iter()
            .all(|w| w["status"] == "idle");
        (ready && now.len() == 2 && !now.contains(&(0, *slot0))).then_some(())
    });
    every_slot_hears_every_slot(&mut one_client_per_slot(&server, 2));
}

fn main() {
    if std::env::var_os(LIBRARY_SERVER_ENV).is_some() {
        server_program();
    }
    run_suite(&[
        (
            "a_worker_stuck_past_stop_timeout_is_killed_and_the_stop_completes",
            a_worker_stuck_past_stop_timeout_is_killed_and_the_stop_completes,
        ),
        (
            "a_reload_whose_new_worker_dies_at_start_keeps_the_old_workers",
            a_reload_whose_new_worker_dies_at_start_keeps_the_old_workers,
        ),
        (
            "a_reload_failing_after_a_new_worker_keeps_the_rest_and_one_bus",
            a_reload_failing_after_a_new_worker_keeps_the_rest_and_one_bus,
        ),
        (
            "a_reload_failing_at_its_first_worker_keeps_the_old_workers_on_their_bus",
            a_reload_failing_at_its_first_worker_keeps_the_old_workers_on_their_bus,
        ),
        (
            "kill_9_of_the_master_takes_every_worker_and_start_works_again",
            kill_9_of_the_master_takes_every_worker_and_start_works_again,
        ),
        (
            "a_stale_pid_file_naming_a_live_process_blocks_nothing_and_it_is_never_signalled",
            a_stale_pid_file_naming_a_live_process_blocks_nothing_and_it_is_never_signalled,
        ),
        (
            "a_group_that_dies_at_start_stops_the_master_after_backing_off",
            a_group_that_dies_at_start_stops_the_master_after_backing_off,
        ),
    ]);
}
