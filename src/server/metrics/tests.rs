//! Tests for `metrics`: the rendered text is checked with a parser written from the
//! Prometheus text-format 0.0.4 rules, and buckets against vLLM's lists.

use super::*;
use std::collections::{BTreeMap, HashMap};

/// A sample: metric name, labels, value.
type Sample = (String, BTreeMap<String, String>, f64);

/// Parses exposition text by the 0.0.4 text-format rules (written from the format
/// spec, not from the crate): `# HELP`/`# TYPE` lines, one `# TYPE` per family
/// before its samples, sample names belonging to a declared family (histograms:
/// `_bucket` with `le`, `_sum`, `_count`), valid names, quoted and escaped labels.
/// Returns the samples and each family's type; panics on any violation.
fn parse(text: &str) -> (Vec<Sample>, HashMap<String, String>) {
    let is_name = |s: &str, colon: bool| {
        let mut chars = s.chars();
        let first_ok = |c: char| c.is_ascii_alphabetic() || c == '_' || (colon && c == ':');
        chars.next().is_some_and(first_ok) && chars.all(|c| first_ok(c) || c.is_ascii_digit())
    };
    let mut types: HashMap<String, String> = HashMap::new();
    let mut samples = Vec::new();
    assert!(text.ends_with('\n'), "text ends with a newline");
    for line in text.lines() {
        if line.is_empty() {
            continue;
        }
        if let Some(rest) = line.strip_prefix("# ") {
            let mut parts = rest.splitn(3, ' ');
            match parts.next() {
                Some("TYPE") => {
                    let name = parts.next().expect("TYPE name");
                    let ty = parts.next().expect("TYPE type");
                    assert!(is_name(name, true), "bad family name {name:?}");
                    assert!(
                        ["counter", "gauge", "histogram", "summary", "untyped"].contains(&ty),
                        "{line}"
                    );
                    assert!(
                        !samples.iter().any(|(n, _, _): &Sample| n.starts_with(name)),
                        "TYPE after samples: {line}"
                    );
                    assert!(types.insert(name.into(), ty.into()).is_none(), "dup {line}");
                }
                Some("HELP") => assert!(is_name(parts.next().expect("name"), true)),
                _ => {}
            }
            continue;
        }
        let (name_and_labels, value) = line.rsplit_once(' ').expect("name value");
        let value: f64 = match value {
            "+Inf" => f64::INFINITY,
            "-Inf" => f64::NEG_INFINITY,
            v => v.parse().unwrap_or_else(|_| panic!("bad value in {line:?}")),
        };
        let (name, labels) = match name_and_labels.split_once('{') {
            None => (name_and_labels, BTreeMap::new()),
            Some((name, rest)) => {
                let body = rest.strip_suffix('}').expect("closing brace");
                let mut labels = BTreeMap::new();
                let mut chars = body.chars().peekable();
                while chars.peek().is_some() {
                    let key: String = chars.by_ref().take_while(|&c| c != '=').collect();
                    assert!(is_name(&key, false), "bad label name {key:?} in {line}");
                    assert_eq!(chars.next(), Some('"'), "{line}");
                    let mut val = String::new();
                    loop {
                        match chars.next().expect("unterminated label value") {
                            '"' => break,
                            '\\' => match chars.next() {
                                Some('\\') => val.push('\\'),
                                Some('"') => val.push('"'),
                                Some('n') => val.push('\n'),
                                other => panic!("bad escape {other:?} in {line}"),
                            },
                            c => val.push(c),
                        }
                    }
                    if chars.peek() == Some(&',') {
                        chars.next();
                    }
                    assert!(labels.insert(key, val).is_none(), "dup label {line}");
                }
                (name, labels)
            }
        };
        assert!(is_name(name, true), "bad metric name {name:?}");
        let family = ["_bucket", "_sum", "_count"]
            .iter()
            .filter_map(|suffix| name.strip_suffix(suffix))
            .find(|base| types.get(*base).map(String::as_str) == Some("histogram"))
            .unwrap_or(name);
        let ty = types.get(family).unwrap_or_else(|| panic!("{name} has no TYPE"));
        if ty == "histogram" {
            assert_ne!(family, name, "histogram sample without suffix: {line}");
            assert_eq!(name.ends_with("_bucket"), labels.contains_key("le"), "{line}");
        }
        samples.push((name.to_string(), labels, value));
    }
    (samples, types)
}

fn value(samples: &[Sample], name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let want: BTreeMap<String, String> =
        labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
    samples.iter().find(|(n, l, _)| n == name && *l == want).map(|s| s.2)
}

/// `(le, cumulative count)` of a histogram, in output order.
fn buckets(samples: &[Sample], family: &str) -> Vec<(f64, f64)> {
    let name = format!("{family}_bucket");
    samples
        .iter()
        .filter(|(n, _, _)| *n == name)
        .map(|(_, l, v)| {
            let le = &l["le"];
            let le = if le == "+Inf" { f64::INFINITY } else { le.parse().expect("le") };
            (le, *v)
        })
        .collect()
}

fn stats(queries: u64, hits: u64, preemptions: u64) -> EngineStats {
    EngineStats {
        running: 3,
        waiting: 2,
        num_blocks: 200,
        free_blocks: 150,
        prefix_cache_queries: queries,
        prefix_cache_hits: hits,
        preemptions,
    }
}

#[test]
fn every_family_is_declared_with_the_right_type() {
    let m = Metrics::new();
    m.http_request("/v1/chat/completions", 200);
    let (_, types) = parse(&m.render(&EngineStats::default()));
    let expected = [
        ("qilin:num_requests_running", "gauge"),
        ("qilin:num_requests_waiting", "gauge"),
        ("qilin:kv_cache_usage_perc", "gauge"),
        ("qilin:prefix_cache_queries_total", "counter"),
        ("qilin:prefix_cache_hits_total", "counter"),
        ("qilin:num_preemptions_total", "counter"),
        ("qilin:prompt_tokens_total", "counter"),
        ("qilin:generation_tokens_total", "counter"),
        ("qilin:request_success_total", "counter"),
        ("qilin:http_requests_total", "counter"),
        ("qilin:time_to_first_token_seconds", "histogram"),
        ("qilin:inter_token_latency_seconds", "histogram"),
        ("qilin:e2e_request_latency_seconds", "histogram"),
        ("qilin:request_queue_time_seconds", "histogram"),
    ];
    let expected: HashMap<String, String> =
        expected.iter().map(|(n, t)| (n.to_string(), t.to_string())).collect();
    assert_eq!(types, expected);
}

#[test]
fn gauges_come_from_the_engine_snapshot() {
    let m = Metrics::new();
    let (s, _) = parse(&m.render(&stats(0, 0, 0)));
    assert_eq!(value(&s, "qilin:num_requests_running", &[]), Some(3.0));
    assert_eq!(value(&s, "qilin:num_requests_waiting", &[]), Some(2.0));
    assert_eq!(value(&s, "qilin:kv_cache_usage_perc", &[]), Some(0.25));
    // No cache at all: 0, not NaN.
    let (s, _) = parse(&m.render(&EngineStats::default()));
    assert_eq!(value(&s, "qilin:kv_cache_usage_perc", &[]), Some(0.0));
    assert_eq!(value(&s, "qilin:num_requests_running", &[]), Some(0.0));
}

#[test]
fn engine_counters_advance_by_deltas_across_renders() {
    let m = Metrics::new();
    let get = |text: &str, name: &str| value(&parse(text).0, name, &[]).expect(name);
    let t = m.render(&stats(100, 40, 1));
    assert_eq!(get(&t, "qilin:prefix_cache_queries_total"), 100.0);
    assert_eq!(get(&t, "qilin:prefix_cache_hits_total"), 40.0);
    assert_eq!(get(&t, "qilin:num_preemptions_total"), 1.0);
    // The same totals again: no change (a naive inc_by(total) would double).
    let t = m.render(&stats(100, 40, 1));
    assert_eq!(get(&t, "qilin:prefix_cache_queries_total"), 100.0);
    assert_eq!(get(&t, "qilin:num_preemptions_total"), 1.0);
    let t = m.render(&stats(250, 90, 4));
    assert_eq!(get(&t, "qilin:prefix_cache_queries_total"), 250.0);
    assert_eq!(get(&t, "qilin:prefix_cache_hits_total"), 90.0);
    assert_eq!(get(&t, "qilin:num_preemptions_total"), 4.0);
    // An older snapshot rendered late (two scrapes racing) changes nothing, and
    // growth after it is counted from the largest total seen, not twice.
    let t = m.render(&stats(200, 30, 2));
    assert_eq!(get(&t, "qilin:prefix_cache_queries_total"), 250.0);
    assert_eq!(get(&t, "qilin:num_preemptions_total"), 4.0);
    let t = m.render(&stats(260, 90, 4));
    assert_eq!(get(&t, "qilin:prefix_cache_queries_total"), 260.0);
}

#[test]
fn concurrent_renders_add_each_delta_once() {
    let m = std::sync::Arc::new(Metrics::new());
    let threads: Vec<_> = (0..4)
        .map(|_| {
            let m = m.clone();
            std::thread::spawn(move || {
                for total in 0..=500u64 {
                    m.render(&stats(total, 0, 0));
                }
            })
        })
        .collect();
    for t in threads {
        t.join().expect("render thread");
    }
    // Threads race, so totals arrive out of order; the counter still ends at
    // exactly the largest total, each unit counted once.
    let (s, _) = parse(&m.render(&stats(500, 0, 0)));
    let v = value(&s, "qilin:prefix_cache_queries_total", &[]).expect("counter");
    assert_eq!(v, 500.0);
}

#[test]
fn request_counters_and_labels() {
    let m = Metrics::new();
    m.http_request("/v1/chat/completions", 200);
    m.http_request("/v1/chat/completions", 200);
    m.http_request("other", 404);
    m.request_finished(
        Duration::from_millis(1500),
        Some(Duration::from_millis(20)),
        12,
        30,
        "stop",
    );
    m.request_finished(Duration::from_secs(3), None, 8, 16, "length");
    let (s, _) = parse(&m.render(&EngineStats::default()));
    let http = "qilin:http_requests_total";
    assert_eq!(value(&s, http, &[("route", "/v1/chat/completions"), ("status", "200")]), Some(2.0));
    assert_eq!(value(&s, http, &[("route", "other"), ("status", "404")]), Some(1.0));
    assert_eq!(value(&s, "qilin:prompt_tokens_total", &[]), Some(20.0));
    assert_eq!(value(&s, "qilin:generation_tokens_total", &[]), Some(46.0));
    let ok = "qilin:request_success_total";
    assert_eq!(value(&s, ok, &[("finish_reason", "stop")]), Some(1.0));
    assert_eq!(value(&s, ok, &[("finish_reason", "length")]), Some(1.0));
    // Pre-created at zero, like vLLM.
    assert_eq!(value(&s, ok, &[("finish_reason", "abort")]), Some(0.0));
    assert_eq!(value(&s, ok, &[("finish_reason", "timeout")]), Some(0.0));
    // e2e observed twice; queue time only once (None is not an observation).
    assert_eq!(value(&s, "qilin:e2e_request_latency_seconds_count", &[]), Some(2.0));
    assert_eq!(value(&s, "qilin:e2e_request_latency_seconds_sum", &[]), Some(4.5));
    assert_eq!(value(&s, "qilin:request_queue_time_seconds_count", &[]), Some(1.0));
}

#[test]
fn label_values_are_escaped() {
    let m = Metrics::new();
    m.http_request("a\"b\\c\nd", 500);
    let (s, _) = parse(&m.render(&EngineStats::default()));
    let labels = [("route", "a\"b\\c\nd"), ("status", "500")];
    assert_eq!(value(&s, "qilin:http_requests_total", &labels), Some(1.0));
}

#[test]
fn histograms_are_cumulative_with_vllm_buckets() {
    let m = Metrics::new();
    m.time_to_first_token(Duration::from_millis(30)); // le 0.04
    m.time_to_first_token(Duration::from_millis(30));
    m.time_to_first_token(Duration::from_secs(5000)); // only +Inf
    for ms in [5, 12, 120] {
        m.inter_token_latency(Duration::from_millis(ms));
    }
    let (s, _) = parse(&m.render(&EngineStats::default()));

    // vLLM's lists, written out as vLLM's source has them.
    let vllm_ttft = "0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, \
        0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0";
    let vllm_itl = "0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, \
        1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0";
    let vllm_request = "0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, \
        30.0, 40.0, 50.0, 60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0";
    let list = |s: &str| -> Vec<f64> {
        let mut v: Vec<f64> = s.split(',').map(|x| x.trim().parse().expect("f64")).collect();
        v.push(f64::INFINITY);
        v
    };
    for (family, want) in [
        ("qilin:time_to_first_token_seconds", list(vllm_ttft)),
        ("qilin:inter_token_latency_seconds", list(vllm_itl)),
        ("qilin:e2e_request_latency_seconds", list(vllm_request)),
        ("qilin:request_queue_time_seconds", list(vllm_request)),
    ] {
        let got = buckets(&s, family);
        let les: Vec<f64> = got.iter().map(|b| b.0).collect();
        assert_eq!(les, want, "{family}");
        assert!(got.windows(2).all(|w| w[0].1 <= w[1].1), "{family} not cumulative");
        let count = value(&s, &format!("{family}_count"), &[]).expect("count");
        assert_eq!(got.last().map(|b| b.1), Some(count), "{family} +Inf == count");
        assert!(value(&s, &format!("{family}_sum"), &[]).is_some());
    }

    let ttft = buckets(&s, "qilin:time_to_first_token_seconds");
    let at = |b: &[(f64, f64)], le: f64| b.iter().find(|x| x.0 == le).expect("bucket").1;
    assert_eq!(at(&ttft, 0.02), 0.0);
    assert_eq!(at(&ttft, 0.04), 2.0);
    assert_eq!(at(&ttft, 2560.0), 2.0);
    assert_eq!(at(&ttft, f64::INFINITY), 3.0);
    let itl = buckets(&s, "qilin:inter_token_latency_seconds");
    assert_eq!(at(&itl, 0.01), 1.0);
    assert_eq!(at(&itl, 0.025), 2.0);
    assert_eq!(at(&itl, 0.15), 3.0);
    let sum = value(&s, "qilin:inter_token_latency_seconds_sum", &[]).expect("sum");
    assert!((sum - 0.137).abs() < 1e-9, "{sum}");
}

#[test]
fn bucket_constants_are_sorted_and_distinct() {
    for b in [&TTFT_BUCKETS[..], &ITL_BUCKETS[..], &REQUEST_LATENCY_BUCKETS[..]] {
        assert!(b.windows(2).all(|w| w[0] < w[1]));
    }
}

#[test]
fn metrics_are_shareable_across_threads() {
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<Metrics>();
}
