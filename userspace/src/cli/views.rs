//! `rampart stats` and `rampart top`: the figures of one [`Snapshot`], taken here from the pinned
//! maps (no daemon needed) with the running daemon's part added through its control socket.
use std::{
    io::{IsTerminal as _, Write as _},
    path::Path,
    process::ExitCode,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use rampart::{paths::Scope, snapshot::Snapshot, top};

/// The daemon's snapshot, if one answers on `control_socket` within 2 s. A daemon that answers
/// something unreadable is reported and treated as absent.
pub fn daemon_snapshot(rt: &tokio::runtime::Runtime, control_socket: &Path) -> Option<Snapshot> {
    let text = rt.block_on(async {
        let ask = rampart::serve::admin::send_command(control_socket, "snapshot");
        tokio::time::timeout(Duration::from_secs(2), ask).await.ok()?.ok()
    })?;
    match serde_json::from_str(&text) {
        Ok(s) => Some(s),
        Err(e) => {
            log::warn!("{}: the daemon's snapshot is not readable: {e}", control_socket.display());
            None
        }
    }
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread().enable_all().build().context("tokio runtime")
}

/// The kernel's figures (every scope, or `scope` alone) plus the daemon's part when it answers.
pub fn take(rt: &tokio::runtime::Runtime, scope: Option<&Scope>, control_socket: &Path) -> Snapshot {
    let mut s = Snapshot::kernel(scope);
    if let Some(d) = daemon_snapshot(rt, control_socket) {
        s.daemon = d.daemon;
        if s.l4.is_none() {
            s.l4 = d.l4;
        }
    }
    s
}

pub fn stats(scope: Option<&Scope>, json: bool, control_socket: &Path) -> Result<ExitCode> {
    let rt = runtime()?;
    let s = take(&rt, scope, control_socket);
    if json {
        println!("{}", serde_json::to_string_pretty(&s)?);
    } else {
        print!("{}", text(&s, control_socket));
    }
    Ok(ExitCode::SUCCESS)
}

/// `rampart stats` as text: every counter of the snapshot, cumulative.
fn text(s: &Snapshot, control_socket: &Path) -> String {
    let mut o = String::new();
    let mut line = |l: String| {
        o.push_str(&l);
        o.push('\n');
    };
    line(format!("rampart {} at {} UTC", s.version, top::utc(s.taken_unix)));
    if s.firewall.is_empty() {
        line("firewall: nothing attached".to_string());
    }
    for f in &s.firewall {
        line(format!("firewall {}: {} rules", f.label(), f.rules.len()));
        line(format!("  {:>5}  {:>4}  {:<6}  {:>12}  {:>14}  COMMENT", "RULE", "POS", "ACTION", "PACKETS", "BYTES"));
        for r in &f.rules {
            line(format!(
                "  {:>5}  {:>4}  {:<6}  {:>12}  {:>14}  {}",
                r.id,
                r.position,
                r.action.as_str(),
                r.packets,
                r.bytes,
                r.comment.as_deref().unwrap_or("")
            ));
        }
        for c in &f.counters {
            line(format!("  {:<20} {:>12} packets {:>14} bytes", c.name, c.packets, c.bytes));
        }
    }
    match &s.l4 {
        None => line("l4: no balancer figures".to_string()),
        Some(l4) => {
            for sv in &l4.services {
                line(format!(
                    "l4 service {}: {} packets, {} bytes, {} new flows",
                    sv.name, sv.packets, sv.bytes, sv.new_flows
                ));
                for b in &sv.backends {
                    line(format!(
                        "  {:<28} {:>12} packets {:>14} bytes {:>10} new flows",
                        b.addr, b.packets, b.bytes, b.new_flows
                    ));
                }
            }
        }
    }
    let Some(d) = &s.daemon else {
        line(format!("daemon: no answer on {}", control_socket.display()));
        return o;
    };
    line(format!(
        "daemon {}, started {}",
        d.version,
        d.started_unix.map_or("at an unknown time".to_string(), |t| format!("{} UTC", top::utc(t)))
    ));
    for p in &d.pools {
        line(format!("  pool {} ({})", p.name, p.balance));
        for b in &p.backends {
            let by: Vec<String> = b.requests.iter().map(|(k, v)| format!("{k} {v}")).collect();
            line(format!(
                "    {:<28} {:<6} in flight {}  {}  connect errors {}",
                b.addr,
                b.state,
                b.in_flight,
                by.join(" "),
                b.connect_errors
            ));
        }
    }
    for r in &d.routes {
        let by: Vec<String> = r.requests.iter().map(|(k, v)| format!("{k} {v}")).collect();
        line(format!(
            "  route {} -> {}: {}",
            r.route,
            r.pool,
            if by.is_empty() { "no requests".into() } else { by.join(", ") }
        ));
    }
    for l in &d.listeners {
        for c in &l.certificates {
            let days = (c.not_after_unix as f64 - s.taken_unix) / 86_400.0;
            line(format!(
                "  listener {}: {} ({}) expires {} UTC (in {days:.1} days)",
                l.name,
                c.file,
                c.subject,
                top::utc(c.not_after_unix as f64)
            ));
        }
    }
    for c in &d.mysql {
        line(format!(
            "  mysql {} (rw {}, ro {}): primary {}; {}",
            c.name,
            c.rw_listen,
            c.ro_listen.as_deref().unwrap_or("-"),
            c.primary,
            c.last_primary_change.as_ref().map_or("no change of primary seen".to_string(), |ch| format!(
                "last change of primary {} UTC to {}",
                top::utc(ch.unix as f64),
                ch.to.as_deref().unwrap_or("none")
            ))
        ));
        for v in &c.servers {
            line(format!(
                "    {:<22} {:<11} {:<4} lag {:<5} connections {}",
                v.addr,
                v.role,
                v.health,
                v.lag_seconds.map_or("-".to_string(), |l| format!("{l}s")),
                v.connections
            ));
        }
    }
    o
}

/// Puts the terminal in raw mode (no echo, keys one by one) until dropped.
struct RawMode {
    saved: libc::termios,
}

impl RawMode {
    fn enter() -> Result<Self> {
        // SAFETY: tcgetattr/tcsetattr on fd 0 with a valid termios.
        unsafe {
            let mut t: libc::termios = std::mem::zeroed();
            if libc::tcgetattr(0, &mut t) != 0 {
                bail!("tcgetattr: {}", std::io::Error::last_os_error());
            }
            let saved = t;
            libc::cfmakeraw(&mut t);
            // Keep output post-processing: lines end in \n as everywhere else.
            t.c_oflag |= libc::OPOST;
            if libc::tcsetattr(0, libc::TCSANOW, &t) != 0 {
                bail!("tcsetattr: {}", std::io::Error::last_os_error());
            }
            Ok(RawMode { saved })
        }
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        // SAFETY: restores what tcgetattr read.
        unsafe { libc::tcsetattr(0, libc::TCSANOW, &self.saved) };
    }
}

/// The terminal's size (columns, rows), or 80×24 when it has none.
fn term_size() -> (usize, usize) {
    // SAFETY: TIOCGWINSZ fills a winsize.
    unsafe {
        let mut ws: libc::winsize = std::mem::zeroed();
        if libc::ioctl(1, libc::TIOCGWINSZ, &mut ws) == 0 && ws.ws_col > 0 {
            return (usize::from(ws.ws_col), usize::from(ws.ws_row.max(1)));
        }
    }
    (80, 24)
}

/// Waits up to `d` for a key on stdin; true if it was `q` (or Ctrl-C / Ctrl-D, which raw mode
/// delivers as bytes).
fn quit_key_within(d: Duration) -> bool {
    let deadline = Instant::now() + d;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return false;
        }
        let mut pfd = libc::pollfd { fd: 0, events: libc::POLLIN, revents: 0 };
        // SAFETY: one valid pollfd.
        let n = unsafe { libc::poll(&mut pfd, 1, left.as_millis().min(i32::MAX as u128) as i32) };
        if n <= 0 {
            continue;
        }
        let mut b = [0u8; 16];
        // SAFETY: reading into a local buffer.
        let got = unsafe { libc::read(0, b.as_mut_ptr().cast(), b.len()) };
        if got <= 0 {
            // stdin closed: nothing will ever press q; keep refreshing until the deadline.
            std::thread::sleep(left);
            return false;
        }
        if b[..got as usize].iter().any(|&c| matches!(c, b'q' | b'Q' | 3 | 4)) {
            return true;
        }
    }
}

/// `rampart top`: one screen a second until `q`; with `iterations`, that many screens printed
/// one after another (no terminal control), then exit.
pub fn top(
    scope: Option<&Scope>,
    control_socket: &Path,
    interval: Duration,
    iterations: Option<u32>,
) -> Result<ExitCode> {
    let rt = runtime()?;
    let mut prev: Option<Snapshot> = None;
    if let Some(n) = iterations {
        let mut out = std::io::stdout().lock();
        for i in 0..n {
            if i > 0 {
                std::thread::sleep(interval);
            }
            let cur = take(&rt, scope, control_socket);
            let (cols, _) = term_size();
            writeln!(out, "{}", top::render(prev.as_ref(), &cur, cols))?;
            out.flush()?;
            prev = Some(cur);
        }
        return Ok(ExitCode::SUCCESS);
    }
    if !std::io::stdin().is_terminal() || !std::io::stdout().is_terminal() {
        bail!("rampart top needs a terminal; use --iterations N to print N screens without one");
    }
    let _raw = RawMode::enter()?;
    let mut out = std::io::stdout().lock();
    // The alternate screen, as top(1) does: the shell's screen comes back on exit.
    write!(out, "\x1b[?1049h\x1b[?25l")?;
    let result = (|| -> Result<()> {
        loop {
            let cur = take(&rt, scope, control_socket);
            let (cols, rows) = term_size();
            let text = top::render(prev.as_ref(), &cur, cols);
            let mut screen = String::from("\x1b[H\x1b[2J");
            for l in text.lines().take(rows.saturating_sub(1)) {
                screen.push_str(l);
                screen.push('\n');
            }
            screen.push_str("q quits");
            write!(out, "{screen}")?;
            out.flush()?;
            prev = Some(cur);
            if quit_key_within(interval) {
                return Ok(());
            }
        }
    })();
    write!(out, "\x1b[?25h\x1b[?1049l")?;
    out.flush()?;
    result.map(|()| ExitCode::SUCCESS)
}
