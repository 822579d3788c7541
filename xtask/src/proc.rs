//! Running child processes: shown the way a user would type them, bounded in time, and stopped
//! when the user presses Ctrl-C (so that the caller's guards still clean up).
use std::{
    io::Read,
    process::{Child, Command, ExitStatus, Stdio},
    sync::atomic::{AtomicBool, Ordering},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
    // The stack's own waits give up too (it only stores to an atomic as well).
    rampart_stack::interrupt();
}

/// From now on SIGINT and SIGTERM set a flag instead of killing xtask, so that `Drop` guards run.
/// On Ctrl-C the children in the terminal's process group get the signal themselves; the waits
/// below notice the flag and stop the rest.
pub fn catch_interrupts() {
    let handler = on_signal as extern "C" fn(libc::c_int) as libc::sighandler_t;
    // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
    unsafe {
        libc::signal(libc::SIGINT, handler);
        libc::signal(libc::SIGTERM, handler);
    }
}

pub fn interrupted() -> bool {
    INTERRUPTED.load(Ordering::SeqCst)
}

/// Fails once the user has asked to stop.
pub fn check_interrupt() -> Result<()> {
    if interrupted() {
        bail!("interrupted");
    }
    Ok(())
}

pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// `cmd` as a shell line (environment not shown).
pub fn show(cmd: &Command) -> String {
    let mut parts = vec![cmd.get_program().to_string_lossy().into_owned()];
    parts.extend(cmd.get_args().map(|a| a.to_string_lossy().into_owned()));
    parts
        .iter()
        .map(|p| {
            if !p.is_empty() && p.chars().all(|c| c.is_ascii_alphanumeric() || "-_./=:+@,%".contains(c)) {
                p.clone()
            } else {
                format!("'{}'", p.replace('\'', r"'\''"))
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// Runs `cmd` with the terminal as its stdio; fails unless it exits with status 0.
pub fn run(cmd: &mut Command) -> Result<()> {
    let status = cmd.status().with_context(|| format!("cannot start `{}`", show(cmd)))?;
    if !status.success() {
        bail!("`{}` failed ({status})", show(cmd));
    }
    Ok(())
}

/// What a finished command printed.
pub struct Out {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

impl Out {
    pub fn success(&self) -> bool {
        self.status.success()
    }
    /// stdout then stderr, trimmed.
    pub fn text(&self) -> String {
        let mut s = self.stdout.trim_end().to_string();
        let err = self.stderr.trim_end();
        if !err.is_empty() {
            if !s.is_empty() {
                s.push('\n');
            }
            s.push_str(err);
        }
        s
    }
}

fn reader<R: Read + Send + 'static>(pipe: Option<R>) -> thread::JoinHandle<String> {
    thread::spawn(move || {
        let mut buf = Vec::new();
        if let Some(mut p) = pipe {
            // A read error only truncates what we show; the exit status still decides.
            let _ = p.read_to_end(&mut buf);
        }
        String::from_utf8_lossy(&buf).into_owned()
    })
}

/// Waits for `child` until it exits, `limit` passes or the user interrupts; kills it in the
/// other cases.
fn wait_bounded(child: &mut Child, what: &str, limit: Duration) -> Result<ExitStatus> {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(status) = child.try_wait().with_context(|| format!("waiting for `{what}`"))? {
            return Ok(status);
        }
        let stop = interrupted();
        if stop || Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            if stop {
                bail!("interrupted while running `{what}`");
            }
            bail!("`{what}` did not finish within {} s; stopped it", limit.as_secs());
        }
        thread::sleep(Duration::from_millis(20));
    }
}

/// Runs `cmd` with its output captured, for at most `limit`; stops it if the user interrupts.
/// Any exit status is returned.
pub fn capture(cmd: &mut Command, limit: Duration) -> Result<Out> {
    let what = show(cmd);
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("cannot start `{what}`"))?;
    let out = reader(child.stdout.take());
    let err = reader(child.stderr.take());
    let status = wait_bounded(&mut child, &what, limit)?;
    let stdout = out.join().unwrap_or_default();
    let stderr = err.join().unwrap_or_default();
    Ok(Out { status, stdout, stderr })
}

/// [`capture`], failing unless the command exits with status 0.
pub fn capture_ok(cmd: &mut Command, limit: Duration) -> Result<Out> {
    let out = capture(cmd, limit)?;
    if !out.success() {
        bail!("`{}` failed ({}):\n{}", show(cmd), out.status, out.text());
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use std::process::Command;

    use super::show;

    #[test]
    fn shows_commands_as_a_shell_would_read_them() {
        let mut cmd = Command::new("ip");
        cmd.args(["-n", "ns-1", "addr", "add", "192.0.2.1/24", "", "it's"]);
        assert_eq!(show(&cmd), r"ip -n ns-1 addr add 192.0.2.1/24 '' 'it'\''s'");
    }
}
