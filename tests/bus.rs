//! The bus across worker processes: chat and pubsub relayed to every worker, `send_to` a
//! client of another worker, app messages between workers, and a worker killed while
//! broadcasts flow. Real `wsd` processes and sockets.
//!
//! Like `tests/library.rs`, this binary is itself a wsd program: with `WSD_LIBRARY_SERVER=1`
//! it serves the built-in apps plus `relay` (shows each client its global id, forwards
//! `to ID TEXT` with `send_to`, and `all TEXT` to the other workers' `on_bus_message`).
//! `harness = false` because a forking master must be the main thread of its process.

mod common;

use common::*;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde_json::Value;
use std::collections::HashMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

fn server_program() -> ! {
    wsd::Runner::new().app("relay", relay_app).run()
}

fn this_program() -> PathBuf {
    std::env::current_exe().expect("the test binary's path")
}

fn owners(server: &Server) -> HashMap<u16, i32> {
    connection_owners(server)
}

fn port_of(c: &Client) -> u16 {
    c.ws.get_ref().local_addr().unwrap().port()
}

/// Connects `n` clients and waits until the server lists them all.
fn connect_many(server: &mut Server, n: usize) -> Vec<Client> {
    let clients: Vec<Client> = (0..n).map(|_| server.connect()).collect();
    wait_for("every client listed", DEADLINE, || {
        (owners(server).len() == n).then_some(())
    });
    clients
}

fn recv_text(c: &mut Client) -> String {
    c.recv_text()
}

fn chat_reaches_every_client_once_in_each_senders_order() {
    let mut server = Server::start_program(this_program(), "chat", 4, "");
    let mut clients = connect_many(&mut server, 40);
    let owners = owners(&server);
    let workers: std::collections::HashSet<i32> = owners.values().copied().collect();
    assert!(workers.len() >= 3, "40 clients landed on only {workers:?}");
    const EACH: usize = 5;
    // Every client sends its messages before anyone reads: the relays interleave freely.
    for (i, c) in clients.iter_mut().enumerate() {
        for m in 0..EACH {
            c.send_text(&format!("c{i} m{m}"));
        }
    }
    let total = clients.len() * EACH;
    for (r, c) in clients.iter_mut().enumerate() {
        let mut next = vec![0usize; 40];
        for _ in 0..total {
            let text = recv_text(c);
            let (sender, m) = text.split_once(' ').unwrap();
            let sender: usize = sender[1..].parse().unwrap();
            let m: usize = m[1..].parse().unwrap();
            assert_eq!(m, next[sender], "client {r}: {text} out of order or twice");
            next[sender] += 1;
        }
        assert!(
            next.iter().all(|&n| n == EACH),
            "client {r} missed some: {next:?}"
        );
    }
    // Nothing more arrives: every message came exactly once.
    let c = &mut clients[0];
    c.ws.get_mut()
        .set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    assert!(c.read().is_err(), "an extra message arrived");
    // The workers' next reports count the bus traffic, and nothing was dropped.
    let st = wait_for("bus counters reported", DEADLINE, || {
        let st = server.try_status()?;
        (workers_sum(&st, "bus_sent") >= (total * 3) as u64).then_some(st)
    });
    assert_eq!(workers_sum(&st, "bus_dropped"), 0);
}

fn pubsub_delivers_only_to_subscribers_and_answers_bad_input() {
    let mut server = Server::start_program(this_program(), "pubsub", 4, "");
    let mut clients = connect_many(&mut server, 12);
    for (i, c) in clients.iter_mut().enumerate() {
        let topic = if i % 2 == 0 { "even" } else { "odd" };
        c.send_text(&format!("{{\"subscribe\":\"{topic}\"}}"));
        assert_eq!(recv_text(c), format!("{{\"subscribed\":\"{topic}\"}}"));
    }
    // Malformed input gets an error, and the connection stays.
    for bad in [
        "not json",
        "{\"publish\":\"even\"}",
        "{\"subscribe\":1}",
        "{}",
    ] {
        clients[0].send_text(bad);
        let answer: Value = serde_json::from_str(&recv_text(&mut clients[0])).unwrap();
        assert!(answer["error"].is_string(), "{bad}: {answer}");
    }
    // One connection holds at most 100 topics, each named in at most 256 bytes.
    let long = "t".repeat(257);
    clients[0].send_text(&format!("{{\"subscribe\":\"{long}\"}}"));
    let answer: Value = serde_json::from_str(&recv_text(&mut clients[0])).unwrap();
    assert_eq!(answer["error"], "a topic is at most 256 bytes");
    for n in 1..100 {
        clients[2].send_text(&format!("{{\"subscribe\":\"extra{n}\"}}"));
        assert_eq!(
            recv_text(&mut clients[2]),
            format!("{{\"subscribed\":\"extra{n}\"}}")
        );
    }
    clients[2].send_text("{\"subscribe\":\"one too many\"}");
    let answer: Value = serde_json::from_str(&recv_text(&mut clients[2])).unwrap();
    assert_eq!(answer["error"], "at most 100 topics per connection");
    clients[2].send_text("{\"subscribe\":\"even\"}");
    assert_eq!(
        recv_text(&mut clients[2]),
        "{\"subscribed\":\"even\"}",
        "held already"
    );
    clients[1].send_text("{\"publish\":\"even\",\"data\":{\"n\":1}}");
    for (i, c) in clients.iter_mut().enumerate() {
        if i % 2 == 0 {
            let got: Value = serde_json::from_str(&recv_text(c)).unwrap();
            assert_eq!(got, serde_json::json!({"topic": "even", "data": {"n": 1}}));
        }
    }
    // Unsubscribed clients stop getting it; the odd ones never got the even message.
    clients[0].send_text("{\"unsubscribe\":\"even\"}");
    assert_eq!(recv_text(&mut clients[0]), "{\"unsubscribed\":\"even\"}");
    clients[3].send_text("{\"publish\":\"odd\",\"data\":\"o\"}");
    clients[3].send_text("{\"publish\":\"even\",\"data\":\"e\"}");
    for (i, c) in clients.iter_mut().enumerate() {
        let expect = match i {
            0 => None,
            i if i % 2 == 0 => Some("{\"topic\":\"even\",\"data\":\"e\"}"),
            _ => Some("{\"topic\":\"odd\",\"data\":\"o\"}"),
        };
        if let Some(e) = expect {
            assert_eq!(recv_text(c), e, "client {i}");
        }
    }
    for c in clients.iter_mut() {
        c.ws.get_mut()
            .set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        assert!(c.read().is_err(), "a delivery too many");
    }
}

/// Connects relay clients until `want` distinct worker slots are covered; returns
/// (client, global id) pairs, one per slot.
fn relay_clients_on_distinct_slots(server: &Server, want: usize) -> Vec<(Client, String)> {
    let mut by_slot: HashMap<String, (Client, String)> = HashMap::new();
    wait_for("clients on distinct workers", DEADLINE, || {
        let mut c = server.connect();
        let welcome = recv_text(&mut c);
        let id = welcome.strip_prefix("id ").unwrap().to_string();
        let slot = id.split('-').nth(1).unwrap().to_string();
        by_slot.entry(slot).or_insert((c, id));
        (by_slot.len() >= want).then_some(())
    });
    by_slot.into_values().collect()
}

fn send_to_reaches_a_client_of_another_worker() {
    let server = Server::start_program(this_program(), "relay", 4, "");
    let mut pair = relay_clients_on_distinct_slots(&server, 2);
    let (b_id, a_id) = (pair[1].1.clone(), pair[0].1.clone());
    pair[0].0.send_text(&format!("to {b_id} hello from a"));
    assert_eq!(recv_text(&mut pair[1].0), "hello from a");
    pair[1].0.send_text(&format!("to {a_id} and back"));
    assert_eq!(recv_text(&mut pair[0].0), "and back");
    // To itself, and a bad id.
    pair[0].0.send_text(&format!("to {a_id} me"));
    assert_eq!(recv_text(&mut pair[0].0), "me");
    pair[0].0.send_text("to nonsense x");
    assert!(recv_text(&mut pair[0].0).starts_with("error not a connection id"));
}

fn workers_exchange_app_messages() {
    let server = Server::start_program(this_program(), "relay", 3, "");
    let mut clients = relay_clients_on_distinct_slots(&server, 3);
    let from_slot: u16 = clients[0].1.split('-').nth(1).unwrap().parse().unwrap();
    clients[0].0.send_text("all ping");
    assert_eq!(recv_text(&mut clients[0].0), "sent");
    for (c, _) in clients.iter_mut().skip(1) {
        assert_eq!(
            recv_text(c),
            format!("bus from slot {from_slot}: {from_slot}:ping")
        );
    }
}

fn broadcasts_survive_a_worker_killed_mid_stream() {
    raise_fd_limit(4096);
    let mut server = Server::start_program(this_program(), "chat", 4, "");
    let mut clients = connect_many(&mut server, 24);
    let owner = owners(&server);
    // The victim is the first client's worker, so it surely has clients to lose.
    let victim = owner[&port_of(&clients[0])];
    let victim_slot = server
        .worker_pids()
        .iter()
        .position(|&p| p == victim)
        .unwrap();
    let (mut doomed, mut others): (Vec<Client>, Vec<Client>) = clients
        .drain(..)
        .partition(|c| owner[&port_of(c)] == victim);
    assert!(!doomed.is_empty() && !others.is_empty());
    let mut publisher = others.pop().unwrap();
    // The publisher sends a numbered stream; halfway, the victim worker is killed.
    let mut received = vec![0usize; others.len()];
    const N: usize = 200;
    for n in 0..N {
        publisher.send_text(&format!("seq {n}"));
        assert_eq!(recv_text(&mut publisher), format!("seq {n}"));
        for (i, c) in others.iter_mut().enumerate() {
            assert_eq!(
                recv_text(c),
                format!("seq {n}"),
                "client {i} lost or reordered"
            );
            received[i] += 1;
        }
        if n == N / 2 {
            kill(Pid::from_raw(victim), Signal::SIGKILL).unwrap();
        }
    }
    assert!(received.iter().all(|&r| r == N));
    for c in doomed.iter_mut() {
        c.ws.get_mut()
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let mut lost = false;
        for _ in 0..N + 1 {
            if c.read().is_err() {
                lost = true;
                break;
            }
        }
        assert!(lost, "a client of the killed worker kept its connection");
    }
    // The slot's new worker is back on the bus: a client that lands on it hears broadcasts.
    let st = wait_for("the slot respawned", DEADLINE, || {
        let st = server.try_status()?;
        let w = &st["workers"][victim_slot];
        (w["status"] == "idle" && w["pid"] != victim).then_some(st)
    });
    let reborn = st["workers"][victim_slot]["pid"].as_i64().unwrap() as i32;
    let started = Instant::now();
    let mut newcomer = loop {
        let c = server.connect();
        let port = port_of(&c);
        let owner = wait_for("the newcomer listed", DEADLINE, || {
            owners(&server).get(&port).copied()
        });
        if owner == reborn {
            break c;
        }
        assert!(
            started.elapsed() < DEADLINE,
            "no client landed on the new worker"
        );
    };
    publisher.send_text("after the respawn");
    assert_eq!(recv_text(&mut newcomer), "after the respawn");
}

fn a_reloaded_group_is_on_the_bus_again() {
    let mut server = Server::start_program(this_program(), "chat", 3, "");
    let before = server.worker_pids();
    let out = server.wsd(&["reload"]);
    assert!(out.status.success(), "{out:?}");
    let after = worker_pids_in(&server.wait_ready());
    assert!(
        after.iter().all(|p| !before.contains(p)),
        "{before:?} -> {after:?}"
    );
    let mut clients = connect_many(&mut server, 12);
    let spread: std::collections::HashSet<i32> = owners(&server).values().copied().collect();
    assert!(spread.len() >= 2, "12 clients on one worker");
    clients[0].send_text("after reload");
    for c in clients.iter_mut() {
        assert_eq!(recv_text(c), "after reload");
    }
}

fn main() {
    if std::env::var_os(LIBRARY_SERVER_ENV).is_some() {
        server_program();
    }
    run_suite(&[
        (
            "a_reloaded_group_is_on_the_bus_again",
            a_reloaded_group_is_on_the_bus_again,
        ),
        (
            "chat_reaches_every_client_once_in_each_senders_order",
            chat_reaches_every_client_once_in_each_senders_order,
        ),
        (
            "pubsub_delivers_only_to_subscribers_and_answers_bad_input",
            pubsub_delivers_only_to_subscribers_and_answers_bad_input,
        ),
        (
            "send_to_reaches_a_client_of_another_worker",
            send_to_reaches_a_client_of_another_worker,
        ),
        (
            "workers_exchange_app_messages",
            workers_exchange_app_messages,
        ),
        (
            "broadcasts_survive_a_worker_killed_mid_stream",
            broadcasts_survive_a_worker_killed_mid_stream,
        ),
    ]);
}
