//! [`ConnId`]: how hooks, the bus and the control path name a connection of a worker.

use std::fmt;

/// A connection of this worker, as hooks name it (Workerman's `$connection->id`).
///
/// It stays unique for the worker's life: an id of a closed connection never names a new one,
/// so a late `send` to it fails instead of reaching a stranger.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ConnId {
    pub(crate) serial: u32,
    pub(crate) idx: u32,
}

impl ConnId {
    /// The number shown in logs and `Display`: 1 for the worker's first connection, and so on.
    pub fn number(self) -> u32 {
        self.serial
    }
}

impl fmt::Display for ConnId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.serial)
    }
}
