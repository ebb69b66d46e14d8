//! The worker's wake-up for its next deadline (timers, the sweep tick, a retry): one timerfd in
//! the poll set, so that a sleeping `epoll_wait` carries no timeout of its own.
//!
//! Why: with a timeout, every turn that goes to sleep arms a kernel hrtimer and every wake-up
//! cancels it, each a reprogramming of the CPU's timer (a trap to the hypervisor on a VM).
//! At 20,000 messages a second over 1,000 connections nearly every turn sleeps, and that cost
//! ~3 % of the worker's CPU. The timerfd is set only when the next deadline changes, a few
//! times a second.

use nix::sys::time::TimeSpec;
use nix::sys::timerfd::{ClockId, Expiration, TimerFd, TimerFlags, TimerSetTimeFlags};
use std::io;
use std::os::fd::{AsFd, AsRawFd, RawFd};
use std::time::{Duration, Instant};

pub(crate) struct Alarm {
    timer: TimerFd,
    /// The deadline the timer is set for, until it fires.
    armed: Option<Instant>,
}

impl Alarm {
    pub fn new() -> io::Result<Alarm> {
        let timer = TimerFd::new(
            ClockId::CLOCK_MONOTONIC,
            TimerFlags::TFD_NONBLOCK | TimerFlags::TFD_CLOEXEC,
        )?;
        Ok(Alarm { timer, armed: None })
    }

    pub fn raw_fd(&self) -> RawFd {
        self.timer.as_fd().as_raw_fd()
    }

    /// Makes the timer fire at `at` (at once if that has passed), unless it is set for it.
    pub fn set(&mut self, at: Instant) -> io::Result<()> {
        if self.armed == Some(at) {
            return Ok(());
        }
        // A zero expiration would disarm the timer instead.
        let after = at
            .saturating_duration_since(Instant::now())
            .max(Duration::from_nanos(1));
        self.timer.set(
            Expiration::OneShot(TimeSpec::from_duration(after)),
            TimerSetTimeFlags::empty(),
        )?;
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
