//! Prometheus label values, shared by every stage's collector (the firewall's and the
//! balancer's views, the daemon's own figures): a leaf, so that no stage imports the daemon.

use prometheus_client::encoding::{EncodeLabelSet, LabelSetEncoder};

/// A label value as the text formats want it (prometheus-client writes values verbatim).
pub fn escape(v: &str) -> String {
    let mut s = String::with_capacity(v.len());
    for c in v.chars() {
        match c {
            '\\' => s.push_str("\\\\"),
            '"' => s.push_str("\\\""),
            '\n' => s.push_str("\\n"),
            c => s.push(c),
        }
    }
    s
}

/// A label set rendered once into one piece (`k="v",…`, values escaped) and written with one
/// call: a collector of thousands of series (rules, backends, histogram buckets) spends most of
/// a scrape in the encoder's per-key, per-quote, per-value calls otherwise. The order and text
/// are those of the `[(&str, String)]` sets it replaces.
#[derive(Clone, Debug, Default)]
pub struct Rendered(pub(crate) String);

impl Rendered {
    /// From (key, escaped value) pairs.
    pub fn new<'a>(labels: impl IntoIterator<Item = (&'a str, &'a str)>) -> Self {
        let mut s = String::new();
        for (k, v) in labels {
            if !s.is_empty() {
                s.push(',');
            }
            s.push_str(k);
            s.push_str("=\"");
            s.push_str(v);
            s.push('"');
        }
        Rendered(s)
    }

    /// These labels and one more (`value` escaped).
    pub fn with(&self, key: &str, value: &str) -> Self {
        let mut s = String::with_capacity(self.0.len() + key.len() + value.len() + 4);
        s.push_str(&self.0);
        if !s.is_empty() {
            s.push(',');
        }
        s.push_str(key);
        s.push_str("=\"");
        s.push_str(value);
        s.push('"');
        Rendered(s)
    }
}

impl EncodeLabelSet for Rendered {
    fn encode(&self, mut enc: LabelSetEncoder) -> Result<(), std::fmt::Error> {
        if self.0.is_empty() {
            return Ok(());
        }
        // The whole set through the key writer, which writes verbatim (as it does keys), with
        // no value after it: the text is already `k="v",…`.
        let mut label = enc.encode_label();
        let mut key = label.encode_label_key()?;
        std::fmt::Write::write_str(&mut key, &self.0)
    }
}
