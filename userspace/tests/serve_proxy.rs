//! `rampart serve` end to end: TLS termination with real clients (curl HTTP/1.1 and HTTP/2,
//! openssl s_client, h2load), forwarding headers, the redirect listener, the application
//! firewall, PROXY protocol v2 in and out, nginx as a backend, a client resetting its connection,
//! WebSockets between Python's `websockets` client and server.

mod serve_support;

use std::{net::SocketAddr, process::Command};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use serve_support::*;
use tokio::io::AsyncWriteExt;

fn openssl(addr: SocketAddr, args: &[&str]) -> (bool, String) {
    openssl_with_input(addr, args, "")
}

/// `openssl s_client`, writing `input` to it (then EOF).
fn openssl_with_input(addr: SocketAddr, args: &[&str], input: &str) -> (bool, String) {
    use std::io::Write;
    let mut child = Command::new("openssl")
        .args(["s_client", "-connect", &addr.to_string()])
        .args(args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(input.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    (out.status.success(), text)
}

#[test]
fn tls_proxy_http1_http2_headers_redirect_metrics() {
    isolated(|| async {
        let site = Site::new("basic");
        let b1 = TestBackend::start("b1", free_addr()).await;
        let (listen, admin, redirect) = (free_addr(), free_addr(), free_addr());
        let cfg = site.config(
            listen,
            admin,
            &format!("redirect_http = \"{redirect}\""),
            &format!(
                r#"[[route]]
host = "site.test"
pool = "web"

[[route]]
host = "api.test"
path = "/v1/"
pool = "web"

[[route]]
path = "/load"
pool = "web"

[[pool]]
name = "web"
backends = ["{}"]
"#,
                b1.addr
            ),
        );
        let d = Daemon::start(&cfg, &site.dir.path("daemon.log"));

        // HTTP/1.1: a forged X-Forwarded-For from an untrusted client is replaced.
        let r = curl_https(
            listen,
            "site.test",
            "/hello?x=1",
            &site.ca_file,
            &["--http1.1", "-H", "X-Forwarded-For: 6.6.6.6", "-H", "Forwarded: for=6.6.6.6"],
        );
        assert_eq!(r.status, 200, "{r:?}\n{}", d.log_text());
        assert_eq!(r.version, "1.1");
        assert_eq!(field(&r.body, "backend"), "b1");
        assert_eq!(field(&r.body, "path"), "/hello");
        assert_eq!(field(&r.body, "xff"), "127.0.0.1");
        assert_eq!(field(&r.body, "xfp"), "https");
        assert_eq!(field(&r.body, "forwarded"), "for=127.0.0.1;proto=https;host=site.test");
        assert_eq!(field(&r.body, "version"), "HTTP/1.1");
        assert_eq!(r.header("x-backend").as_deref(), Some("b1"));

        // HTTP/2 from the client, HTTP/1.1 to the backend, Host from :authority.
        let r = curl_https(listen, "site.test", "/h2", &site.ca_file, &["--http2"]);
        assert_eq!((r.status, r.version.as_str()), (200, "2"), "{r:?}");
        assert_eq!(field(&r.body, "version"), "HTTP/1.1");
        assert!(field(&r.body, "host").starts_with("site.test"), "{r:?}");

        // SNI picks the api certificate (curl verifies it against the name).
        let r = curl_https(listen, "api.test", "/v1/users", &site.ca_file, &["--http2"]);
        assert_eq!(r.status, 200, "{r:?}");
        // No route for this path on api.test.
        let r = curl_https(listen, "api.test", "/other", &site.ca_file, &[]);
        assert_eq!(r.status, 404, "{r:?}");
        assert!(r.body.contains("404 Not Found"));

        // The redirect listener.
        let r = curl(
            &format!("http://site.test:{}/a/b?c=d", redirect.port()),
            &["--resolve", &format!("site.test:{}:127.0.0.1", redirect.port())],
        );
        assert_eq!(r.status, 301, "{r:?}");
        assert_eq!(r.header("location").unwrap(), format!("https://site.test:{}/a/b?c=d", listen.port()));

        // h2load smoke runs, HTTP/2 and HTTP/1.1 (bounded by request count).
        for proto in [&[][..], &["--h1"][..]] {
            let out = Command::new("h2load")
                .args(["-n", "400", "-c", "4", "-m", "4"])
                .args(proto)
                .arg(format!("https://127.0.0.1:{}/load", listen.port()))
                .output()
                .unwrap();
            let text = String::from_utf8_lossy(&out.stdout);
            assert!(text.contains("400 succeeded, 0 failed, 0 errored"), "{text}");
        }

        let m = http_get(admin, "/metrics");
        assert_eq!(
            metric(&m, "rampart_http_requests_total", &["route=\"site.test/\"", "pool=\"web\"", "status=\"200\""]),
            2.0,
            "{m}"
        );
        assert_eq!(metric(&m, "rampart_http_requests_total", &["route=\"*/load\"", "status=\"200\""]), 800.0, "{m}");
        assert_eq!(metric(&m, "rampart_http_requests_total", &["status=\"404\""]), 1.0, "{m}");
        assert!(metric(&m, "rampart_tls_handshakes_total", &[]) >= 11.0, "{m}");
        let expiry = metric(&m, "rampart_tls_cert_expiry_seconds", &["site.pem"]);
        assert!(expiry > 86400.0, "{m}");
        assert_eq!(metric(&m, "rampart_backend_up", &["pool=\"web\""]), 1.0, "{m}");
        assert!(http_get(admin, "/").contains(&b1.addr.to_string()));
    })
}

#[test]
fn openssl_sni_alpn_and_protocol_versions() {
    isolated(|| async {
        let site = Site::new("openssl");
        let b1 = TestBackend::start("b1", free_addr()).await;
        let (listen, admin) = (free_addr(), free_addr());
        let cfg = site.config(listen, admin, "", &one_pool(b1.addr));
        let _d = Daemon::start(&cfg, &site.dir.path("daemon.log"));
        let ca = site.ca_file.to_str().unwrap();

        let (ok, out) = openssl(listen, &["-servername", "api.test", "-alpn", "h2,http/1.1", "-CAfile", ca]);
        assert!(ok, "{out}");
        assert!(out.contains("subject=CN = api.test"), "{out}");
        assert!(out.contains("ALPN protocol: h2"), "{out}");
        assert!(out.contains("Verify return code: 0 (ok)"), "{out}");

        let (ok, out) = openssl(listen, &["-servername", "site.test", "-alpn", "http/1.1", "-CAfile", ca]);
        assert!(ok, "{out}");
        assert!(out.contains("subject=CN = site.test"), "{out}");
        assert!(out.contains("ALPN protocol: http/1.1"), "{out}");
        // Session tickets: a second connection resumes the first one's session. In TLS 1.3 the
        // ticket comes after the handshake, so the first client makes a request and reads the answer.
        let request = "GET / HTTP/1.1\r\nHost: site.test\r\nConnection: close\r\n\r\n";
        for version in ["-tls1_3", "-tls1_2"] {
            let sess = site.dir.path(&format!("session{version}"));
            let sess_s = sess.to_str().unwrap();
            let args = ["-servername", "site.test", "-CAfile", ca, version, "-ign_eof"];
            let (ok, out) = openssl_with_input(listen, &[&args[..], &["-sess_out", sess_s]].concat(), request);
            assert!(ok && out.contains("New, TLSv1.") && out.contains("backend=b1"), "{out}");
            let (ok, out) = openssl_with_input(listen, &[&args[..], &["-sess_in", sess_s]].concat(), request);
            assert!(ok && out.contains("Reused, TLSv1."), "{version}: {out}");
        }
        // An unknown name gets the default certificate.
        let (_, out) = openssl(listen, &["-servername", "unknown.test", "-CAfile", ca]);
        assert!(out.contains("subject=CN = site.test"), "{out}");

        let (ok, out) = openssl(listen, &["-servername", "site.test", "-tls1_2", "-CAfile", ca]);
        assert!(ok && out.contains("New, TLSv1.2, Cipher is ECDHE-ECDSA"), "{out}");
        let (ok, out) = openssl(listen, &["-servername", "site.test", "-tls1_3", "-CAfile", ca]);
        assert!(ok && out.contains("New, TLSv1.3, Cipher is TLS_"), "{out}");
        // TLS 1.1 offered for real (SECLEVEL=0 lets OpenSSL 3 send it) and refused by the server.
        let (ok, out) = openssl(listen, &["-servername", "site.test", "-tls1_1", "-cipher", "DEFAULT@SECLEVEL=0"]);
        assert!(!ok, "{out}");
        assert!(out.contains("Cipher is (NONE)"), "{out}");
        assert!(out.contains("alert"), "{out}");
        let m = http_get(admin, "/metrics");
        assert!(metric(&m, "rampart_tls_handshake_failures_total", &[]) >= 1.0, "{m}");
    })
}

#[test]
fn application_firewall_limits_and_rate() {
    isolated(|| async {
        let site = Site::new("firewall");
        let b1 = TestBackend::start("b1", free_addr()).await;
        let (listen, admin) = (free_addr(), free_addr());
        let cfg = site.config(
            listen,
            admin,
            "",
            &format!(
                r#"[[route]]
host = "site.test"
pool = "web"
firewall = {{ methods = ["GET", "POST"], deny_paths = ["/admin"], max_header = "2KiB", max_body = "1KiB" }}

[[route]]
host = "api.test"
pool = "web"
firewall = {{ allow_paths = ["/v1/"], rate = "1/m", burst = 3 }}

[[pool]]
name = "web"
backends = ["{}"]
"#,
                b1.addr
            ),
        );
        let d = Daemon::start(&cfg, &site.dir.path("daemon.log"));
        let ca = &site.ca_file;

        let r = curl_https(listen, "site.test", "/", ca, &["-X", "DELETE"]);
        assert_eq!(r.status, 405, "{r:?}");
        assert_eq!(r.header("allow").as_deref(), Some("GET, POST"));
        let r = curl_https(listen, "site.test", "/admin/users", ca, &[]);
        assert_eq!(r.status, 403, "{r:?}");
        let r = curl_https(listen, "site.test", "/administrators-are-fine", ca, &[]);
        assert_eq!(r.status, 200, "{r:?}");
        let big = format!("X-Big: {}", "a".repeat(3000));
        let r = curl_https(listen, "site.test", "/", ca, &["-H", &big]);
        assert_eq!(r.status, 431, "{r:?}");
        let body = site.dir.write("body", &"b".repeat(2000));
        let at = format!("@{}", body.display());
        let r = curl_https(listen, "site.test", "/upload", ca, &["--data-binary", &at]);
        assert_eq!(r.status, 413, "{r:?}");
        // Without Content-Length the limit cuts the upload short.
        let r = curl_https(
            listen,
            "site.test",
            "/upload",
            ca,
            &["--data-binary", &at, "-H", "Transfer-Encoding: chunked", "--http1.1"],
        );
        assert_eq!(r.status, 413, "{r:?}\n{}", d.log_text());
        let small = site.dir.write("small", &"s".repeat(500));
        let r = curl_https(listen, "site.test", "/upload", ca, &["--data-binary", &format!("@{}", small.display())]);
        assert_eq!(r.status, 200, "{r:?}");
        assert_eq!(field(&r.body, "body_len"), "500");

        // allow_paths, then the rate: a burst of 3, then 429 with Retry-After.
        let r = curl_https(listen, "api.test", "/v2/x", ca, &[]);
        assert_eq!(r.status, 403, "{r:?}");
        for _ in 0..3 {
            assert_eq!(curl_https(listen, "api.test", "/v1/x", ca, &[]).status, 200);
        }
        let r = curl_https(listen, "api.test", "/v1/x", ca, &["--http2"]);
        assert_eq!(r.status, 429, "{r:?}");
        let retry: u64 = r.header("retry-after").unwrap().parse().unwrap();
        assert!((1..=60).contains(&retry), "{r:?}");

        let m = http_get(admin, "/metrics");
        for (reason, n) in [
            ("method", 1.0),
            ("deny_path", 1.0),
            ("max_header", 1.0),
            ("max_body", 2.0),
            ("allow_path", 1.0),
            ("rate", 1.0),
        ] {
            assert_eq!(
                metric(&m, "rampart_http_firewall_blocks_total", &[&format!("reason=\"{reason}\"")]),
                n,
                "{reason}\n{m}"
            );
        }
        assert_eq!(metric(&m, "rampart_http_requests_total", &["status=\"429\""]), 1.0, "{m}");
    })
}

/// A TLS client connection to `listen` for `host`, after a PROXY v2 header naming `src` if given.
async fn tls_connect(
    listen: SocketAddr,
    src: Option<SocketAddr>,
    host: &str,
    ca_pem: &str,
) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
    let mut tcp = tokio::net::TcpStream::connect(listen).await.unwrap();
    if let Some(src) = src {
        tcp.write_all(&rampart::serve::proxy_protocol::encode_v2(src, listen)).await.unwrap();
    }
    tls_client(tcp, host, ca_pem).await
}

/// Sends a PROXY v2 header, then TLS and one HTTP/1.1 request; returns the response body.
async fn get_through_proxy_v2(listen: SocketAddr, src: SocketAddr, host: &str, ca_pem: &str) -> (u16, String) {
    let tls = tls_connect(listen, Some(src), host, ca_pem).await;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls)).await.unwrap();
    tokio::spawn(conn);
    let req = http::Request::get("/pp")
        .header("host", host)
        .header("x-forwarded-for", "6.6.6.6")
        .body(Empty::<Bytes>::new())
        .unwrap();
    let resp = sender.send_request(req).await.unwrap();
    let status = resp.status().as_u16();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    (status, String::from_utf8_lossy(&body).to_string())
}

#[test]
fn proxy_protocol_v2_in_and_out_with_nginx() {
    isolated(|| async {
        let site = Site::new("pp");
        let pp_backend = TestBackend::start_with("pp1", free_addr(), None, true).await;
        let nginx_addr = free_addr();
        let Some(_nginx) = Nginx::start(nginx_addr, "nginx-pp", true) else {
            panic!("nginx is not installed (apt-get install nginx-light)");
        };
        let (listen, admin) = (free_addr(), free_addr());
        let cfg = site.config(
            listen,
            admin,
            "trusted_proxies = [\"127.0.0.1\"]\naccept_proxy_protocol = true",
            &format!(
                r#"[[route]]
host = "site.test"
pool = "pp"

[[route]]
host = "api.test"
pool = "ngx"

[[pool]]
name = "pp"
backends = ["{}"]
proxy_protocol = "v2"
health = {{ path = "/healthz", interval = "200ms", timeout = "1s" }}

[[pool]]
name = "ngx"
backends = ["{nginx_addr}"]
proxy_protocol = "v2"
"#,
                pp_backend.addr
            ),
        );
        let d = Daemon::start(&cfg, &site.dir.path("daemon.log"));

        // In: a v2 header from a trusted balancer names client 203.0.113.9, which is not trusted,
        // so its forged X-Forwarded-For is replaced. Out: the backend gets a v2 header with it.
        let client: SocketAddr = "203.0.113.9:5555".parse().unwrap();
        let (status, body) = get_through_proxy_v2(listen, client, "site.test", &site.ca.pem).await;
        assert_eq!(status, 200, "{body}\n{}", d.log_text());
        assert_eq!(field(&body, "xff"), "203.0.113.9");
        assert_eq!(field(&body, "pp_src"), "203.0.113.9:5555");
        assert!(pp_backend.state.proxy_sources.lock().unwrap().contains(&"203.0.113.9:5555".to_string()));
        // Health checks announce themselves with LOCAL headers.
        assert!(eventually(50, || pp_backend.state.local_headers.load(std::sync::atomic::Ordering::SeqCst) > 0).await);

        // nginx, listening with proxy_protocol, sees the client's address as well.
        let (status, body) =
            get_through_proxy_v2(listen, "198.51.100.20:6000".parse().unwrap(), "api.test", &site.ca.pem).await;
        assert_eq!(status, 200, "{body}");
        assert!(body.contains("nginx-pp"), "{body}");
        assert!(body.contains("pp=198.51.100.20"), "{body}");
        assert!(body.contains("xff=198.51.100.20"), "{body}");

        // A v1 header (curl --haproxy-protocol) from the trusted peer itself: the client is
        // 127.0.0.1, trusted, so X-Forwarded-For is appended to.
        let r = curl_https(
            listen,
            "site.test",
            "/v1",
            &site.ca_file,
            &["--haproxy-protocol", "-H", "X-Forwarded-For: 198.51.100.7"],
        );
        assert_eq!(r.status, 200, "{r:?}");
        assert_eq!(field(&r.body, "xff"), "198.51.100.7, 127.0.0.1");
        // A trusted peer that sends no PROXY header is refused.
        let r = curl_https(listen, "site.test", "/none", &site.ca_file, &[]);
        assert_eq!(r.status, 0, "{r:?}");
    })
}

#[test]
fn https_backend_verified_and_unverified() {
    isolated(|| async {
        let site = Site::new("reencrypt");
        // A backend whose certificate is for 127.0.0.1 from our CA, and one from another CA.
        let (cert, key) = site.ca.leaf("backend", &["127.0.0.1", "app.internal"]);
        let good = TestBackend::start_with("tls-good", free_addr(), Some((cert, key)), false).await;
        let other = Ca::new("other CA");
        let bad = TestBackend::start_with("tls-other", free_addr(), Some(other.leaf("x", &["127.0.0.1"])), false).await;
        let (listen, admin) = (free_addr(), free_addr());
        let cfg = site.config(
            listen,
            admin,
            "",
            &format!(
                r#"[[route]]
host = "site.test"
pool = "verified"

[[route]]
host = "site.test"
path = "/wrong-ca"
pool = "wrong"

[[route]]
host = "site.test"
path = "/noverify"
pool = "noverify"

[[pool]]
name = "verified"
backends = ["https://{good}"]
ca = "ca.pem"
sni = "app.internal"

[[pool]]
name = "wrong"
backends = ["https://{bad}"]
ca = "ca.pem"
retries = 0

[[pool]]
name = "noverify"
backends = ["https://{bad}"]
tls_verify = false
"#,
                good = good.addr,
                bad = bad.addr
            ),
        );
        let d = Daemon::start(&cfg, &site.dir.path("daemon.log"));
        assert!(d.log_text().contains("tls_verify = false"), "{}", d.log_text());

        let r = curl_https(listen, "site.test", "/ok", &site.ca_file, &[]);
        assert_eq!(r.status, 200, "{r:?}\n{}", d.log_text());
        assert_eq!(field(&r.body, "backend"), "tls-good");
        let r = curl_https(listen, "site.test", "/wrong-ca", &site.ca_file, &[]);
        assert_eq!(r.status, 502, "{r:?}");
        assert!(r.body.contains("502 Bad Gateway"));
        assert_eq!(bad.hits(), 0);
        let r = curl_https(listen, "site.test", "/noverify", &site.ca_file, &[]);
        assert_eq!(r.status, 200, "{r:?}");
        assert_eq!(field(&r.body, "backend"), "tls-other");
    })
}

#[test]
fn header_and_idle_timeouts_close_connections() {
    isolated(|| async {
        let site = Site::new("timeouts");
        let b1 = TestBackend::start("b1", free_addr()).await;
        let (listen, admin) = (free_addr(), free_addr());
        let cfg = site.config(
            listen,
            admin,
            "client_header_timeout = \"300ms\"\nidle_timeout = \"600ms\"",
            &one_pool(b1.addr),
        );
        let _d = Daemon::start(&cfg, &site.dir.path("daemon.log"));

        // No TLS handshake at all.
        let mut tcp = tokio::net::TcpStream::connect(listen).await.unwrap();
        assert!(read_to_close(&mut tcp).await.is_some(), "a silent client is disconnected");
        // Half a request head.
        let mut tls = tls_connect(listen, None, "site.test", &site.ca.pem).await;
        tls.write_all(b"GET / HTTP/1.1\r\nHost: site.test\r\n").await.unwrap();
        let got = read_to_close(&mut tls).await.expect("a slow request head is cut off");
        assert!(!got.contains("200 OK"), "{got}");
        // A keep-alive connection: one answer, then closed once idle.
        let mut tls = tls_connect(listen, None, "site.test", &site.ca.pem).await;
        tls.write_all(b"GET /one HTTP/1.1\r\nHost: site.test\r\n\r\n").await.unwrap();
        let got = read_to_close(&mut tls).await.expect("an idle keep-alive connection is closed");
        assert!(got.starts_with("HTTP/1.1 200 OK"), "{got}");
        // A request longer than idle_timeout is not idle: it completes.
        let r = curl_https(listen, "site.test", "/slow?ms=1200", &site.ca_file, &[]);
        assert_eq!(r.status, 200, "{r:?}");
        let m = http_get(admin, "/metrics");
        assert!(metric(&m, "rampart_tls_handshake_failures_total", &[]) >= 1.0, "{m}");
    })
}

/// The pid of the `rampart serve` process running `cfg` (its command line names the file).
fn daemon_pid(cfg: &std::path::Path) -> i32 {
    let want = cfg.as_os_str().as_encoded_bytes();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else { continue };
        let Ok(cmd) = std::fs::read(e.path().join("cmdline")) else { continue };
        let args: Vec<&[u8]> = cmd.split(|&b| b == 0).collect();
        if args.contains(&&b"serve"[..]) && args.contains(&want) {
            return pid;
        }
    }
    panic!("no `rampart serve` process for {}", cfg.display());
}

/// Every thread of `pid` is stopped (state T after SIGSTOP).
fn all_threads_stopped(pid: i32) -> bool {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else { return false };
    tasks.flatten().all(|t| {
        // The state letter follows the parenthesised command name.
        std::fs::read_to_string(t.path().join("stat"))
            .is_ok_and(|s| s.rsplit_once(") ").is_some_and(|(_, rest)| rest.starts_with(['T', 't'])))
    })
}

/// Resumes a process stopped with SIGSTOP, also when the test fails while it is stopped.
struct Resume(i32);

impl Drop for Resume {
    fn drop(&mut self) {
        // SAFETY: sends a signal to our own child process.
        unsafe { libc::kill(self.0, libc::SIGCONT) };
    }
}

/// A client that ends with close_notify, FIN and then a TCP reset (it closed with unread data,
/// as h2load's clients do) makes the daemon's own close_notify meet EPIPE. That ends this one
/// connection; it must not end the daemon (SIGPIPE at its default action killed it, resetting
/// every other client's connection).
#[test]
fn client_reset_does_not_kill_the_daemon() {
    isolated(|| async {
        use tokio::io::AsyncReadExt;
        let site = Site::new("reset");
        let b1 = TestBackend::start("b1", free_addr()).await;
        let (listen, admin) = (free_addr(), free_addr());
        let cfg = site.config(listen, admin, "", &one_pool(b1.addr));
        let d = Daemon::start(&cfg, &site.dir.path("daemon.log"));
        let pid = daemon_pid(&cfg);

        // One answer, so the daemon then waits on an idle keep-alive connection.
        let mut tls = tls_connect(listen, None, "site.test", &site.ca.pem).await;
        tls.write_all(b"GET /one HTTP/1.1\r\nHost: site.test\r\n\r\n").await.unwrap();
        let mut got = Vec::new();
        let mut buf = [0u8; 4096];
        let answered = tokio::time::timeout(std::time::Duration::from_secs(10), async {
            while !String::from_utf8_lossy(&got).contains("body_len=0\n") {
                match tls.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => got.extend_from_slice(&buf[..n]),
                }
            }
        })
        .await;
        let text = String::from_utf8_lossy(&got).to_string();
        assert!(answered.is_ok() && text.starts_with("HTTP/1.1 200 OK"), "{text}");

        // While the daemon is stopped, the close_notify, the FIN and the reset all arrive, so the
        // daemon's reply to the close_notify always finds the connection reset.
        d.signal(libc::SIGSTOP);
        let resume = Resume(pid);
        assert!(eventually(50, || all_threads_stopped(pid)).await, "the daemon did not stop");
        tls.shutdown().await.unwrap();
        tls.get_ref().0.set_zero_linger().unwrap();
        drop(tls);
        drop(resume);

        // The daemon closes that connection and goes on serving.
        let closed =
            |m: &str| m.contains("rampart_client_connections{") && metric(m, "rampart_client_connections", &[]) == 0.0;
        let state = || std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        assert!(
            eventually(50, || closed(&http_get(admin, "/metrics"))).await,
            "daemon gone? /proc/{pid}/stat (Z = exited; last field = wait status, 13 = SIGPIPE): {}\n{}",
            state(),
            d.log_text()
        );
        let r = curl_https(listen, "site.test", "/two", &site.ca_file, &[]);
        assert_eq!(r.status, 200, "{r:?}\n{}", d.log_text());
    })
}

/// A real WebSocket client and server (Python `websockets`, from Debian) talk through rampart:
/// wss:// from the client, ws:// to the backend, text and binary messages both ways (one
/// larger than a TLS record), pings, and the closing handshake, all within the client's own
/// time limits.
#[test]
fn websocket_between_real_client_and_server() {
    isolated(|| async {
        const SCRIPT: &str = r#"
import asyncio, ssl, sys, websockets
back, front, ca = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]

async def echo(ws):
    async for m in ws:
        await ws.send(m.upper() if isinstance(m, str) else m[::-1])

async def main():
    async with websockets.serve(echo, "127.0.0.1", back):
        tls = ssl.create_default_context(cafile=ca)
        # The URI names the site (Host, SNI); host= and port= say where to connect.
        async with websockets.connect("wss://site.test/chat", ssl=tls, host="127.0.0.1", port=front,
                                      open_timeout=10, close_timeout=10) as ws:
            await ws.send("hello")
            assert await ws.recv() == "HELLO"
            big = bytes(range(256)) * 400
            await ws.send(big)
            assert await ws.recv() == big[::-1]
            await asyncio.wait_for(await ws.ping(), 10)
        assert ws.close_code == 1000, ws.close_code
    print("websocket ok")

asyncio.run(asyncio.wait_for(main(), 30))
"#;
        let site = Site::new("websocket");
        let backend = free_addr();
        let (listen, admin) = (free_addr(), free_addr());
        let cfg = site.config(
            listen,
            admin,
            "",
            &format!(
                "[[route]]\npath = \"/chat\"\npool = \"ws\"\n\n[[pool]]\nname = \"ws\"\nbackends = [\"{backend}\"]\n"
            ),
        );
        let d = Daemon::start(&cfg, &site.dir.path("daemon.log"));
        let out = tokio::task::spawn_blocking({
            let ca = site.ca_file.clone();
            move || {
                // Debian's interpreter, which the package installs into (not a python3 earlier on PATH).
                Command::new("/usr/bin/python3")
                    .args(["-c", SCRIPT, &backend.port().to_string(), &listen.port().to_string()])
                    .arg(ca)
                    .output()
                    .expect("/usr/bin/python3 runs (Debian package python3-websockets; `cargo xtask setup`)")
            }
        })
        .await
        .unwrap();
        let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        assert!(out.status.success() && stdout.contains("websocket ok"), "{stdout}{stderr}\n{}", d.log_text());
        let m = http_get(admin, "/metrics");
        assert_eq!(metric(&m, "rampart_http_requests_total", &["status=\"101\""]), 1.0, "{m}");
    })
}
