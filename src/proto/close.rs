//! Close codes (RFC 6455 §7.4): the ones wsd itself sends, by name, and which codes a peer
//! may put on the wire. Apps pass any allowed code to `Context::close_with`; these names are
//! for them too (`wsd::close::GOING_AWAY`).

/// The purpose of the connection has been fulfilled (`Context::close`).
pub const NORMAL: u16 = 1000;
/// The server is going down (a stop or a reload), or the client was idle too long.
pub const GOING_AWAY: u16 = 1001;
/// The client broke the protocol.
pub const PROTOCOL_ERROR: u16 = 1002;
/// A text message (or a close reason) that is not UTF-8.
pub const INVALID_PAYLOAD: u16 = 1007;
/// A policy was broken: the client read too slowly and `send_buffer_policy` is `"close"`.
pub const POLICY_VIOLATION: u16 = 1008;
/// A frame or message over `max_frame_size` or `max_message_size`.
pub const TOO_BIG: u16 = 1009;
/// The server failed while handling the connection (a hook panicked).
pub const INTERNAL_ERROR: u16 = 1011;
/// The server is restarting; the client may reconnect at once (IANA registry).
pub const SERVICE_RESTART: u16 = 1012;

/// The client's signed token expired (IANA-registered 3000, "Unauthorized").
pub const TOKEN_EXPIRED: u16 = 3000;

/// Close codes a peer may put on the wire (RFC 6455 §7.4, plus the IANA-registered
/// 1012–1014 and the 3000–4999 ranges for libraries and applications).
pub(crate) fn allowed(code: u16) -> bool {
    matches!(code, 1000..=1003 | 1007..=1014 | 3000..=4999)
}
