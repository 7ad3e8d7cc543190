//! `qilin bench serve`: a load generator for a running OpenAI-compatible server, in the
//! manner of vLLM's `vllm bench serve` (benchmarks/benchmark_serving.py) with its random
//! dataset. N seeded prompts go out as streaming requests from C client threads, all
//! at once or as a Poisson process of rate R (never more than C in flight); each
//! stream is timed chunk by chunk and the report gives throughput, TTFT, TPOT, ITL and
//! end-to-end latency percentiles, as a table and as one JSON line.

mod client;
mod prompts;
mod sse;
mod stats;

use std::sync::{mpsc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::Serialize;
use serde_json::json;

use crate::config::BenchServeArgs;
use client::{Client, RequestError};
use sse::Endpoint;
use stats::{RequestTiming, Summary};

/// How many distinct error messages the report keeps.
const ERROR_SAMPLES: usize = 5;

#[derive(Debug, Serialize)]
pub struct Report {
    pub url: String,
    pub model: String,
    pub endpoint: &'static str,
    pub concurrency: usize,
    pub num_prompts: usize,
    /// Requests/s of the Poisson arrivals; null when all were sent at once.
    pub request_rate: Option<f64>,
    pub completed: usize,
    pub errors: usize,
    pub error_samples: Vec<String>,
    pub duration_s: f64,
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

pub fn run(args: &BenchServeArgs) -> anyhow::Result<()> {
    let endpoint = match args.endpoint.as_str() {
        "completions" => Endpoint::Completions,
        "chat" => Endpoint::Chat,
        other => bail!("--endpoint must be `completions` or `chat`, not `{other}`"),
    };
    if [args.concurrency, args.num_prompts, args.input_len, args.output_len].contains(&0) {
        bail!("--concurrency, --num-prompts, --input-len and --output-len must be at least 1");
    }
    let rate = match args.request_rate {
        Some(r) if r.is_infinite() && r > 0.0 => None,
        Some(r) if r.is_finite() && r > 0.0 => Some(r),
        Some(r) => bail!("--request-rate must be a positive number of requests/s, not {r}"),
        None => None,
    };
    let client = Client::new(&args.url, args.api_key.as_deref(), args.concurrency)?;
    let model = resolve_model(&client, args.model.as_deref())?;
    let bodies: Vec<Vec<u8>> = prompts::generate(args.num_prompts, args.input_len, args.seed)
        .into_iter()
        .map(|p| request_body(endpoint, &model, p, args.output_len))
        .collect();
    eprintln!(
        "bench serve: {} requests to {}{} (model {model}), concurrency {}, {}",
        args.num_prompts,
        client.base,
        endpoint.path(),
        args.concurrency,
        rate.map_or("all at once".to_string(), |r| format!("Poisson arrivals at {r} requests/s")),
    );

    let outcome = execute(&client, endpoint, &bodies, args.concurrency, rate, args.seed);
    let m = stats::calculate(&outcome.done, outcome.duration);
    let report = Report {
        url: client.base.clone(),
        model,
        endpoint: endpoint.name(),
        concurrency: args.concurrency,
        num_prompts: args.num_prompts,
        request_rate: rate,
        completed: m.completed,
        errors: outcome.errors,
        error_samples: outcome.samples,
        duration_s: outcome.duration.as_secs_f64(),
        request_throughput: m.request_throughput,
        output_throughput: m.output_throughput,
        total_token_throughput: m.total_token_throughput,
        mean_input_tokens: m.mean_input_tokens,
        mean_output_tokens: m.mean_output_tokens,
        ttft_ms: m.ttft_ms,
        tpot_ms: m.tpot_ms,
        itl_ms: m.itl_ms,
        e2el_ms: m.e2el_ms,
    };
    print!("{}", table(&report, &m));
    let line = serde_json::to_string(&report)?;
    println!("{line}");
    if let Some(path) = &args.json {
        std::fs::write(path, format!("{line}\n"))
            .with_context(|| format!("writing {}", path.display()))?;
    }
    if report.completed == 0 {
        bail!(
            "every request failed; first error: {}",
            report.error_samples.first().map_or("none recorded", String::as_str)
        );
    }
    Ok(())
}

fn resolve_model(client: &Client, asked: Option<&str>) -> anyhow::Result<String> {
    match (client.models(), asked) {
        (Ok(ids), Some(name)) => {
            if !ids.is_empty() && !ids.iter().any(|id| id == name) {
                eprintln!("warning: the server lists {ids:?}, not `{name}`; sending it anyway");
            }
            Ok(name.to_string())
        }
        (Ok(ids), None) => ids
            .into_iter()
            .next()
            .ok_or_else(|| client::SetupError::NoModels(client.base.clone()).into()),
        // A server without /v1/models can still be benchmarked under a given name, but
        // not when it is unreachable or refuses the key: every request would fail.
        (Err(e @ client::SetupError::Models { .. }), Some(name)) => {
            eprintln!("warning: {e}; using `{name}`");
            Ok(name.to_string())
        }
        (Err(e), _) => Err(e.into()),
    }
}

/// The JSON of one request, serialised before the clock starts. Greedy with eos ignored,
/// so every request generates exactly `output_len` tokens, as vLLM's random dataset does.
fn request_body(endpoint: Endpoint, model: &str, prompt: String, output_len: usize) -> Vec<u8> {
    let mut body = json!({
        "model": model,
        "stream": true,
        "stream_options": {"include_usage": true},
        "temperature": 0.0,
        "ignore_eos": true,
    });
    match endpoint {
        Endpoint::Completions => {
            body["prompt"] = json!(prompt);
            body["max_tokens"] = json!(output_len);
        }
        Endpoint::Chat => {
            body["messages"] = json!([{"role": "user", "content": prompt}]);
            body["max_completion_tokens"] = json!(output_len);
        }
    }
    body.to_string().into_bytes()
}

/// Arrival offsets from the start of the run: all zero without a rate, else the running
/// sum of exponential gaps of mean 1/rate (a Poisson process), seeded.
fn arrival_offsets(n: usize, rate: Option<f64>, seed: u64) -> Vec<Duration> {
    let Some(rate) = rate else { return vec![Duration::ZERO; n] };
    // Its own stream, so the prompts do not change with --request-rate.
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    rng.set_stream(1);
    let mut t = 0.0f64;
    (0..n)
        .map(|i| {
            if i > 0 {
                let u: f64 = rng.random(); // in [0, 1): 1 - u is never 0
                t += -(1.0 - u).ln() / rate;
            }
            Duration::from_secs_f64(t)
        })
        .collect()
}

struct Outcome {
    done: Vec<RequestTiming>,
    errors: usize,
    samples: Vec<String>,
    duration: Duration,
}

fn execute(
    client: &Client,
    endpoint: Endpoint,
    bodies: &[Vec<u8>],
    concurrency: usize,
    rate: Option<f64>,
    seed: u64,
) -> Outcome {
    let arrivals = arrival_offsets(bodies.len(), rate, seed);
    let (queue_tx, queue_rx) = mpsc::channel::<usize>();
    let queue_rx = Mutex::new(queue_rx);
    let (result_tx, result_rx) = mpsc::channel::<Result<RequestTiming, RequestError>>();
    let progress = indicatif::ProgressBar::new(bodies.len() as u64);
    let start = Instant::now();
    let mut outcome =
        Outcome { done: Vec::new(), errors: 0, samples: Vec::new(), duration: Duration::ZERO };
    std::thread::scope(|s| {
        for _ in 0..concurrency {
            let result_tx = result_tx.clone();
            let queue_rx = &queue_rx;
            s.spawn(move || loop {
                // The lock is held only while waiting for the next index.
                let next = queue_rx.lock().unwrap_or_else(|p| p.into_inner()).recv();
                let Ok(i) = next else { break };
                if result_tx.send(client.stream(endpoint, &bodies[i])).is_err() {
                    break;
                }
            });
        }
        drop(result_tx);
        s.spawn(move || {
            for (i, at) in arrivals.into_iter().enumerate() {
                if let Some(wait) = (start + at).checked_duration_since(Instant::now()) {
                    std::thread::sleep(wait);
                }
                if queue_tx.send(i).is_err() {
                    break;
                }
            }
        });
        for result in result_rx {
            progress.inc(1);
            match result {
                Ok(t) => outcome.done.push(t),
                Err(e) => {
                    outcome.errors += 1;
                    let msg = e.to_string();
                    if outcome.samples.len() < ERROR_SAMPLES && !outcome.samples.contains(&msg) {
                        outcome.samples.push(msg);
                    }
                }
            }
        }
    });
    outcome.duration = start.elapsed();
    progress.finish_and_clear();
    outcome
}

/// The human-readable report, laid out like vLLM's.
fn table(r: &Report, m: &stats::Metrics) -> String {
    use std::fmt::Write;
    let mut s = String::new();
    let row = |s: &mut String, k: &str, v: String| {
        let _ = writeln!(s, "{k:<40}{v:<10}");
    };
    let f = |x: Option<f64>| x.map_or("n/a".to_string(), |x| format!("{x:.2}"));
    let _ = writeln!(s, "{:=^50}", " Serving Benchmark Result ");
    row(&mut s, "Successful requests:", r.completed.to_string());
    row(&mut s, "Failed requests:", r.errors.to_string());
    row(&mut s, "Benchmark duration (s):", format!("{:.2}", r.duration_s));
    row(&mut s, "Total input tokens:", m.total_input_tokens.to_string());
    row(&mut s, "Total generated tokens:", m.total_output_tokens.to_string());
    row(&mut s, "Request throughput (req/s):", format!("{:.2}", r.request_throughput));
    row(&mut s, "Output token throughput (tok/s):", format!("{:.2}", r.output_throughput));
    row(&mut s, "Total token throughput (tok/s):", format!("{:.2}", r.total_token_throughput));
    for (title, short, sum) in [
        ("Time to First Token", "TTFT", &r.ttft_ms),
        ("Time per Output Token (excl. 1st token)", "TPOT", &r.tpot_ms),
        ("Inter-token Latency", "ITL", &r.itl_ms),
        ("End-to-end Latency", "E2EL", &r.e2el_ms),
    ] {
        let _ = writeln!(s, "{:-^50}", title);
        row(&mut s, &format!("Mean {short} (ms):"), f(sum.mean));
        row(&mut s, &format!("Median {short} (ms):"), f(sum.p50));
        row(&mut s, &format!("P90 {short} (ms):"), f(sum.p90));
        row(&mut s, &format!("P99 {short} (ms):"), f(sum.p99));
    }
    for e in &r.error_samples {
        let _ = writeln!(s, "error: {e}");
    }
    let _ = writeln!(s, "{}", "=".repeat(50));
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn poisson_arrivals_are_seeded_ordered_and_have_the_asked_rate() {
        assert_eq!(arrival_offsets(3, None, 0), vec![Duration::ZERO; 3]);
        let a = arrival_offsets(20_000, Some(50.0), 3);
        assert_eq!(a, arrival_offsets(20_000, Some(50.0), 3));
        assert_ne!(a, arrival_offsets(20_000, Some(50.0), 4));
        assert_eq!(a[0], Duration::ZERO);
        assert!(a.windows(2).all(|w| w[0] <= w[1]));
        // Mean gap 1/50 s = 20 ms; with 20k samples the standard error is 0.14 ms.
        let mean_gap = a[a.len() - 1].as_secs_f64() / (a.len() - 1) as f64;
        assert!((mean_gap - 0.02).abs() < 0.001, "mean gap {mean_gap}");
        // Exponential gaps: the fraction above the mean is e^-1 = 0.368.
        let above = a.windows(2).filter(|w| (w[1] - w[0]).as_secs_f64() > 0.02).count();
        let frac = above as f64 / (a.len() - 1) as f64;
        assert!((frac - (-1.0f64).exp()).abs() < 0.02, "fraction above mean {frac}");
    }

    #[test]
    fn request_bodies_ask_for_a_fixed_length_greedy_stream_with_usage() {
        let b: serde_json::Value =
            serde_json::from_slice(&request_body(Endpoint::Completions, "m", "hi".into(), 9))
                .unwrap();
        assert_eq!(b["prompt"], "hi");
        assert_eq!(b["max_tokens"], 9);
        assert_eq!((b["stream"].clone(), b["ignore_eos"].clone()), (json!(true), json!(true)));
        assert_eq!(b["stream_options"]["include_usage"], true);
        assert_eq!(b["temperature"], 0.0);
        let c: serde_json::Value =
            serde_json::from_slice(&request_body(Endpoint::Chat, "m", "hi".into(), 9)).unwrap();
        assert_eq!(c["messages"], json!([{"role": "user", "content": "hi"}]));
        assert_eq!(c["max_completion_tokens"], 9);
        assert_eq!(c["model"], "m");
    }
}
