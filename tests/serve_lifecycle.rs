//! `qilin serve` over time: clients that go away, a full queue, timeouts, SIGTERM,
//! the audit log, what it binds to and how it starts without a key. Real sockets,
//! real signals; "fast enough" is always judged against what the generation itself
//! would have taken.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::os::unix::net::UnixStream;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::server::{parse_raw, sse_data, Server};
use serde_json::{json, Value};

/// At ~100 tok/s this is a minute of decoding: anything that ends in a few seconds was
/// cut short, not finished.
const LONG: u64 = 6000;
const RUNNING: &str = "qilin:num_requests_running";
const KV: &str = "qilin:kv_cache_usage_perc";
const MARKER: &str = "zebra-MARKER-41c9e2";

fn smol(extra: &[&str]) -> Server {
    Server::start(&common::smollm2_gguf(), extra)
}

fn model_name(s: &Server) -> Value {
    s.get("/v1/models").json()["data"][0]["id"].clone()
}

fn long_request(s: &Server, stream: bool) -> Value {
    json!({"model": model_name(s), "prompt": "Tell me a very long story about a dragon.",
        "max_tokens": LONG, "ignore_eos": true, "temperature": 0, "stream": stream})
}

fn post_head(s: &Server, path: &str, body: &Value) -> Vec<u8> {
    let body = body.to_string();
    format!(
        "POST {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {}\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        s.api_key,
        body.len()
    )
    .into_bytes()
}

/// Opens a streaming request on a raw socket and reads until `events` SSE events came.
fn open_stream(s: &Server, body: &Value, events: usize) -> (TcpStream, String) {
    let mut c = TcpStream::connect(s.addr).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(120))).unwrap();
    c.write_all(&post_head(s, "/v1/completions", body)).unwrap();
    let mut seen = String::new();
    let mut buf = [0u8; 4096];
    while seen.matches("data:").count() < events {
        let n = c.read(&mut buf).expect("reading the stream");
        assert!(n > 0, "the stream ended early: {seen}");
        seen.push_str(&String::from_utf8_lossy(&buf[..n]));
    }
    assert!(seen.starts_with("HTTP/1.1 200"), "{seen}");
    (c, seen)
}

fn wait_idle(s: &Server, within: Duration) -> Duration {
    let t0 = Instant::now();
    s.wait_metric(RUNNING, within, |v| v == 0.0);
    s.wait_metric(KV, within, |v| v == 0.0);
    t0.elapsed()
}

fn aborted(s: &Server) -> f64 {
    s.metric("qilin:request_success_total{finish_reason=\"abort\"}").unwrap_or(0.0)
}

#[test]
fn closing_a_stream_aborts_only_that_sequence() {
    let s = smol(&[]);
    let body = long_request(&s, true);
    let (a, _) = open_stream(&s, &body, 3);
    let (mut b, _) = open_stream(&s, &body, 3);
    assert_eq!(s.metric(RUNNING), Some(2.0));
    assert!(s.metric(KV).unwrap() > 0.0, "two running sequences hold KV blocks");
    let aborts = aborted(&s);

    drop(a);
    s.wait_metric(RUNNING, Duration::from_secs(20), |v| v == 1.0);
    // The other stream goes on.
    let mut buf = [0u8; 4096];
    let mut more = String::new();
    while more.matches("data:").count() < 5 {
        let n = b.read(&mut buf).unwrap();
        assert!(n > 0, "the surviving stream was closed");
        more.push_str(&String::from_utf8_lossy(&buf[..n]));
    }
    assert!(s.metric(KV).unwrap() > 0.0);

    drop(b);
    let took = wait_idle(&s, Duration::from_secs(20));
    eprintln!("both streams released {took:?} after the close");
    assert_eq!(aborted(&s), aborts + 2.0);
    // Nothing is generated any more: the counter stands still.
    let g1 = s.metric("qilin:generation_tokens_total").unwrap();
    std::thread::sleep(Duration::from_secs(1));
    let g2 = s.metric("qilin:generation_tokens_total").unwrap();
    assert_eq!(g1, g2, "tokens are still being generated after the aborts");
    assert!(g2 < LONG as f64, "the sequences ran on: {g2} tokens");
}

#[test]
fn closing_a_non_streaming_request_aborts_it() {
    let s = smol(&[]);
    let mut c = TcpStream::connect(s.addr).unwrap();
    c.write_all(&post_head(&s, "/v1/completions", &long_request(&s, false))).unwrap();
    s.wait_metric(RUNNING, Duration::from_secs(60), |v| v == 1.0);
    s.wait_metric(KV, Duration::from_secs(60), |v| v > 0.0);
    let g0 = s.metric("qilin:generation_tokens_total").unwrap_or(0.0);
    let aborts = aborted(&s);
    c.shutdown(std::net::Shutdown::Both).unwrap();
    drop(c);
    let took = wait_idle(&s, Duration::from_secs(20));
    eprintln!("released {took:?} after the close");
    assert_eq!(aborted(&s), aborts + 1.0);
    let g1 = s.metric("qilin:generation_tokens_total").unwrap_or(0.0);
    assert!(g1 - g0 < (LONG / 2) as f64, "the sequence ran on after the close: {g0} -> {g1}");
}

#[test]
fn a_full_queue_answers_429() {
    let s = smol(&["--max-num-seqs", "1", "--max-queued-requests", "0"]);
    let (first, _) = open_stream(&s, &long_request(&s, true), 2);
    let small = json!({"model": model_name(&s), "prompt": "Hi", "max_tokens": 4});
    for stream in [false, true] {
        let mut body = long_request(&s, stream);
        body["max_tokens"] = json!(100);
        let r = s.post("/v1/completions", &body);
        let err = r.expect_error(429);
        assert_eq!(err["type"], "rate_limit_error", "{err}");
        let retry =
            r.header("retry-after").unwrap_or_else(|| panic!("429 without Retry-After: {r:?}"));
        assert!(retry.parse::<u64>().is_ok_and(|s| s >= 1), "Retry-After {retry:?}");
    }
    let chat = json!({"model": model_name(&s), "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4});
    s.post("/v1/chat/completions", &chat).expect_error(429);
    // Routes that don't generate are still served.
    assert_eq!(s.call("GET", "/health", None, None).status, 200);
    assert_eq!(s.post("/tokenize", &json!({"prompt": "Hi"})).status, 200);
    drop(first);
    wait_idle(&s, Duration::from_secs(20));
    let ok = s.post("/v1/completions", &small);
    assert_eq!(ok.status, 200, "a free slot again: {ok:?}");
    let text = s.metrics_text();
    let n429 = common::server::metric_value(
        &text,
        "qilin:http_requests_total{route=\"/v1/chat/completions\",status=\"429\"}",
    );
    assert_eq!(n429, Some(1.0), "{text}");
}

#[test]
fn request_timeout_504_and_timeout_chunk() {
    let s = smol(&["--request-timeout", "0.5"]);
    let t0 = Instant::now();
    let r = s.post("/v1/completions", &long_request(&s, false));
    let err = r.expect_error(504);
    assert_eq!(err["type"], "timeout_error", "{err}");
    assert!(t0.elapsed() < Duration::from_secs(30), "504 only after {:?}", t0.elapsed());

    let t0 = Instant::now();
    let sr = s.post("/v1/completions", &long_request(&s, true));
    assert!(t0.elapsed() < Duration::from_secs(30), "the stream ran {:?}", t0.elapsed());
    assert_eq!(sr.status, 200, "{sr:?}");
    let data = sse_data(&sr.body);
    assert_eq!(data.last().map(String::as_str), Some("[DONE]"), "{}", sr.body);
    let last: Value = serde_json::from_str(&data[data.len() - 2]).unwrap();
    assert_eq!(last["choices"][0]["finish_reason"], "timeout", "{last}");
    wait_idle(&s, Duration::from_secs(20));
    let timeouts = s.metric("qilin:request_success_total{finish_reason=\"timeout\"}");
    assert_eq!(timeouts, Some(2.0));
}

fn read_audit(path: &std::path::Path, lines: usize) -> Vec<Value> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        if text.lines().count() >= lines || Instant::now() > deadline {
            return text
                .lines()
                .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
                .collect();
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

const AUDIT_FIELDS: [&str; 12] = [
    "time",
    "request_id",
    "key_label",
    "client",
    "method",
    "route",
    "model",
    "status",
    "prompt_tokens",
    "completion_tokens",
    "duration_ms",
    "finish_reason",
];

#[test]
fn graceful_shutdown_finishes_in_flight_stream() {
    let audit_dir = tempfile::tempdir().unwrap();
    let audit = audit_dir.path().join("audit.jsonl");
    let mut s = smol(&["--shutdown-timeout", "300", "--audit-log", &audit.display().to_string()]);
    let addr = s.addr;
    let mut body = long_request(&s, true);
    body["max_tokens"] = json!(1000);
    body["stream_options"] = json!({"include_usage": true});
    let head = post_head(&s, "/v1/completions", &body);
    let done = Arc::new(AtomicBool::new(false));
    let (started_tx, started_rx) = std::sync::mpsc::channel();
    let reader = {
        let done = done.clone();
        std::thread::spawn(move || {
            let mut c = TcpStream::connect(addr).unwrap();
            c.set_read_timeout(Some(Duration::from_secs(300))).unwrap();
            c.write_all(&head).unwrap();
            let mut r = BufReader::new(c);
            let mut all = String::new();
            let mut line = String::new();
            while r.read_line(&mut line).unwrap_or(0) > 0 {
                if line.starts_with("data:") {
                    let _ = started_tx.send(());
                }
                all.push_str(&line);
                line.clear();
            }
            done.store(true, Ordering::SeqCst);
            all
        })
    };
    started_rx.recv_timeout(Duration::from_secs(120)).expect("the stream started");
    let rc = unsafe { libc::kill(s.pid() as libc::pid_t, libc::SIGTERM) };
    assert_eq!(rc, 0);
    // New connections are refused while the stream is still running.
    let deadline = Instant::now() + Duration::from_secs(20);
    while TcpStream::connect_timeout(&addr, Duration::from_secs(2)).is_ok() {
        assert!(Instant::now() < deadline, "still accepting connections after SIGTERM");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(!done.load(Ordering::SeqCst), "the stream ended before the listener closed");
    let code = s.wait_exit(Duration::from_secs(300));
    let out = reader.join().unwrap();
    assert_eq!(code, Some(0), "exit code; stderr:\n{}", s.stderr());
    let data = sse_data(&out);
    assert_eq!(
        data.last().map(String::as_str),
        Some("[DONE]"),
        "the in-flight stream was cut: {out}"
    );
    let usage: Value = serde_json::from_str(&data[data.len() - 2]).unwrap();
    assert_eq!(usage["usage"]["completion_tokens"], 1000, "{usage}");
    let id = parse_raw(&out)
        .and_then(|r| r.header("x-request-id").map(str::to_string))
        .expect("request id");
    let lines = read_audit(&audit, 1);
    let line = lines
        .iter()
        .find(|l| l["request_id"] == id.as_str())
        .unwrap_or_else(|| panic!("{lines:?}"));
    assert_eq!(line["status"], 200);
    assert_eq!(line["completion_tokens"], 1000);
    assert_eq!(line["finish_reason"], "length");
}

#[test]
fn sigint_on_an_idle_server_exits_zero() {
    let mut s = Server::start(&common::a_fixture_model(), &[]);
    assert_eq!(unsafe { libc::kill(s.pid() as libc::pid_t, libc::SIGINT) }, 0);
    assert_eq!(s.wait_exit(Duration::from_secs(60)), Some(0), "{}", s.stderr());
}

#[test]
fn audit_log_lines_and_no_content_anywhere() {
    let audit_dir = tempfile::tempdir().unwrap();
    let audit = audit_dir.path().join("audit.jsonl");
    let audit_arg = audit.display().to_string();
    let s = smol(&[
        "--audit-log",
        &audit_arg,
        "--trusted-proxy",
        "10.0.0.0/8",
        "--served-model-name",
        "smol",
    ]);
    let question = "What is the capital of France?";
    let chat = json!({"model": "smol", "max_tokens": 30, "temperature": 0, "messages": [
        {"role": "system", "content": format!("You are a helpful assistant. {MARKER}")},
        {"role": "user", "content": question}]});
    let r1 = s.post("/v1/chat/completions", &chat);
    assert_eq!(r1.status, 200, "{r1:?}");
    let answer = r1.json()["choices"][0]["message"]["content"].as_str().unwrap().to_string();
    assert!(answer.len() > 8, "{answer:?}");
    let stream = json!({"model": "smol", "prompt": format!("{MARKER} The capital of France is"), "max_tokens": 8,
        "temperature": 0, "stream": true, "stream_options": {"include_usage": true}});
    let r2 = s.post("/v1/completions", &stream);
    let data = sse_data(&r2.body);
    let usage2: Value = serde_json::from_str(&data[data.len() - 2]).unwrap();
    let r3 = s.call("GET", "/v1/models", Some("qk-not-a-key"), None);
    assert_eq!(r3.status, 401);
    let r4 = s.get(&format!("/nothing?q={MARKER}"));
    assert_eq!(r4.status, 404);
    let r5 = s.call("GET", "/health", None, None);
    // X-Real-IP from a peer outside --trusted-proxy is ignored.
    let r6 = {
        let req = ureq::http::Request::builder()
            .method("POST")
            .uri(format!("{}/tokenize", s.base_url))
            .header("Authorization", format!("Bearer {}", s.api_key))
            .header("X-Real-IP", "203.0.113.7")
            .header("X-Forwarded-For", "198.51.100.9")
            .header("X-Request-Id", MARKER)
            .body(json!({"prompt": MARKER}).to_string())
            .unwrap();
        common::server::reply_of(common::server::agent().run(req).unwrap())
    };
    assert_eq!(r6.status, 200);
    assert_ne!(r6.header("x-request-id"), Some(MARKER), "the request id is the server's own");
    let replies = [&r1, &r2, &r3, &r4, &r5, &r6];
    let lines = read_audit(&audit, replies.len());
    assert_eq!(lines.len(), replies.len(), "one line per request: {lines:#?}");
    for l in &lines {
        let keys: Vec<&str> = l.as_object().unwrap().keys().map(String::as_str).collect();
        assert_eq!(keys, AUDIT_FIELDS, "{l}");
        let t = l["time"].as_str().unwrap();
        assert!(chrono::DateTime::parse_from_rfc3339(t).is_ok(), "time {t:?}");
        assert!(l["duration_ms"].as_f64().is_some_and(|d| d >= 0.0), "{l}");
        assert_eq!(l["client"], "127.0.0.1", "{l}");
    }
    let by_id = |r: &common::server::Reply| {
        let id = r.header("x-request-id").expect("X-Request-Id");
        lines
            .iter()
            .find(|l| l["request_id"] == id)
            .unwrap_or_else(|| panic!("no audit line for {id}: {lines:#?}"))
    };
    let (l1, l2, l3, l4, l5, l6) =
        (by_id(&r1), by_id(&r2), by_id(&r3), by_id(&r4), by_id(&r5), by_id(&r6));
    let u1 = &r1.json()["usage"];
    assert_eq!(
        (&l1["key_label"], &l1["method"], &l1["route"], &l1["model"], &l1["status"]),
        (
            &json!("test-suite"),
            &json!("POST"),
            &json!("/v1/chat/completions"),
            &json!("smol"),
            &json!(200)
        )
    );
    assert_eq!(
        (&l1["prompt_tokens"], &l1["completion_tokens"]),
        (&u1["prompt_tokens"], &u1["completion_tokens"])
    );
    assert_eq!(l1["finish_reason"], "stop");
    assert_eq!(
        (&l2["route"], &l2["status"], &l2["finish_reason"]),
        (&json!("/v1/completions"), &json!(200), &json!("length"))
    );
    assert_eq!(
        (&l2["prompt_tokens"], &l2["completion_tokens"]),
        (&usage2["usage"]["prompt_tokens"], &json!(8))
    );
    assert_eq!(
        (&l3["status"], &l3["key_label"], &l3["route"]),
        (&json!(401), &Value::Null, &json!("/v1/models"))
    );
    assert_eq!((&l4["status"], &l4["route"]), (&json!(404), &json!("other")));
    assert_eq!(
        (&l5["status"], &l5["route"], &l5["method"]),
        (&json!(200), &json!("/health"), &json!("GET"))
    );
    assert_eq!((&l6["route"], &l6["client"]), (&json!("/tokenize"), &json!("127.0.0.1")));

    let log = std::fs::read_to_string(&audit).unwrap();
    let stderr = s.stderr();
    for (name, text) in [("audit log", &log), ("stderr", &stderr)] {
        for secret in
            [MARKER, answer.as_str(), question, "Paris", s.api_key.as_str(), "qk-not-a-key"]
        {
            assert!(!text.contains(secret), "the {name} contains {secret:?}:\n{text}");
        }
    }
}

#[test]
fn trusted_proxy_headers_name_the_client() {
    let dir = tempfile::tempdir().unwrap();
    let audit = dir.path().join("audit.jsonl");
    let s = Server::start(
        &common::a_fixture_model(),
        &["--audit-log", &audit.display().to_string(), "--trusted-proxy", "127.0.0.1"],
    );
    let send = |header: &str, value: &str| {
        let req = ureq::http::Request::builder()
            .uri(format!("{}/health", s.base_url))
            .header(header, value)
            .body(())
            .unwrap();
        common::server::reply_of(common::server::agent().run(req).unwrap())
    };
    let a = send("X-Real-IP", "203.0.113.7");
    let b = send("X-Forwarded-For", "198.51.100.9");
    let c = send("X-Real-IP", "not an address <script>");
    let lines = read_audit(&audit, 3);
    let client = |r: &common::server::Reply| {
        let id = r.header("x-request-id").unwrap();
        lines.iter().find(|l| l["request_id"] == id).map(|l| l["client"].clone()).unwrap()
    };
    assert_eq!(client(&a), "203.0.113.7");
    assert_eq!(client(&b), "198.51.100.9");
    assert_eq!(client(&c), "127.0.0.1", "header garbage never reaches the log");
}

fn qilin(args: &[&str], env: &[(&str, &str)]) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_qilin"));
    cmd.args(args).envs(env.iter().copied()).env_remove("QILIN_API_KEYS").env_remove("API_TOKENS");
    cmd.stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::piped());
    cmd
}

#[test]
fn refuses_non_loopback_addresses() {
    let model = common::a_fixture_model().display().to_string();
    for host in ["0.0.0.0", "192.168.1.10", "::", "8.8.8.8"] {
        let mut child = qilin(
            &["serve", "--model", &model, "--port", "0", "--host", host],
            &[("API_TOKENS", "qk-x")],
        )
        .spawn()
        .unwrap();
        let deadline = Instant::now() + Duration::from_secs(120);
        let status = loop {
            if let Some(st) = child.try_wait().unwrap() {
                break st;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!("--host {host}: still running; it must refuse to start");
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        let mut err = String::new();
        child.stderr.take().unwrap().read_to_string(&mut err).unwrap();
        assert!(!status.success(), "--host {host} must fail: {err}");
        let lower = err.to_lowercase().replace('-', " ");
        assert!(
            lower.contains("reverse proxy"),
            "--host {host}: the error should point to the reverse proxy: {err}"
        );
        assert!(!err.contains("listening on"), "{err}");
    }
    for host in ["::1", "127.0.0.2"] {
        let s = Server::start(&common::a_fixture_model(), &["--host", host]);
        assert_eq!(s.addr.ip(), host.parse::<std::net::IpAddr>().unwrap());
        assert_eq!(s.call("GET", "/health", None, None).status, 200);
        assert_eq!(s.get("/v1/models").status, 200);
    }
}

/// `--chat-template` with a missing or broken file: refused before the model loads, with
/// the file named; a good one replaces the model's template on the chat route.
#[test]
fn chat_template_flag_names_a_bad_file_and_replaces_the_template() {
    let model = common::a_fixture_model().display().to_string();
    let dir = tempfile::tempdir().unwrap();
    let broken = dir.path().join("broken.jinja");
    std::fs::write(&broken, "{% for m in messages %}{{ m.content }").unwrap();
    let missing = dir.path().join("missing.jinja");
    for (file, why) in [(&missing, "cannot read"), (&broken, "not a valid template")] {
        let path = file.display().to_string();
        let out = qilin(
            &["serve", "--model", &model, "--port", "0", "--chat-template", &path],
            &[("API_TOKENS", "qk-x-0123456789abcdef")],
        )
        .output()
        .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{path}: must fail: {err}");
        assert!(err.contains(&path) && err.contains(why), "{path}: {err}");
        assert!(!err.contains("listening on") && !err.contains("plan:"), "{err}");
    }
    let good = dir.path().join("plain.jinja");
    std::fs::write(&good, "{% for m in messages %}[{{ m.role }}] {{ m.content }}\n{% endfor %}")
        .unwrap();
    let good = good.display().to_string();
    let s = Server::start(&common::a_fixture_model(), &["--chat-template", &good]);
    let chat = s.post("/tokenize", &json!({"messages": [{"role": "user", "content": "hi"}]}));
    let plain = s.post("/tokenize", &json!({"prompt": "[user] hi\n", "add_special_tokens": false}));
    assert_eq!((chat.status, plain.status), (200, 200), "{} {}", chat.body, plain.body);
    assert_eq!(
        chat.json()["tokens"],
        plain.json()["tokens"],
        "the chat rendered through the given template"
    );
}

fn uds_exchange(path: &std::path::Path, request: &str) -> common::server::Reply {
    let mut c = UnixStream::connect(path).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    c.write_all(request.as_bytes()).unwrap();
    let mut out = Vec::new();
    c.read_to_end(&mut out).unwrap();
    parse_raw(&String::from_utf8_lossy(&out)).expect("a response over the socket")
}

#[test]
fn serves_over_a_unix_socket() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("qilin.sock");
    let keys = dir.path().join("keys");
    std::fs::write(&keys, "uds:qk-uds-key-0123456789\n").unwrap();
    let args = [
        "serve",
        "--model",
        &common::a_fixture_model().display().to_string(),
        "--threads",
        "2",
        "--uds",
        &sock.display().to_string(),
        "--api-key-file",
        &keys.display().to_string(),
    ];
    let s = Server::spawn_env(
        args.iter().map(|a| a.to_string()).collect(),
        dir,
        "qk-uds-key-0123456789".into(),
        &[],
    );
    assert!(
        s.stderr().contains(&format!("listening on unix:{}", sock.display())),
        "{}",
        s.stderr()
    );
    let mode = std::fs::metadata(&sock).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o660, "socket mode {mode:o}");

    let h = uds_exchange(&sock, "GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
    assert_eq!(h.status, 200, "{h:?}");
    let m = uds_exchange(&sock, "GET /v1/models HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
    m.expect_error(401);
    let auth = "Authorization: Bearer qk-uds-key-0123456789\r\n";
    let m = uds_exchange(
        &sock,
        &format!("GET /v1/models HTTP/1.1\r\nHost: x\r\n{auth}Connection: close\r\n\r\n"),
    );
    assert_eq!(m.json()["object"], "list", "{m:?}");
    let body = json!({"prompt": "Hi", "max_tokens": 5, "ignore_eos": true, "stream": true,
        "model": m.json()["data"][0]["id"]})
    .to_string();
    let r = uds_exchange(&sock, &format!(
        "POST /v1/completions HTTP/1.1\r\nHost: x\r\n{auth}Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    ));
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(sse_data(&r.body).last().map(String::as_str), Some("[DONE]"), "{r:?}");
}

#[test]
fn without_keys_a_key_is_generated_and_required() {
    let dir = tempfile::tempdir().unwrap();
    let args = [
        "serve",
        "--model",
        &common::a_fixture_model().display().to_string(),
        "--port",
        "0",
        "--threads",
        "2",
    ];
    let mut s =
        Server::spawn_env(args.iter().map(|a| a.to_string()).collect(), dir, String::new(), &[]);
    let log = s.stderr();
    let prefix = "generated API key for this run (label \"generated\"): ";
    let found: Vec<&str> =
        log.lines().filter_map(|l| l.split_once(prefix).map(|(_, k)| k.trim())).collect();
    assert_eq!(found.len(), 1, "exactly one generated-key line: {log}");
    let key = found[0].to_string();
    let hex = key.strip_prefix("qk-").unwrap_or_else(|| panic!("{key:?}"));
    assert!(hex.len() == 64 && hex.chars().all(|c| c.is_ascii_hexdigit()), "{key:?}");
    s.api_key = key.clone();
    assert_eq!(s.get("/v1/models").status, 200);
    s.call("GET", "/v1/models", None, None).expect_error(401);
    s.call("GET", "/v1/models", Some("qk-0000"), None).expect_error(401);
    assert_eq!(s.stderr().matches(key.as_str()).count(), 1, "the key is printed once");
}
