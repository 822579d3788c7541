//! The two text expositions of `/metrics`, chosen as Prometheus negotiates them: OpenMetrics
//! 1.0.0 for a scraper whose Accept header asks for it, the classic text format 0.0.4 otherwise.
//!
//! prometheus-client writes OpenMetrics only. The classic text is derived from it line by line:
//! the two formats share sample lines, and differ in metadata (a counter's HELP/TYPE name
//! carries `_total` in the classic format, `info` is a gauge named `_info`, `unknown` is
//! `untyped`, no UNIT or EOF lines) and in OpenMetrics-only samples (`_created`, exemplars).

use std::fmt::Write as _;

pub const OPENMETRICS_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
pub const CLASSIC_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    OpenMetrics,
    Classic,
}

impl Format {
    pub fn content_type(self) -> &'static str {
        match self {
            Format::OpenMetrics => OPENMETRICS_TYPE,
            Format::Classic => CLASSIC_TYPE,
        }
    }
}

/// The format for a request's Accept header (`None`: no header). OpenMetrics when the client
/// names `application/openmetrics-text` (version 1.0.0, 0.0.1 or none) with a q-value above 0
/// and not below the one it gives the classic format (`text/plain`, else `text/*`, else
/// `*/*`, the most specific range deciding as in RFC 9110 §12.5.1); classic otherwise, which is
/// what scrapers that name neither expect.
pub fn negotiate(accept: Option<&[u8]>) -> Format {
    let Some(accept) = accept.and_then(|a| std::str::from_utf8(a).ok()) else { return Format::Classic };
    let mut om: Option<f32> = None;
    // q of text/plain, text/*, */* as given.
    let mut plain: Option<f32> = None;
    let mut text_any: Option<f32> = None;
    let mut any: Option<f32> = None;
    let max = |slot: &mut Option<f32>, q: f32| *slot = Some(slot.map_or(q, |s| s.max(q)));
    for range in accept.split(',') {
        let mut params = range.split(';');
        let media = params.next().unwrap_or("").trim();
        let (mut q, mut version) = (1.0f32, None);
        for p in params {
            let Some((k, v)) = p.split_once('=') else { continue };
            let v = v.trim().trim_matches('"');
            match k.trim() {
                k if k.eq_ignore_ascii_case("q") => {
                    q = v.parse::<f32>().ok().filter(|q| (0.0..=1.0).contains(q)).unwrap_or(0.0)
                }
                k if k.eq_ignore_ascii_case("version") => version = Some(v),
                _ => {}
            }
        }
        if media.eq_ignore_ascii_case("application/openmetrics-text") {
            if version.is_none_or(|v| v == "1.0.0" || v == "0.0.1") {
                max(&mut om, q);
            }
        } else if media.eq_ignore_ascii_case("text/plain") {
            if version.is_none_or(|v| v == "0.0.4") {
                max(&mut plain, q);
            }
        } else if media.eq_ignore_ascii_case("text/*") {
            max(&mut text_any, q);
        } else if media == "*/*" {
            max(&mut any, q);
        }
    }
    let classic = plain.or(text_any).or(any).unwrap_or(0.0);
    match om {
        Some(q) if q > 0.0 && q >= classic => Format::OpenMetrics,
        _ => Format::Classic,
    }
}

/// The classic text format (0.0.4) of an OpenMetrics text as prometheus-client writes it.
pub fn to_classic(om: &str) -> String {
    let mut out = String::with_capacity(om.len());
    // The HELP line waiting for its TYPE line (prometheus-client writes HELP, TYPE, UNIT).
    let mut help: Option<(&str, &str)> = None;
    // The current family's OpenMetrics name and type.
    let mut family: Option<(&str, &str)> = None;
    for line in om.lines() {
        if let Some(rest) = line.strip_prefix("# HELP ") {
            let (name, text) = rest.split_once(' ').unwrap_or((rest, ""));
            help = Some((name, text));
            continue;
        }
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, ty) = rest.split_once(' ').unwrap_or((rest, "unknown"));
            let (suffix, classic_ty) = match ty {
                "counter" => ("_total", "counter"),
                "info" => ("_info", "gauge"),
                "gauge" | "histogram" | "summary" => ("", ty),
                "stateset" => ("", "gauge"),
                _ => ("", "untyped"),
            };
            if let Some((_, text)) = help.take().filter(|(h, _)| *h == name) {
                // OpenMetrics escapes `"` in HELP; the classic format knows only `\\` and `\n`.
                let _ = writeln!(out, "# HELP {name}{suffix} {}", text.replace("\\\"", "\""));
            }
            let _ = writeln!(out, "# TYPE {name}{suffix} {classic_ty}");
            family = Some((name, ty));
            continue;
        }
        if line.is_empty() || line.starts_with('#') {
            // UNIT, EOF: OpenMetrics only.
            continue;
        }
        // Per sample line only what is cheap (this runs for every line of a big scrape): a line
        // without `#` has no exemplar, and `_created` is looked for right after the name.
        let sample = if line.contains('#') { strip_exemplar(line) } else { line };
        if let Some((name, ty)) = family
            && matches!(ty, "counter" | "histogram" | "summary")
            && sample
                .strip_prefix(name)
                .and_then(|r| r.strip_prefix("_created"))
                .is_some_and(|r| r.starts_with(['{', ' ']))
        {
            continue;
        }
        out.push_str(sample);
        out.push('\n');
    }
    out
}

/// The metric name of a sample line.
fn sample_name(line: &str) -> &str {
    let end = line.find(['{', ' ']).unwrap_or(line.len());
    &line[..end]
}

/// A sample line without its exemplar (` # {...} value`): the name, the label set (whose
/// quoted values may hold anything, `#` and `}` included), the value.
fn strip_exemplar(line: &str) -> &str {
    let b = line.as_bytes();
    let mut i = sample_name(line).len();
    if b.get(i) == Some(&b'{') {
        let mut quoted = false;
        i += 1;
        while i < b.len() {
            match b[i] {
                b'\\' if quoted => i += 1,
                b'"' => quoted = !quoted,
                b'}' if !quoted => break,
                _ => {}
            }
            i += 1;
        }
    }
    match line[i..].find(" #") {
        Some(at) => line[..i + at].trim_end(),
        None => line,
    }
}

#[cfg(test)]
mod tests {
    use prometheus_client::{
        encoding::EncodeLabelSet,
        metrics::{
            counter::Counter, exemplar::HistogramWithExemplars, family::Family, gauge::Gauge, histogram::Histogram,
            info::Info,
        },
        registry::{Registry, Unit},
    };

    use super::*;

    const PROMETHEUS_ACCEPT: &str = "application/openmetrics-text;version=1.0.0,application/openmetrics-text;\
                                     version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1";

    #[test]
    fn negotiation() {
        let f = |a: &str| negotiate(Some(a.as_bytes()));
        assert_eq!(negotiate(None), Format::Classic);
        assert_eq!(f(PROMETHEUS_ACCEPT), Format::OpenMetrics);
        assert_eq!(f("application/openmetrics-text"), Format::OpenMetrics);
        assert_eq!(f("Application/OpenMetrics-Text; Version=\"1.0.0\""), Format::OpenMetrics);
        assert_eq!(f("text/plain;version=0.0.4;q=0.9,application/openmetrics-text;q=0.5"), Format::Classic);
        assert_eq!(f("application/openmetrics-text;q=0.5,*/*"), Format::Classic);
        // The more specific text/plain decides over */*.
        assert_eq!(f("application/openmetrics-text;q=0.5,text/plain;q=0.1,*/*"), Format::OpenMetrics);
        assert_eq!(f("application/openmetrics-text;q=0"), Format::Classic);
        assert_eq!(f("application/openmetrics-text;version=2.0.0"), Format::Classic);
        assert_eq!(f("*/*"), Format::Classic);
        assert_eq!(f("text/plain"), Format::Classic);
        assert_eq!(f(""), Format::Classic);
        assert_eq!(negotiate(Some(&[0xff, 0xfe])), Format::Classic);
    }

    #[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
    struct L {
        path: String,
    }

    fn sample_registry() -> Registry {
        let mut root = Registry::default();
        let sub = root.sub_registry_with_prefix("app");
        let c: Family<L, Counter> = Family::default();
        c.get_or_create(&L { path: "a # {b} \\\" }".into() }).inc_by(3);
        sub.register("requests", "Requests served", c);
        let g: Gauge = Gauge::default();
        g.set(-4);
        sub.register("level", "A level", g);
        let h = Histogram::new([0.5, 1.0]);
        h.observe(0.7);
        sub.register_with_unit("wait", "Time waited", Unit::Seconds, h);
        let he = HistogramWithExemplars::new([1.0].into_iter());
        he.observe(0.2, Some(vec![("trace".to_string(), "x".to_string())]));
        sub.register("sized", "Sizes", he);
        sub.register("build", "Build", Info::new(vec![("version", "1.2")]));
        root
    }

    #[test]
    fn classic_from_openmetrics() {
        let mut om = String::new();
        prometheus_client::encoding::text::encode(&mut om, &sample_registry()).unwrap();
        assert!(om.contains("# TYPE app_requests counter\n"), "{om}");
        assert!(om.contains("# UNIT app_wait_seconds seconds\n"), "{om}");
        assert!(om.contains("app_sized_bucket{le=\"1.0\"} 1 # {trace=\"x\"} 0.2\n"), "{om}");
        let classic = to_classic(&om);
        let expected = "# HELP app_requests_total Requests served.\n\
                        # TYPE app_requests_total counter\n\
                        app_requests_total{path=\"a # {b} \\\" }\"} 3\n\
                        # HELP app_level A level.\n\
                        # TYPE app_level gauge\n\
                        app_level -4\n\
                        # HELP app_wait_seconds Time waited.\n\
                        # TYPE app_wait_seconds histogram\n\
                        app_wait_seconds_sum 0.7\n\
                        app_wait_seconds_count 1\n\
                        app_wait_seconds_bucket{le=\"0.5\"} 0\n\
                        app_wait_seconds_bucket{le=\"1.0\"} 1\n\
                        app_wait_seconds_bucket{le=\"+Inf\"} 1\n\
                        # HELP app_sized Sizes.\n\
                        # TYPE app_sized histogram\n\
                        app_sized_sum 0.2\n\
                        app_sized_count 1\n\
                        app_sized_bucket{le=\"1.0\"} 1\n\
                        app_sized_bucket{le=\"+Inf\"} 1\n\
                        # HELP app_build_info Build.\n\
                        # TYPE app_build_info gauge\n\
                        app_build_info{version=\"1.2\"} 1\n";
        assert_eq!(classic, expected);
    }

    #[test]
    fn created_samples_and_types() {
        let om = "# HELP a_x X.\n# TYPE a_x counter\na_x_total 1\na_x_created 1.7e9\n\
                  # HELP a_u U \\\"q\\\".\n# TYPE a_u unknown\na_u 2\n# EOF\n";
        assert_eq!(
            to_classic(om),
            "# HELP a_x_total X.\n# TYPE a_x_total counter\na_x_total 1\n\
             # HELP a_u U \"q\".\n# TYPE a_u untyped\na_u 2\n"
        );
    }

    #[test]
    fn exemplars_go() {
        assert_eq!(strip_exemplar("a_total 1 # {t=\"1\"} 1.0"), "a_total 1");
        assert_eq!(strip_exemplar("a{x=\"#}\"} 1"), "a{x=\"#}\"} 1");
        assert_eq!(strip_exemplar("a{x=\"\\\"# \"} 1 # {y=\"2\"} 3"), "a{x=\"\\\"# \"} 1");
        assert_eq!(sample_name("abc{x=\"1\"} 2"), "abc");
        assert_eq!(sample_name("abc 2"), "abc");
    }
}
