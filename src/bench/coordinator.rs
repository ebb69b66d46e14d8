//! The process that runs `wsd bench`: it forks the client processes (shards), starts them
//! together once every connection is up, prints a progress line each second and adds up
//! their final reports. It also reads the server's CPU time (and, for `idle`, its memory)
//! before the clients start, at `go` and at the end ([`super::server`]), and decides when an
//! `idle` run ends: once it has read the server's memory with every connection still open
//! (with `--again-when`, it then waits for the file and has every connection echo again).
//!
//! Why fork, and not threads: RLIMIT_NOFILE caps open files per process, not per thread, so
//! more connections than its hard limit allows need more processes; and separate processes
//! keep each shard's loop as plain as the server's. Forking is safe here because the CLI is
//! single-threaded.

use super::report::{self, Counts, Errors, Link, Span, Summary};
use super::server::{Procs, ServerRun};
use super::shard::{self, Lines, Progress, Report, Share};
use super::{BenchError, Clock, Plan, SEC, Work, idle};
use crate::sys::{self, Fork};
use mio::unix::pipe;
use mio::{Events, Interest, Poll, Token};
use nix::sys::resource::{Resource, getrlimit, setrlimit};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use std::io::Write;
use std::time::Duration;

/// Descriptors a shard keeps for itself besides its sockets (poll, pipes, stdio).
const SPARE_FDS: u64 = 256;
/// Once every connection is settled, how long to wait for the stragglers to become ready
/// (a pubsub subscriber without its ack) before measuring without them.
const READY_GRACE_NS: u64 = 10 * SEC;

struct Shard {
    pid: Pid,
    up: pipe::Receiver,
    down: pipe::Sender,
    lines: Lines,
    progress: Option<Progress>,
    done: Option<Report>,
    /// It holds no connection (`api`'s publisher): once it has published it ends, and takes
    /// no more orders.
    publisher_only: bool,
    /// It takes no more orders: it is ending.
    finishing: bool,
}

/// Runs the whole benchmark and returns its figures.
pub fn run(plan: &Plan) -> Result<Summary, BenchError> {
    let files = raise_fd_limit()?;
    let shares = split(plan, sockets_per_process(files));
    let clock = Clock::new();
    let memory = matches!(plan.work, Work::Idle { .. });
    let more_hosts = match &plan.work {
        Work::Api(a) => a.host_configs.as_slice(),
        _ => &[],
    };
    let watch = |procs: Procs| ServerRun {
        start: procs.sample(clock.now(), memory),
        procs,
        go: None,
        held: None,
        end: None,
        connections: None,
    };
    let mut server = Procs::discover(&plan.server, more_hosts)?.map(watch);
    let mut others: Vec<(String, ServerRun)> = match &plan.work {
        Work::Api(a) => [("redis", &a.redis_pids), ("backend", &a.backend_pids)]
            .into_iter()
            .filter(|(_, pids)| !pids.is_empty())
            .map(|(name, pids)| (name.to_string(), watch(Procs::of(pids.clone()))))
            .collect(),
        _ => Vec::new(),
    };
    let me = nix::unistd::getpid();
    let mut shards: Vec<Shard> = Vec::with_capacity(shares.len());
    for share in &shares {
        let setup = |e| BenchError::Setup("create a pipe".into(), e);
        let (up_tx, up_rx) = pipe::new().map_err(setup)?;
        let (down_tx, down_rx) = pipe::new().map_err(setup)?;
        match sys::fork().map_err(|e| BenchError::Setup("fork".into(), e))? {
            Fork::Child => {
                // The other shards' pipes are not this one's business.
                drop(shards);
                drop((up_rx, down_tx));
                let _ = sys::die_with_parent(me);
                std::process::exit(shard::main(plan, share, clock, up_tx, down_rx));
            }
            Fork::Parent(pid) => shards.push(Shard {
                pid,
                up: up_rx,
                down: down_tx,
                lines: Lines::default(),
                progress: None,
                done: None,
                publisher_only: share.publisher && share.conns == 0,
                finishing: false,
            }),
        }
    }
    // The client's own CPU time, read the same way as the server's: a figure the client
    // limited shows as a client near a whole core.
    let procs = Procs::of(shards.iter().map(|s| s.pid.as_raw()).collect());
    let mut client = ServerRun {
        start: procs.sample(clock.now(), false),
        procs,
        go: None,
        held: None,
        end: None,
        connections: None,
    };
    let result = coordinate(
        plan,
        clock,
        &mut shards,
        &mut server,
        &mut client,
        &mut others,
    );
    for s in &shards {
        if result.is_err() {
            let _ = kill(s.pid, Signal::SIGKILL);
        }
        let _ = nix::sys::wait::waitpid(s.pid, None);
    }
    result.map(|summary| Summary {
        server,
        client: Some(client),
        others,
        ..summary
    })
}

/// Raises the soft RLIMIT_NOFILE to the hard one (the shards inherit it); returns the files
/// one process may now hold.
fn raise_fd_limit() -> Result<u64, BenchError> {
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE)
        .map_err(|e| BenchError::Setup("read RLIMIT_NOFILE".into(), e.into()))?;
    if soft < hard {
        setrlimit(Resource::RLIMIT_NOFILE, hard, hard)
            .map_err(|e| BenchError::Setup("raise RLIMIT_NOFILE".into(), e.into()))?;
    }
    Ok(hard)
}

/// The sockets a shard may open when a process may hold `files` files.
fn sockets_per_process(files: u64) -> usize {
    usize::try_from(files.saturating_sub(SPARE_FDS).max(16)).unwrap_or(usize::MAX)
}

/// Shares of the connections (and of `connect`'s slots), as even as possible, each within
/// `per_process` sockets; the first also runs the broadcast publisher. `api` has its own.
fn split(plan: &Plan, per_process: usize) -> Vec<Share> {
    if let Work::Api(a) = &plan.work {
        return split_api(plan.conns, a.hosts.len(), per_process);
    }
    let publisher = matches!(plan.work, Work::Broadcast { .. });
    let slots = match plan.work {
        Work::Connect { .. } => plan.extra_sockets(),
        _ => 0,
    };
    // Two sockets of room in every share: rounding may give one a connection and a slot
    // more than the average, and the first holds the publisher.
    let k = plan.sockets().div_ceil(per_process - 2).max(1);
    let (base, rem) = (plan.conns / k, plan.conns % k);
    let mut first = 0;
    (0..k)
        .map(|i| {
            let conns = base + usize::from(i < rem);
            let share = Share {
                first,
                conns,
                publisher: publisher && i == 0,
                slots: slots / k + usize::from(i < slots % k),
                host: 0,
            };
            first += conns;
            share
        })
        .collect()
}

/// `api`: the subscribers split evenly over `hosts`, each host's over as many processes as
/// its share needs, numbered in order (host 0's first); then the publisher, a process of its
/// own with no WebSocket connection.
fn split_api(conns: usize, hosts: usize, per_process: usize) -> Vec<Share> {
    let mut shares = Vec::new();
    let mut first = 0;
    for host in 0..hosts {
        let here = conns / hosts + usize::from(host < conns % hosts);
        let k = here.div_ceil(per_process).max(1);
        for i in 0..k {
            let n = here / k + usize::from(i < here % k);
            shares.push(Share {
                first,
                conns: n,
                publisher: false,
                slots: 0,
                host,
            });
            first += n;
        }
    }
    shares.push(Share {
        first,
        conns: 0,
        publisher: true,
        slots: 0,
        host: 0,
    });
    shares
}

/// The sum of the shards' latest progress reports; not prepared until every shard has sent one.
fn totals(shards: &[Shard]) -> Progress {
    let mut t = Progress {
        prepared: true,
        ..Progress::default()
    };
    for s in shards {
        match &s.progress {
            Some(p) => t.add(p),
            None => t.prepared = false,
        }
    }
    t
}

fn coordinate(
    plan: &Plan,
    clock: Clock,
    shards: &mut [Shard],
    server: &mut Option<ServerRun>,
    client: &mut ServerRun,
    others: &mut [(String, ServerRun)],
) -> Result<Summary, BenchError> {
    let setup = |e| BenchError::Setup("poll the client processes".into(), e);
    let mut poll = Poll::new().map_err(setup)?;
    for (i, s) in shards.iter_mut().enumerate() {
        poll.registry()
            .register(&mut s.up, Token(i), Interest::READABLE)
            .map_err(setup)?;
        let _ = s.down.set_nonblocking(false);
    }
    let mut events = Events::with_capacity(64);
    let mut t0: Option<u64> = None;
    let mut settled_at: Option<u64> = None;
    let mut next_print = clock.now() + SEC;
    let mut last = Counts::default();
    let memory = matches!(plan.work, Work::Idle { .. });
    let again = match &plan.work {
        Work::Idle { again, .. } => again.as_deref(),
        _ => None,
    };
    let again_ns = again.map_or(0, |_| idle::AGAIN_WAIT_NS + idle::AGAIN_TIMEOUT_NS);
    let deadline_after_go = (plan.secs + 30) * SEC + super::broadcast::DRAIN_NS + again_ns;
    let mut held = false;
    let mut asked_again = false;
    loop {
        let now = clock.now();
        let sum = totals(shards);
        if t0.is_none() {
            let all_tried = sum.open + sum.failed >= plan.upfront();
            if sum.prepared || settled_at.is_some_and(|at| now > at + READY_GRACE_NS) {
                t0 = Some(now);
                next_print = now + SEC + SEC / 10;
                for run in server.iter_mut().chain(others.iter_mut().map(|(_, r)| r)) {
                    run.go = Some(run.procs.sample(now, false));
                }
                client.go = Some(client.procs.sample(now, false));
                order(shards, &format!("go {now}"))?;
            } else if settled_at.is_none() && all_tried {
                settled_at = Some(now);
            }
        }
        if memory && !held && t0.is_some_and(|t0| now >= t0 + plan.secs * SEC) {
            // The end of an idle run's hold: every connection is still open.
            if let Some(run) = server {
                run.held = Some(run.procs.sample(now, true));
                run.connections = run.procs.connections();
            }
            if again.is_none() {
                order(shards, "stop")?;
            }
            held = true;
        }
        if held && !asked_again && again.is_some_and(|file| file.exists()) {
            // The shards end by themselves once their connections have echoed again.
            order(shards, "again")?;
            asked_again = true;
        }
        if now >= next_print {
            progress_line(plan, t0, now, &sum, &mut last);
            next_print += SEC;
        }
        if shards.iter().all(|s| s.done.is_some()) {
            for run in server.iter_mut().chain(others.iter_mut().map(|(_, r)| r)) {
                run.end = Some(run.procs.sample(clock.now(), false));
            }
            client.end = Some(client.procs.sample(clock.now(), false));
            return Ok(summary(shards, t0.unwrap_or(0)));
        }
        if t0.is_some_and(|t0| now > t0 + deadline_after_go) {
            return Err(BenchError::Shard(
                0,
                "the run did not finish in time".into(),
            ));
        }
        let timeout = Duration::from_nanos(next_print.saturating_sub(now).min(SEC / 10));
        if let Err(e) = poll.poll(&mut events, Some(timeout))
            && e.kind() != std::io::ErrorKind::Interrupted
        {
            return Err(setup(e));
        }
        for ev in events.iter() {
            let i = ev.token().0;
            let mut reports = Vec::new();
            let s = &mut shards[i];
            while let Some(line) = s
                .lines
                .next(&mut s.up)
                .map_err(|e| BenchError::Shard(i, e.to_string()))?
            {
                let report: Report = serde_json::from_str(&line)
                    .map_err(|e| BenchError::Shard(i, format!("bad report {line:?}: {e}")))?;
                reports.push(report);
            }
            let closed = s.lines.closed;
            for report in reports {
                match report {
                    Report::Progress(p) => shards[i].progress = Some(p),
                    Report::Published { sent } => {
                        // A publisher with no connection ends right after: it has no
                        // subscriber to tell, and may be gone before the order would reach it.
                        shards[i].finishing = shards[i].publisher_only;
                        order(shards, &format!("sent {sent}"))?;
                    }
                    Report::Done { .. } => shards[i].done = Some(report),
                    Report::Failed { why } => return Err(BenchError::Shard(i, why)),
                }
            }
            if closed && shards[i].done.is_none() {
                return Err(BenchError::Shard(i, "ended without its report".into()));
            }
        }
    }
}

/// Sends one order line to every shard still running.
fn order(shards: &mut [Shard], line: &str) -> Result<(), BenchError> {
    for (i, s) in shards.iter_mut().enumerate() {
        if s.done.is_none() && !s.finishing {
            s.down
                .write_all(format!("{line}\n").as_bytes())
                .map_err(|e| BenchError::Shard(i, format!("cannot send orders: {e}")))?;
        }
    }
    Ok(())
}

/// The line printed to stderr each second.
fn progress_line(plan: &Plan, t0: Option<u64>, now: u64, sum: &Progress, last: &mut Counts) {
    let Some(t0) = t0 else {
        eprintln!(
            "[connecting] {}/{} ready, {} failed",
            sum.ready,
            plan.upfront(),
            sum.failed
        );
        return;
    };
    let secs = (now - t0) / SEC;
    let messages = sum.counts.messages - last.messages.min(sum.counts.messages);
    let sent = sum.counts.sent - last.sent.min(sum.counts.sent);
    let bytes = sum.counts.bytes - last.bytes.min(sum.counts.bytes);
    *last = sum.counts;
    let (open, errors) = (sum.open, sum.errors);
    match plan.work {
        Work::Echo { .. } => eprintln!(
            "[{secs}s] {messages} msgs/s {:.2} MB/s, {open} open, {errors} errors",
            bytes as f64 / 1e6,
        ),
        Work::Connect { .. } => {
            eprintln!("[{secs}s] {messages} handshakes/s, {open} open, {errors} errors")
        }
        Work::Idle { .. } => eprintln!("[{secs}s] holding {open} open, {errors} errors"),
        Work::Latency { .. } => eprintln!(
            "[{secs}s] {sent} sent/s, {messages} replies/s, {} late, {open} open, {errors} errors",
            sum.counts.late
        ),
        Work::Broadcast { .. } => eprintln!(
            "[{secs}s] {messages} deliveries/s, {} sent, {open} open, {errors} errors",
            sum.counts.sent
        ),
        Work::Api(_) => eprintln!(
            "[{secs}s] {sent} published/s, {messages} deliveries/s, {} accepted, {open} open, \
             {errors} errors",
            sum.counts.answered
        ),
    }
}

fn summary(shards: &[Shard], t0: u64) -> Summary {
    let mut s = Summary {
        ready: 0,
        open: 0,
        counts: Counts::default(),
        errors: Errors::default(),
        latency: report::histogram(),
        burst_latency: report::histogram(),
        connecting: None,
        span: None,
        t0,
        server: None,
        client: None,
        link: Link::default(),
        answer_latency: report::histogram(),
        publishing: None,
        others: Vec::new(),
    };
    for shard in shards {
        if let Some(Report::Done {
            ready,
            open,
            counts,
            errors,
            latency,
            connecting,
            span,
            burst_latency,
            link,
            answers,
            publishing,
        }) = &shard.done
        {
            report::add_pairs(&mut s.answer_latency, answers);
            s.publishing = Span::merge(s.publishing, *publishing);
            s.link.merge(link);
            s.ready += ready;
            s.open += open;
            s.counts.add(counts);
            s.errors.merge(errors);
            report::add_pairs(&mut s.latency, latency);
            report::add_pairs(&mut s.burst_latency, burst_latency);
            s.connecting = Span::merge(s.connecting, *connecting);
            s.span = Span::merge(s.span, *span);
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bench::{App, Target};

    fn plan(conns: usize, broadcast: bool) -> Plan {
        Plan {
            target: Target::parse("ws://127.0.0.1:1/").unwrap(),
            conns,
            secs: 1,
            json: false,
            server: Default::default(),
            payload: crate::bench::payload::Kind::Text,
            work: if broadcast {
                Work::Broadcast {
                    rate: 1,
                    app: App::Chat,
                    topic: "t".into(),
                    size: 0,
                }
            } else {
                Work::Echo { size: 1, depth: 1 }
            },
        }
    }

    #[test]
    fn the_fd_limit_is_raised_to_the_hard_one_and_sets_the_sockets_per_shard() {
        let files = raise_fd_limit().unwrap();
        assert_eq!(
            getrlimit(Resource::RLIMIT_NOFILE).unwrap(),
            (files, files),
            "soft raised to hard"
        );
        assert_eq!(sockets_per_process(20_000), 19_744);
        assert_eq!(sockets_per_process(100), 16, "a floor for tiny limits");
        assert!(sockets_per_process(files) < files as usize);
    }

    #[test]
    fn connections_are_split_evenly_within_the_per_process_limit() {
        let shares = split(&plan(100, false), 19_744);
        assert_eq!(shares.len(), 1);
        assert_eq!((shares[0].first, shares[0].conns), (0, 100));
        let shares = split(&plan(50_000, true), 19_744);
        assert_eq!(shares.len(), 3);
        assert_eq!(shares.iter().map(|s| s.conns).sum::<usize>(), 50_000);
        assert!(shares[0].publisher && !shares[1].publisher);
        assert!(shares[0].conns < 19_744);
        assert_eq!(shares[2].first, shares[0].conns + shares[1].conns);
        // Exactly full: the publisher still fits.
        let shares = split(&plan(19_743, true), 19_744);
        assert!(shares[0].conns < 19_744, "{}", shares[0].conns);
    }

    #[test]
    fn api_subscribers_are_split_per_host_and_the_publisher_runs_alone() {
        let shares = split_api(10_001, 2, 19_744);
        assert_eq!(shares.len(), 3);
        let hosts: Vec<(usize, usize, usize)> =
            shares.iter().map(|s| (s.host, s.first, s.conns)).collect();
        assert_eq!(hosts, [(0, 0, 5_001), (1, 5_001, 5_000), (0, 10_001, 0)]);
        assert!(shares[2].publisher && !shares[0].publisher && !shares[1].publisher);
        // A host's share larger than a process may hold takes several processes.
        let shares = split_api(50_000, 2, 19_744);
        assert_eq!(shares.iter().filter(|s| s.host == 1).count(), 2);
        assert!(shares.iter().all(|s| s.conns <= 19_744));
        assert_eq!(shares.iter().map(|s| s.conns).sum::<usize>(), 50_000);
    }

    #[test]
    fn connect_slots_are_split_too_and_fit_with_the_connections() {
        let mut p = plan(40_000, false);
        p.work = Work::Connect { slots: 101 };
        let shares = split(&p, 19_744);
        assert_eq!(shares.len(), 3);
        assert_eq!(shares.iter().map(|s| s.slots).sum::<usize>(), 101);
        assert!(shares.iter().all(|s| s.conns + s.slots <= 19_744));
        p.secs = 0; // the burst only: no slots
        assert!(split(&p, 19_744).iter().all(|s| s.slots == 0));
    }
}
