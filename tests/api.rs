//! The backend HTTP API (`[api]`) against a real master: publishes, broadcasts, sends and
//! disconnects reach real WebSocket clients on every worker and are counted; presence and
//! stats answer for the whole host; every bad request gets its 4xx and costs nothing else;
//! a reload applies new keys and refuses a new address.

mod common;

use common::*;
use serde_json::{Value, json};
use std::io::{Read, Write};
use std::net::TcpStream;
use tungstenite::Message;

const KEY: &str = "test-key-0123456789abcdef";
const WORKERS: usize = 2;

/// A pubsub group of [`WORKERS`] with the API on a port of the OS's choice; `api_extra` adds
/// keys to `[api]`.
fn start(api_extra: &str) -> (Server, u16) {
    let extra =
        format!("\n[api]\nlisten = \"http://127.0.0.1:0\"\nkeys = [\"{KEY}\"]\n{api_extra}\n");
    let mut server = Server::start_extra("pubsub", WORKERS, &extra);
    let port = api_port(&mut server);
    (server, port)
}

fn api_port(server: &mut Server) -> u16 {
    let st = server.status();
    let listen = st["api"]["listen"].as_str().expect("status shows the API");
    listen.rsplit(':').next().unwrap().parse().unwrap()
}

fn post(port: u16, path: &str, body: &Value) -> Value {
    let a = api_call(port, "POST", path, Some(KEY), &body.to_string());
    assert_eq!(a.status, 200, "{path}: {a:?}");
    serde_json::from_str(&a.body).expect("a JSON answer")
}

fn get(port: u16, target: &str) -> Value {
    let a = api_call(port, "GET", target, Some(KEY), "");
    assert_eq!(a.status, 200, "{target}: {a:?}");
    serde_json::from_str(&a.body).expect("a JSON answer")
}

/// At least `n` clients subscribed to `topic`, more if it takes more for every worker to hold
/// one (the kernel spreads connections by a hash; presence's ids name each one's worker).
fn subscribers(server: &Server, port: u16, topic: &str, n: usize) -> Vec<Client> {
    let mut clients = Vec::new();
    loop {
        let mut c = server.connect();
        c.send_text(&json!({ "subscribe": topic }).to_string());
        assert_eq!(c.recv_text(), json!({ "subscribed": topic }).to_string());
        clients.push(c);
        if clients.len() < n {
            continue;
        }
        let presence = get(port, &format!("/api/presence?topic={topic}"));
        let slots: std::collections::BTreeSet<&str> = presence["subscribers"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s["conn"].as_str().unwrap().split('-').nth(1).unwrap())
            .collect();
        if slots.len() == WORKERS {
            return clients;
        }
        assert!(clients.len() < 200, "the kernel never picked every worker");
    }
}

#[test]
fn publishes_reach_every_worker_and_are_counted() {
    let (server, port) = start("");
    let mut room = subscribers(&server, port, "room", 12);
    let n = room.len() as u64;
    let mut other = server.connect();
    other.send_text(r#"{"subscribe":"other"}"#);
    other.recv_text();

    let answer = post(
        port,
        "/api/publish",
        &json!({"topic": "room", "data": "hello"}),
    );
    assert_eq!(answer, json!({"delivered": n}));
    for c in &mut room {
        assert_eq!(c.recv_text(), "hello");
    }
    // Binary, then a batch: in order, each counted.
    let answer = post(
        port,
        "/api/publish",
        &json!({"topic": "room", "data": {"b64": "AAEC/w=="}}),
    );
    assert_eq!(answer, json!({"delivered": n}));
    let batch = json!([
        {"topic": "room", "data": "one"},
        {"group": "pubsub", "topic": "other", "data": "to other"},
        {"topic": "room", "data": "two"},
    ]);
    assert_eq!(
        post(port, "/api/publish", &batch),
        json!({"delivered": 2 * n + 1})
    );
    for c in &mut room {
        assert_eq!(c.recv(), Message::binary(vec![0u8, 1, 2, 255]));
        assert_eq!(c.recv_text(), "one");
        assert_eq!(c.recv_text(), "two");
    }
    assert_eq!(other.recv_text(), "to other");

    let answer = post(port, "/api/broadcast", &json!({"data": "everyone"}));
    assert_eq!(answer, json!({"delivered": n + 1}));
    for c in room.iter_mut().chain([&mut other]) {
        assert_eq!(c.recv_text(), "everyone");
    }
}

#[test]
fn presence_names_connections_that_send_and_disconnect_reach() {
    let (server, port) = start("");
    let mut room = subscribers(&server, port, "room", 6);
    let n = room.len();
    let presence = get(port, "/api/presence?topic=room");
    assert_eq!(presence["count"], n, "{presence}");
    let ids: Vec<String> = presence["subscribers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["conn"].as_str().unwrap().to_string())
        .collect();
    let slots: std::collections::BTreeSet<&str> =
        ids.iter().map(|id| id.split('-').nth(1).unwrap()).collect();
    assert_eq!(slots.len(), WORKERS, "ids from every worker: {ids:?}");

    // Each id reaches its connection, whichever worker answers the API call.
    for id in &ids {
        let answer = post(port, "/api/send", &json!({"conn": id, "data": id}));
        assert_eq!(answer["delivered"], 1, "{answer}");
    }
    let mut got: Vec<String> = room.iter_mut().map(|c| c.recv_text()).collect();
    got.sort();
    let mut want = ids.clone();
    want.sort();
    assert_eq!(got, want);

    // Disconnect one by id, with a code and a reason.
    let answer = post(
        port,
        "/api/disconnect",
        &json!({"conn": ids[0], "code": 4001, "reason": "kicked"}),
    );
    assert_eq!(answer, json!({"disconnected": 1}));
    let left = wait_for("presence to drop the disconnected client", DEADLINE, || {
        let p = get(port, "/api/presence?topic=room");
        (p["count"] == n - 1).then_some(p)
    });
    assert_eq!(left["count"], n - 1);
    // A gone connection counts 0, and so does a second disconnect of it.
    let answer = post(port, "/api/send", &json!({"conn": ids[0], "data": "late"}));
    assert_eq!(answer["delivered"], 0, "{answer}");
}

/// What a disconnect sends the client: its code and its reason, to that client only.
#[test]
fn a_disconnect_carries_its_code_and_reason() {
    let (server, port) = start("");
    let mut c = subscribers(&server, port, "solo", WORKERS);
    let presence = get(port, "/api/presence?topic=solo");
    let id = presence["subscribers"][0]["conn"]
        .as_str()
        .unwrap()
        .to_string();
    post(
        port,
        "/api/disconnect",
        &json!({"conn": id, "code": 4001, "reason": "kicked"}),
    );
    let mut codes = Vec::new();
    for client in &mut c {
        client.send_text(r#"{"unsubscribe":"nothing"}"#);
        match client.read() {
            Ok(Message::Close(Some(f))) => codes.push((u16::from(f.code), f.reason.to_string())),
            Ok(Message::Text(_)) => {}
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(codes, vec![(4001, "kicked".to_string())]);
}

#[test]
fn bad_requests_get_their_4xx_and_disturb_nothing() {
    let (mut server, port) = start("max_body = \"1KiB\"\nrequest_timeout = \"1s\"");
    let mut client = server.connect();
    client.send_text(r#"{"subscribe":"echo"}"#);
    client.recv_text();
    let mut round_trip = |n: usize| {
        client.send_text(&json!({"publish": "echo", "data": n}).to_string());
        assert_eq!(
            client.recv_text(),
            format!(r#"{{"topic":"echo","data":{n}}}"#)
        );
    };
    let publish = r#"{"topic":"echo","data":"x"}"#;
    let cases: Vec<(u16, HttpAnswer)> = vec![
        (
            400,
            api_call(port, "POST", "/api/publish", Some(KEY), "{not json"),
        ),
        (
            404,
            api_call(
                port,
                "POST",
                "/api/publish",
                Some(KEY),
                r#"{"group":"nope","topic":"a","data":"x"}"#,
            ),
        ),
        (
            422,
            api_call(
                port,
                "POST",
                "/api/publish",
                Some(KEY),
                r#"{"topic":"","data":"x"}"#,
            ),
        ),
        (
            413,
            api_call(
                port,
                "POST",
                "/api/publish",
                Some(KEY),
                &format!(r#"{{"topic":"a","data":"{}"}}"#, "x".repeat(2000)),
            ),
        ),
        (401, api_call(port, "POST", "/api/publish", None, publish)),
        (
            401,
            api_call(
                port,
                "POST",
                "/api/publish",
                Some("wrong-key-0123456789ab"),
                publish,
            ),
        ),
        (405, api_call(port, "GET", "/api/publish", Some(KEY), "")),
        (405, api_call(port, "DELETE", "/api/stats", Some(KEY), "")),
        (404, api_call(port, "GET", "/api/nothing", Some(KEY), "")),
        (400, api_call(port, "GET", "/api/presence", Some(KEY), "")),
        (
            411,
            http_exchange(
                port,
                b"POST /api/publish HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
                DEADLINE,
            ),
        ),
        (
            400,
            http_exchange(port, b"\x16\x03\x01\x02\x00garbage\r\n\r\n", DEADLINE),
        ),
    ];
    for (n, (want, answer)) in cases.into_iter().enumerate() {
        assert_eq!(answer.status, want, "case {n}: {answer:?}");
        let body: Value = serde_json::from_str(&answer.body).expect("a JSON error");
        assert!(body["error"].is_string(), "case {n}: {body}");
        round_trip(n);
    }

    // Slowloris: a head that never ends gets 408 and is closed; so does a body that stops.
    let mut slow = TcpStream::connect(("127.0.0.1", port)).unwrap();
    slow.write_all(b"POST /api/publish HTTP/1.1\r\nHost: x\r\n")
        .unwrap();
    let mut stalled = TcpStream::connect(("127.0.0.1", port)).unwrap();
    stalled
        .write_all(
            format!(
                "POST /api/publish HTTP/1.1\r\nAuthorization: Bearer {KEY}\r\nContent-Length: 100\r\n\r\n{{"
            )
            .as_bytes(),
        )
        .unwrap();
    // An idle keep-alive connection is closed quietly.
    let mut idle = TcpStream::connect(("127.0.0.1", port)).unwrap();
    for stream in [&mut slow, &mut stalled] {
        let (raw, closed) = read_to_end_within(stream, DEADLINE);
        let answer = HttpAnswer::parse(&raw, closed);
        assert_eq!((answer.status, answer.closed), (408, true), "{answer:?}");
    }
    let (raw, closed) = read_to_end_within(&mut idle, DEADLINE);
    assert!(raw.is_empty() && closed);
    round_trip(100);
    // The API still serves, and the master counted what was answered.
    assert_eq!(
        post(
            port,
            "/api/publish",
            &json!({"topic": "echo", "data": "ok"})
        ),
        json!({"delivered": 1})
    );
    assert_eq!(client.recv_text(), "ok");
    let requests = wait_for("status to count the API requests", DEADLINE, || {
        let n = server.status()["api"]["requests"].as_u64()?;
        (n >= 15).then_some(n)
    });
    assert!(requests >= 15);
}

#[test]
fn keep_alive_serves_many_requests_on_one_connection() {
    let (_server, port) = start("");
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(DEADLINE)).unwrap();
    let body = r#"{"topic":"t","data":"x"}"#;
    let one = format!(
        "POST /api/publish HTTP/1.1\r\nAuthorization: Bearer {KEY}\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    // Ten requests in one write (pipelined), answered in order on the same connection.
    s.write_all(one.repeat(10).as_bytes()).unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while got
        .windows(15)
        .filter(|w| w == b"{\"delivered\":0}")
        .count()
        < 10
    {
        let n = s.read(&mut buf).expect("answers");
        assert!(n > 0, "closed early: {}", String::from_utf8_lossy(&got));
        got.extend_from_slice(&buf[..n]);
    }
    let text = String::from_utf8_lossy(&got);
    assert_eq!(text.matches("HTTP/1.1 200 OK").count(), 10, "{text}");
    assert!(!text.contains("Connection: close"));

    // Pipelined answers come in request order, those gathered from the other worker and
    // those answered at once alike.
    let not_found =
        "GET /api/nothing HTTP/1.1\r\nAuthorization: Bearer KEY\r\n\r\n".replace("KEY", KEY);
    let mixed = [one.as_str(), &not_found, &one, &not_found, &one].concat();
    s.write_all(mixed.as_bytes()).unwrap();
    let mut got = Vec::new();
    while String::from_utf8_lossy(&got).matches("HTTP/1.1 ").count() < 5 || !got.ends_with(b"}\n") {
        let n = s.read(&mut buf).expect("answers");
        assert!(n > 0);
        got.extend_from_slice(&buf[..n]);
    }
    let text = String::from_utf8_lossy(&got);
    let statuses: Vec<&str> = text
        .match_indices("HTTP/1.1 ")
        .map(|(i, _)| &text[i + 9..i + 12])
        .collect();
    assert_eq!(statuses, ["200", "404", "200", "404", "200"], "{text}");
}

#[test]
fn health_and_stats_answer_for_every_worker() {
    let (mut server, port) = start("");
    let health = api_call(port, "GET", "/health", None, "");
    assert_eq!(health.status, 200, "{health:?}");
    let body: Value = serde_json::from_str(&health.body).unwrap();
    assert_eq!(body, json!({"status": "ok", "workers": WORKERS}));
    let head = api_call(port, "HEAD", "/health", None, "");
    assert_eq!((head.status, head.body.as_str()), (200, ""));

    let clients = subscribers(&server, port, "room", 4);
    let stats = get(port, "/api/stats");
    assert_eq!(stats["group"], "pubsub");
    assert_eq!(stats["connections"], clients.len(), "{stats}");
    let workers = stats["workers"].as_array().unwrap();
    assert_eq!(workers.len(), WORKERS);
    let pids: Vec<i64> = workers.iter().map(|w| w["pid"].as_i64().unwrap()).collect();
    let mut want: Vec<i64> = server.worker_pids().into_iter().map(i64::from).collect();
    want.sort();
    let mut got = pids.clone();
    got.sort();
    assert_eq!(got, want);

    let text = String::from_utf8(server.wsd(&["status"]).stdout).unwrap();
    assert!(text.contains("api: http://127.0.0.1:"), "{text}");
    assert!(text.contains("(group pubsub)"), "{text}");
}

#[test]
fn reload_applies_new_keys_and_refuses_a_new_address() {
    let (mut server, port) = start("");
    let config = std::fs::read_to_string(&server.config).unwrap();
    let new_key = "rotated-key-abcdef0123456789";
    std::fs::write(&server.config, config.replace(KEY, new_key)).unwrap();
    let out = server.wsd(&["reload"]);
    assert!(out.status.success(), "{out:?}");
    server.wait_ready();
    let body = r#"{"topic":"t","data":"x"}"#;
    wait_for("the new workers to take the new key", DEADLINE, || {
        (api_call(port, "POST", "/api/publish", Some(new_key), body).status == 200).then_some(())
    });
    assert_eq!(
        api_call(port, "POST", "/api/publish", Some(KEY), body).status,
        401
    );

    let moved = config.replace(
        "http://127.0.0.1:0",
        &format!("http://127.0.0.1:{}", free_port()),
    );
    std::fs::write(&server.config, moved).unwrap();
    let out = server.wsd(&["reload"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("[api] listen changed"), "{err}");
    assert_eq!(
        api_call(port, "POST", "/api/publish", Some(new_key), body).status,
        200
    );

    // A reload that changes the group's count gives every new slot its API socket, and
    // takes the removed ones' away: every request is answered, by 3 workers, then by 1.
    let rotated = config.replace(KEY, new_key);
    for count in [3, 1] {
        let text = rotated.replace(&format!("count = {WORKERS}"), &format!("count = {count}"));
        std::fs::write(&server.config, text).unwrap();
        let out = server.wsd(&["reload"]);
        assert!(out.status.success(), "{out:?}");
        server.wait_ready();
        wait_for("the API answered by the new workers", DEADLINE, || {
            let a = api_call(port, "GET", "/api/stats", Some(new_key), "");
            let stats: Value = serde_json::from_str(&a.body).ok()?;
            (stats["workers"].as_array()?.len() == count).then_some(())
        });
        for _ in 0..30 {
            let a = api_call(port, "POST", "/api/publish", Some(new_key), body);
            assert_eq!(a.status, 200, "{a:?}");
        }
    }
}

#[test]
fn check_names_bad_api_settings_with_their_line() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("workers.toml");
    let base = "[[worker]]\nlisten = \"127.0.0.1:0\"\napp = \"pubsub\"\n\n";
    let check = |api: &str| check_config(&file, &format!("{base}{api}"));
    let (ok, err) = check("[api]\nlisten = \"127.0.0.1:0\"\nkeys = [\"short\"]\n");
    assert!(
        !ok && err.contains("workers.toml:5:") && err.contains("keys[0] is shorter"),
        "{err}"
    );
    let (ok, err) = check(&format!(
        "[api]\nlisten = \"127.0.0.1:0\"\nkeys = [\"{KEY}\"]\ngroup = \"x\"\n"
    ));
    assert!(
        !ok && err.contains("[api] group \"x\" is not a group"),
        "{err}"
    );
    let (ok, err) = check(&format!(
        "[api]\nlisten = \"ftp://127.0.0.1:0\"\nkeys = [\"{KEY}\"]\n"
    ));
    assert!(
        !ok && err.contains("workers.toml:6:") && err.contains("http://HOST:PORT"),
        "{err}"
    );
    let (ok, err) = check(&format!(
        "[api]\nlisten = \"127.0.0.1:0\"\nkeys = [\"{KEY}\"]\n"
    ));
    assert!(ok, "{err}");
}

#[test]
fn presence_events_and_questions_on_one_host() {
    let extra = format!(
        "presence = \"room/*\"\npresence_events = true\n\n[api]\nlisten = \"127.0.0.1:0\"\nkeys = [\"{KEY}\"]\n"
    );
    let mut server = Server::start_extra("pubsub", WORKERS, &extra);
    let port = api_port(&mut server);
    let next = |c: &mut Client| -> Value { serde_json::from_str(&c.recv_text()).unwrap() };
    let mut a = server.connect();
    a.send_text(r#"{"subscribe":"room/1"}"#);
    assert_eq!(next(&mut a), json!({"subscribed": "room/1"}));
    assert_eq!(next(&mut a)["event"], "join", "its own join");
    // Enough others that some land on the other worker: each join reaches `a`.
    let mut others: Vec<Client> = (0..6).map(|_| server.connect()).collect();
    for c in others.iter_mut() {
        c.send_text(r#"{"subscribe":"room/1"}"#);
        assert_eq!(next(c), json!({"subscribed": "room/1"}));
        let join = next(&mut a);
        assert_eq!(join["event"], "join", "{join}");
        assert_eq!(join["topic"], "room/1");
    }
    a.send_text(r#"{"presence":"room/1"}"#);
    // Joins of later subscribers may still arrive at `a` first.
    let here = loop {
        let m = next(&mut a);
        if m.get("presence").is_some() {
            break m;
        }
    };
    assert_eq!(here["count"], 7, "{here}");
    assert_eq!(here["scope"], "host");
    let p = get(port, "/api/presence?topic=room/1");
    assert_eq!(p["count"], 7, "{p}");
    // A topic without presence keeps no events; asking about it is refused.
    a.send_text(r#"{"subscribe":"news"}"#);
    assert_eq!(next(&mut a), json!({"subscribed": "news"}));
    a.send_text(r#"{"presence":"news"}"#);
    assert!(next(&mut a)["error"].is_string());
    // A leave reaches the others, with the id presence showed.
    let gone = others.pop().unwrap();
    drop(gone);
    let leave = loop {
        let m = next(&mut a);
        if m["event"] == "leave" {
            break m;
        }
    };
    let ids: Vec<&str> = p["subscribers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["conn"].as_str().unwrap())
        .collect();
    assert!(ids.contains(&leave["conn"].as_str().unwrap()), "{leave}");
    // /api/user, on one host: no user bound here.
    assert_eq!(
        get(port, "/api/user?user=ada"),
        json!({"user": "ada", "scope": "host", "online": false, "connections": []})
    );
}

/// A worker alone answers every request at once (no other worker to ask): a thousand
/// pipelined requests on one connection are answered in order, and the worker lives on.
#[test]
fn a_lone_worker_answers_a_thousand_pipelined_requests() {
    let extra = format!("\n[api]\nlisten = \"127.0.0.1:0\"\nkeys = [\"{KEY}\"]\n");
    let mut server = Server::start_extra("pubsub", 1, &extra);
    let port = api_port(&mut server);
    let pids = server.worker_pids();
    let body = r#"{"topic":"t","data":"x"}"#;
    let one = format!(
        "POST /api/publish HTTP/1.1\r\nAuthorization: Bearer {KEY}\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(DEADLINE)).unwrap();
    let writer = {
        let mut s = s.try_clone().unwrap();
        let all = one.repeat(1000);
        std::thread::spawn(move || s.write_all(all.as_bytes()))
    };
    let mut got = Vec::new();
    let mut buf = [0u8; 16 << 10];
    while got
        .windows(15)
        .filter(|w| w == b"{\"delivered\":0}")
        .count()
        < 1000
    {
        let n = s.read(&mut buf).expect("answers");
        assert!(
            n > 0,
            "closed after {} answers",
            String::from_utf8_lossy(&got).matches("200 OK").count()
        );
        got.extend_from_slice(&buf[..n]);
    }
    writer.join().unwrap().unwrap();
    assert_eq!(
        String::from_utf8_lossy(&got)
            .matches("HTTP/1.1 200 OK")
            .count(),
        1000
    );
    assert_eq!(server.worker_pids(), pids, "the worker lives on");
    assert_eq!(get(port, "/health")["status"], "ok");
}

/// `pubsub` (serving the API) and `feed`, two workers each: the pids of one group's workers.
fn group_pids(server: &mut Server, group: &str) -> Vec<i32> {
    let st = server.status();
    (st["workers"].as_array().unwrap().iter())
        .filter(|w| w["name"] == group && w["pid"].as_i64().unwrap_or(0) > 0)
        .map(|w| w["pid"].as_i64().unwrap() as i32)
        .collect()
}

/// At least 4 clients of the `feed` group on `topic`, on both its workers.
fn feed_subscribers(port: u16, feed_port: u16, topic: &str) -> Vec<Client> {
    let mut clients = Vec::new();
    loop {
        let mut c = Client::connect(feed_port);
        c.send_text(&json!({ "subscribe": topic }).to_string());
        assert_eq!(c.recv_text(), json!({ "subscribed": topic }).to_string());
        clients.push(c);
        if clients.len() < 4 {
            continue;
        }
        let p = get(port, &format!("/api/presence?group=feed&topic={topic}"));
        let subs = p["subscribers"].as_array().unwrap();
        assert_eq!(subs.len(), clients.len(), "{p}");
        let slots: std::collections::BTreeSet<&str> = (subs.iter())
            .map(|s| s["conn"].as_str().unwrap().split('-').nth(1).unwrap())
            .collect();
        if slots.len() == WORKERS {
            return clients;
        }
        assert!(clients.len() < 200, "the kernel never picked every worker");
    }
}

/// Publishes `text` to `topic` of `feed` through the API, which `clients` all get.
fn publish_to_feed(port: u16, clients: &mut [Client], topic: &str, text: &str) {
    let body = json!({"group": "feed", "topic": topic, "data": text});
    assert_eq!(
        post(port, "/api/publish", &body),
        json!({"delivered": clients.len()})
    );
    for c in clients.iter_mut() {
        assert_eq!(c.recv_text(), text);
    }
}

#[test]
fn one_api_reaches_every_group_through_its_workers() {
    let extra = format!(
        "\n[[worker]]\nname = \"feed\"\nlisten = \"websocket://127.0.0.1:0\"\ncount = {WORKERS}\n\
         app = \"pubsub\"\n\n[api]\nlisten = \"http://127.0.0.1:0\"\nkeys = [\"{KEY}\"]\n\
         group = \"pubsub\"\n"
    );
    let (dir, config) = Server::config("pubsub", WORKERS, &extra);
    let mut server = Server::start_with(wsd_bin(), dir, config);
    let port = api_port(&mut server);
    let st = server.status();
    let feed_listen = st["groups"][1]["listen"].as_str().unwrap().to_string();
    let feed_port: u16 = feed_listen.rsplit(':').next().unwrap().parse().unwrap();

    // A request for `feed` is carried out by feed's workers: its subscribers get it, the
    // API's own group's subscribers of the same topic do not.
    let mut news = feed_subscribers(port, feed_port, "news");
    let mut own = server.connect();
    own.send_text(r#"{"subscribe":"news"}"#);
    own.recv_text();
    publish_to_feed(port, &mut news, "news", "to the feed");
    let answer = post(
        port,
        "/api/publish",
        &json!({"topic": "news", "data": "own"}),
    );
    assert_eq!(answer, json!({"delivered": 1}));
    assert_eq!(own.recv_text(), "own");

    let stats = get(port, "/api/stats?group=feed");
    assert_eq!(stats["group"], "feed");
    assert_eq!(stats["connections"], news.len(), "{stats}");
    assert_eq!(get(port, "/api/stats")["group"], "pubsub");
    let answer = post(
        port,
        "/api/broadcast",
        &json!({"group": "feed", "data": "all of feed"}),
    );
    assert_eq!(answer, json!({"delivered": news.len()}));
    for c in &mut news {
        assert_eq!(c.recv_text(), "all of feed");
    }

    // Every worker of both groups answers /health; a group that does not exist is a 404
    // that names those that do, and a batch for two groups a 422.
    let health: Value = serde_json::from_str(&api_call(port, "GET", "/health", None, "").body)
        .expect("a JSON health");
    assert_eq!(health, json!({"status": "ok", "workers": 2 * WORKERS}));
    let nope = api_call(port, "GET", "/api/stats?group=nope", Some(KEY), "");
    assert_eq!(nope.status, 404, "{nope:?}");
    assert!(nope.body.contains("pubsub, feed") || nope.body.contains("feed, pubsub"));
    let mixed = json!([
        {"group": "feed", "topic": "news", "data": "1"},
        {"group": "pubsub", "topic": "news", "data": "2"},
    ]);
    let a = api_call(port, "POST", "/api/publish", Some(KEY), &mixed.to_string());
    assert_eq!(a.status, 422, "{a:?}");

    // Every worker of both groups dies and is replaced: the new ones are bridged (the API's
    // new workers to feed's, feed's new workers to the API's), and the API reaches feed again.
    let victims: Vec<i32> = group_pids(&mut server, "pubsub")
        .into_iter()
        .chain(group_pids(&mut server, "feed"))
        .collect();
    for &pid in &victims {
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGKILL,
        )
        .unwrap();
    }
    wait_for("every slot to have a new worker", DEADLINE, || {
        let st = server.try_status()?;
        let pids = worker_pids_in(&st);
        let fresh = pids.len() == 2 * WORKERS
            && pids.iter().all(|p| *p > 0 && !victims.contains(p))
            && st["workers"]
                .as_array()?
                .iter()
                .all(|w| w["status"] == "idle");
        fresh.then_some(())
    });
    let mut news = feed_subscribers(port, feed_port, "news");
    publish_to_feed(port, &mut news, "news", "after the restart");

    // A reload replaces them all again, bridged the same way. The subscribers are handed to
    // the new workers with their topics, and the API reaches them there.
    let before: Vec<i32> = worker_pids_in(&server.status());
    let out = server.wsd(&["reload"]);
    assert!(out.status.success(), "{out:?}");
    wait_for("the reload to replace every worker", DEADLINE, || {
        let st = server.try_status()?;
        let pids = worker_pids_in(&st);
        let done = pids.len() == 2 * WORKERS
            && pids.iter().all(|p| !before.contains(p))
            && before.iter().all(|&p| exited(p));
        done.then_some(())
    });
    publish_to_feed(port, &mut news, "news", "after the reload");
    let health = api_call(port, "GET", "/health", None, "");
    assert_eq!(health.status, 200, "{health:?}");
}
