//! The physical ceiling of scripts/bench-peers.sh over TLS: raw-epoll's byte-echo with rustls in
//! between, and nothing else. rustls on the ring provider, configured as wsd configures it
//! (TLS 1.3 and 1.2, ALPN http/1.1, rustls's defaults otherwise, session tickets included), and
//! driven through its unbuffered API as wsd's worker drives it: ciphertext is read into one
//! scratch buffer shared by every connection (after the few bytes of a record a previous read
//! cut short, the only TLS input a connection keeps), decrypted in place record by record, and
//! each record's plaintext goes to `raw_echo::Wire`; the turn's replies of a connection are
//! sealed in records of up to 16 KiB into one buffer shared by the turn, and written with one
//! write per connection once every event of the turn is read, as raw-epoll writes.
//!
//! Usage: raw-tls PORT CERT KEY   (listens on 127.0.0.1:PORT; PEM certificate chain and key)

use raw_echo::{Outbox, Wire, accept_client, serve, server_config, slot, write_replies};
use rustls::server::UnbufferedServerConnection;
use rustls::unbuffered::{ConnectionState, EncodeError, EncryptError, InsufficientSizeError};
use std::io::Error;

const SCRATCH: usize = 64 << 10;

#[derive(Default)]
struct Conn {
    tls: Option<UnbufferedServerConnection>,
    /// The start of a record a read cut short (empty and unallocated between records).
    partial: Vec<u8>,
    wire: Wire,
    /// Sealed bytes the socket has not taken yet; a closing connection sends close_notify
    /// after its last reply.
    io: Outbox,
}

fn main() {
    let mut args = std::env::args().skip(1);
    let (Some(port), Some(cert), Some(key)) = (args.next(), args.next(), args.next()) else {
        eprintln!("usage: raw-tls PORT CERT KEY");
        std::process::exit(2)
    };
    let port: u16 = port.parse().unwrap_or_else(|_| {
        eprintln!("raw-tls: bad port {port}");
        std::process::exit(2)
    });
    let config = server_config(&cert, &key);
    let (lfd, ep) = serve(port);
    let mut conns: Vec<Conn> = Vec::new();
    let mut events = vec![libc::epoll_event { events: 0, u64: 0 }; 1024];
    let mut input = vec![0u8; SCRATCH + (18 << 10)];
    // The plaintext replies of the connection at hand, and every sealed reply of the turn,
    // one after another; `replies` says whose each range is.
    let mut plain: Vec<u8> = Vec::with_capacity(SCRATCH);
    let mut sealed: Vec<u8> = Vec::with_capacity(SCRATCH + (4 << 10));
    let mut replies: Vec<(i32, std::ops::Range<usize>)> = Vec::with_capacity(1024);
    println!("raw-tls listening on 127.0.0.1:{port}");
    loop {
        for ev in ep.wait(&mut events) {
            let fd = ev.u64 as i32;
            if fd == lfd {
                while let Some(c) = accept_client(lfd) {
                    match UnbufferedServerConnection::new(config.clone()) {
                        Ok(tls) => {
                            slot(&mut conns, c).tls = Some(tls);
                            ep.add_client(c);
                        }
                        Err(_) => unsafe {
                            libc::close(c);
                        },
                    }
                }
                continue;
            }
            let conn = &mut conns[fd as usize];
            if conn.tls.is_none() {
                continue;
            }
            conn.io.dead = ev.events & (libc::EPOLLERR | libc::EPOLLHUP) as u32 != 0;
            let start = sealed.len();
            plain.clear();
            // A read that fills the scratch buffer may have left more behind; a short one
            // emptied the socket, and edge-triggered epoll reports whatever arrives later.
            while !conn.io.dead && !conn.io.closing && ev.events & libc::EPOLLIN as u32 != 0 {
                let carried = std::mem::take(&mut conn.partial);
                input[..carried.len()].copy_from_slice(&carried);
                let room = &mut input[carried.len()..carried.len() + SCRATCH];
                let r = unsafe { libc::read(fd, room.as_mut_ptr().cast(), SCRATCH) };
                if r <= 0 {
                    conn.partial = carried;
                    conn.io.dead =
                        r == 0 || Error::last_os_error().raw_os_error() != Some(libc::EAGAIN);
                    break;
                }
                let got = carried.len() + r as usize;
                if !decrypt(conn, &mut input[..got], &mut plain, &mut sealed) {
                    conn.io.dead = true;
                    break;
                }
                if (r as usize) < SCRATCH {
                    break;
                }
            }
            if !conn.io.dead && !seal(conn, &plain, &mut sealed) {
                conn.io.dead = true;
            }
            replies.push((fd, start..sealed.len()));
        }
        write_replies(&mut conns, &mut replies, &sealed, |c| &mut c.io);
        sealed.clear();
    }
}

/// Takes the records in `buf`: handshake messages are answered into `sealed`, application
/// data goes through the connection's `Wire`, whose replies go to `plain`. The start of a
/// record cut short is kept. False if TLS failed.
fn decrypt(conn: &mut Conn, buf: &mut [u8], plain: &mut Vec<u8>, sealed: &mut Vec<u8>) -> bool {
    let Conn { tls, wire, io, .. } = conn;
    let closing = &mut io.closing;
    let tls = tls.as_mut().expect("a TLS connection");
    let mut at = 0;
    loop {
        let status = tls.process_tls_records(&mut buf[at..]);
        let mut discard = status.discard;
        match status.state {
            Err(_) => return false,
            Ok(ConnectionState::ReadTraffic(mut records)) => {
                while let Some(record) = records.next_record() {
                    let Ok(record) = record else { return false };
                    discard += record.discard;
                    if !*closing && !wire.read(record.payload, plain) {
                        *closing = true;
                    }
                }
            }
            Ok(ConnectionState::EncodeTlsData(mut encode)) => {
                let at = sealed.len();
                let mut room = 4096;
                loop {
                    sealed.resize(at + room, 0);
                    match encode.encode(&mut sealed[at..]) {
                        Ok(n) => break sealed.truncate(at + n),
                        Err(EncodeError::InsufficientSize(InsufficientSizeError {
                            required_size,
                        })) => room = required_size,
                        Err(EncodeError::AlreadyEncoded) => break sealed.truncate(at),
                    }
                }
            }
            // Written with the turn's replies, in order.
            Ok(ConnectionState::TransmitTlsData(transmit)) => transmit.done(),
            Ok(ConnectionState::PeerClosed) => *closing = true,
            Ok(_) => {
                at += discard;
                break;
            }
        }
        at += discard;
    }
    conn.partial = buf[at..].to_vec();
    true
}

/// Seals `plain` (the connection's replies of this turn) into `sealed`, then a close_notify
/// if the connection is closing. False if TLS failed.
fn seal(conn: &mut Conn, plain: &[u8], sealed: &mut Vec<u8>) -> bool {
    if plain.is_empty() && !conn.io.closing {
        return true;
    }
    let tls = conn.tls.as_mut().expect("a TLS connection");
    let status = tls.process_tls_records(&mut []);
    let Ok(ConnectionState::WriteTraffic(mut traffic)) = status.state else {
        return plain.is_empty(); // still handshaking: nothing can have been asked yet
    };
    let at = sealed.len();
    let mut room = plain.len() + plain.len() / 512 + 64;
    loop {
        sealed.resize(at + room, 0);
        match traffic.encrypt(plain, &mut sealed[at..]) {
            Ok(n) => break sealed.truncate(at + n),
            Err(EncryptError::InsufficientSize(InsufficientSizeError { required_size })) => {
                room = required_size
            }
            Err(_) => return false,
        }
    }
    if conn.io.closing {
        let at = sealed.len();
        sealed.resize(at + 64, 0);
        let n = traffic.queue_close_notify(&mut sealed[at..]).unwrap_or(0);
        sealed.truncate(at + n);
    }
    true
}
