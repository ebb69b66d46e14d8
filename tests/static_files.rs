//! `static_dir` with a real wsd: a plain GET on the WebSocket's port gets the repo's chat page,
//! escapes out of the folder (sent as raw request lines, which no HTTP client library would
//! leave alone) get 404, and upgrades on the same port work as before.

mod common;

use common::Server;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::time::Duration;

/// Sends `request` as is and reads until the server closes: (status, headers, body).
fn raw(port: u16, request: &str) -> (u16, String, Vec<u8>) {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
    s.write_all(request.as_bytes()).unwrap();
    let mut out = Vec::new();
    s.read_to_end(&mut out)
        .expect("the server closes after its answer");
    let end = out
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("a whole response head")
        + 4;
    let head = String::from_utf8(out[..end].to_vec()).unwrap();
    let status = head[9..12].parse().unwrap();
    (status, head, out[end..].to_vec())
}

fn get(port: u16, target: &str) -> (u16, String, Vec<u8>) {
    raw(
        port,
        &format!("GET {target} HTTP/1.1\r\nHost: 127.0.0.1\r\nUser-Agent: test\r\n\r\n"),
    )
}

fn static_dir() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("static")
}

fn chat_with_files() -> Server {
    let extra = format!("static_dir = {:?}", static_dir().to_str().unwrap());
    Server::start_extra("chat", 2, &extra)
}

#[test]
fn the_chat_page_is_served_beside_the_websocket() {
    let server = chat_with_files();
    let page = std::fs::read(static_dir().join("index.html")).unwrap();
    let (status, head, body) = get(server.port, "/");
    assert_eq!(status, 200, "{head}");
    assert!(
        head.contains("\r\nContent-Type: text/html; charset=utf-8\r\n"),
        "{head}"
    );
    assert!(
        head.contains(&format!("\r\nContent-Length: {}\r\n", page.len())),
        "{head}"
    );
    assert!(head.contains("\r\nConnection: close\r\n"), "{head}");
    assert_eq!(body, page);
    assert!(String::from_utf8_lossy(&body).contains("chat.js"));

    let (status, head, body) = get(server.port, "/chat.js?v=1");
    assert_eq!(status, 200, "{head}");
    assert!(head.contains("Content-Type: text/javascript"), "{head}");
    assert!(String::from_utf8_lossy(&body).contains("new WebSocket("));
    let (status, head, _) = get(server.port, "/style.css");
    assert!(
        status == 200 && head.contains("Content-Type: text/css"),
        "{head}"
    );

    let (status, head, body) = raw(server.port, "HEAD /index.html HTTP/1.1\r\nHost: x\r\n\r\n");
    assert_eq!(status, 200);
    assert!(head.contains(&format!("\r\nContent-Length: {}\r\n", page.len())));
    assert!(body.is_empty(), "HEAD has no body");

    // A WebSocket on the same port, after and between the page loads: the chat app relays
    // to every client, the sender included.
    let mut a = server.connect();
    let mut b = server.connect();
    a.send_text("hello from a");
    assert_eq!(b.recv_text(), "hello from a");
    assert_eq!(a.recv_text(), "hello from a");
    assert_eq!(get(server.port, "/").0, 200);
    b.send_text("and b");
    assert_eq!(a.recv_text(), "and b");
}

#[test]
fn nothing_outside_the_folder_is_served() {
    let server = chat_with_files();
    assert!(
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("Cargo.toml")
            .exists()
    );
    for target in [
        "/../Cargo.toml",
        "/static/../../Cargo.toml",
        "/%2e%2e/Cargo.toml",
        "/..%2FCargo.toml",
        "/%2E%2E%2F%2E%2E%2Fetc%2Fpasswd",
        "/../../../../../../etc/passwd",
        "/.git/config",
        "/missing.html",
    ] {
        let (status, head, body) = get(server.port, target);
        assert_eq!(status, 404, "{target}: {head}");
        let body = String::from_utf8_lossy(&body);
        assert!(
            !body.contains("[package]") && !body.contains("root:"),
            "{body}"
        );
    }
    for target in ["/index.html%00.txt", "/%zz", "Cargo.toml"] {
        assert_eq!(get(server.port, target).0, 400, "{target}");
    }
    let (status, head, _) = raw(server.port, "POST / HTTP/1.1\r\nHost: x\r\n\r\n");
    assert_eq!(status, 405, "{head}");
    // The worker is unharmed.
    let mut c = server.connect();
    c.send_text("still here");
    assert_eq!(c.recv_text(), "still here");
}

#[test]
fn without_static_dir_a_plain_get_is_still_426() {
    let server = Server::start("chat", 1);
    let (status, head, _) = get(server.port, "/");
    assert_eq!(status, 426, "{head}");
    assert!(head.contains("Sec-WebSocket-Version: 13"), "{head}");
    let (status, _, _) = raw(server.port, "HEAD / HTTP/1.1\r\nHost: x\r\n\r\n");
    assert_eq!(status, 405);
}
