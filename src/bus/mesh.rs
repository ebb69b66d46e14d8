//! The local bus's wires: a full mesh of `SOCK_SEQPACKET` socket pairs between the workers of
//! a group, made by the master before it forks them.
//!
//! Why a pair per two workers rather than one datagram socket per worker: Linux lets a Unix
//! datagram socket queue only `net.unix.max_dgram_qlen` datagrams (10 here), so a burst of
//! eleven broadcasts would already be refused. A seqpacket pair keeps message boundaries and
//! order like a datagram socket but is bounded by bytes (`SEND_BUFFER`), which is what a bus
//! under load needs. The master holds every end for the group's life, so a respawned or
//! reloaded worker inherits its ends and is on the bus again without anyone reconnecting;
//! what its peers sent while it was down waits in the pair (up to the buffer).
//!
//! Every end is non-blocking: a peer whose queue is full makes a send fail at once (counted as
//! a drop), never stalls the sender's event loop.

use nix::sys::socket::{
    AddressFamily, MsgFlags, SockFlag, SockType, recv, send, setsockopt, socketpair, sockopt,
};
use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};

/// Bytes that may wait in one direction of one pair; also the largest bus message.
pub const SEND_BUFFER: usize = 4 << 20;

/// The ends of a group's mesh: `ends[i][j]` is the end worker `i` uses to talk to worker `j`.
#[derive(Default)]
pub struct Mesh {
    ends: Vec<Vec<Option<OwnedFd>>>,
}

impl Mesh {
    /// Wires `slots` workers to each other. A reload that replaces a group's workers makes
    /// a new mesh for them rather than rewiring the one its old workers still use.
    // Indexes, because each pair fills `ends[i][j]` and its mirror `ends[j][i]`.
    #[allow(clippy::needless_range_loop)]
    pub fn new(slots: usize) -> io::Result<Mesh> {
        let mut ends: Vec<Vec<Option<OwnedFd>>> = (0..slots)
            .map(|_| (0..slots).map(|_| None).collect())
            .collect();
        for i in 0..slots {
            for j in i + 1..slots {
                let (a, b) = pair()?;
                ends[i][j] = Some(a);
                ends[j][i] = Some(b);
            }
        }
        Ok(Mesh { ends })
    }

    /// How many slots it wires: a reload that lowers a group's `count` keeps the mesh (the
    /// slots past the count go unused), so it may wire more than the group has.
    pub fn slots(&self) -> usize {
        self.ends.len()
    }

    /// This mesh wired for `slots` (more than it has): the same pairs, copied, and new ones
    /// for the new slots. Workers started on it reach the new slots; those running on this
    /// one do not, so a reload starts the new slots' workers after the others have gone.
    #[allow(clippy::needless_range_loop)]
    pub fn grown(&self, slots: usize) -> io::Result<Mesh> {
        let have = self.ends.len();
        let mut ends: Vec<Vec<Option<OwnedFd>>> = (0..slots)
            .map(|_| (0..slots).map(|_| None).collect())
            .collect();
        for i in 0..have {
            for j in 0..have {
                if let Some(end) = &self.ends[i][j] {
                    ends[i][j] = Some(end.try_clone()?);
                }
            }
        }
        for i in 0..slots {
            for j in (i + 1).max(have)..slots {
                let (a, b) = pair()?;
                ends[i][j] = Some(a);
                ends[j][i] = Some(b);
            }
        }
        Ok(Mesh { ends })
    }

    /// A mesh made of ends another master held (`wsd upgrade`): `ends[i][j]` as in
    /// [`Mesh::new`].
    pub fn from_ends(ends: Vec<Vec<Option<OwnedFd>>>) -> Mesh {
        Mesh { ends }
    }

    /// Every end, for the master that replaces this one.
    pub fn all_fds(&self) -> Vec<Vec<Option<RawFd>>> {
        (self.ends.iter())
            .map(|row| {
                row.iter()
                    .map(|e| e.as_ref().map(AsRawFd::as_raw_fd))
                    .collect()
            })
            .collect()
    }

    /// The descriptors worker `slot` keeps after the fork.
    pub fn fds_of(&self, slot: usize) -> Vec<RawFd> {
        self.ends
            .get(slot)
            .map(|row| row.iter().flatten().map(AsRawFd::as_raw_fd).collect())
            .unwrap_or_default()
    }

    /// In the forked worker: its own ends, by peer slot.
    pub fn take_ends(&mut self, slot: usize) -> Vec<Option<OwnedFd>> {
        self.ends
            .get_mut(slot)
            .map(std::mem::take)
            .unwrap_or_default()
    }
}

/// One non-blocking seqpacket pair with [`SEND_BUFFER`] each way: a mesh wire, or a bridge
/// between groups (`bridges.rs`).
pub(crate) fn pair() -> io::Result<(OwnedFd, OwnedFd)> {
    let (a, b) = socketpair(
        AddressFamily::Unix,
        SockType::SeqPacket,
        None,
        SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC,
    )
    .map_err(io::Error::from)?;
    for end in [&a, &b] {
        // Best effort: without it the kernel default (~200 KiB) bounds the queue instead.
        let _ = setsockopt(end, sockopt::SndBuf, &SEND_BUFFER);
    }
    Ok((a, b))
}

/// What became of a send to a peer.
#[derive(Debug, PartialEq, Eq)]
pub enum Sent {
    Ok,
    /// The peer's queue is full (it is busy or gone): the message is dropped.
    Full,
    /// Larger than the bus can carry.
    TooBig,
    /// The peer's end is closed for good.
    Broken,
}

/// Sends one message on an end, without blocking.
pub fn send_on(end: &OwnedFd, bytes: &[u8]) -> Sent {
    match send(
        end.as_raw_fd(),
        bytes,
        MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_NOSIGNAL,
    ) {
        Ok(_) => Sent::Ok,
        Err(nix::errno::Errno::EAGAIN | nix::errno::Errno::ENOBUFS) => Sent::Full,
        Err(nix::errno::Errno::EMSGSIZE) => Sent::TooBig,
        Err(_) => Sent::Broken,
    }
}

/// Receives the next whole message from an end; `Ok(None)` when none is waiting.
pub fn recv_on(end: &OwnedFd) -> io::Result<Option<Vec<u8>>> {
    let fd = end.as_raw_fd();
    // Learn the message's length first (MSG_TRUNC reports it), so none is ever cut short.
    let len = match recv(
        fd,
        &mut [],
        MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_PEEK | MsgFlags::MSG_TRUNC,
    ) {
        Ok(n) => n,
        Err(nix::errno::Errno::EAGAIN) => return Ok(None),
        Err(e) => return Err(e.into()),
    };
    let mut buf = vec![0u8; len];
    let n = recv(fd, &mut buf, MsgFlags::MSG_DONTWAIT).map_err(io::Error::from)?;
    if n == 0 && len == 0 {
        // A zero-length read with nothing peeked is the peer's end closing.
        return Err(io::ErrorKind::UnexpectedEof.into());
    }
    buf.truncate(n);
    Ok(Some(buf))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_pair_of_workers_is_wired() {
        let mut mesh = Mesh::new(4).unwrap();
        assert_eq!(mesh.fds_of(0).len(), 3);
        assert_eq!(mesh.fds_of(3).len(), 3);
        let mut w1 = mesh.take_ends(1);
        let mut w3 = mesh.take_ends(3);
        assert!(w3[3].is_none(), "no pair with itself");
        let big = vec![7u8; 300_000];
        assert_eq!(send_on(w1[3].as_ref().unwrap(), b"hello 3"), Sent::Ok);
        assert_eq!(send_on(w1[3].as_ref().unwrap(), &big), Sent::Ok);
        let end = w3[1].take().unwrap();
        assert_eq!(recv_on(&end).unwrap().as_deref(), Some(&b"hello 3"[..]));
        assert_eq!(recv_on(&end).unwrap().map(|m| m.len()), Some(big.len()));
        assert_eq!(recv_on(&end).unwrap(), None);
        drop(w1.remove(3));
        assert!(recv_on(&end).is_err(), "the peer's end is gone");
    }

    #[test]
    fn a_grown_mesh_keeps_its_pairs_and_wires_the_new_slots() {
        let small = Mesh::new(2).unwrap();
        let mut mesh = small.grown(4).unwrap();
        assert_eq!(mesh.slots(), 4);
        assert_eq!((mesh.fds_of(0).len(), mesh.fds_of(3).len()), (3, 3));
        // The old pair 0-1 is the same pair: what one end of the small mesh sends, the grown
        // mesh's other end reads.
        let mut small = small;
        let w0 = small.take_ends(0);
        let w1 = mesh.take_ends(1);
        assert_eq!(send_on(w0[1].as_ref().unwrap(), b"kept"), Sent::Ok);
        assert_eq!(
            recv_on(w1[0].as_ref().unwrap()).unwrap().as_deref(),
            Some(&b"kept"[..])
        );
        let w3 = mesh.take_ends(3);
        assert_eq!(send_on(w1[3].as_ref().unwrap(), b"new"), Sent::Ok);
        assert_eq!(
            recv_on(w3[1].as_ref().unwrap()).unwrap().as_deref(),
            Some(&b"new"[..])
        );
    }

    #[test]
    fn a_full_peer_drops_instead_of_blocking() {
        let mut mesh = Mesh::new(2).unwrap();
        let w0 = mesh.take_ends(0);
        let _w1 = mesh.take_ends(1);
        let end = w0[1].as_ref().unwrap();
        let chunk = vec![1u8; 64 << 10];
        let mut sent = 0;
        while send_on(end, &chunk) == Sent::Ok {
            sent += 1;
            assert!(sent < 10_000, "never filled");
        }
        assert_eq!(send_on(end, &chunk), Sent::Full);
    }
}
