//! `[metrics]`: the master's `/metrics`, parsed by a real Prometheus parser (Python
//! `prometheus_client`'s, installed by scripts/interop-deps.sh), counts what real clients and
//! backends did, per group and worker; `/health` follows the workers' readiness.

mod common;

use common::*;
use serde_json::{Value, json};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

const KEY: &str = "metrics-key-0123456789";

/// The interop venv's Python, with prometheus_client installed.
fn python() -> PathBuf {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let out = Command::new("bash")
        .arg(root.join("scripts/interop-deps.sh"))
        .output()
        .expect("run interop-deps.sh");
    assert!(out.status.success(), "interop-deps.sh: {out:?}");
    root.join("target/interop-venv/bin/python")
}

/// Every sample of `text` as Prometheus's Python parser reads it: name, labels, value.
fn parse(python: &Path, text: &str) -> Vec<Value> {
    let script = "import sys, json\n\
        from prometheus_client.parser import text_string_to_metric_families\n\
        out = []\n\
        for f in text_string_to_metric_families(sys.stdin.read()):\n\
        \x20   for s in f.samples:\n\
        \x20       out.append({'family': f.name, 'type': f.type, 'name': s.name, 'labels': s.labels, 'value': s.value})\n\
        print(json.dumps(out))\n";
    let mut child = Command::new(python)
        .args(["-c", script])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("python");
    use std::io::Write;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "the parser refused the exposition: {}\n{text}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

fn port_of(url: &str) -> u16 {
    url.rsplit(':').next().unwrap().parse().unwrap()
}

fn get(port: u16, path: &str) -> HttpAnswer {
    let req = format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n");
    http_exchange(port, req.as_bytes(), DEADLINE)
}

/// The sum of samples named `name` whose labels include `with`.
fn sum(samples: &[Value], name: &str, with: &[(&str, &str)]) -> f64 {
    samples
        .iter()
        .filter(|s| s["name"] == name)
        .filter(|s| with.iter().all(|(k, v)| s["labels"][*k] == *v))
        .map(|s| s["value"].as_f64().unwrap())
        .sum()
}

#[test]
fn metrics_count_what_clients_and_backends_did_per_group_and_worker() {
    let python = python();
    let extra = format!(
        "\n[api]\nlisten = \"127.0.0.1:0\"\nkeys = [\"{KEY}\"]\n\n[metrics]\nlisten = \"127.0.0.1:0\"\n"
    );
    let mut server = Server::start_extra("pubsub", 2, &extra);
    let st = server.status();
    let metrics = port_of(
        st["metrics"]
            .as_str()
            .expect("status names the metrics listener"),
    );
    let api = port_of(st["api"]["listen"].as_str().unwrap());

    // Traffic: 5 clients, 3 messages each; 2 refused upgrades; 3 API requests, one bad.
    let mut clients: Vec<Client> = (0..5).map(|_| server.connect()).collect();
    for c in &mut clients {
        for _ in 0..3 {
            c.send_text(r#"{"subscribe":"room"}"#);
            c.recv_text();
        }
    }
    for _ in 0..2 {
        let bad = "GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n";
        let a = http_exchange(server.port, bad.as_bytes(), DEADLINE);
        assert_eq!(a.status, 426, "{a:?}");
    }
    let publish =
        |body: &str, key: &str| api_call(api, "POST", "/api/publish", Some(key), body).status;
    assert_eq!(publish(r#"{"topic":"room","data":"x"}"#, KEY), 200);
    assert_eq!(publish(r#"{"topic":"room","data":"y"}"#, KEY), 200);
    assert_eq!(
        publish(r#"{"topic":"room","data":"z"}"#, "wrong-key-0123456789"),
        401
    );
    for c in &mut clients {
        assert_eq!(c.recv_text(), "x");
        assert_eq!(c.recv_text(), "y");
    }

    // The workers report once a second: wait until the scrape shows all of it.
    let samples = wait_for("the metrics to count the traffic", DEADLINE, || {
        let a = get(metrics, "/metrics");
        assert_eq!(a.status, 200, "{a:?}");
        assert!(
            a.header("content-type")
                .unwrap()
                .starts_with("text/plain; version=0.0.4"),
            "{a:?}"
        );
        let s = parse(&python, &a.body);
        let done = sum(&s, "wsd_messages_in_total", &[]) >= 15.0
            && sum(&s, "wsd_api_requests_total", &[]) >= 3.0
            && sum(&s, "wsd_upgrades_rejected_total", &[]) >= 2.0
            && sum(&s, "wsd_connections", &[]) >= 5.0;
        done.then_some(s)
    });
    let group = [("group", "pubsub")];
    assert_eq!(sum(&samples, "wsd_connections", &group), 5.0);
    assert_eq!(sum(&samples, "wsd_messages_in_total", &group), 15.0);
    assert_eq!(sum(&samples, "wsd_messages_out_total", &group), 25.0);
    assert_eq!(sum(&samples, "wsd_upgrades_accepted_total", &group), 5.0);
    assert_eq!(
        sum(
            &samples,
            "wsd_upgrades_rejected_total",
            &[("status", "426")]
        ),
        2.0
    );
    assert_eq!(
        sum(
            &samples,
            "wsd_api_requests_total",
            &[("endpoint", "publish"), ("status", "200")]
        ),
        2.0
    );
    assert_eq!(
        sum(
            &samples,
            "wsd_api_requests_total",
            &[("endpoint", "publish"), ("status", "401")]
        ),
        1.0
    );
    // Every series names its group and worker; both workers are there.
    let workers: std::collections::BTreeSet<String> = samples
        .iter()
        .filter(|s| s["family"] == "wsd_connections")
        .map(|s| s["labels"]["worker"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(workers.len(), 2, "{workers:?}");
    assert!(samples.iter().all(|s| s["labels"]["group"] == "pubsub"));
    // Histograms: 5 + 2 handshakes timed, and the hooks that ran (one per message at least).
    assert_eq!(
        sum(&samples, "wsd_handshake_duration_seconds_count", &[]),
        7.0
    );
    assert!(sum(&samples, "wsd_hook_duration_seconds_count", &[]) >= 15.0);
    let inf = sum(
        &samples,
        "wsd_handshake_duration_seconds_bucket",
        &[("le", "+Inf")],
    );
    assert_eq!(inf, 7.0);
    // No Redis: no link state.
    assert_eq!(sum(&samples, "wsd_redis_up", &[]), 0.0);
    assert!(!samples.iter().any(|s| s["name"] == "wsd_redis_up"));

    // Health: 200 while serving; a wrong path or method is answered too.
    let h = get(metrics, "/health");
    assert_eq!(h.status, 200, "{h:?}");
    let body: Value = serde_json::from_str(&h.body).unwrap();
    assert_eq!(
        body,
        json!({"status": "ok", "ready_workers": 2, "workers": 2})
    );
    assert_eq!(get(metrics, "/nothing").status, 404);
    let post = http_exchange(
        metrics,
        b"POST /metrics HTTP/1.1\r\nContent-Length: 0\r\n\r\n",
        DEADLINE,
    );
    assert_eq!(post.status, 405);

    // While a worker is down (killed, waiting to be respawned), health says 503 or the
    // replacement is already ready: never 200 with a slot missing.
    let pid = server.worker_pids()[0];
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    wait_for("a 503 or the respawned worker", DEADLINE, || {
        let h = get(metrics, "/health");
        let body: Value = serde_json::from_str(&h.body).ok()?;
        match h.status {
            503 => {
                assert_eq!(body["status"], "unavailable");
                Some(())
            }
            200 => (server.worker_pids().iter().all(|&p| p != pid)).then_some(()),
            other => panic!("health answered {other}"),
        }
    });
    wait_for("health to be 200 again", DEADLINE, || {
        (get(metrics, "/health").status == 200).then_some(())
    });
}
