//! The control path's server side: the master process.
//!
//! `start` does everything that can fail before any fork — lock the pid file, bind every slot's
//! listener, bind the control socket — so a bad start is a clear error with nothing left
//! behind. Then it (optionally) detaches, forks the workers and runs the master loop
//! (`event_loop.rs`), which supervises them and answers the CLI.

mod daemon;
mod event_loop;
mod listeners;
mod notify;
pub(crate) mod pidfile;
mod privileges;
mod supervisor;

use crate::config::Config;
use crate::worker::Worker;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixListener;

/// What `wsd start` was asked to run.
pub struct Plan {
    pub config: Config,
    pub groups: Vec<Worker>,
    pub daemon: bool,
}

/// Runs a master to the end. Returns the process exit code.
pub fn start(plan: Plan) -> i32 {
    let server = plan.config.server.clone();
    let mut pidfile = match pidfile::PidFile::lock(&server.pid_file) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("wsd: {e}");
            return 1;
        }
    };
    let fail = |pidfile: pidfile::PidFile, msg: String| {
        eprintln!("wsd: {msg}");
        pidfile.remove();
        1
    };
    if plan.groups.is_empty() {
        return fail(pidfile, "nothing to run: no [[worker]] groups".into());
    }
    let creds = privileges::for_workers(&server);
    let mut groups = Vec::with_capacity(plan.groups.len());
    for def in plan.groups {
        match listeners::bind_slots(def.listen.addr, def.count, def.backlog) {
            Ok(ls) => groups.push(supervisor::Group {
                creds: creds.clone(),
                ..supervisor::Group::new(def, ls)
            }),
            Err(e) => return fail(pidfile, format!("group {:?}: {e}", def.name())),
        }
    }
    // We hold the lock, so a socket file left here is stale.
    let _ = std::fs::remove_file(&server.control_socket);
    let control = match UnixListener::bind(&server.control_socket) {
        Ok(l) => l,
        Err(e) => {
            return fail(
                pidfile,
                format!(
                    "cannot create control socket {}: {e}",
                    server.control_socket.display()
                ),
            );
        }
    };
    let _ = std::fs::set_permissions(
        &server.control_socket,
        std::fs::Permissions::from_mode(0o600),
    );
    let announce = if plan.daemon {
        match daemon::detach(&server.log_file) {
            Ok(a) => a,
            Err(e) => return fail(pidfile, format!("cannot detach: {e}")),
        }
    } else {
        daemon::Announce::Stdout
    };
    if let Err(e) = pidfile.write_pid(std::process::id()) {
        log::warn!("cannot write pid file: {e}");
    }
    let config_label = plan
        .config
        .file
        .as_ref()
        .map_or("(none)".to_string(), |p| p.display().to_string());
    let master = event_loop::Master::new(server.clone(), config_label, groups, control, announce);
    let (code, mut stop_waiters) = event_loop::run(master);
    let _ = std::fs::remove_file(&server.control_socket);
    pidfile.remove();
    for w in &mut stop_waiters {
        event_loop::send_reply(w, &crate::control::Reply::ok());
    }
    code
}

/// The start banner, after Workerman's.
fn banner(groups: &[supervisor::Group], daemon: bool) -> String {
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
    out += &line;
    out += if daemon {
        "\nInput \"wsd stop\" to stop. Start success.\n"
    } else {
        "\nPress Ctrl+C to stop. Start success.\n"
    };
    out
}
