//! The `wsd` binary with real processes, sockets and signals: start, serve, respawn, stop.

mod common;

use common::*;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use std::collections::HashSet;
use std::path::Path;
use std::time::{Duration, Instant};
use tungstenite::Message;

#[test]
fn fifty_clients_echo_and_spread_over_four_workers() {
    let mut server = Server::start("echo", 4);
    let mut clients: Vec<Client> = (0..50).map(|_| server.connect()).collect();
    for (i, c) in clients.iter_mut().enumerate() {
        c.send_text(&format!("message {i}"));
        c.send(Message::binary(vec![i as u8; 3000])).unwrap();
    }
    for (i, c) in clients.iter_mut().enumerate() {
        assert_eq!(c.recv_text(), format!("message {i}"));
        assert_eq!(c.recv(), Message::binary(vec![i as u8; 3000]));
    }
    let st = wait_for("status to count 50 connections", DEADLINE, || {
        let st = server.status();
        (workers_sum(&st, "connections") == 50).then_some(st)
    });
    let workers = st["workers"].as_array().unwrap();
    let pids: HashSet<i64> = workers.iter().map(|w| w["pid"].as_i64().unwrap()).collect();
    assert_eq!(pids.len(), 4, "4 distinct worker pids: {pids:?}");
    assert!(!pids.contains(&(server.master_pid() as i64)));
    let busy = workers
        .iter()
        .filter(|w| w["connections"].as_i64() > Some(0))
        .count();
    assert!(
        busy >= 2,
        "connections spread over at least 2 workers: {st}"
    );
    for w in workers {
        assert_eq!(w["name"], "echo");
        assert!(
            w["listen"]
                .as_str()
                .unwrap()
                .ends_with(&format!(":{}", server.port))
        );
        assert!(w["slot"].as_u64().unwrap() < 4);
    }
    wait_for("total_request to reach 100", DEADLINE, || {
        (workers_sum(&server.status(), "total_request") == 100).then_some(())
    });
    assert!(st["master"]["pid"].as_i64() == Some(server.master_pid() as i64));

    let table = String::from_utf8(server.wsd(&["status"]).stdout).unwrap();
    for col in [
        "pid",
        "memory",
        "listening",
        "name",
        "connections",
        "send_fail",
        "timers",
        "total_request",
        "qps",
        "status",
        "Summary",
        "load average",
    ] {
        assert!(table.contains(col), "status table has {col}:\n{table}");
    }
}

#[test]
fn killed_worker_is_respawned_on_its_slot_and_clients_are_served_throughout() {
    let mut server = Server::start("echo", 4);
    let before = server.worker_pids();
    let victim = before[1];
    let port = server.port;

    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stop2 = stop.clone();
    let load = std::thread::spawn(move || {
        let mut served = 0;
        while !stop2.load(std::sync::atomic::Ordering::Relaxed) {
            let mut c = Client::connect(port);
            c.send_text("still there?");
            assert_eq!(c.recv_text(), "still there?");
            served += 1;
        }
        served
    });

    let killed_at = Instant::now();
    kill(Pid::from_raw(victim), Signal::SIGKILL).unwrap();
    let new_pid = wait_for("a new pid on slot 1", Duration::from_secs(2), || {
        let st = server.try_status()?;
        let w = &st["workers"][1];
        let pid = w["pid"].as_i64()? as i32;
        (pid != victim && pid > 0).then_some(pid)
    });
    assert!(killed_at.elapsed() < Duration::from_secs(2));
    assert!(alive(new_pid));
    server.wait_ready();
    let st = server.status();
    assert_eq!(st["groups"][0]["exits"]["killed by SIGKILL"], 1, "{st}");
    for (i, pid) in before.iter().enumerate() {
        if i != 1 {
            assert_eq!(
                st["workers"][i]["pid"].as_i64(),
                Some(*pid as i64),
                "other workers untouched"
            );
        }
    }
    // Keep serving for a moment with the new worker in place, then check nobody was refused.
    wait_for("the new worker to take a connection", DEADLINE, || {
        let st = server.try_status()?;
        (st["workers"][1]["accepted"].as_u64()? > 0).then_some(())
    });
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let served = load
        .join()
        .expect("every client during the kill was served");
    assert!(served > 0);
    assert!(
        server
            .master_output()
            .contains(&format!("pid {victim} killed by SIGKILL")),
        "{}",
        server.master_output()
    );
}

#[test]
fn second_start_on_the_same_config_is_refused() {
    let server = Server::start("echo", 2);
    let out = server.wsd(&["start"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!("already running (pid {})", server.master_pid())),
        "{err}"
    );
}

#[test]
fn stop_closes_clients_with_1001_and_leaves_nothing_behind() {
    let mut server = Server::start("hello", 4);
    let pids = server.worker_pids();
    let mut client = server.connect();
    client.send_text("tom");
    assert_eq!(client.recv_text(), "hello tom");

    let out = server.wsd(&["stop"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(client.expect_close(), 1001);
    assert_eq!(server.wait_exit(DEADLINE), 0);
    for pid in pids {
        wait_for("worker to be gone", DEADLINE, || {
            (!alive(pid)).then_some(())
        });
    }
    assert!(
        !server.dir.path().join("wsd.pid").exists(),
        "pid file removed"
    );
    assert!(
        !server.dir.path().join("wsd.sock").exists(),
        "control socket removed"
    );
    assert!(port_is_free(server.port), "port released");

    let out = server.wsd(&["status"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("not running"));
    let out = server.wsd(&["stop"]);
    assert_eq!(out.status.code(), Some(1));
}

#[test]
fn graceful_stop_waits_for_clients_to_leave() {
    let mut server = Server::start("echo", 2);
    let mut client = server.connect();
    let mut stop = std::process::Command::new(&server.bin)
        .args(["-c", server.config.to_str().unwrap(), "stop", "-g"])
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    // The workers stop accepting but our client keeps being served.
    server.wait_for_log("waiting for clients to leave");
    for i in 0..3 {
        client.send_text(&format!("ping {i}"));
        assert_eq!(client.recv_text(), format!("ping {i}"));
    }
    assert!(
        stop.try_wait().unwrap().is_none(),
        "stop -g waits while a client is connected"
    );
    client.ws.close(None).unwrap();
    let _ = client.ws.flush();
    let status = wait_for("stop -g to finish", DEADLINE, || stop.try_wait().unwrap());
    assert!(status.success());
    assert_eq!(server.wait_exit(DEADLINE), 0);
}

#[test]
fn sigterm_to_master_is_a_graceful_stop() {
    let mut server = Server::start("echo", 2);
    let mut client = server.connect();
    kill(Pid::from_raw(server.master_pid()), Signal::SIGTERM).unwrap();
    assert_eq!(client.expect_close(), 1001);
    assert_eq!(server.wait_exit(DEADLINE), 0);
}

#[test]
fn a_port_taken_by_another_program_is_an_error_before_any_fork() {
    let squatter = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = squatter.local_addr().unwrap().port();
    let (dir, config) = Server::config("echo", 4, "");
    let text = std::fs::read_to_string(&config)
        .unwrap()
        .replace("127.0.0.1:0", &format!("127.0.0.1:{port}"));
    std::fs::write(&config, text).unwrap();
    let (out, err) = refused_start(&config);
    assert!(
        err.contains(&format!("127.0.0.1:{port}")) && err.contains("already in use"),
        "{err}"
    );
    assert!(!out.contains("started"), "no worker was forked");
    assert!(!dir.path().join("wsd.pid").exists());
}

#[test]
fn bad_config_is_rejected_with_file_line_and_reason() {
    let (dir, config) = Server::config("echo", 4, "max_conections = 10");
    for cmd in ["check", "start"] {
        let out = std::process::Command::new(wsd_bin())
            .args(["-c", config.to_str().unwrap(), cmd])
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(1), "{cmd}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains(&format!("{}:8:", config.display())) && err.contains("max_conections"),
            "{cmd}: {err}"
        );
    }
    assert!(!dir.path().join("wsd.pid").exists());
    let (_dir, good) = Server::config("hello", 2, "");
    let out = std::process::Command::new(wsd_bin())
        .args(["-c", good.to_str().unwrap(), "check"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn config_comes_from_wsd_config_env() {
    let (dir, config) = Server::config("echo", 1, "");
    let out = std::process::Command::new(wsd_bin())
        .arg("check")
        .env("WSD_CONFIG", &config)
        .current_dir(dir.path().parent().unwrap())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains(config.to_str().unwrap()));
}

#[test]
fn daemon_mode_detaches_with_pid_file_and_log() {
    let (dir, config) = Server::config("hello", 2, "");
    let out = std::process::Command::new(wsd_bin())
        .args(["-c", config.to_str().unwrap(), "start", "-d"])
        .output()
        .unwrap();
    let pid_file = dir.path().join("wsd.pid");
    let pid = pid_in(&pid_file);
    // Make sure the daemon dies even if an assertion below fails.
    let _reap = KillOnDrop(pid);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let banner = String::from_utf8_lossy(&out.stdout);
    assert!(
        banner.contains("[OK]") && banner.contains("Start success"),
        "{banner}"
    );
    assert!(pid > 0 && alive(pid));
    let st = std::process::Command::new(wsd_bin())
        .args(["-c", config.to_str().unwrap(), "status", "--json"])
        .output()
        .unwrap();
    let st: serde_json::Value = serde_json::from_slice(&st.stdout).unwrap();
    assert_eq!(st["master"]["pid"].as_i64(), Some(pid as i64));
    let worker_pids: Vec<i32> = st["workers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| w["pid"].as_i64().unwrap() as i32)
        .collect();
    let out = std::process::Command::new(wsd_bin())
        .args(["-c", config.to_str().unwrap(), "stop"])
        .output()
        .unwrap();
    assert!(out.status.success());
    wait_for("daemon to exit", DEADLINE, || (!alive(pid)).then_some(()));
    for w in worker_pids {
        wait_for("worker to exit", DEADLINE, || (!alive(w)).then_some(()));
    }
    let log = std::fs::read_to_string(dir.path().join("wsd.log")).unwrap();
    assert!(
        log.contains("master") && log.contains("all workers stopped"),
        "{log}"
    );
    assert!(!pid_file.exists());
}

#[test]
fn protocol_basics_fragments_ping_and_close_handshake() {
    let server = Server::start("echo", 1);
    let mut raw = RawClient::upgrade(server.port);
    // A text message in three fragments, with a ping in the middle.
    raw.frame(false, 0x1, b"frag");
    raw.frame(false, 0x0, b"men");
    raw.frame(true, 0x9, b"are you there");
    raw.frame(true, 0x0, b"ted");
    assert_eq!(
        raw.read_frame(),
        (true, 0xA, b"are you there".to_vec()),
        "pong first"
    );
    assert_eq!(raw.read_frame(), (true, 0x1, b"fragmented".to_vec()));
    // Binary stays binary, with a 16-bit length.
    let big = vec![7u8; 70_000];
    raw.frame(true, 0x2, &big);
    assert_eq!(raw.read_frame(), (true, 0x2, big));
    // Client-initiated close: the server echoes the code and closes TCP.
    raw.frame(true, 0x8, &[0x03, 0xE8, b'b', b'y', b'e']);
    let (_, op, payload) = raw.read_frame();
    assert_eq!(op, 0x8);
    assert_eq!(&payload[..2], &[0x03, 0xE8]);
    assert!(raw.closed_by_server());
}

#[test]
fn protocol_errors_close_only_that_connection_with_the_right_code() {
    let server = Server::start("echo", 1);
    let mut good = server.connect();
    // Invalid UTF-8 in a text frame → 1007.
    let mut raw = RawClient::upgrade(server.port);
    raw.frame(true, 0x1, &[0xff, 0xfe]);
    let (_, op, payload) = raw.read_frame();
    assert_eq!(
        (op, u16::from_be_bytes([payload[0], payload[1]])),
        (0x8, 1007)
    );
    // A reserved opcode → 1002.
    let mut raw = RawClient::upgrade(server.port);
    raw.frame(true, 0x3, b"x");
    let (_, op, payload) = raw.read_frame();
    assert_eq!(
        (op, u16::from_be_bytes([payload[0], payload[1]])),
        (0x8, 1002)
    );
    // Over max_message_size (1 MiB default) → 1009.
    let mut raw = RawClient::upgrade(server.port);
    raw.frame(true, 0x2, &vec![1u8; (1 << 20) + 1]);
    let (_, op, payload) = raw.read_frame();
    assert_eq!(
        (op, u16::from_be_bytes([payload[0], payload[1]])),
        (0x8, 1009)
    );
    // The well-behaved client never noticed.
    good.send_text("fine");
    assert_eq!(good.recv_text(), "fine");
}

#[test]
fn hello_and_clock_apps_follow_the_seed() {
    let hello = Server::start("hello", 1);
    let mut c = hello.connect();
    c.send_text("tom");
    assert_eq!(c.recv_text(), "hello tom");
    drop(hello);

    let mut clock = Server::start("clock", 2);
    let mut c = clock.connect();
    c.send_text("Hello Server!");
    let pushed = c.recv_text();
    let time = pushed
        .strip_prefix("Hello Client! Now is ")
        .unwrap_or_else(|| panic!("{pushed}"));
    assert!(
        time.len() == 8 && time.as_bytes()[2] == b':' && time.as_bytes()[5] == b':',
        "{pushed}"
    );
    let st = clock.status();
    assert!(
        st["workers"]
            .as_array()
            .unwrap()
            .iter()
            .all(|w| w["timers"] == 1),
        "one timer per worker: {st}"
    );
    clock.wait_for_log("Message From client: Hello Server!");
}

#[test]
fn master_is_single_threaded_so_forking_is_safe() {
    let server = Server::start("echo", 2);
    let tasks = std::fs::read_dir(format!("/proc/{}/task", server.master_pid()))
        .unwrap()
        .count();
    assert_eq!(
        tasks, 1,
        "the master forks workers and must never start a thread"
    );
}

#[test]
fn status_watch_refreshes_in_place() {
    let server = Server::start("echo", 1);
    let out_path = server.dir.path().join("watch.out");
    let mut watch = std::process::Command::new(wsd_bin())
        .args(["-c", server.config.to_str().unwrap(), "status", "-w"])
        .stdout(std::fs::File::create(&out_path).unwrap())
        .spawn()
        .unwrap();
    let seen = std::panic::catch_unwind(|| {
        wait_for("two refreshes", DEADLINE, || {
            let text = std::fs::read_to_string(&out_path).ok()?;
            (text.matches("GLOBAL STATUS").count() >= 2).then_some(text)
        })
    });
    let _ = watch.kill();
    let _ = watch.wait();
    let text = seen.expect("status -w refreshed");
    assert!(
        text.contains("\x1b[H\x1b[2J"),
        "clears the screen between refreshes"
    );
}

#[test]
fn restart_replaces_the_master_and_keeps_serving() {
    let mut server = Server::start("hello", 2);
    let old_master = server.master_pid();
    let out = server.wsd(&["restart", "-d"]);
    let new_master = pid_in(&server.dir.path().join("wsd.pid"));
    let _reap = KillOnDrop(new_master);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(server.wait_exit(DEADLINE), 0, "the old master exited");
    assert!(new_master > 0 && new_master != old_master && alive(new_master));
    let st = server.status();
    assert_eq!(st["master"]["pid"].as_i64(), Some(new_master as i64));
    let port = listen_port_in(&st);
    let mut c = Client::connect(port);
    c.send_text("again");
    assert_eq!(c.recv_text(), "hello again");
    assert!(server.wsd(&["stop"]).status.success());
    wait_for("new master to exit", DEADLINE, || {
        (!alive(new_master)).then_some(())
    });
}

#[test]
fn one_worker_holds_thousands_of_connections() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    const N: usize = 2000;
    let (_, hard) = getrlimit(Resource::RLIMIT_NOFILE).unwrap();
    setrlimit(Resource::RLIMIT_NOFILE, hard.min(16_384), hard).unwrap();
    if hard < (N as u64) * 2 + 200 {
        panic!(
            "need {} file descriptors, the hard limit is {hard}",
            N * 2 + 200
        );
    }
    // The worker inherits the raised limit from the master this test starts. Every client
    // comes from 127.0.0.1, so the per-address cap is lifted.
    let mut server = Server::start_extra("echo", 1, "max_connections_per_ip = 0");
    let mut clients: Vec<Client> = (0..N).map(|_| server.connect()).collect();
    for (i, c) in clients.iter_mut().enumerate() {
        c.send_text(&i.to_string());
    }
    for (i, c) in clients.iter_mut().enumerate() {
        assert_eq!(c.recv_text(), i.to_string());
    }
    wait_for("status to count every connection", DEADLINE, || {
        let st = server.try_status()?;
        (st["workers"][0]["connections"].as_u64()? == N as u64).then_some(())
    });
}

/// CPU time (user + system, in clock ticks) a process has used.
fn cpu_ticks(pid: i32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // Fields after the command name, which is in parentheses and may hold spaces.
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let fields: Vec<&str> = rest.split(' ').collect();
    fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap()
}

#[test]
fn out_of_descriptors_pauses_accepting_without_spinning() {
    let mut server = Server::start_extra("echo", 1, "max_connections_per_ip = 0");
    let worker = server.worker_pids()[0];
    // Leave the worker a handful of descriptors beyond those it already holds.
    let limit = std::fs::read_dir(format!("/proc/{worker}/fd"))
        .unwrap()
        .count()
        + 6;
    let ok = std::process::Command::new("prlimit")
        .args([
            "--pid",
            &worker.to_string(),
            &format!("--nofile={limit}:{limit}"),
        ])
        .status()
        .expect("prlimit (util-linux)");
    assert!(ok.success());
    // Many more clients than it can take: the rest wait in the listen backlog.
    let pending: Vec<std::net::TcpStream> = (0..40)
        .map(|_| std::net::TcpStream::connect(("127.0.0.1", server.port)).unwrap())
        .collect();
    server.wait_for_log("pausing accepts");
    // A loop spinning on a readable listener would burn a whole core; a paused one sleeps.
    let before = cpu_ticks(worker);
    std::thread::sleep(Duration::from_secs(2));
    let used = cpu_ticks(worker) - before;
    assert!(
        used < 60,
        "worker used {used} ticks in 2 s while out of descriptors"
    );
    // Descriptors come back when clients leave, and service resumes.
    drop(pending);
    let mut c = server.connect();
    c.send_text("still here");
    assert_eq!(c.recv_text(), "still here");
    assert_eq!(server.worker_pids(), vec![worker], "the same worker serves");
}

#[test]
fn systemd_hears_ready_status_reloading_and_stopping() {
    use std::os::unix::net::UnixDatagram;
    let (dir, config) = Server::config("echo", 2, "");
    // A real datagram socket stands in for systemd's NOTIFY_SOCKET.
    let path = dir.path().join("notify.sock");
    let systemd = UnixDatagram::bind(&path).unwrap();
    systemd.set_read_timeout(Some(DEADLINE)).unwrap();
    let next = || {
        let mut buf = [0u8; 4096];
        let n = systemd.recv(&mut buf).expect("a notification");
        String::from_utf8(buf[..n].to_vec()).unwrap()
    };
    let mut server =
        Server::start_with_env(wsd_bin(), dir, config, &[("NOTIFY_SOCKET", path.as_path())]);
    let ready = next();
    assert!(ready.contains("READY=1\n"), "{ready:?}");
    let serving = format!(
        "STATUS=serving: echo x2 on websocket://127.0.0.1:{}",
        server.port
    );
    assert!(ready.contains(&serving), "{ready:?}");
    // Both workers were up when READY came: a client is served at once by either.
    assert_eq!(server.status()["workers"].as_array().unwrap().len(), 2);
    let mut c = server.connect();
    c.send_text("up");
    assert_eq!(c.recv_text(), "up");
    // (That workers do not inherit NOTIFY_SOCKET is checked from inside one, in
    // tests/library.rs: /proc/PID/environ of a forked child shows its parent's initial block.)
    let workers = server.worker_pids();
    kill(Pid::from_raw(workers[0]), Signal::SIGKILL).unwrap();
    let status = next();
    assert!(
        status.starts_with("STATUS=worker echo#") && status.contains("killed by SIGKILL"),
        "{status:?}"
    );
    server.wait_ready();
    // A reload is bracketed by RELOADING=1 (with the monotonic time systemd matches it by)
    // and READY=1.
    assert!(server.wsd(&["reload"]).status.success());
    let reloading = next();
    assert!(reloading.contains("RELOADING=1\n"), "{reloading:?}");
    let usec: u64 = reloading
        .lines()
        .find_map(|l| l.strip_prefix("MONOTONIC_USEC="))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("MONOTONIC_USEC in {reloading:?}"));
    assert!(usec > 0);
    let ready = next();
    assert!(
        ready.contains("READY=1\n") && ready.contains(&serving),
        "{ready:?}"
    );
    assert!(server.wsd(&["stop"]).status.success());
    let stopping = next();
    assert!(stopping.contains("STOPPING=1\n"), "{stopping:?}");
    assert_eq!(server.wait_exit(DEADLINE), 0);
}

#[test]
fn the_systemd_unit_installs_and_passes_systemd_analyze_verify() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let stage = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(root.join("scripts/install-systemd.sh"))
        .env("DESTDIR", stage.path())
        .env("WSD_BIN", wsd_bin())
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let unit_path = stage.path().join("etc/systemd/system/wsd.service");
    let config = stage.path().join("etc/wsd/workers.toml");
    let bin = stage.path().join("usr/local/bin/wsd");
    assert!(bin.exists() && config.exists());
    let unit = std::fs::read_to_string(&unit_path).unwrap();
    for line in [
        "Type=notify",
        "NotifyAccess=main",
        "ExecReload=/usr/local/bin/wsd -c /etc/wsd/workers.toml reload",
        "KillMode=mixed",
        "Restart=on-failure",
        "AmbientCapabilities=CAP_NET_BIND_SERVICE",
    ] {
        assert!(unit.lines().any(|l| l == line), "unit lacks {line}");
    }
    assert!(unit.contains("ExecStartPre=/usr/local/bin/wsd -c /etc/wsd/workers.toml check"));
    // systemd-analyze checks the commands exist: point them at the staged files.
    let staged = unit
        .replace("/usr/local/bin/wsd", bin.to_str().unwrap())
        .replace("/etc/wsd/workers.toml", config.to_str().unwrap())
        .replace(
            "file:///usr/local/",
            &format!("file://{}/usr/local/", stage.path().display()),
        );
    let check = stage.path().join("wsd.service");
    std::fs::write(&check, staged).unwrap();
    let out = std::process::Command::new("systemd-analyze")
        .arg("verify")
        .arg(&check)
        .output()
        .expect("systemd-analyze");
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && !said.contains("wsd.service"),
        "{said}"
    );
    // The installed config keeps its runtime files out of /etc.
    let text = std::fs::read_to_string(&config).unwrap();
    assert!(text.contains("pid_file = \"/run/wsd/wsd.pid\""), "{text}");
}

#[test]
fn an_exiting_master_leaves_a_control_socket_that_is_not_its_own() {
    let mut server = Server::start("echo", 1);
    let path = server.dir.path().join("wsd.sock");
    // Someone else now owns the path.
    std::fs::remove_file(&path).unwrap();
    let _theirs = std::os::unix::net::UnixListener::bind(&path).unwrap();
    kill(Pid::from_raw(server.master_pid()), Signal::SIGTERM).unwrap();
    assert_eq!(server.wait_exit(DEADLINE), 0);
    assert!(
        path.exists(),
        "the master removed a socket it did not create"
    );
}

#[test]
fn a_second_master_cannot_take_over_a_live_control_socket() {
    // Two configs in one folder with their own pid files but the default control socket, on
    // one fixed port (from the OS).
    let (dir, first) = Server::config("echo", 1, "");
    let port = free_port();
    let text = std::fs::read_to_string(&first)
        .unwrap()
        .replace("127.0.0.1:0", &format!("127.0.0.1:{port}"));
    std::fs::write(
        &first,
        text.replacen("[server]\n", "[server]\npid_file = \"a.pid\"\n", 1),
    )
    .unwrap();
    let second = dir.path().join("second.toml");
    std::fs::write(
        &second,
        text.replacen("[server]\n", "[server]\npid_file = \"b.pid\"\n", 1),
    )
    .unwrap();
    let a_pid = dir.path().join("a.pid");
    let mut server = Server::start_with(wsd_bin(), dir, first.clone());
    // The same answer (not "address in use") for the first config once its pid file is gone.
    for config in [&second, &first] {
        if config == &first {
            std::fs::remove_file(&a_pid).unwrap();
        }
        let (_, said) = refused_start(config);
        assert!(said.contains("a master is already running"), "{said}");
    }
    // The first master still answers on its socket.
    assert_eq!(server.status()["workers"].as_array().unwrap().len(), 1);
}
