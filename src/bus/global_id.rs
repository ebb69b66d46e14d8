//! A connection's id anywhere on the bus, and its text form (`3f2a9c0d11e87b45-2-17-42`):
//! what apps hand to clients and backends, and get back. An exec handler's every event and
//! command carries one, so both ways are written by hand, in one pass, with no allocation.

use crate::ConnId;
use std::fmt;
use std::str::FromStr;

/// A connection anywhere on the bus: the host (wsd master) that holds it, the worker slot, and
/// the worker-local id. Its text form (`Display`/`FromStr`) is
/// `HOST-SLOT-INDEX-SERIAL`, the host in hex: `3f2a9c0d11e87b45-2-17-42`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct GlobalId {
    /// The wsd master (host) that holds the connection.
    pub host: u64,
    /// The worker slot in its group.
    pub slot: u16,
    pub(crate) conn: ConnId,
}

impl GlobalId {
    /// The worker-local id, valid in the worker that holds the connection.
    pub fn conn(&self) -> ConnId {
        self.conn
    }

    /// The text form, on the stack.
    pub(crate) fn text(&self) -> IdText {
        const HEX: &[u8; 16] = b"0123456789abcdef";
        let mut buf = [0u8; IdText::MAX];
        for (i, b) in buf[..16].iter_mut().enumerate() {
            *b = HEX[(self.host >> (60 - 4 * i)) as usize & 0xf];
        }
        let mut len = 16;
        for n in [
            u64::from(self.slot),
            u64::from(self.conn.idx),
            self.conn.serial,
        ] {
            buf[len] = b'-';
            len += 1 + decimal(n, &mut buf[len + 1..]);
        }
        IdText { buf, len }
    }
}

/// Writes `n` in decimal at the start of `out`; how many digits it took.
fn decimal(mut n: u64, out: &mut [u8]) -> usize {
    let mut digits = [0u8; 20];
    let mut at = digits.len();
    loop {
        at -= 1;
        digits[at] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    let len = digits.len() - at;
    out[..len].copy_from_slice(&digits[at..]);
    len
}

/// A [`GlobalId`]'s text, kept on the stack.
pub(crate) struct IdText {
    buf: [u8; IdText::MAX],
    len: usize,
}

impl IdText {
    /// 16 hex digits, a `u16`, a `u32` and a `u64` in decimal, and three dashes.
    const MAX: usize = 16 + 5 + 10 + 20 + 3;

    pub(crate) fn as_str(&self) -> &str {
        std::str::from_utf8(self.as_bytes()).expect("ASCII digits and dashes")
    }

    pub(crate) fn as_bytes(&self) -> &[u8] {
        &self.buf[..self.len]
    }
}

impl fmt::Display for GlobalId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.text().as_str())
    }
}

/// Why a string is not a [`GlobalId`].
#[derive(Debug, PartialEq, Eq)]
pub struct BadGlobalId(pub String);

impl fmt::Display for BadGlobalId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "not a connection id: {:?} (expected HOST-SLOT-INDEX-SERIAL)",
            self.0
        )
    }
}

impl std::error::Error for BadGlobalId {}

impl FromStr for GlobalId {
    type Err = BadGlobalId;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || BadGlobalId(s.to_string());
        let mut r = Reader {
            text: s.as_bytes(),
            at: 0,
        };
        let host = r.number(16, u64::MAX).ok_or_else(bad)?;
        r.dash().ok_or_else(bad)?;
        let slot = r.number(10, u64::from(u16::MAX)).ok_or_else(bad)?;
        r.dash().ok_or_else(bad)?;
        let idx = r.number(10, u64::from(u32::MAX)).ok_or_else(bad)?;
        r.dash().ok_or_else(bad)?;
        let serial = r.number(10, u64::MAX).ok_or_else(bad)?;
        if r.at != r.text.len() {
            return Err(bad());
        }
        Ok(GlobalId {
            host,
            slot: slot as u16,
            conn: ConnId {
                serial,
                idx: idx as u32,
            },
        })
    }
}

/// An id's text, read once from start to end.
struct Reader<'a> {
    text: &'a [u8],
    at: usize,
}

impl Reader<'_> {
    /// One digit or more in `radix` (10 or 16), up to `max`.
    fn number(&mut self, radix: u64, max: u64) -> Option<u64> {
        let start = self.at;
        let mut n: u64 = 0;
        while let Some(&c) = self.text.get(self.at) {
            let digit = match c {
                b'0'..=b'9' => c - b'0',
                b'a'..=b'f' if radix == 16 => c - b'a' + 10,
                b'A'..=b'F' if radix == 16 => c - b'A' + 10,
                _ => break,
            };
            n = n.checked_mul(radix)?.checked_add(u64::from(digit))?;
            self.at += 1;
        }
        (self.at > start && n <= max).then_some(n)
    }

    fn dash(&mut self) -> Option<()> {
        let is = self.text.get(self.at) == Some(&b'-');
        self.at += usize::from(is);
        is.then_some(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn global_ids_read_back_what_they_print() {
        let id = GlobalId {
            host: 0x3f2a_9c0d_11e8_7b45,
            slot: 2,
            conn: ConnId {
                serial: 42,
                idx: 17,
            },
        };
        assert_eq!(id.to_string(), "3f2a9c0d11e87b45-2-17-42");
        assert_eq!(id.to_string().parse::<GlobalId>(), Ok(id));
        let widest = GlobalId {
            host: u64::MAX,
            slot: u16::MAX,
            conn: ConnId {
                serial: u64::MAX,
                idx: u32::MAX,
            },
        };
        assert_eq!(widest.text().as_str().len(), IdText::MAX);
        assert_eq!(widest.to_string().parse::<GlobalId>(), Ok(widest));
        let small = GlobalId {
            host: 1,
            slot: 0,
            conn: ConnId { serial: 0, idx: 0 },
        };
        assert_eq!(small.to_string(), "0000000000000001-0-0-0");
        assert_eq!("1-0-0-0".parse::<GlobalId>(), Ok(small));
        for bad in [
            "",
            "1-2-3",
            "zz-1-2-3",
            "1-2-3-4-5",
            "1--3-4",
            "1-2-3-",
            "-1-2-3",
            "1-65536-3-4",
            "1-2-4294967296-4",
            "10000000000000000-1-2-3",
            "1-2-3-18446744073709551616",
            "1-+2-3-4",
            "1-2-3-4 ",
        ] {
            assert!(bad.parse::<GlobalId>().is_err(), "{bad}");
        }
    }
}
