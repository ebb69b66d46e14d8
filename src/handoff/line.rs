//! The wire one worker hands its connections to another over: a Unix stream socket pair made
//! by the master, one end given to each worker over its channel.
//!
//! A stream, not a seqpacket like the bus: a connection's state may be larger than any
//! datagram (its send queue can hold `max_send_buffer`). Each record is framed as a
//! little-endian `u32` length, a flag byte that says whether a descriptor rides with it, and
//! the record. The descriptor is sent (`SCM_RIGHTS`) with the record's first bytes, so the
//! receiver always holds it by the time the whole record has arrived, and descriptors arrive in
//! the order of their records.
//!
//! Each side counts the records it receives and acknowledges them ([`Line::acknowledge`]) in a
//! frame of its own; the giver keeps each record until then (see `worker::handoff`). Records
//! may go both ways: the taker sends bus messages back for the clients the giver still serves
//! (`wss://` ones, drained), and in `wsd upgrade` it may hand every connection back.
//!
//! Both sides are non-blocking and live in their worker's poll.

use crate::sys;
use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;

/// The handoff protocol this build speaks: the line's framing and the records on it. Two
/// masters of `wsd upgrade` that speak different ones hand nothing over (the old workers'
/// clients are closed with 1001, as without a handoff); a change to either bumps it.
pub(crate) const PROTOCOL: u16 = 5;

/// The older protocols this build's workers take connections from. What they lack is sent
/// only by a giver, never asked of a taker:
/// - protocol 3, the records of a crossing of messages from other hosts (`bus::crossing`);
/// - protocol 4, a crossing on the connections a new worker hands back to an old one when
///   its master dies mid-upgrade: the new worker names one only if the old one speaks
///   [`CROSSING_BACK`].
pub(crate) const TAKES_FROM: [u16; 2] = [3, 4];

/// The first protocol whose workers take a crossing on connections handed back to them.
pub(crate) const CROSSING_BACK: u16 = 5;

/// Whether this build's workers take connections from workers that speak `protocol`.
pub(crate) fn takes_from(protocol: u16) -> bool {
    protocol == PROTOCOL || TAKES_FROM.contains(&protocol)
}

/// Framing before each record: its length and its kind ([`RECORD`], [`RECORD_FD`], [`ACK`]).
const FRAME_HEAD: usize = 5;
/// A record.
const RECORD: u8 = 0;
/// A record with a descriptor.
const RECORD_FD: u8 = 1;
/// An acknowledgement: the little-endian `u32` count of records received so far.
const ACK: u8 = 2;
/// Bytes read from the socket at a time.
const READ_CHUNK: usize = 64 << 10;
/// Descriptors sent with one `sendmsg` at most (the kernel's `SCM_MAX_FD`): records go out
/// many to a system call, on both sides.
const BATCH_FDS: usize = 253;
/// Bytes gathered into one `sendmsg` at most.
const BATCH_BYTES: usize = 256 << 10;

/// A record as it left or arrived, with the descriptor that rode with it.
pub(crate) type Record = (Vec<u8>, Option<OwnedFd>);

/// Why a line cannot go on.
#[derive(Debug, thiserror::Error)]
pub(crate) enum LineError {
    #[error("the other worker closed the handoff line")]
    Closed,
    #[error("handoff line: {0}")]
    Io(#[from] io::Error),
    #[error("a handoff record of {0} bytes is over the limit of {1}")]
    TooLarge(usize, usize),
    #[error("a handoff record names a descriptor that did not come with it")]
    NoDescriptor,
    #[error("a handoff frame of unknown kind {0}")]
    BadFrame(u8),
}

struct Outgoing {
    bytes: Vec<u8>,
    sent: usize,
    /// Until the record's first bytes are sent.
    fd: Option<OwnedFd>,
}

/// One end of a handoff line.
pub(crate) struct Line {
    sock: UnixStream,
    out: VecDeque<Outgoing>,
    input: Vec<u8>,
    fds: VecDeque<OwnedFd>,
    /// The other side has closed it (read as end of stream).
    ended: bool,
    /// Records received so far.
    received: u32,
    /// Records put on the line so far.
    pushed: u32,
    /// The latest acknowledgement received and not yet taken.
    acked: Option<u32>,
    /// The handoff protocol the worker at the other end speaks: what may be sent to it if the
    /// line turns round.
    speaks: u16,
}

/// Reads everything a non-blocking Unix stream socket has now into `input`, and the
/// descriptors that came with it into `fds`, in order. `Ok(true)`: the other side has closed it
/// (end of stream, or reset).
pub(crate) fn read_available(
    sock: RawFd,
    input: &mut Vec<u8>,
    fds: &mut VecDeque<OwnedFd>,
) -> io::Result<bool> {
    let mut chunk = vec![0u8; READ_CHUNK];
    loop {
        let mut came = Vec::new();
        match sys::recv_with_fds(sock, &mut chunk, &mut came) {
            Ok(0) => return Ok(true),
            Ok(n) => {
                input.extend_from_slice(&chunk[..n]);
                fds.extend(came);
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) if e.kind() == io::ErrorKind::ConnectionReset => return Ok(true),
            Err(e) => return Err(e),
        }
    }
}

impl Line {
    /// Takes an end the master sent; it is made non-blocking.
    pub(crate) fn new(end: OwnedFd) -> io::Result<Line> {
        let sock = UnixStream::from(end);
        sock.set_nonblocking(true)?;
        Ok(Line {
            sock,
            out: VecDeque::new(),
            input: Vec::new(),
            fds: VecDeque::new(),
            ended: false,
            received: 0,
            pushed: 0,
            acked: None,
            speaks: PROTOCOL,
        })
    }

    /// The line to a worker that speaks `protocol` (the giver of an upgrade from an older
    /// build).
    pub(crate) fn speaking(mut self, protocol: u16) -> Line {
        self.speaks = protocol;
        self
    }

    /// Whether the worker at the other end takes the records of a crossing (`bus::crossing`)
    /// from this one: always on a line this worker was given to hand over on (its taker takes
    /// from this build); on one turned round, if the giver at the other end speaks
    /// [`CROSSING_BACK`].
    pub(crate) fn takes_crossings(&self) -> bool {
        self.speaks >= CROSSING_BACK
    }

    pub(crate) fn fd(&self) -> RawFd {
        self.sock.as_raw_fd()
    }

    /// Queues `record`, with `fd` if given; [`Line::flush`] sends it.
    pub(crate) fn push(&mut self, record: &[u8], fd: Option<OwnedFd>) {
        let kind = if fd.is_some() { RECORD_FD } else { RECORD };
        self.push_frame(kind, record, fd);
        self.pushed += 1;
    }

    /// Records put on the line so far: what the other side's acknowledgements count.
    pub(crate) fn pushed(&self) -> u32 {
        self.pushed
    }

    fn push_frame(&mut self, kind: u8, body: &[u8], fd: Option<OwnedFd>) {
        let mut bytes = Vec::with_capacity(FRAME_HEAD + body.len());
        bytes.extend_from_slice(&(body.len() as u32).to_le_bytes());
        bytes.push(kind);
        bytes.extend_from_slice(body);
        self.out.push_back(Outgoing { bytes, sent: 0, fd });
    }

    /// The other side has closed the line: whatever [`Line::receive`] returned was the last.
    pub(crate) fn is_ended(&self) -> bool {
        self.ended
    }

    /// Nothing waits to be sent.
    pub(crate) fn is_flushed(&self) -> bool {
        self.out.is_empty()
    }

    /// Sends what the socket takes. `Ok(true)`: everything is out.
    pub(crate) fn flush(&mut self) -> Result<bool, LineError> {
        while !self.out.is_empty() {
            // The front record's rest and the records after it, as many as one message takes.
            let (mut slices, mut fds, mut bytes) = (Vec::new(), Vec::new(), 0);
            for o in &self.out {
                let rest = &o.bytes[o.sent..];
                let full = fds.len() + usize::from(o.fd.is_some()) > BATCH_FDS
                    || (bytes > 0 && bytes + rest.len() > BATCH_BYTES);
                if full {
                    break;
                }
                fds.extend(o.fd.as_ref().map(|fd| fd.as_raw_fd()));
                slices.push(std::io::IoSlice::new(rest));
                bytes += rest.len();
            }
            let gathered = slices.len();
            let wrote = sys::send_with_fds(self.sock.as_raw_fd(), &slices, &fds);
            match wrote {
                Ok(0) => return Err(LineError::Closed),
                Ok(mut n) => {
                    // Every descriptor went with the first of these bytes.
                    for o in self.out.iter_mut().take(gathered) {
                        o.fd = None;
                    }
                    while n > 0 {
                        let o = self.out.front_mut().expect("as many bytes as were queued");
                        let took = n.min(o.bytes.len() - o.sent);
                        o.sent += took;
                        n -= took;
                        if o.sent == o.bytes.len() {
                            self.out.pop_front();
                        }
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::BrokenPipe => return Err(LineError::Closed),
                Err(e) => return Err(e.into()),
            }
        }
        Ok(true)
    }

    /// Acknowledges every record received so far (once registered: the other side may then
    /// let its copies go).
    pub(crate) fn acknowledge(&mut self) {
        let count = self.received.to_le_bytes();
        self.push_frame(ACK, &count, None);
    }

    /// The latest count of records the other side has acknowledged, if one came since the
    /// last call (read by [`Line::receive`]).
    pub(crate) fn acknowledged(&mut self) -> Option<u32> {
        self.acked.take()
    }

    /// Reads what has arrived and returns the whole records among it, each with its descriptor;
    /// acknowledgements among them are kept for [`Line::acknowledged`]. A record longer than
    /// `max` breaks the line. `Err(Closed)` once the other side has gone and every record it
    /// sent has been returned (see also [`Line::is_ended`]).
    pub(crate) fn receive(&mut self, max: usize) -> Result<Vec<Record>, LineError> {
        let ended =
            self.ended || read_available(self.sock.as_raw_fd(), &mut self.input, &mut self.fds)?;
        let mut records = Vec::new();
        let mut at = 0;
        while let Some(head) = self.input.get(at..at + FRAME_HEAD) {
            let len = u32::from_le_bytes(head[..4].try_into().expect("4 bytes")) as usize;
            if len > max {
                return Err(LineError::TooLarge(len, max));
            }
            let kind = head[4];
            let Some(body) = self.input.get(at + FRAME_HEAD..at + FRAME_HEAD + len) else {
                break;
            };
            match kind {
                ACK => {
                    let count = body.try_into().map_err(|_| LineError::BadFrame(kind))?;
                    self.acked = Some(u32::from_le_bytes(count));
                }
                RECORD | RECORD_FD => {
                    let fd = match kind == RECORD_FD {
                        true => Some(self.fds.pop_front().ok_or(LineError::NoDescriptor)?),
                        false => None,
                    };
                    records.push((body.to_vec(), fd));
                    self.received += 1;
                }
                _ => return Err(LineError::BadFrame(kind)),
            }
            at += FRAME_HEAD + len;
        }
        self.input.drain(..at);
        self.ended = ended;
        if ended && records.is_empty() {
            return Err(LineError::Closed);
        }
        Ok(records)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixStream;

    fn pair() -> (Line, Line) {
        let (a, b) = UnixStream::pair().unwrap();
        (Line::new(a.into()).unwrap(), Line::new(b.into()).unwrap())
    }

    #[test]
    fn records_arrive_whole_in_order_with_their_descriptors() {
        let (mut tx, mut rx) = pair();
        let big = vec![7u8; 1 << 20]; // more than the socket holds at once
        let files: Vec<OwnedFd> = (0..3).map(|_| descriptor()).collect();
        tx.push(b"first", Some(files[0].try_clone().unwrap()));
        tx.push(&big, Some(files[1].try_clone().unwrap()));
        tx.push(b"no fd", None);
        tx.push(b"last", Some(files[2].try_clone().unwrap()));
        let mut got = Vec::new();
        while got.len() < 4 {
            let done = tx.flush().unwrap();
            got.extend(rx.receive(2 << 20).unwrap());
            assert!(done || got.len() < 4);
        }
        assert_eq!(got[0].0, b"first");
        assert_eq!(got[1].0, big);
        assert_eq!(got[2].0, b"no fd");
        assert!(got[2].1.is_none());
        assert_eq!(got[3].0, b"last");
        // Each descriptor is the file sent with its record.
        for (i, n) in [(0, 0), (1, 1), (3, 2)] {
            let fd = got[i].1.as_ref().unwrap();
            assert_eq!(inode(fd), inode(&files[n]), "record {i}");
        }
        drop(tx);
        assert!(matches!(rx.receive(1 << 20), Err(LineError::Closed)));
    }

    #[test]
    fn many_records_with_descriptors_go_many_to_a_message_and_pair_up() {
        let (mut tx, mut rx) = pair();
        let sent: Vec<OwnedFd> = (0..600).map(|_| descriptor()).collect();
        for (i, fd) in sent.iter().enumerate() {
            let fd = (i % 3 != 0).then(|| fd.try_clone().unwrap());
            tx.push(format!("record {i}").as_bytes(), fd);
        }
        let mut got = Vec::new();
        while got.len() < 600 {
            tx.flush().unwrap();
            got.extend(rx.receive(1 << 20).unwrap());
        }
        for (i, (record, fd)) in got.iter().enumerate() {
            assert_eq!(record, format!("record {i}").as_bytes());
            match fd {
                Some(fd) => assert_eq!(inode(fd), inode(&sent[i]), "record {i}"),
                None => assert_eq!(i % 3, 0, "record {i} lost its descriptor"),
            }
        }
    }

    #[test]
    fn the_taker_acknowledges_counts_and_the_giver_sees_it_go() {
        let (mut giver, mut taker) = pair();
        assert!(giver.receive(100).unwrap().is_empty());
        assert_eq!(giver.acknowledged(), None);
        for _ in 0..5 {
            giver.push(b"r", None);
        }
        giver.flush().unwrap();
        assert_eq!(taker.receive(100).unwrap().len(), 5);
        taker.acknowledge();
        taker.flush().unwrap();
        assert!(giver.receive(100).unwrap().is_empty());
        assert_eq!(giver.acknowledged(), Some(5));
        assert_eq!(giver.acknowledged(), None);
        giver.push(b"r", None);
        giver.flush().unwrap();
        assert_eq!(taker.receive(100).unwrap().len(), 1);
        taker.acknowledge();
        taker.flush().unwrap();
        drop(taker);
        assert!(matches!(giver.receive(100), Err(LineError::Closed)));
        assert_eq!(giver.acknowledged(), Some(6));
    }

    /// A line turned round to a giver of the builds before sends it no crossing records; one
    /// to a worker of this build (or a newer one, which takes from it) does.
    #[test]
    fn crossings_go_only_to_a_worker_that_takes_them() {
        let (giver, taker) = pair();
        assert!(giver.takes_crossings());
        assert!(taker.takes_crossings());
        let older = TAKES_FROM.iter().copied().filter(|&p| p < CROSSING_BACK);
        for protocol in older {
            let (_, taker) = pair();
            assert!(!taker.speaking(protocol).takes_crossings());
        }
        let (_, taker) = pair();
        assert!(taker.speaking(PROTOCOL).takes_crossings());
    }

    /// Records go both ways, each side counting and acknowledging what it received: the
    /// taker's records come in order with its acknowledgements, descriptors and the line's end
    /// included.
    #[test]
    fn records_and_acknowledgements_go_both_ways() {
        let (mut giver, mut taker) = pair();
        giver.push(b"conn", Some(descriptor()));
        giver.push(&[], None);
        giver.flush().unwrap();
        assert_eq!(taker.receive(100).unwrap().len(), 2);
        taker.acknowledge();
        taker.push(b"back", Some(descriptor()));
        taker.push(&[], None);
        taker.flush().unwrap();
        drop(taker);
        let records = giver.receive(100).unwrap();
        assert_eq!(giver.acknowledged(), Some(2));
        assert_eq!(records.len(), 2);
        assert_eq!(records[0].0, b"back");
        assert!(records[0].1.is_some());
        assert!(records[1].0.is_empty() && records[1].1.is_none());
        assert!(matches!(giver.receive(100), Err(LineError::Closed)));
    }

    #[test]
    fn an_oversized_record_breaks_the_line() {
        let (mut tx, mut rx) = pair();
        tx.push(&[0u8; 100], None);
        tx.flush().unwrap();
        assert!(matches!(rx.receive(99), Err(LineError::TooLarge(100, 99))));
    }

    /// A descriptor to send: one end of a socket pair (its inode names it).
    fn descriptor() -> OwnedFd {
        let (a, _) = UnixStream::pair().unwrap();
        a.into()
    }

    fn inode(fd: &OwnedFd) -> u64 {
        use std::os::unix::fs::MetadataExt;
        let file = std::fs::File::from(fd.try_clone().unwrap());
        file.metadata().unwrap().ino()
    }
}
