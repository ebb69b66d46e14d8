//! The TLS record layer of a `wss://` connection, on rustls's unbuffered API: the worker owns
//! every buffer, so TLS costs a connection no buffer of its own while it is idle.
//!
//! Reading: ciphertext is read into the worker's shared read buffer (after the few bytes of a
//! record a previous read cut short, the only TLS input a connection keeps between reads),
//! decrypted record by record, and each record's plaintext goes to the WebSocket session as
//! plain bytes would. Writing: the session's send queue is written through [`Encrypting`],
//! which seals queued frames a record (16 KiB) at a time into a shared scratch buffer and
//! writes up to four records with one system call, as a plain connection writes its queue;
//! only what the socket did not take is kept, until the socket is writable again. Handshake
//! messages go the same way.

use crate::proto::Session;
use crate::sys;
use bytes::BytesMut;
use rustls::ServerConfig;
use rustls::server::{ServerConnectionData, UnbufferedServerConnection};
use rustls::unbuffered::{
    ConnectionState, EncodeError, EncodeTlsData, EncryptError, InsufficientSizeError, WriteTraffic,
};
use std::cell::RefCell;
use std::io::{self, IoSlice, Write};
use std::os::fd::RawFd;
use std::sync::Arc;

/// Plaintext sealed into one record at most (TLS's limit, 2^14).
const MAX_RECORD: usize = 16 << 10;
/// Room for one sealed record: the plaintext, its header, content type, tag and padding.
const SEALED_MAX: usize = MAX_RECORD + 256;
/// Sealed records written with one system call, at most.
const BATCH: usize = 4 * SEALED_MAX;

thread_local! {
    /// The worker's scratch for sealed records on their way to the socket, and for gathering
    /// a record's plaintext from the send queue's pieces. One per worker thread; nothing stays
    /// in it between writes.
    static SCRATCH: RefCell<(Vec<u8>, Vec<u8>)> = RefCell::new((vec![0; BATCH], Vec::new()));
}

/// Why a TLS connection cannot go on.
#[derive(Debug, thiserror::Error)]
pub(crate) enum TlsFailure {
    #[error("socket error: {0}")]
    Io(#[from] io::Error),
    /// The client's bytes are not TLS, or broke it. `plain_http`: they look like an HTTP
    /// request sent without TLS.
    #[error("TLS error: {error}")]
    Protocol {
        error: rustls::Error,
        plain_http: bool,
    },
}

/// One connection's TLS state.
pub(crate) struct TlsConn {
    conn: UnbufferedServerConnection,
    /// The start of a record that a read cut short (empty, and unallocated, between records).
    partial: Vec<u8>,
    /// Sealed bytes the socket has not taken yet.
    unsent: Vec<u8>,
    /// Ciphertext has been read and understood: what follows can no longer be plain HTTP.
    started: bool,
    /// The client sent close_notify: nothing more comes in.
    peer_closed: bool,
    /// Our close_notify is queued.
    notified: bool,
}

impl TlsConn {
    pub(crate) fn new(config: &Arc<ServerConfig>) -> Result<TlsConn, rustls::Error> {
        Ok(TlsConn {
            conn: UnbufferedServerConnection::new(config.clone())?,
            partial: Vec::new(),
            unsent: Vec::new(),
            started: false,
            peer_closed: false,
            notified: false,
        })
    }

    /// The client sent close_notify.
    pub(crate) fn peer_closed(&self) -> bool {
        self.peer_closed
    }

    /// Sealed bytes wait for the socket.
    pub(crate) fn has_output(&self) -> bool {
        !self.unsent.is_empty()
    }

    /// Memory held for TLS input and output beyond the fixed state.
    pub(crate) fn footprint(&self) -> usize {
        self.partial.capacity() + self.unsent.capacity()
    }

    /// Reads what the socket has into `buf` (empty, with room), decrypts it and hands each
    /// record's plaintext to `plaintext`. Gives the bytes read (0: the client has gone) and
    /// whether the read was short of the room it had (the socket's queue is empty). `buf` is
    /// left empty.
    pub(crate) fn read(
        &mut self,
        fd: RawFd,
        buf: &mut BytesMut,
        mut plaintext: impl FnMut(&[u8]),
    ) -> Result<(usize, bool), TlsFailure> {
        let carried = self.partial.len();
        if carried > 0 {
            buf.extend_from_slice(&self.partial);
            self.partial = Vec::new();
        }
        let room = buf.capacity() - buf.len();
        let read = loop {
            match sys::recv_into(fd, buf) {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                other => break other,
            }
        };
        let n = match read {
            Ok(n) => n,
            Err(e) => {
                // Nothing new: the record's start waits for the next read.
                self.partial = buf.to_vec();
                buf.clear();
                return Err(e.into());
            }
        };
        let result = if n == 0 {
            Ok(())
        } else {
            self.process(buf, &mut plaintext)
        };
        buf.clear();
        result.map(|()| (n, n < room))
    }

    /// Takes the records in `buf`; keeps the start of one cut short.
    fn process(
        &mut self,
        buf: &mut BytesMut,
        plaintext: &mut impl FnMut(&[u8]),
    ) -> Result<(), TlsFailure> {
        let TlsConn {
            conn,
            partial,
            unsent,
            started,
            peer_closed,
            ..
        } = self;
        let mut at = 0;
        loop {
            let status = conn.process_tls_records(&mut buf[at..]);
            let mut discard = status.discard;
            let state = match status.state {
                Ok(state) => state,
                Err(error) => {
                    let plain_http = !*started && looks_like_http(&buf[..]);
                    return Err(TlsFailure::Protocol { error, plain_http });
                }
            };
            match state {
                ConnectionState::ReadTraffic(mut records) => {
                    while let Some(record) = records.next_record() {
                        let record = record.map_err(|error| TlsFailure::Protocol {
                            error,
                            plain_http: false,
                        })?;
                        discard += record.discard;
                        plaintext(record.payload);
                    }
                }
                ConnectionState::EncodeTlsData(mut encode) => encode_into(&mut encode, unsent),
                // Sent with the next flush, in order, before anything else.
                ConnectionState::TransmitTlsData(transmit) => transmit.done(),
                ConnectionState::PeerClosed => *peer_closed = true,
                ConnectionState::BlockedHandshake
                | ConnectionState::WriteTraffic(_)
                | ConnectionState::Closed => {
                    at += discard;
                    break;
                }
                // Early data is not enabled (`max_early_data_size` is 0), so none comes.
                ConnectionState::ReadEarlyData(_) => {
                    return Err(TlsFailure::Protocol {
                        error: rustls::Error::General("unexpected early data".into()),
                        plain_http: false,
                    });
                }
                _ => {
                    at += discard;
                    break;
                }
            }
            at += discard;
            if discard > 0 {
                *started = true;
            }
        }
        if at < buf.len() {
            *partial = buf[at..].to_vec();
        }
        Ok(())
    }

    /// Writes what is owed: handshake messages, then `session`'s queued frames, sealed. With
    /// `ending` (the connection is closing or failed and its last frames are out), a
    /// close_notify follows them once. `Ok(true)`: everything is written.
    pub(crate) fn write(
        &mut self,
        socket: &mut impl Write,
        session: &mut Session,
        ending: bool,
    ) -> io::Result<bool> {
        let TlsConn {
            conn,
            unsent,
            notified,
            ..
        } = self;
        loop {
            if !unsent.is_empty() && !write_out(socket, unsent)? {
                return Ok(false);
            }
            let status = conn.process_tls_records(&mut []);
            let state = status.state.map_err(io::Error::other)?;
            match state {
                ConnectionState::EncodeTlsData(mut encode) => encode_into(&mut encode, unsent),
                ConnectionState::TransmitTlsData(transmit) => transmit.done(),
                ConnectionState::PeerClosed => {}
                ConnectionState::WriteTraffic(mut traffic) => {
                    let mut sealer = Encrypting {
                        traffic: &mut traffic,
                        socket,
                        unsent,
                        pending: 0,
                    };
                    let wrote = session.write_to(&mut sealer);
                    // What was sealed goes out even when the queue could not all be taken.
                    sealer.finish()?;
                    if !wrote? {
                        return Ok(false);
                    }
                    if ending && !*notified {
                        *notified = true;
                        seal_close_notify(&mut traffic, unsent);
                        return write_out(socket, unsent);
                    }
                    return Ok(unsent.is_empty());
                }
                // Still handshaking: frames wait (none are queued before the upgrade, which
                // needs the handshake done).
                ConnectionState::BlockedHandshake => return Ok(session.queued() == 0),
                ConnectionState::Closed => return Ok(true),
                // Every read drains the records it decrypted, so none wait here.
                ConnectionState::ReadTraffic(_) | ConnectionState::ReadEarlyData(_) => {
                    return Err(io::Error::other("TLS records left unread"));
                }
                _ => return Ok(unsent.is_empty()),
            }
        }
    }
}

/// Whether `bytes` start like an HTTP request line (a client that forgot TLS).
fn looks_like_http(bytes: &[u8]) -> bool {
    let method_len = bytes.iter().take_while(|b| b.is_ascii_uppercase()).count();
    (3..=7).contains(&method_len) && bytes.get(method_len) == Some(&b' ')
}

/// Appends a handshake record to `unsent`.
fn encode_into(encode: &mut EncodeTlsData<'_, ServerConnectionData>, unsent: &mut Vec<u8>) {
    let at = unsent.len();
    let mut room = 4096;
    loop {
        unsent.resize(at + room, 0);
        match encode.encode(&mut unsent[at..]) {
            Ok(n) => {
                unsent.truncate(at + n);
                return;
            }
            Err(EncodeError::InsufficientSize(InsufficientSizeError { required_size })) => {
                room = required_size;
            }
            Err(EncodeError::AlreadyEncoded) => {
                unsent.truncate(at);
                return;
            }
        }
    }
}

/// Appends our close_notify alert to `unsent`.
fn seal_close_notify(traffic: &mut WriteTraffic<'_, ServerConnectionData>, unsent: &mut Vec<u8>) {
    let at = unsent.len();
    unsent.resize(at + 64, 0);
    match traffic.queue_close_notify(&mut unsent[at..]) {
        Ok(n) => unsent.truncate(at + n),
        Err(_) => unsent.truncate(at),
    }
}

/// Writes `bytes` as far as the socket takes them, dropping what it took. True when all are.
fn write_out(socket: &mut impl Write, bytes: &mut Vec<u8>) -> io::Result<bool> {
    let wrote = write_some(socket, bytes)?;
    if wrote < bytes.len() {
        bytes.drain(..wrote);
        return Ok(false);
    }
    *bytes = Vec::new();
    Ok(true)
}

/// Writes as much of `bytes` as the socket takes now; gives how much that was.
fn write_some(socket: &mut impl Write, bytes: &[u8]) -> io::Result<usize> {
    let mut wrote = 0;
    while wrote < bytes.len() {
        match socket.write(&bytes[wrote..]) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => wrote += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
            Err(e) => return Err(e),
        }
    }
    Ok(wrote)
}

/// The socket as the send queue sees it on a TLS connection: each write seals up to a record
/// of the queue's pieces into the worker's scratch, and the sealed records go to the socket
/// together, when the scratch has no room for another and at [`Encrypting::finish`]. The
/// plaintext of a record counts as written once it is sealed; what the socket did not take
/// waits in `unsent`, and until it has gone every further write would block.
struct Encrypting<'a, 'c, W> {
    traffic: &'a mut WriteTraffic<'c, ServerConnectionData>,
    socket: &'a mut W,
    unsent: &'a mut Vec<u8>,
    /// Sealed bytes at the start of the scratch, not yet written.
    pending: usize,
}

impl<W: Write> Encrypting<'_, '_, W> {
    /// Writes the sealed records waiting in `sealed`; keeps what the socket does not take.
    fn send_pending(&mut self, sealed: &[u8]) -> io::Result<()> {
        let wrote = write_some(self.socket, &sealed[..self.pending])?;
        self.unsent.extend_from_slice(&sealed[wrote..self.pending]);
        self.pending = 0;
        Ok(())
    }

    /// Writes what is still sealed and waiting.
    fn finish(mut self) -> io::Result<()> {
        if self.pending == 0 {
            return Ok(());
        }
        SCRATCH.with(|scratch| self.send_pending(&scratch.borrow().0))
    }
}

impl<W: Write> Write for Encrypting<'_, '_, W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.write_vectored(&[IoSlice::new(buf)])
    }

    fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        if !self.unsent.is_empty() {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        SCRATCH.with(|scratch| {
            let (sealed, gathered) = &mut *scratch.borrow_mut();
            if self.pending + SEALED_MAX > sealed.len() {
                self.send_pending(sealed)?;
                if !self.unsent.is_empty() {
                    return Err(io::ErrorKind::WouldBlock.into());
                }
            }
            // One piece is sealed where it lies; several are gathered into one record first.
            let first = bufs
                .iter()
                .find(|b| !b.is_empty())
                .map_or(&[][..], |b| &b[..]);
            let plain: &[u8] = if first.len() >= MAX_RECORD || bufs.len() == 1 {
                &first[..first.len().min(MAX_RECORD)]
            } else {
                gathered.clear();
                for b in bufs {
                    let take = b.len().min(MAX_RECORD - gathered.len());
                    gathered.extend_from_slice(&b[..take]);
                    if gathered.len() == MAX_RECORD {
                        break;
                    }
                }
                gathered
            };
            let len = loop {
                match self.traffic.encrypt(plain, &mut sealed[self.pending..]) {
                    Ok(n) => break n,
                    Err(EncryptError::InsufficientSize(InsufficientSizeError {
                        required_size,
                    })) => sealed.resize(self.pending + required_size, 0),
                    Err(e) => return Err(io::Error::other(format!("{e:?}"))),
                }
            };
            self.pending += len;
            Ok(plain.len())
        })
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_http_request_line_is_told_from_tls() {
        assert!(looks_like_http(b"GET / HTTP/1.1\r\n"));
        assert!(looks_like_http(b"OPTIONS * HTTP/1.1\r\n"));
        assert!(!looks_like_http(b"\x16\x03\x01\x02\x00"));
        assert!(!looks_like_http(b"get / HTTP/1.1"));
        assert!(!looks_like_http(b"GE"));
    }
}
