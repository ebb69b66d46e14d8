//! Interoperability with real third-party clients, over wss:// and ws://: Python's
//! `websockets`, Node's `ws`, Chromium (headless, through playwright-core) and curl, each
//! against a real wsd of its own (one server per client family) whose groups echo: on ws://,
//! and on wss:// without compression and with permessage-deflate in its "shared" and
//! "dedicated" modes, with a certificate made here (a test CA and a `localhost` certificate it
//! signed, never committed).
//! The client scripts are in tests/interop/; scripts/interop-deps.sh installs the clients
//! (pinned) under target/ when they are missing, and is run here once per test run.
//!
//! A client script performs its steps and prints a JSON report of what it saw (the
//! subprotocol and extensions negotiated, the server's close code, how many echoes came back
//! whole); the test judges the report against what each group should have negotiated. Every
//! client process runs under a deadline and is killed, with whatever it started (Chromium),
//! if the test fails or it overruns.

mod common;

use common::*;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde_json::{Value, json};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

/// What the clients offer, in their order; the groups prefer the second.
const OFFERED: [&str; 2] = ["v1.echo", "v2.echo"];
/// What every group answers to [`OFFERED`]: its own first choice (`subprotocols` below).
const CHOSEN: &str = "v2.echo";

/// A `[[worker]]` group of the test server: `echo` × 1.
struct Group {
    name: &'static str,
    tls: bool,
    /// Its `compression`: "off", "shared" or "dedicated".
    compression: &'static str,
}

/// ws:// and wss:// without compression, and wss:// with each mode of permessage-deflate.
const GROUPS: &[Group] = &[
    Group {
        name: "plain",
        tls: false,
        compression: "off",
    },
    Group {
        name: "tls",
        tls: true,
        compression: "off",
    },
    Group {
        name: "shared",
        tls: true,
        compression: "shared",
    },
    Group {
        name: "dedicated",
        tls: true,
        compression: "dedicated",
    },
];

/// How long one client run may take, start to end.
const CLIENT_DEADLINE: Duration = Duration::from_secs(120);

// ---------------------------------------------------------------------------------------------
// The clients, installed once per run.

struct Deps {
    python: PathBuf,
    node_dir: PathBuf,
}

/// Runs scripts/interop-deps.sh (it installs only what is missing) once for all the tests.
fn deps() -> &'static Deps {
    static DEPS: OnceLock<Result<Deps, String>> = OnceLock::new();
    let deps = DEPS.get_or_init(|| {
        let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
        let script = Path::new(ROOT).join("scripts/interop-deps.sh");
        let mut cmd = Command::new("bash");
        cmd.arg(&script);
        // apt-get may have to install Chromium on a bare machine.
        let run = run(
            "interop-deps.sh",
            &mut cmd,
            Duration::from_secs(1200),
            dir.path(),
        );
        if !run.status.success() {
            return Err(format!(
                "scripts/interop-deps.sh failed ({}): {}",
                run.status, run.stderr
            ));
        }
        eprint!("{}", run.stderr);
        let target = Path::new(ROOT).join("target");
        Ok(Deps {
            python: std::env::var_os("INTEROP_VENV")
                .map_or(target.join("interop-venv"), PathBuf::from)
                .join("bin/python"),
            node_dir: std::env::var_os("INTEROP_NODE_DIR")
                .map_or(target.join("interop-node"), PathBuf::from),
        })
    });
    deps.as_ref()
        .unwrap_or_else(|e| panic!("installing the clients: {e}"))
}

// ---------------------------------------------------------------------------------------------
// Client processes: run under a deadline, killed with their descendants when abandoned.

/// A client process; dropped while it still runs, it is killed with everything it started.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            kill_tree(self.0.id() as i32);
        }
        let _ = self.0.wait();
    }
}

/// The parent of each process, from /proc.
fn parents() -> HashMap<i32, i32> {
    let mut parents = HashMap::new();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|s| s.parse().ok()) else {
            continue;
        };
        let stat = std::fs::read_to_string(entry.path().join("stat")).unwrap_or_default();
        // After the command name (in parentheses, maybe with spaces): state, then ppid.
        if let Some(ppid) = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().nth(1)?.parse().ok())
        {
            parents.insert(pid, ppid);
        }
    }
    parents
}

/// `root` and its descendants, found by parent pid: a browser that Playwright started in a
/// process group of its own is still the client's child.
fn tree(root: i32) -> Vec<i32> {
    let parents = parents();
    let mut tree = vec![root];
    let mut i = 0;
    while i < tree.len() {
        let parent = tree[i];
        tree.extend(
            parents
                .iter()
                .filter(|&(_, &p)| p == parent)
                .map(|(&c, _)| c),
        );
        i += 1;
    }
    tree
}

/// Stops `root` and its descendants (so that none forks again), then kills them all, by pid.
fn kill_tree(root: i32) {
    let mut stopped: Vec<i32> = Vec::new();
    loop {
        let new: Vec<i32> = tree(root)
            .into_iter()
            .filter(|p| !stopped.contains(p))
            .collect();
        if new.is_empty() {
            break;
        }
        for pid in new {
            let _ = kill(Pid::from_raw(pid), Signal::SIGSTOP);
            stopped.push(pid);
        }
    }
    for pid in stopped {
        let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
    }
}

struct Run {
    status: ExitStatus,
    stdout: String,
    stderr: String,
}

/// Runs `cmd` to its end, its output in files in `dir`; panics, naming `client` and what it
/// said so far, if it has not ended within `deadline` (and kills it and its descendants).
fn run(client: &str, cmd: &mut Command, deadline: Duration, dir: &Path) -> Run {
    let slug: String = client
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .collect();
    let (out, err) = (
        dir.join(format!("{slug}.out")),
        dir.join(format!("{slug}.err")),
    );
    let file = |p: &Path| std::fs::File::create(p).expect("an output file");
    let mut proc = Proc(
        cmd.stdin(Stdio::null())
            .stdout(file(&out))
            .stderr(file(&err))
            .spawn()
            .unwrap_or_else(|e| panic!("{client}: cannot start {cmd:?}: {e}")),
    );
    let read = |p: &Path| std::fs::read_to_string(p).unwrap_or_default();
    let end = Instant::now() + deadline;
    let status = loop {
        if let Some(status) = proc.0.try_wait().expect("wait for a client") {
            break status;
        }
        if Instant::now() > end {
            panic!(
                "{client}: no result within {deadline:?}; it said:\n{}{}",
                read(&out),
                read(&err)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    Run {
        status,
        stdout: read(&out),
        stderr: read(&err),
    }
}

/// Runs a client script that prints a JSON report; panics with what it said if it fails.
fn report(client: &str, cmd: &mut Command, dir: &Path) -> Value {
    let started = Instant::now();
    let run = run(client, cmd, CLIENT_DEADLINE, dir);
    assert!(
        run.status.success(),
        "{client} failed ({}):\n{}{}",
        run.status,
        run.stderr,
        run.stdout
    );
    let report: Value = serde_json::from_str(run.stdout.trim())
        .unwrap_or_else(|e| panic!("{client}: not a JSON report ({e}):\n{}", run.stdout));
    println!(
        "{}: {} connections in {:.1} s",
        report["client"].as_str().unwrap_or(client),
        report["runs"].as_array().map_or(0, Vec::len),
        started.elapsed().as_secs_f64()
    );
    report
}

// ---------------------------------------------------------------------------------------------
// The server.

/// A test CA and a certificate it signed for `localhost` and 127.0.0.1; writes the server's
/// certificate and key to `dir` and returns the CA's certificate file, which clients trust.
fn make_certificates(dir: &Path) -> PathBuf {
    let now = time::OffsetDateTime::now_utc();
    let mut ca = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.distinguished_name
        .push(rcgen::DnType::CommonName, "wsd interop test CA");
    ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::CrlSign,
        rcgen::KeyUsagePurpose::DigitalSignature,
    ];
    ca.not_before = now - time::Duration::days(1);
    ca.not_after = now + time::Duration::days(30);
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let ca_cert = ca.self_signed(&ca_key).unwrap();
    let issuer = rcgen::Issuer::new(ca, ca_key);

    let mut leaf =
        rcgen::CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()])
            .unwrap();
    leaf.distinguished_name
        .push(rcgen::DnType::CommonName, "localhost");
    leaf.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
    leaf.use_authority_key_identifier_extension = true;
    leaf.not_before = now - time::Duration::days(1);
    leaf.not_after = now + time::Duration::days(30);
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = leaf.signed_by(&key, &issuer).unwrap();

    std::fs::write(dir.join("cert.pem"), cert.pem()).unwrap();
    std::fs::write(dir.join("key.pem"), key.serialize_pem()).unwrap();
    let ca_file = dir.join("ca.pem");
    std::fs::write(&ca_file, ca_cert.pem()).unwrap();
    ca_file
}

/// The test page, which every group serves (`static_dir`).
fn www() -> PathBuf {
    Path::new(ROOT).join("tests/interop/www")
}

/// A wsd with one `echo` group per entry of [`GROUPS`], each on a free port.
struct Interop {
    server: Server,
    ca: PathBuf,
    ports: HashMap<&'static str, u16>,
}

impl Interop {
    fn start() -> Interop {
        let dir = tempfile::tempdir().expect("temp dir");
        let ca = make_certificates(dir.path());
        let mut config = String::from("[server]\nstop_timeout = \"5s\"\n");
        for g in GROUPS {
            config += &format!(
                "\n[[worker]]\nname = \"{}\"\nlisten = \"websocket://127.0.0.1:0\"\napp = \"echo\"\n\
                 count = 1\nsubprotocols = [\"{CHOSEN}\", \"v1.echo\"]\nstatic_dir = {:?}\n",
                g.name,
                www()
            );
            if g.tls {
                config += "tls_cert = \"cert.pem\"\ntls_key = \"key.pem\"\n";
            }
            if g.compression != "off" {
                config += &format!("compression = \"{}\"\n", g.compression);
            }
        }
        let file = dir.path().join("workers.toml");
        std::fs::write(&file, config).unwrap();
        let mut server = Server::start_with(wsd_bin(), dir, file);
        let st = server.status();
        let ports = GROUPS
            .iter()
            .map(|g| {
                let listen = st["groups"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .find(|x| x["name"] == g.name)
                    .and_then(|x| x["listen"].as_str())
                    .unwrap_or_else(|| panic!("group {} in {st}", g.name));
                let port = listen.rsplit(':').next().unwrap().parse().unwrap();
                (g.name, port)
            })
            .collect();
        Interop { server, ca, ports }
    }

    fn dir(&self) -> &Path {
        self.server.dir.path()
    }

    /// The groups as the clients' SPEC lists them.
    fn spec(&self) -> Value {
        let groups: Vec<Value> = GROUPS
            .iter()
            .map(|g| {
                let port = self.ports[g.name];
                let (ws, http) = if g.tls {
                    ("wss", "https")
                } else {
                    ("ws", "http")
                };
                json!({
                    "name": g.name,
                    "port": port,
                    "url": format!("{ws}://localhost:{port}/"),
                    // Chromium does not check the certificate: the address will do.
                    "page": format!("{http}://127.0.0.1:{port}/"),
                })
            })
            .collect();
        json!({ "ca": self.ca, "protocols": OFFERED, "groups": groups })
    }

    /// Panics if a worker died (and was respawned) while the clients ran.
    fn assert_no_worker_died(&mut self, client: &str) {
        let st = self.server.status();
        for g in st["groups"].as_array().unwrap() {
            let exits = &g["exits"];
            assert!(
                exits.as_object().is_none_or(|e| e.is_empty()),
                "{client}: a worker of group {} died: {exits}",
                g["name"]
            );
        }
    }
}

/// Judges a client's report: every group was reached (`per_group` connections each), and each
/// connection negotiated the server's subprotocol, the extensions its group and its offer
/// call for, had `echoes` messages echoed whole, and saw the server answer Close 4000 with 4000.
fn judge(report: &Value, per_group: usize, echoes: u64) {
    let client = report["client"].as_str().unwrap_or("the client");
    let runs = report["runs"].as_array().expect("runs");
    assert_eq!(
        runs.len(),
        GROUPS.len() * per_group,
        "{client}: connections made: {report}"
    );
    for r in runs {
        let group = GROUPS
            .iter()
            .find(|g| r["group"] == g.name)
            .unwrap_or_else(|| panic!("{client}: an unknown group: {r}"));
        let offered = r["offer_deflate"] == true;
        let offer = if offered { "offering" } else { "not offering" };
        let what = format!(
            "{client}, group {} ({offer} permessage-deflate)",
            group.name
        );
        assert_eq!(r["echoes"], echoes, "{what}: echoes: {r}");
        assert_eq!(
            r["protocol"], CHOSEN,
            "{what}: the subprotocol must be the group's first choice of those offered: {r}"
        );
        let extensions = r["extensions"].as_str().unwrap_or_default();
        if offered && group.compression != "off" {
            assert!(
                extensions.starts_with("permessage-deflate"),
                "{what}: the group compresses ({}), so permessage-deflate: {r}",
                group.compression
            );
            // None of these clients asks for no_context_takeover: a shared group answers with
            // both anyway (its compressor and decompressor are the worker's), a dedicated one
            // with neither (the connection keeps its own).
            for param in ["server_no_context_takeover", "client_no_context_takeover"] {
                assert_eq!(
                    extensions.contains(param),
                    group.compression == "shared",
                    "{what}: {param} in {} mode: {r}",
                    group.compression
                );
            }
        } else {
            assert_eq!(
                extensions, "",
                "{what}: no extension (the group does not compress, or it was not offered): {r}"
            );
        }
        assert_eq!(
            r["close_code"], 4000,
            "{what}: the server's Close must answer the client's 4000: {r}"
        );
        if let Some(clean) = r.get("clean") {
            assert_eq!(clean, true, "{what}: the close was not clean: {r}");
        }
        if let Some(pong) = r.get("pong") {
            assert_eq!(pong, true, "{what}: no pong: {r}");
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The clients.

/// Starts a server, runs `program tests/interop/SCRIPT SPEC` against it and judges its
/// report: `per_group` connections to each group, `echoes` messages on each.
fn check_client(client: &str, program: &Path, script: &str, per_group: usize, echoes: u64) {
    let mut it = Interop::start();
    let mut cmd = Command::new(program);
    cmd.arg(Path::new(ROOT).join("tests/interop").join(script))
        .arg(it.spec().to_string())
        .env("INTEROP_NODE_DIR", &deps().node_dir);
    let report = report(client, &mut cmd, it.dir());
    judge(&report, per_group, echoes);
    it.assert_no_worker_died(client);
}

/// websockets offers permessage-deflate by default, and nothing with `compression=None`. Six
/// messages, one of them sent in three frames.
#[test]
fn python_websockets() {
    check_client("python websockets", &deps().python, "client.py", 2, 6);
}

/// ws offers permessage-deflate with `perMessageDeflate: true`, nothing with `false`. Six
/// messages, one of them sent in three frames.
#[test]
fn node_ws() {
    check_client("node ws", Path::new("node"), "client.mjs", 2, 6);
}

/// Chromium always offers permessage-deflate. Five messages: a page cannot fragment one.
#[test]
fn chromium() {
    check_client("chromium", Path::new("node"), "browser.mjs", 1, 5);
}

/// `curl ARGS`: its exit code and what it printed (`-w`), failing only if it cannot run.
fn curl(it: &Interop, args: &[&str]) -> (Option<i32>, String) {
    let mut cmd = Command::new("curl");
    cmd.args([
        "--silent",
        "--show-error",
        "--noproxy",
        "*",
        "--max-time",
        "20",
    ]);
    for port in it.ports.values() {
        cmd.arg("--resolve")
            .arg(format!("localhost:{port}:127.0.0.1"));
    }
    cmd.args(args);
    let run = run("curl", &mut cmd, CLIENT_DEADLINE, it.dir());
    (run.status.code(), format!("{}{}", run.stdout, run.stderr))
}

#[test]
fn curl_https_static_files() {
    deps();
    let it = Interop::start();
    let tls = it.ports["tls"];
    let ca = it.ca.to_str().unwrap();
    let body = it.dir().join("body");
    let body = body.to_str().unwrap();
    let index = std::fs::read_to_string(www().join("index.html")).unwrap();
    let got = || std::fs::read_to_string(body).unwrap_or_default();
    let status = "%{http_code} HTTP/%{http_version} %{content_type}";

    // The page over https, with the certificate checked against the test CA; ALPN settles on
    // HTTP/1.1, though curl offers h2 first.
    let url = format!("https://localhost:{tls}/");
    let (code, out) = curl(&it, &["--cacert", ca, "-o", body, "-w", status, &url]);
    assert_eq!(code, Some(0), "curl {url}: {out}");
    assert_eq!(out, "200 HTTP/1.1 text/html; charset=utf-8", "curl {url}");
    assert_eq!(got(), index, "curl {url}: the body");

    let url = format!("https://localhost:{tls}/missing.html");
    let (code, out) = curl(&it, &["--cacert", ca, "-o", body, "-w", status, &url]);
    assert_eq!(
        (code, out.split(' ').next()),
        (Some(0), Some("404")),
        "curl {url}: {out}"
    );

    // The certificate really is checked: without the test CA, curl refuses it (exit 60).
    let url = format!("https://localhost:{tls}/");
    let (code, out) = curl(&it, &["-o", body, &url]);
    assert_eq!(code, Some(60), "curl {url} without the CA: {out}");

    // Plain HTTP to the TLS port: the documented 400, in plain text.
    let url = format!("http://localhost:{tls}/");
    let (code, out) = curl(&it, &["-o", body, "-w", "%{http_code}", &url]);
    assert_eq!((code, out.as_str()), (Some(0), "400"), "curl {url}");
    assert_eq!(
        got().trim_end(),
        "400 Bad Request: this port speaks TLS: use https:// or wss://",
        "curl {url}: the body"
    );

    // The same page over http from the plain group.
    let url = format!("http://localhost:{}/", it.ports["plain"]);
    let (code, out) = curl(&it, &["-o", body, "-w", status, &url]);
    assert_eq!(code, Some(0), "curl {url}: {out}");
    assert_eq!(out, "200 HTTP/1.1 text/html; charset=utf-8", "curl {url}");
    assert_eq!(got(), index, "curl {url}: the body");
}
