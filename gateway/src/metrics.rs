//! Prometheus metrics, served at `GET /metrics` in the text exposition
//! format: request latency and status, per-partner call latency and
//! status, circuit breaker state, cache lookups, shed requests and audit
//! failures.
//!
//! Labels are only ever HTTP status codes, partner ids (configuration) and
//! partner status names: never a filter value, a subject, a token or
//! anything from a partner's data.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{LazyLock, Mutex, PoisonError};
use std::time::Duration;

/// Upper bounds of the latency buckets, in seconds.
const BUCKETS: [f64; 12] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0,
];

#[derive(Debug, Default)]
struct Histogram {
    /// Cumulative counts per bucket, then the sum in microseconds.
    buckets: [u64; BUCKETS.len()],
    count: u64,
    sum_micros: u64,
}

impl Histogram {
    fn observe(&mut self, elapsed: Duration) {
        let seconds = elapsed.as_secs_f64();
        for (bound, count) in BUCKETS.iter().zip(self.buckets.iter_mut()) {
            if seconds <= *bound {
                *count += 1;
            }
        }
        self.count += 1;
        self.sum_micros += u64::try_from(elapsed.as_micros()).unwrap_or(u64::MAX);
    }

    fn write(&self, out: &mut String, name: &str, labels: &str) {
        let sep = if labels.is_empty() { "" } else { "," };
        for (bound, count) in BUCKETS.iter().zip(self.buckets.iter()) {
            let _ = writeln!(out, "{name}_bucket{{{labels}{sep}le=\"{bound}\"}} {count}");
        }
        let _ = writeln!(
            out,
            "{name}_bucket{{{labels}{sep}le=\"+Inf\"}} {}",
            self.count
        );
        let braces = if labels.is_empty() {
            String::new()
        } else {
            format!("{{{labels}}}")
        };
        let _ = writeln!(
            out,
            "{name}_sum{braces} {}",
            self.sum_micros as f64 / 1_000_000.0
        );
        let _ = writeln!(out, "{name}_count{braces} {}", self.count);
    }
}

/// The gateway's metrics.
#[derive(Debug, Default)]
pub struct Metrics {
    requests: Mutex<BTreeMap<u16, u64>>,
    request_latency: Mutex<Histogram>,
    partner_calls: Mutex<BTreeMap<(String, String), u64>>,
    partner_latency: Mutex<BTreeMap<String, Histogram>>,
    shed: AtomicU64,
    rate_limited: AtomicU64,
    connections_refused: AtomicU64,
    audit_failures: AtomicU64,
    cache_hits: AtomicU64,
    cache_misses: AtomicU64,
    reloads_applied: AtomicU64,
    reloads_refused: AtomicU64,
    partners: AtomicU64,
}

/// The process's metrics.
pub static METRICS: LazyLock<Metrics> = LazyLock::new(Metrics::default);

impl Metrics {
    /// One `/graphql` request answered with `status` after `elapsed`.
    pub fn request(&self, status: u16, elapsed: Duration) {
        *self
            .requests
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .entry(status)
            .or_default() += 1;
        self.request_latency
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .observe(elapsed);
    }

    /// One partner's part of a query: its status (`OK`, `TIMEOUT`…) and,
    /// when it was called, how long it took.
    pub fn partner(&self, partner: &str, status: &str, elapsed: Option<Duration>) {
        *self
            .partner_calls
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .entry((partner.to_owned(), status.to_owned()))
            .or_default() += 1;
        if let Some(elapsed) = elapsed {
            self.partner_latency
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .entry(partner.to_owned())
                .or_default()
                .observe(elapsed);
        }
    }

    pub fn shed(&self) {
        self.shed.fetch_add(1, Ordering::Relaxed);
    }

    /// A request refused with `429 RATE_LIMITED`.
    pub fn rate_limited(&self) {
        self.rate_limited.fetch_add(1, Ordering::Relaxed);
    }

    /// A connection closed on accept (its address had too many open), or
    /// for delivering no request head in time.
    pub fn connection_refused(&self) {
        self.connections_refused.fetch_add(1, Ordering::Relaxed);
    }

    /// One cache lookup: `hit` when the answer was reused (or another
    /// caller's search joined).
    pub fn cache(&self, hit: bool) {
        let counter = if hit {
            &self.cache_hits
        } else {
            &self.cache_misses
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// A configuration reload: put in force, or refused.
    pub fn reload(&self, applied: bool) {
        let counter = if applied {
            &self.reloads_applied
        } else {
            &self.reloads_refused
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// A snapshot of `partners` partners came into force.
    pub fn snapshot_in_force(&self, partners: usize) {
        self.partners.store(partners as u64, Ordering::Relaxed);
    }

    pub fn audit_failure(&self) {
        self.audit_failures.fetch_add(1, Ordering::Relaxed);
    }

    /// The text exposition; `circuits` is each partner's breaker state
    /// (true: open), `cache_bytes` what the cache holds and `cache_entries`
    /// its entries per partner, at the time of the scrape.
    pub fn render(
        &self,
        circuits: &[(String, bool)],
        cache_bytes: u64,
        cache_entries: &BTreeMap<String, u64>,
    ) -> String {
        let mut out = String::new();
        out.push_str("# HELP meshgate_http_requests_total GraphQL requests by HTTP status.\n# TYPE meshgate_http_requests_total counter\n");
        for (status, count) in self
            .requests
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
        {
            let _ = writeln!(
                out,
                "meshgate_http_requests_total{{status=\"{status}\"}} {count}"
            );
        }
        out.push_str("# HELP meshgate_http_request_duration_seconds GraphQL request latency.\n# TYPE meshgate_http_request_duration_seconds histogram\n");
        self.request_latency
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .write(&mut out, "meshgate_http_request_duration_seconds", "");
        out.push_str("# HELP meshgate_partner_calls_total Calls to partners (and calls not made: CIRCUIT_OPEN) by outcome.\n# TYPE meshgate_partner_calls_total counter\n");
        for ((partner, status), count) in self
            .partner_calls
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
        {
            let _ = writeln!(
                out,
                "meshgate_partner_calls_total{{partner=\"{partner}\",status=\"{status}\"}} {count}"
            );
        }
        out.push_str("# HELP meshgate_partner_duration_seconds Time partners took to answer.\n# TYPE meshgate_partner_duration_seconds histogram\n");
        for (partner, histogram) in self
            .partner_latency
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
        {
            histogram.write(
                &mut out,
                "meshgate_partner_duration_seconds",
                &format!("partner=\"{partner}\""),
            );
        }
        out.push_str("# HELP meshgate_partner_circuit_open Whether a partner's circuit breaker is open.\n# TYPE meshgate_partner_circuit_open gauge\n");
        for (partner, open) in circuits {
            let _ = writeln!(
                out,
                "meshgate_partner_circuit_open{{partner=\"{partner}\"}} {}",
                u8::from(*open)
            );
        }
        let _ = writeln!(
            out,
            "# HELP meshgate_requests_shed_total Requests refused with OVERLOADED.\n# TYPE meshgate_requests_shed_total counter\nmeshgate_requests_shed_total {}",
            self.shed.load(Ordering::Relaxed)
        );
        let _ = writeln!(
            out,
            "# HELP meshgate_requests_rate_limited_total Requests refused with RATE_LIMITED (per client address or principal).\n# TYPE meshgate_requests_rate_limited_total counter\nmeshgate_requests_rate_limited_total {}",
            self.rate_limited.load(Ordering::Relaxed)
        );
        let _ = writeln!(
            out,
            "# HELP meshgate_connections_closed_total Connections closed on accept (too many from one address) or for sending no request head in time.\n# TYPE meshgate_connections_closed_total counter\nmeshgate_connections_closed_total {}",
            self.connections_refused.load(Ordering::Relaxed)
        );
        let _ = writeln!(
            out,
            "# HELP meshgate_audit_append_failures_total Audit records that could not be committed.\n# TYPE meshgate_audit_append_failures_total counter\nmeshgate_audit_append_failures_total {}",
            self.audit_failures.load(Ordering::Relaxed)
        );
        let (hits, misses) = (
            self.cache_hits.load(Ordering::Relaxed),
            self.cache_misses.load(Ordering::Relaxed),
        );
        let _ = writeln!(
            out,
            "# HELP meshgate_cache_lookups_total Partner answers (searches, and series of listed studies) looked up in the cache, by result.\n# TYPE meshgate_cache_lookups_total counter\nmeshgate_cache_lookups_total{{result=\"hit\"}} {hits}\nmeshgate_cache_lookups_total{{result=\"miss\"}} {misses}"
        );
        let ratio = if hits + misses == 0 {
            0.0
        } else {
            hits as f64 / (hits + misses) as f64
        };
        let _ = writeln!(
            out,
            "# HELP meshgate_cache_hit_ratio Share of cache lookups answered from the cache since start.\n# TYPE meshgate_cache_hit_ratio gauge\nmeshgate_cache_hit_ratio {ratio}"
        );
        let _ = writeln!(
            out,
            "# HELP meshgate_cache_bytes What the cache holds, in estimated bytes.\n# TYPE meshgate_cache_bytes gauge\nmeshgate_cache_bytes {cache_bytes}"
        );
        out.push_str("# HELP meshgate_cache_entries Cached partner answers (searches and series), by partner.\n# TYPE meshgate_cache_entries gauge\n");
        for (partner, entries) in cache_entries {
            let _ = writeln!(
                out,
                "meshgate_cache_entries{{partner=\"{partner}\"}} {entries}"
            );
        }
        let _ = writeln!(
            out,
            "# HELP meshgate_config_reloads_total Configuration reloads, put in force or refused (the running configuration kept).\n# TYPE meshgate_config_reloads_total counter\nmeshgate_config_reloads_total{{result=\"applied\"}} {}\nmeshgate_config_reloads_total{{result=\"refused\"}} {}",
            self.reloads_applied.load(Ordering::Relaxed),
            self.reloads_refused.load(Ordering::Relaxed)
        );
        let _ = writeln!(
            out,
            "# HELP meshgate_partners Partners in the configuration in force.\n# TYPE meshgate_partners gauge\nmeshgate_partners {}",
            self.partners.load(Ordering::Relaxed)
        );
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histograms_are_cumulative_and_render_in_the_text_format() {
        let metrics = Metrics::default();
        metrics.request(200, Duration::from_millis(3));
        metrics.request(200, Duration::from_millis(300));
        metrics.request(503, Duration::from_micros(200));
        metrics.partner("north", "OK", Some(Duration::from_millis(20)));
        metrics.partner("south", "CIRCUIT_OPEN", None);
        metrics.cache(true);
        metrics.cache(true);
        metrics.cache(true);
        metrics.cache(false);
        metrics.reload(true);
        metrics.reload(false);
        metrics.reload(false);
        let text = metrics.render(
            &[("north".into(), false), ("south".into(), true)],
            4096,
            &[("north".to_owned(), 7)].into(),
        );
        assert!(text.contains("meshgate_cache_hit_ratio 0.75"), "{text}");
        assert!(
            text.contains("meshgate_cache_entries{partner=\"north\"} 7"),
            "{text}"
        );
        assert!(
            text.contains("meshgate_config_reloads_total{result=\"refused\"} 2"),
            "{text}"
        );
        assert!(
            text.contains("meshgate_cache_lookups_total{result=\"miss\"} 1"),
            "{text}"
        );
        assert!(text.contains("meshgate_cache_bytes 4096"), "{text}");
        assert!(
            text.contains("meshgate_http_requests_total{status=\"200\"} 2"),
            "{text}"
        );
        assert!(
            text.contains("meshgate_http_request_duration_seconds_bucket{le=\"0.005\"} 2"),
            "{text}"
        );
        assert!(
            text.contains("meshgate_http_request_duration_seconds_bucket{le=\"+Inf\"} 3"),
            "{text}"
        );
        assert!(
            text.contains("meshgate_http_request_duration_seconds_count 3"),
            "{text}"
        );
        assert!(
            text.contains(
                "meshgate_partner_calls_total{partner=\"south\",status=\"CIRCUIT_OPEN\"} 1"
            ),
            "{text}"
        );
        assert!(
            text.contains(
                "meshgate_partner_duration_seconds_bucket{partner=\"north\",le=\"0.025\"} 1"
            ),
            "{text}"
        );
        assert!(
            text.contains("meshgate_partner_circuit_open{partner=\"south\"} 1"),
            "{text}"
        );
    }
}
