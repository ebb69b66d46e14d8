//! [`ConnId`]: how hooks, the bus and the control path name a connection.

use serde::{Deserialize, Serialize};
use std::fmt;

/// A connection, as hooks name it (Workerman's `$connection->id`).
///
/// It names one connection for good: an id of a closed connection never names a new one, so a
/// late `send` to it fails instead of reaching a stranger. It also stays the connection's
/// when a reload or an upgrade hands the connection to the slot's next worker, so an id an app
/// kept (in its state, in a database, as a [`crate::bus::GlobalId`]) still reaches it there.
///
/// The serial's high half is drawn at random when the worker that accepted the connection
/// starts, its low half counts that worker's connections: the workers that follow each other
/// in a slot never hand out the same id.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct ConnId {
    pub(crate) serial: u64,
    /// Where the accepting worker keeps the connection; a worker that adopted it may keep it
    /// elsewhere (`Context::index_of`).
    pub(crate) idx: u32,
}

impl ConnId {
    /// The number shown in logs and `Display`: 1 for the accepting worker's first connection,
    /// and so on.
    pub fn number(self) -> u32 {
        self.serial as u32
    }
}

impl fmt::Display for ConnId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.number())
    }
}

/// Serials for the connections one worker accepts: a random high half, a counting low half.
#[derive(Debug)]
pub(crate) struct Serials {
    next: u64,
}

impl Serials {
    pub(crate) fn new() -> Serials {
        use std::hash::{BuildHasher, Hasher};
        // std's hasher keys are drawn from the OS's random source for each `RandomState`.
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u32(std::process::id());
        let high = h.finish() & 0xffff_ffff_0000_0000;
        Serials { next: high }
    }

    /// The next serial; the low half skips 0, so `number()` starts at 1.
    pub(crate) fn next(&mut self) -> u64 {
        let high = self.next & 0xffff_ffff_0000_0000;
        let low = (self.next as u32).wrapping_add(1).max(1);
        self.next = high | u64::from(low);
        self.next
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serials_count_from_one_under_a_random_high_half() {
        let (mut a, mut b) = (Serials::new(), Serials::new());
        let (a1, b1) = (a.next(), b.next());
        assert_eq!((a1 as u32, a.next() as u32), (1, 2));
        assert_ne!(a1 >> 32, b1 >> 32, "two workers draw different halves");
        let id = ConnId { serial: a1, idx: 0 };
        assert_eq!(id.to_string(), "1");
    }
}
