//! `examples/auth.rs` with real clients: this binary is a wsd program running the example's
//! `app` (compiled from the example's own source), started by the test driver in it.
//!
//! `harness = false` because a forking master must be the main thread of its process.

mod common;

#[path = "../examples/auth.rs"]
mod auth;

use common::*;

fn server_program() -> ! {
    wsd::Runner::new().app("auth", auth::app).run()
}

/// A client with a good token, and the `101` it got.
fn login(server: &Server, token: &str) -> Client {
    let target = format!("/?token={token}");
    let (client, response) =
        Client::connect_with(server.port, &target, &[]).expect("a good token upgrades");
    assert_eq!(response.status(), 101);
    client
}

/// Reads until `want` arrives (the chat relays everyone's lines, in order per sender).
fn expect_line(c: &mut Client, want: &str) {
    loop {
        let line = c.recv_text();
        if line == want {
            return;
        }
        assert!(line.contains(": "), "not a chat line: {line:?}");
    }
}

fn tokens_decide_who_chats_and_under_which_name() {
    // Two workers: a broadcast crosses the bus, and the name travels with the text.
    let server = Server::start_program(std::env::current_exe().unwrap(), "auth", 2, "");
    let mut ada = login(&server, "ada-secret");
    let mut grace = login(&server, "grace-secret");
    ada.send_text("hello");
    expect_line(&mut ada, "ada: hello");
    expect_line(&mut grace, "ada: hello");

    for (target, why) in [
        ("/?token=nope", "401 Unauthorized: unknown token\n"),
        (
            "/?room=1",
            "401 Unauthorized: missing token: connect with ?token=...\n",
        ),
        ("/?token=", "401 Unauthorized: unknown token\n"),
    ] {
        let request = upgrade_request_to(target, "");
        let answer = http_exchange(server.port, request.as_bytes(), DEADLINE);
        assert_eq!(answer.status, 401, "{target}: {answer:?}");
        assert_eq!(answer.body, why, "{target}");
        assert_eq!(
            answer.header("WWW-Authenticate"),
            Some("Bearer realm=\"wsd chat\""),
            "{target}"
        );
        assert!(
            answer.closed,
            "{target}: the connection ends after the answer"
        );
        // A refused client never reached the chat: the others keep talking.
        grace.send_text(&format!("after {target}"));
        expect_line(&mut ada, &format!("grace: after {target}"));
        expect_line(&mut grace, &format!("grace: after {target}"));
    }

    // The token is a query value like any other: escapes are decoded.
    let mut linus = login(&server, "linus%2Dsecret");
    linus.send_text("hi all");
    for c in [&mut ada, &mut grace, &mut linus] {
        expect_line(c, "linus: hi all");
    }
}

fn main() {
    if std::env::var_os(LIBRARY_SERVER_ENV).is_some() {
        server_program();
    }
    run_suite(&[(
        "tokens_decide_who_chats_and_under_which_name",
        tokens_decide_who_chats_and_under_which_name,
    )]);
}
