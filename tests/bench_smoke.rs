//! `wsd bench` against a real wsd: it must connect, measure, print well-formed figures and
//! count errors honestly. Behaviour only: no figure here is a speed requirement, since the
//! machine running the tests may be busy with anything.

mod common;

use common::*;
use serde_json::Value;
use std::process::{Command, Output};

/// Runs `wsd bench <args> --json`; returns the parsed stdout and the whole output.
fn bench(args: &[&str]) -> (Value, Output) {
    let out = Command::new(wsd_bin())
        .arg("bench")
        .args(args)
        .arg("--json")
        .output()
        .expect("run wsd bench");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout.trim();
    assert_eq!(
        line.lines().count(),
        1,
        "one JSON line expected, got {out:?}"
    );
    let v: Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {out:?}"));
    (v, out)
}

/// [`bench`] with the arguments as one line of words.
fn bench_line(line: &str) -> (Value, Output) {
    bench(&line.split_whitespace().collect::<Vec<_>>())
}

fn assert_no_errors(v: &Value, out: &Output) {
    assert_eq!(v["errors"]["total"], 0, "{v}\n{out:?}");
    assert!(out.status.success(), "exit status with no errors: {out:?}");
}

fn assert_latency(v: &Value) {
    let l = &v["latency_us"];
    assert!(l["samples"].as_u64() > Some(0), "{v}");
    let (p50, p99, max) = (l["p50"].as_f64(), l["p99"].as_f64(), l["max"].as_f64());
    assert!(p50 > Some(0.0) && p99 >= p50 && max >= p99, "{v}");
}

#[test]
fn echo_reports_round_trips_and_no_errors() {
    let server = Server::start("echo", 2);
    let url = server.url();
    let (v, out) = bench(&[
        "echo", "--url", &url, "--conns", "20", "--size", "32", "--depth", "4", "--secs", "1",
    ]);
    assert_no_errors(&v, &out);
    assert_eq!(v["mode"], "echo");
    assert_eq!(
        (v["conns"].as_u64(), v["size"].as_u64()),
        (Some(20), Some(32))
    );
    assert_eq!(
        (v["ready"].as_u64(), v["open_at_end"].as_u64()),
        (Some(20), Some(20))
    );
    let messages = v["messages"].as_u64().unwrap();
    assert!(messages > 0, "{v}");
    assert!(v["msgs_per_sec"].as_f64() > Some(0.0), "{v}");
    assert!(v["mb_per_sec"].as_f64() > Some(0.0), "{v}");
    assert_eq!(v["latency_us"]["samples"].as_u64(), Some(messages), "{v}");
    assert_latency(&v);
}

#[test]
fn the_table_is_the_default_output() {
    let server = Server::start("echo", 1);
    let out = Command::new(wsd_bin())
        .args(["bench", "echo", "--url", &server.url(), "--conns", "2"])
        .args(["--secs", "1"])
        .output()
        .expect("run wsd bench");
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{out:?}");
    for row in ["messages", "throughput", "latency", "errors       0"] {
        assert!(table.contains(row), "no {row:?} row in\n{table}");
    }
}

#[test]
fn errors_are_counted_and_make_the_exit_code_1() {
    // A port nothing listens on: every connection is refused.
    let port = free_port();
    let url = format!("ws://127.0.0.1:{port}/");
    let (v, out) = bench(&["echo", "--url", &url, "--conns", "5", "--secs", "1"]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert_eq!(v["errors"]["connect"], 5, "{v}");
    assert_eq!(v["errors"]["total"], 5, "{v}");
    assert!(
        v["errors"]["samples"][0]
            .as_str()
            .is_some_and(|s| s.contains("refused")),
        "{v}"
    );
    assert_eq!(v["messages"], 0, "{v}");
}

#[test]
fn a_refused_upgrade_is_a_handshake_error() {
    // A stand-in that refuses every upgrade: the refusal must be counted, not hang the run.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for stream in listener.incoming().take(3) {
            use std::io::{Read, Write};
            let mut s = stream.unwrap();
            let mut buf = [0u8; 1024];
            let _ = s.read(&mut buf);
            let _ = s.write_all(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\n\r\n");
        }
    });
    let url = format!("ws://127.0.0.1:{port}/");
    let (v, out) = bench(&["echo", "--url", &url, "--conns", "3", "--secs", "1"]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert_eq!(v["errors"]["handshake"], 3, "{v}");
    assert!(
        v["errors"]["samples"][0].as_str().unwrap().contains("403"),
        "{v}"
    );
}

#[test]
fn broadcast_over_chat_delivers_every_message_to_every_subscriber() {
    let server = Server::start("chat", 2);
    let url = server.url();
    let config = server.config.to_str().unwrap().to_string();
    let (v, out) = bench(&[
        "broadcast",
        "--url",
        &url,
        "--conns",
        "40",
        "--secs",
        "1",
        "--rate",
        "20",
        "--config",
        &config,
    ]);
    assert_no_errors(&v, &out);
    assert_eq!(
        (v["mode"].as_str(), v["app"].as_str()),
        (Some("broadcast"), Some("chat"))
    );
    assert_eq!(v["sent"], 20, "{v}");
    assert_eq!(v["expected"], 20 * 40, "{v}");
    assert_eq!(v["delivered"], v["expected"], "{v}");
    assert_eq!(v["missing"], 0, "{v}");
    assert_eq!(v["ready"], 40, "the publisher is not a subscriber: {v}");
    assert!(v["deliveries_per_sec"].as_f64() > Some(0.0), "{v}");
    assert_latency(&v);
    assert_server_cpu(&v, 2, true);
    assert!(
        v["server"]["cpu_secs_per_million"].as_f64() >= Some(0.0),
        "{v}"
    );
}

#[test]
fn broadcast_over_pubsub_subscribes_first() {
    let server = Server::start("pubsub", 2);
    let url = server.url();
    let (v, out) = bench(&[
        "broadcast",
        "--app",
        "pubsub",
        "--topic",
        "smoke \"1\"",
        "--url",
        &url,
        "--conns",
        "30",
        "--secs",
        "1",
        "--rate",
        "10",
    ]);
    assert_no_errors(&v, &out);
    assert_eq!(
        (v["app"].as_str(), v["topic"].as_str()),
        (Some("pubsub"), Some("smoke \"1\""))
    );
    assert_eq!(
        (v["sent"].as_u64(), v["delivered"].as_u64()),
        (Some(10), Some(300)),
        "{v}"
    );
    assert_eq!(v["missing"], 0, "{v}");
    assert_latency(&v);
}

/// The server figures every mode reports when given the server's pids: the processes found
/// and the CPU time they spent (possibly 0.0 in a one-second run; a number either way).
fn assert_server_cpu(v: &Value, workers: usize, master: bool) {
    let s = &v["server"];
    assert_eq!(s["workers"].as_array().map(Vec::len), Some(workers), "{v}");
    assert_eq!(s["master"].is_i64(), master, "{v}");
    assert!(s["cpu_secs"].as_f64() >= Some(0.0), "{v}");
    assert!(s["cpu_window_secs"].as_f64() > Some(0.0), "{v}");
}

#[test]
fn echo_reads_the_server_cpu_through_its_config() {
    let server = Server::start("echo", 2);
    let config = server.config.to_str().unwrap().to_string();
    let (v, out) = bench(&[
        "echo",
        "--url",
        &server.url(),
        "--conns",
        "10",
        "--secs",
        "1",
        "--config",
        &config,
    ]);
    assert_no_errors(&v, &out);
    assert_server_cpu(&v, 2, true);
    assert!(
        v["server"]["cpu_secs_per_million"].as_f64() >= Some(0.0),
        "{v}"
    );
}

#[test]
fn connect_bursts_then_cycles_with_clean_closes() {
    let mut server = Server::start("echo", 2);
    let pids: Vec<String> = server.worker_pids().iter().map(i32::to_string).collect();
    let (v, out) = bench(&[
        "connect",
        "--url",
        &server.url(),
        "--conns",
        "50",
        "--slots",
        "10",
        "--secs",
        "1",
        "--pid",
        &pids.join(","),
    ]);
    assert_no_errors(&v, &out);
    assert_eq!(v["mode"], "connect");
    let burst = &v["burst"];
    assert_eq!(burst["upgrades"], 50, "{v}");
    assert!(burst["upgrades_per_sec"].as_f64() > Some(0.0), "{v}");
    assert_eq!(burst["latency_us"]["samples"], 50, "{v}");
    assert_eq!(v["open_at_end"], 50, "the burst stays open: {v}");
    let sustained = &v["sustained"];
    assert!(sustained["handshakes"].as_u64() > Some(0), "{v}");
    assert!(sustained["handshakes_per_sec"].as_f64() > Some(0.0), "{v}");
    assert_latency(&v);
    assert_server_cpu(&v, 2, false);
    assert!(v["server"]["burst_cpu_secs"].as_f64() >= Some(0.0), "{v}");
}

#[test]
fn connect_with_no_secs_is_the_burst_alone() {
    let server = Server::start("echo", 1);
    let (v, out) = bench(&[
        "connect",
        "--url",
        &server.url(),
        "--conns",
        "20",
        "--secs",
        "0",
    ]);
    assert_no_errors(&v, &out);
    assert_eq!(v["burst"]["upgrades"], 20, "{v}");
    assert!(v["sustained"].is_null(), "{v}");
    assert!(v.get("server").is_none(), "no pids, no server figures: {v}");
}

#[test]
fn idle_reports_the_server_memory_per_connection() {
    let server = Server::start("echo", 2);
    let config = server.config.to_str().unwrap().to_string();
    let (v, out) = bench(&[
        "idle",
        "--url",
        &server.url(),
        "--conns",
        "1000",
        "--hold",
        "1",
        "--config",
        &config,
    ]);
    assert_no_errors(&v, &out);
    assert_eq!(v["mode"], "idle");
    assert_eq!(
        (v["ready"].as_u64(), v["echoed"].as_u64()),
        (Some(1000), Some(1000)),
        "{v}"
    );
    assert_eq!(v["open_at_end"], 1000, "{v}");
    assert_server_cpu(&v, 2, true);
    let m = &v["server"]["memory"];
    assert!(m["pss_kib_per_conn"].as_f64() > Some(0.0), "{v}");
    assert!(m["rss_kib_per_conn"].as_f64() > Some(0.0), "{v}");
    let workers = m["workers"].as_array().unwrap();
    assert_eq!(workers.len(), 2, "{v}");
    let held: u64 = workers
        .iter()
        .filter_map(|w| w["connections"].as_u64())
        .sum();
    assert_eq!(held, 1000, "the workers' own count of the connections: {v}");
    assert!(
        workers
            .iter()
            .all(|w| w["pss_kib_after"].as_u64() > Some(0)),
        "{v}"
    );
}

#[test]
fn latency_sends_on_schedule_and_hears_every_reply() {
    let mut server = Server::start("echo", 2);
    let mut pids = vec![server.master_pid()];
    pids.extend(server.worker_pids());
    let pids: Vec<String> = pids.iter().map(i32::to_string).collect();
    let (v, out) = bench(&[
        "latency",
        "--url",
        &server.url(),
        "--conns",
        "20",
        "--rate",
        "200",
        "--secs",
        "1",
        "--pid",
        &pids.join(","),
    ]);
    assert_no_errors(&v, &out);
    assert_eq!(v["mode"], "latency");
    assert_eq!(
        (v["sent"].as_u64(), v["replies"].as_u64()),
        (Some(200), Some(200)),
        "{v}"
    );
    assert_eq!(v["unanswered"], 0, "{v}");
    assert!(v["achieved_rate"].as_f64() > Some(0.0), "{v}");
    assert!(v["late"].as_u64().is_some(), "{v}");
    assert_latency(&v);
    let l = &v["latency_us"];
    assert!(l["p90"].as_f64() >= l["p50"].as_f64(), "{v}");
    assert!(l["p999"].as_f64() >= l["p99"].as_f64(), "{v}");
    assert_server_cpu(&v, 3, false);
}

/// A server that pushes on its own (clock-echo's 5 s clock) does not confuse the latency
/// client: pushes are counted apart, every message still has its reply. `--spin` polls
/// between sends instead of sleeping.
#[test]
fn latency_counts_server_pushes_apart_from_replies() {
    let server = Server::start("clock-echo", 1);
    let (v, out) = bench(&[
        "latency",
        "--url",
        &server.url(),
        "--conns",
        "10",
        "--rate",
        "100",
        "--secs",
        "6",
        "--spin",
    ]);
    assert_no_errors(&v, &out);
    assert_eq!(v["spin"], true, "{v}");
    assert_eq!(
        (v["sent"].as_u64(), v["replies"].as_u64()),
        (Some(600), Some(600)),
        "{v}"
    );
    // The clock fires 5 s after the worker starts, inside the 6 s of sending: one push to
    // each of the 10 connections (two if the run was slow enough to span 10 s).
    let pushes = v["pushes"].as_u64().unwrap_or(0);
    assert!(pushes == 10 || pushes == 20, "{v}");
    assert_latency(&v);
}

/// A wss:// group serving `app` with a fresh self-signed certificate (made here, never kept).
fn tls_server(app: &str, count: usize) -> Server {
    let key = rcgen::KeyPair::generate().unwrap();
    let params = rcgen::CertificateParams::new(vec!["localhost".into()]).unwrap();
    let cert = params.self_signed(&key).unwrap();
    let extra = "tls_cert = \"cert.pem\"\ntls_key = \"key.pem\"\n";
    let (dir, config) = Server::config(app, count, extra);
    std::fs::write(dir.path().join("cert.pem"), cert.pem()).unwrap();
    std::fs::write(dir.path().join("key.pem"), key.serialize_pem()).unwrap();
    Server::start_with(wsd_bin(), dir, config)
}

#[test]
fn echo_and_connect_run_over_tls() {
    let server = tls_server("echo", 1);
    let wss = format!("wss://127.0.0.1:{}/", server.port);
    let (v, out) = bench_line(&format!(
        "echo --url {wss} --insecure --conns 10 --depth 4 --secs 1"
    ));
    assert_no_errors(&v, &out);
    assert_eq!(v["url"], wss, "{v}");
    assert!(
        v["tls"].as_str().is_some_and(|t| t.starts_with("TLSv1_3")),
        "{v}"
    );
    assert!(v["messages"].as_u64() > Some(0), "{v}");
    assert!(v["client"]["cpu_secs"].as_f64() >= Some(0.0), "{v}");
    // --tls on a ws:// URL, and the whole life of a connection: upgrade, Close, EOF.
    let ws = format!("ws://127.0.0.1:{}/", server.port);
    let (v, out) = bench_line(&format!(
        "connect --url {ws} --tls --insecure --conns 20 --slots 5 --secs 1"
    ));
    assert_no_errors(&v, &out);
    assert_eq!(v["burst"]["upgrades"], 20, "{v}");
    assert!(v["sustained"]["handshakes"].as_u64() > Some(0), "{v}");
    // Without --insecure the self-signed certificate is refused: a handshake error.
    let (v, out) = bench_line(&format!("echo --url {wss} --conns 2 --secs 1"));
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert_eq!(v["errors"]["handshake"], 2, "{v}");
}

/// wsd in shared mode agrees on permessage-deflate with no context kept on either side; the
/// client compresses what it sends, inflates what it gets, and reports both ratios.
#[test]
fn deflate_is_offered_agreed_and_measured() {
    let server = Server::start_extra("echo", 1, "compression = \"shared\"");
    let url = server.url();
    let (v, out) = bench_line(&format!(
        "echo --url {url} --deflate --payload json --size 2048 --conns 4 --depth 2 --secs 1"
    ));
    assert_no_errors(&v, &out);
    assert_eq!(v["payload"], "json", "{v}");
    assert!(v["messages"].as_u64() > Some(0), "{v}");
    let d = &v["deflate"];
    assert_eq!(
        d["agreed"], "permessage-deflate; server_no_context_takeover; client_no_context_takeover",
        "{v}"
    );
    assert_eq!(
        (d["connections"].as_u64(), d["of"].as_u64()),
        (Some(4), Some(4)),
        "{v}"
    );
    // Chat events in JSON compress, though not like a repeated alphabet.
    let (sent, received) = (
        d["sent_ratio"].as_f64().unwrap(),
        d["received_ratio"].as_f64().unwrap(),
    );
    assert!(
        (1.5..10.0).contains(&sent) && (1.5..10.0).contains(&received),
        "{v}"
    );
    // A server that does not agree gets plain frames, and says so.
    let server = Server::start("echo", 1);
    let url = server.url();
    let (v, out) = bench_line(&format!("echo --url {url} --deflate --conns 2 --secs 1"));
    assert_no_errors(&v, &out);
    assert_eq!(
        (
            v["deflate"]["connections"].as_u64(),
            v["deflate"]["agreed"].as_str()
        ),
        (Some(0), None),
        "{v}"
    );
}

const API_KEY: &str = "bench-smoke-key-0123456789";

/// A pubsub group of 2 workers with the backend API on a port of the OS's choice, and the
/// API's URL.
fn api_server() -> (Server, String) {
    let extra = format!("\n[api]\nlisten = \"http://127.0.0.1:0\"\nkeys = [\"{API_KEY}\"]\n");
    let mut server = Server::start_extra("pubsub", 2, &extra);
    let api = server.status()["api"]["listen"]
        .as_str()
        .expect("status shows the API")
        .to_string();
    (server, api)
}

#[test]
fn api_publishes_reach_every_subscriber_of_their_topic() {
    let (server, api) = api_server();
    let url = server.url();
    let config = server.config.to_str().unwrap().to_string();
    // The same server twice: the subscribers are split over two "hosts" as over two masters.
    let (v, out) = bench(&[
        "api", "--url", &url, "--url", &url, "--api", &api, "--key", API_KEY, "--conns", "40",
        "--topics", "4", "--rate", "50", "--secs", "1", "--config", &config,
    ]);
    assert_no_errors(&v, &out);
    assert_eq!(
        (v["mode"].as_str(), v["protocol"].as_str()),
        (Some("api"), Some("wsd"))
    );
    assert_eq!(v["hosts"].as_array().map(Vec::len), Some(2), "{v}");
    assert_eq!(v["ready"], 40, "{v}");
    assert_eq!(
        (v["sent"].as_u64(), v["published"].as_u64()),
        (Some(50), Some(50)),
        "{v}"
    );
    // 10 subscribers on each of the 4 topics.
    assert_eq!(v["expected"], 50 * 10, "{v}");
    assert_eq!(v["delivered"], v["expected"], "{v}");
    assert_eq!(
        (v["missing"].as_u64(), v["unexpected"].as_u64()),
        (Some(0), Some(0)),
        "{v}"
    );
    assert_eq!(v["latency_us"]["samples"], 500, "{v}");
    assert_eq!(v["answer_latency_us"]["samples"], 50, "{v}");
    assert!(v["publishes_per_sec"].as_f64() > Some(0.0), "{v}");
    assert!(v["deliveries_per_sec"].as_f64() > Some(0.0), "{v}");
    assert_latency(&v);
    assert_server_cpu(&v, 2, true);
    assert!(v["server"]["cpu_system_secs"].as_f64() >= Some(0.0), "{v}");
}

#[test]
fn api_flat_out_expects_a_delivery_per_subscriber_of_each_accepted_publish() {
    let (server, api) = api_server();
    let url = server.url();
    let (v, out) = bench(&[
        "api",
        "--url",
        &url,
        "--api",
        &api,
        "--key",
        API_KEY,
        "--conns",
        "30",
        "--topics",
        "3",
        "--flat",
        "--depth",
        "4",
        "--http-conns",
        "2",
        "--secs",
        "1",
    ]);
    assert_no_errors(&v, &out);
    assert_eq!(v["flat"], true, "{v}");
    let published = v["published"].as_u64().unwrap();
    assert!(published > 0, "{v}");
    assert_eq!(v["sent"].as_u64(), Some(published), "{v}");
    assert_eq!(v["expected"].as_u64(), Some(published * 10), "{v}");
    assert_eq!(v["delivered"], v["expected"], "{v}");
    assert_eq!(v["missing"], 0, "{v}");
}

#[test]
fn api_refusals_are_counted_as_errors() {
    let (server, api) = api_server();
    let url = server.url();
    let (v, out) = bench(&[
        "api",
        "--url",
        &url,
        "--api",
        &api,
        "--key",
        "not-the-key-0123456789",
        "--conns",
        "5",
        "--rate",
        "10",
        "--secs",
        "1",
    ]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert_eq!(v["errors"]["protocol"], 10, "{v}");
    assert!(
        v["errors"]["samples"][0]
            .as_str()
            .is_some_and(|s| s.contains("HTTP 401")),
        "{v}"
    );
    assert_eq!(
        (v["published"].as_u64(), v["expected"].as_u64()),
        (Some(0), Some(0)),
        "{v}"
    );
    assert_eq!(v["delivered"], 0, "{v}");
}
