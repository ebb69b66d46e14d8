//! The cluster bus: two wsd masters (two "hosts") joined by a real `redis-server` on loopback.
//! A chat message reaches the clients of both, exactly once each; a topic published on one
//! reaches the subscribers of the other; `send_to` crosses hosts. Then Redis is stopped for
//! 2 s: local delivery goes on, `status` and the logs tell the outage once, and when Redis is
//! back the cluster delivers again without restarting wsd.
//!
//! The backend API crosses hosts too: publishes through either host's API reach every
//! subscriber exactly once and in order, a topic's publishes go only to the workers with
//! subscribers to it (Redis `PUBSUB NUMSUB`), and through a Redis restart the API keeps
//! answering and routing rebuilds itself.
//!
//! Deploys keep it exactly once: a line published from one host every millisecond reaches each
//! subscriber on the other once, in order, through reloads (to another count too), an upgrade,
//! and a new worker dying in the middle of taking its clients.
//!
//! Needs `redis-server` on the PATH (`scripts/test.sh` installs it with apt-get).
//!
//! Like `tests/bus.rs`, this binary is itself a wsd program: with `WSD_LIBRARY_SERVER=1` it
//! serves the built-in apps plus `relay` (shows each client its global id and forwards
//! `to ID TEXT` with `send_to`) and `feed` (topics, and a worker that crashes on adopting a
//! client when a test says so). `harness = false` because a forking master must be the main
//! thread of its process.

mod common;

use common::*;
use serde_json::Value;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// How long Redis stays away in the outage test.
const OUTAGE: Duration = Duration::from_secs(2);
/// Workers per group on each master.
const COUNT: usize = 2;
/// The groups each master runs (one bus per group name).
const APPS: [&str; 4] = ["chat", "pubsub", "relay", "feed"];

fn server_program() -> ! {
    wsd::Runner::new()
        .app("relay", relay_app)
        .app("feed", feed_app)
        .run()
}

/// `sub T` subscribes to topic T (answered `subscribed T`); `pub T DATA` publishes DATA to
/// it. It hands its clients over (it keeps no state of its own). When the test says so, a new
/// worker crashes on adopting one ([`crash_if_marked`]), or waits as it starts
/// ([`hold_start_if_marked`]).
fn feed_app(worker: &mut wsd::Worker) {
    worker.on_message(|ctx, conn, msg| {
        let text = msg.as_text().unwrap_or("");
        if let Some(topic) = text.strip_prefix("sub ") {
            ctx.subscribe(conn, topic);
            let _ = ctx.send(conn, format!("subscribed {topic}"));
        } else if let Some((topic, data)) =
            text.strip_prefix("pub ").and_then(|r| r.split_once(' '))
        {
            ctx.publish(topic, data.to_string());
        }
    });
    worker.on_handoff(|_, _| Vec::new());
    worker.on_worker_start(|ctx| hold_start_if_marked(ctx.worker_id()));
    worker.on_adopt(|_, _, _| crash_if_marked());
}

/// A `redis-server` of the test's own on a free loopback port, killed when dropped.
struct Redis {
    port: u16,
    dir: tempfile::TempDir,
    child: Option<Child>,
}

impl Redis {
    fn start() -> Redis {
        let port = free_port();
        let mut r = Redis {
            port,
            dir: tempfile::tempdir().expect("temp dir"),
            child: None,
        };
        r.restart();
        r
    }

    /// Starts the server (again) on the same port, and waits until it answers PING.
    fn restart(&mut self) {
        assert!(self.child.is_none(), "redis is already running");
        let log = std::fs::File::create(self.dir.path().join("redis.log")).unwrap();
        let child = Command::new("redis-server")
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(self.dir.path())
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| {
                panic!("cannot run redis-server ({e}); install it: apt-get install -y redis-server")
            });
        self.child = Some(child);
        let port = self.port;
        wait_for("redis to answer PING", DEADLINE, || {
            let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
            s.set_read_timeout(Some(Duration::from_secs(1))).ok()?;
            s.write_all(b"PING\r\n").ok()?;
            let mut buf = [0u8; 7];
            s.read_exact(&mut buf).ok()?;
            (&buf == b"+PONG\r\n").then_some(())
        });
    }

    /// Kills the server (as a crash would) and reaps it.
    fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Sends one inline command; the connection, to read the answer from.
    fn ask(&self, cmd: &str) -> TcpStream {
        let mut s = TcpStream::connect(("127.0.0.1", self.port)).expect("redis");
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        s.write_all(format!("{cmd}\r\n").as_bytes()).unwrap();
        s
    }

    /// Sends one inline command; returns the first line of the answer.
    fn command(&self, cmd: &str) -> String {
        answer_line(&mut self.ask(cmd))
    }

    /// `PUBSUB NUMSUB channel`: how many connections listen to `channel`.
    fn numsub(&self, channel: &str) -> u64 {
        let mut s = self.ask(&format!("PUBSUB NUMSUB {channel}"));
        // *2 / $len / channel / :count
        for _ in 0..3 {
            answer_line(&mut s);
        }
        (answer_line(&mut s).trim_start_matches(':').parse()).expect("a count")
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    /// The same server, spoken to in RESP3 (`HELLO 3`), as Redis 6+ and Valkey allow.
    fn url_resp3(&self) -> String {
        format!("{}?protocol=resp3", self.url())
    }

    /// `CLIENT LIST`: a line per connection (`id=3 addr=... resp=2`).
    fn client_list(&self) -> String {
        let mut s = self.ask("CLIENT LIST");
        let head = answer_line(&mut s);
        let len: usize = (head.trim_start_matches('$').parse()).expect("a bulk string");
        let mut body = vec![0u8; len];
        s.read_exact(&mut body).expect("the client list");
        String::from_utf8_lossy(&body).to_string()
    }
}

/// One line of Redis's answer, without its CRLF.
fn answer_line(s: &mut TcpStream) -> String {
    let mut line = Vec::new();
    let mut b = [0u8; 1];
    while !line.ends_with(b"\r\n") {
        s.read_exact(&mut b).expect("redis answer");
        line.push(b[0]);
    }
    String::from_utf8_lossy(&line).trim_end().to_string()
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The backend API's key on every host.
const API_KEY: &str = "cluster-api-key-0123456789";

/// One wsd master running every app of [`APPS`] on the cluster bus (the API serving
/// `pubsub`), and its groups' ports.
struct Host {
    server: Server,
    ports: Vec<u16>,
    api: u16,
    /// Its bus.
    url: String,
}

impl Host {
    fn start(redis: &Redis) -> Host {
        Host::start_with(redis, "")
    }

    /// A host whose pubsub group has `pubsub` lines added.
    fn start_with(redis: &Redis, pubsub: &str) -> Host {
        Host::start_with_env(redis, pubsub, &[])
    }

    /// A host whose pubsub group has `pubsub` lines added, started with `env`.
    fn start_with_env(redis: &Redis, pubsub: &str, env: &[(&str, &std::path::Path)]) -> Host {
        Host::start_on(&redis.url(), pubsub, env)
    }

    /// A host on the bus at `url`.
    fn start_on(url: &str, pubsub: &str, env: &[(&str, &std::path::Path)]) -> Host {
        let dir = tempfile::tempdir().expect("temp dir");
        let config = dir.path().join("workers.toml");
        let mut text = format!("[server]\nstop_timeout = \"5s\"\nbus = \"{url}\"\n");
        for app in APPS {
            text += &format!(
                "\n[[worker]]\nlisten = \"websocket://127.0.0.1:0\"\ncount = {COUNT}\napp = \"{app}\"\n"
            );
            if app == "pubsub" {
                text += pubsub;
            }
        }
        text += &format!(
            "\n[api]\nlisten = \"127.0.0.1:0\"\nkeys = [\"{API_KEY}\"]\ngroup = \"pubsub\"\n"
        );
        std::fs::write(&config, text).unwrap();
        let mut server = Server::start_with_env(this_program(), dir, config, env);
        let st = server.status();
        let port = |listen: &str| listen.rsplit(':').next().unwrap().parse().unwrap();
        let ports = (0..APPS.len())
            .map(|g| port(st["groups"][g]["listen"].as_str().unwrap()))
            .collect();
        let api = port(st["api"]["listen"].as_str().unwrap());
        Host {
            server,
            ports,
            api,
            url: url.to_string(),
        }
    }

    /// Publishes through this host's API; the status and the answer.
    fn publish(&self, topic: &str, data: &str) -> (u16, Value) {
        let body = serde_json::json!({ "topic": topic, "data": data }).to_string();
        let a = api_call(self.api, "POST", "/api/publish", Some(API_KEY), &body);
        (
            a.status,
            serde_json::from_str(&a.body).unwrap_or(Value::Null),
        )
    }

    /// `GET path` on this host's API, as JSON.
    fn get(&self, path: &str) -> Value {
        let a = api_call(self.api, "GET", path, Some(API_KEY), "");
        assert_eq!(a.status, 200, "{path}: {a:?}");
        serde_json::from_str(&a.body).expect("JSON")
    }

    /// The workers (`host-slot`) with subscribers to `topic` that this host's presence names
    /// (connection ids name their host and worker): the host's own, or with presence kept in
    /// Redis, the cluster's.
    fn holders(&self, topic: &str) -> std::collections::BTreeSet<String> {
        let p = self.get(&format!("/api/presence?topic={topic}"));
        p["subscribers"]
            .as_array()
            .unwrap_or_else(|| panic!("presence: {p}"))
            .iter()
            .map(|s| {
                let id = s["conn"].as_str().unwrap();
                let mut parts = id.split('-');
                format!("{}-{}", parts.next().unwrap(), parts.next().unwrap())
            })
            .collect()
    }

    fn connect(&self, app: &str) -> Client {
        let g = APPS.iter().position(|a| *a == app).unwrap();
        Client::connect(self.ports[g])
    }

    /// Waits until `status --json` shows the bus in `state` on every worker; returns it.
    fn wait_bus(&mut self, state: &str) -> Value {
        let all = APPS.len() * COUNT;
        wait_for(
            &format!("the bus {state} on every worker"),
            DEADLINE,
            || {
                let st = self.server.try_status()?;
                let bus = &st["bus"];
                let every = st["workers"]
                    .as_array()?
                    .iter()
                    .all(|w| w["bus_state"] == format!("redis {state}"));
                (bus["state"] == state && bus["workers"] == all && every).then_some(st)
            },
        )
    }

    fn log(&self) -> String {
        self.server.master_output()
    }
}

fn this_program() -> PathBuf {
    std::env::current_exe().expect("the test binary's path")
}

/// How long "nothing more arrives" is watched for.
const QUIET: Duration = Duration::from_millis(300);

/// Nothing is waiting on `c`: call after [`QUIET`] has passed since the last send.
fn assert_silent(c: &mut Client, who: &str) {
    c.ws.get_mut()
        .set_read_timeout(Some(Duration::from_millis(20)))
        .unwrap();
    loop {
        match c.read() {
            Ok(tungstenite::Message::Ping(_) | tungstenite::Message::Pong(_)) => continue,
            Ok(m) => panic!("{who}: unexpected {m:?}"),
            Err(tungstenite::Error::Io(e))
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                break;
            }
            Err(e) => panic!("{who}: {e}"),
        }
    }
    c.ws.get_mut()
        .set_read_timeout(Some(Duration::from_secs(15)))
        .unwrap();
}

/// Chat clients on both hosts; a message sent on `from` reaches every one of them once.
fn chat_reaches_both_hosts(hosts: &mut [Host; 2], text: &str, from: usize) {
    let mut clients: Vec<(String, Client)> = Vec::new();
    for (h, host) in hosts.iter().enumerate() {
        // Four each, so both workers of a host most likely have some.
        for i in 0..4 {
            clients.push((format!("host {h} chat client {i}"), host.connect("chat")));
        }
    }
    wait_for("every chat client counted", DEADLINE, || {
        hosts
            .iter_mut()
            .all(|h| {
                h.server
                    .try_status()
                    .is_some_and(|st| connections(&st, "chat") == 4)
            })
            .then_some(())
    });
    let sender = from * 4;
    clients[sender].1.send_text(text);
    for (who, c) in clients.iter_mut() {
        assert_eq!(c.recv_text(), text, "{who}");
    }
    std::thread::sleep(QUIET);
    for (who, c) in clients.iter_mut() {
        assert_silent(c, who);
    }
}

/// Open connections of group `name` in a status.
fn connections(st: &Value, name: &str) -> u64 {
    st["workers"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|w| w["name"] == name)
        .map(|w| w["connections"].as_u64().unwrap_or(0))
        .sum()
}

fn subscribe(c: &mut Client, topic: &str) {
    c.send_text(&format!("{{\"subscribe\":\"{topic}\"}}"));
    assert_eq!(c.recv_text(), format!("{{\"subscribed\":\"{topic}\"}}"));
}

/// Waits until Redis routes `topic` to exactly the workers, on every host, with subscribers
/// to it: routing has caught up with the subscriptions just made.
fn wait_routed(redis: &Redis, hosts: &[Host], topic: &str) -> u64 {
    let want = hosts
        .iter()
        .flat_map(|h| h.holders(topic))
        .collect::<std::collections::BTreeSet<_>>()
        .len() as u64;
    let channel = format!("wsd:pubsub:t:{topic}");
    wait_for(
        &format!("{topic} routed to {want} worker(s)"),
        DEADLINE,
        || (redis.numsub(&channel) == want).then_some(want),
    )
}

/// A topic published on host 1 reaches its subscribers on host 0, and only them.
fn topics_cross_hosts(redis: &Redis, hosts: &mut [Host; 2]) {
    let mut a_news: Vec<Client> = (0..3).map(|_| hosts[0].connect("pubsub")).collect();
    let mut a_other = hosts[0].connect("pubsub");
    let mut b_news = hosts[1].connect("pubsub");
    let mut b_publisher = hosts[1].connect("pubsub");
    for c in a_news.iter_mut() {
        subscribe(c, "news");
    }
    subscribe(&mut a_other, "other");
    subscribe(&mut b_news, "news");
    wait_routed(redis, hosts, "news");
    wait_routed(redis, hosts, "other");
    b_publisher.send_text("{\"publish\":\"news\",\"data\":\"from b\"}");
    let expect = "{\"topic\":\"news\",\"data\":\"from b\"}";
    for (i, c) in a_news.iter_mut().enumerate() {
        assert_eq!(c.recv_text(), expect, "host 0 subscriber {i}");
    }
    assert_eq!(b_news.recv_text(), expect, "host 1 subscriber");
    std::thread::sleep(QUIET);
    for (i, c) in a_news.iter_mut().enumerate() {
        assert_silent(c, &format!("host 0 subscriber {i}"));
    }
    assert_silent(&mut a_other, "host 0 subscriber of another topic");
    assert_silent(&mut b_publisher, "host 1 publisher (not subscribed)");
    assert_silent(&mut b_news, "host 1 subscriber");
}

/// A relay client: its global id.
fn relay_client(host: &Host) -> (Client, String) {
    let mut c = host.connect("relay");
    let welcome = c.recv_text();
    let id = welcome
        .strip_prefix("id ")
        .expect("the welcome")
        .to_string();
    (c, id)
}

/// `send_to` reaches a client of the other host, both ways.
fn send_to_crosses_hosts(hosts: &[Host; 2], tag: &str) {
    let (mut a, a_id) = relay_client(&hosts[0]);
    let (mut b, b_id) = relay_client(&hosts[1]);
    assert_ne!(a_id.split('-').next(), b_id.split('-').next(), "two hosts");
    a.send_text(&format!("to {b_id} {tag} from a"));
    assert_eq!(b.recv_text(), format!("{tag} from a"));
    b.send_text(&format!("to {a_id} {tag} from b"));
    assert_eq!(a.recv_text(), format!("{tag} from b"));
}

fn count(text: &str, needle: &str) -> usize {
    text.matches(needle).count()
}

/// Two hosts, one speaking RESP2 to Redis and one RESP3, share chat, topics and `send_to`,
/// lose Redis for a while, and share them again once it is back.
fn cluster_delivers_and_survives_a_redis_outage() {
    let mut redis = Redis::start();
    let mut hosts = [
        Host::start(&redis),
        Host::start_on(&redis.url_resp3(), "", &[]),
    ];
    for h in hosts.iter_mut() {
        h.wait_bus("up");
    }
    let speaks = |list: &str, resp: &str| list.lines().any(|l| l.ends_with(resp));
    let both = |list: String| speaks(&list, " resp=2") && speaks(&list, " resp=3");
    let list = redis.client_list();
    assert!(both(list.clone()), "both protocols in use:\n{list}");
    let out = hosts[0].server.wsd(&["status"]);
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let all = APPS.len() * COUNT;
    let line = format!("bus: {} — up on {all}/{all} workers", redis.url());
    assert!(text.contains(&line), "no {line:?} in:\n{text}");
    // The workers' helper threads are the workers' own: the master, which forks, has none.
    for h in &hosts {
        let master = h.server.master_pid();
        let threads = std::fs::read_dir(format!("/proc/{master}/task"))
            .unwrap()
            .count();
        assert_eq!(threads, 1, "the master runs threads");
    }

    chat_reaches_both_hosts(&mut hosts, "hello from host 0", 0);
    chat_reaches_both_hosts(&mut hosts, "hello from host 1", 1);
    topics_cross_hosts(&redis, &mut hosts);
    send_to_crosses_hosts(&hosts, "before");
    assert_eq!(workers_sum(&hosts[0].server.status(), "bus_dropped"), 0);
    // To a host that is not there: nobody listens on its channel, and that is counted.
    let (mut lost, _) = relay_client(&hosts[0]);
    lost.send_text("to 00000000000000ff-0-1-1 nobody home");
    wait_for("the undeliverable send_to counted", DEADLINE, || {
        let st = hosts[0].server.try_status()?;
        (workers_sum(&st, "bus_dropped") == 1).then_some(())
    });

    // Chat clients that stay through the outage, two on each host.
    let mut a: Vec<Client> = (0..2).map(|_| hosts[0].connect("chat")).collect();
    let mut b: Vec<Client> = (0..2).map(|_| hosts[1].connect("chat")).collect();
    wait_for("the chat clients counted", DEADLINE, || {
        hosts
            .iter_mut()
            .all(|h| {
                h.server
                    .try_status()
                    .is_some_and(|st| connections(&st, "chat") == 2)
            })
            .then_some(())
    });

    // Redis closes every publishing connection (as its idle `timeout` would): the next message
    // still crosses, over a new one, and that is no outage.
    let killed = redis.command("CLIENT KILL TYPE normal");
    assert!(
        killed.starts_with(':') && killed != ":0",
        "CLIENT KILL: {killed}"
    );
    a[0].send_text("after a cut");
    for c in a.iter_mut().chain(b.iter_mut()) {
        assert_eq!(c.recv_text(), "after a cut");
    }
    for h in &hosts {
        assert_eq!(count(&h.log(), "bus: redis unavailable"), 0, "{}", h.log());
    }

    // Redis goes away for OUTAGE.
    let down_at = Instant::now();
    redis.stop();
    for h in hosts.iter_mut() {
        let st = h.wait_bus("down");
        assert_eq!(st["bus"]["workers_up"], 0, "{}", st["bus"]);
    }
    // Local delivery goes on, on each host; nothing crosses.
    a[0].send_text("local on host 0");
    for c in a.iter_mut() {
        assert_eq!(c.recv_text(), "local on host 0");
    }
    b[1].send_text("local on host 1");
    for c in b.iter_mut() {
        assert_eq!(c.recv_text(), "local on host 1");
    }
    let workers = APPS.len() * COUNT;
    for (i, h) in hosts.iter().enumerate() {
        wait_for("every worker to log the outage", DEADLINE, || {
            (count(&h.log(), "bus: redis unavailable at") >= workers).then_some(())
        });
        let out = h.server.wsd(&["status"]);
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        assert!(
            text.contains(&format!(
                "bus: {} — down (up on 0/{workers} workers)",
                h.url
            )),
            "host {i}:\n{text}"
        );
    }
    std::thread::sleep(OUTAGE.saturating_sub(down_at.elapsed()));
    for (i, h) in hosts.iter().enumerate() {
        let log = h.log();
        assert_eq!(
            count(&log, "bus: redis down (reported by worker"),
            1,
            "host {i}: the master tells the outage once:\n{log}"
        );
        assert_eq!(
            count(&log, "bus: redis unavailable at"),
            workers,
            "host {i}: each worker tells it once, however many retries:\n{log}"
        );
    }
    let dropped = workers_sum(&hosts[0].server.status(), "bus_dropped");
    assert!(dropped >= 1, "the message for redis is counted as dropped");

    // Redis comes back on the same port; wsd reconnects by itself.
    redis.restart();
    for h in hosts.iter_mut() {
        h.wait_bus("up");
        h.server
            .wait_for_log("bus: redis back (every worker reaches it)");
    }
    let list = redis.client_list();
    assert!(both(list.clone()), "both protocols again:\n{list}");
    a[1].send_text("after the outage");
    for (who, c) in [("host 0", &mut a), ("host 1", &mut b)] {
        for c in c.iter_mut() {
            // The first message each gets: what was local during the outage stayed local.
            assert_eq!(c.recv_text(), "after the outage", "{who}");
        }
    }
    std::thread::sleep(QUIET);
    for c in a.iter_mut().chain(b.iter_mut()) {
        assert_silent(c, "after the outage");
    }
    topics_cross_hosts(&redis, &mut hosts);
    send_to_crosses_hosts(&hosts, "after");
    for (i, h) in hosts.iter().enumerate() {
        let log = h.log();
        assert_eq!(count(&log, "bus: redis back (every"), 1, "host {i}:\n{log}");
        assert_eq!(
            count(&log, "bus: redis back at"),
            workers,
            "host {i}:\n{log}"
        );
    }
}

/// With Redis unreachable from the start, the workers serve their own clients, say so once,
/// and join the cluster when Redis appears.
fn a_server_starts_without_redis_and_joins_later() {
    let mut redis = Redis::start();
    redis.stop();
    let mut host = Host::start(&redis);
    host.wait_bus("down");
    let mut c = [host.connect("chat"), host.connect("chat")];
    c[0].send_text("alone");
    for c in c.iter_mut() {
        assert_eq!(c.recv_text(), "alone");
    }
    redis.restart();
    host.wait_bus("up");
    let mut other = Host::start(&redis);
    other.wait_bus("up");
    let mut far = other.connect("chat");
    wait_for("the far client counted", DEADLINE, || {
        let st = other.server.try_status()?;
        (connections(&st, "chat") == 1).then_some(())
    });
    c[1].send_text("together");
    assert_eq!(far.recv_text(), "together");
    let log = host.log();
    assert_eq!(
        count(&log, "bus: redis down (reported by worker"),
        1,
        "{log}"
    );
}

/// Reads `n` text messages from `c` and checks that each publisher's (`{host}-{seq}`) came
/// once each and in order.
fn assert_in_order(c: &mut Client, who: &str, publishers: usize, each: usize) {
    let mut next = vec![0usize; publishers];
    for _ in 0..publishers * each {
        let text = c.recv_text();
        let (from, seq) = text.split_once('-').expect("host-seq");
        let (from, seq): (usize, usize) = (from.parse().unwrap(), seq.parse().unwrap());
        assert_eq!(seq, next[from], "{who}: from host {from}, got {text}");
        next[from] += 1;
    }
}

/// Publishes through the API of either host reach every subscriber on both, once each and in
/// order per publisher; a topic's publishes reach only the workers with subscribers to it;
/// through a Redis restart the API keeps answering, and routing rebuilds itself.
fn the_api_publishes_across_hosts_routed_by_interest() {
    const EACH: usize = 40;
    let mut redis = Redis::start();
    let mut hosts = [Host::start(&redis), Host::start(&redis)];
    for h in hosts.iter_mut() {
        h.wait_bus("up");
    }
    let mut subs: Vec<(String, Client)> = Vec::new();
    for (h, host) in hosts.iter().enumerate() {
        for i in 0..4 {
            let mut c = host.connect("pubsub");
            subscribe(&mut c, "feed");
            subs.push((format!("host {h} subscriber {i}"), c));
        }
    }
    let feed_workers = wait_routed(&redis, &hosts, "feed");
    assert!(
        (2..=2 * COUNT as u64).contains(&feed_workers),
        "{feed_workers}"
    );
    for seq in 0..EACH {
        for (h, host) in hosts.iter().enumerate() {
            let (status, answer) = host.publish("feed", &format!("{h}-{seq}"));
            assert_eq!(status, 200, "{answer}");
            assert_eq!(answer["delivered"], 4, "this host's subscribers: {answer}");
        }
    }
    for (who, c) in subs.iter_mut() {
        assert_in_order(c, who, 2, EACH);
    }
    std::thread::sleep(QUIET);
    for (who, c) in subs.iter_mut() {
        assert_silent(c, who);
    }
    // Only the workers with subscribers listen to a topic: `solo` has them on host 0 only.
    let mut solo: Vec<Client> = (0..3).map(|_| hosts[0].connect("pubsub")).collect();
    for c in solo.iter_mut() {
        subscribe(c, "solo");
    }
    assert!(hosts[1].holders("solo").is_empty());
    let solo_workers = wait_routed(&redis, &hosts, "solo");
    assert_eq!(solo_workers, hosts[0].holders("solo").len() as u64);
    assert!(solo_workers >= 1);
    let (_, answer) = hosts[1].publish("solo", "0-0");
    assert_eq!(answer["delivered"], 0, "host 1 has no solo subscriber");
    for (i, c) in solo.iter_mut().enumerate() {
        assert_eq!(c.recv_text(), "0-0", "host 0 solo subscriber {i}");
    }
    drop(solo);
    wait_for(
        "the last solo subscriber to take its channel along",
        DEADLINE,
        || (redis.numsub("wsd:pubsub:t:solo") == 0).then_some(()),
    );

    // Redis restarts: the API answers throughout; what could not cross is counted as dropped.
    redis.stop();
    for h in hosts.iter_mut() {
        h.wait_bus("down");
    }
    let dropped_before = workers_sum(&hosts[0].server.status(), "bus_dropped");
    let (status, answer) = hosts[0].publish("feed", "outage");
    assert_eq!(
        (status, &answer["delivered"]),
        (200, &Value::from(4)),
        "{answer}"
    );
    for (who, c) in subs.iter_mut().take(4) {
        assert_eq!(c.recv_text(), "outage", "{who}");
    }
    wait_for("the publish Redis could not take counted", DEADLINE, || {
        let st = hosts[0].server.try_status()?;
        (workers_sum(&st, "bus_dropped") > dropped_before).then_some(())
    });
    redis.restart();
    for h in hosts.iter_mut() {
        h.wait_bus("up");
    }
    assert_eq!(
        wait_routed(&redis, &hosts, "feed"),
        feed_workers,
        "routing rebuilt"
    );
    let (status, _) = hosts[1].publish("feed", "1-0");
    assert_eq!(status, 200);
    for (who, c) in subs.iter_mut() {
        // Host 1's subscribers never saw the outage's publish: this is their next message.
        assert_eq!(c.recv_text(), "1-0", "{who}");
    }
}

/// Numbered lines (`1-0`, `1-1`, ...) sent one a millisecond by `send` on a thread of its own,
/// until [`Lines::finish`].
struct Lines {
    sent: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: std::thread::JoinHandle<()>,
}

impl Lines {
    fn start(mut send: impl FnMut(&str) + Send + 'static) -> Lines {
        use std::sync::atomic::Ordering::SeqCst;
        let sent = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (count, halt) = (sent.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            while !halt.load(SeqCst) {
                let seq = count.load(SeqCst);
                send(&format!("1-{seq}"));
                count.store(seq + 1, SeqCst);
                std::thread::sleep(Duration::from_millis(1));
            }
        });
        Lines { sent, stop, thread }
    }

    /// Waits until `by` more lines have gone.
    fn advance(&self, by: usize) {
        let sent = || self.sent.load(std::sync::atomic::Ordering::SeqCst);
        let from = sent();
        wait_for("the lines to go on", DEADLINE, || {
            (sent() >= from + by).then_some(())
        });
    }

    /// Stops, and checks that each of `subs` heard every line once, in order, and nothing
    /// more.
    fn finish(self, subs: &mut [Client]) {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        self.thread.join().expect("the sending thread");
        let n = self.sent.load(std::sync::atomic::Ordering::SeqCst);
        for (i, c) in subs.iter_mut().enumerate() {
            for seq in 0..n {
                assert_eq!(c.recv_text(), format!("1-{seq}"), "subscriber {i}");
            }
        }
        std::thread::sleep(QUIET);
        for (i, c) in subs.iter_mut().enumerate() {
            assert_silent(c, &format!("subscriber {i}"));
        }
    }
}

/// A backend publishes a numbered line through one host's API every millisecond while the
/// other host reloads, reloads to one worker a group, and upgrades to a new binary with two:
/// each subscriber there moves to a new worker (of its slot, or of another) with the lines in
/// flight, and hears every line once, in order.
fn publishes_from_another_host_cross_a_reload_exactly_once() {
    const SUBSCRIBERS: usize = 40;
    let redis = Redis::start();
    let mut hosts = [Host::start(&redis), Host::start(&redis)];
    for h in hosts.iter_mut() {
        h.wait_bus("up");
    }
    let mut subs: Vec<Client> = (0..SUBSCRIBERS)
        .map(|_| {
            let mut c = hosts[0].connect("pubsub");
            subscribe(&mut c, "live");
            c
        })
        .collect();
    wait_routed(&redis, &hosts, "live");
    let api = hosts[1].api;
    let lines = Lines::start(move |line| {
        let body = serde_json::json!({ "topic": "live", "data": line });
        let a = api_call(
            api,
            "POST",
            "/api/publish",
            Some(API_KEY),
            &body.to_string(),
        );
        assert_eq!(a.status, 200, "publish {line}: {a:?}");
    });
    lines.advance(50);
    let next = hosts[0].server.dir.path().join("wsd-next");
    std::fs::copy(this_program(), &next).unwrap();
    for (count, action) in [(COUNT, "reload"), (1, "reload"), (COUNT, "upgrade")] {
        let server = &mut hosts[0].server;
        let config = std::fs::read_to_string(&server.config).unwrap();
        let config = config.replace(&format!("count = {COUNT}"), &format!("count = {count}"));
        std::fs::write(
            &server.config,
            config.replace("count = 1", &format!("count = {count}")),
        )
        .unwrap();
        let before = server.worker_pids();
        let out = match action {
            "reload" => server.wsd(&["reload"]),
            _ => server.wsd(&["upgrade", "--binary", next.to_str().unwrap()]),
        };
        let said = String::from_utf8_lossy(&out.stderr).to_string();
        assert!(out.status.success(), "{action} to count {count}: {said}");
        for pid in before {
            wait_for("the old worker to exit", DEADLINE, || {
                exited(pid).then_some(())
            });
        }
        // An upgrade to another count changes it once the old master has gone.
        wait_for("every group at its count", DEADLINE, || {
            (server.worker_pids().len() == APPS.len() * count).then_some(())
        });
        lines.advance(50);
    }
    lines.finish(&mut subs);
    let log = hosts[0].log();
    assert!(
        !log.contains("no mark from redis"),
        "a crossing went on without its mark:\n{log}"
    );
}

/// Two hosts on `redis`, the first started with `env`: 40 clients of the first one's `feed`
/// group subscribed to `live` (routed to both its feed workers), and the second one's `feed`
/// publishing a numbered line to it every millisecond, 50 of them gone already.
fn feed_live(redis: &Redis, env: &[(&str, &std::path::Path)]) -> ([Host; 2], Vec<Client>, Lines) {
    const SUBSCRIBERS: usize = 40;
    let mut hosts = [Host::start_with_env(redis, "", env), Host::start(redis)];
    for h in hosts.iter_mut() {
        h.wait_bus("up");
    }
    let subs: Vec<Client> = (0..SUBSCRIBERS)
        .map(|_| {
            let mut c = hosts[0].connect("feed");
            c.send_text("sub live");
            assert_eq!(c.recv_text(), "subscribed live");
            c
        })
        .collect();
    wait_for("live routed to every feed worker", DEADLINE, || {
        (redis.numsub("wsd:feed:t:live") == COUNT as u64).then_some(())
    });
    let mut publisher = hosts[1].connect("feed");
    let lines = Lines::start(move |line| publisher.send_text(&format!("pub live {line}")));
    lines.advance(50);
    (hosts, subs, lines)
}

/// A new worker dies while taking its clients in a reload, with a line published from another
/// host every millisecond: the old worker takes back the clients it had not handed over (it
/// read every message for them itself) and hands them on to the worker started again. Each
/// subscriber hears every line once, in order.
fn publishes_from_another_host_survive_a_new_worker_dying_mid_handoff() {
    let redis = Redis::start();
    let marks = tempfile::tempdir().expect("temp dir");
    let marker = marks.path().join("crash-on-adopt");
    let (mut hosts, mut subs, lines) = feed_live(&redis, &[(CRASH_ENV, marker.as_path())]);
    // The first new worker dies as it takes its first client, before it has said so: every
    // client is still the old worker's.
    std::fs::write(&marker, "1").unwrap();
    let before = hosts[0].server.worker_pids();
    let out = hosts[0].server.wsd(&["reload"]);
    let said = String::from_utf8_lossy(&out.stderr).to_string();
    assert_eq!(
        out.status.code(),
        Some(1),
        "the reload reports the death: {said}"
    );
    assert!(!marker.exists(), "a new worker crashed on its first client");
    for pid in before {
        wait_for("the old worker to exit", DEADLINE, || {
            exited(pid).then_some(())
        });
    }
    lines.advance(50);
    lines.finish(&mut subs);
}

/// `kill -9` of a new master mid-upgrade, with a line published from another host every
/// millisecond: the clients of feed's slot 0 have gone to its new worker, and slot 1's new
/// worker is still starting. The new worker hands every client back to the old one, which
/// hands them on to a worker its master starts again. Each subscriber hears every line once,
/// in order.
fn publishes_from_another_host_survive_a_new_master_killed_mid_upgrade() {
    let redis = Redis::start();
    let marks = tempfile::tempdir().expect("temp dir");
    let marker = marks.path().join("hold-start");
    let (mut hosts, mut subs, lines) = feed_live(&redis, &[(HOLD_START_ENV, marker.as_path())]);
    let server = &mut hosts[0].server;
    let old_master = server.master_pid();
    let st = server.status();
    let feed0 = (st["workers"].as_array().unwrap().iter())
        .find(|w| w["name"] == "feed" && w["slot"] == 0)
        .and_then(|w| w["pid"].as_i64())
        .expect("feed's worker of slot 0") as i32;
    let next = server.dir.path().join("wsd-next");
    std::fs::copy(this_program(), &next).unwrap();
    std::fs::write(&marker, "1").unwrap();
    let (upgrade, new_master) = server.upgrade_in_background(next);
    // "feed#0[OLD] feed#0 (pid NEW) took all N connections"
    server.wait_for_log(&format!("feed#0[{feed0}] feed#0 (pid"));
    lines.advance(50);
    let pid = nix::unistd::Pid::from_raw(new_master);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL).unwrap();
    let out = upgrade.join().unwrap();
    let said = String::from_utf8_lossy(&out.stderr).to_string();
    assert_eq!(out.status.code(), Some(1), "the upgrade fails: {said}");
    std::fs::remove_file(&marker).unwrap();
    server.wait_for_log("handing every connection back");
    wait_for(
        "feed's old worker of slot 0 to hand on and exit",
        DEADLINE,
        || exited(feed0).then_some(()),
    );
    assert_eq!(server.status()["master"]["pid"], old_master);
    lines.advance(50);
    lines.finish(&mut subs);
    let log = hosts[0].log();
    assert!(
        !log.contains("no mark from redis"),
        "a crossing went on without its mark:\n{log}"
    );
}

/// HS256 tokens for the presence test (the test signs them as a backend would).
const SECRET: &str = "cluster-presence-secret-0123456789ab";

fn token(user: &str, name: &str) -> String {
    let exp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + 600;
    let claims = serde_json::json!({"sub": user, "exp": exp, "info": {"name": name}});
    jsonwebtoken::encode(
        &jsonwebtoken::Header::default(),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .unwrap()
}

/// A client of `host`'s pubsub group with a token for `user`.
fn user_client(host: &Host, user: &str) -> Client {
    let g = APPS.iter().position(|a| *a == "pubsub").unwrap();
    let target = format!("/?token={}", token(user, &user.to_uppercase()));
    Client::connect_with(host.ports[g], &target, &[]).unwrap().0
}

/// The next JSON message `c` gets.
fn next_json(c: &mut Client) -> Value {
    serde_json::from_str(&c.recv_text()).expect("JSON")
}

/// Presence and users across hosts, in Redis: join and leave events reach subscribers on both
/// hosts, presence and `/api/user` answer for the cluster, a subscriber asks who is there, and
/// a host that dies drops out of presence within the records' TTL.
fn presence_and_users_span_hosts() {
    let pubsub = format!(
        "auth = \"jwt\"\njwt_hs256_secret = \"{SECRET}\"\npresence = \"room/*\"\npresence_events = true\n"
    );
    let mut redis = Redis::start();
    let mut hosts = [
        Host::start_with(&redis, &pubsub),
        Host::start_with(&redis, &pubsub),
    ];
    for h in hosts.iter_mut() {
        h.wait_bus("up");
    }
    let mut ada = user_client(&hosts[0], "ada");
    subscribe(&mut ada, "room/1");
    let own = next_json(&mut ada);
    assert_eq!(
        (own["event"].as_str(), own["user"].as_str()),
        (Some("join"), Some("ada"))
    );
    wait_routed(&redis, &hosts, "room/1");
    let mut bob = user_client(&hosts[1], "bob");
    subscribe(&mut bob, "room/1");
    // Ada, on the other host, hears Bob join; Bob hears himself.
    let join = next_json(&mut ada);
    assert_eq!(join["event"], "join", "{join}");
    assert_eq!(join["user"], "bob");
    assert_eq!(join["info"], serde_json::json!({"name": "BOB"}));
    let bob_id = join["conn"].as_str().unwrap().to_string();
    assert_eq!(next_json(&mut bob)["user"], "bob");

    // Presence, from either host, is the cluster's.
    for h in &hosts {
        let p = wait_for("both hosts' subscribers in presence", DEADLINE, || {
            let p = h.get("/api/presence?topic=room/1");
            (p["count"] == 2).then_some(p)
        });
        assert_eq!(p["scope"], "cluster", "{p}");
        assert_eq!(p["users"], serde_json::json!(["ada", "bob"]), "{p}");
    }
    let u = hosts[0].get("/api/user?user=bob");
    assert_eq!(u["online"], true, "{u}");
    assert_eq!(u["connections"], serde_json::json!([bob_id]), "{u}");
    assert_eq!(hosts[1].get("/api/user?user=nobody")["online"], false);
    // A subscriber asks who is there.
    ada.send_text(r#"{"presence":"room/1"}"#);
    let here = next_json(&mut ada);
    assert_eq!(here["presence"], "room/1", "{here}");
    assert_eq!(here["count"], 2, "{here}");
    // A topic without presence, or one not subscribed to, is refused.
    ada.send_text(r#"{"presence":"room/2"}"#);
    assert!(next_json(&mut ada)["error"].is_string());

    // Bob leaves: Ada hears it, and presence drops him.
    bob.send_text(r#"{"unsubscribe":"room/1"}"#);
    let leave = next_json(&mut ada);
    assert_eq!(
        (leave["event"].as_str(), leave["conn"].as_str()),
        (Some("leave"), Some(bob_id.as_str()))
    );
    wait_for("presence without bob", DEADLINE, || {
        (hosts[0].get("/api/presence?topic=room/1")["count"] == 1).then_some(())
    });

    // A host that dies without a word drops out within the TTL.
    let mut carol = user_client(&hosts[1], "carol");
    subscribe(&mut carol, "room/1");
    assert_eq!(next_json(&mut ada)["user"], "carol");
    wait_for("carol in presence", DEADLINE, || {
        (hosts[0].get("/api/presence?topic=room/1")["count"] == 2).then_some(())
    });
    let dead = hosts[1].server.master_pid();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(dead),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let gone_at = Instant::now();
    wait_for("the dead host to drop out of presence", DEADLINE, || {
        let p = hosts[0].get("/api/presence?topic=room/1");
        (p["count"] == 1 && p["users"] == serde_json::json!(["ada"])).then_some(())
    });
    assert!(
        gone_at.elapsed() <= Duration::from_secs(16),
        "{:?}",
        gone_at.elapsed()
    );
    assert_eq!(hosts[0].get("/api/user?user=carol")["online"], false);

    // Redis restarts empty: the live host writes its records again by itself.
    redis.stop();
    hosts[0].wait_bus("down");
    redis.restart();
    hosts[0].wait_bus("up");
    wait_for("presence rebuilt after the restart", DEADLINE, || {
        let p = hosts[0].get("/api/presence?topic=room/1");
        (p["scope"] == "cluster" && p["users"] == serde_json::json!(["ada"])).then_some(())
    });
    assert_eq!(hosts[0].get("/api/user?user=ada")["online"], true);
}

fn redis_available() -> bool {
    Command::new("redis-server")
        .arg("--version")
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn main() {
    if std::env::var_os(LIBRARY_SERVER_ENV).is_some() {
        server_program();
    }
    assert!(
        redis_available(),
        "redis-server is not installed: apt-get install -y redis-server (scripts/test.sh does)"
    );
    run_suite(&[
        (
            "cluster_delivers_and_survives_a_redis_outage",
            cluster_delivers_and_survives_a_redis_outage,
        ),
        (
            "a_server_starts_without_redis_and_joins_later",
            a_server_starts_without_redis_and_joins_later,
        ),
        (
            "the_api_publishes_across_hosts_routed_by_interest",
            the_api_publishes_across_hosts_routed_by_interest,
        ),
        (
            "presence_and_users_span_hosts",
            presence_and_users_span_hosts,
        ),
        (
            "publishes_from_another_host_cross_a_reload_exactly_once",
            publishes_from_another_host_cross_a_reload_exactly_once,
        ),
        (
            "publishes_from_another_host_survive_a_new_worker_dying_mid_handoff",
            publishes_from_another_host_survive_a_new_worker_dying_mid_handoff,
        ),
        (
            "publishes_from_another_host_survive_a_new_master_killed_mid_upgrade",
            publishes_from_another_host_survive_a_new_master_killed_mid_upgrade,
        ),
    ]);
}
