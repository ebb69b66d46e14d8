//! The cluster bus as the master sees it: from the workers' reports only. The master has no
//! Redis client of its own (it forks, so it never runs threads); each worker reports its link's
//! state about once a second (`bus_state`), and the master logs the transitions of the whole
//! (once when the first worker reports Redis down, once when all reach it again) and sums the
//! states up for `status`.

use crate::bus::cluster::{STATE_DOWN, STATE_UP};
use crate::control::{BusStatus, WorkerStatus};

/// A change of the cluster bus as a whole, for the master's log.
#[derive(Debug, PartialEq, Eq)]
pub enum BusChange {
    /// The first worker (named) reports Redis down.
    Down(String),
    /// Every worker reaches Redis again.
    Back,
}

impl std::fmt::Display for BusChange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            BusChange::Down(w) => write!(f, "bus: redis down (reported by worker {w})"),
            BusChange::Back => write!(f, "bus: redis back (every worker reaches it)"),
        }
    }
}

/// Whether the master has announced an outage that has not ended yet.
#[derive(Debug, Default)]
pub struct BusWatch {
    down: bool,
}

impl BusWatch {
    /// A report from worker `reporter` said `state`; `all` is the latest state of every live
    /// worker (the reporter's included). What changed for the bus as a whole, if anything.
    pub fn observe<'a>(
        &mut self,
        reporter: &str,
        state: &str,
        all: impl IntoIterator<Item = &'a str>,
    ) -> Option<BusChange> {
        if !self.down && state == STATE_DOWN {
            self.down = true;
            return Some(BusChange::Down(reporter.to_string()));
        }
        if self.down && all.into_iter().all(|s| s == STATE_UP) {
            self.down = false;
            return Some(BusChange::Back);
        }
        None
    }
}

/// The `status` summary of the bus at `url` over the workers' rows. Workers being replaced
/// (`stopping`) do not count; a slot waiting for its worker counts as not up.
pub fn summary(url: String, rows: &[WorkerStatus]) -> BusStatus {
    let counted: Vec<&WorkerStatus> = rows.iter().filter(|w| w.status != "stopping").collect();
    let workers_up = counted
        .iter()
        .filter(|w| w.counters.bus_state == STATE_UP)
        .count();
    let down_on: Vec<String> = counted
        .iter()
        .filter(|w| w.counters.bus_state == STATE_DOWN)
        .map(|w| format!("{}#{}", w.name, w.slot))
        .collect();
    let state = if !down_on.is_empty() {
        "down"
    } else if workers_up == counted.len() {
        "up"
    } else {
        "connecting"
    };
    BusStatus {
        url,
        state: state.into(),
        workers_up,
        workers: counted.len(),
        down_on,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bus::cluster::STATE_CONNECTING;
    use crate::control::Counters;

    #[test]
    fn the_master_logs_an_outage_once_and_its_end_once() {
        let mut w = BusWatch::default();
        assert_eq!(w.observe("chat#0", STATE_UP, [STATE_UP, STATE_UP]), None);
        let down = w.observe("chat#1", STATE_DOWN, [STATE_UP, STATE_DOWN]);
        assert_eq!(down, Some(BusChange::Down("chat#1".into())));
        assert_eq!(
            down.unwrap().to_string(),
            "bus: redis down (reported by worker chat#1)"
        );
        assert_eq!(
            w.observe("chat#0", STATE_DOWN, [STATE_DOWN, STATE_DOWN]),
            None
        );
        assert_eq!(
            w.observe("chat#1", STATE_DOWN, [STATE_DOWN, STATE_DOWN]),
            None
        );
        // Back only when every worker is.
        assert_eq!(w.observe("chat#0", STATE_UP, [STATE_UP, STATE_DOWN]), None);
        assert_eq!(
            w.observe("chat#1", STATE_UP, [STATE_UP, STATE_UP]),
            Some(BusChange::Back)
        );
        assert_eq!(w.observe("chat#1", STATE_UP, [STATE_UP, STATE_UP]), None);
        // Starting up is not an outage; a later failure is a new one.
        assert_eq!(
            w.observe("chat#2", STATE_CONNECTING, [STATE_CONNECTING]),
            None
        );
        assert!(w.observe("chat#2", STATE_DOWN, [STATE_DOWN]).is_some());
    }

    fn row(slot: usize, status: &str, bus: &str) -> WorkerStatus {
        WorkerStatus {
            pid: 1,
            name: "chat".into(),
            slot,
            listen: String::new(),
            status: status.into(),
            uptime_secs: 0,
            qps: 0.0,
            accept_queue: 0,
            backlog: 0,
            counters: Counters {
                bus_state: bus.into(),
                ..Counters::default()
            },
        }
    }

    #[test]
    fn status_sums_up_the_workers() {
        let url = || "redis://127.0.0.1:6379/0".to_string();
        let up = summary(url(), &[row(0, "idle", STATE_UP), row(1, "busy", STATE_UP)]);
        assert_eq!((up.state.as_str(), up.workers_up, up.workers), ("up", 2, 2));
        let down = summary(
            url(),
            &[row(0, "idle", STATE_UP), row(1, "idle", STATE_DOWN)],
        );
        assert_eq!(down.state, "down");
        assert_eq!(down.down_on, ["chat#1"]);
        let starting = summary(url(), &[row(0, "idle", STATE_UP), row(1, "starting", "")]);
        assert_eq!(
            (starting.state.as_str(), starting.workers_up),
            ("connecting", 1)
        );
        // A worker being replaced does not count.
        let reload = summary(
            url(),
            &[row(0, "stopping", STATE_DOWN), row(0, "idle", STATE_UP)],
        );
        assert_eq!((reload.state.as_str(), reload.workers), ("up", 1));
    }
}
