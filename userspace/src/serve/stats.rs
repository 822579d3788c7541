//! The HTTP side's per-request figures: requests per backend by status class, and latency
//! histograms (request total per route, backend connect and time to first byte per backend, TLS
//! handshake per listener).
//!
//! Each figure is a handle resolved once per generation (`BackendConn::stats`,
//! `RouteRt::stats`, `ListenerRt::stats`), so an observation is a few relaxed atomic adds: no
//! lock, no allocation, no label hashing per request. The handles live in [`HttpStats`] across
//! reloads (a backend, route or listener that stays keeps its counts) and are read at scrape
//! time by [`HttpCollector`].
//!
//! `[admin] latency_histograms = false` turns the histograms off: no clock reads for them per
//! request, and no histogram families in `/metrics` (with many backends they are most of its
//! series). Every histogram shares [`HttpStats`]'s switch, so a reload turns them on or off in
//! place; the counts kept meanwhile stay.

use std::{
    collections::{BTreeMap, HashSet},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering::Relaxed},
    },
    time::{Duration, Instant},
};

use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, NoLabelSet},
    metrics::MetricType,
    registry::Unit,
};

/// Upper bounds of the latency buckets, in nanoseconds: 100 µs to 60 s, about 2.5 per decade
/// (what a proxy in front of local backends and remote clients spans).
const BOUNDS_NS: [u64; 18] = [
    100_000,
    250_000,
    500_000,
    1_000_000,
    2_500_000,
    5_000_000,
    10_000_000,
    25_000_000,
    50_000_000,
    100_000_000,
    250_000_000,
    500_000_000,
    1_000_000_000,
    2_500_000_000,
    5_000_000_000,
    10_000_000_000,
    30_000_000_000,
    60_000_000_000,
];

/// A latency histogram in atomics: one counter per bucket (not cumulative, so an observation
/// touches one) and the sum in nanoseconds (exact, no float CAS loop).
pub struct Histogram {
    buckets: [AtomicU64; BOUNDS_NS.len() + 1],
    sum_ns: AtomicU64,
    /// Whether observations are made (shared by every histogram of an [`HttpStats`]).
    on: Arc<AtomicBool>,
}

impl Default for Histogram {
    fn default() -> Self {
        Self::switched(Arc::new(AtomicBool::new(true)))
    }
}

impl Histogram {
    fn switched(on: Arc<AtomicBool>) -> Self {
        Histogram { buckets: std::array::from_fn(|_| AtomicU64::new(0)), sum_ns: AtomicU64::new(0), on }
    }

    /// The start of a timing, or `None` (no clock read) while histograms are off.
    pub fn start(&self) -> Option<Instant> {
        self.on.load(Relaxed).then(Instant::now)
    }

    pub fn observe(&self, d: Duration) {
        let ns = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        // The first bucket whose bound is >= ns (Prometheus buckets are `le`).
        let i = BOUNDS_NS.partition_point(|&b| b < ns);
        self.buckets[i].fetch_add(1, Relaxed);
        self.sum_ns.fetch_add(ns, Relaxed);
    }

    /// Observes the time since `t0` (from [`Histogram::start`]).
    pub fn since(&self, t0: Option<Instant>) {
        if let Some(t0) = t0 {
            self.observe(t0.elapsed())
        }
    }

    /// (sum in seconds, count, per-bucket counts with their bounds in seconds; the last bound
    /// is `f64::MAX`, which prometheus-client writes as `+Inf`).
    fn read(&self) -> (f64, u64, [(f64, u64); BOUNDS_NS.len() + 1]) {
        let mut out = [(f64::MAX, 0u64); BOUNDS_NS.len() + 1];
        let mut count = 0;
        for (i, b) in self.buckets.iter().enumerate() {
            let n = b.load(Relaxed);
            count += n;
            out[i] = (BOUNDS_NS.get(i).map_or(f64::MAX, |&ns| ns as f64 / 1e9), n);
        }
        (self.sum_ns.load(Relaxed) as f64 / 1e9, count, out)
    }
}

/// Status classes counted per backend; anything outside 100..=599 is `other`.
pub const CLASSES: [&str; 6] = ["1xx", "2xx", "3xx", "4xx", "5xx", "other"];

/// One backend's figures (`pool`, `backend` as in `rampart_backend_up`).
pub struct BackendStats {
    pub pool: String,
    pub backend: String,
    by_class: [AtomicU64; CLASSES.len()],
    /// New connections: TCP connect, PROXY header and TLS handshake with the backend.
    pub connect: Histogram,
    /// From the request's first byte written to the backend to its response head read.
    pub first_byte: Histogram,
}

impl BackendStats {
    pub fn new(pool: &str, backend: &str) -> Self {
        Self::switched(pool, backend, Arc::new(AtomicBool::new(true)))
    }

    fn switched(pool: &str, backend: &str, on: Arc<AtomicBool>) -> Self {
        BackendStats {
            pool: pool.to_string(),
            backend: backend.to_string(),
            by_class: Default::default(),
            connect: Histogram::switched(on.clone()),
            first_byte: Histogram::switched(on),
        }
    }

    /// Counts one request sent to this backend, by the status class of the answer.
    pub fn count(&self, status: u16) {
        let i = match status {
            100..=599 => usize::from(status / 100 - 1),
            _ => CLASSES.len() - 1,
        };
        self.by_class[i].fetch_add(1, Relaxed);
    }

    /// Requests counted under `class` (`"2xx"`…).
    pub fn requests(&self, class: &str) -> u64 {
        CLASSES.iter().position(|c| *c == class).map_or(0, |i| self.by_class[i].load(Relaxed))
    }
}

/// One route's request duration: from its head read whole to the last byte of the answer
/// written (h2: until hyper is done with the response body). Upgraded connections (101) are
/// not observed: their time is the tunnel's.
pub struct RouteStats {
    pub route: String,
    pub pool: String,
    pub duration: Histogram,
}

/// Observes the time since its creation into a route's histogram when dropped (nothing, and
/// no clock read, while histograms are off).
pub struct Timing<S: AsRef<RouteStats>> {
    started: Option<(S, Instant)>,
}

impl<S: AsRef<RouteStats>> Timing<S> {
    pub fn start(stats: S) -> Self {
        let t0 = stats.as_ref().duration.start();
        Timing { started: t0.map(|t0| (stats, t0)) }
    }
    /// Drops without observing.
    pub fn cancel(mut self) {
        self.started = None;
    }
}

impl<S: AsRef<RouteStats>> Drop for Timing<S> {
    fn drop(&mut self) {
        if let Some((s, t0)) = &self.started {
            s.as_ref().duration.since(Some(*t0));
        }
    }
}

impl AsRef<RouteStats> for RouteStats {
    fn as_ref(&self) -> &RouteStats {
        self
    }
}

/// One HTTPS listener's completed TLS handshakes, from the first byte waited for (after a
/// PROXY header, if any) to the handshake's end.
pub struct ListenerStats {
    pub listener: String,
    pub handshake: Histogram,
}

#[derive(Default)]
struct Store {
    backends: BTreeMap<(String, String), Arc<BackendStats>>,
    routes: BTreeMap<(String, String), Arc<RouteStats>>,
    listeners: BTreeMap<String, Arc<ListenerStats>>,
}

/// Every handle of the running generation(s), by labels.
pub struct HttpStats {
    store: Mutex<Store>,
    /// `[admin] latency_histograms`: shared by every histogram handed out.
    histograms: Arc<AtomicBool>,
}

impl Default for HttpStats {
    fn default() -> Self {
        HttpStats { store: Mutex::default(), histograms: Arc::new(AtomicBool::new(true)) }
    }
}

impl std::fmt::Debug for HttpStats {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("HttpStats")
    }
}

impl HttpStats {
    fn store(&self) -> std::sync::MutexGuard<'_, Store> {
        self.store.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Turns the latency histograms on or off (each generation, from its config).
    pub fn set_histograms(&self, on: bool) {
        self.histograms.store(on, Relaxed);
    }

    pub fn histograms(&self) -> bool {
        self.histograms.load(Relaxed)
    }

    /// The handle of (`pool`, `backend`), created on first use (generation build time).
    pub fn backend(&self, pool: &str, backend: &str) -> Arc<BackendStats> {
        let on = self.histograms.clone();
        self.store()
            .backends
            .entry((pool.to_string(), backend.to_string()))
            .or_insert_with(|| Arc::new(BackendStats::switched(pool, backend, on)))
            .clone()
    }

    pub fn route(&self, route: &str, pool: &str) -> Arc<RouteStats> {
        self.store()
            .routes
            .entry((route.to_string(), pool.to_string()))
            .or_insert_with(|| {
                Arc::new(RouteStats {
                    route: route.to_string(),
                    pool: pool.to_string(),
                    duration: Histogram::switched(self.histograms.clone()),
                })
            })
            .clone()
    }

    pub fn listener(&self, listener: &str) -> Arc<ListenerStats> {
        self.store()
            .listeners
            .entry(listener.to_string())
            .or_insert_with(|| {
                Arc::new(ListenerStats {
                    listener: listener.to_string(),
                    handshake: Histogram::switched(self.histograms.clone()),
                })
            })
            .clone()
    }

    /// Forgets the handles a new generation no longer has (their series leave `/metrics`).
    pub fn retain(
        &self,
        backends: &HashSet<(String, String)>,
        routes: &HashSet<(String, String)>,
        listeners: &HashSet<String>,
    ) {
        let mut s = self.store();
        s.backends.retain(|k, _| backends.contains(k));
        s.routes.retain(|k, _| routes.contains(k));
        s.listeners.retain(|k, _| listeners.contains(k));
    }
}

/// Writes [`HttpStats`] at scrape time.
#[derive(Debug)]
pub struct HttpCollector(pub Arc<HttpStats>);

impl Collector for HttpCollector {
    fn encode(&self, mut enc: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        // Copies of the handles, so the lock is not held while writing.
        let (backends, routes, listeners) = {
            let s = self.0.store();
            (
                s.backends.values().cloned().collect::<Vec<_>>(),
                s.routes.values().cloned().collect::<Vec<_>>(),
                s.listeners.values().cloned().collect::<Vec<_>>(),
            )
        };
        let mut m = enc.encode_descriptor(
            "http_backend_requests",
            "Requests sent to a backend, by status class of the answer (the backend's, or the proxy's when \
             the backend failed after the request was sent)",
            None,
            MetricType::Counter,
        )?;
        let labels: Vec<Rendered> = backends
            .iter()
            .map(|b| Rendered::new([("pool", escape(&b.pool).as_str()), ("backend", escape(&b.backend).as_str())]))
            .collect();
        for (b, l) in backends.iter().zip(&labels) {
            for (i, class) in CLASSES.iter().enumerate() {
                m.encode_family(&l.with("code", class))?
                    .encode_counter::<NoLabelSet, _, u64>(&b.by_class[i].load(Relaxed), None)?;
            }
        }
        if !self.0.histograms() {
            return Ok(());
        }
        let seconds = Unit::Seconds;
        let mut histograms = |name: &str, help: &str, rows: Vec<(Rendered, &Histogram)>| {
            let mut m = enc.encode_descriptor(name, help, Some(&seconds), MetricType::Histogram)?;
            for (labels, h) in rows {
                let (sum, count, buckets) = h.read();
                m.encode_family(&labels)?.encode_histogram::<NoLabelSet>(sum, count, &buckets, None)?;
            }
            Ok::<_, std::fmt::Error>(())
        };
        histograms(
            "http_request_duration",
            "Time from a request's head read to the last byte of its answer written, by route",
            routes
                .iter()
                .map(|r| {
                    (
                        Rendered::new([("route", escape(&r.route).as_str()), ("pool", escape(&r.pool).as_str())]),
                        &r.duration,
                    )
                })
                .collect(),
        )?;
        histograms(
            "http_backend_connect_duration",
            "Time to open a new backend connection (TCP, PROXY header, TLS)",
            backends.iter().zip(&labels).map(|(b, l)| (l.clone(), &b.connect)).collect(),
        )?;
        histograms(
            "http_backend_first_byte_duration",
            "Time from a request's first byte sent to a backend to its response head read",
            backends.iter().zip(&labels).map(|(b, l)| (l.clone(), &b.first_byte)).collect(),
        )?;
        histograms(
            "tls_handshake_duration",
            "Time of completed TLS handshakes with clients, by listener",
            listeners
                .iter()
                .map(|l| (Rendered::new([("listener", escape(&l.listener).as_str())]), &l.handshake))
                .collect(),
        )?;
        Ok(())
    }
}

pub use crate::labels::{Rendered, escape};

#[cfg(test)]
mod tests {
    use prometheus_client::registry::Registry;

    use super::*;

    #[test]
    fn buckets_are_le() {
        let h = Histogram::default();
        h.observe(Duration::from_micros(100));
        h.observe(Duration::from_micros(101));
        h.observe(Duration::from_secs(61));
        h.observe(Duration::ZERO);
        let (sum, count, b) = h.read();
        assert_eq!(count, 4);
        assert_eq!(b[0], (0.0001, 2));
        assert_eq!(b[1], (0.00025, 1));
        assert_eq!(b[BOUNDS_NS.len()], (f64::MAX, 1));
        assert!((sum - 61.000201).abs() < 1e-9, "{sum}");
    }

    #[test]
    fn classes() {
        let b = BackendStats::new("p", "127.0.0.1:1");
        for s in [101, 200, 204, 302, 404, 502, 503, 600, 99] {
            b.count(s);
        }
        let got: Vec<u64> = CLASSES.iter().map(|c| b.requests(c)).collect();
        assert_eq!(got, [1, 2, 1, 1, 2, 2]);
    }

    #[test]
    fn handles_survive_and_retire() {
        let s = HttpStats::default();
        let a = s.backend("p", "1.2.3.4:80");
        a.count(200);
        assert!(Arc::ptr_eq(&a, &s.backend("p", "1.2.3.4:80")));
        let keep: HashSet<(String, String)> = [("p".to_string(), "5.6.7.8:80".to_string())].into();
        s.retain(&keep, &HashSet::new(), &HashSet::new());
        assert_eq!(s.backend("p", "1.2.3.4:80").requests("2xx"), 0);
    }

    #[test]
    fn timing_observes_on_drop_unless_cancelled() {
        let r = RouteStats { route: "*/".into(), pool: "p".into(), duration: Histogram::default() };
        drop(Timing::start(&r));
        Timing::start(&r).cancel();
        assert_eq!(r.duration.read().1, 1);
    }

    #[test]
    fn exposition() {
        let stats = Arc::new(HttpStats::default());
        let b = stats.backend("web", "127.0.0.1:8080");
        b.count(200);
        b.count(503);
        b.first_byte.observe(Duration::from_millis(3));
        stats.route("*/", "web").duration.observe(Duration::from_millis(7));
        stats.listener("127.0.0.1:443").handshake.observe(Duration::from_millis(1));
        let mut reg = Registry::default();
        reg.sub_registry_with_prefix("rampart").register_collector(Box::new(HttpCollector(stats)));
        let mut om = String::new();
        prometheus_client::encoding::text::encode(&mut om, &reg).unwrap();
        for line in [
            "# TYPE rampart_http_backend_requests counter",
            "rampart_http_backend_requests_total{pool=\"web\",backend=\"127.0.0.1:8080\",code=\"2xx\"} 1",
            "rampart_http_backend_requests_total{pool=\"web\",backend=\"127.0.0.1:8080\",code=\"5xx\"} 1",
            "rampart_http_backend_requests_total{pool=\"web\",backend=\"127.0.0.1:8080\",code=\"4xx\"} 0",
            "# UNIT rampart_http_request_duration_seconds seconds",
            "rampart_http_request_duration_seconds_bucket{le=\"0.01\",route=\"*/\",pool=\"web\"} 1",
            "rampart_http_request_duration_seconds_bucket{le=\"0.005\",route=\"*/\",pool=\"web\"} 0",
            "rampart_http_backend_first_byte_duration_seconds_count{pool=\"web\",backend=\"127.0.0.1:8080\"} 1",
            "rampart_http_backend_connect_duration_seconds_count{pool=\"web\",backend=\"127.0.0.1:8080\"} 0",
            "rampart_tls_handshake_duration_seconds_sum{listener=\"127.0.0.1:443\"} 0.001",
        ] {
            assert!(om.lines().any(|l| l == line), "no line {line:?} in\n{om}");
        }
    }

    #[test]
    fn histograms_switched_off_observe_nothing_and_leave_metrics() {
        let stats = Arc::new(HttpStats::default());
        let b = stats.backend("web", "127.0.0.1:8080");
        let r = stats.route("*/", "web");
        let l = stats.listener("127.0.0.1:443");
        let encode = || {
            let mut reg = Registry::default();
            reg.sub_registry_with_prefix("rampart").register_collector(Box::new(HttpCollector(stats.clone())));
            let mut om = String::new();
            prometheus_client::encoding::text::encode(&mut om, &reg).unwrap();
            om
        };
        b.first_byte.observe(Duration::from_millis(3));
        stats.set_histograms(false);
        assert_eq!(b.connect.start(), None);
        b.connect.since(b.connect.start());
        drop(Timing::start(&*r));
        l.handshake.since(l.handshake.start());
        b.count(200);
        let om = encode();
        assert!(!om.contains("_duration_seconds"), "{om}");
        assert!(
            om.contains("rampart_http_backend_requests_total{pool=\"web\",backend=\"127.0.0.1:8080\",code=\"2xx\"} 1"),
            "{om}"
        );
        // Handles made before and after the switch follow it; counts kept meanwhile stay.
        stats.set_histograms(true);
        let b2 = stats.backend("web", "127.0.0.1:8081");
        b2.connect.since(b2.connect.start());
        drop(Timing::start(&*r));
        assert_eq!(
            (b.connect.read().1, b.first_byte.read().1, r.duration.read().1, l.handshake.read().1),
            (0, 1, 1, 0)
        );
        assert_eq!(b2.connect.read().1, 1);
        let om = encode();
        assert!(om.contains("rampart_http_request_duration_seconds_count{route=\"*/\",pool=\"web\"} 1"), "{om}");
    }

    /// A collector writing one counter and one histogram with either kind of label set.
    struct Both(bool);

    impl std::fmt::Debug for Both {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("Both")
        }
    }

    impl Collector for Both {
        fn encode(&self, mut enc: DescriptorEncoder) -> Result<(), std::fmt::Error> {
            let pairs = [("pool", escape("a\"b")), ("backend", "127.0.0.1:80".to_string())];
            let rendered = Rendered::new(pairs.iter().map(|(k, v)| (*k, v.as_str())));
            let mut m = enc.encode_descriptor("c", "C", None, MetricType::Counter)?;
            if self.0 {
                m.encode_family(&rendered.with("code", "2xx"))?.encode_counter::<NoLabelSet, _, u64>(&3u64, None)?;
            } else {
                let mut l = pairs.to_vec();
                l.push(("code", "2xx".into()));
                m.encode_family(&l.as_slice())?.encode_counter::<NoLabelSet, _, u64>(&3u64, None)?;
            }
            let h = Histogram::default();
            h.observe(Duration::from_millis(2));
            let (sum, count, buckets) = h.read();
            let mut m = enc.encode_descriptor("h", "H", Some(&Unit::Seconds), MetricType::Histogram)?;
            if self.0 {
                m.encode_family(&rendered)?.encode_histogram::<NoLabelSet>(sum, count, &buckets, None)?;
            } else {
                m.encode_family(&pairs.as_slice())?.encode_histogram::<NoLabelSet>(sum, count, &buckets, None)?;
            }
            Ok(())
        }
    }

    #[test]
    fn rendered_labels_write_what_pairs_write() {
        let text = |rendered| {
            let mut reg = Registry::default();
            reg.register_collector(Box::new(Both(rendered)));
            let mut om = String::new();
            prometheus_client::encoding::text::encode(&mut om, &reg).unwrap();
            om
        };
        let (pairs, rendered) = (text(false), text(true));
        assert!(pairs.contains("c_total{pool=\"a\\\"b\",backend=\"127.0.0.1:80\",code=\"2xx\"} 3\n"), "{pairs}");
        assert!(
            pairs.contains("h_seconds_bucket{le=\"0.0025\",pool=\"a\\\"b\",backend=\"127.0.0.1:80\"} 1\n"),
            "{pairs}"
        );
        assert_eq!(rendered, pairs);
        assert_eq!(Rendered::new([]).with("a", "1").0, "a=\"1\"");
    }

    #[test]
    fn escaping() {
        assert_eq!(escape("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
    }
}
