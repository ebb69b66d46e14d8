//! The example handlers in examples/handlers/, run by a real master (`app = "exec"`, two
//! workers) for real WebSocket clients: the PHP chat relays every text message to every client
//! on both workers, the Node rooms publish to a room's members on both workers only, and the
//! Python echo sends each message back to its sender alone.
//! `php` and `node` must be installed (scripts/test.sh and scripts/interop-deps.sh do): a
//! missing interpreter fails the test, it is not skipped.

mod common;

use common::*;
use serde_json::{Value, json};
use std::collections::BTreeSet;
use std::process::Command;
use tungstenite::Message;

const WORKERS: usize = 2;

/// Fails, with how to fix it, when `program` (an interpreter) cannot run.
fn require(program: &str, install: &str) {
    let ok = Command::new(program)
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    assert!(
        ok,
        "`{program} --version` did not run: the handler examples need {program} ({install})"
    );
}

/// A group of [`WORKERS`] running `examples/handlers/<script>` with `interpreter`.
fn start(interpreter: &str, script: &str) -> Server {
    let path = format!("{}/examples/handlers/{script}", env!("CARGO_MANIFEST_DIR"));
    assert!(
        path_exists(std::path::Path::new(&path)),
        "{path} is missing"
    );
    let extra = format!("command = [{}, {}]", json!(interpreter), json!(path));
    let (dir, config) = Server::config("exec", WORKERS, &extra);
    Server::start_with(wsd_bin(), dir, config)
}

/// Open connections per worker, as the master's status reports them.
fn per_worker(st: &Value) -> Vec<u64> {
    st["workers"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|w| w["connections"].as_u64().unwrap_or(0))
        .collect()
}

#[test]
fn chat_php_relays_every_text_message_to_every_client_on_every_worker() {
    require("php", "apt-get install php-cli");
    let mut server = start("php", "chat.php");
    // At least 6 clients, more until the kernel has given each worker some.
    let mut clients: Vec<Client> = Vec::new();
    loop {
        clients.push(server.connect());
        if clients.len() < 6 {
            continue;
        }
        let n = clients.len() as u64;
        let st = wait_for("status to count every client", DEADLINE, || {
            let st = server.status();
            (workers_sum(&st, "connections") == n).then_some(st)
        });
        if per_worker(&st).iter().filter(|&&c| c > 0).count() == WORKERS {
            break;
        }
        assert!(clients.len() < 200, "the kernel never picked every worker");
    }

    clients[0].send_text("hello all");
    for (i, c) in clients.iter_mut().enumerate() {
        assert_eq!(c.recv_text(), "hello all", "client {i}");
    }

    // Binary messages are not relayed; two texts from another client arrive in order, and
    // nothing else came in between (no copy of anything, no binary).
    let last = clients.len() - 1;
    clients[last]
        .ws
        .send(Message::binary(vec![1, 2, 3]))
        .expect("send");
    clients[last].send_text("second");
    clients[last].send_text("third, with ünïcode and \"quotes\"");
    for (i, c) in clients.iter_mut().enumerate() {
        assert_eq!(c.recv_text(), "second", "client {i}");
        assert_eq!(
            c.recv_text(),
            "third, with ünïcode and \"quotes\"",
            "client {i}"
        );
    }
}

/// The next message of `c`, as JSON.
fn recv_json(c: &mut Client) -> Value {
    let text = c.recv_text();
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{text:?} is not JSON: {e}"))
}

fn join(c: &mut Client, room: &str) {
    c.send_text(&json!({ "join": room }).to_string());
    assert_eq!(recv_json(c), json!({ "joined": room }));
}

fn say(c: &mut Client, room: &str, text: &str) {
    c.send_text(&json!({ "say": room, "text": text }).to_string());
}

/// A client alone in a room of its own, and its connection id, learned from what it says there.
fn client_with_id(server: &Server, n: usize) -> (Client, String) {
    let mut c = server.connect();
    let own = format!("own-{n}");
    join(&mut c, &own);
    say(&mut c, &own, "who am I?");
    let m = recv_json(&mut c);
    assert_eq!(m["room"], own.as_str(), "{m}");
    assert_eq!(m["text"], "who am I?", "{m}");
    let id = m["from"]
        .as_str()
        .expect("a conn id in \"from\"")
        .to_string();
    (c, id)
}

/// The worker of a connection id (`<server>-<worker>-...`).
fn worker_of(id: &str) -> String {
    id.split('-')
        .nth(1)
        .expect("a worker in the id")
        .to_string()
}

#[test]
fn rooms_js_publishes_to_the_rooms_members_on_every_worker_only() {
    require("node", "apt-get install nodejs");
    let server = start("node", "rooms.js");
    // Two clients on different workers (more are connected until the kernel gives one to the
    // other worker; the extra ones are dropped).
    let (mut a, a_id) = client_with_id(&server, 0);
    let (mut b, b_id) = (1..200)
        .map(|n| client_with_id(&server, n))
        .find(|(_, id)| worker_of(id) != worker_of(&a_id))
        .expect("the kernel never picked the other worker");
    let workers: BTreeSet<String> = [&a_id, &b_id].into_iter().map(|id| worker_of(id)).collect();
    assert_eq!(workers.len(), WORKERS, "{a_id} and {b_id}");
    let (mut c, c_id) = client_with_id(&server, 200);

    join(&mut a, "lobby");
    join(&mut b, "lobby");
    join(&mut c, "other");

    say(&mut a, "lobby", "hi from a");
    let from_a = json!({ "room": "lobby", "text": "hi from a", "from": a_id });
    assert_eq!(recv_json(&mut a), from_a);
    assert_eq!(recv_json(&mut b), from_a);
    say(&mut b, "lobby", "hi from b");
    let from_b = json!({ "room": "lobby", "text": "hi from b", "from": b_id });
    assert_eq!(recv_json(&mut a), from_b);
    assert_eq!(recv_json(&mut b), from_b);

    // c is not in the lobby: the first thing it gets is what is said in its own room.
    say(&mut c, "other", "anyone?");
    let from_c = json!({ "room": "other", "text": "anyone?", "from": c_id });
    assert_eq!(recv_json(&mut c), from_c);

    // What is not a join or a say is answered with an error, to its sender only.
    for bad in ["hello", r#"{"join":5}"#, r#"{"say":"lobby"}"#, "[]"] {
        a.send_text(bad);
        let m = recv_json(&mut a);
        let keys: Vec<&String> = m.as_object().expect("an object").keys().collect();
        assert_eq!(keys, ["error"], "{bad:?} got {m}");
        assert!(m["error"].is_string(), "{bad:?} got {m}");
    }
    a.send(Message::binary(vec![0; 4])).expect("send");
    assert!(recv_json(&mut a)["error"].is_string());
    // b saw none of it: its next message is the next thing said in the lobby.
    say(&mut a, "lobby", "still here");
    let still = json!({ "room": "lobby", "text": "still here", "from": a_id });
    assert_eq!(recv_json(&mut b), still);
    assert_eq!(recv_json(&mut a), still);
}

/// A reload hands the clients to the new workers, whose handlers learn them from `adopt`: they
/// stay connected, in their rooms, and are answered by the new handlers.
#[test]
fn rooms_js_clients_keep_their_rooms_through_a_reload() {
    require("node", "apt-get install nodejs");
    let mut server = start("node", "rooms.js");
    let (mut a, a_id) = client_with_id(&server, 0);
    let (mut b, b_id) = (1..200)
        .map(|n| client_with_id(&server, n))
        .find(|(_, id)| worker_of(id) != worker_of(&a_id))
        .expect("the kernel never picked the other worker");
    join(&mut a, "lobby");
    join(&mut b, "lobby");
    let before = server.worker_pids();
    let out = server.wsd(&["reload"]);
    assert!(out.status.success(), "{out:?}");
    for pid in &before {
        wait_for("the old worker to exit", DEADLINE, || {
            exited(*pid).then_some(())
        });
    }
    let after = server.wait_ready();
    assert!(worker_pids_in(&after).iter().all(|p| !before.contains(p)));

    // Still in the lobby, on the new workers: what a says reaches both, from a's new id.
    say(&mut a, "lobby", "after the reload");
    let got = recv_json(&mut b);
    assert_eq!(got["text"], "after the reload", "{got}");
    assert_eq!(got["from"].as_str().map(worker_of), Some(worker_of(&a_id)));
    assert_eq!(recv_json(&mut a), got);
    // The new handlers answer them.
    say(&mut b, "lobby", "me too");
    assert_eq!(recv_json(&mut a)["text"], "me too");
    let echoed = recv_json(&mut b);
    assert_eq!(
        echoed["from"].as_str().map(worker_of),
        Some(worker_of(&b_id))
    );
    a.send_text("hello");
    assert!(recv_json(&mut a)["error"].is_string());
}

#[test]
fn echo_py_sends_text_and_binary_back_to_their_sender() {
    let server = start("python3", "echo.py");
    let mut clients: Vec<Client> = (0..4).map(|_| server.connect()).collect();
    for round in 0..3 {
        for (i, c) in clients.iter_mut().enumerate() {
            c.send_text(&format!("{i}: hé \"quoted\" {round}"));
            c.send(Message::binary(vec![i as u8, 0, 255, round]))
                .unwrap();
        }
        // Each client gets its own two messages back, in order, and nobody else's.
        for (i, c) in clients.iter_mut().enumerate() {
            assert_eq!(c.recv_text(), format!("{i}: hé \"quoted\" {round}"));
            assert_eq!(c.recv(), Message::binary(vec![i as u8, 0, 255, round]));
        }
    }
}
