//! The figures of `qilin bench serve`, defined as vLLM's serving benchmark defines them
//! (`calculate_metrics` in vllm/benchmarks/serve.py) so the two can be compared:
//! - TTFT: request start to the first chunk carrying text;
//! - ITL: gaps between successive text-bearing chunks, pooled over all requests;
//! - TPOT: per request, (last token - TTFT) / (output tokens - 1), only for requests
//!   with more than one output token (vLLM's `latency` is the last token's time);
//! - E2EL: request start to `data: [DONE]` (vLLM stops at the last token; the gap is
//!   the usage chunk and [DONE] that follow it, normally sent at once);
//! - throughputs: completed requests and tokens (from the server's `usage`) over the
//!   wall time of the whole run;
//! - percentiles: numpy.percentile's default (linear interpolation between ranks).

use std::time::Duration;

use serde::Serialize;

/// What one successful request measured.
#[derive(Clone, Debug, PartialEq)]
pub struct RequestTiming {
    pub prompt_tokens: usize,
    pub output_tokens: usize,
    pub ttft: Duration,
    pub itl: Vec<Duration>,
    /// Request start to the last chunk with text.
    pub last_token: Duration,
    pub e2el: Duration,
}

/// Mean and percentiles of one latency, in milliseconds; `None` without samples (a run
/// where everything failed has no latencies, and 0 would read as "instant").
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct Summary {
    pub mean: Option<f64>,
    pub p50: Option<f64>,
    pub p90: Option<f64>,
    pub p99: Option<f64>,
}

impl Summary {
    pub fn of(values: &[f64]) -> Summary {
        let mut sorted = values.to_vec();
        sorted.sort_by(f64::total_cmp);
        let mean = (!sorted.is_empty()).then(|| sorted.iter().sum::<f64>() / sorted.len() as f64);
        Summary {
            mean,
            p50: percentile(&sorted, 50.0),
            p90: percentile(&sorted, 90.0),
            p99: percentile(&sorted, 99.0),
        }
    }
}

/// numpy.percentile(sorted, p) with its default `linear` method: the value at rank
/// p/100 * (n - 1), interpolated between the two neighbouring samples.
pub fn percentile(sorted: &[f64], p: f64) -> Option<f64> {
    let last = sorted.len().checked_sub(1)?;
    let rank = (p / 100.0).clamp(0.0, 1.0) * last as f64;
    let lo = rank.floor() as usize;
    let hi = rank.ceil() as usize;
    Some(sorted[lo] + (sorted[hi] - sorted[lo]) * (rank - lo as f64))
}

/// The aggregate figures over the successful requests of a run.
#[derive(Clone, Debug, PartialEq)]
pub struct Metrics {
    pub completed: usize,
    pub total_input_tokens: usize,
    pub total_output_tokens: usize,
    pub request_throughput: f64,
    pub output_throughput: f64,
    pub total_token_throughput: f64,
    pub mean_input_tokens: Option<f64>,
    pub mean_output_tokens: Option<f64>,
    pub ttft_ms: Summary,
    pub tpot_ms: Summary,
    pub itl_ms: Summary,
    pub e2el_ms: Summary,
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

pub fn calculate(done: &[RequestTiming], duration: Duration) -> Metrics {
    let secs = duration.as_secs_f64().max(f64::MIN_POSITIVE);
    let completed = done.len();
    let total_input_tokens: usize = done.iter().map(|r| r.prompt_tokens).sum();
    let total_output_tokens: usize = done.iter().map(|r| r.output_tokens).sum();
    let mean = |total: usize| (completed > 0).then(|| total as f64 / completed as f64);
    let tpots: Vec<f64> = done
        .iter()
        .filter(|r| r.output_tokens > 1)
        .map(|r| ms(r.last_token.saturating_sub(r.ttft)) / (r.output_tokens - 1) as f64)
        .collect();
    let itls: Vec<f64> = done.iter().flat_map(|r| r.itl.iter().copied().map(ms)).collect();
    let ttfts: Vec<f64> = done.iter().map(|r| ms(r.ttft)).collect();
    let e2els: Vec<f64> = done.iter().map(|r| ms(r.e2el)).collect();
    Metrics {
        completed,
        total_input_tokens,
        total_output_tokens,
        request_throughput: completed as f64 / secs,
        output_throughput: total_output_tokens as f64 / secs,
        total_token_throughput: (total_input_tokens + total_output_tokens) as f64 / secs,
        mean_input_tokens: mean(total_input_tokens),
        mean_output_tokens: mean(total_output_tokens),
        ttft_ms: Summary::of(&ttfts),
        tpot_ms: Summary::of(&tpots),
        itl_ms: Summary::of(&itls),
        e2el_ms: Summary::of(&e2els),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: Option<f64>, b: f64) -> bool {
        a.is_some_and(|a| (a - b).abs() < 1e-9)
    }

    // Expected values worked out by hand from numpy's definition: rank = p/100 * (n-1),
    // value = x[floor] + (x[ceil] - x[floor]) * frac(rank).
    #[test]
    fn percentile_matches_numpy_linear_method() {
        let x = [1.0, 2.0, 3.0, 4.0];
        assert!(close(percentile(&x, 50.0), 2.5)); // rank 1.5
        assert!(close(percentile(&x, 90.0), 3.7)); // rank 2.7
        assert!(close(percentile(&x, 99.0), 3.97)); // rank 2.97
        assert!(close(percentile(&x, 0.0), 1.0));
        assert!(close(percentile(&x, 100.0), 4.0));
        let y = [15.0, 20.0, 35.0, 40.0, 50.0];
        assert!(close(percentile(&y, 40.0), 29.0)); // rank 1.6: 20 + 0.6 * 15
        assert!(close(percentile(&y, 50.0), 35.0)); // rank 2: exact sample
        assert!(close(percentile(&y, 99.0), 49.6)); // rank 3.96: 40 + 0.96 * 10
        assert!(close(percentile(&[7.5], 99.0), 7.5));
        assert_eq!(percentile(&[], 50.0), None);
    }

    #[test]
    fn summary_sorts_its_input_and_is_empty_without_samples() {
        let s = Summary::of(&[4.0, 1.0, 3.0, 2.0]);
        assert!(close(s.mean, 2.5));
        assert!(close(s.p50, 2.5) && close(s.p90, 3.7) && close(s.p99, 3.97));
        let none = Summary::of(&[]);
        assert_eq!((none.mean, none.p50, none.p90, none.p99), (None, None, None, None));
    }

    #[test]
    fn metrics_follow_vllm_definitions() {
        let msd = Duration::from_millis;
        let done = vec![
            // 5 tokens: TPOT = (500 - 100) / 4 = 100 ms; [DONE] 20 ms after the last.
            RequestTiming {
                prompt_tokens: 10,
                output_tokens: 5,
                ttft: msd(100),
                itl: vec![msd(90), msd(110), msd(100), msd(100)],
                last_token: msd(500),
                e2el: msd(520),
            },
            // One token: no TPOT (vLLM leaves it out), no ITL.
            RequestTiming {
                prompt_tokens: 20,
                output_tokens: 1,
                ttft: msd(300),
                itl: vec![],
                last_token: msd(300),
                e2el: msd(300),
            },
        ];
        let m = calculate(&done, Duration::from_secs(2));
        assert_eq!((m.completed, m.total_input_tokens, m.total_output_tokens), (2, 30, 6));
        assert!((m.request_throughput - 1.0).abs() < 1e-12);
        assert!((m.output_throughput - 3.0).abs() < 1e-12);
        assert!((m.total_token_throughput - 18.0).abs() < 1e-12);
        assert!(close(m.mean_input_tokens, 15.0) && close(m.mean_output_tokens, 3.0));
        assert!(close(m.tpot_ms.mean, 100.0) && close(m.tpot_ms.p99, 100.0));
        assert!(close(m.itl_ms.mean, 100.0) && close(m.itl_ms.p50, 100.0));
        assert!(close(m.ttft_ms.mean, 200.0) && close(m.ttft_ms.p50, 200.0));
        assert!(close(m.ttft_ms.p90, 280.0)); // rank 0.9 between 100 and 300
        assert!(close(m.e2el_ms.mean, 410.0));

        let empty = calculate(&[], Duration::from_secs(1));
        assert_eq!(empty.completed, 0);
        assert_eq!(empty.mean_output_tokens, None);
        assert_eq!(empty.ttft_ms.p50, None);
    }
}
