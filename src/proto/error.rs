//! [`ProtocolError`]: each way a client's bytes can fail to be a WebSocket stream, and the
//! close code that answers it.

use super::close;
use std::fmt;

/// How a client broke RFC 6455 (or a configured limit). `on_error` sees it inside
/// `ConnError::Protocol`; [`ProtocolError::close_code`] is the code the client was sent, and
/// its `Display` text is the close reason.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum ProtocolError {
    /// RSV1–3 set, with no extension negotiated that defines them (§5.2).
    ReservedBits,
    /// RSV1 (permessage-deflate's "compressed") on a control frame or a continuation frame
    /// (RFC 7692 §6.1: only a message's first frame carries it).
    MisplacedCompressionBit,
    /// An opcode RFC 6455 reserves (§5.2).
    ReservedOpcode(u8),
    /// A client frame without a mask (§5.1).
    UnmaskedFrame,
    /// A control frame without FIN (§5.5).
    FragmentedControl,
    /// A control frame with more than 125 bytes of payload (§5.5).
    ControlTooLong,
    /// A 64-bit payload length with its most significant bit set (§5.2).
    LengthOverflow,
    /// A continuation frame when no message was being sent (§5.4).
    UnexpectedContinuation,
    /// A new text or binary frame before the fragmented message finished (§5.4).
    UnfinishedMessage,
    /// A Close frame whose payload is a single byte (§5.5.1).
    CloseTooShort,
    /// A Close frame with a code no peer may send (§7.4).
    InvalidCloseCode(u16),
    /// A text message or close reason that is not UTF-8 (§8.1).
    InvalidUtf8,
    /// A compressed message (permessage-deflate) whose payload is not a valid DEFLATE
    /// stream (RFC 7692 §7.2.2).
    BadCompressedData,
    /// A frame's payload over `max_frame_size`.
    FrameTooBig {
        /// The limit, in bytes.
        limit: usize,
    },
    /// A message (all its fragments) over `max_message_size`.
    MessageTooBig {
        /// The limit, in bytes.
        limit: usize,
    },
}

impl ProtocolError {
    /// The close code the client is sent: 1007 for bad UTF-8 or a compressed payload that
    /// does not decompress, 1009 over a size limit (a decompressed message included), 1002
    /// for every other violation.
    pub fn close_code(&self) -> u16 {
        match self {
            ProtocolError::InvalidUtf8 | ProtocolError::BadCompressedData => close::INVALID_PAYLOAD,
            ProtocolError::FrameTooBig { .. } | ProtocolError::MessageTooBig { .. } => {
                close::TOO_BIG
            }
            _ => close::PROTOCOL_ERROR,
        }
    }
}

impl fmt::Display for ProtocolError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ProtocolError::ReservedBits => {
                f.write_str("reserved bits set that no negotiated extension defines")
            }
            ProtocolError::MisplacedCompressionBit => {
                f.write_str("RSV1 set on a control or continuation frame")
            }
            ProtocolError::ReservedOpcode(op) => write!(f, "reserved opcode {op:#x}"),
            ProtocolError::UnmaskedFrame => f.write_str("client frame not masked"),
            ProtocolError::FragmentedControl => f.write_str("fragmented control frame"),
            ProtocolError::ControlTooLong => f.write_str("control frame over 125 bytes"),
            ProtocolError::LengthOverflow => f.write_str("frame length with the top bit set"),
            ProtocolError::UnexpectedContinuation => {
                f.write_str("continuation frame with no message to continue")
            }
            ProtocolError::UnfinishedMessage => {
                f.write_str("new message before the last one finished")
            }
            ProtocolError::CloseTooShort => f.write_str("close frame with a 1-byte payload"),
            ProtocolError::InvalidCloseCode(code) => write!(f, "invalid close code {code}"),
            ProtocolError::InvalidUtf8 => f.write_str("invalid UTF-8"),
            ProtocolError::BadCompressedData => f.write_str("invalid compressed data"),
            ProtocolError::FrameTooBig { limit } => {
                write!(f, "frame over the {limit}-byte limit")
            }
            ProtocolError::MessageTooBig { limit } => {
                write!(f, "message over the {limit}-byte limit")
            }
        }
    }
}

impl std::error::Error for ProtocolError {}
