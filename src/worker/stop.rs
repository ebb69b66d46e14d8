//! Stopping a worker: the three stop modes, what sets them off (a `Stop` from the master, the
//! master going away, a SIGTERM sent to the worker itself), and the loop's way out.
//!
//! `Drain` only stops accepting and waits; `Close` sends every client Close 1001, spread over
//! a window; `Fast` sends them all at once and leaves. Why spread: closing every client at the
//! same instant makes them all reconnect at the same instant, into the workers that are left
//! (or the new ones of a reload). So the closes go out at an even pace over `spread_ms`: by
//! time `t` into window `w`, `ceil(n * t / w)` of the `n` connections have been sent Close.
//! The loop asks [`CloseSpread::take_due`] on every turn and wakes at
//! [`CloseSpread::next_due`] while some are left.

use super::event_loop::Loop;
use super::hooks::WorkerHook;
use crate::ConnId;
use crate::control::StopMode;
use crate::proto::close;
use nix::sys::signal::Signal;
use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// The close reason of every stop.
const SHUTTING_DOWN: &str = "server shutting down";

/// Whether the worker is stopping, and how. A stop only ever grows stronger:
/// serving → drain → close → fast.
pub(super) enum Stopping {
    /// Not told to stop.
    No,
    /// Not accepting; waiting for the clients to leave.
    Drain,
    /// Sending every client Close 1001 on the spread's schedule, then waiting for the closing
    /// handshakes. `since`: when the stop came, which bounds the upgrades still under way.
    Close { since: Instant, spread: CloseSpread },
    /// Closes sent at once; the loop leaves without waiting.
    Fast,
}

impl Stopping {
    pub(super) fn mode(&self) -> Option<StopMode> {
        match self {
            Stopping::No => None,
            Stopping::Drain => Some(StopMode::Drain),
            Stopping::Close { .. } => Some(StopMode::Close),
            Stopping::Fast => Some(StopMode::Fast),
        }
    }

    /// When a stop that closes clients came (a fast one leaves at once).
    pub(super) fn closing_since(&self) -> Option<Instant> {
        match self {
            Stopping::Close { since, .. } => Some(*since),
            _ => None,
        }
    }

    /// When the next Close of the spread falls due.
    pub(super) fn next_due(&self) -> Option<Instant> {
        match self {
            Stopping::Close { spread, .. } => spread.next_due(),
            _ => None,
        }
    }
}

impl Loop {
    /// Stops the worker, or makes a stop under way stronger (Drain → Close → Fast); a stop no
    /// stronger than the current one is ignored.
    ///
    /// The first stop stops accepting and calls `on_worker_stop`. Then `Drain` waits for the
    /// clients to leave, `Close` sends them Close 1001 spread over `spread` and waits for the
    /// closing handshakes (each bounded by `close_timeout`), and `Fast` sends Close 1001, writes
    /// once what each socket takes, and the loop exits without waiting for answers.
    pub(super) fn stop(&mut self, mode: StopMode, spread: Duration) {
        let current = self.stopping.mode();
        if let Some(current) = current
            && current >= mode
        {
            log::debug!("already stopping ({current:?}); {mode:?} ignored");
            return;
        }
        if current.is_none() {
            // Only our copy of the listening socket goes, and it is not shut down: the master
            // keeps the socket, and in a rolling reload the new worker accepts from it.
            if let Some(mut listener) = self.accepting.close() {
                let _ = self.poll.registry().deregister(&mut listener);
            }
            if let Some(api) = self.api.as_mut() {
                api.close_listener(self.poll.registry());
            }
            self.call_worker_hook(WorkerHook::Stop);
            // A reload's handoff: what can go to the new worker goes before any is closed.
            self.hand_off_all();
        }
        let clients = self.ctx.connections().len();
        match mode {
            StopMode::Drain => {
                log::info!("stopping (waiting for clients to leave; {clients} connected)")
            }
            StopMode::Close => log::info!(
                "stopping (closing {clients} clients over {} ms)",
                spread.as_millis()
            ),
            StopMode::Fast => log::info!("stopping fast (closing {clients} clients, no waiting)"),
        }
        // Connections still in their upgrade are left to finish it (see `upgrade`): a client
        // caught mid-handshake by a reload gets a Close, not a reset. They have `close_timeout`
        // from the stop to do so (`sweep`), not all of `handshake_timeout`: a silent connect
        // (a health check, a port scan) must not hold the stop until it is killed.
        let mut open = self.ctx.connections();
        // wss:// clients kept through a handoff's drain are closed when it ends.
        open.retain(|&id| {
            let queued = (self.ctx.index_of(id)).is_some_and(|idx| self.handoffs.queued(idx, id));
            !self.handoffs.draining(id) && !queued
        });
        match mode {
            StopMode::Drain => self.stopping = Stopping::Drain,
            StopMode::Close => {
                let now = Instant::now();
                self.stopping = Stopping::Close {
                    since: now,
                    spread: CloseSpread::new(now, spread, open),
                };
                self.close_due();
            }
            StopMode::Fast => {
                self.stopping = Stopping::Fast;
                for id in open {
                    self.ctx.close_with(id, close::GOING_AWAY, SHUTTING_DOWN);
                }
                for (_, conn) in self.ctx.conns.iter_mut() {
                    let _ = conn.flush();
                }
            }
        }
    }

    /// Sends Close 1001 to the connections whose turn in the stop's spread has come.
    pub(super) fn close_due(&mut self) {
        let Stopping::Close { spread, .. } = &mut self.stopping else {
            return;
        };
        for id in spread.take_due(Instant::now()) {
            self.ctx.close_with(id, close::GOING_AWAY, SHUTTING_DOWN);
        }
    }

    /// Closes a connection that completed its upgrade during a stop that closes clients, in
    /// its turn of the spread (or at once, past the window). Other stops leave it be.
    pub(super) fn close_if_stopping(&mut self, id: ConnId) {
        if matches!(self.stopping, Stopping::Close { .. }) && self.handed_when_stopping(id) {
            return;
        }
        match &mut self.stopping {
            Stopping::No | Stopping::Drain => {}
            Stopping::Close { spread, .. } => {
                spread.join(id);
                self.close_due();
            }
            Stopping::Fast => self.ctx.close_with(id, close::GOING_AWAY, SHUTTING_DOWN),
        }
    }

    /// Whether the loop is done: a fast stop at once, the others when no connection is left.
    pub(super) fn finished(&self) -> bool {
        match self.stopping {
            Stopping::No => false,
            Stopping::Fast => true,
            Stopping::Drain | Stopping::Close { .. } => {
                self.ctx.conns.is_empty() && self.handoffs.settled()
            }
        }
    }

    /// Leaves the loop: a last report, written if the channel takes it now.
    pub(super) fn exit(&mut self) -> i32 {
        match self.ctx.conns.len() {
            0 => log::info!("no connections left; exiting"),
            n => log::info!("exiting with {n} connections not closed yet (fast stop)"),
        }
        self.handler_stop();
        self.report();
        self.channel.flush();
        0
    }

    /// Reads the signals sent to this worker: a SIGTERM stops it, closing its clients at once;
    /// the others are the master's to act on.
    pub(super) fn read_signals(&mut self) {
        while let Ok(Some(info)) = self.signals.read_signal() {
            match Signal::try_from(info.ssi_signo as i32) {
                // Someone signalled this worker directly (the master tells it over the channel).
                Ok(Signal::SIGTERM) => self.stop(StopMode::Close, Duration::ZERO),
                // Ctrl-C reaches the whole process group; the master decides what happens.
                Ok(sig) => log::debug!("ignoring {sig}"),
                Err(_) => {}
            }
        }
    }
}

// ---- the spread schedule -----------------------------------------------------------------

pub(crate) struct CloseSpread {
    started: Instant,
    window: Duration,
    /// Connections still to be sent Close, in turn.
    waiting: VecDeque<ConnId>,
    /// Connections the schedule covers: those open at the stop and those that finished
    /// their upgrade since.
    total: usize,
    /// How many have been taken off `waiting`.
    taken: usize,
}

impl CloseSpread {
    pub(crate) fn new(now: Instant, window: Duration, conns: Vec<ConnId>) -> CloseSpread {
        CloseSpread {
            started: now,
            window,
            total: conns.len(),
            waiting: conns.into(),
            taken: 0,
        }
    }

    /// Adds a connection that completed its upgrade after the stop: it gets its turn with the
    /// others, or at once if the window has passed.
    pub(crate) fn join(&mut self, id: ConnId) {
        self.waiting.push_back(id);
        self.total += 1;
    }

    /// Takes the connections whose turn has come by `now`.
    pub(crate) fn take_due(&mut self, now: Instant) -> Vec<ConnId> {
        let elapsed = now.saturating_duration_since(self.started);
        let due = due_by(self.total, elapsed, self.window).saturating_sub(self.taken);
        let n = due.min(self.waiting.len());
        self.taken += n;
        self.waiting.drain(..n).collect()
    }

    /// When the next connection's turn comes; `None` when none is waiting.
    pub(crate) fn next_due(&self) -> Option<Instant> {
        if self.waiting.is_empty() {
            return None;
        }
        Some(self.started + due_after(self.taken + 1, self.total, self.window))
    }
}

/// How many of `total` connections should have been sent Close `elapsed` into `window`:
/// `ceil(total * elapsed / window)`, all of them once the window has passed (or is zero).
fn due_by(total: usize, elapsed: Duration, window: Duration) -> usize {
    if elapsed >= window {
        return total;
    }
    let share = total as u128 * elapsed.as_nanos();
    share.div_ceil(window.as_nanos()) as usize
}

/// How long after the start the `nth` (1-based) of `total` closes falls due: the first
/// instant at which `due_by` reaches `nth`, just past `(nth - 1) * window / total`.
fn due_after(nth: usize, total: usize, window: Duration) -> Duration {
    if nth > total {
        return window;
    }
    let nanos = (nth as u128 - 1) * window.as_nanos() / total as u128 + 1;
    Duration::from_nanos(nanos.min(u64::MAX as u128) as u64).min(window)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECOND: Duration = Duration::from_secs(1);

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn closes_are_spread_evenly_over_the_window() {
        assert_eq!(due_by(10, Duration::ZERO, SECOND), 0);
        assert_eq!(due_by(10, Duration::from_nanos(1), SECOND), 1);
        assert_eq!(due_by(10, ms(100), SECOND), 1);
        assert_eq!(due_by(10, ms(100) + Duration::from_nanos(1), SECOND), 2);
        assert_eq!(due_by(10, ms(550), SECOND), 6);
        assert_eq!(due_by(10, SECOND, SECOND), 10);
        assert_eq!(due_by(10, 2 * SECOND, SECOND), 10);
        assert_eq!(due_by(3, ms(500), SECOND), 2);
        assert_eq!(due_by(0, ms(500), SECOND), 0);
        assert_eq!(
            due_by(
                100_000,
                ms(1),
                Duration::from_secs(u64::MAX / 1_000_000_000)
            ),
            1,
            "no overflow on huge windows"
        );
    }

    #[test]
    fn a_zero_window_closes_everything_at_once() {
        assert_eq!(due_by(7, Duration::ZERO, Duration::ZERO), 7);
        let now = Instant::now();
        let mut spread = CloseSpread::new(now, Duration::ZERO, ids(7));
        assert_eq!(spread.next_due(), Some(now));
        assert_eq!(spread.take_due(now).len(), 7);
        assert_eq!(spread.next_due(), None);
    }

    #[test]
    fn each_close_falls_due_exactly_when_announced() {
        for (total, window) in [(1, SECOND), (3, SECOND), (10, ms(250)), (1000, ms(7))] {
            for nth in 1..=total {
                let at = due_after(nth, total, window);
                assert!(due_by(total, at, window) >= nth, "{nth}/{total} at {at:?}");
                let before = at - Duration::from_nanos(1);
                assert!(due_by(total, before, window) < nth, "{nth}/{total} early");
            }
        }
    }

    fn ids(n: u32) -> Vec<ConnId> {
        (1..=n)
            .map(|n| ConnId {
                serial: n.into(),
                idx: n,
            })
            .collect()
    }

    #[test]
    fn the_queue_is_taken_in_order_and_late_joiners_get_a_turn() {
        let start = Instant::now();
        let mut spread = CloseSpread::new(start, SECOND, ids(4));
        assert!(spread.take_due(start).is_empty());
        assert_eq!(spread.next_due(), Some(start + Duration::from_nanos(1)));
        let first = spread.take_due(start + ms(10));
        assert_eq!(first, ids(1));
        assert_eq!(
            spread.next_due(),
            Some(start + ms(250) + Duration::from_nanos(1))
        );
        assert_eq!(
            spread.take_due(start + ms(600)).len(),
            2,
            "due by 60%: 3 of 4"
        );

        // A connection finishing its upgrade now joins the 5 the window covers.
        spread.join(ConnId { serial: 9, idx: 9 });
        assert_eq!(spread.take_due(start + ms(700)).len(), 1, "4 of 5 by 70%");
        let last = spread.take_due(start + 2 * SECOND);
        assert_eq!(last, [ConnId { serial: 9, idx: 9 }]);
        assert_eq!(spread.next_due(), None);

        // Joining after the window: due at once.
        spread.join(ConnId {
            serial: 10,
            idx: 10,
        });
        assert!(spread.next_due().unwrap() <= start + 2 * SECOND);
        assert_eq!(spread.take_due(start + 2 * SECOND).len(), 1);
    }
}
