//! The worker's wake-up for its next deadline (timers, the sweep tick, a retry): one timerfd in
//! the poll set, so that a sleeping `epoll_wait` carries no timeout of its own.
//!
//! Why: with a timeout, every turn that goes to sleep arms a kernel hrtimer and every wake-up
//! cancels it, each a reprogramming of the CPU's timer (a trap to the hypervisor on a VM).
//! At 20,000 messages a second over 1,000 connections nearly every turn sleeps, and that cost
//! ~3 % of the worker's CPU. The timerfd is set only when the next deadline changes, a few
//! times a second.

use crate::sys;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::time::Instant;

pub(crate) struct Alarm {
    timer: OwnedFd,
    /// The deadline the timer is set for, until it fires.
    armed: Option<Instant>,
}

impl Alarm {
    pub fn new() -> io::Result<Alarm> {
        Ok(Alarm {
            timer: sys::timer_fd()?,
            armed: None,
        })
    }

    pub fn raw_fd(&self) -> RawFd {
        self.timer.as_raw_fd()
    }

    /// Makes the timer fire at `at` (at once if that has passed), unless it is set for it.
    pub fn set(&mut self, at: Instant) -> io::Result<()> {
        if self.armed == Some(at) {
            return Ok(());
        }
        let after = at.saturating_duration_since(Instant::now()).as_nanos();
        sys::arm_timer(&self.timer, u64::try_from(after).unwrap_or(u64::MAX))?;
        self.armed = Some(at);
        Ok(())
    }

    /// The timer's descriptor was readable: it fired. Clears it (edge-triggered polling
    /// reports the next expiry only once this one is read).
    pub fn fired(&mut self) {
        self.armed = None;
        let _ = nix::unistd::read(&self.timer, &mut [0u8; 8]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
    use std::os::fd::AsFd;
    use std::time::Duration;

    fn readable(alarm: &Alarm, wait_ms: u16) -> bool {
        let mut fds = [PollFd::new(alarm.timer.as_fd(), PollFlags::POLLIN)];
        poll(&mut fds, PollTimeout::from(wait_ms)).unwrap() == 1
    }

    #[test]
    fn fires_once_at_its_deadline_and_clears_when_read() {
        let mut alarm = Alarm::new().unwrap();
        let start = Instant::now();
        alarm.set(start + Duration::from_millis(20)).unwrap();
        assert!(readable(&alarm, 10_000), "fired");
        assert!(
            start.elapsed() >= Duration::from_millis(20),
            "not before its deadline"
        );
        alarm.fired();
        assert!(!readable(&alarm, 0), "cleared by fired()");
    }

    #[test]
    fn a_past_deadline_fires_at_once_and_setting_the_same_one_is_free() {
        let mut alarm = Alarm::new().unwrap();
        let past = Instant::now();
        alarm.set(past).unwrap();
        assert!(readable(&alarm, 10_000));
        alarm.fired();
        // Set for a far deadline: a second set for the same one changes nothing.
        let far = Instant::now() + Duration::from_secs(3600);
        alarm.set(far).unwrap();
        alarm.set(far).unwrap();
        assert_eq!(alarm.armed, Some(far));
        assert!(!readable(&alarm, 0));
    }
}
