//! The cluster bus as the master sees it: from the workers' reports only. The master has no
//! Redis client of its own (it forks, so it never runs threads); each worker reports its link's
//! state about once a second (`bus_state`), and the master logs the transitions of the whole
//! (once when the first worker reports Redis down, once when all reach it again) and sums the
//! states up for `status`.

use crate::control::{BusState, BusStatus, ClusterState, WorkerState, WorkerStatus};

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
    pub fn observe(
        &mut self,
        reporter: &str,
        state: BusState,
        all: impl IntoIterator<Item = BusState>,
    ) -> Option<BusChange> {
        if !self.down && state == BusState::Down {
            self.down = true;
            return Some(BusChange::Down(reporter.to_string()));
        }
        if self.down && all.into_iter().all(|s| s == BusState::Up) {
            self.down = false;
            return Some(BusChange::Back);
        }
        None
    }
}

/// The `status` summary of the bus at `url` over the workers' rows. Workers being replaced
/// (`stopping`) do not count; a slot waiting for its worker counts as not up.
pub fn summary(url: String, rows: &[WorkerStatus]) -> BusStatus {
    let counted: Vec<&WorkerStatus> = rows
        .iter()
        .filter(|w| w.status != WorkerState::Stopping)
        .collect();
    let workers_up = counted
        .iter()
        .filter(|w| w.counters.bus_state == BusState::Up)
        .count();
    let down_on: Vec<String> = counted
        .iter()
        .filter(|w| w.counters.bus_state == BusState::Down)
        .map(|w| format!("{}#{}", w.name, w.slot))
        .collect();
    let state = if !down_on.is_empty() {
        ClusterState::Down
    } else if workers_up == counted.len() {
        ClusterState::Up
    } else {
        ClusterState::Connecting
    };
    BusStatus {
        url,
        state,
        workers_up,
        workers: counted.len(),
        down_on,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::Counters;

    #[test]
    fn the_master_logs_an_outage_once_and_its_end_once() {
        let mut w = BusWatch::default();
        assert_eq!(
            w.observe("chat#0", BusState::Up, [BusState::Up, BusState::Up]),
            None
        );
        let down = w.observe("chat#1", BusState::Down, [BusState::Up, BusState::Down]);
        assert_eq!(down, Some(BusChange::Down("chat#1".into())));
        assert_eq!(
            down.unwrap().to_string(),
            "bus: redis down (reported by worker chat#1)"
        );
        assert_eq!(
            w.observe("chat#0", BusState::Down, [BusState::Down, BusState::Down]),
            None
        );
        assert_eq!(
            w.observe("chat#1", BusState::Down, [BusState::Down, BusState::Down]),
            None
        );
        // Back only when every worker is.
        assert_eq!(
            w.observe("chat#0", BusState::Up, [BusState::Up, BusState::Down]),
            None
        );
        assert_eq!(
            w.observe("chat#1", BusState::Up, [BusState::Up, BusState::Up]),
            Some(BusChange::Back)
        );
        assert_eq!(
            w.observe("chat#1", BusState::Up, [BusState::Up, BusState::Up]),
            None
        );
        // Starting up is not an outage; a later failure is a new one.
        assert_eq!(
            w.observe("chat#2", BusState::Connecting, [BusState::Connecting]),
            None
        );
        assert!(
            w.observe("chat#2", BusState::Down, [BusState::Down])
                .is_some()
        );
    }

    fn row(slot: usize, status: WorkerState, bus: BusState) -> WorkerStatus {
        WorkerStatus {
            pid: 1,
            name: "chat".into(),
            slot,
            listen: String::new(),
            status,
            uptime_secs: 0,
            qps: 0.0,
            api_rate: 0.0,
            accept_queue: 0,
            backlog: 0,
            counters: Counters {
                bus_state: bus,
                ..Counters::default()
            },
        }
    }

    #[test]
    fn status_sums_up_the_workers() {
        let url = || "redis://127.0.0.1:6379/0".to_string();
        let up = summary(
            url(),
            &[
                row(0, WorkerState::Idle, BusState::Up),
                row(1, WorkerState::Busy, BusState::Up),
            ],
        );
        assert_eq!(
            (up.state, up.workers_up, up.workers),
            (ClusterState::Up, 2, 2)
        );
        let down = summary(
            url(),
            &[
                row(0, WorkerState::Idle, BusState::Up),
                row(1, WorkerState::Idle, BusState::Down),
            ],
        );
        assert_eq!(down.state, ClusterState::Down);
        assert_eq!(down.down_on, ["chat#1"]);
        let starting = summary(
            url(),
            &[
                row(0, WorkerState::Idle, BusState::Up),
                row(1, WorkerState::Starting, BusState::Unknown),
            ],
        );
        assert_eq!(
            (starting.state, starting.workers_up),
            (ClusterState::Connecting, 1)
        );
        // A worker being replaced does not count.
        let reload = summary(
            url(),
            &[
                row(0, WorkerState::Stopping, BusState::Down),
                row(0, WorkerState::Idle, BusState::Up),
            ],
        );
        assert_eq!((reload.state, reload.workers), (ClusterState::Up, 1));
    }
}
