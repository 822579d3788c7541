//! PROXY protocol (HAProxy's spec, doc/proxy-protocol.txt): read v2 and v1 headers from trusted
//! balancers in front of us, write v2 headers to backends that want the client's address.

use std::{
    net::{IpAddr, Ipv6Addr, SocketAddr},
    time::Duration,
};

use tokio::{io::AsyncReadExt, net::TcpStream};

const V2_SIG: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";
/// A v1 line is at most 107 bytes, CRLF included.
const V1_MAX: usize = 107;

#[derive(Debug, thiserror::Error)]
pub enum ProxyProtoError {
    #[error("PROXY header: {0}")]
    Io(#[from] std::io::Error),
    #[error("PROXY header expected but not received within {0:?}")]
    Timeout(Duration),
    #[error("PROXY header expected, got other bytes")]
    Missing,
    #[error("malformed PROXY header: {0}")]
    Malformed(&'static str),
}

/// What a PROXY header said.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProxyHeader {
    /// The balancer speaks for itself (health checks): keep the TCP peer's addresses.
    Local,
    /// A relayed connection: the client's address and the address it connected to.
    Proxied { src: SocketAddr, dst: SocketAddr },
}

/// How many bytes of `buf` a complete header takes, or `Ok(None)` if more bytes are needed.
fn header_len(buf: &[u8]) -> Result<Option<usize>, ProxyProtoError> {
    if !buf.is_empty() && buf[0] == V2_SIG[0] {
        let n = buf.len().min(12);
        if buf[..n] != V2_SIG[..n] {
            return Err(ProxyProtoError::Missing);
        }
        if buf.len() < 16 {
            return Ok(None);
        }
        let len = u16::from_be_bytes([buf[14], buf[15]]) as usize;
        return Ok(if buf.len() >= 16 + len { Some(16 + len) } else { None });
    }
    let n = buf.len().min(6);
    if buf[..n] != b"PROXY "[..n] {
        return Err(ProxyProtoError::Missing);
    }
    match buf.windows(2).position(|w| w == b"\r\n") {
        Some(i) => Ok(Some(i + 2)),
        None if buf.len() >= V1_MAX => Err(ProxyProtoError::Malformed("v1 line too long")),
        None => Ok(None),
    }
}

/// Parses one complete header (as delimited by `header_len`).
pub fn parse(h: &[u8]) -> Result<ProxyHeader, ProxyProtoError> {
    if h.starts_with(&V2_SIG) {
        let ver_cmd = h[12];
        if ver_cmd >> 4 != 2 {
            return Err(ProxyProtoError::Malformed("version is not 2"));
        }
        let body = &h[16..];
        return match ver_cmd & 0x0f {
            0 => Ok(ProxyHeader::Local),
            1 => match h[13] {
                // TCP or UDP over IPv4
                0x11 | 0x12 if body.len() >= 12 => {
                    let ip = |o: usize| IpAddr::from([body[o], body[o + 1], body[o + 2], body[o + 3]]);
                    let port = |o: usize| u16::from_be_bytes([body[o], body[o + 1]]);
                    Ok(ProxyHeader::Proxied {
                        src: SocketAddr::new(ip(0), port(8)),
                        dst: SocketAddr::new(ip(4), port(10)),
                    })
                }
                0x21 | 0x22 if body.len() >= 36 => {
                    let ip = |o: usize| {
                        let mut a = [0u8; 16];
                        a.copy_from_slice(&body[o..o + 16]);
                        IpAddr::from(a)
                    };
                    let port = |o: usize| u16::from_be_bytes([body[o], body[o + 1]]);
                    Ok(ProxyHeader::Proxied {
                        src: SocketAddr::new(ip(0), port(32)),
                        dst: SocketAddr::new(ip(16), port(34)),
                    })
                }
                // AF_UNSPEC or unix sockets: no usable address, treat as LOCAL (the spec says
                // the receiver must then use the real connection's addresses).
                0x00 | 0x31 | 0x32 => Ok(ProxyHeader::Local),
                _ => Err(ProxyProtoError::Malformed("address block too short or unknown family")),
            },
            _ => Err(ProxyProtoError::Malformed("unknown command")),
        };
    }
    let line = std::str::from_utf8(h).map_err(|_| ProxyProtoError::Malformed("v1 line is not text"))?;
    let mut f = line.trim_end_matches("\r\n").split(' ');
    let _proxy = f.next();
    match f.next() {
        Some("UNKNOWN") => Ok(ProxyHeader::Local),
        Some("TCP4" | "TCP6") => {
            let mut next = || f.next().ok_or(ProxyProtoError::Malformed("v1 line has too few fields"));
            let (s, d, sp, dp) = (next()?, next()?, next()?, next()?);
            let ip = |s: &str| s.parse::<IpAddr>().map_err(|_| ProxyProtoError::Malformed("v1 bad address"));
            let port = |s: &str| s.parse::<u16>().map_err(|_| ProxyProtoError::Malformed("v1 bad port"));
            Ok(ProxyHeader::Proxied {
                src: SocketAddr::new(ip(s)?, port(sp)?),
                dst: SocketAddr::new(ip(d)?, port(dp)?),
            })
        }
        _ => Err(ProxyProtoError::Malformed("v1 protocol must be TCP4, TCP6 or UNKNOWN")),
    }
}

/// Reads a PROXY header (v2 or v1) from the start of `stream`, consuming exactly its bytes.
pub async fn read_header(stream: &mut TcpStream, timeout: Duration) -> Result<ProxyHeader, ProxyProtoError> {
    let work = async {
        let mut buf = vec![0u8; 16 + 65535];
        loop {
            let n = stream.peek(&mut buf).await?;
            if n == 0 {
                return Err(ProxyProtoError::Missing);
            }
            if let Some(len) = header_len(&buf[..n])? {
                let mut h = vec![0u8; len];
                stream.read_exact(&mut h).await?;
                return parse(&h);
            }
            // Part of the header is in: wait for more before peeking again.
            stream.readable().await?;
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    };
    tokio::time::timeout(timeout, work).await.map_err(|_| ProxyProtoError::Timeout(timeout))?
}

/// A v2 header announcing a relayed TCP connection from `src` to `dst`.
pub fn encode_v2(src: SocketAddr, dst: SocketAddr) -> Vec<u8> {
    let mut out = Vec::with_capacity(52);
    out.extend_from_slice(&V2_SIG);
    out.push(0x21);
    match (src.ip(), dst.ip()) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            out.push(0x11);
            out.extend_from_slice(&12u16.to_be_bytes());
            out.extend_from_slice(&s.octets());
            out.extend_from_slice(&d.octets());
        }
        (s, d) => {
            let v6 = |ip: IpAddr| -> Ipv6Addr {
                match ip {
                    IpAddr::V4(v4) => v4.to_ipv6_mapped(),
                    IpAddr::V6(v6) => v6,
                }
            };
            out.push(0x21);
            out.extend_from_slice(&36u16.to_be_bytes());
            out.extend_from_slice(&v6(s).octets());
            out.extend_from_slice(&v6(d).octets());
        }
    }
    out.extend_from_slice(&src.port().to_be_bytes());
    out.extend_from_slice(&dst.port().to_be_bytes());
    out
}

/// A v2 LOCAL header: the connection is our own (health checks).
pub fn encode_v2_local() -> Vec<u8> {
    let mut out = V2_SIG.to_vec();
    out.extend_from_slice(&[0x20, 0x00, 0x00, 0x00]);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn v2_round_trip() {
        let src: SocketAddr = "192.0.2.7:40000".parse().unwrap();
        let dst: SocketAddr = "198.51.100.1:443".parse().unwrap();
        let h = encode_v2(src, dst);
        assert_eq!(header_len(&h).unwrap(), Some(h.len()));
        assert_eq!(parse(&h).unwrap(), ProxyHeader::Proxied { src, dst });
        let src6: SocketAddr = "[2001:db8::1]:5000".parse().unwrap();
        let h6 = encode_v2(src6, dst);
        match parse(&h6).unwrap() {
            ProxyHeader::Proxied { src: s, dst: d } => {
                assert_eq!(s, src6);
                assert_eq!(d.port(), 443);
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(parse(&encode_v2_local()).unwrap(), ProxyHeader::Local);
    }

    #[test]
    fn partial_and_foreign_input() {
        let h = encode_v2("1.2.3.4:1".parse().unwrap(), "5.6.7.8:2".parse().unwrap());
        assert_eq!(header_len(&h[..10]).unwrap(), None);
        assert_eq!(header_len(&h[..20]).unwrap(), None);
        // A TLS ClientHello is not a PROXY header.
        assert!(matches!(header_len(&[0x16, 0x03, 0x01, 0x00]), Err(ProxyProtoError::Missing)));
        assert!(matches!(header_len(b"GET / HTTP/1.1\r\n"), Err(ProxyProtoError::Missing)));
    }

    #[test]
    fn v1_lines() {
        let l = b"PROXY TCP4 192.0.2.7 198.51.100.1 40000 443\r\nrest";
        let n = header_len(l).unwrap().unwrap();
        assert_eq!(&l[n..], b"rest");
        assert_eq!(
            parse(&l[..n]).unwrap(),
            ProxyHeader::Proxied { src: "192.0.2.7:40000".parse().unwrap(), dst: "198.51.100.1:443".parse().unwrap() }
        );
        assert_eq!(parse(b"PROXY UNKNOWN\r\n").unwrap(), ProxyHeader::Local);
        assert!(parse(b"PROXY TCP4 1.2.3.4\r\n").is_err());
        assert_eq!(header_len(b"PROXY TCP4 1.2").unwrap(), None);
    }
}
