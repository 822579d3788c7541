//! The [admin] listener (`/metrics`, `/healthz`, the status page at `/` with its assets and
//! `/api/snapshot`, the text status at `/status.txt`) and the control socket that `rampart
//! reload`, `status`, `stats` and `top` talk to.

use std::{convert::Infallible, os::unix::fs::PermissionsExt, path::Path, sync::Arc, time::Duration};

use http::{HeaderValue, Request, Response, StatusCode, header};
use hyper::{body::Incoming, service::service_fn};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::{
    io::{AsyncBufReadExt, AsyncWriteExt, BufReader},
    net::{TcpListener, UnixListener, UnixStream},
};
use tokio_util::sync::CancellationToken;

use super::{Shared, exposition, proxy};

pub async fn run_admin(shared: Arc<Shared>, listener: TcpListener, stop: CancellationToken) {
    loop {
        let (tcp, _) = tokio::select! {
            _ = stop.cancelled() => return,
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    log::error!("admin listener: accept: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let shared = shared.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req: Request<Incoming>| {
                let shared = shared.clone();
                async move { Ok::<_, Infallible>(admin_response(shared, &req).await) }
            });
            let mut b = hyper::server::conn::http1::Builder::new();
            b.timer(TokioTimer::new()).header_read_timeout(Duration::from_secs(10));
            let _ = b.serve_connection(TokioIo::new(tcp), svc).await;
        });
    }
}

/// The status page and its script, built into the binary: the page makes no request but to
/// the admin address it came from.
const PAGE_HTML: &str = include_str!("admin/status.html");
const PAGE_JS: &str = include_str!("admin/status.js");

async fn admin_response<B>(shared: Arc<Shared>, req: &Request<B>) -> Response<proxy::RespBody> {
    // At debug: every path asked for (the status page test checks what a browser fetched).
    log::debug!("admin: {} {}", req.method(), req.uri().path());
    let (ctype, body) = match req.uri().path() {
        "/metrics" => {
            let format = exposition::negotiate(req.headers().get(header::ACCEPT).map(HeaderValue::as_bytes));
            // A scrape reads the firewall's maps (system calls): off the async workers.
            let shared = shared.clone();
            match tokio::task::spawn_blocking(move || shared.metrics.encode(format)).await {
                Ok(body) => (format.content_type(), body),
                Err(_) => return proxy::error_page(StatusCode::INTERNAL_SERVER_ERROR, "The scrape failed."),
            }
        }
        "/healthz" => ("text/plain; charset=utf-8", "ok\n".to_string()),
        // The page for browsers (they ask for text/html); the text status for curl and scripts,
        // as before the page existed.
        "/" if wants_html(req) => ("text/html; charset=utf-8", PAGE_HTML.to_string()),
        "/" => ("text/plain; charset=utf-8", shared.current().status()),
        "/status.js" => ("text/javascript; charset=utf-8", PAGE_JS.to_string()),
        "/status.txt" => ("text/plain; charset=utf-8", shared.current().status()),
        "/api/snapshot" => {
            let shared = shared.clone();
            match tokio::task::spawn_blocking(move || serde_json::to_string(&shared.snapshot())).await {
                Ok(Ok(body)) => ("application/json", body),
                _ => return proxy::error_page(StatusCode::INTERNAL_SERVER_ERROR, "The snapshot failed."),
            }
        }
        _ => return proxy::error_page(StatusCode::NOT_FOUND, "Try /, /metrics, /api/snapshot or /status.txt."),
    };
    let mut r = Response::new(proxy::full(body));
    r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static(ctype));
    r
}

fn wants_html<B>(req: &Request<B>) -> bool {
    req.headers().get(header::ACCEPT).and_then(|v| v.to_str().ok()).is_some_and(|a| a.contains("text/html"))
}

/// Binds the control socket, readable and writable by its owner only.
pub fn bind_control(path: &Path) -> std::io::Result<UnixListener> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    // A socket file left by a daemon that died; a live daemon would still answer on it.
    if path.exists() {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::AddrInUse,
                format!("{} is in use by a running daemon", path.display()),
            ));
        }
        std::fs::remove_file(path)?;
    }
    // Created with a umask that leaves no group/other bits, then set explicitly.
    let old = unsafe { libc::umask(0o177) };
    let l = UnixListener::bind(path);
    unsafe { libc::umask(old) };
    let l = l?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(l)
}

/// Serves control commands, one line each: `reload`, `status`, `snapshot` (the JSON of a
/// [`crate::snapshot::Snapshot`]), `backend POOL BACKEND STATE`; answers `ok ...` or `error ...`.
pub async fn run_control(shared: Arc<Shared>, listener: UnixListener, stop: CancellationToken) {
    loop {
        let (stream, _) = tokio::select! {
            _ = stop.cancelled() => return,
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    log::error!("control socket: accept: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let shared = shared.clone();
        tokio::spawn(async move {
            let (r, mut w) = stream.into_split();
            let mut line = String::new();
            let mut r = BufReader::new(r);
            if tokio::time::timeout(Duration::from_secs(10), r.read_line(&mut line)).await.is_err() {
                return;
            }
            let answer = match line.trim() {
                "reload" => match shared.reload().await {
                    Ok(msg) => format!("ok {msg}\n"),
                    Err(e) => format!("error {}\n", e.replace('\n', "\n  ")),
                },
                "status" => format!("ok\n{}", shared.current().status()),
                "snapshot" => {
                    let sh = shared.clone();
                    match tokio::task::spawn_blocking(move || serde_json::to_string(&sh.snapshot())).await {
                        Ok(Ok(json)) => format!("ok\n{json}\n"),
                        _ => "error the snapshot failed\n".to_string(),
                    }
                }
                cmd if cmd.starts_with("backend ") => {
                    let args: Vec<&str> = cmd.split_whitespace().skip(1).collect();
                    let r = match args[..] {
                        [pool, backend, state] => {
                            shared.current().set_backend_state(pool, backend, state, &shared.metrics)
                        }
                        _ => Err("usage: backend POOL BACKEND ready|drain|maint".to_string()),
                    };
                    match r {
                        Ok(msg) => {
                            log::warn!("control socket: {msg}");
                            format!("ok {msg}\n")
                        }
                        Err(e) => format!("error {e}\n"),
                    }
                }
                other => format!("error unknown command {other:?} (expected reload, status, snapshot or backend)\n"),
            };
            let _ = w.write_all(answer.as_bytes()).await;
            let _ = w.shutdown().await;
        });
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("cannot reach the daemon at {path}")]
    Connect { path: String, source: std::io::Error },
    #[error("control socket {path}")]
    Io { path: String, source: std::io::Error },
    #[error("{0}")]
    Refused(String),
}

/// Sends one command to a running daemon and returns its answer (without the `ok` word).
pub async fn send_command(path: &Path, command: &str) -> Result<String, ControlError> {
    let p = path.display().to_string();
    let mut s = UnixStream::connect(path).await.map_err(|source| ControlError::Connect { path: p.clone(), source })?;
    let io = |source| ControlError::Io { path: p.clone(), source };
    s.write_all(format!("{command}\n").as_bytes()).await.map_err(io)?;
    let mut answer = String::new();
    tokio::io::AsyncReadExt::read_to_string(&mut s, &mut answer)
        .await
        .map_err(|source| ControlError::Io { path: p.clone(), source })?;
    match answer.strip_prefix("ok") {
        Some(rest) => Ok(rest.trim().to_string()),
        None => Err(ControlError::Refused(answer.strip_prefix("error ").unwrap_or(&answer).trim_end().to_string())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The page loads nothing from elsewhere: no absolute URL, no protocol-relative one, and the
    /// only paths it names are the admin listener's own.
    #[test]
    fn status_page_names_no_other_origin() {
        for (name, text) in [("status.html", PAGE_HTML), ("status.js", PAGE_JS)] {
            for bad in ["http:", "https:", "//", "ws:", "wss:", "@import", "url("] {
                let hits: Vec<&str> =
                    text.lines().filter(|l| l.contains(bad) && !l.trim_start().starts_with("//")).collect();
                assert!(hits.is_empty(), "{name} contains {bad:?}: {hits:?}");
            }
        }
        assert!(PAGE_HTML.contains("<script src=\"/status.js\"></script>"));
        assert!(PAGE_JS.contains("fetch(\"/api/snapshot\""));
        assert_eq!(PAGE_JS.matches("fetch(").count(), 1, "the script fetches /api/snapshot only");
    }
}
