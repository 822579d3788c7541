//! The application firewall of a route: methods, path prefixes, header and body size, and a
//! per-client-address request rate (token bucket).

use std::{
    collections::HashMap,
    hash::{BuildHasher, RandomState},
    net::IpAddr,
    sync::Mutex,
    time::{Duration, Instant},
};

use http::{HeaderMap, Method, StatusCode};

use crate::config::RouteFirewall;

/// Why a request was refused; also the `reason` label of `rampart_http_firewall_blocks_total`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Block {
    Method,
    DeniedPath,
    NotAllowedPath,
    HeaderTooLarge,
    BodyTooLarge,
    /// Rate exceeded; retry after this many seconds.
    Rate {
        retry_after: u64,
    },
}

impl Block {
    pub fn reason(&self) -> &'static str {
        match self {
            Block::Method => "method",
            Block::DeniedPath => "deny_path",
            Block::NotAllowedPath => "allow_path",
            Block::HeaderTooLarge => "max_header",
            Block::BodyTooLarge => "max_body",
            Block::Rate { .. } => "rate",
        }
    }

    pub fn status(&self) -> StatusCode {
        match self {
            Block::Method => StatusCode::METHOD_NOT_ALLOWED,
            Block::DeniedPath | Block::NotAllowedPath => StatusCode::FORBIDDEN,
            Block::HeaderTooLarge => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            Block::BodyTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            Block::Rate { .. } => StatusCode::TOO_MANY_REQUESTS,
        }
    }
}

pub struct Firewall {
    methods: Option<Vec<Method>>,
    deny_paths: Vec<String>,
    allow_paths: Option<Vec<String>>,
    max_header: Option<u64>,
    pub max_body: Option<u64>,
    limiter: Option<RateLimiter>,
}

impl Firewall {
    pub fn new(cfg: &RouteFirewall) -> Self {
        let burst = |per_sec: f64| cfg.burst.as_ref().map_or(per_sec.ceil().max(1.0), |b| f64::from(*b.get_ref()));
        Firewall {
            methods: cfg.methods.as_ref().map(|m| m.iter().map(|m| m.0.clone()).collect()),
            deny_paths: cfg.deny_paths.iter().map(|p| p.get_ref().clone()).collect(),
            allow_paths: cfg.allow_paths.as_ref().map(|v| v.iter().map(|p| p.get_ref().clone()).collect()),
            max_header: cfg.max_header.map(|b| b.0),
            max_body: cfg.max_body.map(|b| b.0),
            limiter: cfg.rate.map(|r| RateLimiter::new(r.per_second(), burst(r.per_second()))),
        }
    }

    /// The `Allow` header value for 405 answers.
    pub fn allowed_methods(&self) -> Option<String> {
        self.methods.as_ref().map(|m| m.iter().map(Method::as_str).collect::<Vec<_>>().join(", "))
    }

    /// Checks a request's head. The rate is checked last, so a request refused for another
    /// reason costs the client no token.
    pub fn check(
        &self,
        method: &Method,
        path: &str,
        head_size: u64,
        declared_body: Option<u64>,
        client: IpAddr,
    ) -> Result<(), Block> {
        if let Some(m) = &self.methods
            && !m.contains(method)
        {
            return Err(Block::Method);
        }
        if self.deny_paths.iter().any(|p| path_has_prefix(path, p)) {
            return Err(Block::DeniedPath);
        }
        if let Some(allow) = &self.allow_paths
            && !allow.iter().any(|p| path_has_prefix(path, p))
        {
            return Err(Block::NotAllowedPath);
        }
        if self.max_header.is_some_and(|max| head_size > max) {
            return Err(Block::HeaderTooLarge);
        }
        if let Some(max) = self.max_body
            && declared_body.is_some_and(|n| n > max)
        {
            return Err(Block::BodyTooLarge);
        }
        if let Some(l) = &self.limiter {
            l.take(client)?;
        }
        Ok(())
    }
}

/// Prefix match on whole path segments for prefixes ending without '/': `/admin` matches
/// `/admin` and `/admin/x` but not `/administrator`.
pub fn path_has_prefix(path: &str, prefix: &str) -> bool {
    match path.strip_prefix(prefix) {
        None => false,
        Some(rest) => prefix.ends_with('/') || rest.is_empty() || rest.starts_with('/') || rest.starts_with('?'),
    }
}

/// Size of a request head as it would be written in HTTP/1.1: request line and header lines.
pub fn head_size(method: &Method, uri: &http::Uri, headers: &HeaderMap) -> u64 {
    let line = method.as_str().len() + 1 + uri.path_and_query().map_or(1, |p| p.as_str().len()) + 11;
    let hdrs: usize = headers.iter().map(|(k, v)| k.as_str().len() + 2 + v.len() + 2).sum();
    (line + hdrs + 2) as u64
}

const SHARDS: usize = 16;
/// Above this many tracked addresses in a shard, full buckets are forgotten.
const SHARD_SOFT_MAX: usize = 4096;

struct Bucket {
    tokens: f64,
    at: Instant,
}

/// Token buckets per client address, sharded to keep lock contention low.
pub struct RateLimiter {
    per_sec: f64,
    burst: f64,
    hasher: RandomState,
    shards: Vec<Mutex<HashMap<IpAddr, Bucket>>>,
}

impl RateLimiter {
    pub fn new(per_sec: f64, burst: f64) -> Self {
        RateLimiter {
            per_sec,
            burst,
            hasher: RandomState::new(),
            shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
        }
    }

    pub fn take(&self, ip: IpAddr) -> Result<(), Block> {
        self.take_at(ip, Instant::now())
    }

    fn take_at(&self, ip: IpAddr, now: Instant) -> Result<(), Block> {
        let shard = (self.hasher.hash_one(ip) as usize) % SHARDS;
        let mut map = self.shards[shard].lock().unwrap_or_else(|p| p.into_inner());
        if map.len() >= SHARD_SOFT_MAX && !map.contains_key(&ip) {
            let (per_sec, burst) = (self.per_sec, self.burst);
            map.retain(|_, b| b.tokens + now.saturating_duration_since(b.at).as_secs_f64() * per_sec < burst);
        }
        let b = map.entry(ip).or_insert(Bucket { tokens: self.burst, at: now });
        let elapsed = now.saturating_duration_since(b.at).as_secs_f64();
        b.tokens = (b.tokens + elapsed * self.per_sec).min(self.burst);
        b.at = now;
        if b.tokens >= 1.0 {
            b.tokens -= 1.0;
            Ok(())
        } else {
            let wait = Duration::from_secs_f64((1.0 - b.tokens) / self.per_sec);
            Err(Block::Rate { retry_after: wait.as_secs() + u64::from(wait.subsec_nanos() > 0) })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefixes_match_whole_segments() {
        assert!(path_has_prefix("/admin", "/admin"));
        assert!(path_has_prefix("/admin/x", "/admin"));
        assert!(path_has_prefix("/admin?x=1", "/admin"));
        assert!(!path_has_prefix("/administrator", "/admin"));
        assert!(path_has_prefix("/api/v1", "/api/"));
        assert!(path_has_prefix("/anything", "/"));
    }

    #[test]
    fn bucket_allows_burst_then_refuses_then_refills() {
        let l = RateLimiter::new(2.0, 3.0);
        let ip: IpAddr = "192.0.2.1".parse().unwrap();
        let other: IpAddr = "192.0.2.2".parse().unwrap();
        let t0 = Instant::now();
        for _ in 0..3 {
            l.take_at(ip, t0).unwrap();
        }
        assert_eq!(l.take_at(ip, t0), Err(Block::Rate { retry_after: 1 }));
        l.take_at(other, t0).unwrap();
        l.take_at(ip, t0 + Duration::from_millis(500)).unwrap();
        assert!(l.take_at(ip, t0 + Duration::from_millis(500)).is_err());
    }

    #[test]
    fn firewall_checks_in_order() {
        let cfg: RouteFirewall = toml::from_str(
            r#"methods = ["GET"]
deny_paths = ["/private"]
max_body = "10B"
max_header = "200B"
rate = "1/h"
burst = 1"#,
        )
        .unwrap();
        let fw = Firewall::new(&cfg);
        let ip: IpAddr = "192.0.2.1".parse().unwrap();
        assert_eq!(fw.check(&Method::POST, "/", 10, None, ip), Err(Block::Method));
        assert_eq!(fw.check(&Method::GET, "/private/a", 10, None, ip), Err(Block::DeniedPath));
        assert_eq!(fw.check(&Method::GET, "/", 500, None, ip), Err(Block::HeaderTooLarge));
        assert_eq!(fw.check(&Method::GET, "/", 10, Some(11), ip), Err(Block::BodyTooLarge));
        assert_eq!(fw.check(&Method::GET, "/", 10, Some(10), ip), Ok(()));
        assert!(
            matches!(fw.check(&Method::GET, "/", 10, None, ip), Err(Block::Rate { retry_after }) if retry_after > 0)
        );
        assert_eq!(fw.allowed_methods().as_deref(), Some("GET"));
    }
}
