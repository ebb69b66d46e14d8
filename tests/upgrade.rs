//! The upgrade as a group and an app decide it, with real clients: subprotocol negotiation
//! (`subprotocols`, `require_subprotocol`), the `on_upgrade` hook (headers, refusals, panics)
//! and the per-connection state it starts.
//!
//! Like tests/library.rs this binary is itself a wsd program: run with `WSD_LIBRARY_SERVER=1`
//! it is the server (app `upgrade`, configured by each test's workers.toml); otherwise it is
//! the test driver. `harness = false` because a forking master must be its process's main
//! thread. Every group has one worker, so every client of a test meets the same one.

mod common;

use common::*;
use serde_json::Value;
use std::cell::RefCell;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::rc::Rc;
use wsd::{ConnId, Decision};

/// What `?name=` connections keep. Its drop is written to the worker's log, so the test sees
/// when the state goes.
struct Visit {
    name: String,
    messages: u32,
    log: Rc<RefCell<Vec<String>>>,
}

impl Drop for Visit {
    fn drop(&mut self) {
        self.log.borrow_mut().push(format!("dropped {}", self.name));
    }
}

/// The app under test.
///
/// `on_upgrade`, by path: `/reject` refuses with 403 and a header; `/panic` panics;
/// `/cookie` accepts with a `Set-Cookie`, an `X-Echo` of what it read, and two headers that
/// must be left out; anything else is accepted, with a [`Visit`] as state for `?name=N`, and
/// `?protocol=P` as its choice of subprotocol.
///
/// Messages: `state` → `NAME COUNT` (counting in place) or `none`; `protocol` → the agreed
/// subprotocol or `none`; `rename N` → a new state; `log` → what on_close and the states'
/// drops wrote, then whether the closed connections' state and protocol are gone; anything
/// else is echoed.
fn upgrade_app(w: &mut wsd::Worker) {
    let log: Rc<RefCell<Vec<String>>> = Rc::default();
    let closed: Rc<RefCell<Vec<ConnId>>> = Rc::default();
    let upgrade_log = log.clone();
    w.on_upgrade(move |_ctx, req| match req.path() {
        "/reject" => {
            let name = req.query("name").unwrap_or_default();
            Decision::reject(403, format!("no entry for {name}")).with_header("X-Reason", "test")
        }
        "/panic" => panic!("on_upgrade has a bug"),
        "/cookie" => {
            let echo = format!(
                "sid={} ip={} q={:?} ua={}",
                req.cookie("sid").unwrap_or("-"),
                req.remote_addr().ip(),
                req.query_all("q"),
                req.header("user-agent").unwrap_or("-"),
            );
            Decision::accept()
                .with_header("Set-Cookie", "session=s1; HttpOnly")
                .with_header("Bad Name", "x")
                .with_header("X-Split", "a\r\nInjected: 1")
                .with_header("X-Echo", echo)
        }
        _ => {
            let mut decision = Decision::accept();
            if let Some(name) = req.query("name") {
                decision = decision.with_state(Visit {
                    name: name.into_owned(),
                    messages: 0,
                    log: upgrade_log.clone(),
                });
            }
            if let Some(p) = req.query("protocol") {
                decision = decision.with_protocol(p);
            }
            decision
        }
    });
    let (message_log, message_closed) = (log.clone(), closed.clone());
    w.on_message(move |ctx, conn, msg| {
        let text = msg.as_text().unwrap_or_default();
        let reply = if text == "state" {
            match ctx.state_mut::<Visit>(conn) {
                Some(v) => {
                    v.messages += 1;
                    format!("{} {}", v.name, v.messages)
                }
                None => "none".into(),
            }
        } else if text == "protocol" {
            ctx.protocol(conn).unwrap_or("none").to_string()
        } else if let Some(name) = text.strip_prefix("rename ") {
            let state = Visit {
                name: name.into(),
                messages: 0,
                log: message_log.clone(),
            };
            assert!(ctx.set_state(conn, state));
            "renamed".into()
        } else if text == "log" {
            let gone = message_closed
                .borrow()
                .iter()
                .all(|&id| ctx.state::<Visit>(id).is_none() && ctx.protocol(id).is_none());
            format!("{} | gone {gone}", message_log.borrow().join(", "))
        } else {
            text.to_string()
        };
        let _ = ctx.send(conn, reply);
    });
    w.on_close(move |ctx, conn| {
        if let Some(v) = ctx.state::<Visit>(conn) {
            let protocol = ctx.protocol(conn).unwrap_or("none");
            let line = format!("on_close {} {} {protocol}", v.name, v.messages);
            log.borrow_mut().push(line);
            closed.borrow_mut().push(conn);
        }
    });
}

fn server_program() -> ! {
    wsd::Runner::new().app("upgrade", upgrade_app).run()
}

/// One worker of the `upgrade` app, plus `extra` lines in its table.
fn start(extra: &str) -> Server {
    Server::start_program(std::env::current_exe().unwrap(), "upgrade", 1, extra)
}

const CHAT: &str = "subprotocols = [\"v2.chat\", \"v1.chat\"]";

/// A tungstenite client on `target` offering `protocols`; the subprotocol the `101` named.
fn offer(server: &Server, target: &str, protocols: &str) -> (Client, Option<String>) {
    let (client, response) = Client::connect_with(
        server.port,
        target,
        &[("sec-websocket-protocol", protocols)],
    )
    .unwrap_or_else(|e| panic!("{target} offering {protocols}: {e}"));
    let chosen = response
        .headers()
        .get("sec-websocket-protocol")
        .map(|v| v.to_str().unwrap().to_string());
    (client, chosen)
}

/// A raw upgrade on `target` with `extra` header lines: the `101`'s head and the client, or
/// the refusal.
fn raw_upgrade(port: u16, target: &str, extra: &str) -> Result<(String, RawClient), HttpAnswer> {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    stream.set_read_timeout(Some(DEADLINE)).unwrap();
    stream
        .write_all(upgrade_request_to(target, extra).as_bytes())
        .unwrap();
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        match stream.read(&mut b) {
            Ok(1) => head.push(b[0]),
            _ => break,
        }
    }
    if !head.starts_with(b"HTTP/1.1 101 ") {
        let (body, closed) = read_to_end_within(&mut stream, DEADLINE);
        head.extend_from_slice(&body);
        return Err(HttpAnswer::parse(&head, closed));
    }
    let head = String::from_utf8(head).unwrap();
    Ok((head, RawClient { stream }))
}

/// Sends a text frame on a raw client and reads the text that comes back.
fn raw_ask(c: &mut RawClient, text: &str) -> String {
    c.frame(true, 0x1, text.as_bytes());
    let (_, opcode, payload) = c.read_frame();
    assert_eq!(opcode, 0x1);
    String::from_utf8(payload).unwrap()
}

fn ask(c: &mut Client, text: &str) -> String {
    c.send_text(text);
    c.recv_text()
}

/// `wsd connections --json`: each row's protocol (or null), keyed by the client's port.
fn protocols_listed(server: &Server) -> Vec<(u16, Value)> {
    let out = server.wsd(&["connections", "--json"]);
    assert!(out.status.success(), "{out:?}");
    let view: Value = serde_json::from_slice(&out.stdout).unwrap();
    let rows = view["conns"].as_array().unwrap().iter();
    rows.map(|r| {
        let port = r["remote"].as_str().unwrap().rsplit(':').next().unwrap();
        (port.parse().unwrap(), r["protocol"].clone())
    })
    .collect()
}

fn local_port(c: &Client) -> u16 {
    c.ws.get_ref().local_addr().unwrap().port()
}

fn the_server_picks_its_preferred_subprotocol_and_shows_it() {
    let server = start(CHAT);
    let (mut v2, chosen) = offer(&server, "/", "v1.chat, v2.chat");
    assert_eq!(
        chosen.as_deref(),
        Some("v2.chat"),
        "the server's order wins"
    );
    assert_eq!(ask(&mut v2, "protocol"), "v2.chat");
    let (mut v1, chosen) = offer(&server, "/", "x, v1.chat");
    assert_eq!(chosen.as_deref(), Some("v1.chat"));
    assert_eq!(ask(&mut v1, "protocol"), "v1.chat");

    // Only unknown ones offered, nothing required: upgraded, with no protocol named.
    let (head, mut none) = raw_upgrade(server.port, "/", "Sec-WebSocket-Protocol: x, y\r\n")
        .unwrap_or_else(|refused| panic!("refused: {refused:?}"));
    assert!(
        !head.to_ascii_lowercase().contains("sec-websocket-protocol"),
        "{head}"
    );
    assert_eq!(raw_ask(&mut none, "protocol"), "none");
    let none_port = none.stream.local_addr().unwrap().port();

    // The app's choice among the offered ones wins; one outside the group's list too.
    let (mut app_v1, chosen) = offer(&server, "/?protocol=v1.chat", "v2.chat, v1.chat");
    assert_eq!(chosen.as_deref(), Some("v1.chat"));
    assert_eq!(ask(&mut app_v1, "protocol"), "v1.chat");
    let (mut mine, chosen) = offer(&server, "/?protocol=mine", "mine, v2.chat");
    assert_eq!(chosen.as_deref(), Some("mine"));
    assert_eq!(ask(&mut mine, "protocol"), "mine");
    // One the client did not offer: wsd's choice stands, and the app's mistake is logged.
    let (mut fallback, chosen) = offer(&server, "/?protocol=nope", "v1.chat");
    assert_eq!(chosen.as_deref(), Some("v1.chat"));
    assert_eq!(ask(&mut fallback, "protocol"), "v1.chat");
    server.wait_for_log("which the client did not offer; answering with v1.chat");

    let listed = protocols_listed(&server);
    let of = |port: u16| {
        let row = listed.iter().find(|(p, _)| *p == port);
        row.unwrap_or_else(|| panic!("no row for port {port}: {listed:?}"))
            .1
            .clone()
    };
    assert_eq!(of(local_port(&v2)), "v2.chat");
    assert_eq!(of(local_port(&v1)), "v1.chat");
    assert_eq!(of(local_port(&mine)), "mine");
    assert_eq!(of(none_port), Value::Null);
    let table = String::from_utf8(server.wsd(&["connections"]).stdout).unwrap();
    assert!(
        table.lines().next().unwrap().ends_with("protocol"),
        "{table}"
    );
    assert!(
        table.contains(" v2.chat\n") && table.contains(" mine\n"),
        "{table}"
    );
}

fn a_required_subprotocol_refuses_clients_without_one() {
    let server = start(&format!("{CHAT}\nrequire_subprotocol = true"));
    let (mut ok, chosen) = offer(&server, "/", "v1.chat");
    assert_eq!(chosen.as_deref(), Some("v1.chat"));
    for extra in ["", "Sec-WebSocket-Protocol: x, V2.CHAT\r\n"] {
        let refused = raw_upgrade(server.port, "/", extra).err().expect("refused");
        assert_eq!(refused.status, 400, "{extra:?}");
        assert_eq!(
            refused.body,
            "400 Bad Request: no subprotocol this server speaks was offered; \
             offer one of: v2.chat, v1.chat\n"
        );
        assert!(refused.closed);
        assert_eq!(ask(&mut ok, "still here"), "still here");
    }
}

fn on_upgrade_adds_headers_and_refuses_with_its_status() {
    let server = start("");
    let (mut c, response) = Client::connect_with(
        server.port,
        "/cookie?q=a+b&q=%C3%A9",
        &[
            ("cookie", "theme=dark; sid=\"s-42\""),
            ("user-agent", "t/1"),
        ],
    )
    .expect("upgraded");
    let headers = response.headers();
    assert_eq!(headers["set-cookie"], "session=s1; HttpOnly");
    assert_eq!(
        headers["x-echo"],
        "sid=s-42 ip=127.0.0.1 q=[\"a b\", \"é\"] ua=t/1"
    );
    assert!(headers.get("x-split").is_none() && headers.get("injected").is_none());
    assert_eq!(headers.len(), 5, "{headers:?}");
    assert_eq!(ask(&mut c, "hi"), "hi");
    server.wait_for_log("left out: its name is not a token");
    server.wait_for_log("left out: its value holds a line break");

    let refused = raw_upgrade(server.port, "/reject?name=bob", "")
        .err()
        .expect("refused");
    assert_eq!(refused.status, 403);
    assert_eq!(refused.body, "403 Forbidden: no entry for bob\n");
    assert_eq!(refused.header("X-Reason"), Some("test"));
    assert!(refused.closed, "the connection ends after the refusal");
    assert_eq!(ask(&mut c, "after"), "after");
}

fn state_from_the_upgrade_lasts_until_after_on_close() {
    let server = start(CHAT);
    let (mut ada, _) = offer(&server, "/?name=ada", "v1.chat");
    assert_eq!(ask(&mut ada, "state"), "ada 1", "readable in on_message");
    assert_eq!(ask(&mut ada, "state"), "ada 2", "and changed in place");
    let mut plain = server.connect();
    assert_eq!(
        ask(&mut plain, "state"),
        "none",
        "a connection without state"
    );
    assert_eq!(ask(&mut plain, "rename bob"), "renamed");
    assert_eq!(ask(&mut plain, "state"), "bob 1", "set by a hook");
    assert_eq!(ask(&mut plain, "rename cy"), "renamed");
    assert_eq!(ask(&mut plain, "state"), "cy 1");
    assert_eq!(
        ask(&mut plain, "log"),
        "dropped bob | gone true",
        "replaced, so dropped"
    );

    ada.ws.close(None).unwrap();
    let log = wait_for("ada's on_close and drop", DEADLINE, || {
        let log = ask(&mut plain, "log");
        log.contains("dropped ada").then_some(log)
    });
    assert_eq!(
        log, "dropped bob, on_close ada 2 v1.chat, dropped ada | gone true",
        "on_close read the state and the protocol, then the state was dropped"
    );
}

fn a_panicking_on_upgrade_refuses_only_that_client() {
    let mut server = start("");
    let pids = server.worker_pids();
    let mut steady = server.connect();
    assert_eq!(ask(&mut steady, "before"), "before");
    for round in 0..3 {
        let refused = raw_upgrade(server.port, "/panic", "")
            .err()
            .expect("refused");
        assert_eq!(refused.status, 500, "{refused:?}");
        assert_eq!(refused.body, "500 Internal Server Error: internal error\n");
        let echo = format!("still echoing {round}");
        assert_eq!(ask(&mut steady, &echo), echo);
    }
    server.wait_for_log("on_upgrade hook panicked");
    assert!(server.master_output().contains("on_upgrade has a bug"));
    assert_eq!(
        server.worker_pids(),
        pids,
        "the same worker, never restarted"
    );
    let owners = connection_owners(&server);
    assert_eq!(owners.get(&local_port(&steady)), Some(&pids[0]));
    let mut fresh = server.connect();
    assert_eq!(ask(&mut fresh, "new"), "new");
}

fn main() {
    if std::env::var_os(LIBRARY_SERVER_ENV).is_some() {
        server_program();
    }
    run_suite(&[
        (
            "the_server_picks_its_preferred_subprotocol_and_shows_it",
            the_server_picks_its_preferred_subprotocol_and_shows_it,
        ),
        (
            "a_required_subprotocol_refuses_clients_without_one",
            a_required_subprotocol_refuses_clients_without_one,
        ),
        (
            "on_upgrade_adds_headers_and_refuses_with_its_status",
            on_upgrade_adds_headers_and_refuses_with_its_status,
        ),
        (
            "state_from_the_upgrade_lasts_until_after_on_close",
            state_from_the_upgrade_lasts_until_after_on_close,
        ),
        (
            "a_panicking_on_upgrade_refuses_only_that_client",
            a_panicking_on_upgrade_refuses_only_that_client,
        ),
    ]);
}
