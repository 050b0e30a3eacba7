//! Prometheus metrics in the text exposition format: requests by route template and
//! status, latency histograms per route and per search stage, rejected searches, and the
//! index being served.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::Mutex;

/// Upper bounds of the latency buckets, seconds.
const BUCKETS: [f64; 14] = [0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0];

#[derive(Debug, Clone, Default)]
struct Histogram {
    counts: [u64; BUCKETS.len()],
    sum: f64,
    count: u64,
}

impl Histogram {
    fn observe(&mut self, seconds: f64) {
        for (i, b) in BUCKETS.iter().enumerate() {
            if seconds <= *b {
                self.counts[i] += 1;
            }
        }
        self.sum += seconds;
        self.count += 1;
    }

    fn render(&self, out: &mut String, name: &str, label: &str, value: &str) {
        for (b, c) in BUCKETS.iter().zip(self.counts) {
            let _ = writeln!(out, "{name}_bucket{{{label}=\"{value}\",le=\"{b}\"}} {c}");
        }
        let _ = writeln!(out, "{name}_bucket{{{label}=\"{value}\",le=\"+Inf\"}} {}", self.count);
        let _ = writeln!(out, "{name}_sum{{{label}=\"{value}\"}} {}", self.sum);
        let _ = writeln!(out, "{name}_count{{{label}=\"{value}\"}} {}", self.count);
    }
}

#[derive(Debug, Default)]
struct Inner {
    requests: BTreeMap<(String, u16), u64>,
    latency: BTreeMap<String, Histogram>,
    stages: BTreeMap<String, Histogram>,
    rejected: u64,
    uploads_over_budget: u64,
    abandoned: u64,
    generation: u64,
    items: u64,
    garments: u64,
    reloads: u64,
    reload_failures: u64,
}

/// Shared by all workers; a mutex is cheap next to a search.
#[derive(Debug, Default)]
pub struct Metrics {
    inner: Mutex<Inner>,
}

impl Metrics {
    fn with<T>(&self, f: impl FnOnce(&mut Inner) -> T) -> T {
        let mut guard = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        f(&mut guard)
    }

    /// One finished request. `route` is the matched template (`/v1/items/{sku}`), never the
    /// raw path, so a scan of random URLs cannot blow up the label set.
    pub fn request(&self, route: &str, status: u16, seconds: f64) {
        self.with(|m| {
            *m.requests.entry((route.to_string(), status)).or_default() += 1;
            m.latency.entry(route.to_string()).or_default().observe(seconds);
        });
    }

    /// Milliseconds spent in one stage of a search.
    pub fn stage(&self, stage: &str, millis: f64) {
        self.with(|m| m.stages.entry(stage.to_string()).or_default().observe(millis / 1000.0));
    }

    pub fn rejected(&self) {
        self.with(|m| m.rejected += 1);
    }

    /// An upload refused (503) because uploads in flight held the whole memory budget: not a
    /// full search pool, so counted apart (a slow-upload attack shows here, not as load).
    pub fn upload_over_budget(&self) {
        self.with(|m| m.uploads_over_budget += 1);
    }

    /// A search not run (or stopped between its stages) because its client had gone.
    pub fn abandoned(&self) {
        self.with(|m| m.abandoned += 1);
    }

    pub fn index(&self, generation: u64, items: usize, garments: usize) {
        self.with(|m| {
            m.generation = generation;
            m.items = items as u64;
            m.garments = garments as u64;
            m.reloads += 1;
        });
    }

    pub fn reload_failed(&self) {
        self.with(|m| m.reload_failures += 1);
    }

    pub fn render(&self) -> String {
        self.with(|m| {
            let mut out = String::new();
            out.push_str("# HELP shoplens_http_requests_total HTTP requests by route template and status.\n# TYPE shoplens_http_requests_total counter\n");
            for ((route, status), n) in &m.requests {
                let _ = writeln!(out, "shoplens_http_requests_total{{route=\"{route}\",status=\"{status}\"}} {n}");
            }
            out.push_str("# HELP shoplens_http_request_duration_seconds Request latency by route template.\n# TYPE shoplens_http_request_duration_seconds histogram\n");
            for (route, h) in &m.latency {
                h.render(&mut out, "shoplens_http_request_duration_seconds", "route", route);
            }
            out.push_str("# HELP shoplens_search_stage_duration_seconds Time per search stage (decode, detect, embed, search, fetch).\n# TYPE shoplens_search_stage_duration_seconds histogram\n");
            for (stage, h) in &m.stages {
                h.render(&mut out, "shoplens_search_stage_duration_seconds", "stage", stage);
            }
            let _ = write!(
                out,
                "# HELP shoplens_search_rejected_total Searches refused with 503 because the pool was full.\n# TYPE shoplens_search_rejected_total counter\nshoplens_search_rejected_total {}\n\
                 # HELP shoplens_upload_over_budget_total Uploads refused with 503 because uploads in flight held the whole upload memory budget.\n# TYPE shoplens_upload_over_budget_total counter\nshoplens_upload_over_budget_total {}\n\
                 # HELP shoplens_search_abandoned_total Searches not run, or stopped between stages, because the client had closed the connection (answered 499).\n# TYPE shoplens_search_abandoned_total counter\nshoplens_search_abandoned_total {}\n\
                 # HELP shoplens_index_generation Generation being served.\n# TYPE shoplens_index_generation gauge\nshoplens_index_generation {}\n\
                 # HELP shoplens_index_items Shop items in the served generation.\n# TYPE shoplens_index_items gauge\nshoplens_index_items {}\n\
                 # HELP shoplens_index_garments Garments in the served generation.\n# TYPE shoplens_index_garments gauge\nshoplens_index_garments {}\n\
                 # HELP shoplens_index_loads_total Generations loaded.\n# TYPE shoplens_index_loads_total counter\nshoplens_index_loads_total {}\n\
                 # HELP shoplens_index_load_failures_total Failed attempts to load a generation.\n# TYPE shoplens_index_load_failures_total counter\nshoplens_index_load_failures_total {}\n",
                m.rejected, m.uploads_over_budget, m.abandoned, m.generation, m.items, m.garments, m.reloads, m.reload_failures
            );
            out
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_counters_and_cumulative_buckets() {
        let m = Metrics::default();
        m.request("/v1/search", 200, 0.03);
        m.request("/v1/search", 200, 0.2);
        m.request("/v1/search", 400, 0.001);
        m.stage("detect", 30.0);
        m.index(3, 10, 12);
        let text = m.render();
        assert!(text.contains("shoplens_http_requests_total{route=\"/v1/search\",status=\"200\"} 2"), "{text}");
        assert!(text.contains("shoplens_http_request_duration_seconds_bucket{route=\"/v1/search\",le=\"0.04\"} 2"), "{text}");
        assert!(text.contains("shoplens_http_request_duration_seconds_bucket{route=\"/v1/search\",le=\"+Inf\"} 3"), "{text}");
        assert!(text.contains("shoplens_search_stage_duration_seconds_count{stage=\"detect\"} 1"));
        assert!(text.contains("shoplens_index_generation 3"));
    }
}
