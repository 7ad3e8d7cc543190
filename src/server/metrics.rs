//! Prometheus metrics for `/metrics`, in text format 0.0.4.
//!
//! Names, meanings and histogram buckets follow vLLM's (with a `qilin:` prefix) so
//! dashboards and alerts written for vLLM carry over. The `prometheus` crate accepts
//! colons in metric names (they are valid in the text format; label names may not
//! have them). Labels stay low-cardinality: a route *pattern* and a status code, a
//! finish reason — never a URL, model input or key.

use std::sync::Mutex;
use std::time::Duration;

use prometheus::{
    Encoder, Gauge, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, Opts, Registry,
    TextEncoder,
};

use crate::engine::EngineStats;

/// The `Content-Type` of `render`'s output.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// The finish reasons whose success counters exist from the start (at 0), as vLLM
/// pre-creates them, so `rate()` works before the first request of each kind.
pub const FINISH_REASONS: [&str; 4] = ["stop", "length", "timeout", "abort"];

// Buckets copied from vLLM's `PrometheusStatLogger` in vllm/v1/metrics/loggers.py
// (vllm-project/vllm, checked at commit 005a810b and in later versions, where
// `inter_token_latency_seconds` reuses `time_per_output_token_seconds`' buckets).
/// `vllm:time_to_first_token_seconds`.
pub const TTFT_BUCKETS: [f64; 22] = [
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
    20.0, 40.0, 80.0, 160.0, 640.0, 2560.0,
];
/// `vllm:inter_token_latency_seconds` (also its `time_per_output_token_seconds`).
pub const ITL_BUCKETS: [f64; 19] = [
    0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
    40.0, 80.0,
];
/// vLLM's `request_latency_buckets`: e2e latency and queue time both use them.
pub const REQUEST_LATENCY_BUCKETS: [f64; 21] = [
    0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0,
    480.0, 960.0, 1920.0, 7680.0,
];

/// The engine's monotonic totals as of the last render, so each render advances the
/// Prometheus counters by exactly what happened since.
#[derive(Default)]
struct EngineTotals {
    prefix_cache_queries: u64,
    prefix_cache_hits: u64,
    preemptions: u64,
}

/// All metrics of one server. `Send + Sync`; share it through an `Arc`.
pub struct Metrics {
    registry: Registry,
    running: IntGauge,
    waiting: IntGauge,
    kv_cache_usage: Gauge,
    prefix_cache_queries: IntCounter,
    prefix_cache_hits: IntCounter,
    preemptions: IntCounter,
    prompt_tokens: IntCounter,
    generation_tokens: IntCounter,
    request_success: IntCounterVec,
    http_requests: IntCounterVec,
    ttft: Histogram,
    itl: Histogram,
    e2e: Histogram,
    queue: Histogram,
    /// Also serialises the read-compare-add, so two concurrent scrapes never both add
    /// the same delta.
    last_engine: Mutex<EngineTotals>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let registry = Registry::new();
        // Names and buckets are compile-time constants checked by the tests, so a
        // failure here is a programming error, not something a user can cause.
        fn reg<C: prometheus::core::Collector + Clone + 'static>(r: &Registry, c: C) -> C {
            r.register(Box::new(c.clone())).expect("metric definitions are static and unique");
            c
        }
        fn int_gauge(r: &Registry, name: &str, help: &str) -> IntGauge {
            reg(r, IntGauge::new(name, help).expect("valid gauge"))
        }
        fn counter(r: &Registry, name: &str, help: &str) -> IntCounter {
            reg(r, IntCounter::new(name, help).expect("valid counter"))
        }
        fn histogram(r: &Registry, name: &str, help: &str, buckets: &[f64]) -> Histogram {
            let opts = HistogramOpts::new(name, help).buckets(buckets.to_vec());
            reg(r, Histogram::with_opts(opts).expect("valid histogram"))
        }
        let r = &registry;

        let request_success = reg(
            r,
            IntCounterVec::new(
                Opts::new(
                    "qilin:request_success_total",
                    "Count of successfully processed requests.",
                ),
                &["finish_reason"],
            )
            .expect("valid counter vec"),
        );
        for reason in FINISH_REASONS {
            request_success.with_label_values(&[reason]);
        }

        Metrics {
            running: int_gauge(
                r,
                "qilin:num_requests_running",
                "Number of requests in model execution batches.",
            ),
            waiting: int_gauge(
                r,
                "qilin:num_requests_waiting",
                "Number of requests waiting to be processed.",
            ),
            kv_cache_usage: reg(
                r,
                Gauge::new(
                    "qilin:kv_cache_usage_perc",
                    "KV-cache usage. 1 means 100 percent usage.",
                )
                .expect("valid gauge"),
            ),
            prefix_cache_queries: counter(
                r,
                "qilin:prefix_cache_queries_total",
                "Prefix cache queries, in terms of number of queried tokens.",
            ),
            prefix_cache_hits: counter(
                r,
                "qilin:prefix_cache_hits_total",
                "Prefix cache hits, in terms of number of cached tokens.",
            ),
            preemptions: counter(
                r,
                "qilin:num_preemptions_total",
                "Cumulative number of preemption from the engine.",
            ),
            prompt_tokens: counter(
                r,
                "qilin:prompt_tokens_total",
                "Number of prefill tokens processed.",
            ),
            generation_tokens: counter(
                r,
                "qilin:generation_tokens_total",
                "Number of generation tokens processed.",
            ),
            request_success,
            http_requests: reg(
                r,
                IntCounterVec::new(
                    Opts::new(
                        "qilin:http_requests_total",
                        "HTTP responses by route pattern and status code.",
                    ),
                    &["route", "status"],
                )
                .expect("valid counter vec"),
            ),
            ttft: histogram(
                r,
                "qilin:time_to_first_token_seconds",
                "Histogram of time to first token in seconds.",
                &TTFT_BUCKETS,
            ),
            itl: histogram(
                r,
                "qilin:inter_token_latency_seconds",
                "Histogram of inter-token latency in seconds.",
                &ITL_BUCKETS,
            ),
            e2e: histogram(
                r,
                "qilin:e2e_request_latency_seconds",
                "Histogram of e2e request latency in seconds.",
                &REQUEST_LATENCY_BUCKETS,
            ),
            queue: histogram(
                r,
                "qilin:request_queue_time_seconds",
                "Histogram of time spent in WAITING phase for request.",
                &REQUEST_LATENCY_BUCKETS,
            ),
            last_engine: Mutex::new(EngineTotals::default()),
            registry,
        }
    }

    /// Counts one HTTP response. `route` must be a route pattern or `"other"` (never
    /// the request path: each distinct label value is a new time series forever).
    pub fn http_request(&self, route: &str, status: u16) {
        self.http_requests.with_label_values(&[route, &status.to_string()]).inc();
    }

    pub fn time_to_first_token(&self, d: Duration) {
        self.ttft.observe(d.as_secs_f64());
    }

    pub fn inter_token_latency(&self, d: Duration) {
        self.itl.observe(d.as_secs_f64());
    }

    /// Records a finished generation request: its end-to-end latency, time queued
    /// (`None` if it never got scheduled), token totals and finish reason.
    pub fn request_finished(
        &self,
        e2e: Duration,
        queue: Option<Duration>,
        prompt_tokens: usize,
        generation_tokens: usize,
        finish_reason: &str,
    ) {
        self.e2e.observe(e2e.as_secs_f64());
        if let Some(q) = queue {
            self.queue.observe(q.as_secs_f64());
        }
        self.prompt_tokens.inc_by(prompt_tokens as u64);
        self.generation_tokens.inc_by(generation_tokens as u64);
        self.request_success.with_label_values(&[finish_reason]).inc();
    }

    /// The exposition text, with gauges and engine counters taken from `engine`.
    pub fn render(&self, engine: &EngineStats) -> String {
        {
            let mut last = self.last_engine.lock().unwrap_or_else(|e| e.into_inner());
            advance(
                &self.prefix_cache_queries,
                &mut last.prefix_cache_queries,
                engine.prefix_cache_queries,
            );
            advance(&self.prefix_cache_hits, &mut last.prefix_cache_hits, engine.prefix_cache_hits);
            advance(&self.preemptions, &mut last.preemptions, engine.preemptions);
            self.running.set(clamp_i64(engine.running));
            self.waiting.set(clamp_i64(engine.waiting));
            self.kv_cache_usage.set(kv_cache_usage(engine));
        }
        let mut out = Vec::new();
        if let Err(e) = TextEncoder::new().encode(&self.registry.gather(), &mut out) {
            // Only reachable through a malformed metric family, i.e. a bug here; serve
            // what was encoded rather than failing the scrape.
            tracing::error!("encoding metrics failed: {e}");
        }
        String::from_utf8_lossy(&out).into_owned()
    }
}

/// Adds to `counter` what `total` gained beyond the largest total seen so far.
/// Snapshots can arrive out of order (two scrapes each fetch one, then race to
/// render); an older, smaller total is simply ignored, so nothing is counted twice
/// and the counter never decreases. One engine lives as long as the process, so its
/// totals never legitimately go backwards.
fn advance(counter: &IntCounter, last: &mut u64, total: u64) {
    if total > *last {
        counter.inc_by(total - *last);
        *last = total;
    }
}

fn clamp_i64(n: usize) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

/// Fraction of KV blocks in use, 0 when there is no cache.
fn kv_cache_usage(engine: &EngineStats) -> f64 {
    if engine.num_blocks == 0 {
        return 0.0;
    }
    let used = engine.num_blocks.saturating_sub(engine.free_blocks);
    used as f64 / engine.num_blocks as f64
}

#[cfg(test)]
mod tests;
