//! systemd's readiness protocol (`sd_notify(3)`, `Type=notify`): the master tells the service
//! manager when it is really serving, when it reloads and when it stops.
//!
//! Only the master speaks it (`NotifyAccess=main`); each worker drops `NOTIFY_SOCKET` from its
//! environment right after the fork (`sys::forget_notify_socket`), so neither a worker nor
//! anything it might run can confuse the manager. Without `NOTIFY_SOCKET` (not under systemd)
//! every call is a no-op. Failures are logged, never fatal: a lost notification must not take
//! the server down.

use sd_notify::NotifyState;

fn send(states: &[NotifyState]) {
    if std::env::var_os("NOTIFY_SOCKET").is_none() {
        return;
    }
    if let Err(e) = sd_notify::notify(states) {
        log::warn!("cannot notify systemd: {e}");
    }
}

/// Every worker is up: `READY=1`, with a status line.
pub(crate) fn ready(status: &str) {
    send(&[NotifyState::Ready, NotifyState::Status(status)]);
}

/// A reload has begun; `READY=1` follows when it is over. systemd wants the monotonic time
/// with `RELOADING=1` to match it with the `ExecReload=` it started.
pub(crate) fn reloading() {
    let mut states = vec![NotifyState::Reloading, NotifyState::Status("reloading")];
    match NotifyState::monotonic_usec_now() {
        Ok(now) => states.push(now),
        Err(e) => log::warn!("cannot read the monotonic clock: {e}"),
    }
    send(&states);
}

/// The master has begun stopping.
pub(crate) fn stopping(status: &str) {
    send(&[NotifyState::Stopping, NotifyState::Status(status)]);
}

/// A binary upgrade hands the service to another process: `MAINPID=`, sent by the main
/// process (the old master) so that `NotifyAccess=main` accepts it.
pub(crate) fn main_pid(pid: u32) {
    send(&[NotifyState::MainPid(pid)]);
}

/// A one-line status for `systemctl status`.
pub(crate) fn status(status: &str) {
    send(&[NotifyState::Status(status)]);
}
