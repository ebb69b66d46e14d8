//! One line per event: local time, level, process role and pid, message.
//!
//! `2026-11-24 10:00:00.123 INFO  master[4310] all workers ready`
//! `2026-11-24 10:00:05.002 WARN  chat#2[4312] ...`
//!
//! The filter is `RUST_LOG` if set, else `[server] log_level`. The role changes after fork.

use std::io::Write;
use std::sync::Mutex;

static ROLE: Mutex<String> = Mutex::new(String::new());

/// Installs the logger; later calls are ignored.
pub fn init(level: &str) {
    let filter = std::env::var("RUST_LOG").unwrap_or_else(|_| level.to_string());
    let _ = env_logger::Builder::new()
        .parse_filters(&filter)
        .format(|buf, rec| {
            let role = ROLE.lock().map(|r| r.clone()).unwrap_or_default();
            let role = if role.is_empty() {
                "wsd"
            } else {
                role.as_str()
            };
            writeln!(
                buf,
                "{} {:<5} {role}[{}] {}",
                chrono::Local::now().format("%Y-%m-%d %H:%M:%S%.3f"),
                rec.level(),
                std::process::id(),
                rec.args()
            )
        })
        .try_init();
}

/// Names this process in log lines: `master`, or `group#slot` in a worker.
pub fn set_role(role: &str) {
    if let Ok(mut r) = ROLE.lock() {
        *r = role.to_string();
    }
}
