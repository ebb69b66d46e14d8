//! Where a worker's sockets are read into, and what a received message may point into.
//!
//! A connection has no read buffer of its own (an idle one holds none): the worker reads each
//! socket into the free room of one *chunk* of `read_buffer_size` bytes. A payload of
//! `LEND_MIN` (1 KiB) or more is *lent*: the message is a view into the chunk, so receiving
//! it costs neither a copy nor an allocation. At 4 KiB those two were a sixth of the worker's
//! user-space time. A chunk is reused once no message points into it any more.
//!
//! A view keeps its whole chunk alive, so a 1 KiB message that the app keeps, or that waits
//! in a slow client's queue, holds 64 KiB. That is bounded here rather than left to the app:
//! a worker has at most [`LENT_BUDGET`] of chunks (at least two, at most 64). While every one
//! of them is still pointed into, reads go to a spill buffer whose payloads are copied, not
//! lent, until a chunk comes free.

use bytes::BytesMut;

/// The most memory a worker's chunks may take (1 MiB: 16 chunks of the default 64 KiB).
pub(super) const LENT_BUDGET: usize = 1 << 20;
/// The most chunks, whatever their size: finding a free one looks at each.
const MAX_CHUNKS: usize = 64;

pub(super) struct ReadBuffers {
    /// Reads land in its free room; it is empty between reads.
    current: BytesMut,
    /// Chunks set aside while messages still point into them (each empty).
    parked: Vec<BytesMut>,
    /// Never lent from: reads go here while every chunk is in use.
    spill: BytesMut,
    size: usize,
    max_chunks: usize,
}

impl ReadBuffers {
    pub(super) fn new(size: usize) -> ReadBuffers {
        ReadBuffers {
            current: BytesMut::with_capacity(size),
            parked: Vec::new(),
            spill: BytesMut::new(),
            size,
            max_chunks: (LENT_BUDGET / size).clamp(2, MAX_CHUNKS),
        }
    }

    /// The buffer for the next read, empty with room for at least a quarter of
    /// `read_buffer_size`, and whether payloads read into it may be lent.
    pub(super) fn next(&mut self) -> (&mut BytesMut, bool) {
        debug_assert!(self.current.is_empty() && self.spill.is_empty());
        // A chunk's room shrinks as payloads are split off its front; `try_reclaim` takes the
        // whole chunk back, without allocating, once nothing points into it.
        if self.current.capacity() >= self.size / 4 || self.current.try_reclaim(self.size) {
            return (&mut self.current, true);
        }
        if let Some(free) = self
            .parked
            .iter_mut()
            .position(|c| c.try_reclaim(self.size))
        {
            std::mem::swap(&mut self.current, &mut self.parked[free]);
        } else if self.parked.len() + 1 < self.max_chunks {
            let fresh = BytesMut::with_capacity(self.size);
            self.parked
                .push(std::mem::replace(&mut self.current, fresh));
        } else {
            self.spill.reserve(self.size);
            return (&mut self.spill, false);
        }
        (&mut self.current, true)
    }

    /// Frees the chunks and the spill buffer that a burst needed and nothing uses any more
    /// (called from the once-a-second sweep).
    pub(super) fn trim(&mut self) {
        let size = self.size;
        self.parked.retain_mut(|c| !c.try_reclaim(size));
        self.spill = BytesMut::new();
    }

    /// Chunks set aside, and bytes of memory the chunks and the spill buffer hold (each
    /// chunk is one allocation of `size`).
    #[cfg(test)]
    fn held(&self) -> (usize, usize) {
        let chunks = 1 + self.parked.len();
        (
            self.parked.len(),
            chunks * self.size + self.spill.capacity(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::decoder::{Input, Lent};
    use bytes::Bytes;

    /// Reads `len` bytes into the next buffer and takes them as one payload, as the decoder
    /// takes a whole frame; returns it and whether it was lent.
    fn receive(bufs: &mut ReadBuffers, len: usize) -> (Bytes, bool) {
        let (buf, lend) = bufs.next();
        assert!(buf.capacity() >= len, "room {}", buf.capacity());
        buf.extend_from_slice(&vec![7; len]);
        let payload: Bytes = if lend {
            Lent(buf).take(len).into()
        } else {
            (&buf[..]).take(len).into()
        };
        buf.clear();
        (payload, lend)
    }

    #[test]
    fn a_dropped_message_gives_its_chunk_back() {
        let mut bufs = ReadBuffers::new(64 << 10);
        for _ in 0..1000 {
            let (payload, lent) = receive(&mut bufs, 4096);
            assert!(lent);
            assert_eq!(&payload[..], &[7; 4096][..]);
        }
        assert_eq!(bufs.held(), (0, 64 << 10), "one chunk, reused");
    }

    #[test]
    fn kept_messages_hold_at_most_the_budget_then_payloads_are_copied() {
        let mut bufs = ReadBuffers::new(64 << 10);
        let mut kept = Vec::new();
        let mut copied = 0;
        for _ in 0..2000 {
            let (payload, lent) = receive(&mut bufs, 4096);
            copied += usize::from(!lent);
            kept.push(payload);
        }
        let (parked, held) = bufs.held();
        assert_eq!(parked, 15, "16 chunks in all");
        assert!(held <= LENT_BUDGET + (64 << 10), "chunks and spill: {held}");
        // A chunk is read into while it has 16 KiB of room: 13 payloads of 4 KiB each. 16
        // chunks of them were lent; the rest were copied.
        assert_eq!(copied, 2000 - 16 * 13);
        // Once the app lets go, lending resumes and the sweep frees what is not needed.
        kept.clear();
        assert!(receive(&mut bufs, 4096).1);
        bufs.trim();
        assert_eq!(bufs.held(), (0, 64 << 10));
    }

    #[test]
    fn small_payloads_are_copied_and_never_hold_a_chunk() {
        let mut bufs = ReadBuffers::new(64 << 10);
        let kept: Vec<Bytes> = (0..5000).map(|_| receive(&mut bufs, 100).0).collect();
        assert_eq!(kept.len(), 5000);
        assert_eq!(bufs.held(), (0, 64 << 10));
    }

    #[test]
    fn small_read_buffers_are_at_most_64() {
        let mut bufs = ReadBuffers::new(4096);
        let kept: Vec<(Bytes, bool)> = (0..1000).map(|_| receive(&mut bufs, 1024)).collect();
        assert_eq!(kept.iter().filter(|(_, lent)| *lent).count(), 64 * 4);
        assert_eq!(bufs.held(), (63, 65 * 4096), "64 chunks and the spill");
    }

    #[test]
    fn a_large_read_buffer_still_gets_two_chunks() {
        let size = 768 << 10;
        let mut bufs = ReadBuffers::new(size);
        let kept: Vec<(Bytes, bool)> = (0..20).map(|_| receive(&mut bufs, 150 << 10)).collect();
        assert_eq!(kept.iter().filter(|(_, lent)| *lent).count(), 2 * 4);
        assert_eq!(bufs.held(), (1, 3 * size), "two chunks and the spill");
    }
}
