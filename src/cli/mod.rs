//! The control path's client side: `wsd start|stop|restart|reload|status|connections|check`.
//!
//! Every command but `start` and `check` talks to the running master over its control socket
//! (JSON lines) and turns the answer into output and an exit code: 0 on success, 1 with a
//! one-line reason on stderr otherwise.

mod client;
mod status;

use crate::config::{Config, ConfigError, ConfigProblem, ServerConfig};
use crate::control::{Request, StopMode};
use crate::{RunError, Runner};
use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};
use client::{ControlError, request};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

#[derive(Parser)]
#[command(
    version = crate::VERSION,
    about = "A multi-process WebSocket server in the mould of Workerman"
)]
struct Cli {
    /// Config file [default: ./workers.toml]
    #[arg(short, long, env = "WSD_CONFIG", global = true, value_name = "FILE")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Start the master and its workers (in the foreground unless -d)
    Start {
        /// Detach: run as a daemon, logging to [server] log_file
        #[arg(short, long)]
        daemon: bool,
    },
    /// Stop the running master: clients get Close 1001, workers exit
    Stop {
        /// Graceful: stop accepting and wait, without a time limit, for clients to leave
        #[arg(short, long, conflicts_with = "fast")]
        graceful: bool,
        /// Fast: send Close 1001 once and exit without waiting for clients to answer
        #[arg(long)]
        fast: bool,
    },
    /// Stop, then start again
    Restart {
        #[arg(short, long)]
        daemon: bool,
        /// Stop fast (see `stop --fast`)
        #[arg(long)]
        fast: bool,
    },
    /// Re-read the config and replace the workers one slot at a time, refusing no client
    Reload,
    /// Reopen the log file (for logrotate; a daemon's output goes there)
    ReopenLogs,
    /// Replace the master and its workers with a new binary, keeping every connection
    Upgrade {
        /// The new binary (default: the path the running one was started from)
        #[arg(long)]
        binary: Option<std::path::PathBuf>,
    },
    /// List every live connection of every worker
    Connections {
        /// Print one JSON object instead of the table
        #[arg(long)]
        json: bool,
    },
    /// Show the master and every worker process
    Status {
        /// Print one JSON object instead of the table
        #[arg(long)]
        json: bool,
        /// Refresh every second, like top
        #[arg(short, long)]
        watch: bool,
    },
    /// Validate the config file without starting anything
    Check,
    /// Load a WebSocket server (this one or any other) and measure it
    #[cfg(feature = "bench")]
    Bench(crate::bench::BenchArgs),
}

/// Why a command failed: printed as `wsd: <reason>`, exit code 1.
#[derive(Debug, thiserror::Error)]
enum Failed {
    /// `check` or `start` without a config file, and no groups defined in code.
    #[error("no config file: {} not found (use -c FILE)", .0.display())]
    NoConfigFile(PathBuf),
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The file's groups and the code's together cannot run.
    #[error("{}: {problem}", file.display())]
    Groups {
        file: PathBuf,
        problem: ConfigProblem,
    },
    /// A group defined in code has settings that contradict each other.
    #[error(transparent)]
    Run(#[from] RunError),
    /// The running master could not be asked, or refused.
    #[error(transparent)]
    Control(#[from] ControlError),
    /// The master's status reply had no status in it.
    #[error("master sent no status")]
    NoStatus,
}

pub(crate) fn main(runner: Runner, args: Vec<String>) -> i32 {
    let prog = args
        .first()
        .and_then(|a| Path::new(a).file_name())
        .and_then(|n| n.to_str())
        .unwrap_or("wsd")
        .to_string();
    let matches = match Cli::command()
        .name(prog.clone())
        .bin_name(prog)
        .try_get_matches_from(args)
    {
        Ok(m) => m,
        Err(e) => {
            let _ = e.print();
            return if e.use_stderr() { 2 } else { 0 };
        }
    };
    let cli = Cli::from_arg_matches(&matches).expect("clap validated the arguments");
    match run(runner, cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("wsd: {e}");
            1
        }
    }
}

fn run(runner: Runner, cli: Cli) -> Result<i32, Failed> {
    let explicit = cli.config.is_some();
    let config_path = cli.config.unwrap_or_else(|| PathBuf::from("workers.toml"));
    let config_path = std::path::absolute(&config_path).unwrap_or(config_path);
    // A program that defines its groups in code reads a config file only when told to, so an
    // unrelated ./workers.toml in the working directory cannot add groups to it.
    let have_file = explicit || (runner.workers.is_empty() && config_path.exists());
    match cli.command {
        #[cfg(feature = "bench")]
        Command::Bench(args) => Ok(crate::bench::run(args)),
        Command::Check => {
            if !have_file {
                return Err(Failed::NoConfigFile(config_path));
            }
            let config = Config::load(&config_path, &runner.app_names())?;
            let code = runner.workers.iter().map(|w| (w.name(), &w.listen));
            let file = config.groups.iter().map(|g| (g.name(), &g.listen));
            let groups: Vec<_> = code.chain(file).collect();
            crate::config::check_runnable(&groups, config.api.as_ref()).map_err(|problem| {
                Failed::Groups {
                    file: config_path.clone(),
                    problem,
                }
            })?;
            #[cfg(feature = "tls")]
            for g in &config.groups {
                if let Some(warning) = g.tls.as_ref().and_then(|id| id.expiry_warning()) {
                    eprintln!(
                        "wsd: warning: {}: group {:?}: {warning}",
                        config_path.display(),
                        g.name()
                    );
                }
            }
            let workers: usize = config.groups.iter().map(|g| g.count).sum();
            println!(
                "{}: ok ({} group(s), {workers} worker(s))",
                config_path.display(),
                config.groups.len()
            );
            Ok(0)
        }
        Command::Start { daemon } => start(runner, &config_path, have_file, daemon),
        Command::Restart { daemon, fast } => {
            let server = locate(have_file.then_some(&config_path));
            let mode = if fast {
                StopMode::Fast
            } else {
                StopMode::Close
            };
            match request(&server, &Request::Stop { mode }, None) {
                Ok(_) => println!("wsd stopped"),
                Err(ControlError::NotRunning { .. }) => {}
                Err(e) => return Err(e.into()),
            }
            start(runner, &config_path, have_file, daemon)
        }
        Command::Stop { graceful, fast } => {
            let server = locate(have_file.then_some(&config_path));
            if graceful {
                println!("wsd is stopping gracefully: waiting for clients to leave");
            }
            let mode = match (graceful, fast) {
                (true, _) => StopMode::Drain,
                (_, true) => StopMode::Fast,
                _ => StopMode::Close,
            };
            request(&server, &Request::Stop { mode }, None)?;
            println!("wsd stopped");
            Ok(0)
        }
        Command::Reload => {
            let server = locate(have_file.then_some(&config_path));
            let reply = request(&server, &Request::Reload, None)?;
            println!("wsd {}", reply.message.unwrap_or_else(|| "reloaded".into()));
            Ok(0)
        }
        Command::Upgrade { binary } => {
            let server = locate(have_file.then_some(&config_path));
            let binary = binary.map(|b| std::path::absolute(&b).unwrap_or(b));
            let reply = request(&server, &Request::Upgrade { binary }, None)?;
            println!("wsd {}", reply.message.unwrap_or_else(|| "upgraded".into()));
            Ok(0)
        }
        Command::ReopenLogs => {
            let server = locate(have_file.then_some(&config_path));
            let reply = request(&server, &Request::ReopenLogs, Some(Duration::from_secs(5)))?;
            println!("wsd: {}", reply.message.unwrap_or_default());
            Ok(0)
        }
        Command::Connections { json } => {
            let server = locate(have_file.then_some(&config_path));
            let reply = request(
                &server,
                &Request::Connections,
                Some(Duration::from_secs(10)),
            )?;
            let conns = reply.connections.unwrap_or_default();
            if json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&conns).unwrap_or_default()
                );
            } else {
                print!("{}", status::render_connections(&conns));
            }
            Ok(0)
        }
        Command::Status { json, watch } => {
            let server = locate(have_file.then_some(&config_path));
            loop {
                let reply = request(&server, &Request::Status, Some(Duration::from_secs(5)))?;
                let st = reply.status.ok_or(Failed::NoStatus)?;
                let text = if json {
                    serde_json::to_string_pretty(&st).unwrap_or_default()
                } else {
                    status::render(&st)
                };
                if watch {
                    // Clear the screen and redraw from the top, like top(1).
                    print!("\x1b[H\x1b[2J{text}\n(refreshing every second; Ctrl+C to quit)\n");
                    let _ = io::stdout().flush();
                    std::thread::sleep(Duration::from_secs(1));
                } else {
                    println!("{text}");
                    return Ok(0);
                }
            }
        }
    }
}

/// Starts a master on the config file, if there is one to read (`have_file`), and the groups
/// defined in code.
fn start(runner: Runner, config_path: &Path, have_file: bool, daemon: bool) -> Result<i32, Failed> {
    if !have_file && runner.workers.is_empty() {
        return Err(Failed::NoConfigFile(config_path.to_path_buf()));
    }
    Ok(runner.start(have_file.then_some(config_path), daemon)?)
}

fn locate(config_path: Option<&PathBuf>) -> ServerConfig {
    match config_path {
        Some(p) => Config::locate(p),
        None => Config::empty().server,
    }
}
