//! The control path's server side: the master process.
//!
//! `start` does everything that can fail before any fork — lock the pid file, bind every slot's
//! listener, bind the control socket — so a bad start is a clear error with nothing left
//! behind. Then it (optionally) detaches, forks the workers and runs the master loop.
//!
//! `wsd reload` reads top to bottom: `cli/` sends the request → `clients.rs` reads it →
//! `requests.rs` dispatches → `event_loop.rs` begins the reload → `reload.rs` plans it and
//! replaces workers slot by slot through `supervisor.rs`, which forks (`sys.rs`) and reaps.

mod api;
mod bus_watch;
mod clients;
mod control_socket;
mod daemon;
mod error;
mod event_loop;
mod listeners;
mod metrics_server;
mod notify;
pub(crate) mod pidfile;
mod privileges;
mod reload;
mod requests;
mod supervisor;
mod upgrade;

pub use error::{
    GroupsError, InheritanceError, ReloadError, ReopenError, StartError, UpgradeError,
};

use crate::config::{Config, ServerConfig};
use crate::worker::Worker;
use std::collections::BTreeMap;
use std::path::PathBuf;

/// Installs a named app's hooks on a group (`app = "echo"`).
pub(crate) type AppInstaller = Box<dyn Fn(&mut Worker)>;
pub(crate) type Apps = BTreeMap<String, AppInstaller>;

/// What `wsd start` was asked to run.
pub struct Plan {
    pub config: Config,
    /// Groups defined in the program's code (a library user's `run_all`).
    pub code_groups: Vec<Worker>,
    /// The apps `workers.toml` may name; kept for reloads.
    pub apps: Apps,
    pub daemon: bool,
}

/// Where the groups come from, so a reload can read them again.
pub struct Source {
    pub file: Option<PathBuf>,
    apps: Apps,
    /// `[metrics]` as started: a reload cannot move it.
    metrics: Option<crate::config::MetricsConfig>,
}

impl Source {
    /// The groups of `config`, each with its app's hooks installed.
    fn groups(&self, config: &Config) -> Vec<Worker> {
        config
            .groups
            .iter()
            .map(|g| {
                let mut w = Worker::from_config(g.clone());
                let install = self
                    .apps
                    .get(&g.app)
                    .expect("config validated the app name");
                install(&mut w);
                w
            })
            .collect()
    }

    /// Reads the config file again for a reload: the new `[server]` settings and the file's
    /// groups. Settings that only a restart can change are refused with the reason.
    fn reread(&self, running: &ServerConfig) -> Result<Reread, ReloadError> {
        let Some(file) = &self.file else {
            return Ok(Reread {
                server: running.clone(),
                groups: Vec::new(),
                api: None,
                from_file: false,
            });
        };
        let names: Vec<&str> = self.apps.keys().map(String::as_str).collect();
        let config = Config::load(file, &names)?;
        let new = &config.server;
        let fixed = [
            ("pid_file", &running.pid_file, &new.pid_file),
            (
                "control_socket",
                &running.control_socket,
                &new.control_socket,
            ),
            ("log_file", &running.log_file, &new.log_file),
        ];
        for (key, old, new) in fixed {
            if old != new {
                return Err(ReloadError::NeedsRestart {
                    key,
                    old: old.display().to_string(),
                    new: new.display().to_string(),
                });
            }
        }
        if running.bus != new.bus {
            let shown = |b: &Option<crate::config::RedisUrl>| {
                b.as_ref().map_or("none".into(), |u| u.redacted())
            };
            return Err(ReloadError::NeedsRestart {
                key: "bus",
                old: shown(&running.bus),
                new: shown(&new.bus),
            });
        }
        if running.log_level != new.log_level {
            return Err(ReloadError::NeedsRestart {
                key: "log_level",
                old: format!("{:?}", running.log_level),
                new: format!("{:?}", new.log_level),
            });
        }
        if config.metrics != self.metrics {
            let shown = |m: &Option<crate::config::MetricsConfig>| {
                m.as_ref()
                    .map_or("none".into(), |m| m.listen.addr.to_string())
            };
            return Err(ReloadError::TableNeedsRestart {
                table: "metrics",
                what: "listen",
                old: shown(&self.metrics),
                new: shown(&config.metrics),
            });
        }
        Ok(Reread {
            server: config.server.clone(),
            groups: self.groups(&config),
            api: config.api,
            from_file: true,
        })
    }
}

/// What a reload read again.
struct Reread {
    server: ServerConfig,
    /// The file's groups.
    groups: Vec<Worker>,
    /// The file's `[api]`.
    api: Option<crate::config::ApiConfig>,
    /// There is a file (a program with groups in code only has none: its `[api]` stays).
    from_file: bool,
}

/// The listening sockets an upgrade inherited for `def`, one per slot of its count: the extra
/// closed, or more bound on the same address.
fn fit_listeners(
    mut listeners: Vec<std::net::TcpListener>,
    def: &crate::Worker,
) -> Result<Vec<std::net::TcpListener>, GroupsError> {
    listeners.truncate(def.count);
    if let Some(addr) = listeners.first().and_then(|l| l.local_addr().ok())
        && listeners.len() < def.count
    {
        let more = listeners::bind_more(addr, def.count - listeners.len(), def.backlog);
        listeners.extend(more.map_err(|source| GroupsError::Bind {
            group: def.name().to_string(),
            source,
        })?);
    }
    Ok(listeners)
}

/// Runs a master to the end. Returns the process exit code.
pub fn start(plan: Plan) -> i32 {
    let server = plan.config.server.clone();
    // Started by `wsd upgrade`: the old master's sockets, locks and bus ends, by number.
    let mut inherited = match upgrade::Inheritance::from_env() {
        None => None,
        Some(Ok(i)) => Some(upgrade::Inherited::take(i)),
        Some(Err(e)) => {
            eprintln!("wsd: {e}");
            return 1;
        }
    };
    let locked = match inherited.as_mut() {
        Some(i) => Ok(pidfile::PidFile::inherited(
            &server.pid_file,
            std::mem::take(&mut i.pid_file),
        )),
        None => pidfile::PidFile::lock(&server.pid_file),
    };
    let mut pidfile = match locked {
        Ok(p) => p,
        Err(e) => {
            eprintln!("wsd: {e}");
            return 1;
        }
    };
    let fail = |pidfile: pidfile::PidFile, e: StartError| {
        eprintln!("wsd: {e}");
        pidfile.remove();
        1
    };
    // We hold our pid file's lock, so a socket file left here is stale — unless another
    // master answers on it (one with another pid file, or whose pid file was removed): then
    // taking it over would leave that one unreachable. Asked before binding, so the answer
    // is this, not "address in use" from that master's own ports.
    if inherited.is_none()
        && std::os::unix::net::UnixStream::connect(&server.control_socket).is_ok()
    {
        return fail(
            pidfile,
            StartError::AlreadyAnswering(server.control_socket.clone()),
        );
    }
    let source = Source {
        file: plan.config.file.clone(),
        apps: plan.apps,
        metrics: plan.config.metrics.clone(),
    };
    let defs = plan
        .code_groups
        .into_iter()
        .map(|w| (w, false))
        .chain(source.groups(&plan.config).into_iter().map(|w| (w, true)));
    let mut sup = supervisor::Supervisor {
        creds: privileges::for_workers(&server),
        host_id: inherited.as_ref().map_or_else(host_id, |i| i.host_id),
        bus_url: server.bus.clone(),
        ..Default::default()
    };
    let defs: Vec<_> = defs.collect();
    let listens: Vec<_> = defs.iter().map(|(d, _)| (d.name(), &d.listen)).collect();
    let api_group = match crate::config::check_runnable(&listens, plan.config.api.as_ref()) {
        Ok(g) => g,
        Err(e) => return fail(pidfile, GroupsError::Invalid(e).into()),
    };
    if let (Some(config), Some(group)) = (plan.config.api.clone(), api_group) {
        let count = defs
            .iter()
            .find(|(d, _)| d.name() == group)
            .map_or(1, |(d, _)| d.count);
        let kept = inherited.as_mut().map(|i| std::mem::take(&mut i.api));
        let slots = match kept.filter(|l| l.len() == count) {
            Some(listeners) => api::ApiSlots::serve_on(config, group, listeners),
            None => api::ApiSlots::bind(config, group, count),
        };
        match slots {
            Ok(a) => sup.api = Some(a),
            Err(e) => return fail(pidfile, GroupsError::ApiBind(e).into()),
        }
    }
    #[cfg(feature = "tls")]
    for (def, _) in &defs {
        if let Some(warning) = def.tls.as_ref().and_then(|id| id.expiry_warning()) {
            log::warn!("group {:?}: {warning}", def.name());
        }
    }
    let protocol = inherited.as_ref().map(|i| i.protocol);
    let speaks = protocol.is_none_or(crate::handoff::line::takes_from);
    if !speaks {
        log::warn!(
            "the old master's workers speak handoff protocol {}, this build's {}: their \
             clients are closed with 1001 instead of handed over",
            protocol.unwrap_or_default(),
            crate::handoff::line::PROTOCOL
        );
    }
    for (mut def, from_file) in defs {
        let mut taken = inherited.as_mut().and_then(|i| i.group(&def));
        if let Some((listeners, _)) = taken.take_if(|_| !speaks) {
            // The same sockets, so no client is refused; a bus of its own.
            let listeners = match fit_listeners(listeners, &def) {
                Ok(listeners) => listeners,
                Err(e) => return fail(pidfile, e.into()),
            };
            match supervisor::Group::new(def, listeners, from_file) {
                Ok(g) => sup.groups.push(g),
                Err(e) => return fail(pidfile, GroupsError::Bus(e).into()),
            }
            continue;
        }
        if let Some((listeners, mesh)) = taken {
            let (old, new) = (listeners.len(), def.count);
            // Only a reload of the file can change the count later.
            let by_reload = from_file && def.reloadable;
            let (listeners, mesh) = match by_reload {
                true => (listeners, Ok(mesh)),
                false => match fit_listeners(listeners, &def) {
                    // Its own count at once: the clients of slots it drops are closed with
                    // 1001, and those of slots it adds may miss what the old workers send.
                    Ok(l) => (
                        l,
                        if new > mesh.slots() {
                            mesh.grown(new)
                        } else {
                            Ok(mesh)
                        },
                    ),
                    Err(e) => return fail(pidfile, e.into()),
                },
            };
            let mesh = match mesh {
                Ok(mesh) => mesh,
                Err(e) => return fail(pidfile, GroupsError::Bus(e).into()),
            };
            if by_reload && old != new {
                // Every old worker hands its clients to the new one of its slot; a reload
                // brings the count to the configuration's once the old master has gone.
                log::info!(
                    "{}: {old} worker(s) until the old master has gone, then {new}",
                    def.name()
                );
                def.count = old;
                sup.recount_after_upgrade = true;
            }
            let slots = (0..old.min(def.count)).map(|s| (def.name().to_string(), s));
            sup.upgrade_pending.extend(slots);
            sup.groups.push(supervisor::Group::with_mesh(
                def, listeners, from_file, mesh,
            ));
            continue;
        }
        match listeners::bind_slots(def.listen.addr, def.count, def.backlog) {
            Ok(ls) => match supervisor::Group::new(def, ls, from_file) {
                Ok(g) => sup.groups.push(g),
                Err(e) => return fail(pidfile, GroupsError::Bus(e).into()),
            },
            Err(source) => {
                let group = def.name().to_string();
                return fail(pidfile, GroupsError::Bind { group, source }.into());
            }
        }
    }
    let kept_metrics = inherited.as_mut().and_then(|i| i.metrics.take());
    let metrics = match &plan.config.metrics {
        Some(m) => match kept_metrics.map_or_else(
            || metrics_server::MetricsServer::bind(m.listen.addr),
            |l| metrics_server::MetricsServer::serve(l.into()),
        ) {
            Ok(server) => Some(server),
            Err(e) => {
                let source = listeners::BindError {
                    addr: m.listen.addr,
                    error: e,
                };
                return fail(pidfile, StartError::Metrics(source));
            }
        },
        None => None,
    };
    let control = match inherited.as_mut().and_then(|i| i.control.take()) {
        Some(fd) => Ok((fd.into(), control_socket::inherited(&server.control_socket))),
        None => control_socket::create(&server.control_socket),
    };
    let (control, socket_file) = match control {
        Ok(c) => c,
        Err(e) => {
            let path = server.control_socket.clone();
            return fail(pidfile, StartError::ControlSocket { path, source: e });
        }
    };
    let announce = if plan.daemon {
        match daemon::detach(&server.log_file) {
            Ok(a) => a,
            Err(e) => return fail(pidfile, StartError::Detach(e)),
        }
    } else {
        daemon::Announce::Stdout
    };
    if let Err(e) = pidfile.write_pid(std::process::id()) {
        log::warn!("cannot write pid file: {e}");
    }
    let mut master =
        event_loop::Master::new(server.clone(), source, sup, control, announce, metrics);
    master.pid_file_fds = pidfile.fds();
    if let Some((old_pid, protocol, link)) =
        inherited.and_then(|i| Some((i.old_pid, i.protocol, i.link?)))
    {
        match upgrade::Predecessor::new(old_pid, protocol, link) {
            Ok(p) => master.predecessor = Some(p),
            Err(e) => log::warn!("the link to the old master is unusable ({e}); serving alone"),
        }
    }
    let (code, mut stop_waiters, handed_over) = event_loop::run(master);
    if !handed_over {
        socket_file.remove_if_ours();
        pidfile.remove();
    }
    for w in &mut stop_waiters {
        clients::send_reply(w, &crate::control::Reply::ok());
    }
    code
}

/// The start banner, after Workerman's.
fn banner(groups: &[supervisor::Group], api: Option<&api::ApiSlots>, daemon: bool) -> String {
    let line = "-".repeat(72);
    let mut out = format!(
        "{:-^72}\nwsd version: {:<16} pid: {}\n{:-^72}\n{:<16} {:<36} {:<10} {}\n",
        " WSD ",
        crate::VERSION,
        std::process::id(),
        " WORKERS ",
        "name",
        "listen",
        "processes",
        "status"
    );
    for g in groups {
        out += &format!(
            "{:<16} {:<36} {:<10} [OK]\n",
            g.name(),
            g.listen,
            g.slots.len()
        );
    }
    if let Some(api) = api {
        out += &format!("{:<16} {:<36} {:<10} [OK]\n", "api", api.url(), api.group);
    }
    out += &line;
    out += if daemon {
        "\nInput \"wsd stop\" to stop. Start success.\n"
    } else {
        "\nPress Ctrl+C to stop. Start success.\n"
    };
    out
}

/// A random name for this server on a cluster bus (std's hasher keys come from the OS).
fn host_id() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u32(std::process::id());
    h.finish()
}
