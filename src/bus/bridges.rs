//! Bridges: how the backend API reaches the groups whose workers do not serve it.
//!
//! `[api]` is served by the workers of one group, but a request may name any group. Such a
//! request is relayed whole to a worker of the group it names, which carries it out as its own
//! API would (its mesh, its Redis channels, its presence) and sends the answer back
//! (`worker::relay`). The wire between the two is a bridge: a seqpacket pair like a mesh wire,
//! between each worker of the API's group and each worker of every other group.
//!
//! Unlike the mesh, a bridge joins two *processes*, not two slots. The master makes one when it
//! forks a worker, for each current worker on the other side: the new worker inherits its ends,
//! and each of the others gets its end over its channel to the master (`SCM_RIGHTS`). The
//! master keeps no copy, so a bridge closes when either process exits, and the two generations
//! of a slot during a reload never read the same end: an answer always reaches the worker that
//! asked. A request goes to the newest bridge of each slot of its group, in turn.

use super::mesh::{self, Sent};
use super::wire::{self, BusMessage, Origin};
use mio::unix::SourceFd;
use mio::{Interest, Registry, Token};
use serde::{Deserialize, Serialize};
use slab::Slab;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};

/// The worker at the other end of a bridge.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Peer {
    pub group: String,
    pub slot: usize,
    pub pid: i32,
}

struct Bridge {
    peer: Peer,
    end: OwnedFd,
    serial: u32,
    /// Order of arrival: a later bridge of the same slot is to a newer worker.
    born: u64,
}

/// A bridge named across turns: its index and serial, since an index is reused once its
/// bridge closes.
pub type BridgeRef = (usize, u32);

/// What reading a bridge gave.
pub struct Received {
    pub messages: Vec<BusMessage>,
    /// The budget ran out with more waiting.
    pub more: bool,
}

/// A worker's bridges, registered with its loop as `base + index`.
pub struct Bridges {
    ends: Slab<Bridge>,
    base: usize,
    next_serial: u32,
    born: u64,
    /// Round-robin position, per pick.
    turn: usize,
}

impl Bridges {
    pub fn new(base: usize) -> Bridges {
        Bridges {
            ends: Slab::new(),
            base,
            next_serial: 0,
            born: 0,
            turn: 0,
        }
    }

    /// Takes a bridge to `peer` and registers it for reading.
    pub fn add(&mut self, peer: Peer, end: OwnedFd, registry: &Registry) -> io::Result<()> {
        let entry = self.ends.vacant_entry();
        let token = Token(self.base + entry.key());
        registry.register(&mut SourceFd(&end.as_raw_fd()), token, Interest::READABLE)?;
        self.next_serial = self.next_serial.wrapping_add(1);
        self.born += 1;
        log::debug!(
            "bridge to {}#{} (pid {}) open",
            peer.group,
            peer.slot,
            peer.pid
        );
        entry.insert(Bridge {
            peer,
            end,
            serial: self.next_serial,
            born: self.born,
        });
        Ok(())
    }

    /// Whether some bridge reaches `group` (or did: a group that is restarting has none).
    pub fn reaches(&self, group: &str) -> bool {
        self.ends.iter().any(|(_, b)| b.peer.group == group)
    }

    /// The groups the bridges reach.
    pub fn groups(&self) -> Vec<&str> {
        let mut names: Vec<&str> = self
            .ends
            .iter()
            .map(|(_, b)| b.peer.group.as_str())
            .collect();
        names.sort_unstable();
        names.dedup();
        names
    }

    /// The bridge for the next request to `group`: of the newest bridge of each of its slots,
    /// the next in turn.
    pub fn pick(&mut self, group: &str) -> Option<BridgeRef> {
        let newest = |b: &Bridge| {
            !self.ends.iter().any(|(_, o)| {
                o.peer.group == b.peer.group && o.peer.slot == b.peer.slot && o.born > b.born
            })
        };
        let mut candidates: Vec<(usize, &Bridge)> = (self.ends.iter())
            .filter(|(_, b)| b.peer.group == group && newest(b))
            .collect();
        candidates.sort_unstable_by_key(|(_, b)| b.peer.slot);
        let (idx, b) = *candidates.get(self.turn % candidates.len().max(1))?;
        self.turn = self.turn.wrapping_add(1);
        Some((idx, b.serial))
    }

    /// Sends `msg` over bridge `to`; false if it is gone or could not take it.
    pub fn send(&mut self, to: BridgeRef, origin: Origin, msg: &BusMessage) -> bool {
        let Some(b) = self.ends.get(to.0).filter(|b| b.serial == to.1) else {
            return false;
        };
        match mesh::send_on(&b.end, &wire::encode(origin, msg)) {
            Sent::Ok => true,
            why => {
                let p = &b.peer;
                log::warn!(
                    "bridge to {}#{}: message dropped ({why:?})",
                    p.group,
                    p.slot
                );
                false
            }
        }
    }

    /// Up to `budget` messages from bridge `idx`. A bridge whose other end has gone is
    /// removed.
    pub fn receive(&mut self, idx: usize, budget: usize, registry: &Registry) -> Received {
        let mut got = Received {
            messages: Vec::new(),
            more: false,
        };
        let Some(b) = self.ends.get(idx) else {
            return got;
        };
        while got.messages.len() < budget {
            match mesh::recv_on(&b.end) {
                Ok(Some(bytes)) => match wire::decode(&bytes) {
                    Ok((_, m)) => got.messages.push(m),
                    Err(e) => log::warn!("bridge to {}#{}: {e}", b.peer.group, b.peer.slot),
                },
                Ok(None) => return got,
                Err(_) => {
                    let b = self.ends.remove(idx);
                    let _ = registry.deregister(&mut SourceFd(&b.end.as_raw_fd()));
                    log::debug!("bridge to {}#{} closed", b.peer.group, b.peer.slot);
                    return got;
                }
            }
        }
        got.more = true;
        got
    }

    /// The serial of bridge `idx`, to name it in an answer sent later.
    pub fn serial_of(&self, idx: usize) -> Option<u32> {
        self.ends.get(idx).map(|b| b.serial)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer(group: &str, slot: usize) -> Peer {
        Peer {
            group: group.into(),
            slot,
            pid: 100 + slot as i32,
        }
    }

    #[test]
    fn requests_go_round_the_newest_bridge_of_each_slot() {
        let poll = mio::Poll::new().unwrap();
        let mut bridges = Bridges::new(1000);
        let mut others = Vec::new();
        for p in [
            peer("feed", 0),
            peer("feed", 1),
            peer("feed", 0),
            peer("chat", 0),
        ] {
            let (mine, theirs) = mesh::pair().unwrap();
            bridges.add(p, mine, poll.registry()).unwrap();
            others.push(theirs);
        }
        assert_eq!(bridges.groups(), vec!["chat", "feed"]);
        let picks: Vec<usize> = (0..4).map(|_| bridges.pick("feed").unwrap().0).collect();
        // Slot 0's first worker (index 0) was replaced by index 2.
        assert_eq!(picks, vec![2, 1, 2, 1]);
        assert_eq!(bridges.pick("nobody"), None);

        let origin = Origin { host: 1, slot: 0 };
        let to = bridges.pick("chat").unwrap();
        assert!(bridges.send(to, origin, &BusMessage::Answer(5, "{}".into())));
        let got = mesh::recv_on(&others[3]).unwrap().unwrap();
        assert_eq!(
            wire::decode(&got).unwrap().1,
            BusMessage::Answer(5, "{}".into())
        );

        // The newer worker of slot 0 exits: its bridge closes, and the older one serves again.
        drop(others.remove(2));
        let r = bridges.receive(2, 64, poll.registry());
        assert!(r.messages.is_empty());
        assert_eq!(bridges.serial_of(2), None, "the closed bridge is removed");
        assert!(!bridges.send((2, to.1), origin, &BusMessage::Answer(1, "{}".into())));
        let picks: Vec<usize> = (0..2).map(|_| bridges.pick("feed").unwrap().0).collect();
        assert_eq!(
            picks
                .iter()
                .copied()
                .collect::<std::collections::BTreeSet<_>>()
                .len(),
            2
        );
        assert!(picks.contains(&0) && picks.contains(&1));
    }
}
