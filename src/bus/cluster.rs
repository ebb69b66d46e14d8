//! The cluster bus: the group's bus messages also go through Redis pub/sub, so groups of the
//! same name on several wsd servers (hosts) form one bus.
//!
//! Channels, each message one [`wire::encode`]d payload (Redis payloads are binary-safe):
//!
//! ```text
//! wsd:{group}:all                  broadcasts, users, questions: every worker of every host
//! wsd:{group}:t:{topic}            a topic's publishes: the workers with subscribers to it
//! wsd:{group}:{host:016x}:{slot}   `send_to` a connection held by that host's worker `slot`
//! wsd:{group}:{host:016x}:marks    marks of that host's handoffs (`bus::crossing`)
//! ```
//!
//! Every worker subscribes to `all`, to its own channel and to its host's marks, and to a topic's channel only while
//! it has subscribers to that topic (interest-based routing): a publish costs Redis one copy
//! per worker that delivers it, not one per worker of the cluster. A worker that gains its
//! first subscriber to a topic tells its subscriber thread, which subscribes within
//! [`SUBSCRIBE_DELAY`]; a publish on another host before then does not reach it. After an
//! outage the thread subscribes to every channel it wants again. A worker skips what comes
//! back from its own host: the local mesh has already carried it there. App messages
//! (`bus_send`, `bus_send_all`) stay on the local mesh.
//!
//! Threads. The worker's loop never waits on Redis: a worker with a cluster bus runs two helper
//! threads, each with its own connection and a plain blocking loop — a sync client can wait on
//! one thing at a time, and one thread serving both would have to poll. The *publisher* takes
//! encoded messages from a bounded queue (full → the message is dropped and counted; the loop
//! never blocks) and sends them as pipelined `PUBLISH`es. The *subscriber* reads messages,
//! decodes them and hands them to the loop over another bounded queue, waking it with a
//! `mio::Waker`. Only the loop's thread touches connections. The threads are started in the
//! worker, after fork (workers never fork, the master never has threads), and die with the
//! worker process.
//!
//! Order. A worker's messages reach Redis in the order it sent them (one connection); those of
//! two workers, in the order Redis takes them, which need not be the order they were sent in:
//! each publisher goes at its own pace. So the backend API, whose calls the host's workers
//! share, answers a call that sends only once Redis has what it sent ([`Cluster::flush`]): a
//! backend's next call, whichever worker takes it, reaches Redis after it.
//!
//! Outages. [`Link`] is the state both threads share. A failure on either side marks the whole
//! link down and makes both sides verify their connection again (reconnect, or `PING`), so
//! "up" always means both connections were seen working after the last failure. Each thread
//! retries with backoff (100 ms doubling to 5 s). The outage is logged once, by whichever thread
//! saw it first, and its end once. While the link is not up, messages for Redis are dropped and
//! counted; the local mesh carries on unaffected.

use super::directory::{self, Kind, Record};
use super::wire::{self, BusMessage, Origin};
use crate::backoff::Backoff;
use crate::config::RedisUrl;
use crate::control::BusState;
use mio::{Registry, Token, Waker};
use redis::{Client, Connection, RedisError};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, SyncSender, TryRecvError, TrySendError};
use std::time::{Duration, Instant};

/// Messages that may wait for the publisher, and received ones that may wait for the loop;
/// and the bytes they may hold, each way (a queue of big messages is bounded by this).
pub const QUEUE: usize = 4096;
pub const QUEUE_BYTES: usize = 64 << 20;
/// How often an idle helper thread looks at the link's state.
const TICK: Duration = Duration::from_millis(250);
/// How often the subscriber thread, waiting for messages, takes the topics to subscribe to or
/// leave: the longest a new subscription waits to be routed from other hosts.
pub const SUBSCRIBE_DELAY: Duration = Duration::from_millis(20);
/// A subscriber that has heard nothing for this long checks its connection with a `PING`.
const KEEPALIVE: Duration = Duration::from_secs(10);
/// Connecting, and waiting for an answer, before Redis counts as unavailable.
const IO_TIMEOUT: Duration = Duration::from_secs(2);
/// Most `PUBLISH`es in one pipeline.
const BATCH: usize = 256;
const MIN_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// What a worker needs to join the cluster bus.
#[derive(Debug, Clone)]
pub struct ClusterSettings {
    pub url: RedisUrl,
    /// The group's name: groups of the same name on every host form one bus.
    pub group: String,
}

/// The channel every worker of `group` on every host listens to.
pub fn channel_all(group: &str) -> String {
    format!("wsd:{group}:all")
}

/// The channel of one worker: `host`'s worker `slot` of `group`.
pub fn channel_of(group: &str, host: u64, slot: u16) -> String {
    format!("wsd:{group}:{host:016x}:{slot}")
}

/// The channel of `host`'s marks: every worker of `group` there listens to it.
pub fn channel_of_marks(group: &str, host: u64) -> String {
    format!("wsd:{group}:{host:016x}:marks")
}

/// The channel of a topic's publishes: the workers with subscribers to `topic` listen to it.
pub fn channel_of_topic(group: &str, topic: &str) -> String {
    format!("wsd:{group}:t:{topic}")
}

/// Where a message for Redis goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// Every worker of the group, on every host.
    All,
    /// The workers, on every host, with subscribers to a topic.
    Topic(String),
    /// One worker of another host.
    Worker { host: u64, slot: u16 },
    /// Every worker of a host: its marks.
    Marks { host: u64 },
}

impl Target {
    fn channel(&self, group: &str) -> String {
        match self {
            Target::All => channel_all(group),
            Target::Topic(topic) => channel_of_topic(group, topic),
            Target::Worker { host, slot } => channel_of(group, *host, *slot),
            Target::Marks { host } => channel_of_marks(group, *host),
        }
    }
}

/// A change to the topics a worker has subscribers to, for its subscriber thread.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Interest {
    /// The first local subscriber of a topic.
    Join(String),
    /// The last one left.
    Leave(String),
    /// Publish a [`BusMessage::Mark`] on the host's marks channel once every change before
    /// this one is in Redis: the mark comes after them in Redis's order of messages.
    Mark(u64),
}

impl Interest {
    fn topic(&self) -> Option<&str> {
        match self {
            Interest::Join(t) | Interest::Leave(t) => Some(t),
            Interest::Mark(_) => None,
        }
    }
}

/// Whether two changes go in one command: both joins, both leaves, or both marks.
fn same_kind(a: &Interest, b: &Interest) -> bool {
    std::mem::discriminant(a) == std::mem::discriminant(b)
}

/// The state of a worker's bus, as its reports and `status` show it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LinkState {
    /// Not reached yet since the worker started (no failure seen either).
    Connecting,
    Up,
    Down,
}

impl From<LinkState> for BusState {
    fn from(s: LinkState) -> BusState {
        match s {
            LinkState::Connecting => BusState::Connecting,
            LinkState::Up => BusState::Up,
            LinkState::Down => BusState::Down,
        }
    }
}

/// One side of the link: a helper thread and its connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    Subscriber = 1,
    Publisher = 2,
}

const BOTH: u8 = Side::Subscriber as u8 | Side::Publisher as u8;
/// An outage is under way (and has been logged).
const DOWN: u8 = 4;
/// The link has been up at least once.
const WAS_UP: u8 = 8;

/// What a side's verification did to the whole link.
#[derive(Debug, PartialEq, Eq)]
pub enum Became {
    /// Nothing the operator needs to hear.
    Same,
    /// Up for the first time.
    Connected,
    /// Up again after an outage.
    Back,
}

/// The link's state, shared by the two helper threads and read by the loop without locks.
/// Each side's bit says its connection was seen working since the last failure of either.
#[derive(Default)]
pub struct Link(AtomicU8);

impl Link {
    pub fn state(&self) -> LinkState {
        let v = self.0.load(Ordering::Acquire);
        if v & BOTH == BOTH {
            LinkState::Up
        } else if v & DOWN != 0 {
            LinkState::Down
        } else {
            LinkState::Connecting
        }
    }

    pub fn is_up(&self) -> bool {
        self.state() == LinkState::Up
    }

    /// `side` must (re)connect or check its connection before the link can be up.
    pub fn needs(&self, side: Side) -> bool {
        self.0.load(Ordering::Acquire) & side as u8 == 0
    }

    /// A side lost Redis or could not reach it: the link is down and both sides must verify
    /// again. True if this begins an outage (the caller logs it; later failures are quiet).
    pub fn fail(&self) -> bool {
        let prev = self
            .0
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |v| {
                Some((v & !BOTH) | DOWN)
            })
            .expect("the update always applies");
        prev & DOWN == 0
    }

    /// `side` has a working connection. Exactly one of two sides completing the link at the
    /// same time hears that it did.
    pub fn verified(&self, side: Side) -> Became {
        let prev = self.0.fetch_or(side as u8, Ordering::AcqRel);
        if prev & BOTH == BOTH || (prev | side as u8) & BOTH != BOTH {
            return Became::Same;
        }
        // This call completed the link; a failure in between leaves it down (and quiet).
        match self
            .0
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |v| {
                (v & BOTH == BOTH).then_some((v & !DOWN) | WAS_UP)
            }) {
            Ok(p) if p & DOWN != 0 => Became::Back,
            Ok(p) if p & WAS_UP == 0 => Became::Connected,
            _ => Became::Same,
        }
    }
}

/// Retry delays: 100 ms, doubling to 5 s; back to the start after a success.
fn retry_backoff() -> Backoff {
    Backoff::new(MIN_BACKOFF, MAX_BACKOFF)
}

/// What the helper threads and the loop share.
struct Shared {
    link: Link,
    /// The loop has been woken and not yet taken what is waiting.
    pending: AtomicBool,
    /// Payload bytes waiting for the publisher, and for the loop.
    out_bytes: Budget,
    in_bytes: Budget,
    /// Messages published, and those dropped by the helper threads (Redis down, loop's
    /// queue full, undecodable).
    sent: AtomicU64,
    dropped: AtomicU64,
    /// Topic channels the subscriber is on, as Redis confirmed: equal to the worker's topics
    /// once routing has caught up with its subscriptions.
    routed: AtomicUsize,
    /// For logs, without a password.
    url: String,
    /// The subscriber's channels, for the log.
    channels: String,
}

/// What became of a message for the loop.
enum HandedOver {
    Yes,
    /// The loop is not keeping up: its queue (or its byte budget) is full.
    Full,
    LoopGone,
}

impl Shared {
    /// Queues `item` for the loop and wakes it, if it is not woken already.
    fn hand_over(&self, to: &SyncSender<Received>, waker: &Waker, item: Received) -> HandedOver {
        let n = item.2;
        if !self.in_bytes.take(n) {
            return HandedOver::Full;
        }
        if let Err(e) = to.try_send(item) {
            self.in_bytes.give_back(n);
            return match e {
                TrySendError::Disconnected(_) => HandedOver::LoopGone,
                TrySendError::Full(_) => HandedOver::Full,
            };
        }
        if !self.pending.swap(true, Ordering::SeqCst) {
            let _ = waker.wake();
        }
        HandedOver::Yes
    }

    fn failed(&self, side: Side, e: &RedisError) {
        if self.link.fail() {
            log::warn!("bus: redis unavailable at {}: {e}; retrying", self.url);
        } else {
            log::debug!("bus: {side:?} to {}: {e}", self.url);
        }
    }

    fn verified(&self, side: Side) {
        match self.link.verified(side) {
            Became::Same => {}
            Became::Connected => {
                log::info!("bus: on redis at {}, channels {}", self.url, self.channels)
            }
            Became::Back => log::info!("bus: redis back at {}", self.url),
        }
    }
}

/// Bytes held by one of the queues, kept under [`QUEUE_BYTES`].
#[derive(Default)]
struct Budget(AtomicUsize);

impl Budget {
    /// Takes `n` bytes; false (nothing taken) if that would go over the limit.
    fn take(&self, n: usize) -> bool {
        self.0
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |held| {
                (held + n <= QUEUE_BYTES).then_some(held + n)
            })
            .is_ok()
    }

    fn give_back(&self, n: usize) {
        self.0.fetch_sub(n, Ordering::AcqRel);
    }
}

/// What the loop hands the publisher thread.
enum Outgoing {
    /// An encoded bus message for a channel.
    Publish { to: Target, bytes: Vec<u8> },
    /// A change to the worker's presence and user records (`directory`).
    Record(Record),
    /// A question for the records: every live worker's entries for a topic or user. The
    /// answer comes back to the loop as a [`BusMessage::Answer`] to `id`.
    Lookup { id: u32, kind: Kind, name: String },
    /// Answer `id` (`null`) once everything queued before is in Redis, or dropped.
    Flush(u32),
}

/// A message from another host for the loop, and its size on the wire.
type Received = (Origin, BusMessage, usize);

/// A worker's side of the cluster bus, held by its loop.
pub(crate) struct Cluster {
    out: SyncSender<Outgoing>,
    incoming: Receiver<Received>,
    /// Topic channels to join or leave, for the subscriber thread. Unbounded: a change is one
    /// per topic a worker gains or loses, and the thread takes them every few milliseconds.
    interest: mpsc::Sender<Interest>,
    shared: Arc<Shared>,
}

impl Cluster {
    /// Starts the helper threads of worker `origin`. Call in the worker process: the master
    /// forks, so it must never have threads. `token` is the loop's token for the waker.
    pub fn start(
        settings: ClusterSettings,
        origin: Origin,
        registry: &Registry,
        token: Token,
    ) -> std::io::Result<Cluster> {
        let client = Client::open(settings.url.0.as_str())
            .map_err(|e| std::io::Error::other(format!("bus address: {e}")))?;
        let waker = Arc::new(Waker::new(registry, token)?);
        let channels = vec![
            channel_all(&settings.group),
            channel_of(&settings.group, origin.host, origin.slot),
            channel_of_marks(&settings.group, origin.host),
        ];
        let shared = Arc::new(Shared {
            link: Link::default(),
            pending: AtomicBool::new(false),
            out_bytes: Budget::default(),
            in_bytes: Budget::default(),
            sent: AtomicU64::new(0),
            dropped: AtomicU64::new(0),
            routed: AtomicUsize::new(0),
            url: settings.url.redacted(),
            channels: channels.join(", "),
        });
        let (out, out_rx) = mpsc::sync_channel(QUEUE);
        let (in_tx, incoming) = mpsc::sync_channel(QUEUE);
        let (interest, interest_rx) = mpsc::channel();
        let subscriber = Subscriber {
            client: client.clone(),
            channels,
            group: settings.group.clone(),
            topics: std::collections::HashSet::new(),
            interest: interest_rx,
            host: origin.host,
            shared: shared.clone(),
            to_loop: in_tx.clone(),
            waker: waker.clone(),
            marks: out.clone(),
            origin,
        };
        let publisher = Publisher {
            client,
            group: settings.group,
            origin,
            shared: shared.clone(),
            from_loop: out_rx,
            to_loop: in_tx,
            waker,
        };
        std::thread::Builder::new()
            .name("bus-subscriber".into())
            .spawn(move || subscriber.run())?;
        std::thread::Builder::new()
            .name("bus-publisher".into())
            .spawn(move || publisher.run())?;
        Ok(Cluster {
            out,
            incoming,
            interest,
            shared,
        })
    }

    /// The worker gained its first subscriber to a topic, or lost its last.
    pub fn interest(&self, change: Interest) {
        // Fails only when the thread is gone, with the worker.
        let _ = self.interest.send(change);
    }

    /// Asks for a [`BusMessage::Mark`] with `token` on this host's marks channel, after the
    /// topics asked for before it are routed here. Lost (quietly) if Redis is not reachable meanwhile.
    pub fn mark(&self, token: u64) {
        let _ = self.interest.send(Interest::Mark(token));
    }

    /// Queues an encoded message for Redis. False when it is dropped: the link is not up, or
    /// the publisher is that far behind. Never blocks.
    pub fn send(&self, to: Target, bytes: Vec<u8>) -> bool {
        let n = bytes.len();
        if !self.shared.link.is_up() || !self.shared.out_bytes.take(n) {
            return false;
        }
        match self.out.try_send(Outgoing::Publish { to, bytes }) {
            Ok(()) => true,
            Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => {
                self.shared.out_bytes.give_back(n);
                false
            }
        }
    }

    /// Queues a change to the worker's records. False when it is dropped (the link is not
    /// up, or the publisher is that far behind): the worker writes everything again once the
    /// link is back.
    pub fn record(&self, rec: Record) -> bool {
        self.shared.link.is_up() && self.out.try_send(Outgoing::Record(rec)).is_ok()
    }

    /// Asks the records for a topic's or user's entries, cluster-wide; the answer comes back
    /// as an `Answer` to `id`. False when it cannot be asked now (the link is not up).
    pub fn lookup(&self, id: u32, kind: Kind, name: &str) -> bool {
        let ask = Outgoing::Lookup {
            id,
            kind,
            name: name.to_string(),
        };
        self.shared.link.is_up() && self.out.try_send(ask).is_ok()
    }

    /// Asks for an `Answer` to `id` once Redis has taken every message this worker queued
    /// before (or they were dropped): from then on, a message any worker sends reaches Redis
    /// after them. False when no answer will come (the link is not up).
    pub fn flush(&self, id: u32) -> bool {
        self.shared.link.is_up() && self.out.try_send(Outgoing::Flush(id)).is_ok()
    }

    /// Every message the subscriber has handed over since the loop was last woken.
    pub fn receive(&self) -> Vec<(Origin, BusMessage)> {
        // Cleared before draining: a message queued after the last try_recv wakes us again.
        self.shared.pending.store(false, Ordering::SeqCst);
        let mut got = Vec::new();
        let mut bytes = 0;
        while let Ok((origin, msg, n)) = self.incoming.try_recv() {
            got.push((origin, msg));
            bytes += n;
        }
        self.shared.in_bytes.give_back(bytes);
        got
    }

    pub fn state(&self) -> LinkState {
        self.shared.link.state()
    }

    /// Topic channels this worker's subscriber is on in Redis.
    pub fn routed_topics(&self) -> usize {
        self.shared.routed.load(Ordering::Relaxed)
    }

    /// Messages published to Redis, and dropped by the helper threads.
    pub fn counts(&self) -> (u64, u64) {
        (
            self.shared.sent.load(Ordering::Relaxed),
            self.shared.dropped.load(Ordering::Relaxed),
        )
    }
}

/// The thread that listens to the worker's channels.
struct Subscriber {
    client: Client,
    /// The channels it always listens to.
    channels: Vec<String>,
    group: String,
    /// The topics with local subscribers: their channels are listened to too.
    topics: std::collections::HashSet<String>,
    interest: mpsc::Receiver<Interest>,
    host: u64,
    shared: Arc<Shared>,
    to_loop: SyncSender<Received>,
    waker: Arc<Waker>,
    /// The publisher's queue, for marks, and what they carry.
    marks: SyncSender<Outgoing>,
    origin: Origin,
}

/// Why the subscriber's connection ended.
enum Ended {
    Failed(RedisError),
    /// The worker's loop is gone: the thread ends.
    LoopGone,
}

impl Subscriber {
    fn run(mut self) {
        let mut backoff = retry_backoff();
        loop {
            let ended = match self.connect() {
                Ok(mut con) => self.listen(&mut con, &mut backoff),
                Err(e) => Ended::Failed(e),
            };
            self.shared.routed.store(0, Ordering::Relaxed);
            match ended {
                Ended::LoopGone => return,
                Ended::Failed(e) => self.shared.failed(Side::Subscriber, &e),
            }
            std::thread::sleep(backoff.next_delay());
        }
    }

    fn connect(&self) -> redis::RedisResult<Connection> {
        let con = self.client.get_connection_with_timeout(IO_TIMEOUT)?;
        con.set_write_timeout(Some(IO_TIMEOUT))?;
        con.set_read_timeout(Some(IO_TIMEOUT))?;
        Ok(con)
    }

    /// Subscribes and carries messages to the loop until the connection fails. The backoff
    /// starts over once subscribed.
    fn listen(&mut self, con: &mut Connection, backoff: &mut Backoff) -> Ended {
        let mut ps = con.as_pubsub();
        // What came while disconnected is in the set: every channel is subscribed afresh,
        // and then the marks asked for meanwhile go.
        let first = self.take_interest();
        let topics: Vec<String> = (self.topics.iter())
            .map(|t| channel_of_topic(&self.group, t))
            .collect();
        if let Err(e) = ps.subscribe(&self.channels[..]) {
            return Ended::Failed(e);
        }
        if !topics.is_empty()
            && let Err(e) = ps.subscribe(&topics[..])
        {
            return Ended::Failed(e);
        }
        self.shared.routed.store(topics.len(), Ordering::Relaxed);
        for change in first {
            if let Interest::Mark(token) = change {
                self.publish_mark(token);
            }
        }
        // Short reads from here on, so the thread notices a failure seen by the publisher,
        // and the topics to join or leave.
        if let Err(e) = ps.set_read_timeout(Some(SUBSCRIBE_DELAY)) {
            return Ended::Failed(e);
        }
        backoff.reset();
        self.shared.verified(Side::Subscriber);
        let mut heard = Instant::now();
        loop {
            let changes = self.take_interest();
            if !changes.is_empty() {
                // Redis answers a (un)subscribe in its own time: the short timeout is for
                // waiting on messages, and a slow answer is no outage.
                let _ = ps.set_read_timeout(Some(IO_TIMEOUT));
            }
            // Runs of joins, and of leaves, go as one command each: a mark waits for them.
            for run in changes.chunk_by(same_kind) {
                let channels = || run.iter().filter_map(|c| c.topic());
                let channels: Vec<String> = channels()
                    .map(|t| channel_of_topic(&self.group, t))
                    .collect();
                let done = match &run[0] {
                    Interest::Join(_) => ps.subscribe(&channels[..]),
                    Interest::Leave(_) => ps.unsubscribe(&channels[..]),
                    Interest::Mark(_) => {
                        for change in run {
                            if let Interest::Mark(token) = change {
                                self.publish_mark(*token);
                            }
                        }
                        Ok(())
                    }
                };
                if let Err(e) = done {
                    return Ended::Failed(e);
                }
                self.shared
                    .routed
                    .store(self.topics.len(), Ordering::Relaxed);
            }
            if !changes.is_empty() {
                let _ = ps.set_read_timeout(Some(SUBSCRIBE_DELAY));
            }
            match ps.get_message() {
                Ok(msg) => {
                    heard = Instant::now();
                    // A message is proof enough that this side works, after the publisher's
                    // failure too.
                    if self.shared.link.needs(Side::Subscriber) {
                        self.shared.verified(Side::Subscriber);
                    }
                    if !self.deliver(msg.get_payload_bytes()) {
                        return Ended::LoopGone;
                    }
                }
                Err(e) if e.is_timeout() => {
                    let suspect = self.shared.link.needs(Side::Subscriber);
                    if suspect || heard.elapsed() >= KEEPALIVE {
                        let _ = ps.set_read_timeout(Some(IO_TIMEOUT));
                        if let Err(e) = ps.ping::<redis::Value>() {
                            return Ended::Failed(e);
                        }
                        let _ = ps.set_read_timeout(Some(SUBSCRIBE_DELAY));
                        heard = Instant::now();
                        if suspect {
                            self.shared.verified(Side::Subscriber);
                        }
                    }
                }
                Err(e) => return Ended::Failed(e),
            }
        }
    }

    /// The changes the loop sent, applied to the set of topics; returns those that change
    /// the set (a join and a leave of one topic cancel out).
    fn take_interest(&mut self) -> Vec<Interest> {
        let topics = &mut self.topics;
        let mut out = Vec::new();
        while let Ok(change) = self.interest.try_recv() {
            let changed = match &change {
                Interest::Join(t) => topics.insert(t.clone()),
                Interest::Leave(t) => topics.remove(t),
                Interest::Mark(_) => true,
            };
            if changed {
                out.push(change);
            }
        }
        out
    }

    /// Queues a mark for the publisher: the (un)subscribes before it have been answered, so
    /// Redis has them before it. A mark that cannot go is lost: the workers waiting for it
    /// go on after [`crate::bus::crossing::WAIT`].
    fn publish_mark(&self, token: u64) {
        let bytes = wire::encode(self.origin, &BusMessage::Mark(token));
        let n = bytes.len();
        let lost = || log::warn!("bus: the publisher is too far behind to take a handoff's mark");
        if !self.shared.out_bytes.take(n) {
            return lost();
        }
        let to = Target::Marks { host: self.host };
        if self
            .marks
            .try_send(Outgoing::Publish { to, bytes })
            .is_err()
        {
            self.shared.out_bytes.give_back(n);
            lost();
        }
    }

    /// Hands one received payload to the loop. False when the loop is gone.
    fn deliver(&self, payload: &[u8]) -> bool {
        // The local mesh has already carried this host's own messages, and a mark is for the
        // host that sent it only.
        let own = wire::origin_of(payload).is_ok_and(|o| o.host == self.host);
        if own != wire::is_mark(payload) {
            return true;
        }
        let (origin, msg) = match wire::decode(payload) {
            Ok(m) => m,
            Err(e) => {
                self.shared.dropped.fetch_add(1, Ordering::Relaxed);
                log::warn!("bus: from redis: {e}");
                return true;
            }
        };
        let n = payload.len();
        let behind = || {
            self.shared.dropped.fetch_add(1, Ordering::Relaxed);
            log::debug!("bus: the worker is not keeping up with redis; a message is dropped");
        };
        match self
            .shared
            .hand_over(&self.to_loop, &self.waker, (origin, msg, n))
        {
            HandedOver::Yes => true,
            HandedOver::LoopGone => false,
            HandedOver::Full => {
                behind();
                true
            }
        }
    }
}

/// The thread that publishes what the loop queues, and writes and reads its records.
struct Publisher {
    client: Client,
    group: String,
    origin: Origin,
    shared: Arc<Shared>,
    from_loop: Receiver<Outgoing>,
    /// For the answers to lookups.
    to_loop: SyncSender<Received>,
    waker: Arc<Waker>,
}

impl Publisher {
    fn run(self) {
        let mut con: Option<Connection> = None;
        let mut backoff = retry_backoff();
        let mut retry_at = Instant::now();
        loop {
            let now = Instant::now();
            if self.shared.link.needs(Side::Publisher) && now >= retry_at {
                match self.check(&mut con) {
                    Ok(()) => {
                        backoff.reset();
                        self.shared.verified(Side::Publisher);
                    }
                    Err(e) => {
                        con = None;
                        self.shared.failed(Side::Publisher, &e);
                        retry_at = now + backoff.next_delay();
                    }
                }
            }
            let first = match self.from_loop.recv_timeout(TICK) {
                Ok(m) => m,
                Err(RecvTimeoutError::Timeout) => continue,
                Err(RecvTimeoutError::Disconnected) => return,
            };
            let mut batch = vec![first];
            while batch.len() < BATCH {
                match self.from_loop.try_recv() {
                    Ok(m) => batch.push(m),
                    Err(TryRecvError::Empty | TryRecvError::Disconnected) => break,
                }
            }
            let n = batch
                .iter()
                .filter(|m| matches!(m, Outgoing::Publish { .. }))
                .count() as u64;
            let bytes: usize = batch
                .iter()
                .map(|m| match m {
                    Outgoing::Publish { bytes, .. } => bytes.len(),
                    _ => 0,
                })
                .sum();
            self.shared.out_bytes.give_back(bytes);
            let usable = con
                .as_mut()
                .filter(|_| !self.shared.link.needs(Side::Publisher));
            let Some(c) = usable else {
                self.shared.dropped.fetch_add(n, Ordering::Relaxed);
                self.answer(&batch, None);
                continue;
            };
            let result = self.publish(c, &batch).or_else(|e| {
                // A connection Redis closed while it was idle (`timeout`, `CLIENT KILL`) fails
                // only when used: a fresh one gets a second try before this is an outage.
                // (Should Redis drop it in the middle of a batch, the retry may repeat part
                // of the batch; that takes Redis failing within the batch's round trip.)
                log::debug!("bus: publishing to {}: {e}; reconnecting", self.shared.url);
                con = None;
                self.check(&mut con)?;
                self.publish(con.as_mut().expect("just connected"), &batch)
            });
            match result {
                Ok(unheard) => {
                    self.shared.sent.fetch_add(n - unheard, Ordering::Relaxed);
                    self.shared.dropped.fetch_add(unheard, Ordering::Relaxed);
                    self.answer(&batch, con.as_mut());
                }
                Err(e) => {
                    self.shared.dropped.fetch_add(n, Ordering::Relaxed);
                    con = None;
                    self.shared.failed(Side::Publisher, &e);
                    retry_at = Instant::now() + backoff.next_delay();
                    self.answer(&batch, None);
                }
            }
        }
    }

    /// Hands the loop the answers the batch wants, once its messages are in Redis or
    /// dropped: each lookup's records, as a JSON list, or `{"error": ...}` when Redis cannot
    /// say (`con` none); each flush's `null`.
    fn answer(&self, batch: &[Outgoing], mut con: Option<&mut Connection>) {
        for m in batch {
            let (id, answer) = match m {
                Outgoing::Lookup { id, kind, name } => match con.as_deref_mut() {
                    Some(c) => match directory::read(c, &self.group, *kind, name) {
                        Ok(entries) => (id, entries_json(entries)),
                        Err(e) => (id, serde_json::json!({ "error": format!("redis: {e}") })),
                    },
                    None => (id, serde_json::json!({ "error": "redis unavailable" })),
                },
                Outgoing::Flush(id) => (id, serde_json::Value::Null),
                Outgoing::Publish { .. } | Outgoing::Record(_) => continue,
            };
            let body = bytes::Bytes::from(answer.to_string());
            let n = body.len();
            let item = (self.origin, BusMessage::Answer(*id, body), n);
            if let HandedOver::Full = self.shared.hand_over(&self.to_loop, &self.waker, item) {
                log::debug!("bus: the worker is not keeping up; an answer is dropped");
            }
        }
    }

    /// Makes sure there is a working connection: `PING` on the one there is, else a new one.
    fn check(&self, con: &mut Option<Connection>) -> redis::RedisResult<()> {
        if let Some(c) = con.as_mut()
            && redis::cmd("PING").exec(c).is_ok()
        {
            return Ok(());
        }
        *con = None;
        let mut c = self.client.get_connection_with_timeout(IO_TIMEOUT)?;
        c.set_write_timeout(Some(IO_TIMEOUT))?;
        c.set_read_timeout(Some(IO_TIMEOUT))?;
        redis::cmd("PING").exec(&mut c)?;
        *con = Some(c);
        Ok(())
    }

    /// Publishes a batch, and writes its records, in one round trip. Returns how many
    /// messages for one worker found nobody listening (its host or worker has gone): those
    /// count as dropped.
    fn publish(&self, con: &mut Connection, batch: &[Outgoing]) -> redis::RedisResult<u64> {
        if !(batch.iter()).any(|m| matches!(m, Outgoing::Publish { .. } | Outgoing::Record(_))) {
            return Ok(0); // Nothing to write: an empty pipeline is an error to Redis.
        }
        let mut pipe = redis::pipe();
        let mut to_one = Vec::new();
        for m in batch {
            match m {
                Outgoing::Publish { to, bytes } => {
                    pipe.cmd("PUBLISH")
                        .arg(to.channel(&self.group))
                        .arg(&bytes[..]);
                    to_one.push(matches!(to, Target::Worker { .. }));
                }
                Outgoing::Record(rec) => directory::write(&mut pipe, &self.group, self.origin, rec),
                Outgoing::Lookup { .. } | Outgoing::Flush(_) => {}
            }
        }
        let listeners: Vec<i64> = pipe.query(con)?;
        Ok(to_one
            .iter()
            .zip(listeners)
            .filter(|(one, n)| **one && *n == 0)
            .count() as u64)
    }
}

/// Directory entries as presence shows them: `[{"conn": id, ...the entry's fields}]`.
fn entries_json(entries: Vec<(String, String)>) -> serde_json::Value {
    let rows = entries
        .into_iter()
        .map(|(conn, value)| {
            let mut row = match serde_json::from_str::<serde_json::Value>(&value) {
                Ok(serde_json::Value::Object(o)) => o,
                _ => serde_json::Map::new(),
            };
            row.insert("conn".into(), conn.into());
            serde_json::Value::Object(row)
        })
        .collect();
    serde_json::Value::Array(rows)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn channel_names() {
        assert_eq!(channel_all("chat"), "wsd:chat:all");
        assert_eq!(
            channel_of("chat", 0x3f2a_9c0d_11e8_7b45, 2),
            "wsd:chat:3f2a9c0d11e87b45:2"
        );
        assert_eq!(channel_of("g", 1, 0), "wsd:g:0000000000000001:0");
        assert_eq!(Target::All.channel("g"), "wsd:g:all");
        assert_eq!(
            Target::Topic("room/1".into()).channel("g"),
            "wsd:g:t:room/1"
        );
        assert_eq!(
            Target::Worker { host: 255, slot: 7 }.channel("g"),
            "wsd:g:00000000000000ff:7"
        );
    }

    #[test]
    fn the_link_is_up_only_when_both_sides_are_verified() {
        let link = Link::default();
        assert_eq!(link.state(), LinkState::Connecting);
        assert!(link.needs(Side::Subscriber) && link.needs(Side::Publisher));
        assert_eq!(link.verified(Side::Subscriber), Became::Same);
        assert_eq!(link.state(), LinkState::Connecting);
        assert_eq!(link.verified(Side::Publisher), Became::Connected);
        assert_eq!(link.state(), LinkState::Up);
        // Verifying again changes nothing.
        assert_eq!(link.verified(Side::Publisher), Became::Same);
        assert!(!link.needs(Side::Publisher));
    }

    #[test]
    fn an_outage_is_reported_once_and_its_end_once() {
        let link = Link::default();
        link.verified(Side::Subscriber);
        link.verified(Side::Publisher);
        assert!(link.fail(), "the first failure begins the outage");
        assert!(!link.fail(), "the other side's failure is the same outage");
        assert_eq!(link.state(), LinkState::Down);
        // Both sides must verify again, even the one that did not fail.
        assert!(link.needs(Side::Subscriber) && link.needs(Side::Publisher));
        assert_eq!(link.verified(Side::Publisher), Became::Same);
        assert_eq!(link.state(), LinkState::Down);
        // A failed retry clears the publisher's fresh check too.
        assert!(!link.fail());
        assert!(link.needs(Side::Publisher));
        assert_eq!(link.verified(Side::Subscriber), Became::Same);
        assert_eq!(link.verified(Side::Publisher), Became::Back);
        assert_eq!(link.state(), LinkState::Up);
        assert!(link.fail(), "a new outage");
    }

    #[test]
    fn failing_before_ever_connecting_is_an_outage() {
        let link = Link::default();
        assert!(link.fail());
        assert_eq!(link.state(), LinkState::Down);
        link.verified(Side::Subscriber);
        assert_eq!(link.verified(Side::Publisher), Became::Back);
    }

    #[test]
    fn two_sides_completing_at_once_report_once() {
        for _ in 0..200 {
            let link = Arc::new(Link::default());
            assert!(link.fail());
            let l2 = link.clone();
            let t = std::thread::spawn(move || l2.verified(Side::Publisher));
            let a = link.verified(Side::Subscriber);
            let b = t.join().unwrap();
            let backs = [a, b].iter().filter(|c| **c == Became::Back).count();
            assert_eq!(backs, 1);
        }
    }

    #[test]
    fn queues_are_bounded_by_bytes_too() {
        let b = Budget::default();
        assert!(b.take(QUEUE_BYTES - 10));
        assert!(!b.take(11), "over the limit: nothing taken");
        assert!(b.take(10));
        b.give_back(QUEUE_BYTES);
        assert!(b.take(QUEUE_BYTES));
    }
}
