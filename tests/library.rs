//! The library API, used the way a Rust programmer would: this test binary is itself a wsd
//! program (hooks in code, `wsd::run_all`). Run with `WSD_LIBRARY_SERVER=1` it is the server;
//! otherwise it is the test driver that starts itself as a server and checks the hooks.
//!
//! `harness = false` because a forking master must be the main thread of its process, not a
//! libtest worker thread.

mod common;

use common::*;
use std::cell::Cell;
use std::rc::Rc;
use std::time::Duration;

fn server_program() -> ! {
    let mut worker = wsd::Worker::new("websocket://127.0.0.1:0");
    worker.name = "hooks".into();
    worker.count = 2;
    worker.on_worker_start(|ctx| {
        // One long-lived timer, and one deleted before it could fire.
        ctx.add_timer(Duration::from_secs(3600), |_| {});
        let doomed = ctx.add_timer_once(Duration::from_millis(1), |ctx| {
            ctx.broadcast_local("must never be seen");
        });
        assert!(ctx.del_timer(doomed));
    });
    worker.on_connect(|ctx, conn| {
        let path = ctx.path(conn).unwrap_or("?").to_string();
        let text = format!(
            "welcome {conn} on worker {} path {path} from {}",
            ctx.worker_id(),
            ctx.remote_addr(conn).unwrap().ip()
        );
        let _ = ctx.send(conn, text);
        ctx.add_timer_once(Duration::ZERO, move |ctx| {
            let _ = ctx.send(conn, "once");
        });
    });
    worker.on_message(|ctx, conn, msg| match msg.as_text() {
        Some("panic") => panic!("the app has a bug"),
        Some("close me") => ctx.close_with(conn, 4000, "as you wish"),
        Some("count") => {
            let n = ctx.connection_count();
            let ids = ctx.connections();
            assert!(ids.contains(&conn));
            let _ = ctx.send(
                conn,
                format!("{n} {} timers {}", ids.len(), ctx.timer_count()),
            );
        }
        Some("tick3") => {
            // A repeating timer that deletes itself on its third run.
            let me: Rc<Cell<Option<wsd::TimerId>>> = Rc::default();
            let (mine, mut n) = (me.clone(), 0);
            let id = ctx.add_timer(Duration::from_millis(10), move |ctx| {
                n += 1;
                let _ = ctx.send(conn, format!("tick {n}"));
                if n == 3 {
                    assert!(ctx.del_timer(mine.get().unwrap()));
                }
            });
            me.set(Some(id));
        }
        Some("block") => std::thread::sleep(Duration::from_secs(8)),
        Some("NOTIFY_SOCKET?") => {
            let seen = std::env::var("NOTIFY_SOCKET").unwrap_or_else(|_| "unset".into());
            let _ = ctx.send(conn, seen);
        }
        Some(text) if text.starts_with("me ") => {
            let bound = ctx.bind_user(conn, &text[3..]);
            let _ = ctx.send(conn, format!("bound {bound}"));
        }
        Some(text) if text.starts_with("where ") => {
            // Answered once every worker has said: by then this connection may be gone.
            let who = text[6..].to_string();
            ctx.user_connections(&who.clone(), move |ctx, ids| {
                let n = ids.len();
                ctx.is_online(&who.clone(), move |ctx, online| {
                    let _ = ctx.send(conn, format!("{who}: {n} online {online}"));
                });
            });
        }
        Some("later") => {
            ctx.add_timer_once(Duration::from_millis(20), move |ctx| {
                let _ = ctx.send(conn, "later");
            });
        }
        _ => {
            let _ = ctx.send(conn, msg);
        }
    });
    worker.on_close(|ctx, conn| {
        assert!(
            ctx.send(conn, "gone").is_err(),
            "a closed connection's id reaches nobody"
        );
        log::info!("hook saw close of {conn}");
    });
    worker.on_error(|_ctx, conn, err| {
        let code = err
            .close_code()
            .map_or("no close".to_string(), |c| c.to_string());
        log::info!("hook saw error on {conn}: {err} ({code})")
    });
    wsd::run_all(vec![worker]);
}

/// The worker slot named in the `on_connect` welcome line.
fn slot_of(welcome: &str) -> usize {
    let after = welcome
        .split(" on worker ")
        .nth(1)
        .unwrap_or_else(|| panic!("{welcome}"));
    after.split(' ').next().unwrap().parse().unwrap()
}

fn start() -> Server {
    start_env(&[])
}

fn start_env(env: &[(&str, &std::path::Path)]) -> Server {
    let dir = tempfile::tempdir().unwrap();
    // No [[worker]] groups: the program defines its own in code.
    let config = dir.path().join("workers.toml");
    std::fs::write(
        &config,
        "[server]\nstop_timeout = \"5s\"\nlog_level = \"info\"\n",
    )
    .unwrap();
    let bin = std::env::current_exe().unwrap();
    Server::start_with_env(bin, dir, config, env)
}

fn workers_do_not_inherit_notify_socket() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("notify.sock");
    let systemd = std::os::unix::net::UnixDatagram::bind(&path).unwrap();
    systemd.set_read_timeout(Some(DEADLINE)).unwrap();
    let server = start_env(&[("NOTIFY_SOCKET", &path)]);
    let mut buf = [0u8; 512];
    let n = systemd.recv(&mut buf).expect("READY from the master");
    assert!(buf[..n].starts_with(b"READY=1\n"));
    for _ in 0..4 {
        let mut c = server.connect();
        let _welcome = c.recv_text();
        assert_eq!(c.recv_text(), "once");
        c.send_text("NOTIFY_SOCKET?");
        assert_eq!(
            c.recv_text(),
            "unset",
            "a worker must not speak for the service"
        );
    }
}

fn hooks_see_ids_paths_and_timers() {
    let server = start();
    let mut c = server.connect();
    let welcome = c.recv_text();
    assert!(
        welcome.starts_with("welcome ") && welcome.contains(" path / from 127.0.0.1"),
        "{welcome}"
    );
    let worker_id: usize = slot_of(&welcome);
    assert!(worker_id < 2);
    assert_eq!(
        c.recv_text(),
        "once",
        "a one-shot timer added by a hook fires"
    );
    c.send_text("tick3");
    for n in 1..=3 {
        assert_eq!(c.recv_text(), format!("tick {n}"));
    }
    c.send_text("count");
    assert_eq!(c.recv_text(), "1 1 timers 1");
    c.send_text("later");
    assert_eq!(c.recv_text(), "later");
    c.send(tungstenite::Message::binary(vec![1, 2, 3])).unwrap();
    assert_eq!(c.recv(), tungstenite::Message::binary(vec![1, 2, 3]));
}

fn a_panicking_hook_closes_only_its_connection() {
    let mut server = start();
    let pids = server.worker_pids();
    let mut clients: Vec<Client> = (0..8).map(|_| server.connect()).collect();
    for c in &mut clients {
        c.recv_text(); // welcome
        c.recv_text(); // once
    }
    clients[0].send_text("panic");
    assert_eq!(clients[0].expect_close(), 1011);
    for (i, c) in clients.iter_mut().enumerate().skip(1) {
        c.send_text(&format!("still alive {i}"));
        assert_eq!(c.recv_text(), format!("still alive {i}"));
    }
    assert_eq!(server.worker_pids(), pids, "no worker died");
    let mut fresh = server.connect();
    assert!(fresh.recv_text().starts_with("welcome"));
    server.wait_for_log("on_message hook panicked");
    assert!(server.master_output().contains("the app has a bug"));
    server.wait_for_log("hook saw close");
}

fn hooks_close_with_a_code_and_hear_about_errors() {
    let server = start();
    let mut c = server.connect();
    c.recv_text();
    c.send_text("close me");
    let code = loop {
        match c.read().unwrap() {
            tungstenite::Message::Close(Some(f)) => break u16::from(f.code),
            _ => continue,
        }
    };
    assert_eq!(code, 4000);
    let mut raw = RawClient::upgrade(server.port);
    raw.frame(true, 0x1, &[0xc3, 0x28]);
    server.wait_for_log("invalid UTF-8 in a text message (1007)");
}

fn a_stuck_worker_shows_busy_and_status_does_not_hang() {
    let mut server = start();
    let mut c = server.connect();
    let welcome = c.recv_text();
    let slot: usize = slot_of(&welcome);
    c.send_text("block");
    let st = wait_for("the blocked worker to show busy", DEADLINE, || {
        let st = server.try_status()?;
        (st["workers"][slot]["status"] == "busy").then_some(st)
    });
    assert_eq!(
        st["workers"][1 - slot]["status"],
        "idle",
        "the other worker is fine: {st}"
    );
    let table = String::from_utf8(server.wsd(&["status"]).stdout).unwrap();
    assert!(table.contains("[busy]"), "{table}");
    // Once the hook returns, the worker answers again.
    c.send_text("after");
    assert_eq!(c.recv_text(), "once");
    assert_eq!(c.recv_text(), "after");
    server.wait_ready();
}

/// `user_connections` and `is_online` answer for every worker, through the app's callback.
fn users_are_found_on_every_worker() {
    let server = start();
    let mut clients: Vec<Client> = (0..8).map(|_| server.connect()).collect();
    let mut workers = std::collections::BTreeSet::new();
    for (i, c) in clients.iter_mut().enumerate() {
        workers.insert(slot_of(&c.recv_text()));
        assert_eq!(c.recv_text(), "once");
        if i % 2 == 0 {
            c.send_text("me ada");
            assert_eq!(c.recv_text(), "bound true");
        }
    }
    for c in clients.iter_mut() {
        c.send_text("where ada");
        assert_eq!(c.recv_text(), "ada: 4 online true");
    }
    clients[1].send_text("where nobody");
    assert_eq!(clients[1].recv_text(), "nobody: 0 online false");
    assert!(!workers.is_empty());
}

fn main() {
    if std::env::var_os(LIBRARY_SERVER_ENV).is_some() {
        server_program();
    }
    run_suite(&[
        (
            "a_stuck_worker_shows_busy_and_status_does_not_hang",
            a_stuck_worker_shows_busy_and_status_does_not_hang,
        ),
        (
            "hooks_see_ids_paths_and_timers",
            hooks_see_ids_paths_and_timers,
        ),
        (
            "a_panicking_hook_closes_only_its_connection",
            a_panicking_hook_closes_only_its_connection,
        ),
        (
            "hooks_close_with_a_code_and_hear_about_errors",
            hooks_close_with_a_code_and_hear_about_errors,
        ),
        (
            "workers_do_not_inherit_notify_socket",
            workers_do_not_inherit_notify_socket,
        ),
        (
            "users_are_found_on_every_worker",
            users_are_found_on_every_worker,
        ),
    ]);
}
