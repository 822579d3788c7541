//! `__web`: the demo's web backends, run by xtask itself inside the server namespace
//! (`ip netns exec NS xtask __web …`), so the demo needs no nginx or python.
//!
//! A small HTTP/1.1 server (keep-alive, Content-Length and chunked request bodies) that answers
//! `/healthz` with 200 and every other request with a text page naming the backend and the
//! forwarding headers it received: what the demo shows of rampart's round-robin and
//! X-Forwarded-For.
use std::{
    io::{self, BufRead, BufReader, Read, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    thread,
    time::Duration,
};

use anyhow::{Context, Result};

/// Longest request line or header line accepted, and most header lines (431 beyond).
const MAX_LINE: u64 = 8 * 1024;
const MAX_HEADERS: usize = 100;
/// A keep-alive connection with no request for this long is closed.
const IDLE: Duration = Duration::from_secs(60);

/// The headers of the answer page, in this order (lower case, as HTTP/2 and hyper send them).
pub const SHOWN_HEADERS: [&str; 3] = ["x-forwarded-for", "x-forwarded-proto", "forwarded"];

/// Listens on `listen`, prints `ready` once bound, serves until killed or `max_seconds` pass.
pub fn serve(name: &str, listen: SocketAddr, max_seconds: u64) -> Result<()> {
    let listener = TcpListener::bind(listen).with_context(|| format!("{name}: binding {listen}"))?;
    let name = name.to_string();
    thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            let name = name.clone();
            thread::spawn(move || {
                // A client that misbehaves or goes away affects only its own connection.
                let _ = connection(stream, &name, listen);
            });
        }
    });
    println!("ready");
    io::stdout().flush().context("writing to stdout")?;
    thread::sleep(Duration::from_secs(max_seconds));
    Ok(())
}

/// Why a connection stops before its client closes it.
enum Stop {
    /// Answered with this status, then closed.
    Bad(u16, &'static str),
    Io(io::Error),
}

impl From<io::Error> for Stop {
    fn from(e: io::Error) -> Self {
        Stop::Io(e)
    }
}

/// One line (CRLF or LF ended) of at most [`MAX_LINE`] bytes; `None` at end of stream.
fn read_line(r: &mut BufReader<TcpStream>) -> Result<Option<String>, Stop> {
    let mut buf = Vec::new();
    let n = r.by_ref().take(MAX_LINE).read_until(b'\n', &mut buf)?;
    if n == 0 {
        return Ok(None);
    }
    if buf.last() != Some(&b'\n') {
        if n as u64 >= MAX_LINE {
            return Err(Stop::Bad(431, "line too long"));
        }
        return Ok(None); // closed in the middle of a line
    }
    let text = String::from_utf8(buf).map_err(|_| Stop::Bad(400, "not UTF-8"))?;
    Ok(Some(text.trim_end_matches(['\r', '\n']).to_string()))
}

fn discard(r: &mut BufReader<TcpStream>, n: u64) -> Result<(), Stop> {
    let copied = io::copy(&mut r.by_ref().take(n), &mut io::sink())?;
    if copied < n {
        return Err(Stop::Io(io::ErrorKind::UnexpectedEof.into()));
    }
    Ok(())
}

/// Reads and drops a chunked body (RFC 9112 §7.1), trailers included.
fn discard_chunked(r: &mut BufReader<TcpStream>) -> Result<(), Stop> {
    loop {
        let line = read_line(r)?.ok_or(Stop::Io(io::ErrorKind::UnexpectedEof.into()))?;
        let size = line.split(';').next().unwrap_or("").trim();
        let size = u64::from_str_radix(size, 16).map_err(|_| Stop::Bad(400, "bad chunk size"))?;
        if size == 0 {
            while !read_line(r)?.ok_or(Stop::Io(io::ErrorKind::UnexpectedEof.into()))?.is_empty() {}
            return Ok(());
        }
        discard(r, size + 2)?; // the chunk and its CRLF
    }
}

fn respond(
    w: &mut TcpStream,
    status: u16,
    reason: &str,
    name: &str,
    body: &str,
    head_only: bool,
    close: bool,
) -> io::Result<()> {
    let mut out = format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: {}\r\nX-Backend: {name}\r\n",
        body.len()
    );
    if close {
        out.push_str("Connection: close\r\n");
    }
    out.push_str("\r\n");
    if !head_only {
        out.push_str(body);
    }
    w.write_all(out.as_bytes())?;
    w.flush()
}

/// Serves requests on one connection until the client closes it or asks to.
fn connection(stream: TcpStream, name: &str, listen: SocketAddr) -> io::Result<()> {
    stream.set_read_timeout(Some(IDLE))?;
    let mut w = stream.try_clone()?;
    let mut r = BufReader::new(stream);
    match requests(&mut r, &mut w, name, listen) {
        Ok(()) => Ok(()),
        Err(Stop::Bad(status, why)) => {
            let reason = if status == 431 { "Request Header Fields Too Large" } else { "Bad Request" };
            respond(&mut w, status, reason, name, &format!("{why}\n"), false, true)
        }
        Err(Stop::Io(e)) => Err(e),
    }
}

fn requests(r: &mut BufReader<TcpStream>, w: &mut TcpStream, name: &str, listen: SocketAddr) -> Result<(), Stop> {
    loop {
        let Some(mut line) = read_line(r)? else { return Ok(()) };
        // RFC 9112 §2.2: empty lines before a request line are ignored.
        while line.is_empty() {
            let Some(next) = read_line(r)? else { return Ok(()) };
            line = next;
        }
        let mut parts = line.split(' ');
        let (Some(method), Some(target), Some(version), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(Stop::Bad(400, "bad request line"));
        };
        if !version.starts_with("HTTP/1.") {
            return Err(Stop::Bad(400, "not HTTP/1.x"));
        }
        let mut headers = Vec::new();
        loop {
            let h = read_line(r)?.ok_or(Stop::Io(io::ErrorKind::UnexpectedEof.into()))?;
            if h.is_empty() {
                break;
            }
            if headers.len() == MAX_HEADERS {
                return Err(Stop::Bad(431, "too many headers"));
            }
            let (k, v) = h.split_once(':').ok_or(Stop::Bad(400, "bad header line"))?;
            headers.push((k.trim().to_ascii_lowercase(), v.trim().to_string()));
        }
        let header = |n: &str| headers.iter().filter(|(k, _)| k == n).map(|(_, v)| v.as_str()).collect::<Vec<_>>();
        let chunked = header("transfer-encoding").iter().any(|v| v.to_ascii_lowercase().contains("chunked"));
        if chunked {
            discard_chunked(r)?;
        } else if let Some(len) = header("content-length").first() {
            discard(r, len.parse().map_err(|_| Stop::Bad(400, "bad Content-Length"))?)?;
        }
        let connection = header("connection").join(",").to_ascii_lowercase();
        let close =
            if version == "HTTP/1.0" { !connection.contains("keep-alive") } else { connection.contains("close") };

        let body = if target == "/healthz" {
            "ok\n".to_string()
        } else {
            let mut page = format!("hello from {name} ({listen})\nrequest: {method} {target} {version}\n");
            for h in SHOWN_HEADERS {
                page.push_str(&format!("{h}: {}\n", header(h).join(", ")));
            }
            page
        };
        respond(w, 200, "OK", name, &body, method == "HEAD", close)?;
        if close {
            return Ok(());
        }
    }
}
