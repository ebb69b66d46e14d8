//! Retry delays that double from a floor up to a ceiling and start again at the floor after a
//! success: the master's respawn of a crashing worker slot, and the cluster bus's reconnects.

use std::time::Duration;

#[derive(Debug, Clone)]
pub struct Backoff {
    floor: Duration,
    ceiling: Duration,
    /// The last delay given; zero before the first and after a reset.
    last: Duration,
}

impl Backoff {
    pub const fn new(floor: Duration, ceiling: Duration) -> Backoff {
        Backoff {
            floor,
            ceiling,
            last: Duration::ZERO,
        }
    }

    /// The floor the first time, then twice the last delay, at most the ceiling.
    pub fn next_delay(&mut self) -> Duration {
        self.last = if self.last.is_zero() {
            self.floor
        } else {
            (self.last * 2).min(self.ceiling)
        };
        self.last
    }

    /// The next delay is the floor again.
    pub fn reset(&mut self) {
        self.last = Duration::ZERO;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn millis(b: &mut Backoff, n: usize) -> Vec<u64> {
        (0..n).map(|_| b.next_delay().as_millis() as u64).collect()
    }

    #[test]
    fn backoff_doubles_to_a_ceiling_and_resets() {
        let floor = Duration::from_millis(100);
        let mut b = Backoff::new(floor, Duration::from_secs(5));
        assert_eq!(
            millis(&mut b, 9),
            [100, 200, 400, 800, 1600, 3200, 5000, 5000, 5000]
        );
        b.reset();
        assert_eq!(b.next_delay(), floor);
    }

    #[test]
    fn each_caller_keeps_its_own_floor_and_ceiling() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(30));
        let delays = millis(&mut b, 12);
        assert_eq!(delays[..3], [100, 200, 400]);
        assert_eq!(delays[8..], [25_600, 30_000, 30_000, 30_000]);
    }
}
