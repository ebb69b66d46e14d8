//! One bus message as bytes: the same encoding on the local mesh and on Redis.
//!
//! ```text
//! kind u8 | opcode u8 | origin host u64 LE | origin slot u16 LE | kind's fields | payload
//!   send_to: conn idx u32 LE, serial u64 LE     publish: topic length u16 LE, topic
//!   send_user: user length u16 LE, user         ask, answer: id u32 LE (payload: JSON)
//!   mark: token u64 LE
//! ```
//!
//! `Ask` and `Answer` are how one worker asks the others of its host something (how many
//! subscribers a topic has, who is there, their counters) and gathers what they say: the
//! payload is a JSON question or answer (`worker::asking`), which keeps the wire small while
//! the questions grow.
//!
//! A frame's payload travels as is; each receiving worker encodes the WebSocket frame once and
//! shares it among its clients. Text is checked for UTF-8 when decoded, so a message that came
//! from outside (Redis) cannot put invalid text on the wire.

use crate::{ConnId, Message};
use bytes::Bytes;

const BROADCAST: u8 = 1;
const SEND_TO: u8 = 2;
const PUBLISH: u8 = 3;
const APP: u8 = 4;
const SEND_USER: u8 = 5;
const ASK: u8 = 6;
const ANSWER: u8 = 7;
const MARK: u8 = 8;

const TEXT: u8 = 1;
const BINARY: u8 = 2;

/// Where a bus message came from: a host (a wsd master) and a worker slot of its group.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Origin {
    pub host: u64,
    pub slot: u16,
}

/// What a bus message asks of the worker that receives it.
#[derive(Debug, Clone, PartialEq)]
pub enum BusMessage {
    /// Send to every client of the receiving worker.
    Broadcast(Message),
    /// Send to one client of the receiving worker, if it is still there.
    SendTo(ConnId, Message),
    /// Send to the receiving worker's subscribers of a topic.
    Publish(String, Message),
    /// Hand to the app's `on_bus_message` hook.
    App(Bytes),
    /// Send to every connection of a user held by the receiving worker.
    SendUser(String, Message),
    /// A question (JSON) for the receiving worker; a non-zero id wants an [`BusMessage::Answer`]
    /// sent back to the asking worker.
    Ask(u32, Bytes),
    /// The answer (JSON) to the asking worker's question `id`.
    Answer(u32, Bytes),
    /// A point in Redis's order of messages that two workers of one host agree on, to share
    /// out the messages from other hosts for the clients one hands the other
    /// (`bus::crossing`). Only on Redis, from and for the sending host.
    Mark(u64),
}

impl BusMessage {
    /// A message for clients: a broadcast, a publish, a user's, a `send_to`.
    pub fn is_for_clients(&self) -> bool {
        matches!(
            self,
            BusMessage::Broadcast(_)
                | BusMessage::Publish(..)
                | BusMessage::SendUser(..)
                | BusMessage::SendTo(..)
        )
    }
}

/// Why bytes are not a bus message.
#[derive(Debug, PartialEq, Eq)]
pub enum WireError {
    Truncated,
    UnknownKind(u8),
    UnknownOpcode(u8),
    InvalidUtf8,
}

impl std::fmt::Display for WireError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            WireError::Truncated => write!(f, "truncated bus message"),
            WireError::UnknownKind(k) => write!(f, "unknown bus message kind {k}"),
            WireError::UnknownOpcode(o) => write!(f, "unknown bus message opcode {o}"),
            WireError::InvalidUtf8 => write!(f, "bus text message is not UTF-8"),
        }
    }
}

pub fn encode(origin: Origin, msg: &BusMessage) -> Vec<u8> {
    let (kind, body): (u8, Option<&Message>) = match msg {
        BusMessage::Broadcast(m) => (BROADCAST, Some(m)),
        BusMessage::SendTo(_, m) => (SEND_TO, Some(m)),
        BusMessage::Publish(_, m) => (PUBLISH, Some(m)),
        BusMessage::App(_) => (APP, None),
        BusMessage::SendUser(_, m) => (SEND_USER, Some(m)),
        BusMessage::Ask(..) => (ASK, None),
        BusMessage::Answer(..) => (ANSWER, None),
        BusMessage::Mark(_) => (MARK, None),
    };
    let opcode = match body {
        Some(Message::Text(_)) => TEXT,
        Some(Message::Binary(_)) => BINARY,
        None => 0,
    };
    let payload: &[u8] = match msg {
        BusMessage::App(b) | BusMessage::Ask(_, b) | BusMessage::Answer(_, b) => b,
        _ => body.map_or(&[], Message::as_bytes),
    };
    let mut out = Vec::with_capacity(16 + payload.len());
    out.push(kind);
    out.push(opcode);
    out.extend_from_slice(&origin.host.to_le_bytes());
    out.extend_from_slice(&origin.slot.to_le_bytes());
    match msg {
        BusMessage::SendTo(conn, _) => {
            out.extend_from_slice(&conn.idx.to_le_bytes());
            out.extend_from_slice(&conn.serial.to_le_bytes());
        }
        BusMessage::Publish(name, _) | BusMessage::SendUser(name, _) => {
            let name = &name.as_bytes()[..name.len().min(u16::MAX as usize)];
            out.extend_from_slice(&(name.len() as u16).to_le_bytes());
            out.extend_from_slice(name);
        }
        BusMessage::Ask(id, _) | BusMessage::Answer(id, _) => {
            out.extend_from_slice(&id.to_le_bytes())
        }
        BusMessage::Mark(token) => out.extend_from_slice(&token.to_le_bytes()),
        BusMessage::Broadcast(_) | BusMessage::App(_) => {}
    }
    out.extend_from_slice(payload);
    out
}

/// Whether `bytes` are a [`BusMessage::Mark`], without decoding them.
#[cfg(feature = "cluster")]
pub fn is_mark(bytes: &[u8]) -> bool {
    bytes.first() == Some(&MARK)
}

/// Where a message came from, without decoding (or copying) the rest.
#[cfg(any(test, feature = "cluster"))]
pub fn origin_of(bytes: &[u8]) -> Result<Origin, WireError> {
    let head = bytes.get(2..12).ok_or(WireError::Truncated)?;
    Ok(Origin {
        host: u64::from_le_bytes(head[..8].try_into().expect("8 bytes")),
        slot: u16::from_le_bytes(head[8..].try_into().expect("2 bytes")),
    })
}

pub fn decode(bytes: &[u8]) -> Result<(Origin, BusMessage), WireError> {
    let mut r = Reader(bytes);
    let kind = r.u8()?;
    let opcode = r.u8()?;
    let origin = Origin {
        host: u64::from_le_bytes(r.take(8)?.try_into().expect("8 bytes")),
        slot: u16::from_le_bytes(r.take(2)?.try_into().expect("2 bytes")),
    };
    let msg = match kind {
        BROADCAST => BusMessage::Broadcast(r.message(opcode)?),
        SEND_TO => {
            let idx = r.u32()?;
            let serial = r.u64()?;
            BusMessage::SendTo(ConnId { serial, idx }, r.message(opcode)?)
        }
        PUBLISH => BusMessage::Publish(r.name()?, r.message(opcode)?),
        SEND_USER => BusMessage::SendUser(r.name()?, r.message(opcode)?),
        APP => BusMessage::App(Bytes::copy_from_slice(r.0)),
        ASK => BusMessage::Ask(r.u32()?, Bytes::copy_from_slice(r.0)),
        ANSWER => BusMessage::Answer(r.u32()?, Bytes::copy_from_slice(r.0)),
        MARK => BusMessage::Mark(r.u64()?),
        other => return Err(WireError::UnknownKind(other)),
    };
    Ok((origin, msg))
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], WireError> {
        if self.0.len() < n {
            return Err(WireError::Truncated);
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(head)
    }
    fn u8(&mut self) -> Result<u8, WireError> {
        Ok(self.take(1)?[0])
    }
    fn u32(&mut self) -> Result<u32, WireError> {
        Ok(u32::from_le_bytes(
            self.take(4)?.try_into().expect("4 bytes"),
        ))
    }
    fn u64(&mut self) -> Result<u64, WireError> {
        Ok(u64::from_le_bytes(
            self.take(8)?.try_into().expect("8 bytes"),
        ))
    }
    /// A topic or user name: its length (u16) and its UTF-8 bytes.
    fn name(&mut self) -> Result<String, WireError> {
        let len = u16::from_le_bytes(self.take(2)?.try_into().expect("2 bytes")) as usize;
        let name = std::str::from_utf8(self.take(len)?).map_err(|_| WireError::InvalidUtf8)?;
        Ok(name.to_string())
    }
    /// The rest as a message of `opcode`.
    fn message(&mut self, opcode: u8) -> Result<Message, WireError> {
        let rest = std::mem::take(&mut self.0);
        match opcode {
            TEXT => std::str::from_utf8(rest)
                .map(|s| Message::from(s.to_string()))
                .map_err(|_| WireError::InvalidUtf8),
            BINARY => Ok(Message::Binary(Bytes::copy_from_slice(rest))),
            other => Err(WireError::UnknownOpcode(other)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kind_round_trips() {
        let origin = Origin {
            host: 0x1234_5678_9abc_def0,
            slot: 3,
        };
        let conn = ConnId { serial: 42, idx: 7 };
        for msg in [
            BusMessage::Broadcast(Message::from("héllo")),
            BusMessage::Broadcast(Message::from(vec![0u8, 255, 1])),
            BusMessage::SendTo(conn, Message::from("to you")),
            BusMessage::Publish("room/1".into(), Message::from("in the room")),
            BusMessage::Publish(String::new(), Message::from(Vec::new())),
            BusMessage::App(Bytes::from_static(b"\x00app data")),
            BusMessage::SendUser("ada".into(), Message::from("hi ada")),
            BusMessage::SendUser("bob".into(), Message::from(vec![1u8, 2])),
            BusMessage::Ask(7, Bytes::from_static(b"{\"stats\":null}")),
            BusMessage::Answer(u32::MAX, Bytes::from_static(b"[]")),
            BusMessage::Mark(u64::MAX - 1),
        ] {
            let bytes = encode(origin, &msg);
            assert_eq!(origin_of(&bytes), Ok(origin));
            assert_eq!(decode(&bytes), Ok((origin, msg)));
        }
    }

    #[test]
    fn bad_bytes_are_errors_not_panics() {
        assert_eq!(decode(&[]), Err(WireError::Truncated));
        assert_eq!(origin_of(&[BROADCAST, TEXT, 0]), Err(WireError::Truncated));
        assert_eq!(decode(&[BROADCAST, TEXT, 0]), Err(WireError::Truncated));
        let mut bad = encode(
            Origin { host: 1, slot: 0 },
            &BusMessage::Broadcast(Message::from("x")),
        );
        *bad.last_mut().unwrap() = 0xff;
        assert_eq!(decode(&bad), Err(WireError::InvalidUtf8));
        bad[0] = 9;
        assert_eq!(decode(&bad), Err(WireError::UnknownKind(9)));
        let mut short_topic = vec![PUBLISH, TEXT];
        short_topic.extend_from_slice(&[0; 10]);
        short_topic.extend_from_slice(&5u16.to_le_bytes());
        short_topic.extend_from_slice(b"ab");
        assert_eq!(decode(&short_topic), Err(WireError::Truncated));
    }
}
