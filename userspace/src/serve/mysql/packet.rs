//! The one MySQL packet rampart writes itself: an ERR packet sent instead of the server's
//! initial handshake, when a connection is refused (MySQL Router does the same). Everything
//! else passes through untouched.

/// ER_UNKNOWN_ERROR (1105, SQLSTATE HY000): a server-side code, with the message saying why.
/// Not 2003 as MySQL Router sends: codes 2000-2999 are the client library's own, and recent
/// MariaDB clients refuse an ERR packet carrying one as forged ("Received malformed packet").
pub const ER_NO_SERVER: u16 = 1105;

/// An ERR packet at the handshake stage: 3-byte little-endian payload length, sequence id 0,
/// then 0xFF, the error code (little-endian) and the message. No `#SQLSTATE` marker: before the
/// handshake the client has not agreed on CLIENT_PROTOCOL_41, and clients read the message as
/// it is (as they do for a server's "Host ... is not allowed to connect").
pub fn handshake_err(code: u16, message: &str) -> Vec<u8> {
    // A packet payload is at most 2^24 - 1 bytes; messages are a line, cut far below that.
    let msg = &message.as_bytes()[..message.len().min(512)];
    let len = 3 + msg.len();
    let mut p = Vec::with_capacity(4 + len);
    p.extend_from_slice(&(len as u32).to_le_bytes()[..3]);
    p.push(0);
    p.push(0xFF);
    p.extend_from_slice(&code.to_le_bytes());
    p.extend_from_slice(msg);
    p
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn err_packet_bytes() {
        let p = handshake_err(ER_NO_SERVER, "no writable primary in cluster main");
        let msg = b"no writable primary in cluster main";
        assert_eq!(&p[..4], &[3 + msg.len() as u8, 0, 0, 0]);
        assert_eq!(&p[4..7], &[0xFF, 0x51, 0x04]);
        assert_eq!(&p[7..], msg);
    }

    #[test]
    fn err_packet_long_message_is_cut() {
        let p = handshake_err(1, &"x".repeat(100_000));
        assert_eq!(p.len(), 4 + 3 + 512);
        assert_eq!(&p[..4], &[0x03, 0x02, 0, 0]);
    }
}
