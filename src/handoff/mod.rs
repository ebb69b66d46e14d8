//! Connection handoff: a worker that is being replaced gives its open connections to the
//! worker that replaces it, so a deploy closes none of them.
//!
//! The master joins the slot's old and new worker with a [`line`] once the new one is ready.
//! The old worker stops accepting, then moves each open connection across in one record: the
//! socket itself (`SCM_RIGHTS`) and a [`Handed`], taken between two loop turns. Nothing is lost
//! in between, because nothing is in between: bytes the old worker has not read stay in the
//! socket for the new one, bytes it had read but not yet made into a message travel in the
//! decoder's state, and replies it had not yet written travel as its send queue. The new worker
//! registers the socket and goes on as if it had been there all along, under the same
//! [`crate::ConnId`].
//!
//! What a connection does not carry is the app's state: a library app gives it with
//! `on_handoff` (bytes) and takes it back with `on_adopt`; an exec handler hears `handoff` and
//! `adopt`; a webhook's backend keeps it under the connection's id, which does not change. A
//! library app without `on_handoff` keeps the old behaviour: its clients get Close 1001 as
//! the old worker stops. So do connections that are
//! still in their upgrade or closing; `wss://` ones are served on through a drain, then told
//! 1012.
//!
//! permessage-deflate travels as what was agreed plus, under the client's context takeover,
//! the last 32 KiB the client sent: the new worker's decompressor starts from them as a preset
//! dictionary, so the client's next message may still refer back into them. Our own side just
//! starts a new compressor, which refers to nothing the client's window does not hold.
//!
//! The record is [`VERSION`] (two bytes, little-endian) followed by the `Handed`, in postcard.
//! A worker refuses a version it does not know, and a record over [`max_record`].

pub(crate) mod line;

use crate::proto::session::SessionState;
use bytes::Bytes;
use serde::{Deserialize, Serialize};
use std::net::SocketAddr;

/// The version of [`Handed`] this build writes and reads.
pub(crate) const VERSION: u16 = 2;

/// One connection, as it travels.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct Handed {
    /// Its id, which it keeps in the worker that takes it.
    pub id: crate::ConnId,
    /// Its id on the bus in the worker that handed it (`conn` in that worker's events and
    /// API): the same in the next worker of its slot, another in a worker of another slot.
    pub from: String,
    /// The client's address as hooks saw it.
    pub remote: SocketAddr,
    /// Request path and query of the upgrade.
    pub path: String,
    /// Milliseconds since it was accepted.
    pub age_ms: u64,
    /// Bytes in and out, messages in and out.
    pub traffic: [u64; 4],
    /// The subprotocol the upgrade agreed to.
    pub protocol: Option<String>,
    pub session: SessionState,
    /// The user it was bound to.
    pub user: Option<String>,
    /// The topics it was subscribed to.
    pub topics: Vec<String>,
    /// What its token allowed (`auth = "jwt"`).
    pub grant: Option<crate::worker::Grant>,
    /// What the app's `on_handoff` gave for it.
    pub app: Option<Bytes>,
}

/// Why a record could not be read.
#[derive(Debug, thiserror::Error)]
pub(crate) enum RecordError {
    #[error("handoff record version {0}, this build reads {VERSION}")]
    Version(u16),
    #[error("a handoff record too short for its version")]
    Short,
    #[error("a handoff record that does not decode: {0}")]
    Decode(#[from] postcard::Error),
}

impl Handed {
    pub(crate) fn encode(&self) -> Vec<u8> {
        let mut out = VERSION.to_le_bytes().to_vec();
        postcard::to_io(self, &mut out).expect("a Vec takes every byte and Handed serializes");
        out
    }

    pub(crate) fn decode(record: &[u8]) -> Result<Handed, RecordError> {
        let [a, b, rest @ ..] = record else {
            return Err(RecordError::Short);
        };
        match u16::from_le_bytes([*a, *b]) {
            VERSION => Ok(postcard::from_bytes(rest)?),
            other => Err(RecordError::Version(other)),
        }
    }
}

/// Bus messages on the line, between connections (`bus::wire` bytes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Carried {
    /// Group messages the giver held while the group was held (its clients moving to
    /// another slot), for the taker to send when the hold ends.
    Held,
    /// Messages the giver delivered to its clients while handing them over, for the taker to
    /// deliver to those it holds already (and its own).
    Delivered,
    /// None: the taker's upgrade is done, and nothing will come back on the line (it stays
    /// open while the giver still serves `wss://` clients).
    Committed,
    /// One: the token of the giver's crossing of messages from other hosts
    /// (`bus::crossing`), before its first connection.
    Crossing,
    /// Messages from other hosts the giver delivered while its clients were already gone,
    /// for the taker to deliver to those (and only those) of the crossing.
    Remote,
    /// None: the giver has read the crossing's mark, and no [`Carried::Remote`] follows.
    Cut,
}

impl Carried {
    /// Its marker, in place of a record's version.
    fn marker(self) -> u16 {
        match self {
            Carried::Held => u16::MAX,
            Carried::Delivered => u16::MAX - 1,
            Carried::Committed => u16::MAX - 2,
            Carried::Crossing => u16::MAX - 3,
            Carried::Remote => u16::MAX - 4,
            Carried::Cut => u16::MAX - 5,
        }
    }

    /// A record of such messages.
    pub(crate) fn encode(self, messages: &[Vec<u8>]) -> Vec<u8> {
        let mut out = self.marker().to_le_bytes().to_vec();
        postcard::to_io(messages, &mut out).expect("a Vec takes every byte");
        out
    }

    /// Which kind `record` is, if it is a record of bus messages (and not a connection, or
    /// the closing empty record).
    pub(crate) fn of(record: &[u8]) -> Option<Carried> {
        let [a, b, ..] = record else {
            return None;
        };
        let marker = u16::from_le_bytes([*a, *b]);
        [
            Carried::Held,
            Carried::Delivered,
            Carried::Committed,
            Carried::Crossing,
            Carried::Remote,
            Carried::Cut,
        ]
        .into_iter()
        .find(|k| k.marker() == marker)
    }

    /// A [`Carried::Crossing`] record of `token`.
    pub(crate) fn crossing(token: u64) -> Vec<u8> {
        Carried::Crossing.encode(&[token.to_le_bytes().to_vec()])
    }

    /// The token in a [`Carried::Crossing`] record.
    pub(crate) fn token_in(record: &[u8]) -> Option<u64> {
        match Carried::decode(record)? {
            (Carried::Crossing, Ok(parts)) => {
                Some(u64::from_le_bytes(parts.first()?[..].try_into().ok()?))
            }
            _ => None,
        }
    }

    /// Whether `records` tell that the taker's upgrade is done ([`Carried::Committed`]).
    pub(crate) fn committed_in(records: &[line::Record]) -> bool {
        (records.iter()).any(|(r, _)| Carried::of(r) == Some(Carried::Committed))
    }

    /// What `record` carries, if it is a record of bus messages.
    #[allow(clippy::type_complexity)]
    pub(crate) fn decode(record: &[u8]) -> Option<(Carried, Result<Vec<Vec<u8>>, RecordError>)> {
        let kind = Carried::of(record)?;
        Some((
            kind,
            postcard::from_bytes(&record[2..]).map_err(RecordError::from),
        ))
    }
}

/// The largest record a worker takes: a whole send queue and a whole message, with room for
/// the rest.
pub(crate) fn max_record(max_send_buffer: usize, max_message: usize) -> usize {
    max_send_buffer
        .saturating_mul(2)
        .saturating_add(max_message)
        .saturating_add(1 << 20)
}
