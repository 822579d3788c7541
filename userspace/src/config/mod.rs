//! rampart.toml: the one configuration file of a rampart node.
//!
//! Parsing is strict (`deny_unknown_fields` everywhere) and every error, syntactic or semantic,
//! is reported as `FILE:LINE:COL: what`. [`Config::parse`] checks the text alone; [`Config::load`]
//! also opens the files the config names (certificates, keys, CAs), which is what the daemon and
//! `rampart check-config` need.

mod values;

use std::{
    collections::{HashMap, HashSet},
    fmt,
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
    time::Duration,
};

use serde::{Deserialize, Deserializer, de};
use toml::Spanned;
pub use values::{BackendAddr, Balance, ByteSize, Cidr, Dur, Method, Rate, Scheme};

/// One problem in a config file, located.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Diagnostic {
    pub path: PathBuf,
    pub line: usize,
    pub col: usize,
    pub message: String,
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}:{}: {}", self.path.display(), self.line, self.col, self.message)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{}: cannot read: {source}", path.display())]
    Read { path: PathBuf, source: std::io::Error },
    #[error("{}", .0.iter().map(ToString::to_string).collect::<Vec<_>>().join("\n"))]
    Invalid(Vec<Diagnostic>),
}

impl ConfigError {
    pub fn diagnostics(&self) -> &[Diagnostic] {
        match self {
            ConfigError::Invalid(d) => d,
            ConfigError::Read { .. } => &[],
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The file's shape.

/// The whole rampart.toml.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub admin: Admin,
    /// Firewall zones (XDP), applied by `rampart attach`/`fw`, not by `serve`.
    #[serde(default, rename = "interface")]
    pub interfaces: Vec<Interface>,
    /// L4 services balanced in XDP, applied by `rampart attach --config`.
    #[serde(default, rename = "service")]
    pub services: Vec<Service>,
    #[serde(default)]
    pub https: Vec<Https>,
    #[serde(default, rename = "route")]
    pub routes: Vec<Route>,
    #[serde(default, rename = "pool")]
    pub pools: Vec<Pool>,
    /// MySQL routing: a read-write port to the primary, a read-only one to replicas.
    #[serde(default)]
    pub mysql: Vec<Mysql>,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Admin {
    /// `/metrics` and the status page. Absent: no admin listener.
    pub listen: Option<Spanned<SocketAddr>>,
    /// Unix socket for `rampart reload`, created mode 0600.
    #[serde(default = "default_control_socket")]
    pub control_socket: PathBuf,
    /// On SIGTERM/SIGINT, how long in-flight requests may take to finish.
    #[serde(default = "default_drain_timeout")]
    pub drain_timeout: Dur,
    /// Per-request latency histograms in `/metrics` (request, backend connect and first byte,
    /// TLS handshake). `false` leaves them out, with their clock reads: about 20 series per
    /// route, 40 per backend and 20 per listener fewer.
    #[serde(default = "default_true")]
    pub latency_histograms: bool,
}

impl Default for Admin {
    fn default() -> Self {
        Admin {
            listen: None,
            control_socket: default_control_socket(),
            drain_timeout: default_drain_timeout(),
            latency_histograms: true,
        }
    }
}

pub const DEFAULT_CONTROL_SOCKET: &str = "/run/rampart/control.sock";
fn default_control_socket() -> PathBuf {
    PathBuf::from(DEFAULT_CONTROL_SOCKET)
}
fn default_drain_timeout() -> Dur {
    Dur(Duration::from_secs(30))
}

#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum XdpMode {
    #[default]
    Auto,
    Native,
    Skb,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Interface {
    pub name: Spanned<String>,
    #[serde(default)]
    pub mode: XdpMode,
    /// The rule file (relative to this config file); absent: no rules, everything passes.
    pub rules: Option<Spanned<PathBuf>>,
    /// Entries of the L4 balancer's connection table on this interface (absent: 65,536).
    pub conntrack_entries: Option<Spanned<u32>>,
}

#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq, Hash)]
#[serde(rename_all = "lowercase")]
pub enum L4Proto {
    #[default]
    Tcp,
    Udp,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Service {
    pub vip: Spanned<SocketAddr>,
    /// The [[interface]] whose XDP program balances it; may be left out when the file has
    /// exactly one [[interface]].
    pub interface: Option<Spanned<String>>,
    #[serde(default)]
    pub proto: L4Proto,
    #[serde(default = "default_table_size")]
    pub table_size: Spanned<u32>,
    pub backends: Vec<ServiceBackend>,
    pub health: Option<ServiceHealth>,
}

fn default_table_size() -> Spanned<u32> {
    Spanned::new(0..0, 65537)
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceBackend {
    pub addr: IpAddr,
    #[serde(default = "default_weight")]
    pub weight: u32,
}

fn default_weight() -> u32 {
    100
}

#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum L4HealthKind {
    #[default]
    Tcp,
    Http,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceHealth {
    #[serde(default)]
    pub kind: L4HealthKind,
    pub port: Option<u16>,
    pub path: Option<String>,
    #[serde(default = "default_interval")]
    pub interval: Dur,
    #[serde(default = "default_check_timeout")]
    pub timeout: Dur,
    #[serde(default = "default_rise")]
    pub rise: u32,
    #[serde(default = "default_fall")]
    pub fall: u32,
}

/// One TLS-terminating listener.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Https {
    pub listen: Spanned<SocketAddr>,
    /// The first cert without `names` is the default; the others answer to their names (and
    /// to the DNS names in their own subjectAltName).
    pub certs: Spanned<Vec<CertEntry>>,
    /// Plain-HTTP listener answering 301 to the same host and path over HTTPS.
    pub redirect_http: Option<Spanned<SocketAddr>>,
    /// Peers whose X-Forwarded-For/Forwarded are kept (appended to), and who may send a PROXY
    /// protocol header when `accept_proxy_protocol` is on.
    #[serde(default)]
    pub trusted_proxies: Vec<Cidr>,
    /// Expect a PROXY protocol (v2 or v1) header from peers in `trusted_proxies`.
    #[serde(default = "default_false_spanned")]
    pub accept_proxy_protocol: Spanned<bool>,
    /// Bound on the TLS handshake and on reading one request's headers.
    #[serde(default = "default_client_header_timeout")]
    pub client_header_timeout: Dur,
    /// A client connection with no request in flight is closed after this long.
    #[serde(default = "default_idle_timeout")]
    pub idle_timeout: Dur,
    /// A connection switched to another protocol (WebSocket) is closed after this long with no
    /// byte either way.
    #[serde(default = "default_tunnel_timeout")]
    pub tunnel_timeout: Dur,
    /// How long one session-ticket key encrypts new tickets; tickets stay valid for twice that.
    #[serde(default = "default_ticket_rotation")]
    pub session_ticket_rotation: Spanned<Dur>,
}

fn default_false_spanned() -> Spanned<bool> {
    Spanned::new(0..0, false)
}
fn default_client_header_timeout() -> Dur {
    Dur(Duration::from_secs(10))
}
fn default_idle_timeout() -> Dur {
    Dur(Duration::from_secs(60))
}
fn default_tunnel_timeout() -> Dur {
    Dur(Duration::from_secs(3600))
}
fn default_ticket_rotation() -> Spanned<Dur> {
    Spanned::new(0..0, Dur(Duration::from_secs(6 * 3600)))
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CertEntry {
    pub cert: Spanned<PathBuf>,
    pub key: Spanned<PathBuf>,
    #[serde(default)]
    pub names: Vec<Spanned<String>>,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Route {
    /// Exact host (`example.com`) or one-label wildcard (`*.example.com`); absent: any host.
    pub host: Option<Spanned<String>>,
    /// Path prefix; the longest matching prefix wins.
    #[serde(default = "default_path")]
    pub path: Spanned<String>,
    pub pool: Spanned<String>,
    pub firewall: Option<RouteFirewall>,
}

fn default_path() -> Spanned<String> {
    Spanned::new(0..0, "/".to_string())
}

/// The application firewall of one route.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteFirewall {
    /// Allowed methods (405 otherwise); absent: all.
    pub methods: Option<Vec<Method>>,
    /// Path prefixes answered 403.
    #[serde(default)]
    pub deny_paths: Vec<Spanned<String>>,
    /// If present, only these path prefixes pass (403 otherwise).
    pub allow_paths: Option<Vec<Spanned<String>>>,
    /// Request line plus headers (431 beyond).
    pub max_header: Option<ByteSize>,
    /// Request body (413 beyond).
    pub max_body: Option<ByteSize>,
    /// Requests per client address (429 with Retry-After beyond).
    pub rate: Option<Rate>,
    /// Requests a client may make at once before `rate` applies; default: one second's worth.
    pub burst: Option<Spanned<u32>>,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Pool {
    pub name: Spanned<String>,
    pub backends: Spanned<Vec<BackendEntry>>,
    #[serde(default = "default_balance")]
    pub balance: Balance,
    pub health: Option<PoolHealth>,
    /// PEM bundle of CAs to verify https:// backends; absent: the system's roots.
    pub ca: Option<Spanned<PathBuf>>,
    /// Verify https:// backends' certificates (default true). Turning it off is logged loudly.
    #[serde(default = "default_true")]
    pub tls_verify: bool,
    /// Server name sent to https:// backends and checked against their certificate; absent: the
    /// backend's IP address.
    pub sni: Option<String>,
    /// Send a PROXY protocol header carrying the client's address: only `"v2"`.
    pub proxy_protocol: Option<Spanned<String>>,
    #[serde(default = "default_connect_timeout")]
    pub connect_timeout: Dur,
    /// From the request sent to the response headers received (504 beyond).
    #[serde(default = "default_response_timeout")]
    pub response_timeout: Dur,
    /// Idle keep-alive connections to backends are closed after this long.
    #[serde(default = "default_backend_idle")]
    pub idle_timeout: Dur,
    /// Idle keep-alive connections kept per backend.
    #[serde(default = "default_max_idle")]
    pub max_idle: usize,
    /// Other backends tried when connecting fails (requests never sent are safe to retry).
    #[serde(default = "default_retries")]
    pub retries: u32,
}

fn default_balance() -> Balance {
    Balance(loadbalancer::Algorithm::RoundRobin)
}
fn default_true() -> bool {
    true
}
fn default_connect_timeout() -> Dur {
    Dur(Duration::from_secs(3))
}
fn default_response_timeout() -> Dur {
    Dur(Duration::from_secs(60))
}
fn default_backend_idle() -> Dur {
    Dur(Duration::from_secs(30))
}
fn default_max_idle() -> usize {
    64
}
fn default_retries() -> u32 {
    2
}

/// Administrative state of a backend, set in the config (applied on reload).
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum AdminState {
    /// Takes traffic while healthy.
    #[default]
    Ready,
    /// Keeps what it has (hash affinity, in-flight requests), gets no new picks.
    Drain,
    /// Out of rotation, checks paused.
    Maint,
}

/// One backend of a pool: `"10.0.1.21:80"` or `{ addr = "10.0.1.21:80", weight = 2, state = "drain" }`.
#[derive(Clone, Debug)]
pub struct BackendEntry {
    pub addr: BackendAddr,
    pub weight: u32,
    pub state: AdminState,
}

impl<'de> Deserialize<'de> for BackendEntry {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct Table {
            addr: BackendAddr,
            #[serde(default = "one")]
            weight: u32,
            #[serde(default)]
            state: AdminState,
        }
        fn one() -> u32 {
            1
        }
        struct V;
        impl<'de> de::Visitor<'de> for V {
            type Value = BackendEntry;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("\"IP:PORT\" or { addr = \"IP:PORT\", weight = N, state = \"drain\" }")
            }
            fn visit_str<E: de::Error>(self, s: &str) -> Result<BackendEntry, E> {
                let addr = s.parse().map_err(E::custom)?;
                Ok(BackendEntry { addr, weight: 1, state: AdminState::Ready })
            }
            fn visit_map<A: de::MapAccess<'de>>(self, map: A) -> Result<BackendEntry, A::Error> {
                let t = Table::deserialize(de::value::MapAccessDeserializer::new(map))?;
                if t.weight == 0 {
                    return Err(de::Error::custom(
                        "weight must be at least 1 (use state = \"drain\" to stop new traffic)",
                    ));
                }
                Ok(BackendEntry { addr: t.addr, weight: t.weight, state: t.state })
            }
        }
        d.deserialize_any(V)
    }
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PoolHealth {
    #[serde(default = "default_health_path")]
    pub path: Spanned<String>,
    /// Host header of checks; absent: the pool's `sni`, else the backend's address.
    pub host: Option<String>,
    #[serde(default = "default_interval")]
    pub interval: Dur,
    #[serde(default = "default_check_timeout")]
    pub timeout: Dur,
    #[serde(default = "default_rise_spanned")]
    pub rise: Spanned<u32>,
    #[serde(default = "default_fall_spanned")]
    pub fall: Spanned<u32>,
    #[serde(default = "default_expect")]
    pub expect: Spanned<u16>,
}

fn default_health_path() -> Spanned<String> {
    Spanned::new(0..0, "/".to_string())
}
fn default_interval() -> Dur {
    Dur(Duration::from_secs(2))
}
fn default_check_timeout() -> Dur {
    Dur(Duration::from_secs(1))
}
fn default_rise() -> u32 {
    2
}
fn default_fall() -> u32 {
    3
}
fn default_rise_spanned() -> Spanned<u32> {
    Spanned::new(0..0, 2)
}
fn default_fall_spanned() -> Spanned<u32> {
    Spanned::new(0..0, 3)
}
fn default_expect() -> Spanned<u16> {
    Spanned::new(0..0, 200)
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Mysql {
    pub name: Spanned<String>,
    pub rw_listen: SocketAddr,
    pub ro_listen: Option<SocketAddr>,
    pub servers: Vec<SocketAddr>,
    pub monitor_user: String,
    pub monitor_password_file: Option<PathBuf>,
    #[serde(default = "default_mysql_interval")]
    pub check_interval: Dur,
    #[serde(default = "default_max_lag")]
    pub max_lag: Dur,
    #[serde(default = "default_demoted_grace")]
    pub demoted_grace: Dur,
}

fn default_mysql_interval() -> Dur {
    Dur(Duration::from_secs(1))
}
fn default_max_lag() -> Dur {
    Dur(Duration::from_secs(5))
}
fn default_demoted_grace() -> Dur {
    Dur(Duration::from_secs(2))
}

// ---------------------------------------------------------------------------------------------
// Loading and checking.

struct Checker<'a> {
    path: &'a Path,
    text: &'a str,
    out: Vec<Diagnostic>,
}

impl Checker<'_> {
    fn at(&mut self, span: std::ops::Range<usize>, message: impl Into<String>) {
        let (line, col) = line_col(self.text, span.start);
        self.out.push(Diagnostic { path: self.path.to_path_buf(), line, col, message: message.into() });
    }
}

/// 1-based line and column (in characters) of a byte offset.
fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let offset = offset.min(text.len());
    let before = &text[..offset];
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    (line, before[line_start..].chars().count() + 1)
}

impl Config {
    /// Reads and checks a config file, including the files it names.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text =
            std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.to_path_buf(), source })?;
        let cfg = Config::parse(&text, path)?;
        cfg.check_files(&text, path)?;
        Ok(cfg)
    }

    /// Parses and checks the text of a config file; `path` only names it in errors. Files the
    /// config names are not opened (see [`Config::load`]).
    pub fn parse(text: &str, path: &Path) -> Result<Config, ConfigError> {
        let cfg: Config = toml::from_str(text).map_err(|e| {
            let (line, col) = e.span().map_or((1, 1), |s| line_col(text, s.start));
            // toml's message may span several lines with a source excerpt; keep the first.
            let message = e.message().lines().next().unwrap_or("invalid config").to_string();
            ConfigError::Invalid(vec![Diagnostic { path: path.to_path_buf(), line, col, message }])
        })?;
        let mut c = Checker { path, text, out: Vec::new() };
        cfg.check(&mut c);
        if c.out.is_empty() { Ok(cfg) } else { Err(ConfigError::Invalid(c.out)) }
    }

    fn check(&self, c: &mut Checker<'_>) {
        // Listening addresses must not collide.
        let mut listens: HashMap<SocketAddr, &str> = HashMap::new();
        let mut listen = |c: &mut Checker<'_>, a: &Spanned<SocketAddr>, what: &'static str| {
            if let Some(prev) = listens.insert(*a.get_ref(), what) {
                c.at(a.span(), format!("{} is already used by {prev}", a.get_ref()));
            }
        };
        if let Some(a) = &self.admin.listen {
            listen(c, a, "[admin] listen");
        }
        for h in &self.https {
            listen(c, &h.listen, "an [[https]] listen");
            if let Some(r) = &h.redirect_http {
                listen(c, r, "an [[https]] redirect_http");
            }
            self.check_https(c, h);
        }
        for m in &self.mysql {
            // rw_listen and ro_listen carry no position of their own: errors point at the name.
            listen(c, &Spanned::new(m.name.span(), m.rw_listen), "a [[mysql]] rw_listen");
            if let Some(ro) = m.ro_listen {
                listen(c, &Spanned::new(m.name.span(), ro), "a [[mysql]] ro_listen");
            }
        }

        let mut pools = HashSet::new();
        for p in &self.pools {
            if p.name.get_ref().is_empty() {
                c.at(p.name.span(), "a pool needs a name");
            } else if !pools.insert(p.name.get_ref().as_str()) {
                c.at(p.name.span(), format!("pool {:?} is defined twice", p.name.get_ref()));
            }
            self.check_pool(c, p);
        }

        let mut seen_routes = HashSet::new();
        for r in &self.routes {
            if !pools.contains(r.pool.get_ref().as_str()) {
                c.at(r.pool.span(), format!("unknown pool {:?} (no [[pool]] has this name)", r.pool.get_ref()));
            }
            let path = r.path.get_ref();
            if !path.starts_with('/') {
                c.at(r.path.span(), format!("route path {path:?} must start with '/'"));
            }
            let host = r.host.as_ref().map(|h| h.get_ref().to_ascii_lowercase());
            if let Some(h) = &r.host
                && let Err(e) = check_host_pattern(h.get_ref())
            {
                c.at(h.span(), e);
            }
            if !seen_routes.insert((host.clone(), path.clone())) {
                let span = r.host.as_ref().map_or(r.path.span(), Spanned::span);
                c.at(
                    span,
                    format!("a route for host {:?} and path {path:?} already exists", host.unwrap_or("*".into())),
                );
            }
            if let Some(fw) = &r.firewall {
                for p in fw.deny_paths.iter().chain(fw.allow_paths.iter().flatten()) {
                    if !p.get_ref().starts_with('/') {
                        c.at(p.span(), format!("path prefix {:?} must start with '/'", p.get_ref()));
                    }
                }
                if let Some(b) = &fw.burst {
                    if fw.rate.is_none() {
                        c.at(b.span(), "burst needs a rate");
                    } else if *b.get_ref() == 0 {
                        c.at(b.span(), "burst must be at least 1");
                    }
                }
            }
        }
        if !self.https.is_empty() && self.routes.is_empty() {
            let span = self.https[0].listen.span();
            c.at(span, "an [[https]] listener needs at least one [[route]]");
        }

        let mut names = HashSet::new();
        for i in &self.interfaces {
            let n = i.name.get_ref();
            if n.is_empty() || n.len() > 15 || n.contains('/') || n.contains(char::is_whitespace) {
                c.at(i.name.span(), format!("invalid interface name {n:?}"));
            } else if !names.insert(n.clone()) {
                c.at(i.name.span(), format!("interface {n:?} is listed twice"));
            }
            if let Some(ct) = &i.conntrack_entries
                && let Err(e) = crate::lb::check_conntrack_entries(*ct.get_ref())
            {
                c.at(ct.span(), e);
            }
        }
        let mut services = HashSet::new();
        for s in &self.services {
            let t = *s.table_size.get_ref();
            if !is_prime(t) || t < 7 {
                c.at(s.table_size.span(), format!("table_size {t} must be a prime number (65537 is the usual)"));
            }
            let vip = *s.vip.get_ref();
            match (&s.interface, self.interfaces.len()) {
                (Some(i), _) if !names.contains(i.get_ref()) => {
                    c.at(i.span(), format!("no [[interface]] named {:?}", i.get_ref()));
                }
                (None, n) if n != 1 => c.at(
                    s.vip.span(),
                    format!(
                        "[[service]] {vip}: say which [[interface]] balances it (interface = \"…\"): the file has {n}"
                    ),
                ),
                _ => {}
            }
            if vip.port() == 0 || vip.ip().is_unspecified() || vip.ip().is_multicast() {
                c.at(s.vip.span(), format!("[[service]] {vip}: a VIP needs an address and a port"));
            }
            let iface = s.interface.as_ref().map(|i| i.get_ref().clone());
            if !services.insert((iface, vip, s.proto)) {
                c.at(s.vip.span(), format!("[[service]] {vip} ({:?}) is defined twice", s.proto));
            }
            let mut seen = HashSet::new();
            for b in &s.backends {
                if b.addr.is_ipv4() != vip.is_ipv4() {
                    c.at(
                        s.vip.span(),
                        format!(
                            "[[service]] {vip}: backend {} is not of the VIP's address family (IP-in-IP keeps it)",
                            b.addr
                        ),
                    );
                }
                if b.addr.is_unspecified() || b.addr.is_multicast() || b.addr.is_loopback() {
                    c.at(s.vip.span(), format!("[[service]] {vip}: backend {} cannot receive traffic", b.addr));
                }
                if !seen.insert(b.addr) {
                    c.at(s.vip.span(), format!("[[service]] {vip}: backend {} is listed twice", b.addr));
                }
            }
        }
        let mut mysql_names = HashSet::new();
        for m in &self.mysql {
            if !mysql_names.insert(m.name.get_ref().clone()) {
                c.at(m.name.span(), format!("[[mysql]] {:?} is defined twice", m.name.get_ref()));
            }
            // The fields after `name` carry no position of their own: errors point at the name.
            let at = m.name.span();
            let name = m.name.get_ref();
            if m.servers.is_empty() {
                c.at(at.clone(), format!("[[mysql]] {name:?}: no servers"));
            }
            let mut seen = HashSet::new();
            for s in &m.servers {
                if !seen.insert(s) {
                    c.at(at.clone(), format!("[[mysql]] {name:?}: server {s} is listed twice"));
                }
            }
            if m.check_interval.0 < Duration::from_millis(100) {
                c.at(at.clone(), format!("[[mysql]] {name:?}: check_interval must be at least 100ms"));
            }
            if m.monitor_user.is_empty() {
                c.at(at, format!("[[mysql]] {name:?}: monitor_user is empty"));
            }
        }
    }

    fn check_https(&self, c: &mut Checker<'_>, h: &Https) {
        let certs = h.certs.get_ref();
        if certs.is_empty() {
            c.at(h.certs.span(), "an [[https]] listener needs at least one certificate");
        }
        let defaults: Vec<_> = certs.iter().filter(|e| e.names.is_empty()).collect();
        if defaults.len() > 1 {
            c.at(defaults[1].cert.span(), "only one certificate may have no `names` (it is the default)");
        }
        let mut names = HashSet::new();
        for e in certs {
            for n in &e.names {
                if let Err(msg) = check_host_pattern(n.get_ref()) {
                    c.at(n.span(), msg);
                } else if !names.insert(n.get_ref().to_ascii_lowercase()) {
                    c.at(n.span(), format!("name {:?} is given to two certificates", n.get_ref()));
                }
            }
        }
        if *h.accept_proxy_protocol.get_ref() && h.trusted_proxies.is_empty() {
            c.at(
                h.accept_proxy_protocol.span(),
                "accept_proxy_protocol needs trusted_proxies (only trusted peers may send a PROXY header)",
            );
        }
        let r = h.session_ticket_rotation.get_ref().0;
        if r < Duration::from_secs(60) || r > Duration::from_secs(6 * 3600) {
            // rustls's ticket keys live at most 6 h; a longer period could not be honoured.
            c.at(h.session_ticket_rotation.span(), "session_ticket_rotation must be between 1m and 6h");
        }
    }

    fn check_pool(&self, c: &mut Checker<'_>, p: &Pool) {
        let backends = p.backends.get_ref();
        if backends.is_empty() {
            c.at(p.backends.span(), format!("pool {:?} has no backends", p.name.get_ref()));
        }
        let mut seen = HashSet::new();
        for b in backends {
            if !seen.insert(b.addr) {
                c.at(p.backends.span(), format!("backend {} is listed twice", b.addr));
            }
        }
        let any_https = backends.iter().any(|b| b.addr.scheme == Scheme::Https);
        if let Some(ca) = &p.ca
            && !any_https
        {
            c.at(ca.span(), "ca is set but no backend of this pool is https://");
        }
        if let Some(pp) = &p.proxy_protocol
            && pp.get_ref() != "v2"
        {
            c.at(pp.span(), format!("proxy_protocol {:?}: only \"v2\" is supported", pp.get_ref()));
        }
        if let Some(h) = &p.health {
            if !h.path.get_ref().starts_with('/') {
                c.at(h.path.span(), "health path must start with '/'");
            }
            for n in [&h.rise, &h.fall] {
                if *n.get_ref() == 0 {
                    c.at(n.span(), "rise and fall must be at least 1");
                }
            }
            if !(100..=599).contains(h.expect.get_ref()) {
                c.at(h.expect.span(), "expect must be an HTTP status (100-599)");
            }
        }
    }

    /// Checks that every file the config names can be read and holds what it should.
    fn check_files(&self, text: &str, path: &Path) -> Result<(), ConfigError> {
        let mut c = Checker { path, text, out: Vec::new() };
        let base = path.parent().unwrap_or(Path::new("."));
        for h in &self.https {
            for e in h.certs.get_ref() {
                let certs = self.resolve(base, e.cert.get_ref());
                let key = self.resolve(base, e.key.get_ref());
                if let Err(err) = crate::pki::load_certified_key(&certs, &key) {
                    let span = match &err {
                        crate::pki::PkiError::Key { .. } => e.key.span(),
                        crate::pki::PkiError::Read { path, .. } if *path == key => e.key.span(),
                        _ => e.cert.span(),
                    };
                    c.at(span, err.to_string());
                }
            }
        }
        for p in &self.pools {
            if let Some(ca) = &p.ca {
                let f = self.resolve(base, ca.get_ref());
                if let Err(e) = crate::pki::load_ca(&f) {
                    c.at(ca.span(), e.to_string());
                }
            }
        }
        for m in &self.mysql {
            if let Some(f) = &m.monitor_password_file
                && let Err(e) = std::fs::read(self.resolve(base, f))
            {
                // The error names the file, never what is in it.
                c.at(m.name.span(), format!("monitor_password_file {}: {e}", self.resolve(base, f).display()));
            }
        }
        for i in &self.interfaces {
            if let Some(rules) = &i.rules
                && let Err(e) = crate::fw::rules::parse_file(&self.resolve(base, rules.get_ref()))
            {
                // The rule file's own error names its file and line.
                c.at(rules.span(), e.to_string());
            }
        }
        if c.out.is_empty() { Ok(()) } else { Err(ConfigError::Invalid(c.out)) }
    }

    /// Relative paths in the config are relative to the config file's directory.
    pub fn resolve(&self, base: &Path, p: &Path) -> PathBuf {
        if p.is_absolute() { p.to_path_buf() } else { base.join(p) }
    }

    /// Sections this version of the daemon parses and checks but does not act on.
    pub fn not_applied_by_serve(&self) -> Vec<String> {
        let mut v = Vec::new();
        if !self.interfaces.is_empty() {
            v.push(format!(
                "{} [[interface]] section(s): the XDP firewall is applied by `rampart attach --config`, not by `serve`",
                self.interfaces.len()
            ));
        }
        if !self.services.is_empty() {
            v.push(format!(
                "{} [[service]] section(s): applied by `rampart attach --config`; `serve` runs only their health checks",
                self.services.len()
            ));
        }
        v
    }

    /// A short human summary for `check-config`.
    pub fn summary(&self) -> String {
        let backends: usize = self.pools.iter().map(|p| p.backends.get_ref().len()).sum();
        format!(
            "{} https listener(s), {} route(s), {} pool(s) with {} backend(s), {} mysql cluster(s), admin {}",
            self.https.len(),
            self.routes.len(),
            self.pools.len(),
            backends,
            self.mysql.len(),
            self.admin.listen.as_ref().map_or("off".to_string(), |a| a.get_ref().to_string()),
        )
    }
}

/// `example.com` or `*.example.com`: DNS labels only.
fn check_host_pattern(h: &str) -> Result<(), String> {
    let name = h.strip_prefix("*.").unwrap_or(h);
    let ok = !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
                && !l.starts_with('-')
                && !l.ends_with('-')
        });
    if ok { Ok(()) } else { Err(format!("invalid host name {h:?} (expected example.com or *.example.com)")) }
}

fn is_prime(n: u32) -> bool {
    if n < 2 {
        return false;
    }
    let mut i = 2u32;
    while u64::from(i) * u64::from(i) <= u64::from(n) {
        if n.is_multiple_of(i) {
            return false;
        }
        i += 1;
    }
    true
}

impl Pool {
    pub fn name(&self) -> &str {
        self.name.get_ref()
    }
    pub fn sends_proxy_protocol(&self) -> bool {
        self.proxy_protocol.as_ref().is_some_and(|p| p.get_ref() == "v2")
    }
}

impl Https {
    pub fn is_trusted(&self, ip: IpAddr) -> bool {
        self.trusted_proxies.iter().any(|c| c.contains(ip))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(text, Path::new("t.toml"))
    }

    fn err(text: &str) -> String {
        parse(text).unwrap_err().to_string()
    }

    const MIN: &str = r#"
[[https]]
listen = "127.0.0.1:8443"
certs = [{ cert = "a.pem", key = "a.key" }]

[[route]]
host = "example.com"
pool = "web"

[[pool]]
name = "web"
backends = ["127.0.0.1:8080", { addr = "https://127.0.0.2:8443", weight = 3, state = "drain" }]
balance = "hash(header:X-User)"
health = { path = "/healthz", interval = "500ms", expect = 204 }
"#;

    #[test]
    fn minimal_config_parses_with_defaults() {
        let c = parse(MIN).unwrap();
        let p = &c.pools[0];
        assert_eq!(p.backends.get_ref()[1].weight, 3);
        assert_eq!(p.backends.get_ref()[1].state, AdminState::Drain);
        assert_eq!(p.backends.get_ref()[1].addr.scheme, Scheme::Https);
        let h = p.health.as_ref().unwrap();
        assert_eq!(h.interval.0, Duration::from_millis(500));
        assert_eq!((*h.rise.get_ref(), *h.fall.get_ref(), *h.expect.get_ref()), (2, 3, 204));
        assert!(p.tls_verify);
        assert_eq!(c.https[0].session_ticket_rotation.get_ref().0, Duration::from_secs(6 * 3600));
        assert_eq!(c.admin.control_socket, PathBuf::from(DEFAULT_CONTROL_SOCKET));
        assert!(c.admin.latency_histograms);
    }

    #[test]
    fn latency_histograms_switch() {
        let c = parse(&format!("[admin]\nlatency_histograms = false\n{MIN}")).unwrap();
        assert!(!c.admin.latency_histograms);
        let e = err(&format!("[admin]\nlatency_histograms = \"no\"\n{MIN}"));
        assert!(e.starts_with("t.toml:2:22:") && e.contains("expected a boolean"), "{e}");
    }

    #[test]
    fn unknown_key_is_located() {
        let text = MIN.replace("balance =", "balanse =");
        let e = err(&text);
        assert!(e.starts_with("t.toml:13:1: unknown field `balanse`"), "{e}");
    }

    #[test]
    fn unknown_pool_is_located() {
        let text = MIN.replace("pool = \"web\"", "pool = \"webb\"");
        assert_eq!(err(&text), "t.toml:8:8: unknown pool \"webb\" (no [[pool]] has this name)");
    }

    #[test]
    fn bad_values_are_located() {
        let e = err(&MIN.replace("\"500ms\"", "\"5 parsecs\""));
        assert!(e.starts_with("t.toml:14:42:"), "{e}");
        assert!(e.contains("invalid duration \"5 parsecs\""), "{e}");
        let e = err(&MIN.replace("127.0.0.1:8443", "127.0.0.1"));
        assert!(e.starts_with("t.toml:3:10:"), "{e}");
        let e = err(&MIN.replace("127.0.0.1:8080", "localhost:8080"));
        assert!(e.contains("names are not resolved"), "{e}");
        let e = err(&MIN.replace("expect = 204", "expect = 99"));
        assert!(e.starts_with("t.toml:14:") && e.contains("expect must be"), "{e}");
    }

    #[test]
    fn semantic_errors_are_all_reported() {
        let text = format!(
            "{MIN}\n[[pool]]\nname = \"web\"\nbackends = []\nproxy_protocol = \"v1\"\n\n[[route]]\nhost = \"bad host\"\npath = \"x\"\npool = \"web\"\nfirewall = {{ burst = 3 }}\n"
        );
        let d = parse(&text).unwrap_err();
        let msgs: Vec<String> = d.diagnostics().iter().map(|d| d.message.clone()).collect();
        assert!(msgs.iter().any(|m| m.contains("defined twice")), "{msgs:?}");
        assert!(msgs.iter().any(|m| m.contains("has no backends")), "{msgs:?}");
        assert!(msgs.iter().any(|m| m.contains("only \"v2\"")), "{msgs:?}");
        assert!(msgs.iter().any(|m| m.contains("invalid host name")), "{msgs:?}");
        assert!(msgs.iter().any(|m| m.contains("must start with '/'")), "{msgs:?}");
        assert!(msgs.iter().any(|m| m.contains("burst needs a rate")), "{msgs:?}");
    }

    #[test]
    fn proxy_protocol_needs_trusted_peers() {
        let text = MIN.replace("certs =", "accept_proxy_protocol = true\ncerts =");
        assert!(err(&text).contains("accept_proxy_protocol needs trusted_proxies"));
        let text = MIN.replace("certs =", "accept_proxy_protocol = true\ntrusted_proxies = [\"10.0.0.0/8\"]\ncerts =");
        parse(&text).unwrap();
    }

    #[test]
    fn the_design_example_parses() {
        let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../rampart.example.toml")).unwrap();
        let c = parse(&text).unwrap();
        assert!(!c.https.is_empty() && !c.pools.is_empty() && !c.interfaces.is_empty());
        assert_eq!(c.not_applied_by_serve().len(), 2);
        assert_eq!(c.mysql.len(), 1);
    }

    #[test]
    fn mysql_sections_are_checked_and_errors_point_at_the_name() {
        let ok = "[[mysql]]\nname = \"main\"\nrw_listen = \"127.0.0.1:3306\"\nro_listen = \"127.0.0.1:3307\"\n\
                  servers = [\"10.0.3.41:3306\", \"10.0.3.42:3306\"]\nmonitor_user = \"rampart\"\n";
        let c = parse(ok).unwrap();
        assert_eq!(c.mysql[0].check_interval.0, Duration::from_secs(1));
        assert!(c.not_applied_by_serve().is_empty());
        let bad = "[[mysql]]\nname = \"main\"\nrw_listen = \"127.0.0.1:3306\"\nro_listen = \"127.0.0.1:3306\"\n\
                   servers = []\nmonitor_user = \"\"\ncheck_interval = \"10ms\"\n";
        let e = err(bad);
        for want in ["no servers", "check_interval must be at least", "monitor_user is empty"] {
            assert!(e.contains(&format!("t.toml:2:8: [[mysql]] \"main\": {want}")), "{want}: {e}");
        }
        assert!(e.contains("t.toml:2:8: 127.0.0.1:3306 is already used by a [[mysql]] rw_listen"), "{e}");
        // A cluster's port may not be another listener's either.
        let clash = format!("[admin]\nlisten = \"127.0.0.1:3307\"\n\n{ok}");
        assert!(err(&clash).contains("127.0.0.1:3307 is already used by [admin] listen"), "{}", err(&clash));
        let twice = ok.replace("\"10.0.3.42:3306\"", "\"10.0.3.41:3306\"");
        assert!(err(&twice).contains("server 10.0.3.41:3306 is listed twice"));
    }

    #[test]
    fn interface_rule_files_are_checked_on_load() {
        let dir = std::env::temp_dir().join(format!("rampart-cfg-rules-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("good.rules.toml"), "default = \"allow\"\n").unwrap();
        std::fs::write(dir.join("bad.rules.toml"), "default = \"allow\"\n\n[[rule]]\naction = \"maybe\"\n").unwrap();
        let cfg = dir.join("rampart.toml");
        let text = "[[interface]]\nname = \"eth0\"\nrules = \"good.rules.toml\"\n\n[[interface]]\nname = \"eth1\"\nrules = \"bad.rules.toml\"\n";
        std::fs::write(&cfg, text).unwrap();
        let loaded = Config::load(&cfg);
        std::fs::remove_dir_all(&dir).unwrap();
        let Err(ConfigError::Invalid(diags)) = loaded else { panic!("{loaded:?}") };
        // Located at the second `rules` key of the config, naming the rule file's own line.
        assert_eq!(diags.len(), 1, "{diags:?}");
        assert_eq!((diags[0].line, diags[0].col), (7, 9), "{diags:?}");
        assert!(diags[0].message.contains("bad.rules.toml:4"), "{diags:?}");
    }

    #[test]
    fn conntrack_entries_is_checked_where_it_is_written() {
        let ok = Config::parse("[[interface]]\nname = \"eth0\"\nconntrack_entries = 1048576\n", Path::new("r.toml"));
        let ok = ok.expect("a size in range is taken");
        assert_eq!(ok.interfaces[0].conntrack_entries.as_ref().map(|n| *n.get_ref()), Some(1 << 20));
        for (value, why) in [("0", "out of range"), ("100", "out of range"), ("1000000000", "out of range")] {
            let text = format!("[[interface]]\nname = \"eth0\"\nconntrack_entries = {value}\n");
            let Err(ConfigError::Invalid(diags)) = Config::parse(&text, Path::new("r.toml")) else {
                panic!("conntrack_entries = {value} was taken")
            };
            assert_eq!(diags.len(), 1, "{diags:?}");
            assert_eq!((diags[0].line, diags[0].col), (3, 21), "{diags:?}");
            assert!(diags[0].message.contains(why) && diags[0].message.contains("conntrack_entries"), "{diags:?}");
        }
    }

    #[test]
    fn line_and_column() {
        assert_eq!(line_col("ab\ncd", 0), (1, 1));
        assert_eq!(line_col("ab\ncd", 4), (2, 2));
    }
}
