//! RFC 6455 frame vocabulary: opcodes, the server's frame header and masking.
//!
//! Servers never mask, so encoding is just a header in front of the payload; that is what
//! lets a broadcast encode a frame once and hand the same bytes to every connection.

use bytes::Bytes;

pub(crate) const CONTINUATION: u8 = 0x0;
pub(crate) const TEXT: u8 = 0x1;
pub(crate) const BINARY: u8 = 0x2;
pub(crate) const CLOSE: u8 = 0x8;
pub(crate) const PING: u8 = 0x9;
pub(crate) const PONG: u8 = 0xA;

/// RSV1 in a frame's first byte: with permessage-deflate, "this message is compressed"
/// (RFC 7692 §6). A server header's `opcode` may carry it (`TEXT | RSV1`).
pub(crate) const RSV1: u8 = 0x40;

/// Control frames carry at most this much payload (RFC 6455 §5.5).
pub(crate) const MAX_CONTROL_PAYLOAD: usize = 125;

/// The longest header a server writes: 2 bytes + a 64-bit length.
pub(crate) const MAX_SERVER_HEADER: usize = 10;

/// Bytes on the wire for a server frame with a payload of `len` bytes.
pub(crate) fn frame_len(len: usize) -> usize {
    header_len(len) + len
}

fn header_len(len: usize) -> usize {
    match len {
        0..=125 => 2,
        126..=0xFFFF => 4,
        _ => 10,
    }
}

/// An unmasked, final frame header for `opcode` (with [`RSV1`] if compressed) and a payload
/// of `len` bytes.
#[derive(Clone, Copy)]
pub(crate) struct Header {
    bytes: [u8; MAX_SERVER_HEADER],
    len: u8,
}

impl Header {
    pub(crate) fn new(opcode: u8, len: usize) -> Header {
        let mut bytes = [0; MAX_SERVER_HEADER];
        bytes[0] = 0x80 | opcode;
        let used = header_len(len);
        match used {
            2 => bytes[1] = len as u8,
            4 => {
                bytes[1] = 126;
                bytes[2..4].copy_from_slice(&(len as u16).to_be_bytes());
            }
            _ => {
                bytes[1] = 127;
                bytes[2..10].copy_from_slice(&(len as u64).to_be_bytes());
            }
        }
        Header {
            bytes,
            len: used as u8,
        }
    }

    /// No header: for bytes that are whole frames already.
    pub(crate) const NONE: Header = Header {
        bytes: [0; MAX_SERVER_HEADER],
        len: 0,
    };

    pub(crate) fn as_bytes(&self) -> &[u8] {
        &self.bytes[..self.len as usize]
    }
}

/// Appends an unmasked, final frame header for `opcode` (with [`RSV1`] if compressed) and a
/// payload of `len` bytes.
pub(crate) fn put_header(out: &mut Vec<u8>, opcode: u8, len: usize) {
    out.extend_from_slice(Header::new(opcode, len).as_bytes());
}

/// A whole frame, header and payload, in one buffer (for broadcasts and control frames).
pub(crate) fn encode(opcode: u8, payload: &[u8]) -> Bytes {
    let mut out = Vec::with_capacity(frame_len(payload.len()));
    put_header(&mut out, opcode, payload.len());
    out.extend_from_slice(payload);
    out.into()
}

/// A Close frame's payload: the code, then a UTF-8 reason cut to fit a control frame.
pub(crate) fn close_payload(code: u16, reason: &str) -> Vec<u8> {
    let mut end = reason.len().min(MAX_CONTROL_PAYLOAD - 2);
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    let mut out = Vec::with_capacity(2 + end);
    out.extend_from_slice(&code.to_be_bytes());
    out.extend_from_slice(&reason.as_bytes()[..end]);
    out
}

/// XORs `data` with `mask`, where `data` starts `offset` bytes into the masked payload.
pub(crate) fn unmask(data: &mut [u8], mask: [u8; 4], offset: usize) {
    let k = offset % 4;
    let key = [
        mask[k],
        mask[(k + 1) % 4],
        mask[(k + 2) % 4],
        mask[(k + 3) % 4],
    ];
    let wide = u64::from_ne_bytes([
        key[0], key[1], key[2], key[3], key[0], key[1], key[2], key[3],
    ]);
    let mut chunks = data.chunks_exact_mut(8);
    for chunk in &mut chunks {
        let word = u64::from_ne_bytes((&*chunk).try_into().expect("8 bytes")) ^ wide;
        chunk.copy_from_slice(&word.to_ne_bytes());
    }
    for (i, b) in chunks.into_remainder().iter_mut().enumerate() {
        *b ^= key[i % 4];
    }
}

/// Appends the header of a masked client frame: `first` is the frame's first byte (FIN, RSV
/// and opcode bits, taken as given so tests can build frames a server must refuse), `len` the
/// payload length it claims, in the shortest of the three encodings, then `mask`.
#[inline]
pub fn put_client_header(out: &mut Vec<u8>, first: u8, len: usize, mask: [u8; 4]) {
    let at = out.len();
    put_header(out, 0, len);
    out[at] = first;
    out[at + 1] |= 0x80;
    out.extend_from_slice(&mask);
}

/// Appends a whole masked client frame (see [`put_client_header`]) with `payload` masked by
/// `mask`; allocates only if `out` must grow.
#[inline]
pub fn put_client_frame(out: &mut Vec<u8>, first: u8, payload: &[u8], mask: [u8; 4]) {
    put_client_header(out, first, payload.len(), mask);
    let start = out.len();
    out.extend_from_slice(payload);
    unmask(&mut out[start..], mask, 0);
}

/// A whole masked client frame in a buffer of its own (see [`put_client_frame`]).
pub fn client_frame(first: u8, payload: &[u8], mask: [u8; 4]) -> Vec<u8> {
    let mut out = Vec::with_capacity(frame_len(payload.len()) + mask.len());
    put_client_frame(&mut out, first, payload, mask);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_use_the_shortest_length() {
        for (len, head) in [(0, 2), (125, 2), (126, 4), (65535, 4), (65536, 10)] {
            let mut out = Vec::new();
            put_header(&mut out, TEXT, len);
            assert_eq!(out.len(), head, "len {len}");
            assert_eq!(frame_len(len), head + len);
        }
    }

    #[test]
    fn unmask_at_any_offset_matches_bytewise_xor() {
        let mask = [1, 2, 3, 4];
        let plain: Vec<u8> = (0..=40).collect();
        let masked: Vec<u8> = plain
            .iter()
            .enumerate()
            .map(|(i, b)| b ^ mask[i % 4])
            .collect();
        for split in 0..masked.len() {
            let mut data = masked.clone();
            let (a, b) = data.split_at_mut(split);
            unmask(a, mask, 0);
            unmask(b, mask, split);
            assert_eq!(data, plain, "split at {split}");
        }
    }

    #[test]
    fn client_frames_keep_their_first_byte_and_unmask_to_the_payload() {
        let mask = [0x37, 0xfa, 0x21, 0x3d];
        for (len, head) in [(0, 2), (125, 2), (126, 4), (65535, 4), (65536, 10)] {
            let payload: Vec<u8> = (0..len).map(|i| i as u8).collect();
            let f = client_frame(0x40 | TEXT, &payload, mask);
            assert_eq!(f.len(), head + 4 + len, "len {len}");
            assert_eq!(f[0], 0x40 | TEXT, "first byte as given");
            assert_eq!(f[1] & 0x80, 0x80, "mask bit");
            let mut server = Vec::new();
            put_header(&mut server, TEXT, len);
            assert_eq!(&f[2..head], &server[2..], "length encoding, len {len}");
            assert_eq!(f[head..head + 4], mask);
            let mut body = f[head + 4..].to_vec();
            unmask(&mut body, mask, 0);
            assert_eq!(body, payload, "len {len}");
        }
    }

    #[test]
    fn a_compressed_frame_has_rsv1_set() {
        for len in [3, 300, 70_000] {
            let plain = Header::new(TEXT, len);
            let compressed = Header::new(TEXT | RSV1, len);
            assert_eq!(plain.as_bytes()[0], 0x81);
            assert_eq!(compressed.as_bytes()[0], 0xC1);
            assert_eq!(
                plain.as_bytes()[1..],
                compressed.as_bytes()[1..],
                "len {len}"
            );
        }
    }

    #[test]
    fn close_reason_is_cut_on_a_char_boundary() {
        let long = "é".repeat(100);
        let p = close_payload(1000, &long);
        assert!(p.len() <= MAX_CONTROL_PAYLOAD);
        assert!(std::str::from_utf8(&p[2..]).is_ok());
    }
}
