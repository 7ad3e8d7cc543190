//! `qilin bench serve` against a real `qilin serve` process on the tiny fixture model:
//! the report's counts must agree with what the server itself counted (/metrics), and
//! failures must end the run with a clear message and a non-zero exit.

mod common;

use std::process::{Command, Output};

use common::server::Server;
use serde_json::Value;

fn bench(url: &str, key: &str, extra: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_qilin"))
        .args(["bench", "serve", "--url", url])
        .args(extra)
        .env("QILIN_API_KEY", key)
        .output()
        .expect("running qilin bench serve")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// The report: the last line of stdout, one JSON object.
fn report(out: &Output) -> Value {
    let stdout = text(&out.stdout);
    let last = stdout.lines().last().unwrap_or_default();
    serde_json::from_str(last)
        .unwrap_or_else(|e| panic!("last stdout line is not JSON ({e}):\n{stdout}"))
}

#[test]
fn reports_every_request_and_agrees_with_the_server_counts() {
    let server = Server::start(&common::a_fixture_model(), &[]);
    let json_path = server.dir.path().join("report.json");
    let out = bench(
        &server.base_url,
        &server.api_key,
        &[
            "--concurrency",
            "4",
            "--num-prompts",
            "12",
            "--input-len",
            "16",
            "--output-len",
            "8",
            "--json",
            json_path.to_str().unwrap(),
        ],
    );
    assert!(out.status.success(), "bench failed:\n{}\n{}", text(&out.stdout), text(&out.stderr));
    let r = report(&out);
    let file: Value = serde_json::from_str(&std::fs::read_to_string(&json_path).unwrap()).unwrap();
    assert_eq!(file, r, "--json file and the stdout line differ");

    assert_eq!(r["completed"], 12, "{r}");
    assert_eq!(r["errors"], 0, "{r}");
    assert_eq!(r["error_samples"], serde_json::json!([]));
    assert_eq!(r["num_prompts"], 12);
    assert_eq!(r["concurrency"], 4);
    assert_eq!(r["endpoint"], "completions");
    assert_eq!(r["mean_output_tokens"].as_f64(), Some(8.0), "{r}");
    for metric in ["ttft_ms", "tpot_ms", "itl_ms", "e2el_ms"] {
        let get =
            |k: &str| r[metric][k].as_f64().unwrap_or_else(|| panic!("{metric}.{k} missing: {r}"));
        let (mean, p50, p90, p99) = (get("mean"), get("p50"), get("p90"), get("p99"));
        assert!(mean > 0.0 && p50 > 0.0, "{metric}: {r}");
        assert!(p50 <= p90 && p90 <= p99, "{metric} percentiles out of order: {r}");
    }
    // A request's end comes after its first token.
    assert!(r["e2el_ms"]["p50"].as_f64() >= r["ttft_ms"]["p50"].as_f64(), "{r}");

    // The model is the one the server lists (no --model given).
    let models = server.raw(
        format!(
            "GET /v1/models HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {}\r\nConnection: close\r\n\r\n",
            server.api_key
        )
        .as_bytes(),
    );
    let model = r["model"].as_str().unwrap();
    assert!(models.contains(&format!("\"id\":\"{model}\"")), "{model} not in {models}");

    // The server's own counters: exactly these 12 requests of 8 tokens, and the prompt
    // tokens the report averaged.
    let generated = server.metric("qilin:generation_tokens_total").unwrap();
    assert_eq!(generated, 96.0);
    let prompt = server.metric("qilin:prompt_tokens_total").unwrap();
    let mean_in = r["mean_input_tokens"].as_f64().unwrap();
    assert!((prompt - mean_in * 12.0).abs() < 1e-6, "server {prompt} vs report {mean_in} x 12");
    let by_length = server.metric("qilin:request_success_total{finish_reason=\"length\"}");
    assert_eq!(by_length, Some(12.0));
}

#[test]
fn failures_exit_non_zero_with_a_clear_message() {
    let server = Server::start(&common::a_fixture_model(), &[]);
    let small = ["--num-prompts", "3", "--input-len", "4", "--output-len", "2"];

    let out = bench(&server.base_url, "qk-wrong", &small);
    assert!(!out.status.success());
    let err = text(&out.stderr);
    assert!(err.contains("refused the API key (HTTP 401"), "{err}");

    // Every request refused (unknown model): a report with the server's error, exit 1.
    let mut args = small.to_vec();
    args.extend(["--model", "no-such-model"]);
    let out = bench(&server.base_url, &server.api_key, &args);
    assert!(!out.status.success());
    let r = report(&out);
    assert_eq!((r["completed"].clone(), r["errors"].clone()), (0.into(), 3.into()), "{r}");
    let sample = r["error_samples"][0].as_str().unwrap_or_default();
    assert!(sample.starts_with("HTTP 404"), "{r}");
    assert!(text(&out.stderr).contains("every request failed"), "{}", text(&out.stderr));

    // Nobody listening: one error up front, no report.
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let url = format!("http://127.0.0.1:{port}");
    let out = bench(&url, "k", &small);
    assert!(!out.status.success());
    assert!(text(&out.stdout).is_empty(), "{}", text(&out.stdout));
    let err = text(&out.stderr);
    assert!(err.contains(&format!("cannot reach {url}: connection refused")), "{err}");

    let out = bench("https://127.0.0.1:8443", "k", &small);
    assert!(!out.status.success());
    assert!(text(&out.stderr).contains("https is not supported"), "{}", text(&out.stderr));
}
