//! Hook timers: Workerman's `Timer::add` / `Timer::del`, on the worker's own thread.
//!
//! A binary heap of deadlines plus a map of live timers. Deleting a timer removes it from the
//! map only; its heap entry is skipped when it comes up, or dropped once dead entries are
//! most of the heap. While a callback runs it is taken out
//! of its entry, so the callback may add or delete timers (itself included) freely.

use super::Context;
use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::time::{Duration, Instant};

/// Names a timer for [`Context::del_timer`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct TimerId(u64);

pub(crate) type TimerFn = Box<dyn FnMut(&mut Context)>;

struct Entry {
    every: Option<Duration>,
    /// `None` while the callback is running.
    callback: Option<TimerFn>,
}

/// A repeating timer never fires more often than this, so a zero interval cannot spin.
const MIN_INTERVAL: Duration = Duration::from_millis(1);

#[derive(Default)]
pub(crate) struct Timers {
    next_id: u64,
    entries: HashMap<u64, Entry>,
    queue: BinaryHeap<Reverse<(Instant, u64)>>,
}

impl Timers {
    pub fn add(&mut self, after: Duration, every: Option<Duration>, callback: TimerFn) -> TimerId {
        self.next_id += 1;
        let id = self.next_id;
        let every = every.map(|e| e.max(MIN_INTERVAL));
        self.entries.insert(
            id,
            Entry {
                every,
                callback: Some(callback),
            },
        );
        self.queue.push(Reverse((Instant::now() + after, id)));
        TimerId(id)
    }

    pub fn del(&mut self, id: TimerId) -> bool {
        let live = self.entries.remove(&id.0).is_some();
        // An app that re-arms a long timeout on every message deletes far more timers than
        // come due: once most heap entries are dead, drop them (amortised O(1) a deletion).
        if self.queue.len() > 2 * self.entries.len() + 64 {
            let entries = &self.entries;
            self.queue
                .retain(|Reverse((_, id))| entries.contains_key(id));
        }
        live
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// The earliest deadline, possibly of a deleted timer (then the loop wakes early, harmlessly).
    pub fn next_deadline(&self) -> Option<Instant> {
        self.queue.peek().map(|Reverse((at, _))| *at)
    }

    /// Takes the callback of the next timer due at or before `now`.
    pub fn pop_due(&mut self, now: Instant) -> Option<(TimerId, Instant, TimerFn)> {
        while let Some(Reverse((at, id))) = self.queue.peek().copied() {
            if at > now {
                return None;
            }
            self.queue.pop();
            if let Some(cb) = self.entries.get_mut(&id).and_then(|e| e.callback.take()) {
                return Some((TimerId(id), at, cb));
            }
        }
        None
    }

    /// Puts a callback back after it ran: re-arms a repeating timer unless it was deleted
    /// meanwhile; forgets a one-shot.
    pub fn finish(&mut self, id: TimerId, due: Instant, callback: TimerFn, now: Instant) {
        let Some(entry) = self.entries.get_mut(&id.0) else {
            return;
        };
        match entry.every {
            Some(every) => {
                entry.callback = Some(callback);
                // Keep the cadence, but do not try to catch up after a long stall.
                let next = (due + every).max(now + MIN_INTERVAL.min(every));
                let next = if next + every < now {
                    now + every
                } else {
                    next
                };
                self.queue.push(Reverse((next, id.0)));
            }
            None => {
                self.entries.remove(&id.0);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn noop() -> TimerFn {
        Box::new(|_| {})
    }

    #[test]
    fn due_order_and_deletion() {
        let mut t = Timers::default();
        let a = t.add(Duration::from_millis(20), None, noop());
        let b = t.add(Duration::ZERO, Some(Duration::from_millis(10)), noop());
        assert_eq!(t.len(), 2);
        let now = Instant::now();
        let (id, due, cb) = t.pop_due(now).expect("b is due");
        assert_eq!(id, b);
        assert!(t.pop_due(now).is_none(), "a is not due yet, b is running");
        t.finish(id, due, cb, now);
        assert!(t.next_deadline().unwrap() > now);
        assert!(t.del(a));
        assert!(!t.del(a));
        let later = now + Duration::from_millis(50);
        let (id, due, cb) = t.pop_due(later).expect("b again");
        assert_eq!(id, b);
        assert!(t.pop_due(later).is_none(), "deleted a never fires");
        t.finish(id, due, cb, later);
        assert_eq!(t.len(), 1);
    }

    #[test]
    fn deleted_timers_do_not_pile_up_until_their_deadline() {
        let mut t = Timers::default();
        let keep = t.add(Duration::from_secs(60), None, noop());
        for _ in 0..100_000 {
            let id = t.add(Duration::from_secs(60), None, noop());
            assert!(t.del(id));
        }
        assert_eq!(t.len(), 1);
        assert!(t.queue.len() <= 2 + 64, "{} heap entries", t.queue.len());
        let later = Instant::now() + Duration::from_secs(61);
        let (id, _, _) = t.pop_due(later).expect("the kept timer still fires");
        assert_eq!(id, keep);
    }

    #[test]
    fn one_shot_is_forgotten_and_deleted_while_running_is_not_rearmed() {
        let mut t = Timers::default();
        let a = t.add(Duration::ZERO, None, noop());
        let b = t.add(Duration::ZERO, Some(Duration::from_millis(1)), noop());
        let now = Instant::now() + Duration::from_millis(1);
        let (id, due, cb) = t.pop_due(now).unwrap();
        t.finish(id, due, cb, now);
        let (id2, due2, cb2) = t.pop_due(now).unwrap();
        assert!(t.del(id2));
        t.finish(id2, due2, cb2, now);
        assert_eq!(
            t.len(),
            0,
            "{a:?} one-shot gone, {b:?} deleted while running"
        );
        assert!(t.pop_due(now + Duration::from_secs(1)).is_none());
    }
}
