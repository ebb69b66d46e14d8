//! `app = "webhook"` against a real master and the real example backend
//! (`examples/webhook/backend.py`, Python's `http.server`): connects are decided by the backend
//! before the 101, messages are answered with commands, and a backend that is slow, answers 500
//! or invalid JSON, or is down costs only the events it fails: logged, counted, and a `connect`
//! refused with 503 rather than left hanging.

mod common;

use common::*;
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The example backend on a free port, killed on drop.
struct Backend {
    child: Child,
    port: u16,
}

impl Backend {
    fn start() -> Backend {
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/webhook/backend.py");
        let mut child = Command::new("python3")
            .arg(script)
            .stdout(Stdio::piped())
            .spawn()
            .expect("python3 runs the backend");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let port = line
            .trim()
            .strip_prefix("listening on ")
            .and_then(|p| p.parse().ok())
            .unwrap_or_else(|| panic!("the backend said {line:?}"));
        Backend { child, port }
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start(backend_port: u16, extra: &str) -> Server {
    let (dir, config) = Server::config(
        "webhook",
        1,
        &format!("url = \"http://127.0.0.1:{backend_port}/ws-events\"\n{extra}"),
    );
    Server::start_with(wsd_bin(), dir, config)
}

fn failures(server: &mut Server) -> u64 {
    server.status()["workers"][0]["webhook_failures"]
        .as_u64()
        .unwrap_or(0)
}

#[test]
fn the_backend_decides_connects_and_answers_messages() {
    let backend = Backend::start();
    let server = start(backend.port, "");
    let (mut ada, _) = Client::connect_with(server.port, "/?token=letmein", &[]).expect("accepted");
    ada.send_text("hello");
    assert_eq!(ada.recv_text(), "backend says: hello");
    // Accepted as subscribed to "news": a publish the backend asks for reaches ada.
    let (mut bob, _) = Client::connect_with(server.port, "/?token=letmein", &[]).expect("accepted");
    bob.send_text("news: the build is green");
    assert_eq!(ada.recv_text(), "the build is green");
    assert_eq!(bob.recv_text(), "the build is green");
    // Messages of one connection reach the backend, and come back, in order.
    for n in 0..20 {
        ada.send_text(&format!("n{n}"));
    }
    for n in 0..20 {
        assert_eq!(ada.recv_text(), format!("n{n}"));
    }
    // Refused with the backend's status and reason.
    let no = http_exchange(
        server.port,
        upgrade_request_to("/", "").as_bytes(),
        DEADLINE,
    );
    assert_eq!(no.status, 403, "{no:?}");
    assert!(no.body.contains("a valid token is needed"), "{no:?}");
}

#[test]
fn a_failing_backend_costs_only_its_events() {
    let backend = Backend::start();
    let mut server = start(backend.port, "webhook_timeout = 1\n");
    let (mut a, _) = Client::connect_with(server.port, "/?token=letmein", &[]).expect("accepted");
    let (mut b, _) = Client::connect_with(server.port, "/?token=letmein", &[]).expect("accepted");

    // 500 and a body that is not JSON: logged and counted; the client stays.
    a.send_text("fail500");
    a.send_text("badjson");
    a.send_text("after");
    assert_eq!(a.recv_text(), "after");
    server.wait_for_log("the backend answered 500");
    server.wait_for_log("a command in the Message answer skipped");

    // Slow past webhook_timeout: a's request fails, b is served meanwhile.
    a.send_text("slow");
    b.send_text("hello");
    assert_eq!(b.recv_text(), "backend says: hello");
    wait_for("the slow request to be counted", DEADLINE, || {
        (failures(&mut server) >= 2).then_some(())
    });

    // Down: a connect is refused with 503 at once, not left hanging.
    drop(backend);
    let started = Instant::now();
    let down = http_exchange(
        server.port,
        upgrade_request_to("/?token=letmein", "").as_bytes(),
        DEADLINE,
    );
    assert_eq!(down.status, 503, "{down:?}");
    assert!(started.elapsed() < DEADLINE);
    a.send_text("anyone?");
    wait_for("the failures to be counted", DEADLINE, || {
        (failures(&mut server) >= 4).then_some(())
    });
    let metrics_free = server.master_output();
    assert!(
        metrics_free.contains("webhook Connect event"),
        "{metrics_free}"
    );
    // The client is still connected.
    a.send(tungstenite::Message::Ping(vec![7].into())).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match a.read().unwrap() {
            tungstenite::Message::Pong(p) => {
                assert_eq!(&p[..], &[7]);
                break;
            }
            _ => assert!(Instant::now() < deadline, "no pong"),
        }
    }
}

/// A reload hands a webhook group's clients to the new workers with their ids (the backend
/// keeps its state under them): none is closed, and one whose message the backend is still
/// answering (`slow`, 3 s) goes once the answer has come and been delivered, so its events
/// reach the backend in order and the answer's commands find it.
#[test]
fn a_reload_hands_webhook_clients_over() {
    let backend = Backend::start();
    let (dir, config) = Server::config(
        "webhook",
        2,
        &format!("url = \"http://127.0.0.1:{}/ws-events\"\n", backend.port),
    );
    let mut server = Server::start_with(wsd_bin(), dir, config);
    let mut clients: Vec<Client> = (0..10)
        .map(|_| {
            let (c, _) = Client::connect_with(server.port, "/?token=letmein", &[]).unwrap();
            c
        })
        .collect();
    for (i, c) in clients.iter_mut().enumerate() {
        c.send_text(&format!("a{i}"));
        assert_eq!(c.recv_text(), format!("a{i}"));
    }
    let ids = |server: &Server| -> Vec<String> {
        let out = server.wsd(&["connections", "--json"]);
        let view: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        let mut ids: Vec<String> = (view["conns"].as_array().unwrap().iter())
            .map(|r| r["conn"].as_str().unwrap().to_string())
            .collect();
        ids.sort();
        ids
    };
    let before_ids = ids(&server);
    clients[0].send_text("slow");
    let before = server.worker_pids();
    let out = server.wsd(&["reload"]);
    assert!(out.status.success(), "{out:?}");
    for pid in before {
        wait_for("an old worker to exit", DEADLINE, || {
            exited(pid).then_some(())
        });
    }
    assert_eq!(clients[0].recv_text(), "slow");
    for (i, c) in clients.iter_mut().enumerate() {
        c.send_text(&format!("b{i}"));
        assert_eq!(c.recv_text(), format!("b{i}"), "client {i}");
    }
    assert_eq!(ids(&server), before_ids);
    assert!(server.master_output().contains("took all"));
}

#[test]
fn check_names_a_bad_webhook_url() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("workers.toml");
    let head = "[[worker]]\nlisten = \"127.0.0.1:0\"\napp = \"webhook\"\n";
    let (ok, err) = check_config(&file, &format!("{head}url = \"ftp://x/\"\n"));
    assert!(!ok && err.contains("is not an http:// URL"), "{err}");
    assert!(err.contains("workers.toml:1:"), "{err}");
    let (ok, err) = check_config(&file, head);
    assert!(!ok && err.contains("needs url"), "{err}");
    let (ok, err) = check_config(
        &file,
        "[[worker]]\nlisten = \"127.0.0.1:0\"\napp = \"echo\"\nurl = \"http://x/\"\n",
    );
    assert!(!ok && err.contains("url is for app = \"webhook\""), "{err}");
}
