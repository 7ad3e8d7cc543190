//! `qilin serve` routes and wire format over real sockets, checked against OpenAI's
//! documented shapes and against the server's own independent answers (/tokenize for
//! usage, the non-streaming text for the stream, the metrics for the usage).

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use common::server::{parse_raw, sse_data, Reply, Server};
use serde_json::{json, Value};

const NAME: &str = "qilin-test";

fn fixture_server() -> Server {
    Server::start(
        &common::a_fixture_model(),
        &["--served-model-name", NAME, "--served-model-name", "alias", "--max-model-len", "256"],
    )
}

/// The JSON events of an SSE reply, after checking the stream headers and `[DONE]`.
fn stream_events(r: &Reply) -> Vec<Value> {
    assert_eq!(r.status, 200, "{r:?}");
    let ct = r.header("content-type").unwrap_or_default();
    assert!(ct.starts_with("text/event-stream"), "content-type {ct:?}");
    assert!(r.header("cache-control").unwrap_or_default().contains("no-cache"), "{r:?}");
    assert_eq!(r.header("x-accel-buffering"), Some("no"), "{r:?}");
    assert!(r.header("x-request-id").is_some_and(|v| !v.is_empty()), "{r:?}");
    assert!(
        r.body.trim_end().ends_with("data: [DONE]"),
        "stream must end with [DONE]: {:?}",
        r.body
    );
    let data = sse_data(&r.body);
    assert_eq!(data.iter().filter(|d| *d == "[DONE]").count(), 1);
    data[..data.len() - 1]
        .iter()
        .map(|d| serde_json::from_str(d).unwrap_or_else(|e| panic!("event {d:?}: {e}")))
        .collect()
}

fn request_id(r: &Reply) -> String {
    let id = r.header("x-request-id").unwrap_or_else(|| panic!("no X-Request-Id: {r:?}"));
    assert!(id.len() >= 16 && id.chars().all(|c| c.is_ascii_alphanumeric() || c == '-'), "{id:?}");
    id.to_string()
}

fn token_count(s: &Server, body: Value) -> u64 {
    let r = s.post("/tokenize", &body);
    assert_eq!(r.status, 200, "{r:?}");
    r.json()["count"].as_u64().unwrap()
}

fn check_usage(usage: &Value, prompt_tokens: u64, completion_tokens: u64) {
    assert_eq!(usage["prompt_tokens"], prompt_tokens, "{usage}");
    assert_eq!(usage["completion_tokens"], completion_tokens, "{usage}");
    assert_eq!(usage["total_tokens"], prompt_tokens + completion_tokens, "{usage}");
}

#[test]
fn models_route_names_and_wrong_model() {
    let s = fixture_server();
    let r = s.get("/v1/models");
    assert_eq!(r.status, 200, "{r:?}");
    assert!(r.header("content-type").unwrap_or_default().starts_with("application/json"));
    request_id(&r);
    let v = r.json();
    assert_eq!(v["object"], "list");
    let data = v["data"].as_array().expect("data array");
    assert_eq!(data[0]["id"], NAME, "{v}");
    assert_eq!(data[0]["object"], "model");
    assert!(data[0]["created"].is_u64() && data[0]["owned_by"].is_string(), "{v}");
    let model_dir = common::a_fixture_model().display().to_string();
    assert!(!r.body.contains(&model_dir), "the model path leaks: {}", r.body);

    // Any served name is accepted; anything else is OpenAI's 404.
    let ok = s.post("/v1/completions", &json!({"model": "alias", "prompt": "hi", "max_tokens": 1}));
    assert_eq!(ok.status, 200, "{ok:?}");
    for path in ["/v1/completions", "/v1/chat/completions"] {
        let body = json!({"model": "gpt-4o", "prompt": "hi", "max_tokens": 1,
            "messages": [{"role": "user", "content": "hi"}]});
        let err = s.post(path, &body).expect_error(404);
        assert_eq!(err["code"], "model_not_found", "{err}");
        assert_eq!(err["param"], "model", "{err}");
        assert!(!err["message"].as_str().unwrap().contains(&model_dir));
    }
}

#[test]
fn chat_completion_stream_matches_non_stream() {
    let s = fixture_server();
    let messages = json!([
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Say something."}
    ]);
    let req = json!({"model": NAME, "messages": messages, "max_tokens": 12,
        "temperature": 0, "ignore_eos": true, "user": "someone", "some_future_field": {"x": 1}});
    let r = s.post("/v1/chat/completions", &req);
    assert_eq!(r.status, 200, "{r:?}");
    assert!(r.header("content-type").unwrap_or_default().starts_with("application/json"));
    let id1 = request_id(&r);
    let v = r.json();
    assert_eq!(v["object"], "chat.completion", "{v}");
    assert!(v["id"].as_str().is_some_and(|id| !id.is_empty()), "{v}");
    let now = chrono::Utc::now().timestamp();
    assert!(v["created"].as_i64().is_some_and(|t| (t - now).abs() < 3600), "{v}");
    assert_eq!(v["model"], NAME);
    let choices = v["choices"].as_array().unwrap();
    assert_eq!(choices.len(), 1, "{v}");
    assert_eq!(choices[0]["index"], 0);
    assert_eq!(choices[0]["message"]["role"], "assistant");
    assert_eq!(choices[0]["finish_reason"], "length");
    let text = choices[0]["message"]["content"].as_str().expect("content string").to_string();
    let prompt_tokens = token_count(&s, json!({"model": NAME, "messages": messages}));
    check_usage(&v["usage"], prompt_tokens, 12);

    let mut sreq = req.clone();
    sreq["stream"] = json!(true);
    sreq["stream_options"] = json!({"include_usage": true});
    let sr = s.post("/v1/chat/completions", &sreq);
    let events = stream_events(&sr);
    assert_ne!(request_id(&sr), id1, "X-Request-Id must be fresh per request");
    let (last, chunks) = events.split_last().expect("events");
    // include_usage: a last chunk with no choices carries the usage; the others carry none.
    assert_eq!(last["choices"], json!([]), "{last}");
    check_usage(&last["usage"], prompt_tokens, 12);
    let chat_id = &chunks[0]["id"];
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant", "{}", chunks[0]);
    let mut streamed = String::new();
    let mut finish = Vec::new();
    for c in chunks {
        assert_eq!(c["object"], "chat.completion.chunk", "{c}");
        assert_eq!(&c["id"], chat_id, "{c}");
        assert_eq!(c["model"], NAME);
        assert!(c["usage"].is_null(), "usage only in the last chunk: {c}");
        let choice = &c["choices"][0];
        assert_eq!(choice["index"], 0, "{c}");
        streamed.push_str(choice["delta"]["content"].as_str().unwrap_or(""));
        if !choice["finish_reason"].is_null() {
            finish.push(choice["finish_reason"].clone());
        }
    }
    assert_eq!(finish, vec![json!("length")], "one finishing chunk");
    assert!(chunks.last().unwrap()["choices"][0]["finish_reason"] == "length");
    assert_eq!(streamed, text, "streamed deltas must concatenate to the non-streaming text");

    // Without stream_options no chunk carries usage.
    sreq.as_object_mut().unwrap().remove("stream_options");
    let plain = stream_events(&s.post("/v1/chat/completions", &sreq));
    assert!(plain.iter().all(|c| c["usage"].is_null()), "{plain:?}");

    // Text-part arrays, the developer role and max_completion_tokens.
    let parts = json!({"model": NAME, "max_completion_tokens": 5, "temperature": 0, "ignore_eos": true,
        "messages": [{"role": "developer", "content": "You are terse."},
                     {"role": "user", "content": [{"type": "text", "text": "Say something."}]}]});
    let pv = s.post("/v1/chat/completions", &parts);
    assert_eq!(pv.status, 200, "{pv:?}");
    assert_eq!(pv.json()["usage"]["completion_tokens"], 5, "{pv:?}");
}

#[test]
fn completion_stream_echo_and_token_prompt() {
    let s = fixture_server();
    let prompt = "The quick brown fox";
    let req = json!({"model": NAME, "prompt": prompt, "max_tokens": 10, "temperature": 0, "ignore_eos": true});
    let r = s.post("/v1/completions", &req);
    assert_eq!(r.status, 200, "{r:?}");
    let v = r.json();
    assert_eq!(v["object"], "text_completion", "{v}");
    assert_eq!(v["model"], NAME);
    let choice = &v["choices"][0];
    assert_eq!(choice["index"], 0);
    assert_eq!(choice["finish_reason"], "length");
    assert!(choice["logprobs"].is_null(), "{v}");
    let text = choice["text"].as_str().unwrap().to_string();
    let tok = s.post("/tokenize", &json!({"model": NAME, "prompt": prompt})).json();
    check_usage(&v["usage"], tok["count"].as_u64().unwrap(), 10);

    let mut sreq = req.clone();
    sreq["stream"] = json!(true);
    sreq["stream_options"] = json!({"include_usage": true});
    let events = stream_events(&s.post("/v1/completions", &sreq));
    let (last, chunks) = events.split_last().unwrap();
    check_usage(&last["usage"], tok["count"].as_u64().unwrap(), 10);
    let streamed: String =
        chunks.iter().map(|c| c["choices"][0]["text"].as_str().unwrap_or("")).collect();
    assert!(chunks.iter().all(|c| c["object"] == "text_completion"), "{chunks:?}");
    assert_eq!(chunks.last().unwrap()["choices"][0]["finish_reason"], "length");
    assert_eq!(streamed, text);

    // The same prompt as token ids gives the same greedy text.
    let ids = json!({"model": NAME, "prompt": tok["tokens"], "max_tokens": 10, "temperature": 0, "ignore_eos": true});
    let by_ids = s.post("/v1/completions", &ids);
    assert_eq!(by_ids.status, 200, "{by_ids:?}");
    assert_eq!(by_ids.json()["choices"][0]["text"], text.as_str());

    let mut echo = req.clone();
    echo["echo"] = json!(true);
    let e = s.post("/v1/completions", &echo).json();
    assert_eq!(e["choices"][0]["text"], format!("{prompt}{text}"), "{e}");

    // /generate (vLLM legacy) returns prompt + completion.
    let g = s.post(
        "/generate",
        &json!({"prompt": prompt, "max_tokens": 10, "temperature": 0, "ignore_eos": true}),
    );
    assert_eq!(g.status, 200, "{g:?}");
    assert_eq!(g.json()["text"], json!([format!("{prompt}{text}")]), "{g:?}");
}

#[test]
fn logprobs_and_seeds() {
    let s = fixture_server();
    let chat = json!({"model": NAME, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 6,
        "temperature": 0, "ignore_eos": true, "logprobs": true, "top_logprobs": 3});
    let v = s.post("/v1/chat/completions", &chat).json();
    let content =
        v["choices"][0]["logprobs"]["content"].as_array().unwrap_or_else(|| panic!("{v}"));
    assert_eq!(content.len(), 6, "{v}");
    for step in content {
        let lp = step["logprob"].as_f64().unwrap();
        assert!(step["token"].is_string() && lp <= 1e-6, "{step}");
        let top = step["top_logprobs"].as_array().unwrap();
        assert_eq!(top.len(), 3, "{step}");
        // Greedy: the chosen token is the most likely one.
        let best = top.iter().map(|t| t["logprob"].as_f64().unwrap()).fold(f64::MIN, f64::max);
        assert!((lp - best).abs() < 1e-3, "{step}");
    }

    let comp = json!({"model": NAME, "prompt": "Hi", "max_tokens": 4, "temperature": 0, "ignore_eos": true, "logprobs": 2});
    let c = s.post("/v1/completions", &comp).json();
    let lp = &c["choices"][0]["logprobs"];
    assert_eq!(lp["tokens"].as_array().map(Vec::len), Some(4), "{c}");
    assert_eq!(lp["token_logprobs"].as_array().map(Vec::len), Some(4), "{c}");
    assert_eq!(lp["top_logprobs"].as_array().map(Vec::len), Some(4), "{c}");

    let sampled = |seed: u64| {
        let body = json!({"model": NAME, "prompt": "Once", "max_tokens": 16, "temperature": 1.0,
            "top_p": 0.95, "top_k": 50, "min_p": 0.0, "presence_penalty": 0.5,
            "frequency_penalty": 0.5, "repetition_penalty": 1.1, "seed": seed, "ignore_eos": true});
        let r = s.post("/v1/completions", &body);
        assert_eq!(r.status, 200, "{r:?}");
        r.json()["choices"][0]["text"].as_str().unwrap().to_string()
    };
    assert_eq!(sampled(7), sampled(7), "the same seed must give the same text");
    assert_ne!(sampled(7), sampled(8), "different seeds should sample differently");
}

#[test]
fn tokenize_detokenize_roundtrip() {
    let s = fixture_server();
    for text in ["Hello, world! qilin 123", "héllo wörld ✓ 你好 🚀", "  spaces\tand\nnewlines  "]
    {
        let t = s.post("/tokenize", &json!({"prompt": text}));
        assert_eq!(t.status, 200, "{t:?}");
        let v = t.json();
        let tokens = v["tokens"].as_array().unwrap_or_else(|| panic!("{v}"));
        assert!(!tokens.is_empty());
        assert_eq!(v["count"], tokens.len(), "{v}");
        assert_eq!(v["max_model_len"], 256, "{v}");
        let d = s.post("/detokenize", &json!({"tokens": tokens}));
        assert_eq!(d.status, 200, "{d:?}");
        assert_eq!(d.json()["prompt"], text, "detokenize(tokenize(x)) == x");
    }
    let msgs = json!({"messages": [{"role": "user", "content": "Hello"}]});
    assert!(
        token_count(&s, msgs) > token_count(&s, json!({"prompt": "Hello"})),
        "the template adds tokens"
    );
}

#[test]
fn real_answers_on_smollm2() {
    let s = Server::start(&common::smollm2_gguf(), &[]);
    let model = s.get("/v1/models").json()["data"][0]["id"].clone();
    let q = "What is the capital of France?";
    let chat = json!({"model": model, "messages": [{"role": "user", "content": q}], "max_tokens": 30, "temperature": 0});
    let v = s.post("/v1/chat/completions", &chat).json();
    assert_eq!(v["choices"][0]["message"]["content"], "The capital of France is Paris.", "{v}");
    assert_eq!(v["choices"][0]["finish_reason"], "stop");

    let mut stop = chat.clone();
    stop["stop"] = json!(["Paris"]);
    let sv = s.post("/v1/chat/completions", &stop).json();
    assert_eq!(sv["choices"][0]["message"]["content"], "The capital of France is ", "{sv}");
    assert_eq!(sv["choices"][0]["finish_reason"], "stop");

    let a = s.post("/api/chat", &json!({"message": q, "max_tokens": 30, "temperature": 0}));
    assert_eq!(a.status, 200, "{a:?}");
    assert!(a.json()["response"].as_str().is_some_and(|t| t.contains("Paris")), "{a:?}");
    // Each token is flushed as it is produced: the events arrive in many reads, not one.
    let body =
        json!({"model": model, "prompt": "Once upon a time", "max_tokens": 40, "ignore_eos": true,
        "temperature": 0, "stream": true})
        .to_string();
    let mut c = TcpStream::connect(s.addr).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(120))).unwrap();
    let req = format!(
        "POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {}\r\nContent-Length: {}\r\n\
         Connection: close\r\n\r\n{body}",
        s.api_key,
        body.len()
    );
    c.write_all(req.as_bytes()).unwrap();
    let (mut reads_with_events, mut buf, mut all) = (0, [0u8; 65536], Vec::new());
    loop {
        let n = c.read(&mut buf).unwrap();
        if n == 0 {
            break;
        }
        reads_with_events += usize::from(buf[..n].windows(5).any(|w| w == b"data:"));
        all.extend_from_slice(&buf[..n]);
    }
    let events = String::from_utf8_lossy(&all).matches("data:").count();
    assert!(events >= 41, "{events} events");
    assert!(
        reads_with_events >= 20,
        "SSE events are batched: {events} events came in {reads_with_events} reads"
    );
    // Defaults (max_tokens 1024, temperature 0.7) give some answer.
    let d = s.post("/api/chat", &json!({"message": "Say hello."}));
    assert!(d.json()["response"].is_string(), "{d:?}");
}

#[test]
fn health_and_metrics() {
    let s = fixture_server();
    let h = s.call("GET", "/health", None, None);
    assert_eq!(h.status, 200, "{h:?}");
    assert_eq!(h.json(), json!({"status": "ok"}));
    request_id(&h);

    let before = s.metrics_text();
    let v = s.post("/v1/completions", &json!({"model": NAME, "prompt": "Count", "max_tokens": 7, "temperature": 0, "ignore_eos": true}));
    assert_eq!(v.status, 200, "{v:?}");
    let usage = v.json()["usage"].clone();
    let m = s.get("/metrics");
    assert_eq!(m.status, 200);
    assert!(
        m.header("content-type").unwrap_or_default().starts_with("text/plain; version=0.0.4"),
        "{m:?}"
    );
    let after = m.body;
    let delta = |sample: &str| {
        common::server::metric_value(&after, sample)
            .unwrap_or_else(|| panic!("{sample} missing:\n{after}"))
            - common::server::metric_value(&before, sample).unwrap_or(0.0)
    };
    assert_eq!(delta("qilin:prompt_tokens_total"), usage["prompt_tokens"].as_f64().unwrap());
    assert_eq!(delta("qilin:generation_tokens_total"), 7.0);
    assert_eq!(delta("qilin:request_success_total{finish_reason=\"length\"}"), 1.0);
    assert_eq!(delta("qilin:e2e_request_latency_seconds_count"), 1.0);
    assert_eq!(delta("qilin:time_to_first_token_seconds_count"), 1.0);
    assert_eq!(delta("qilin:request_queue_time_seconds_count"), 1.0);
    assert_eq!(delta("qilin:inter_token_latency_seconds_count"), 6.0);
    assert_eq!(delta("qilin:http_requests_total{route=\"/v1/completions\",status=\"200\"}"), 1.0);
    assert!(delta("qilin:prefix_cache_queries_total") >= 0.0);
    for (name, kind) in [
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
    ] {
        assert!(
            after.contains(&format!("# TYPE {name} {kind}\n")),
            "no `# TYPE {name} {kind}`:\n{after}"
        );
    }
    assert!(after.contains("qilin:time_to_first_token_seconds_bucket{le=\"+Inf\"}"));
    let buckets =
        after.lines().filter(|l| l.starts_with("qilin:time_to_first_token_seconds_bucket")).count();
    assert!(buckets >= 10, "vLLM-like buckets, got {buckets}");
    // Idle again: nothing running, no KV block held. The gauges come from the engine's
    // stats snapshot, published after the step that finished the request, so the reply
    // can reach us a moment before they drop: wait for them (a stuck gauge still fails).
    for gauge in
        ["qilin:num_requests_running", "qilin:num_requests_waiting", "qilin:kv_cache_usage_perc"]
    {
        s.wait_metric(gauge, Duration::from_secs(10), |v| v == 0.0);
    }
}

/// Consecutive sized responses on one connection.
fn split_responses(mut rest: &str) -> Vec<Reply> {
    let mut out = Vec::new();
    while let Some(r) = parse_raw(rest) {
        let len: usize =
            r.header("content-length").and_then(|v| v.parse().ok()).expect("sized responses");
        let head = rest.find("\r\n\r\n").unwrap() + 4;
        rest = rest.get(head + len..).unwrap_or("");
        out.push(r);
    }
    out
}

#[test]
fn http_semantics_keepalive_http10_chunked_405() {
    let s = fixture_server();
    let key = &s.api_key;
    // Three pipelined requests on one connection, answered in order.
    let pipelined = format!(
        "GET /health HTTP/1.1\r\nHost: x\r\n\r\nGET /v1/models HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {key}\r\n\r\n\
         GET /health?probe=1 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    );
    let out = s.raw(pipelined.as_bytes());
    let replies = split_responses(&out);
    assert_eq!(replies.len(), 3, "{out}");
    assert!(replies.iter().all(|r| r.status == 200), "{out}");
    let ids: std::collections::HashSet<_> = replies.iter().map(request_id).collect();
    assert_eq!(ids.len(), 3, "fresh request ids: {out}");
    assert_eq!(replies[0].json(), json!({"status": "ok"}));
    assert_eq!(replies[1].json()["object"], "list", "in order: {out}");

    // HTTP/1.0 without Host: answered, then the connection is closed.
    let small = r#"{"prompt":"abc"}"#;
    for req in [
        "GET /health HTTP/1.0\r\n\r\n".to_string(),
        format!("POST /tokenize HTTP/1.0\r\nAuthorization: Bearer {key}\r\nContent-Length: {}\r\n\r\n{small}", small.len()),
    ] {
        let mut c = TcpStream::connect(s.addr).unwrap();
        c.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
        c.write_all(req.as_bytes()).unwrap();
        let mut buf = Vec::new();
        c.read_to_end(&mut buf).expect("HTTP/1.0: the server closes after the response");
        let r = parse_raw(&String::from_utf8_lossy(&buf)).expect("a response");
        assert_eq!(r.status, 200, "{r:?}");
    }

    // A chunked request body is decoded like a sized one.
    let body = r#"{"prompt":"chunked body works"}"#;
    let (a, b) = body.split_at(10);
    let chunked = format!(
        "POST /tokenize HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {key}\r\nContent-Type: application/json\r\n\
         Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n{:x}\r\n{a}\r\n{:x};ext=1\r\n{b}\r\n0\r\n\r\n",
        a.len(),
        b.len()
    );
    let r = parse_raw(&s.raw(chunked.as_bytes())).expect("a response");
    assert_eq!(r.status, 200, "{r:?}");
    let sized = s.post("/tokenize", &json!({"prompt": "chunked body works"}));
    assert_eq!(r.json()["tokens"], sized.json()["tokens"]);

    // Known path, wrong method: 405 with Allow.
    for (method, path, allowed) in [
        ("GET", "/v1/chat/completions", "POST"),
        ("DELETE", "/v1/completions", "POST"),
        ("POST", "/v1/models", "GET"),
        ("PUT", "/health", "GET"),
        ("GET", "/tokenize", "POST"),
    ] {
        let r = s.call(
            method,
            path,
            Some(key),
            if matches!(method, "GET" | "DELETE") { None } else { Some("{}") },
        );
        r.expect_error(405);
        let allow =
            r.header("allow").unwrap_or_else(|| panic!("405 without Allow: {method} {path} {r:?}"));
        assert!(allow.contains(allowed), "{method} {path}: Allow {allow:?}");
    }
    // HEAD: the headers of GET, no body.
    let head = s.raw(b"HEAD /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
    assert!(head.starts_with("HTTP/1.1 200") && head.ends_with("\r\n\r\n"), "{head:?}");
    // curl sends `Expect: 100-continue` before bodies over 1 KiB and waits for the go-ahead.
    let body = json!({"prompt": "x".repeat(2000)}).to_string();
    let mut c = TcpStream::connect(s.addr).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    let head = format!(
        "POST /tokenize HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {key}\r\nExpect: 100-continue\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    c.write_all(head.as_bytes()).unwrap();
    let mut buf = [0u8; 64];
    let n = c.read(&mut buf).unwrap();
    assert!(
        buf[..n].starts_with(b"HTTP/1.1 100 Continue\r\n\r\n"),
        "{:?}",
        String::from_utf8_lossy(&buf[..n])
    );
    c.write_all(body.as_bytes()).unwrap();
    let mut rest = Vec::new();
    c.read_to_end(&mut rest).unwrap();
    let r = parse_raw(&String::from_utf8_lossy(&rest)).expect("a response");
    assert_eq!(r.json()["count"], 2000, "{r:?}");

    let nf = s.call("GET", "/v1/nothing-here", Some(key), None);
    assert_eq!(nf.expect_error(404)["type"], "not_found_error");
    assert_eq!(s.get("/v1/models").status, 200, "still serving");
}
