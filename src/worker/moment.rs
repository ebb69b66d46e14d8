//! When things happened to a connection, in 4 bytes.
//!
//! Each connection notes when it was accepted, when it was last heard from, when it was last
//! pinged and when it was first seen closing. What reads these is the once-a-second sweep
//! (deadlines, keepalive) and `wsd connections` (a connection's age), so tenths of a second
//! are precise enough. Counted from the process's first moment, tenths fit in a `u32` for 13
//! years (later moments all read as the last one), where an `Instant` takes 16 bytes: four of
//! them are 48 bytes less per connection, about a tenth of what an idle one costs.

use std::num::NonZeroU32;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// The process's first moment: everything is counted from it.
static EPOCH: OnceLock<Instant> = OnceLock::new();

const TENTH_MS: u64 = 100;

/// An instant, rounded up to the next tenth of a second (so that the time since it is never
/// overstated, and no deadline fires early).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) struct Moment(NonZeroU32);

/// The present, read once for all the connections a pass looks at, and rounded down to a
/// tenth of a second, for the same reason.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Reading(u32);

impl Moment {
    pub(crate) fn at(t: Instant) -> Moment {
        Moment(NonZeroU32::new(tenths(t, true)).unwrap_or(NonZeroU32::MAX))
    }

    /// The time from this moment to `now`, understated by less than two tenths (zero if
    /// `now` is earlier).
    pub(crate) fn elapsed(self, now: Reading) -> Duration {
        Duration::from_millis(u64::from(now.0.saturating_sub(self.0.get())) * TENTH_MS)
    }
}

impl Reading {
    pub(crate) fn of(now: Instant) -> Reading {
        Reading(tenths(now, false))
    }
}

/// Tenths of a second from the epoch to `t`, plus 1 (the epoch itself is 1, so that
/// `Option<Moment>` takes no more room).
fn tenths(t: Instant, round_up: bool) -> u32 {
    let epoch = *EPOCH.get_or_init(|| t);
    let ms = t.saturating_duration_since(epoch).as_millis();
    let tenth = u128::from(TENTH_MS);
    let tenths = if round_up {
        ms.div_ceil(tenth)
    } else {
        ms / tenth
    };
    u32::try_from(tenths + 1).unwrap_or(u32::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn time_since_a_moment_is_never_overstated() {
        let t0 = Instant::now();
        let m = Moment::at(t0);
        for ms in [0, 1, 99, 100, 101, 950, 1_000, 1_001, 60_000] {
            let now = t0 + Duration::from_millis(ms);
            let e = m.elapsed(Reading::of(now));
            assert!(e <= Duration::from_millis(ms), "{ms} ms: {e:?}");
            assert!(
                e + Duration::from_millis(200) > Duration::from_millis(ms),
                "{ms} ms: {e:?}"
            );
        }
        assert_eq!(
            Moment::at(t0 + Duration::from_secs(5)).elapsed(Reading::of(t0)),
            Duration::ZERO
        );
        assert!(Moment::at(t0) <= Moment::at(t0 + Duration::from_millis(150)));
        assert_eq!(std::mem::size_of::<Option<Moment>>(), 4);
    }
}
