//! [`Runner`]: a program built on wsd, its apps and its groups defined in code, and the two
//! ways to run it: with wsd's whole command line ([`Runner::run`], the `cli` feature), or as
//! a master started directly ([`Runner::start`]), which needs no command-line parser.

use crate::config::{Config, ConfigError, GroupProblem};
use crate::{Worker, apps, master};
use std::path::Path;

/// A program built on wsd: the apps `workers.toml` may name, and groups defined in code.
pub struct Runner {
    pub(crate) apps: master::Apps,
    pub(crate) workers: Vec<Worker>,
}

/// Why [`Runner::start`] did not start a master.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// The config file cannot be used.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// A group defined in code has settings that contradict each other.
    #[error("worker {group:?}: {problem}")]
    Group {
        /// The group's name.
        group: String,
        /// What is wrong.
        problem: GroupProblem,
    },
    /// A group defined in code names a certificate or key that cannot be served.
    #[cfg(feature = "tls")]
    #[error("worker {group:?}: {source}")]
    Tls {
        /// The group's name.
        group: String,
        /// Why.
        source: crate::tls::TlsError,
    },
    /// A group defined in code names a token key that cannot check tokens.
    #[cfg(feature = "jwt")]
    #[error("worker {group:?}: {source}")]
    Jwt {
        /// The group's name.
        group: String,
        /// Why.
        source: crate::auth::KeyError,
    },
}

impl Default for Runner {
    fn default() -> Self {
        Runner::new()
    }
}

impl Runner {
    /// A runner that knows the built-in apps (`echo`, `hello`, `chat`, `clock`, `clock-echo`,
    /// `pubsub`).
    pub fn new() -> Runner {
        let mut r = Runner {
            apps: master::Apps::new(),
            workers: Vec::new(),
        };
        for (name, install) in apps::builtin() {
            r = r.app(name, install);
        }
        r
    }

    /// Registers an app that `workers.toml` can select with `app = "name"`.
    pub fn app(mut self, name: &str, install: impl Fn(&mut Worker) + 'static) -> Runner {
        self.apps.insert(name.to_string(), Box::new(install));
        self
    }

    /// Adds a group defined in code; it runs beside any groups of the config file.
    pub fn worker(mut self, worker: Worker) -> Runner {
        self.workers.push(worker);
        self
    }

    /// Starts a master in this process and runs it until it stops, as `wsd start` does:
    /// the groups defined in code and those of `config`, if given. With `daemon`, it detaches
    /// first. Returns the exit status. Signals control it (SIGTERM stops it, SIGHUP reloads
    /// it), and any `wsd` binary commands it through its control socket.
    pub fn start(self, config: Option<&Path>, daemon: bool) -> Result<i32, RunError> {
        let config = match config {
            Some(p) => Config::load(p, &self.app_names())?,
            None => Config::empty(),
        };
        crate::logging::init(&config.server.log_level);
        let Runner { apps, workers } = self;
        let mut workers = workers;
        for w in &mut workers {
            w.check().map_err(|problem| RunError::Group {
                group: w.name().to_string(),
                problem,
            })?;
            #[cfg(feature = "tls")]
            if w.tls.is_none() {
                w.load_tls().map_err(|source| RunError::Tls {
                    group: w.name().to_string(),
                    source,
                })?;
            }
            #[cfg(feature = "jwt")]
            if w.jwt.is_none() {
                w.load_jwt().map_err(|source| RunError::Jwt {
                    group: w.name().to_string(),
                    source,
                })?;
            }
        }
        Ok(master::start(master::Plan {
            config,
            code_groups: workers,
            apps,
            daemon,
        }))
    }

    /// Parses the process's command line, runs the command and exits with its status.
    #[cfg(feature = "cli")]
    pub fn run(self) -> ! {
        let code = crate::cli::main(self, std::env::args().collect());
        std::process::exit(code)
    }

    pub(crate) fn app_names(&self) -> Vec<&str> {
        self.apps.keys().map(String::as_str).collect()
    }
}

/// Runs `workers` under wsd's command line (Workerman's `Worker::runAll()`). Never returns.
#[cfg(feature = "cli")]
pub fn run_all(workers: Vec<Worker>) -> ! {
    workers
        .into_iter()
        .fold(Runner::new(), Runner::worker)
        .run()
}
