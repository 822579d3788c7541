//! The demo's two ends of the traffic, run by xtask itself inside the namespaces
//! (`ip netns exec NS xtask __serve|__probe …`), so the demo needs no netcat or python.
use std::{
    io::{self, Read, Write},
    mem::size_of,
    net::{Ipv4Addr, TcpListener, TcpStream, UdpSocket},
    os::fd::{FromRawFd, OwnedFd},
    thread,
    time::Duration,
};

use anyhow::{Context, Result};

/// Exit status of `__probe`: the other end answered.
pub const ANSWERED: i32 = 0;
/// Exit status of `__probe`: nothing came back in time (what a dropped packet looks like).
pub const NO_ANSWER: i32 = 1;
/// Exit status of `__probe`: the server's kernel refused (so the packet did arrive).
pub const REFUSED: i32 = 3;

/// `__serve`: listens on the given TCP and UDP ports of every address, prints `ready` once all
/// are bound, then greets each TCP connection with one line and echoes each UDP datagram.
/// Exits by itself after `max_seconds`, in case nobody stops it.
pub fn serve(name: &str, tcp: &[u16], udp: &[u16], max_seconds: u64) -> Result<()> {
    let mut threads = Vec::new();
    for &port in tcp {
        let listener = TcpListener::bind((Ipv4Addr::UNSPECIFIED, port))
            .with_context(|| format!("{name}: binding TCP port {port}"))?;
        let greeting = format!("hello from {name}, TCP port {port}\n");
        threads.push(thread::spawn(move || {
            for mut stream in listener.incoming().flatten() {
                // A client that went away early changes nothing for the others.
                let _ = stream.write_all(greeting.as_bytes());
            }
        }));
    }
    for &port in udp {
        let socket = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, port))
            .with_context(|| format!("{name}: binding UDP port {port}"))?;
        threads.push(thread::spawn(move || {
            let mut buf = [0u8; 1500];
            while let Ok((n, peer)) = socket.recv_from(&mut buf) {
                let _ = socket.send_to(&buf[..n], peer);
            }
        }));
    }
    println!("ready");
    io::stdout().flush().context("writing to stdout")?;
    thread::sleep(Duration::from_secs(max_seconds));
    Ok(())
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Proto {
    Tcp,
    Udp,
}

enum Outcome {
    Answered(String),
    NoAnswer,
    Refused,
}

fn sockaddr(ip: Ipv4Addr, port: u16) -> libc::sockaddr_in {
    libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: port.to_be(),
        sin_addr: libc::in_addr { s_addr: u32::from(ip).to_be() },
        sin_zero: [0; 8],
    }
}

fn check(ret: libc::c_int, what: &str) -> Result<()> {
    if ret < 0 {
        return Err(io::Error::last_os_error()).context(what.to_string());
    }
    Ok(())
}

/// A TCP connection from `from` (std cannot bind before connecting), bounded by `timeout`.
fn tcp(from: Ipv4Addr, to: Ipv4Addr, port: u16, timeout: Duration) -> Result<Outcome> {
    let len = size_of::<libc::sockaddr_in>() as libc::socklen_t;
    // SAFETY: plain socket syscalls on a descriptor we own; the sockaddr pointers are to locals
    // of the stated length.
    let sock = unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC, 0);
        check(fd, "socket")?;
        let sock = OwnedFd::from_raw_fd(fd);
        let local = sockaddr(from, 0);
        check(libc::bind(fd, (&raw const local).cast(), len), &format!("binding to {from}"))?;
        let remote = sockaddr(to, port);
        if libc::connect(fd, (&raw const remote).cast(), len) < 0 {
            let err = io::Error::last_os_error();
            if err.raw_os_error() != Some(libc::EINPROGRESS) {
                return Err(err).context(format!("connecting to {to}:{port}"));
            }
        }
        let mut pfd = libc::pollfd { fd, events: libc::POLLOUT, revents: 0 };
        let ms = timeout.as_millis().min(i32::MAX as u128) as libc::c_int;
        let n = libc::poll(&mut pfd, 1, ms);
        check(n, "poll")?;
        if n == 0 {
            return Ok(Outcome::NoAnswer);
        }
        let mut err: libc::c_int = 0;
        let mut err_len = size_of::<libc::c_int>() as libc::socklen_t;
        check(
            libc::getsockopt(fd, libc::SOL_SOCKET, libc::SO_ERROR, (&raw mut err).cast(), &mut err_len),
            "getsockopt(SO_ERROR)",
        )?;
        match err {
            0 => sock,
            libc::ECONNREFUSED => return Ok(Outcome::Refused),
            libc::ETIMEDOUT | libc::EHOSTUNREACH | libc::ENETUNREACH => return Ok(Outcome::NoAnswer),
            e => return Err(io::Error::from_raw_os_error(e)).context(format!("connecting to {to}:{port}")),
        }
    };
    let mut stream = TcpStream::from(sock);
    stream.set_nonblocking(false).context("set_nonblocking")?;
    stream.set_read_timeout(Some(timeout)).context("set_read_timeout")?;
    let mut buf = [0u8; 256];
    // Connected is answered enough; the greeting only shows who answered.
    let n = stream.read(&mut buf).unwrap_or(0);
    Ok(Outcome::Answered(String::from_utf8_lossy(&buf[..n]).trim().to_string()))
}

/// One UDP datagram from `from`, waiting `timeout` for the echo.
fn udp(from: Ipv4Addr, to: Ipv4Addr, port: u16, timeout: Duration) -> Result<Outcome> {
    let socket = UdpSocket::bind((from, 0)).with_context(|| format!("binding to {from}"))?;
    // Connected, so an ICMP port unreachable comes back as ECONNREFUSED.
    socket.connect((to, port)).with_context(|| format!("connecting to {to}:{port}"))?;
    socket.set_read_timeout(Some(timeout)).context("set_read_timeout")?;
    socket.send(b"hello over UDP").with_context(|| format!("sending to {to}:{port}"))?;
    let mut buf = [0u8; 1500];
    match socket.recv(&mut buf) {
        Ok(n) => Ok(Outcome::Answered(format!("echo: {}", String::from_utf8_lossy(&buf[..n])))),
        Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => Ok(Outcome::NoAnswer),
        Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => Ok(Outcome::Refused),
        Err(e) => Err(e).with_context(|| format!("receiving from {to}:{port}")),
    }
}

/// `__probe`: prints what happened and returns the exit status ([`ANSWERED`], [`NO_ANSWER`],
/// [`REFUSED`]).
pub fn probe(proto: Proto, from: Ipv4Addr, to: Ipv4Addr, port: u16, timeout_ms: u64) -> Result<i32> {
    let timeout = Duration::from_millis(timeout_ms);
    let outcome = match proto {
        Proto::Tcp => tcp(from, to, port, timeout)?,
        Proto::Udp => udp(from, to, port, timeout)?,
    };
    Ok(match outcome {
        Outcome::Answered(reply) => {
            println!("{reply}");
            ANSWERED
        }
        Outcome::NoAnswer => {
            println!("no answer within {timeout_ms} ms");
            NO_ANSWER
        }
        Outcome::Refused => {
            println!("refused");
            REFUSED
        }
    })
}
