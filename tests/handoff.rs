//! Connection handoff: a reload moves open connections to the new workers, with their
//! protocol state and the app's, instead of closing them. Real wsd processes, real clients.
//!
//! This test binary is itself the wsd program (`harness = false`): it defines the `named` app,
//! whose per-connection state (a name) crosses with `on_handoff` and `on_adopt`.

mod common;

use common::*;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde_json::Value;
use std::io::Write;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tungstenite::Message;

struct Name(String);

/// `name X` sets the connection's name (answered `hi X`); `say T` goes to every client of
/// the group as `X: T`; `join` subscribes to the `chat` topic (answered `joined`), and
/// `tell T` goes to its subscribers as `X: T`; `to ID T` sends `direct T` to the connection
/// whose bus id is `ID`, wherever it is; anything else comes back prefixed with the
/// name (`X text`, `? text` before one is set). The name is the app's own state: it
/// reaches a new worker only through the handoff hooks.
fn named(worker: &mut wsd::Worker) {
    worker.on_message(|ctx, conn, msg| {
        let text = msg.as_text().unwrap_or("").to_string();
        if let Some(name) = text.strip_prefix("name ") {
            ctx.set_state(conn, Name(name.to_string()));
            let _ = ctx.send(conn, format!("hi {name}"));
            return;
        }
        if text == "join" {
            ctx.subscribe(conn, "chat");
            let _ = ctx.send(conn, "joined");
            return;
        }
        let name = ctx.state::<Name>(conn).map_or("?", |n| n.0.as_str());
        if let Some(said) = text.strip_prefix("say ") {
            let all = format!("{name}: {said}");
            ctx.broadcast(all);
            return;
        }
        if let Some((to, said)) = text.strip_prefix("to ").and_then(|r| r.split_once(' ')) {
            if let Ok(to) = to.parse::<wsd::GlobalId>() {
                let _ = ctx.send_to(to, format!("direct {said}"));
            }
            return;
        }
        if let Some(said) = text.strip_prefix("tell ") {
            let all = format!("{name}: {said}");
            ctx.publish("chat", all);
            return;
        }
        let reply = format!("{name} {text}");
        let _ = ctx.send(conn, reply);
    });
    worker.on_handoff(|ctx, conn| {
        (ctx.state::<Name>(conn))
            .map(|n| n.0.clone().into_bytes())
            .unwrap_or_default()
    });
    worker.on_worker_start(|ctx| hold_start_if_marked(ctx.worker_id()));
    worker.on_adopt(|ctx, conn, bytes| {
        crash_if_marked();
        if !bytes.is_empty() {
            ctx.set_state(conn, Name(String::from_utf8_lossy(bytes).into_owned()));
        }
    });
}

fn server_program() -> ! {
    wsd::Runner::new().app("named", named).run()
}

fn start(count: usize) -> Server {
    Server::start_program(std::env::current_exe().unwrap(), "named", count, "")
}

fn text(out: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Reloads with `count` workers; waits until the new ones serve and the old ones are gone.
fn reload_to(server: &mut Server, count: usize) {
    let config = std::fs::read_to_string(&server.config).unwrap();
    let mut lines: Vec<String> = config.lines().map(str::to_string).collect();
    for l in &mut lines {
        if l.starts_with("count = ") {
            *l = format!("count = {count}");
        }
    }
    std::fs::write(&server.config, lines.join("\n") + "\n").unwrap();
    let before = server.worker_pids();
    let out = server.wsd(&["reload"]);
    assert!(out.status.success(), "reload: {}", text(&out));
    for pid in before {
        wait_for("the old worker to exit", DEADLINE, || {
            exited(pid).then_some(())
        });
    }
    let st = server.wait_ready();
    assert_eq!(worker_pids_in(&st).len(), count, "{st}");
}

fn open_connections(server: &mut Server) -> u64 {
    workers_sum(&server.status(), "connections")
}

/// What the clients of the main test saw.
#[derive(Default)]
struct Seen {
    rounds: AtomicU64,
    failures: Mutex<Vec<String>>,
}

/// [`client`]s talking to a server on threads of their own, until [`Swarm::finish`].
struct Swarm {
    seen: Arc<Seen>,
    done: Arc<AtomicBool>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Swarm {
    /// `n` clients, once every one of them is connected.
    fn start(server: &mut Server, n: usize) -> Swarm {
        let port = server.port;
        let seen = Arc::new(Seen::default());
        let done = Arc::new(AtomicBool::new(false));
        let threads = (0..n)
            .map(|i| {
                let (seen, done) = (seen.clone(), done.clone());
                std::thread::Builder::new()
                    .stack_size(256 << 10)
                    .spawn(move || client(port, i, &seen, &done))
                    .expect("a client thread")
            })
            .collect();
        let swarm = Swarm {
            seen,
            done,
            threads,
        };
        // A client that failed says why, rather than the count never coming.
        wait_for("every client connected (or one failed)", DEADLINE, || {
            let failed = !swarm.seen.failures.lock().unwrap().is_empty();
            (failed || open_connections(server) == n as u64).then_some(())
        });
        swarm.assert_no_failures();
        swarm
    }

    /// Waits until the clients have done `more` rounds in all, or one has failed.
    fn progress(&self, more: u64) {
        let seen = &self.seen;
        let from = seen.rounds.load(Ordering::Relaxed);
        wait_for("the clients to go on", DEADLINE, || {
            let failed = !seen.failures.lock().unwrap().is_empty();
            (failed || seen.rounds.load(Ordering::Relaxed) >= from + more).then_some(())
        });
    }

    fn assert_no_failures(&self) {
        let failures = self.seen.failures.lock().unwrap().clone();
        assert!(
            failures.is_empty(),
            "{} clients failed, first: {:?}",
            failures.len(),
            &failures[..failures.len().min(3)]
        );
    }

    /// Stops the clients (each closes) and asserts that none failed.
    fn finish(mut self) {
        self.done.store(true, Ordering::Relaxed);
        for t in std::mem::take(&mut self.threads) {
            t.join().unwrap();
        }
        self.assert_no_failures();
    }
}

/// One client: named `c{i}`, then rounds of 4 pipelined messages 10 ms apart, each answered in
/// order with its name. Any other answer, a close or an error is a failure.
fn client(port: u16, i: usize, seen: &Seen, done: &AtomicBool) {
    let fail = |why: String| {
        seen.failures
            .lock()
            .unwrap()
            .push(format!("client {i}: {why}"))
    };
    let mut c = match Client::try_connect(port) {
        Ok(c) => c,
        Err(e) => return fail(format!("connect: {e}")),
    };
    let name = format!("c{i}");
    if let Err(e) = c.send(Message::text(format!("name {name}"))) {
        return fail(format!("send name: {e}"));
    }
    match c.read() {
        Ok(Message::Text(t)) if t.as_str() == format!("hi {name}") => {}
        other => return fail(format!("named: {other:?}")),
    }
    let mut seq = 0u64;
    while !done.load(Ordering::Relaxed) {
        for k in 0..4 {
            if let Err(e) = c.send(Message::text((seq + k).to_string())) {
                return fail(format!("send {}: {e}", seq + k));
            }
        }
        for k in 0..4 {
            let want = format!("{name} {}", seq + k);
            match c.read() {
                Ok(Message::Text(t)) if t.as_str() == want => {}
                other => return fail(format!("wanted {want:?}, got {other:?}")),
            }
        }
        seq += 4;
        seen.rounds.fetch_add(1, Ordering::Relaxed);
        // Paced, so that a thousand of them leave the server's workers some of two cores.
        std::thread::sleep(Duration::from_millis(10));
    }
    let _ = c.ws.close(None);
}

/// `version` of the second build [`second_build`] makes.
const SECOND_VERSION: &str = "0.0.0-second-build";

/// This test program built again, with [`SECOND_VERSION`] baked in (`WSD_VERSION`), and copied
/// into `dir`: a new release to upgrade to. A debug build in a target directory of its own
/// (`upgrade-build` beside this one's), so that it never touches the running binary and a
/// second run only relinks.
fn second_build(dir: &std::path::Path) -> std::path::PathBuf {
    let me = std::env::current_exe().unwrap();
    // .../target/<profile>/deps/handoff-<hash>
    let target = me.ancestors().nth(3).unwrap().join("upgrade-build");
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let out = std::process::Command::new(cargo)
        .args(["build", "--quiet", "--offline", "--test", "handoff"])
        .args([
            "--message-format",
            "json-render-diagnostics",
            "--target-dir",
        ])
        .arg(&target)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .env("WSD_VERSION", SECOND_VERSION)
        .stderr(std::process::Stdio::inherit())
        .output()
        .expect("run cargo");
    assert!(out.status.success(), "the second build failed");
    let built = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|m| m["reason"] == "compiler-artifact" && m["target"]["name"] == "handoff")
        .find_map(|m| m["executable"].as_str().map(std::path::PathBuf::from))
        .expect("cargo names the test binary it built");
    let copy = dir.join("named-second");
    std::fs::copy(built, &copy).unwrap();
    copy
}

/// The chat side of the main test: subscribers joined to `chat`, and a publisher telling them
/// a numbered line at a steady pace.
struct Chat {
    said: Arc<AtomicU64>,
    done: Arc<AtomicBool>,
    ears: Arc<Vec<Ears>>,
    failures: Arc<Mutex<Vec<String>>>,
    publisher: Option<std::thread::JoinHandle<u64>>,
    subscribers: Vec<std::thread::JoinHandle<()>>,
}

impl Chat {
    /// `n` subscribers, all joined before the publisher's first line; the publisher tells one
    /// every `every`. It connects first, so a worker that holds it and subscribers hands it
    /// over before them.
    fn start(port: u16, n: usize, every: Duration) -> Chat {
        let mut p = Client::connect(port);
        p.send_text("name pub");
        assert_eq!(p.recv_text(), "hi pub");
        let ears: Arc<Vec<Ears>> = Arc::new((0..n).map(|_| Ears::default()).collect());
        let failures = Arc::new(Mutex::new(Vec::new()));
        let done = Arc::new(AtomicBool::new(false));
        let joined = Arc::new(AtomicU64::new(0));
        let subscribers = (0..n)
            .map(|i| {
                let (ears, failures) = (ears.clone(), failures.clone());
                let (done, joined) = (done.clone(), joined.clone());
                std::thread::spawn(move || {
                    let fail = |why: String| {
                        failures
                            .lock()
                            .unwrap()
                            .push(format!("subscriber {i}: {why}"));
                    };
                    if let Err(why) = subscriber(port, i, &ears[i], &joined, &done) {
                        fail(why);
                    }
                })
            })
            .collect();
        wait_for("every subscriber joined (or one failed)", DEADLINE, || {
            let failed = !failures.lock().unwrap().is_empty();
            (failed || joined.load(Ordering::SeqCst) == n as u64).then_some(())
        });
        let said = Arc::new(AtomicU64::new(0));
        let publisher = {
            let (said, done) = (said.clone(), done.clone());
            std::thread::spawn(move || {
                let mut n = 0u64;
                while !done.load(Ordering::SeqCst) {
                    p.send(Message::text(format!("tell {n}")))
                        .expect("the publisher sends");
                    n += 1;
                    said.store(n, Ordering::SeqCst);
                    std::thread::sleep(every);
                }
                p.send(Message::text("tell end"))
                    .expect("the publisher sends");
                n
            })
        };
        let chat = Chat {
            said,
            done,
            ears,
            failures,
            publisher: Some(publisher),
            subscribers,
        };
        chat.assert_no_failures();
        chat
    }

    /// Waits until the publisher has told `more` lines more.
    fn go_on(&self, more: u64) {
        let from = self.said.load(Ordering::SeqCst);
        wait_for("the publisher to go on", DEADLINE, || {
            (self.said.load(Ordering::SeqCst) >= from + more).then_some(())
        });
    }

    /// Waits until every subscriber has had `n` lines sent to it alone.
    fn await_direct(&self, n: u64) {
        wait_for("every subscriber to get its direct line", DEADLINE, || {
            (self.ears.iter())
                .all(|e| e.direct.load(Ordering::SeqCst) >= n)
                .then_some(())
        });
        self.assert_no_failures();
    }

    fn assert_no_failures(&self) {
        let failures = self.failures.lock().unwrap().clone();
        assert!(
            failures.is_empty(),
            "{:?}",
            &failures[..failures.len().min(3)]
        );
    }

    /// Ends the publisher; every subscriber must have heard each of its lines once, in order.
    fn finish(mut self) {
        self.done.store(true, Ordering::SeqCst);
        let told = self.publisher.take().unwrap().join().unwrap();
        for t in std::mem::take(&mut self.subscribers) {
            t.join().unwrap();
        }
        self.assert_no_failures();
        for (i, e) in self.ears.iter().enumerate() {
            assert_eq!(e.heard.load(Ordering::SeqCst), told, "subscriber {i}");
        }
    }
}

/// What a subscriber has heard: chat lines, and lines sent to it alone (`direct ...`).
#[derive(Default)]
struct Ears {
    heard: AtomicU64,
    direct: AtomicU64,
}

/// One subscriber, on path `/sub`: joins `chat`, then expects `pub: 0`, `pub: 1`, ... until
/// `pub: end`, and counts the `direct` lines in between.
fn subscriber(
    port: u16,
    i: usize,
    ears: &Ears,
    joined: &AtomicU64,
    done: &AtomicBool,
) -> Result<(), String> {
    let mut c = match Client::connect_with(port, "/sub", &[]) {
        Ok((c, _)) => c,
        Err(e) => return Err(format!("connect: {e}")),
    };
    for (say, answer) in [
        (format!("name s{i}"), format!("hi s{i}")),
        ("join".into(), "joined".into()),
    ] {
        c.send(Message::text(say)).map_err(|e| e.to_string())?;
        match c.read() {
            Ok(Message::Text(t)) if t.as_str() == answer => {}
            other => return Err(format!("wanted {answer:?}, got {other:?}")),
        }
    }
    joined.fetch_add(1, Ordering::SeqCst);
    loop {
        match c.read() {
            Ok(Message::Text(t)) if t.as_str() == "pub: end" => return Ok(()),
            Ok(Message::Text(t)) if t.starts_with("direct ") => {
                ears.direct.fetch_add(1, Ordering::SeqCst);
            }
            Ok(Message::Text(t)) => {
                let want = format!("pub: {}", ears.heard.load(Ordering::SeqCst));
                if t.as_str() != want {
                    return Err(format!("wanted {want:?}, got {t:?}"));
                }
                ears.heard.fetch_add(1, Ordering::SeqCst);
            }
            // A quiet spell (a slow machine); the end must come once the publisher is done.
            Err(tungstenite::Error::Io(e))
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) && !done.load(Ordering::SeqCst) => {}
            other => return Err(format!("got {other:?}")),
        }
    }
}

/// Each connection's bus id and path, by the client's address (`wsd connections --json`),
/// once the server counts `all` of them.
fn bus_ids(server: &mut Server, all: u64) -> std::collections::HashMap<String, (String, String)> {
    wait_for("every connection listed", DEADLINE, || {
        (open_connections(server) == all).then_some(())
    });
    let out = server.wsd(&["connections", "--json"]);
    let view: Value = serde_json::from_slice(&out.stdout).unwrap();
    let rows = view["conns"].as_array().unwrap();
    let field = |r: &Value, k: &str| r[k].as_str().unwrap().to_string();
    (rows.iter())
        .map(|r| (field(r, "remote"), (field(r, "conn"), field(r, "path"))))
        .collect()
}

/// Every connection of `before` kept its bus id in `after`, unless its worker's slot is gone
/// (at or past `count`): a reload that lowers the count moves those to other slots.
fn assert_ids_kept(
    before: &std::collections::HashMap<String, (String, String)>,
    after: &std::collections::HashMap<String, (String, String)>,
    count: usize,
) {
    assert_eq!(before.len(), after.len());
    let mut kept = 0;
    for (remote, (id, _)) in before {
        let slot: usize = id.split('-').nth(1).unwrap().parse().unwrap();
        if slot < count {
            assert_eq!(&after[remote].0, id, "the bus id of {remote}");
            kept += 1;
        }
    }
    assert!(kept > 0);
}

/// The deploy sequence: a thousand clients running a numbered echo, each with its name (the
/// app's state), and chat subscribers hearing a line every 10 ms, through a reload that keeps
/// the count, reloads from 4 workers to 3 and back to 4, `wsd upgrade` to a second build with
/// another version, and SIGUSR2 to that build's master. No client is closed, no echo is lost
/// or out of order, every name survives, and every chat line is heard once, in order.
fn a_deploy_moves_a_thousand_clients_and_loses_no_message() {
    const CLIENTS: usize = 1000;
    const SUBSCRIBERS: usize = 50;
    raise_fd_limit(4 * (CLIENTS + SUBSCRIBERS) as u64);
    let mut server = start(4);
    let second = second_build(server.dir.path());
    let swarm = Swarm::start(&mut server, CLIENTS);
    let chat = Chat::start(server.port, SUBSCRIBERS, Duration::from_millis(10));
    let everyone = (CLIENTS + SUBSCRIBERS + 1) as u64;
    let everyone_and_director = everyone + 1;
    let step = |swarm: &Swarm, chat: &Chat| {
        swarm.progress(2 * CLIENTS as u64);
        chat.go_on(30);
        swarm.assert_no_failures();
        chat.assert_no_failures();
    };
    step(&swarm, &chat);
    let mut ids = bus_ids(&mut server, everyone);

    reload_to(&mut server, 4);
    step(&swarm, &chat);
    let now = bus_ids(&mut server, everyone);
    assert_ids_kept(&ids, &now, 4);
    ids = now;
    for count in [3, 4] {
        reload_to(&mut server, count);
        step(&swarm, &chat);
        let now = bus_ids(&mut server, everyone);
        assert_ids_kept(&ids, &now, count);
        ids = now;
    }

    // A new release: `wsd upgrade` to the second build.
    let old_master = server.master_pid();
    let before = server.worker_pids();
    let out = server.wsd(&["upgrade", "--binary", second.to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out));
    wait_for("the old master to exit", DEADLINE, || {
        exited(old_master).then_some(())
    });
    let st = server.wait_ready();
    assert_eq!(st["master"]["version"], SECOND_VERSION, "{st}");
    let upgraded = st["master"]["pid"].as_i64().unwrap() as i32;
    assert_ne!(upgraded, old_master);
    let workers = worker_pids_in(&st);
    assert_eq!(workers.len(), 4);
    assert!(
        workers.iter().all(|p| !before.contains(p)),
        "{before:?} -> {workers:?}"
    );
    step(&swarm, &chat);
    let now = bus_ids(&mut server, everyone);
    assert_ids_kept(&ids, &now, 4);

    // SIGUSR2: that master upgrades to the binary it was started from.
    use nix::sys::signal::{Signal, kill};
    let before = workers;
    kill(nix::unistd::Pid::from_raw(upgraded), Signal::SIGUSR2).unwrap();
    wait_for("the SIGUSR2'd master to exit", DEADLINE, || {
        exited(upgraded).then_some(())
    });
    let st = server.wait_ready();
    assert_eq!(st["master"]["version"], SECOND_VERSION, "{st}");
    assert_ne!(st["master"]["pid"], upgraded);
    assert!(
        worker_pids_in(&st).iter().all(|p| !before.contains(p)),
        "{st}"
    );
    step(&swarm, &chat);
    let now = bus_ids(&mut server, everyone);
    assert_ids_kept(&ids, &now, 4);

    // The ids an app kept before the upgrades still reach their connections.
    let mut director = server.connect();
    let subscribers: Vec<&String> = (ids.values())
        .filter(|(_, path)| path == "/sub")
        .map(|(id, _)| id)
        .collect();
    assert_eq!(subscribers.len(), SUBSCRIBERS);
    for id in subscribers {
        director.send_text(&format!("to {id} hello"));
    }
    chat.await_direct(1);

    // Every client is still on its first connection, held by the newest workers, with the
    // age and traffic it had.
    wait_for("the new workers to count every client", DEADLINE, || {
        (open_connections(&mut server) == everyone_and_director).then_some(())
    });
    let out = server.wsd(&["connections", "--json"]);
    let view: Value = serde_json::from_slice(&out.stdout).unwrap();
    let rows = view["conns"].as_array().unwrap();
    assert_eq!(rows.len() as u64, everyone_and_director);
    let pids = server.worker_pids();
    assert!(
        rows.iter()
            .all(|r| pids.contains(&(r["pid"].as_i64().unwrap() as i32)))
    );
    assert!(rows.iter().all(|r| r["messages_in"].as_u64().unwrap() >= 2));
    // Every old worker left on its own once its deploy was done, none at its deadline.
    let log = server.master_output();
    assert!(!log.contains("after its deadline"), "{log}");
    swarm.finish();
    chat.finish();
}

/// A client handed over early publishes while later ones still wait in the old worker's queue
/// (more than one window of records): they get its lines once the new worker has them all,
/// not never. The publisher connected first, so it is handed over first.
fn lines_published_mid_handoff_reach_the_clients_not_yet_handed() {
    publish_through_reloads(600, 1, &[1, 1, 1]);
}

/// `subscribers` hear a line published every millisecond on a group of `count` workers,
/// reloaded to each of `counts` in turn: each hears every line once, in order.
fn publish_through_reloads(subscribers: usize, count: usize, counts: &[usize]) {
    raise_fd_limit(4 * subscribers as u64);
    let mut server = start(count);
    let chat = Chat::start(server.port, subscribers, Duration::from_millis(1));
    chat.go_on(20);
    for &count in counts {
        reload_to(&mut server, count);
        chat.go_on(20);
        chat.assert_no_failures();
    }
    chat.finish();
}

/// Reloads that lower and raise the count, with a line published every millisecond: a
/// retiring slot's subscribers move to another slot while the group holds its messages, and
/// the workers of new slots hear everyone from the start. Every subscriber hears every line
/// once, in order.
fn lines_reach_every_subscriber_once_through_count_changes() {
    publish_through_reloads(200, 4, &[3, 4, 2, 5, 4]);
}

/// The new worker dies while taking the connections: the old worker takes back what it had not
/// acknowledged (the sockets it never read), serves them, and hands them to the slot's next
/// worker. The reload reports the failure; the clients notice nothing.
fn a_new_worker_dying_mid_handoff_loses_no_connection() {
    let (dir, config) = Server::config("named", 1, "");
    let marker = dir.path().join("crash-on-adopt");
    let env = [(CRASH_ENV, marker.as_path())];
    let mut server = Server::start_with_env(std::env::current_exe().unwrap(), dir, config, &env);
    const CLIENTS: usize = 30;
    let swarm = Swarm::start(&mut server, CLIENTS);
    swarm.progress(101);
    // On its first: a connection it had acknowledged would be its own, and lost with it like
    // any worker's that crashes; one it had not is still the old worker's.
    std::fs::write(&marker, "1").unwrap();
    let old = server.worker_pid(0);
    let out = server.wsd(&["reload"]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(
        text(&out).contains("was handing it connections"),
        "{}",
        text(&out)
    );
    assert!(
        !marker.exists(),
        "the new worker crashed on its first connection"
    );
    wait_for("the old worker to hand over and exit", DEADLINE, || {
        exited(old).then_some(())
    });
    swarm.progress(101);
    swarm.assert_no_failures();
    wait_for("the next worker to hold every client", DEADLINE, || {
        (open_connections(&mut server) == CLIENTS as u64).then_some(())
    });
    assert!(server.master_output().contains("took all 30 connections"));
    swarm.finish();
}

/// The same during `wsd upgrade`: the new master's worker dies while taking the connections.
/// The old worker takes back what was not acknowledged and hands it to the worker the new
/// master starts again on that slot; the upgrade completes, and no client notices.
fn a_new_worker_dying_mid_upgrade_loses_no_connection() {
    let (dir, config) = Server::config("named", 1, "");
    let marker = dir.path().join("crash-on-adopt");
    let env = [(CRASH_ENV, marker.as_path())];
    let mut server = Server::start_with_env(std::env::current_exe().unwrap(), dir, config, &env);
    const CLIENTS: usize = 30;
    let swarm = Swarm::start(&mut server, CLIENTS);
    swarm.progress(101);
    let next = server.dir.path().join("named-next");
    std::fs::copy(std::env::current_exe().unwrap(), &next).unwrap();
    std::fs::write(&marker, "1").unwrap();
    let old_master = server.master_pid();
    let out = server.wsd(&["upgrade", "--binary", next.to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        !marker.exists(),
        "the new worker crashed on its first connection"
    );
    wait_for("the old master to exit", DEADLINE, || {
        exited(old_master).then_some(())
    });
    swarm.progress(101);
    swarm.assert_no_failures();
    wait_for(
        "the new master's worker to hold every client",
        DEADLINE,
        || (open_connections(&mut server) == CLIENTS as u64).then_some(()),
    );
    assert_ne!(server.status()["master"]["pid"], old_master);
    let log = server.master_output();
    assert!(log.contains("took all 30 connections"));
    // The old worker left on its own once the upgrade was done, not at its deadline.
    assert!(!log.contains("after its deadline"), "{log}");
    swarm.finish();
}

/// `kill -9` of the new master mid-upgrade: slot 0's clients have gone to its worker, and
/// slot 1's new worker is still starting. The new worker, which keeps its handoff line until
/// the upgrade is done and does not die with its master until then, hands every client back;
/// the old master serves on (its worker of slot 0 hands them to a worker it starts again), and
/// `wsd upgrade` fails with the reason. No client notices, and every chat line is heard once.
/// The kill comes after the old worker's deadline (the drain and reload timeouts, 3 s) would
/// have passed: that deadline runs only once the upgrade is done.
fn a_new_master_killed_mid_upgrade_loses_no_connection() {
    let (dir, config) = Server::config("named", 2, "");
    let short = std::fs::read_to_string(&config).unwrap().replace(
        "[server]\n",
        "[server]\ndrain_timeout = \"1s\"\nreload_timeout = \"2s\"\n",
    );
    std::fs::write(&config, short).unwrap();
    let marker = dir.path().join("hold-start");
    let env = [(HOLD_START_ENV, marker.as_path())];
    let mut server = Server::start_with_env(std::env::current_exe().unwrap(), dir, config, &env);
    const CLIENTS: usize = 40;
    let swarm = Swarm::start(&mut server, CLIENTS);
    let chat = Chat::start(server.port, 20, Duration::from_millis(5));
    swarm.progress(101);
    let old_master = server.master_pid();
    let old_slot0 = server.worker_pid(0);
    let next = server.dir.path().join("named-next");
    std::fs::copy(std::env::current_exe().unwrap(), &next).unwrap();
    std::fs::write(&marker, "1").unwrap();
    let (upgrade, new_master) = server.upgrade_in_background(next);
    // "named#0[OLD] named#0 (pid NEW) took all N connections"
    server.wait_for_log(&format!("named#0[{old_slot0}] named#0 (pid"));
    let handed = std::time::Instant::now();
    swarm.progress(101);
    wait_for("the old worker's deadline to pass", DEADLINE, || {
        (handed.elapsed() > Duration::from_secs(4)).then_some(())
    });
    assert!(!exited(old_slot0), "{}", server.master_output());
    kill(Pid::from_raw(new_master), Signal::SIGKILL).unwrap();
    let out = upgrade.join().unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(text(&out).contains("upgrade failed"), "{}", text(&out));
    std::fs::remove_file(&marker).unwrap();
    server.wait_for_log("handing every connection back");
    wait_for(
        "the old worker of slot 0 to hand on and exit",
        DEADLINE,
        || exited(old_slot0).then_some(()),
    );
    swarm.progress(101);
    swarm.assert_no_failures();
    wait_for(
        "the old master's workers to hold every client",
        DEADLINE,
        || (open_connections(&mut server) == CLIENTS as u64 + 21).then_some(()),
    );
    assert_eq!(server.status()["master"]["pid"], old_master);
    let workers = server.worker_pids();
    let owners = connection_owners(&server);
    assert_eq!(owners.len(), CLIENTS + 21);
    assert!(
        owners.values().all(|pid| workers.contains(pid)),
        "{owners:?}"
    );
    let log = server.master_output();
    assert!(!log.contains("after its deadline"), "{log}");
    swarm.finish();
    chat.finish();
}

/// `wsd upgrade` from `from` workers to a configuration with `to`: every old worker hands its
/// clients to the new worker of its slot, and once the old master has gone a reload of the new
/// master's (which keeps the workers it has) changes the count (merging the slots past a lower one into the others, the group
/// holding its messages meanwhile; or growing the group and its bus). No client notices, and
/// every chat line is heard once.
fn upgrade_to_another_count(from: usize, to: usize) {
    let mut server = start(from);
    const CLIENTS: usize = 30;
    let swarm = Swarm::start(&mut server, CLIENTS);
    let chat = Chat::start(server.port, 30, Duration::from_millis(2));
    swarm.progress(100);
    let config = std::fs::read_to_string(&server.config).unwrap();
    let config = config.replace(&format!("count = {from}"), &format!("count = {to}"));
    std::fs::write(&server.config, config).unwrap();
    let next = server.dir.path().join("named-next");
    std::fs::copy(std::env::current_exe().unwrap(), &next).unwrap();
    let old_master = server.master_pid();
    let out = server.wsd(&["upgrade", "--binary", next.to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out));
    wait_for("the old master to exit", DEADLINE, || {
        exited(old_master).then_some(())
    });
    server.wait_for_log("reload done");
    let st = server.wait_ready();
    assert_eq!(worker_pids_in(&st).len(), to, "{st}");
    // A reload that lowers the count keeps the workers running (they run this build and this
    // configuration already); one that raises it grows the bus, which only new workers join,
    // so it replaces them.
    let new_master = st["master"]["pid"].as_i64().unwrap();
    let log = server.master_output();
    let started = (log.lines())
        .filter(|l| l.contains(&format!("master[{new_master}] worker named#")))
        .filter(|l| l.contains(" started, pid "))
        .count();
    let expected = if to < from { from } else { from + to };
    assert_eq!(started, expected, "{log}");
    swarm.progress(200);
    chat.go_on(20);
    wait_for("the new workers to count every client", DEADLINE, || {
        (open_connections(&mut server) == CLIENTS as u64 + 31).then_some(())
    });
    swarm.finish();
    chat.finish();
}

fn an_upgrade_that_raises_the_count_moves_every_connection() {
    upgrade_to_another_count(2, 3);
}

fn an_upgrade_that_lowers_the_count_moves_every_connection() {
    upgrade_to_another_count(3, 2);
}

/// `wsd upgrade` to another binary (a copy of this program under a new name): a new master
/// takes over the sockets, its workers take over every connection, with the app's state, and
/// the old master leaves it the pid file and the control socket. A binary that fails `check`
/// (it is not a wsd, or the configuration has a mistake), or dies before it is ready, changes
/// nothing.
fn an_upgrade_to_a_new_binary_moves_every_connection() {
    let mut server = start(2);
    const CLIENTS: usize = 40;
    let swarm = Swarm::start(&mut server, CLIENTS);
    swarm.progress(100);

    // A binary that is not a wsd, and one that passes `check` but exits at start.
    let dir = server.dir.path().to_path_buf();
    let old_master = server.master_pid();
    let out = server.wsd(&["upgrade", "--binary", "/bin/false"]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(
        text(&out).contains("check exited with status 1"),
        "{}",
        text(&out)
    );
    let dies = dir.join("dies-at-start.sh");
    let me = std::env::current_exe().unwrap();
    let script = format!(
        "#!/bin/sh\nfor a in \"$@\"; do [ \"$a\" = check ] && exec {} \"$@\"; done\nexit 3\n",
        me.display()
    );
    std::fs::write(&dies, script).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&dies, std::fs::Permissions::from_mode(0o755)).unwrap();
    let out = server.wsd(&["upgrade", "--binary", dies.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(
        text(&out).contains("exited with status 3"),
        "{}",
        text(&out)
    );
    assert_eq!(server.status()["master"]["pid"], old_master);
    swarm.progress(100);

    // The new binary, with a mistake in the configuration: its `check` names the line, and
    // nothing changes.
    let next = dir.join("named-next");
    std::fs::copy(&me, &next).unwrap();
    let good = std::fs::read_to_string(&server.config).unwrap();
    let bad = good.replace("count = 2", "count = \"two\"");
    assert_ne!(bad, good);
    std::fs::write(&server.config, &bad).unwrap();
    let out = server.wsd(&["upgrade", "--binary", next.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let line = bad.lines().position(|l| l.contains("two")).unwrap() + 1;
    let at = format!("workers.toml:{line}:");
    assert!(
        text(&out).contains("upgrade refused") && text(&out).contains(&at),
        "{}",
        text(&out)
    );
    assert_eq!(server.status()["master"]["pid"], old_master);
    swarm.progress(100);
    std::fs::write(&server.config, &good).unwrap();
    let before = server.worker_pids();
    let out = server.wsd(&["upgrade", "--binary", next.to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("serves now"), "{}", text(&out));
    wait_for("the old master to exit", DEADLINE, || {
        exited(old_master).then_some(())
    });
    let st = server.wait_ready();
    let new_master = st["master"]["pid"].as_i64().unwrap() as i32;
    assert_ne!(new_master, old_master);
    assert_eq!(st["master"]["binary"], next.to_str().unwrap(), "{st}");
    let pid_file = std::fs::read_to_string(dir.join("wsd.pid")).unwrap();
    assert_eq!(pid_file.trim(), new_master.to_string());
    let workers = worker_pids_in(&st);
    assert!(
        workers.iter().all(|p| !before.contains(p)),
        "{before:?} -> {workers:?}"
    );
    swarm.progress(200);
    wait_for("the new workers to count every client", DEADLINE, || {
        (open_connections(&mut server) == CLIENTS as u64).then_some(())
    });
    swarm.assert_no_failures();
    // The new master answers the control socket: a reload, then a stop.
    let out = server.wsd(&["reload"]);
    assert!(out.status.success(), "{}", text(&out));
    swarm.progress(100);
    swarm.finish();
    let out = server.wsd(&["stop"]);
    assert!(out.status.success(), "{}", text(&out));
    wait_for("the new master to exit", DEADLINE, || {
        exited(new_master).then_some(())
    });
    assert!(
        !dir.join("wsd.pid").exists(),
        "the new master removed its pid file"
    );
}

/// A worker may hold nearly as many connections as it may open files: handing them over must
/// not need a second descriptor for each at once (the giver keeps one per connection only
/// until the taker acknowledges it, a window at a time).
fn a_worker_near_its_file_limit_hands_over_every_connection() {
    const CLIENTS: usize = 300;
    raise_fd_limit(4 * CLIENTS as u64);
    let (dir, config) = Server::config("named", 1, "");
    let wrapper = dir.path().join("limited.sh");
    let script = format!(
        "#!/bin/sh\nulimit -n {}\nexec {} \"$@\"\n",
        CLIENTS + 100,
        std::env::current_exe().unwrap().display()
    );
    std::fs::write(&wrapper, script).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&wrapper, std::fs::Permissions::from_mode(0o755)).unwrap();
    let mut server = Server::start_with(wrapper, dir, config);
    let mut clients: Vec<Client> = (0..CLIENTS).map(|_| server.connect()).collect();
    for (i, c) in clients.iter_mut().enumerate() {
        c.send_text(&format!("name n{i}"));
        assert_eq!(c.recv_text(), format!("hi n{i}"));
    }
    reload_to(&mut server, 1);
    for (i, c) in clients.iter_mut().enumerate() {
        c.send_text("still");
        assert_eq!(c.recv_text(), format!("n{i} still"), "client {i}");
    }
}

fn a_half_received_message_and_a_full_send_queue_survive_a_reload() {
    let extra = "subprotocols = [\"chat.v1\"]\n";
    let mut server = Server::start_program(std::env::current_exe().unwrap(), "named", 1, extra);
    let port = server.port;

    // A message in two fragments, the second cut inside its header: the first fragment is in
    // the old worker's decoder when the reload comes, the rest arrives at the new worker. This
    // client also agreed on a subprotocol, which travels with it.
    let mut split =
        RawClient::try_upgrade(port, "Sec-WebSocket-Protocol: chat.v1\r\n").expect("upgraded");
    split.frame(true, 0x1, b"name split");
    assert_eq!(split.read_frame().2, b"hi split");
    split.frame(false, 0x1, b"part one, ");
    let second = masked_frame(true, 0x0, b"part two");
    split.stream.write_all(&second[..3]).unwrap();

    // A client that does not read: its replies pile up in the worker's send queue.
    let stream = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    stream.set_recv_buffer_size(4096).unwrap();
    let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    stream.connect(&addr.into()).unwrap();
    let mut stream: std::net::TcpStream = stream.into();
    with_timeouts(&stream).unwrap();
    stream.write_all(upgrade_request("").as_bytes()).unwrap();
    let mut slow = RawClient::finish_upgrade(stream).expect("upgraded");
    slow.frame(true, 0x1, b"name slow");
    let chunk = "x".repeat(16 << 10);
    let mut sent = 0;
    let queued = |server: &Server| -> u64 {
        let out = server.wsd(&["connections", "--json"]);
        let view: Value = serde_json::from_slice(&out.stdout).unwrap();
        let rows = view["conns"].as_array().unwrap().clone();
        rows.iter()
            .map(|r| r["send_queue"].as_u64().unwrap())
            .max()
            .unwrap_or(0)
    };
    while queued(&server) < 64 << 10 {
        assert!(sent < 256, "the send queue never filled");
        slow.frame(true, 0x1, format!("{sent:04}{chunk}").as_bytes());
        sent += 1;
    }

    reload_to(&mut server, 1);

    split.stream.write_all(&second[3..]).unwrap();
    assert_eq!(split.read_frame().2, b"split part one, part two");

    assert_eq!(slow.read_frame().2, b"hi slow");
    for n in 0..sent {
        let (fin, opcode, payload) = slow.read_frame();
        assert!(fin && opcode == 0x1);
        let want = format!("slow {n:04}{chunk}");
        assert!(payload == want.as_bytes(), "reply {n} of {sent} differs");
    }
    // Both go on as usual.
    slow.frame(true, 0x1, b"still here");
    assert_eq!(slow.read_frame().2, b"slow still here");
    split.frame(true, 0x1, b"and here");
    assert_eq!(split.read_frame().2, b"split and here");
    wait_for("the new worker to count both clients", DEADLINE, || {
        (open_connections(&mut server) == 2).then_some(())
    });
    let local = split.stream.local_addr().unwrap().port();
    let out = server.wsd(&["connections", "--json"]);
    let view: Value = serde_json::from_slice(&out.stdout).unwrap();
    let row = (view["conns"].as_array().unwrap().iter())
        .find(|r| {
            r["remote"]
                .as_str()
                .unwrap()
                .ends_with(&format!(":{local}"))
        })
        .expect("the split client's row");
    assert_eq!(row["protocol"], "chat.v1", "{row}");
    assert_eq!(row["path"], "/", "{row}");
}

/// A client speaking permessage-deflate with context takeover both ways: its compressor and
/// decompressor each keep their window across messages.
struct DeflateClient {
    raw: RawClient,
    compress: flate2::Compress,
    decompress: flate2::Decompress,
}

impl DeflateClient {
    fn connect(port: u16) -> DeflateClient {
        let raw = RawClient::try_upgrade(port, "Sec-WebSocket-Extensions: permessage-deflate\r\n")
            .expect("upgraded");
        DeflateClient {
            raw,
            compress: flate2::Compress::new(flate2::Compression::default(), false),
            decompress: flate2::Decompress::new(false),
        }
    }

    /// Sends `text` compressed (RSV1), its sync flush's tail stripped (RFC 7692 §7.2.1).
    fn send(&mut self, text: &str) -> usize {
        let mut out = Vec::with_capacity(text.len() + 64);
        self.compress
            .compress_vec(text.as_bytes(), &mut out, flate2::FlushCompress::Sync)
            .unwrap();
        assert!(out.ends_with(&[0, 0, 0xff, 0xff]));
        out.truncate(out.len() - 4);
        let mut frame = masked_frame(true, 0x1, &out);
        frame[0] |= 0x40;
        self.raw.stream.write_all(&frame).unwrap();
        out.len()
    }

    /// The next text message, decompressed if it came with RSV1.
    fn recv(&mut self) -> String {
        use std::io::Read;
        let s = &mut self.raw.stream;
        let mut h = [0u8; 2];
        s.read_exact(&mut h).unwrap();
        let len = match h[1] & 0x7f {
            126 => {
                let mut l = [0u8; 2];
                s.read_exact(&mut l).unwrap();
                u16::from_be_bytes(l) as usize
            }
            127 => {
                let mut l = [0u8; 8];
                s.read_exact(&mut l).unwrap();
                u64::from_be_bytes(l) as usize
            }
            n => n as usize,
        };
        let mut payload = vec![0u8; len];
        s.read_exact(&mut payload).unwrap();
        assert_eq!(h[0] & 0x8f, 0x81, "a whole text frame");
        if h[0] & 0x40 == 0 {
            return String::from_utf8(payload).unwrap();
        }
        payload.extend_from_slice(&[0, 0, 0xff, 0xff]);
        let mut out = Vec::with_capacity(64 << 10);
        self.decompress
            .decompress_vec(&payload, &mut out, flate2::FlushDecompress::Sync)
            .unwrap();
        String::from_utf8(out).unwrap()
    }
}

fn a_compressed_stream_with_context_takeover_survives_a_reload() {
    let extra = "compression = \"dedicated\"\ncompression_min_size = 16\n";
    let mut server = Server::start_program(std::env::current_exe().unwrap(), "named", 1, extra);
    let mut c = DeflateClient::connect(server.port);
    c.send("name deflated");
    assert_eq!(c.recv(), "hi deflated");
    let long: String = (0..40)
        .map(|i| format!("line {i} of a long and repetitive message. "))
        .collect();
    let first = c.send(&long);
    assert_eq!(c.recv(), format!("deflated {long}"));
    // Sent again, the message is mostly a reference into the window both sides keep.
    let again = c.send(&long);
    assert!(again * 4 < first, "{again} bytes against {first}");
    assert_eq!(c.recv(), format!("deflated {long}"));

    reload_to(&mut server, 1);

    // The new worker's decompressor starts from the window the old one had: the client's
    // compressor refers back into it, and the new worker still reads it.
    let after = c.send(&long);
    assert!(after * 4 < first, "{after} bytes against {first}");
    assert_eq!(c.recv(), format!("deflated {long}"));
    // Its compressor is new, which the client's decompressor follows without noticing.
    c.send("and more");
    assert_eq!(c.recv(), "deflated and more");
    let out = server.wsd(&["connections", "--json"]);
    let view: Value = serde_json::from_slice(&out.stdout).unwrap();
    let row = &view["conns"][0];
    assert!(
        row["extensions"]
            .as_str()
            .unwrap()
            .starts_with("permessage-deflate"),
        "{row}"
    );
}

fn main() {
    if std::env::var_os(LIBRARY_SERVER_ENV).is_some() {
        server_program();
    }
    run_suite(&[
        (
            "a_deploy_moves_a_thousand_clients_and_loses_no_message",
            a_deploy_moves_a_thousand_clients_and_loses_no_message,
        ),
        (
            "lines_published_mid_handoff_reach_the_clients_not_yet_handed",
            lines_published_mid_handoff_reach_the_clients_not_yet_handed,
        ),
        (
            "lines_reach_every_subscriber_once_through_count_changes",
            lines_reach_every_subscriber_once_through_count_changes,
        ),
        (
            "a_new_worker_dying_mid_handoff_loses_no_connection",
            a_new_worker_dying_mid_handoff_loses_no_connection,
        ),
        (
            "a_new_worker_dying_mid_upgrade_loses_no_connection",
            a_new_worker_dying_mid_upgrade_loses_no_connection,
        ),
        (
            "a_new_master_killed_mid_upgrade_loses_no_connection",
            a_new_master_killed_mid_upgrade_loses_no_connection,
        ),
        (
            "an_upgrade_that_raises_the_count_moves_every_connection",
            an_upgrade_that_raises_the_count_moves_every_connection,
        ),
        (
            "an_upgrade_that_lowers_the_count_moves_every_connection",
            an_upgrade_that_lowers_the_count_moves_every_connection,
        ),
        (
            "an_upgrade_to_a_new_binary_moves_every_connection",
            an_upgrade_to_a_new_binary_moves_every_connection,
        ),
        (
            "a_worker_near_its_file_limit_hands_over_every_connection",
            a_worker_near_its_file_limit_hands_over_every_connection,
        ),
        (
            "a_half_received_message_and_a_full_send_queue_survive_a_reload",
            a_half_received_message_and_a_full_send_queue_survive_a_reload,
        ),
        (
            "a_compressed_stream_with_context_takeover_survives_a_reload",
            a_compressed_stream_with_context_takeover_survives_a_reload,
        ),
    ]);
}
