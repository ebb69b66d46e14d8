//! `[server] user` / `group` with the real binary: workers switch user right after fork, still
//! die with their master, and never carry on as root when the switch fails.
//!
//! Switching user needs root. Run as root (as the CI machine does), each test checks the
//! switch itself in `/proc/PID/status`; run as anyone else, it checks what a non-root master
//! does instead: one warning, workers with the master's uid. Failures are provoked for real
//! with util-linux `setpriv`, which starts the master without a capability the switch needs,
//! or with securebits under which the switch would not hold.

mod common;

use common::*;
use nix::unistd::{Gid, Uid, User};
use serde_json::Value;
use std::ffi::CString;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

fn nobody() -> User {
    User::from_name("nobody")
        .unwrap()
        .expect("a user named nobody")
}

/// The numbers of one line of `/proc/PID/status` (`Uid`, `Gid`, `Groups`, `NoNewPrivs`).
fn proc_ids(pid: i32, field: &str) -> Vec<u32> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = text
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"));
    let mut ids: Vec<u32> = line
        .split_whitespace()
        .map(|v| v.parse().unwrap())
        .collect();
    if field == "Groups" {
        ids.sort_unstable();
    }
    ids
}

/// Asserts that `pid` runs as `uid`/`gid` (real, effective, saved and filesystem ids), with
/// exactly `groups` as supplementary groups and no way to gain privileges through exec.
fn assert_runs_as(pid: i32, uid: Uid, gid: Gid, groups: &[Gid]) {
    assert_eq!(proc_ids(pid, "Uid"), [uid.as_raw(); 4], "Uid of {pid}");
    assert_eq!(proc_ids(pid, "Gid"), [gid.as_raw(); 4], "Gid of {pid}");
    let mut want: Vec<u32> = groups.iter().map(|g| g.as_raw()).collect();
    want.sort_unstable();
    want.dedup();
    assert_eq!(proc_ids(pid, "Groups"), want, "Groups of {pid}");
    assert_eq!(proc_ids(pid, "NoNewPrivs"), [1], "NoNewPrivs of {pid}");
}

/// Supplementary groups `initgroups(nobody)` gives.
fn nobody_groups() -> Vec<Gid> {
    let user = nobody();
    nix::unistd::getgrouplist(&CString::new(user.name).unwrap(), user.gid).unwrap()
}

/// `Server::config` with `server` lines added to the `[server]` table.
fn config_with(server: &str, count: usize) -> (tempfile::TempDir, PathBuf) {
    let (dir, config) = Server::config("echo", count, "");
    let text = std::fs::read_to_string(&config).unwrap();
    let text = text.replacen("[server]\n", &format!("[server]\n{server}\n"), 1);
    std::fs::write(&config, text).unwrap();
    (dir, config)
}

fn start_with(server: &str, count: usize) -> Server {
    let (dir, config) = config_with(server, count);
    Server::start_with(wsd_bin(), dir, config)
}

/// The warning a master that is not root gives for `[server] user`/`group`.
fn not_root_warning(key: &str) -> String {
    format!(
        "running as uid {}, not root: [server] {key} ignored",
        nix::unistd::geteuid()
    )
}

fn echo_round_trip(port: u16) {
    let mut c = Client::connect(port);
    c.send_text("who serves me?");
    assert_eq!(c.recv_text(), "who serves me?");
}

/// True once `pid` has exited: gone, or a zombie left for whoever inherited it to reap.
fn exited(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(stat) => stat
            .rsplit(')')
            .next()
            .is_some_and(|rest| rest.trim_start().starts_with(['Z', 'X'])),
    }
}

/// A master started under `setpriv` (which `Server` cannot do), in its own process group,
/// killed with its workers when dropped.
struct Wrapped {
    child: Child,
    dir: tempfile::TempDir,
    config: PathBuf,
}

impl Wrapped {
    fn start(setpriv_args: &[&str], dir: tempfile::TempDir, config: PathBuf) -> Wrapped {
        let out = std::fs::File::create(dir.path().join("master.out")).unwrap();
        let child = Command::new("setpriv")
            .args(setpriv_args)
            .arg(wsd_bin())
            .args(["-c", config.to_str().unwrap(), "start"])
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .process_group(0)
            .spawn()
            .expect("run setpriv (util-linux), needed to start wsd with reduced privileges");
        Wrapped { child, dir, config }
    }

    fn output(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("master.out")).unwrap_or_default()
    }

    fn wait_exit(&mut self) -> Option<i32> {
        let status = wait_for("the master to exit", DEADLINE, || {
            self.child.try_wait().unwrap()
        });
        status.code()
    }

    /// `status --json` once every worker has reported.
    fn wait_ready(&self) -> Value {
        wait_for("all workers idle", DEADLINE, || {
            let out = Command::new(wsd_bin())
                .args(["-c", self.config.to_str().unwrap(), "status", "--json"])
                .stdin(Stdio::null())
                .output()
                .unwrap();
            let st: Value = serde_json::from_slice(&out.stdout).ok()?;
            let ws = st["workers"].as_array()?;
            ws.iter()
                .all(|w| w["status"] == "idle" && w["pid"].as_i64() > Some(0))
                .then_some(st)
        })
    }
}

impl Drop for Wrapped {
    fn drop(&mut self) {
        let pgid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        let _ = nix::sys::signal::killpg(pgid, nix::sys::signal::Signal::SIGKILL);
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("--- master output ---\n{}", self.output());
        }
    }
}

#[test]
fn workers_run_as_the_configured_user_and_the_master_stays_root() {
    let mut server = start_with("user = \"nobody\"", 2);
    let pids = server.worker_pids();
    if is_root() {
        let user = nobody();
        for &pid in &pids {
            assert_runs_as(pid, user.uid, user.gid, &nobody_groups());
        }
        assert_eq!(proc_ids(server.master_pid(), "Uid"), [0; 4], "master");
        assert!(!server.master_output().contains("not root"));
    } else {
        server.wait_for_log(&not_root_warning("user"));
        let me = nix::unistd::geteuid().as_raw();
        for &pid in &pids {
            assert_eq!(proc_ids(pid, "Uid")[1], me, "worker {pid} keeps our uid");
        }
    }
    echo_round_trip(server.port);
}

#[test]
fn group_alone_changes_only_the_group() {
    let gid = nobody().gid;
    let mut server = start_with(&format!("group = {gid}"), 1);
    let pid = server.worker_pids()[0];
    if is_root() {
        assert_runs_as(pid, Uid::from_raw(0), gid, &[gid]);
    } else {
        server.wait_for_log(&not_root_warning("group"));
        let my_gid = nix::unistd::getegid().as_raw();
        assert_eq!(proc_ids(pid, "Gid")[1], my_gid, "worker keeps our gid");
    }
    echo_round_trip(server.port);
}

#[test]
fn a_port_below_1024_is_bound_by_the_master_before_the_drop() {
    let Some(port) = (600..1024).find(|&p| port_is_free(p)) else {
        // Not root (and the sysctl ip_unprivileged_port_start not lowered): such a master
        // cannot have these ports either, and must say so before forking anything.
        assert!(!is_root(), "no free port in 600..1024");
        let (dir, config) = config_with("user = \"nobody\"", 1);
        let text = std::fs::read_to_string(&config).unwrap();
        std::fs::write(&config, text.replace("127.0.0.1:0", "127.0.0.1:600")).unwrap();
        let (out, err) = refused_start(&config);
        assert!(err.contains("127.0.0.1:600"), "{err}");
        assert!(!out.contains("started"));
        assert!(!dir.path().join("wsd.pid").exists());
        return;
    };
    let (dir, config) = config_with("user = \"nobody\"", 2);
    let text = std::fs::read_to_string(&config).unwrap();
    std::fs::write(
        &config,
        text.replace("127.0.0.1:0", &format!("127.0.0.1:{port}")),
    )
    .unwrap();
    let mut server = Server::start_with(wsd_bin(), dir, config);
    assert_eq!(server.port, port);
    if is_root() {
        let user = nobody();
        for pid in server.worker_pids() {
            assert_runs_as(pid, user.uid, user.gid, &nobody_groups());
        }
    } else {
        server.wait_for_log(&not_root_warning("user"));
    }
    echo_round_trip(port);
}

#[test]
fn workers_that_dropped_root_still_die_with_their_master() {
    let mut server = start_with("user = \"nobody\"", 2);
    let pids = server.worker_pids();
    if is_root() {
        let user = nobody();
        for &pid in &pids {
            assert_runs_as(pid, user.uid, user.gid, &nobody_groups());
        }
    } else {
        server.wait_for_log(&not_root_warning("user"));
    }
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(server.master_pid()),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    // waitpid on the master: from here its death is a fact, and PDEATHSIG has been sent.
    server.wait_exit(DEADLINE);
    wait_for(
        "every worker to die with the master",
        Duration::from_secs(1),
        || pids.iter().all(|&pid| exited(pid)).then_some(()),
    );
}

#[test]
fn unknown_user_or_group_is_a_config_error_with_its_place() {
    for (line, reason) in [
        (
            "user = \"no-such-user-xyz\"",
            "2:8: unknown user \"no-such-user-xyz\"",
        ),
        (
            "group = \"no-such-group-xyz\"",
            "2:9: unknown group \"no-such-group-xyz\"",
        ),
    ] {
        let (dir, config) = config_with(line, 1);
        for cmd in ["check", "start"] {
            let out = Command::new(wsd_bin())
                .args(["-c", config.to_str().unwrap(), cmd])
                .output()
                .unwrap();
            assert_eq!(out.status.code(), Some(1), "{cmd} with {line}");
            let err = String::from_utf8_lossy(&out.stderr);
            assert!(
                err.contains(&format!("workers.toml:{reason}")),
                "{cmd} with {line}: {err}"
            );
        }
        assert!(!dir.path().join("wsd.pid").exists());
    }
}

/// Root is needed to take capabilities away or set securebits; without it there is no switch
/// to fail, and what must hold instead is the non-root warning with workers serving.
fn assert_non_root_master_warns_and_serves() {
    let server = start_with("user = \"nobody\"", 1);
    server.wait_for_log(&not_root_warning("user"));
    assert!(!server.master_output().contains("cannot drop privileges"));
    echo_round_trip(server.port);
}

/// Starts a root master under `setpriv` with `args`, asking for workers as nobody: every
/// worker must fail to switch with `reason` and the master must stop (a crash loop at boot).
fn assert_switch_fails(args: &[&str], reason: &str) {
    let (dir, config) = config_with("user = \"nobody\"", 2);
    let mut master = Wrapped::start(args, dir, config);
    assert_eq!(
        master.wait_exit(),
        Some(1),
        "a crash loop at boot stops the master"
    );
    let out = master.output();
    assert!(
        out.contains(&format!("cannot drop privileges to user nobody: {reason}")),
        "{out}"
    );
    assert!(!out.contains("Start success"), "{out}");
}

#[test]
fn a_worker_that_cannot_switch_user_exits_instead_of_running_as_root() {
    if !is_root() {
        return assert_non_root_master_warns_and_serves();
    }
    // Root without CAP_SETGID in its bounding set: initgroups fails with EPERM.
    assert_switch_fails(&["--bounding-set=-setgid", "--"], "initgroups: EPERM");
}

#[test]
fn a_worker_that_could_regain_root_exits() {
    if !is_root() {
        return assert_non_root_master_warns_and_serves();
    }
    // SECBIT_NO_SETUID_FIXUP keeps every capability across setuid, so setuid(0) would still
    // work after the switch: the check after the switch must catch it.
    assert_switch_fails(
        &["--securebits=+no_setuid_fixup", "--"],
        "setuid(0) still succeeds",
    );
}

#[test]
fn a_master_that_is_not_root_warns_once_and_workers_keep_its_uid() {
    if !is_root() {
        return assert_non_root_master_warns_and_serves();
    }
    // Root runs the master as nobody, asking for workers as root: that must not happen.
    let (dir, config) = config_with("user = \"root\"", 2);
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
    let user = nobody();
    let (uid, gid) = (user.uid.as_raw().to_string(), user.gid.as_raw().to_string());
    let master = Wrapped::start(
        &["--reuid", &uid, "--regid", &gid, "--clear-groups", "--"],
        dir,
        config,
    );
    let st = master.wait_ready();
    let warning = format!("running as uid {uid}, not root: [server] user ignored");
    for pid in worker_pids_in(&st) {
        assert_eq!(proc_ids(pid, "Uid"), [user.uid.as_raw(); 4], "worker {pid}");
    }
    let port = listen_port_in(&st);
    echo_round_trip(port);
    // A respawned worker does not warn again: the warning is the master's, at start.
    let victim = worker_pids_in(&st)[0];
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(victim),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let st = wait_for("slot 0 respawned", DEADLINE, || {
        let st = master.wait_ready();
        (worker_pids_in(&st)[0] != victim).then_some(st)
    });
    assert_eq!(
        proc_ids(worker_pids_in(&st)[0], "Uid"),
        [user.uid.as_raw(); 4]
    );
    let out = master.output();
    assert_eq!(out.matches(&warning).count(), 1, "{out}");
}
