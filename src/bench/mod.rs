//! `wsd bench`: a WebSocket load generator in the same binary, modelled on uWebSockets'
//! `benchmarks/load_test.c`.
//!
//! It speaks plain RFC 6455 as a client, so it measures any server, not only wsd. It is built
//! so that the client is not what limits the figures: one mio loop per process, a constant
//! upgrade request, frames built and masked once, replies scanned rather than decoded, and no
//! allocation per message. RLIMIT_NOFILE caps the files a process may open, so the
//! connections are split over as many client processes ("shards", see [`shard`]) as it takes;
//! a coordinator (this process) starts them together, prints a progress line each second and
//! sums their results.
//!
//! - `echo`: K messages in flight per connection; msgs/s, MB/s and round-trip latency.
//! - `connect`: a burst of N upgrades, then connect/upgrade/close cycles; handshakes/s.
//! - `idle`: N connections that echo once and sit; the server's memory per connection (and,
//!   with `--again-when`, whether they still echo after whatever was done to the server).
//! - `latency`: open loop at a fixed rate, timed from the schedule; latency percentiles.
//! - `broadcast`: N subscribers and one open-loop publisher; deliveries/s, missing deliveries
//!   and delivery latency.
//! - `api`: N subscribers on one or two hosts and a backend publishing through an HTTP API
//!   (wsd's, or socket.io's emitter behind one); publishes/s, deliveries/s, missing deliveries
//!   and publish→delivery latency.
//!
//! Given the server's pids (`--pid`, or `--config` to ask a wsd for them), every mode also
//! reports the CPU time the server spent while it measured ([`server`]), and each mode
//! reports the CPU time of its own client processes, so a figure the client limited shows.
//!
//! Every mode runs over TLS too (`--tls`, or a `wss://` URL; [`tls`]), and with
//! permessage-deflate offered (`--deflate`; [`deflate`]), reporting what was agreed and the
//! compression ratio. `--payload json` sends chat events in JSON instead of letters
//! ([`payload`]).

mod api;
mod broadcast;
mod client;
mod connect;
mod coordinator;
mod deflate;
mod echo;
mod http;
mod idle;
mod latency;
mod payload;
mod publisher;
mod report;
mod server;
mod shard;
mod socketio;
mod tls;
pub(crate) mod wire;

use clap::{Args, Subcommand, ValueEnum};
use server::ServerArgs;
use std::fmt;
use std::net::{SocketAddr, ToSocketAddrs};
use std::path::PathBuf;
use std::time::Instant;

/// `wsd bench ...`
#[derive(Args, Debug, Clone)]
pub struct BenchArgs {
    #[command(subcommand)]
    mode: Mode,
}

#[derive(Subcommand, Debug, Clone)]
enum Mode {
    /// Echo round trips: K text messages in flight on each connection
    Echo {
        #[command(flatten)]
        common: Common,
        #[command(flatten)]
        window: Window,
        /// Payload bytes of each message
        #[arg(long, default_value_t = 32)]
        size: usize,
        /// Messages in flight per connection
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=4096))]
        depth: u32,
    },
    /// Handshakes: a burst of N upgrades, then connect/upgrade/close cycles for --secs
    Connect {
        #[command(flatten)]
        common: Common,
        /// Seconds of sustained cycles after the burst (0: the burst only)
        #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u64).range(0..=86_400))]
        secs: u64,
        /// Connections cycling at once in the sustained phase
        #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u32).range(1..=100_000))]
        slots: u32,
    },
    /// Memory: N connections echo once each and are held; the server's memory per connection
    Idle {
        #[command(flatten)]
        common: Common,
        /// Seconds to hold every connection open before the server's memory is read
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..=86_400))]
        hold: u64,
        /// Payload bytes of the one echo message
        #[arg(long, default_value_t = 32)]
        size: usize,
        /// After the hold, keep every connection until FILE exists, then have each echo once
        /// more: how many answer, and how many the server closed in between, show whether
        /// connections survive what was done to the server meanwhile (a reload, say)
        #[arg(long, value_name = "FILE")]
        again_when: Option<PathBuf>,
    },
    /// Open-loop latency: R messages a second over N connections, timed from the schedule
    Latency {
        #[command(flatten)]
        common: Common,
        #[command(flatten)]
        window: Window,
        /// Messages per second in all (on a fixed schedule, whatever the server does)
        #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u64).range(1..=10_000_000))]
        rate: u64,
        /// Payload bytes of each message
        #[arg(long, default_value_t = 32)]
        size: usize,
        /// Poll without sleeping between scheduled sends, for a client with a core of its own.
        /// In a VM, arming a timer and being woken by one each cost a trap to the hypervisor
        /// (10 µs and more here); they make the client late, and its lateness counts as latency
        /// (see `late`), whatever the server does.
        #[arg(long)]
        spin: bool,
    },
    /// Fan-out: N subscribers read what one publisher sends R times a second
    Broadcast {
        #[command(flatten)]
        common: Common,
        #[command(flatten)]
        window: Window,
        /// Messages the publisher sends per second (open loop, on a fixed schedule)
        #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
        rate: u64,
        /// The server's protocol: `chat` relays every text message to everyone, `pubsub` takes
        /// {"subscribe":T} and {"publish":T,"data":X}
        #[arg(long, value_enum, default_value_t = App::Chat)]
        app: App,
        /// The pubsub topic
        #[arg(long, default_value = "bench")]
        topic: String,
        /// Payload bytes of each message: 0 for the timestamp alone (`--payload text`), or a
        /// JSON document of about this size around it (`--payload json`; 2048 if 0)
        #[arg(long, default_value_t = 0)]
        size: usize,
    },
    /// Backend publishes: N subscribers on one or more hosts, a publisher calling an HTTP API
    Api(Box<ApiArgs>),
}

/// `wsd bench api ...`
#[derive(Args, Debug, Clone)]
struct ApiArgs {
    /// A host's WebSocket URL; once per host (subscribers are split evenly). A socket.io URL
    /// without a path gets /socket.io/?EIO=4&transport=websocket
    #[arg(long = "url", required = true, value_name = "URL")]
    urls: Vec<String>,
    /// Subscribers, over all hosts
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    conns: u32,
    /// The HTTP API to publish to: http://HOST:PORT (one host's)
    #[arg(long, value_name = "URL")]
    api: String,
    /// The API's path for a publish
    #[arg(long, default_value = "/api/publish")]
    api_path: String,
    /// The API key, sent as `Authorization: Bearer KEY`
    #[arg(long, env = "WSD_API_KEY", default_value = "", hide_env_values = true)]
    key: String,
    /// Publishes per second (open loop, on a fixed schedule)
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u64).range(1..=10_000_000))]
    rate: u64,
    /// Publish as fast as the API takes them (--depth in flight per connection), not at --rate
    #[arg(long)]
    flat: bool,
    /// Flat out: requests in flight per HTTP connection
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u32).range(1..=4096))]
    depth: u32,
    /// Keep-alive HTTP connections the publisher uses
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u32).range(1..=64))]
    http_conns: u32,
    /// Topics: subscriber i joins topic i % T, publish j goes to topic j % T (each publish
    /// reaches about conns/T subscribers)
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    topics: u32,
    /// Topics are named PREFIX-0, PREFIX-1, ...
    #[arg(long, default_value = "bench")]
    topic_prefix: String,
    /// The subscribers' protocol: wsd's pubsub app, or socket.io (Engine.IO v4 over
    /// WebSocket, rooms joined with a `join` event, publishes as `m` events)
    #[arg(long, value_enum, default_value_t = api::Protocol::Wsd)]
    protocol: api::Protocol,
    /// Another host's wsd config: its master and workers count in the server's CPU too
    /// (with --config for the first host)
    #[arg(long = "host-config", value_name = "FILE")]
    host_configs: Vec<std::path::PathBuf>,
    /// Redis's pid: its CPU time is reported apart from the server's
    #[arg(long, value_name = "PID[,PID...]", value_delimiter = ',')]
    redis_pid: Vec<i32>,
    /// A backend that publishes for the server (socket.io's emitter): its CPU time is
    /// reported apart
    #[arg(long, value_name = "PID[,PID...]", value_delimiter = ',')]
    backend_pid: Vec<i32>,
    #[command(flatten)]
    window: Window,
    /// Print one JSON object at the end instead of the table
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    server: ServerArgs,
}

#[derive(Args, Debug, Clone)]
struct Common {
    /// The server to load: ws://HOST:PORT/PATH, or wss:// (TLS)
    #[arg(long, default_value = "ws://127.0.0.1:2346/")]
    url: String,
    /// Connect with TLS (a wss:// URL implies it; a ws:// URL's port is kept)
    #[arg(long)]
    tls: bool,
    /// With TLS: accept any certificate and skip the handshake signature's check (for
    /// self-signed test certificates; the server's work is the same)
    #[arg(long)]
    insecure: bool,
    /// Offer permessage-deflate (`permessage-deflate; client_max_window_bits`, as browsers
    /// do); send compressed frames and inflate compressed ones where it is agreed
    #[arg(long)]
    deflate: bool,
    /// What messages carry: `text` (a-z repeated) or `json` (chat events, 128 variants of
    /// exactly --size bytes, at least 160)
    #[arg(long, value_enum, default_value_t = payload::Kind::Text)]
    payload: payload::Kind,
    /// Connections (broadcast: subscribers, the publisher is one more; connect: the burst)
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    conns: u32,
    /// Print one JSON object at the end instead of the table
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    server: ServerArgs,
}

#[derive(Args, Debug, Clone)]
struct Window {
    /// Seconds to measure, once every connection is up
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=86_400))]
    secs: u64,
}

/// The server-side protocol a broadcast run speaks.
#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum App {
    Chat,
    Pubsub,
}

impl fmt::Display for App {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            App::Chat => "chat",
            App::Pubsub => "pubsub",
        })
    }
}

/// Where to connect: the address, plus what goes in the upgrade request, and how.
#[derive(Debug, Clone)]
pub struct Target {
    pub addr: SocketAddr,
    pub host: String,
    pub path: String,
    /// The URL was `wss://`.
    pub wss: bool,
    /// TLS, when the run connects with it.
    pub tls: Option<tls::Client>,
    /// permessage-deflate is offered.
    pub deflate: bool,
}

impl Target {
    /// Parses `ws://HOST[:PORT][/PATH]` or `wss://...` (port 80 or 443 when none is given);
    /// TLS and compression are set by the caller.
    pub fn parse(url: &str) -> Result<Target, BenchError> {
        let bad = |why: &str| BenchError::Url(format!("{url}: {why}"));
        let (wss, rest) = match (url.strip_prefix("ws://"), url.strip_prefix("wss://")) {
            (Some(rest), _) => (false, rest),
            (_, Some(rest)) => (true, rest),
            _ => return Err(bad("only ws:// and wss:// URLs")),
        };
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, "/"),
        };
        if authority.is_empty() {
            return Err(bad("no host"));
        }
        let has_port = authority
            .rsplit_once(':')
            .is_some_and(|(_, p)| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()));
        let with_port = if has_port {
            authority.to_string()
        } else {
            format!("{authority}:{}", if wss { 443 } else { 80 })
        };
        let addr = with_port
            .to_socket_addrs()
            .map_err(|e| bad(&e.to_string()))?
            .next()
            .ok_or_else(|| bad("resolves to no address"))?;
        let host = with_port
            .rsplit_once(':')
            .map_or("", |(h, _)| h)
            .to_string();
        Ok(Target {
            addr,
            host,
            path: path.to_string(),
            wss,
            tls: None,
            deflate: false,
        })
    }

    /// The URL as the report shows it.
    pub fn url(&self) -> String {
        let scheme = if self.tls.is_some() { "wss" } else { "ws" };
        format!("{scheme}://{}{}", self.addr, self.path)
    }
}

/// Why `wsd bench` could not run at all (as opposed to errors it counted while running).
#[derive(Debug)]
pub enum BenchError {
    Url(String),
    /// The client's TLS cannot be set up.
    Tls(String),
    /// Options that do not go together.
    Usage(String),
    Setup(String, std::io::Error),
    /// The server's processes could not be found (`--config`).
    Server(String),
    /// A client process ended without its final report.
    Shard(usize, String),
}

impl fmt::Display for BenchError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BenchError::Url(why) => write!(f, "bad --url {why}"),
            BenchError::Tls(why) => write!(f, "TLS: {why}"),
            BenchError::Usage(why) => f.write_str(why),
            BenchError::Setup(what, e) => write!(f, "cannot {what}: {e}"),
            BenchError::Server(why) => write!(f, "the server's processes: {why}"),
            BenchError::Shard(i, why) => write!(f, "client process {i}: {why}"),
        }
    }
}

impl std::error::Error for BenchError {}

/// One second on the [`Clock`]: its readings are nanoseconds.
pub const SEC: u64 = 1_000_000_000;

/// Nanoseconds since a common epoch: an `Instant` taken before the client processes fork, so
/// a timestamp written by the publisher's process means the same in every subscriber's.
/// (`Instant` is CLOCK_MONOTONIC, one clock for the whole machine.)
#[derive(Debug, Clone, Copy)]
pub struct Clock(Instant);

impl Clock {
    pub fn new() -> Clock {
        Clock(Instant::now())
    }

    pub fn now(&self) -> u64 {
        self.0.elapsed().as_nanos() as u64
    }
}

/// What one run is asked to do, after parsing.
#[derive(Debug, Clone)]
pub struct Plan {
    pub target: Target,
    pub conns: usize,
    /// The measured window: `connect`'s sustained phase (may be 0), `idle`'s hold.
    pub secs: u64,
    pub json: bool,
    pub server: ServerArgs,
    /// What messages carry.
    pub payload: payload::Kind,
    pub work: Work,
}

#[derive(Debug, Clone)]
pub enum Work {
    Echo {
        size: usize,
        depth: usize,
    },
    Connect {
        slots: usize,
    },
    Idle {
        size: usize,
        /// `--again-when`: the file whose appearance has every connection echo once more.
        again: Option<PathBuf>,
    },
    Latency {
        rate: u64,
        size: usize,
        spin: bool,
    },
    Broadcast {
        rate: u64,
        app: App,
        topic: String,
        size: usize,
    },
    Api(Box<api::Settings>),
}

impl Plan {
    fn from_args(args: BenchArgs) -> Result<Plan, BenchError> {
        let (common, secs, work) = match args.mode {
            Mode::Api(a) => return Plan::api(*a),
            Mode::Echo {
                common,
                window,
                size,
                depth,
            } => (
                common,
                window.secs,
                Work::Echo {
                    size,
                    depth: depth as usize,
                },
            ),
            Mode::Connect {
                common,
                secs,
                slots,
            } => (
                common,
                secs,
                Work::Connect {
                    slots: slots as usize,
                },
            ),
            Mode::Idle {
                common,
                hold,
                size,
                again_when,
            } => (
                common,
                hold,
                Work::Idle {
                    size,
                    again: again_when,
                },
            ),
            Mode::Latency {
                common,
                window,
                rate,
                size,
                spin,
            } => (common, window.secs, Work::Latency { rate, size, spin }),
            Mode::Broadcast {
                common,
                window,
                rate,
                app,
                topic,
                size,
            } => (
                common,
                window.secs,
                Work::Broadcast {
                    rate,
                    app,
                    topic,
                    size,
                },
            ),
        };
        let mut target = Target::parse(&common.url)?;
        if common.tls || target.wss {
            target.tls = Some(tls::Client::new(&target.host, common.insecure)?);
        }
        target.deflate = common.deflate;
        let sized = match work {
            Work::Echo { size, .. } | Work::Idle { size, .. } | Work::Latency { size, .. } => {
                Some(size)
            }
            _ => None,
        };
        if common.payload == payload::Kind::Json
            && let Some(size) = sized.filter(|&s| s < payload::MIN_JSON)
        {
            return Err(BenchError::Usage(format!(
                "--payload json needs --size {} or more, not {size}",
                payload::MIN_JSON
            )));
        }
        Ok(Plan {
            target,
            conns: common.conns as usize,
            secs,
            json: common.json,
            server: common.server,
            payload: common.payload,
            work,
        })
    }

    /// `wsd bench api`'s plan.
    fn api(a: ApiArgs) -> Result<Plan, BenchError> {
        let hosts = a
            .urls
            .iter()
            .map(|url| {
                let mut t = Target::parse(url)?;
                if t.wss {
                    return Err(BenchError::Usage(format!(
                        "{url}: the api mode runs over ws:// only"
                    )));
                }
                if a.protocol == api::Protocol::Socketio && t.path == "/" {
                    t.path = socketio::PATH.to_string();
                }
                Ok(t)
            })
            .collect::<Result<Vec<Target>, BenchError>>()?;
        let settings = api::Settings {
            hosts,
            api: http::Endpoint::parse(&a.api)?,
            path: a.api_path,
            key: a.key,
            rate: (!a.flat).then_some(a.rate),
            topics: a.topics as usize,
            prefix: a.topic_prefix,
            http_conns: a.http_conns as usize,
            depth: a.depth as usize,
            protocol: a.protocol,
            host_configs: a.host_configs,
            redis_pids: a.redis_pid,
            backend_pids: a.backend_pid,
        };
        Ok(Plan {
            target: settings.hosts[0].clone(),
            conns: a.conns as usize,
            secs: a.window.secs,
            json: a.json,
            server: a.server,
            payload: payload::Kind::Text,
            work: Work::Api(Box::new(settings)),
        })
    }

    /// Sockets the run opens at most at once: broadcast adds the publisher, connect the
    /// cycling slots.
    pub fn sockets(&self) -> usize {
        self.conns + self.extra_sockets()
    }

    /// Sockets opened before measuring begins: broadcast's publisher is one of them, and
    /// api's HTTP connections; connect's slots are not.
    pub fn upfront(&self) -> usize {
        match &self.work {
            Work::Broadcast { .. } => self.conns + 1,
            Work::Api(a) => self.conns + a.http_conns,
            _ => self.conns,
        }
    }

    /// Sockets besides the `conns` connections.
    pub fn extra_sockets(&self) -> usize {
        match self.work {
            Work::Broadcast { .. } => 1,
            Work::Api(ref a) => a.http_conns,
            Work::Connect { slots } if self.secs > 0 => slots,
            _ => 0,
        }
    }

    pub fn mode(&self) -> &'static str {
        match self.work {
            Work::Echo { .. } => "echo",
            Work::Connect { .. } => "connect",
            Work::Idle { .. } => "idle",
            Work::Latency { .. } => "latency",
            Work::Broadcast { .. } => "broadcast",
            Work::Api(_) => "api",
        }
    }
}

/// Runs `wsd bench` and returns the exit code: 0, or 1 if any error was counted.
pub(crate) fn run(args: BenchArgs) -> i32 {
    let outcome = Plan::from_args(args).and_then(|plan| {
        let summary = coordinator::run(&plan)?;
        report::print(&plan, &summary);
        Ok(summary.errors.total())
    });
    match outcome {
        Ok(0) => 0,
        Ok(_) => 1,
        Err(e) => {
            eprintln!("wsd bench: {e}");
            1
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_give_address_host_and_path() {
        let t = Target::parse("ws://127.0.0.1:2346/chat?x=1").unwrap();
        assert_eq!(t.addr, "127.0.0.1:2346".parse().unwrap());
        assert_eq!(
            (t.host.as_str(), t.path.as_str()),
            ("127.0.0.1", "/chat?x=1")
        );
        let t = Target::parse("ws://127.0.0.1").unwrap();
        assert_eq!((t.addr.port(), t.path.as_str()), (80, "/"));
        let t = Target::parse("ws://[::1]:9/").unwrap();
        assert_eq!(t.addr, "[::1]:9".parse().unwrap());
        let t = Target::parse("wss://127.0.0.1/x").unwrap();
        assert_eq!((t.addr.port(), t.wss, t.path.as_str()), (443, true, "/x"));
        assert!(Target::parse("http://127.0.0.1/").is_err());
        assert!(Target::parse("ws:///x").is_err());
    }
}
