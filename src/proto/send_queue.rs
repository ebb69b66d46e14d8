//! A connection's outgoing bytes: encoded frames waiting for the socket.
//!
//! Small frames are copied into a segment the queue owns, so a burst of replies becomes one
//! `writev`; large payloads and broadcast frames are queued by reference (`Bytes`), so
//! echoing or broadcasting them never copies the payload. Written segments are freed at once:
//! one big message does not leave a connection holding its capacity forever, and an idle
//! connection's queue owns no memory.

use super::frame;
use bytes::Bytes;
use std::collections::VecDeque;
use std::io::{self, IoSlice, Write};

/// Payloads at least this long are queued by reference instead of copied.
const SHARE_MIN: usize = 1024;
/// A copied segment grows to at most this before a new one is started.
const SEGMENT_MAX: usize = 64 << 10;
/// Segments handed to one `writev`.
const MAX_IOVECS: usize = 64;

enum Segment {
    Own(Vec<u8>),
    /// A payload queued by reference, after its frame header (none for bytes that are whole
    /// frames already). The header is kept here, not in an owned segment, so queueing a
    /// large frame allocates nothing.
    Shared(frame::Header, Bytes),
}

impl Segment {
    fn len(&self) -> usize {
        match self {
            Segment::Own(v) => v.len(),
            Segment::Shared(head, payload) => head.as_bytes().len() + payload.len(),
        }
    }

    /// The bytes from `skip` on, in at most two pieces.
    fn pieces(&self, skip: usize) -> [&[u8]; 2] {
        match self {
            Segment::Own(v) => [&v[skip..], &[]],
            Segment::Shared(head, payload) => {
                let head = head.as_bytes();
                match skip.checked_sub(head.len()) {
                    None => [&head[skip..], payload],
                    Some(into_payload) => [&payload[into_payload..], &[]],
                }
            }
        }
    }
}

#[derive(Default)]
pub(crate) struct SendQueue {
    segments: VecDeque<Segment>,
    /// Bytes of the first segment already written.
    head: usize,
    /// Bytes queued and not yet written.
    len: usize,
}

impl SendQueue {
    /// Bytes waiting for the socket.
    pub(crate) fn len(&self) -> usize {
        self.len
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Queues a frame built from `opcode` and `payload`.
    /// Takes `payload` by value: a large one is queued as it is, where queueing a clone would
    /// turn a uniquely owned `Bytes` into a shared one (an allocation and atomic counts).
    pub(crate) fn push_frame(&mut self, opcode: u8, payload: Bytes) {
        let len = payload.len();
        if len < SHARE_MIN {
            let tail = self.tail(frame::frame_len(len));
            frame::put_header(tail, opcode, len);
            tail.extend_from_slice(&payload);
        } else {
            let head = frame::Header::new(opcode, len);
            self.segments.push_back(Segment::Shared(head, payload));
        }
        self.len += frame::frame_len(len);
    }

    /// Queues a frame of `payload`, copied (a compressed payload, which lives in a buffer
    /// that is reused): small ones into an owned segment, large ones into a `Bytes` of their
    /// own. `first` is the opcode, with `frame::RSV1` for a compressed message.
    pub(crate) fn push_frame_copy(&mut self, first: u8, payload: &[u8]) {
        let len = payload.len();
        if len < SHARE_MIN {
            let tail = self.tail(frame::frame_len(len));
            frame::put_header(tail, first, len);
            tail.extend_from_slice(payload);
        } else {
            let head = frame::Header::new(first, len);
            self.segments
                .push_back(Segment::Shared(head, Bytes::copy_from_slice(payload)));
        }
        self.len += frame::frame_len(len);
    }

    /// Queues bytes that are already a whole frame (or a handshake response).
    pub(crate) fn push_encoded(&mut self, bytes: &Bytes) {
        if bytes.len() < SHARE_MIN {
            self.tail(bytes.len()).extend_from_slice(bytes);
        } else {
            self.segments
                .push_back(Segment::Shared(frame::Header::NONE, bytes.clone()));
        }
        self.len += bytes.len();
    }

    /// The owned segment at the back, with room for `need` more bytes.
    fn tail(&mut self, need: usize) -> &mut Vec<u8> {
        let fits = matches!(self.segments.back(),
            Some(Segment::Own(v)) if v.len() + need <= SEGMENT_MAX);
        if !fits {
            self.segments
                .push_back(Segment::Own(Vec::with_capacity(need.max(256))));
        }
        match self.segments.back_mut() {
            Some(Segment::Own(v)) => v,
            _ => unreachable!("an owned segment was just ensured"),
        }
    }

    /// Writes as much as the socket takes. `Ok(true)`: all written; `Ok(false)`: the socket is
    /// full, wait until it is writable.
    pub(crate) fn write_to(&mut self, out: &mut impl Write) -> io::Result<bool> {
        while !self.segments.is_empty() {
            let mut slices = [IoSlice::new(&[]); MAX_IOVECS];
            let mut n = 0;
            'fill: for (i, seg) in self.segments.iter().enumerate() {
                let skip = if i == 0 { self.head } else { 0 };
                for piece in seg.pieces(skip) {
                    if n == MAX_IOVECS {
                        break 'fill;
                    }
                    if !piece.is_empty() {
                        slices[n] = IoSlice::new(piece);
                        n += 1;
                    }
                }
            }
            // One piece (every small frame) goes out with `write`: `writev` costs the kernel
            // an iovec copy and the libc wrapper a few percent of a small echo.
            let wrote = if n == 1 {
                out.write(&slices[0])
            } else {
                out.write_vectored(&slices[..n])
            };
            match wrote {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(written) => self.advance(written),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
                Err(e) => return Err(e),
            }
        }
        if self.segments.capacity() > 16 {
            self.segments = VecDeque::new();
        }
        Ok(true)
    }

    fn advance(&mut self, mut written: usize) {
        self.len -= written;
        while let Some(first) = self.segments.front() {
            let left = first.len() - self.head;
            if written < left {
                self.head += written;
                return;
            }
            written -= left;
            self.head = 0;
            self.segments.pop_front();
        }
    }

    /// Frees the list of segments if nothing is queued. Between flushes a busy connection
    /// keeps it (a few segments' room), so an echo does not allocate it each time; the
    /// once-a-second sweep calls this so that an idle connection holds none.
    pub(crate) fn release_if_empty(&mut self) {
        if self.segments.is_empty() && self.segments.capacity() > 0 {
            self.segments = VecDeque::new();
        }
    }

    /// Takes every byte not yet written, in one piece, and leaves the queue empty (for a
    /// connection carried to another worker).
    pub(crate) fn take_all(&mut self) -> Vec<u8> {
        let mut all = Vec::with_capacity(self.len);
        self.write_to(&mut all)
            .expect("a Vec takes every byte it is given");
        self.release_if_empty();
        all
    }

    /// Memory the queue holds (capacity, not just queued bytes).
    pub(crate) fn footprint(&self) -> usize {
        self.segments
            .iter()
            .map(|s| match s {
                Segment::Own(v) => v.capacity(),
                Segment::Shared(_, b) => b.len(),
            })
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A socket that takes at most `room` bytes per call, then blocks when `budget` runs out.
    struct Trickle {
        got: Vec<u8>,
        room: usize,
        budget: usize,
    }

    impl Write for Trickle {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            let n = buf.len().min(self.room).min(self.budget);
            if n == 0 {
                return Err(io::ErrorKind::WouldBlock.into());
            }
            self.budget -= n;
            self.got.extend_from_slice(&buf[..n]);
            Ok(n)
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn frames_come_out_in_order_through_partial_writes() {
        let mut q = SendQueue::default();
        let big = Bytes::from(vec![9u8; 5000]);
        q.push_frame(frame::TEXT, Bytes::from_static(b"hi"));
        q.push_frame(frame::BINARY, big.clone());
        q.push_encoded(&frame::encode(frame::PING, b""));
        let mut want = frame::encode(frame::TEXT, b"hi").to_vec();
        want.extend_from_slice(&frame::encode(frame::BINARY, &big));
        want.extend_from_slice(&frame::encode(frame::PING, b""));
        assert_eq!(q.len(), want.len());

        let mut sock = Trickle {
            got: Vec::new(),
            room: 7,
            budget: 100,
        };
        assert!(
            !q.write_to(&mut sock).unwrap(),
            "blocks when the socket is full"
        );
        assert_eq!(q.len(), want.len() - 100);
        sock.budget = usize::MAX;
        assert!(q.write_to(&mut sock).unwrap());
        assert_eq!(sock.got, want);
        assert_eq!(
            (q.len(), q.footprint()),
            (0, 0),
            "nothing held once written"
        );
    }

    #[test]
    fn a_copied_frame_is_the_same_frame_whatever_its_size() {
        for len in [0, 10, SHARE_MIN - 1, SHARE_MIN, 70_000] {
            let payload = vec![7u8; len];
            let mut q = SendQueue::default();
            q.push_frame_copy(frame::BINARY | frame::RSV1, &payload);
            let mut want = Vec::new();
            frame::put_header(&mut want, frame::BINARY | frame::RSV1, len);
            want.extend_from_slice(&payload);
            assert_eq!(q.len(), want.len());
            let mut got = Vec::new();
            assert!(q.write_to(&mut got).unwrap());
            assert_eq!(got, want, "len {len}");
        }
    }

    #[test]
    fn an_emptied_queue_keeps_its_list_until_released() {
        let mut q = SendQueue::default();
        q.push_frame(frame::TEXT, Bytes::from_static(b"hi"));
        q.release_if_empty();
        assert!(q.segments.capacity() > 0, "not while something is queued");
        assert!(q.write_to(&mut Vec::new()).unwrap());
        assert!(q.segments.capacity() > 0, "kept between flushes");
        q.release_if_empty();
        assert_eq!(q.segments.capacity(), 0);
    }

    #[test]
    fn more_pieces_than_one_writev_takes_go_out_whole_and_in_order() {
        let mut q = SendQueue::default();
        let mut want = Vec::new();
        for i in 0..100u8 {
            let payload = Bytes::from(vec![i; SHARE_MIN + i as usize]);
            want.extend_from_slice(&frame::encode(frame::BINARY, &payload));
            q.push_frame(frame::BINARY, payload);
        }
        let mut sock = Trickle {
            got: Vec::new(),
            room: usize::MAX,
            budget: usize::MAX,
        };
        assert!(q.write_to(&mut sock).unwrap());
        assert_eq!(sock.got, want);
    }
}
