//! Value types of rampart.toml that are written as strings: durations, sizes, rates, addresses,
//! balancing algorithms. Each parses on its own, so toml reports a bad one at its own span.

use std::{
    fmt,
    net::{IpAddr, SocketAddr},
    str::FromStr,
    time::Duration,
};

use serde::{Deserialize, Deserializer, de};

/// Implements `Deserialize` through `FromStr`, so the error message is ours and the span is
/// the value's.
macro_rules! deserialize_from_str {
    ($ty:ty, $expecting:literal) => {
        impl<'de> Deserialize<'de> for $ty {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                struct V;
                impl de::Visitor<'_> for V {
                    type Value = $ty;
                    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                        f.write_str($expecting)
                    }
                    fn visit_str<E: de::Error>(self, s: &str) -> Result<$ty, E> {
                        s.parse().map_err(E::custom)
                    }
                }
                d.deserialize_str(V)
            }
        }
    };
}

/// A duration written as `"500ms"`, `"2s"`, `"1.5s"`, `"5m"`, `"6h"` or `"1d"`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Dur(pub Duration);

impl FromStr for Dur {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let bad =
            || format!("invalid duration {s:?}: expected a number and a unit ms, s, m, h or d (\"2s\", \"500ms\")");
        let t = s.trim();
        let split = t.find(|c: char| !(c.is_ascii_digit() || c == '.')).ok_or_else(bad)?;
        let (num, unit) = t.split_at(split);
        let n: f64 = num.parse().map_err(|_| bad())?;
        let secs = match unit.trim() {
            "ms" => n / 1000.0,
            "s" => n,
            "m" | "min" => n * 60.0,
            "h" => n * 3600.0,
            "d" => n * 86400.0,
            _ => return Err(bad()),
        };
        if !secs.is_finite() || secs > 1e9 {
            return Err(bad());
        }
        Ok(Dur(Duration::from_secs_f64(secs)))
    }
}
deserialize_from_str!(Dur, "a duration such as \"2s\" or \"500ms\"");

impl fmt::Display for Dur {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ms = self.0.as_millis();
        if ms.is_multiple_of(1000) { write!(f, "{}s", ms / 1000) } else { write!(f, "{ms}ms") }
    }
}

/// A size in bytes: an integer, or `"512B"`, `"64KiB"`, `"1MiB"`, `"1GiB"`, `"10kB"`, `"1MB"`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct ByteSize(pub u64);

impl FromStr for ByteSize {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let bad =
            || format!("invalid size {s:?}: expected bytes with a unit B, KiB, MiB, GiB, kB, MB or GB (\"1MiB\")");
        let t = s.trim();
        let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
        let (num, unit) = t.split_at(split);
        let n: u64 = num.parse().map_err(|_| bad())?;
        let mult: u64 = match unit.trim() {
            "" | "B" => 1,
            "KiB" => 1 << 10,
            "MiB" => 1 << 20,
            "GiB" => 1 << 30,
            "kB" | "KB" => 1_000,
            "MB" => 1_000_000,
            "GB" => 1_000_000_000,
            _ => return Err(bad()),
        };
        n.checked_mul(mult).map(ByteSize).ok_or_else(bad)
    }
}

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl de::Visitor<'_> for V {
            type Value = ByteSize;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a size such as \"1MiB\" or a number of bytes")
            }
            fn visit_str<E: de::Error>(self, s: &str) -> Result<ByteSize, E> {
                s.parse().map_err(E::custom)
            }
            fn visit_i64<E: de::Error>(self, n: i64) -> Result<ByteSize, E> {
                u64::try_from(n).map(ByteSize).map_err(|_| E::custom("a size cannot be negative"))
            }
        }
        d.deserialize_any(V)
    }
}

/// A request rate: `"100/s"`, `"600/m"`, `"1000/h"`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Rate {
    pub count: u32,
    pub per: Duration,
}

impl Rate {
    pub fn per_second(&self) -> f64 {
        f64::from(self.count) / self.per.as_secs_f64()
    }
}

impl FromStr for Rate {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || format!("invalid rate {s:?}: expected COUNT/UNIT with UNIT s, m or h (\"100/s\")");
        let (n, unit) = s.trim().split_once('/').ok_or_else(bad)?;
        let count: u32 = n.trim().parse().map_err(|_| bad())?;
        let per = match unit.trim() {
            "s" => Duration::from_secs(1),
            "m" | "min" => Duration::from_secs(60),
            "h" => Duration::from_secs(3600),
            _ => return Err(bad()),
        };
        if count == 0 {
            return Err(format!("invalid rate {s:?}: the count must be at least 1"));
        }
        Ok(Rate { count, per })
    }
}
deserialize_from_str!(Rate, "a rate such as \"100/s\"");

/// A network in CIDR notation, or a single address (`"10.0.0.0/8"`, `"127.0.0.1"`, `"::1"`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cidr(pub ipnet::IpNet);

impl Cidr {
    pub fn contains(&self, ip: IpAddr) -> bool {
        // An IPv4 peer may show up as an IPv4-mapped IPv6 address on a dual-stack socket.
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
            v4 => v4,
        };
        self.0.contains(&ip)
    }
}

impl FromStr for Cidr {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if let Ok(net) = s.parse::<ipnet::IpNet>() {
            return Ok(Cidr(net.trunc()));
        }
        s.parse::<IpAddr>()
            .map(|ip| Cidr(ipnet::IpNet::from(ip)))
            .map_err(|_| format!("invalid network {s:?}: expected an address or CIDR (\"10.0.0.0/8\")"))
    }
}
deserialize_from_str!(Cidr, "an address or a network in CIDR notation");

/// How a pool talks to one backend.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Scheme {
    Http,
    Https,
}

/// A backend address: `"10.0.1.21:80"`, `"http://10.0.1.21:80"` or `"https://10.0.2.31:8443"`.
/// Names are not resolved: the daemon must not depend on DNS to route.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct BackendAddr {
    pub scheme: Scheme,
    pub addr: SocketAddr,
}

impl fmt::Display for BackendAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.scheme {
            Scheme::Http => write!(f, "{}", self.addr),
            Scheme::Https => write!(f, "https://{}", self.addr),
        }
    }
}

impl FromStr for BackendAddr {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (scheme, rest) = if let Some(r) = s.strip_prefix("https://") {
            (Scheme::Https, r)
        } else if let Some(r) = s.strip_prefix("http://") {
            (Scheme::Http, r)
        } else if s.contains("://") {
            return Err(format!("invalid backend {s:?}: the scheme must be http:// or https://"));
        } else {
            (Scheme::Http, s)
        };
        let rest = rest.trim_end_matches('/');
        let addr = rest.parse::<SocketAddr>().map_err(|_| {
            format!(
                "invalid backend {s:?}: expected IP:PORT, optionally after http:// or https:// (names are not resolved)"
            )
        })?;
        Ok(BackendAddr { scheme, addr })
    }
}
deserialize_from_str!(BackendAddr, "a backend address such as \"10.0.1.21:80\"");

/// A pool's balancing algorithm, as the `loadbalancer` crate spells it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Balance(pub loadbalancer::Algorithm);

impl FromStr for Balance {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        s.parse::<loadbalancer::Algorithm>().map(Balance).map_err(|e| e.to_string())
    }
}
deserialize_from_str!(Balance, "a balancing algorithm such as \"round-robin\"");

/// An HTTP method name in a route's firewall.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Method(pub http::Method);

impl FromStr for Method {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if s.is_empty() || !s.bytes().all(|b| b.is_ascii_uppercase()) {
            return Err(format!("invalid method {s:?}: expected an upper-case HTTP method such as \"GET\""));
        }
        http::Method::from_bytes(s.as_bytes()).map(Method).map_err(|_| format!("invalid method {s:?}"))
    }
}
deserialize_from_str!(Method, "an HTTP method such as \"GET\"");

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!("2s".parse::<Dur>().unwrap().0, Duration::from_secs(2));
        assert_eq!("500ms".parse::<Dur>().unwrap().0, Duration::from_millis(500));
        assert_eq!("1.5s".parse::<Dur>().unwrap().0, Duration::from_millis(1500));
        assert_eq!("6h".parse::<Dur>().unwrap().0, Duration::from_secs(6 * 3600));
        for bad in ["", "2", "s", "2 sec", "-1s", "1e3s"] {
            assert!(bad.parse::<Dur>().is_err(), "{bad:?} should not parse");
        }
    }

    #[test]
    fn sizes_rates_addresses() {
        assert_eq!("1MiB".parse::<ByteSize>().unwrap().0, 1 << 20);
        assert_eq!("10kB".parse::<ByteSize>().unwrap().0, 10_000);
        assert!("1XB".parse::<ByteSize>().is_err());
        let r: Rate = "100/s".parse().unwrap();
        assert_eq!(r.per_second(), 100.0);
        assert_eq!("60/m".parse::<Rate>().unwrap().per_second(), 1.0);
        assert!("0/s".parse::<Rate>().is_err());
        assert!("10/day".parse::<Rate>().is_err());
        let b: BackendAddr = "https://10.0.2.31:8443".parse().unwrap();
        assert_eq!(b.scheme, Scheme::Https);
        assert_eq!(b.addr, "10.0.2.31:8443".parse().unwrap());
        assert_eq!("10.0.1.21:80".parse::<BackendAddr>().unwrap().scheme, Scheme::Http);
        assert!("web1:80".parse::<BackendAddr>().is_err());
        assert!("ftp://1.2.3.4:21".parse::<BackendAddr>().is_err());
        let c: Cidr = "10.0.0.0/8".parse().unwrap();
        assert!(c.contains("10.1.2.3".parse().unwrap()));
        assert!(c.contains("::ffff:10.1.2.3".parse().unwrap()));
        assert!(!c.contains("11.0.0.1".parse().unwrap()));
        assert!("127.0.0.1".parse::<Cidr>().unwrap().contains("127.0.0.1".parse().unwrap()));
    }

    #[test]
    fn balances() {
        use loadbalancer::{Algorithm, HashOn};
        assert_eq!("p2c".parse::<Balance>().unwrap().0, Algorithm::PowerOfTwo);
        assert_eq!("hash(client)".parse::<Balance>().unwrap().0, Algorithm::Hash(HashOn::ClientAddr));
        assert!("random".parse::<Balance>().is_err());
        assert!("hash(header:bad header)".parse::<Balance>().is_err());
    }
}
