//! socket.io 4 from the subscriber's side, spoken directly over a WebSocket: Engine.IO v4
//! packets, one per WebSocket text message, and socket.io packets inside them.
//!
//! `wsd bench api --protocol socketio` measures socket.io servers with the same client that
//! measures wsd, so neither side's figure carries the cost of a heavier client: a Node process
//! running 5,000 `socket.io-client` instances spends more CPU on them than the server it
//! measures, on the same two cores. What a subscriber says is what `socket.io-client` says
//! with `transports: ["websocket"]` (no long-polling first), which is the cheaper path for
//! the server:
//!
//! 1. `GET /socket.io/?EIO=4&transport=websocket` upgrades; the server opens with
//!    `0{"sid":..,"pingInterval":..}`.
//! 2. The client connects to the main namespace with `40`; the server answers `40{"sid":..}`.
//!    Nothing else may be sent before that answer: socket.io drops the client otherwise.
//! 3. The client emits `42["join","<room>"]`; the peer server (benches/peers/socketio) joins
//!    it to the room and emits `42["joined","<room>"]`, and the subscriber is ready.
//! 4. A publish arrives as `42["m","<data>"]`; the server's `2` (ping) is answered with `3`.

/// The path of a socket.io upgrade, WebSocket transport only.
pub const PATH: &str = "/socket.io/?EIO=4&transport=websocket";

/// Connect to the main namespace.
pub const CONNECT: &[u8] = b"40";
/// Engine.IO pong, the answer to the server's ping (`2`).
pub const PONG: &[u8] = b"3";
/// The event the peer's backend emits each publish as.
const DELIVERY: &[u8] = b"42[\"m\",\"";

/// What one packet from the server is, to a subscriber.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Packet<'a> {
    /// `0{...}`: the Engine.IO handshake.
    Open,
    /// `2`: answer with [`PONG`].
    Ping,
    /// `40{...}`: the namespace is connected; the client may emit.
    Connected,
    /// `42["joined","<room>"]`: the room it asked for.
    Joined(&'a [u8]),
    /// `42["m","<data>"]`: a publish; the data (still JSON-escaped, with its closing quote and
    /// bracket).
    Delivery(&'a [u8]),
    /// `44{...}`: the namespace refused the client.
    ConnectError,
    /// `41` or Engine.IO `1`: the server closed the socket.
    Closed,
    /// Anything else (another event, an ack, a noop).
    Other,
}

/// Reads a packet.
pub fn parse(p: &[u8]) -> Packet<'_> {
    if let Some(data) = p.strip_prefix(DELIVERY) {
        return Packet::Delivery(data);
    }
    if let Some(room) = p.strip_prefix(b"42[\"joined\",\"") {
        return Packet::Joined(room.strip_suffix(b"\"]").unwrap_or(room));
    }
    match p {
        b"2" => Packet::Ping,
        b"1" | b"41" => Packet::Closed,
        _ if p.starts_with(b"0{") => Packet::Open,
        _ if p.starts_with(b"40") => Packet::Connected,
        _ if p.starts_with(b"44") => Packet::ConnectError,
        _ => Packet::Other,
    }
}

/// `42["join","<room>"]`, with the room JSON-quoted.
pub fn join(room_json: &str) -> Vec<u8> {
    format!("42[\"join\",{room_json}]").into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_packets_a_subscriber_meets_are_told_apart() {
        let open = br#"0{"sid":"x","upgrades":[],"pingInterval":25000,"pingTimeout":20000}"#;
        assert_eq!(parse(open), Packet::Open);
        assert_eq!(parse(b"2"), Packet::Ping);
        assert_eq!(parse(br#"40{"sid":"abc"}"#), Packet::Connected);
        assert_eq!(
            parse(br#"42["joined","bench-7"]"#),
            Packet::Joined(b"bench-7")
        );
        assert_eq!(
            parse(br#"42["m","123456 9"]"#),
            Packet::Delivery(b"123456 9\"]")
        );
        assert_eq!(parse(br#"44{"message":"no"}"#), Packet::ConnectError);
        assert_eq!(parse(b"41"), Packet::Closed);
        assert_eq!(parse(br#"42["other",1]"#), Packet::Other);
        assert_eq!(join("\"bench-7\""), br#"42["join","bench-7"]"#);
    }
}
