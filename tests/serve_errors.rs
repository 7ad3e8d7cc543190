//! Bad input against a real `qilin serve`: every malformed request gets its 4xx in
//! OpenAI's error shape, no message leaks the key, the model path or the prompt, and
//! the server keeps serving after each one.

mod common;

use std::io::{Read, Write};
use std::net::{Shutdown, TcpStream};
use std::time::{Duration, Instant};

use common::server::{agent, parse_raw, reply_of, Reply, Server};
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};

#[path = "serve_errors/malformed.rs"]
mod malformed;

const NAME: &str = "qilin-test";
/// In every bad prompt: no error message may contain it.
const MARKER: &str = "MARKER-7f3a9c-do-not-echo";

fn start(extra: &[&str]) -> Server {
    let mut args =
        vec!["--served-model-name", NAME, "--max-model-len", "128", "--max-body-bytes", "4096"];
    args.extend_from_slice(extra);
    Server::start(&common::a_fixture_model(), &args)
}

fn still_serving(s: &Server, after: &str) {
    let r = s.post("/tokenize", &json!({"prompt": "still here"}));
    assert_eq!(r.status, 200, "the server stopped serving after {after}: {r:?}");
}

fn assert_no_leak(s: &Server, r: &Reply, what: &str) {
    let model = common::a_fixture_model().display().to_string();
    for secret in [s.api_key.as_str(), model.as_str(), MARKER] {
        assert!(!r.body.contains(secret), "{what}: the response leaks {secret:?}: {}", r.body);
    }
}

/// Sends raw bytes, half-closes, and reads until the server closes (60 s at most).
fn raw_then_close(s: &Server, bytes: &[u8]) -> (String, bool) {
    let mut c = TcpStream::connect(s.addr).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    let _ = c.write_all(bytes);
    let _ = c.shutdown(Shutdown::Write);
    let mut out = Vec::new();
    let closed = c.read_to_end(&mut out).is_ok();
    (String::from_utf8_lossy(&out).into_owned(), closed)
}

fn post_raw(s: &Server, path: &str, body: &[u8]) -> Reply {
    let mut req = format!(
        "POST {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {}\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n",
        s.api_key,
        body.len()
    )
    .into_bytes();
    req.extend_from_slice(body);
    let out = s.raw(&req);
    parse_raw(&out).unwrap_or_else(|| panic!("POST {path}: no response: {out:?}"))
}

fn with(base: &Value, field: &str, raw_value: &str) -> String {
    let mut v = base.clone();
    v[field] = serde_json::from_str(raw_value).unwrap();
    v.to_string()
}

#[test]
fn bad_request_matrix() {
    let s = start(&[]);
    let chat = json!({"model": NAME, "messages": [{"role": "user", "content": format!("{MARKER} hi")}], "max_tokens": 4});
    let comp = json!({"model": NAME, "prompt": format!("{MARKER} hi"), "max_tokens": 4});
    let (c, p) = ("/v1/chat/completions", "/v1/completions");
    // The bases are valid: each case below breaks exactly one thing.
    assert_eq!(post_raw(&s, c, chat.to_string().as_bytes()).status, 200);
    assert_eq!(post_raw(&s, p, comp.to_string().as_bytes()).status, 200);
    // (path, body, status, the parameter the error must name)
    let mut cases: Vec<(&str, String, u16, Option<&str>)> = vec![
        (c, "{\"model\":".into(), 400, None),
        (c, "[1,2]".into(), 400, None),
        (p, "null".into(), 400, None),
        (p, "\"a string\"".into(), 400, None),
        (p, "42".into(), 400, None),
        (p, String::new(), 400, None),
        (p, format!("{comp}{comp}"), 400, None),
        (p, format!("{{\"prompt\":{}1{}}}", "[".repeat(1500), "]".repeat(1500)), 400, None),
        (c, with(&chat, "messages", "[]"), 400, Some("messages")),
        (c, with(&chat, "messages", "\"hi\""), 400, Some("messages")),
        (c, with(&chat, "messages", r#"[{"role":"wizard","content":"x"}]"#), 400, Some("role")),
        (c, with(&chat, "messages", r#"[{"content":"x"}]"#), 400, Some("role")),
        (
            c,
            with(
                &chat,
                "messages",
                r#"[{"role":"user","content":[{"type":"image_url","image_url":{"url":"http://x/y.png"}}]}]"#,
            ),
            400,
            None,
        ),
        (c, json!({"model": NAME, "max_tokens": 4}).to_string(), 400, Some("messages")),
        (p, json!({"model": NAME, "max_tokens": 4}).to_string(), 400, Some("prompt")),
        (p, with(&comp, "prompt", "\"\""), 400, Some("prompt")),
        (p, with(&comp, "prompt", "[]"), 400, Some("prompt")),
        (p, with(&comp, "prompt", r#"["one","two"]"#), 400, Some("prompt")),
        (p, with(&comp, "prompt", "[99999999]"), 400, Some("prompt")),
        (c, with(&chat, "n", "2"), 400, Some("n")),
        (p, with(&comp, "n", "2"), 400, Some("n")),
        (p, with(&comp, "prompt", &json!("word ".repeat(300)).to_string()), 400, None),
        (p, with(&comp, "max_tokens", "120"), 400, None),
        (c, with(&chat, "temperature", "-1"), 400, Some("temperature")),
        (c, with(&chat, "top_p", "0"), 400, Some("top_p")),
        (c, with(&chat, "top_p", "1.5"), 400, Some("top_p")),
        (c, with(&chat, "top_k", "-5"), 400, Some("top_k")),
        (c, with(&chat, "min_p", "1.5"), 400, Some("min_p")),
        (c, with(&chat, "presence_penalty", "3"), 400, Some("presence_penalty")),
        (c, with(&chat, "frequency_penalty", "-3"), 400, Some("frequency_penalty")),
        (c, with(&chat, "repetition_penalty", "0"), 400, Some("repetition_penalty")),
        (c, with(&chat, "max_tokens", "0"), 400, Some("max_tokens")),
        (c, with(&chat, "max_tokens", "-1"), 400, Some("max_tokens")),
        (
            c,
            with(&with(&chat, "logprobs", "true").parse().unwrap(), "top_logprobs", "50"),
            400,
            Some("top_logprobs"),
        ),
        (p, with(&comp, "logprobs", "50"), 400, Some("logprobs")),
        (
            c,
            with(
                &chat,
                "tools",
                r#"[{"type":"function","function":{"name":"f","parameters":{}}}]"#,
            ),
            400,
            Some("tools"),
        ),
        (
            c,
            with(&chat, "response_format", r#"{"type":"json_object"}"#),
            400,
            Some("response_format"),
        ),
        (c, with(&chat, "logit_bias", r#"{"1":5}"#), 400, Some("logit_bias")),
        (p, with(&comp, "best_of", "2"), 400, Some("best_of")),
        (p, with(&comp, "suffix", "\"tail\""), 400, Some("suffix")),
        (c, with(&chat, "model", "5"), 400, Some("model")),
        ("/tokenize", "{}".into(), 400, None),
        ("/tokenize", r#"{"prompt":5}"#.into(), 400, Some("prompt")),
        ("/detokenize", r#"{"tokens":["a"]}"#.into(), 400, Some("tokens")),
        ("/detokenize", r#"{"tokens":[99999999]}"#.into(), 400, Some("tokens")),
        ("/detokenize", r#"{"tokens":[-1]}"#.into(), 400, Some("tokens")),
        ("/generate", r#"{"prompt":5}"#.into(), 400, Some("prompt")),
        ("/generate", "{}".into(), 400, Some("prompt")),
        ("/api/chat", r#"{"message":5}"#.into(), 400, Some("message")),
        ("/api/chat", "{}".into(), 400, Some("message")),
    ];
    // Wrong types for every sampling field, on both routes.
    let wrong: &[(&str, &str)] = &[
        ("max_tokens", "\"ten\""),
        ("max_tokens", "1.5"),
        ("temperature", "\"hot\""),
        ("temperature", "true"),
        ("top_p", "\"x\""),
        ("top_k", "\"x\""),
        ("top_k", "1.5"),
        ("min_p", "[0.1]"),
        ("presence_penalty", "\"x\""),
        ("frequency_penalty", "{}"),
        ("repetition_penalty", "\"x\""),
        ("seed", "\"x\""),
        ("stop", "5"),
        ("stop", "[1]"),
        ("n", "\"x\""),
        ("stream", "\"yes\""),
        ("ignore_eos", "\"x\""),
        ("stream_options", "\"x\""),
    ];
    for (field, value) in wrong {
        cases.push((c, with(&chat, field, value), 400, Some(field)));
        cases.push((p, with(&comp, field, value), 400, Some(field)));
    }
    cases.push((c, with(&chat, "logprobs", "\"yes\""), 400, Some("logprobs")));
    cases.push((c, with(&chat, "top_logprobs", "\"x\""), 400, Some("top_logprobs")));
    cases.push((
        c,
        with(&chat, "max_completion_tokens", "\"x\""),
        400,
        Some("max_completion_tokens"),
    ));
    cases.push((p, with(&comp, "logprobs", "\"yes\""), 400, Some("logprobs")));
    cases.push((p, with(&comp, "echo", "\"x\""), 400, Some("echo")));

    for (path, body, status, param) in &cases {
        let what = format!("POST {path} {body}");
        let r = post_raw(&s, path, body.as_bytes());
        let err = r.expect_error(*status);
        if let Some(param) = param {
            let msg = err["message"].as_str().unwrap();
            assert!(
                err["param"] == *param || msg.contains(param),
                "{what}: the error names no `{param}`: {err}"
            );
        }
        assert_no_leak(&s, &r, &what);
        still_serving(&s, &what);
    }
    let over = post_raw(&s, p, with(&comp, "max_tokens", "120").as_bytes());
    assert!(
        over.body.contains("128"),
        "the context-length error should state the limit: {}",
        over.body
    );

    // Invalid UTF-8 in the body, raw bytes.
    let mut bad = format!("{{\"model\":\"{NAME}\",\"prompt\":\"{MARKER} ").into_bytes();
    bad.extend_from_slice(b"\xff\xfe\xc0\x80\",\"max_tokens\":1}");
    let r = post_raw(&s, p, &bad);
    r.expect_error(400);
    assert_no_leak(&s, &r, "invalid UTF-8");

    // Neutral values of unimplemented parameters are accepted; unknown fields ignored.
    for (field, value) in
        [("response_format", r#"{"type":"text"}"#), ("logit_bias", "{}"), ("future_field", "[1]")]
    {
        let r = post_raw(&s, c, with(&chat, field, value).as_bytes());
        assert_eq!(r.status, 200, "{field}: {r:?}");
    }
}

/// A request with an arbitrary Authorization header (None: without one).
fn with_auth(s: &Server, method: &str, path: &str, auth: Option<&str>) -> Reply {
    let mut req =
        ureq::http::Request::builder().method(method).uri(format!("{}{path}", s.base_url));
    if let Some(a) = auth {
        req = req.header("Authorization", a);
    }
    let req = req.header("Content-Type", "application/json");
    let resp = if method == "POST" {
        agent().run(req.body(r#"{"prompt":"hi","messages":[{"role":"user","content":"hi"}],"tokens":[1],"message":"hi","max_tokens":1}"#.to_string()).unwrap())
    } else {
        agent().run(req.body(()).unwrap())
    };
    reply_of(resp.expect("transport"))
}

const PROTECTED: &[(&str, &str)] = &[
    ("POST", "/v1/chat/completions"),
    ("POST", "/v1/completions"),
    ("GET", "/v1/models"),
    ("POST", "/tokenize"),
    ("POST", "/detokenize"),
    ("POST", "/generate"),
    ("POST", "/api/chat"),
    ("GET", "/metrics"),
];

#[test]
fn auth_is_deny_by_default() {
    let dir = tempfile::tempdir().unwrap();
    let keys = dir.path().join("keys");
    let (bare, labelled) = ("qk-bare-0123456789abcdef", "qk-labelled-fedcba9876543210");
    std::fs::write(
        &keys,
        format!("# operators\n\n{bare}\n  # indented comment\nops:{labelled}\n\n"),
    )
    .unwrap();
    let args: Vec<String> = [
        "serve",
        "--model",
        &common::a_fixture_model().display().to_string(),
        "--port",
        "0",
        "--threads",
        "2",
        "--api-key-file",
        &keys.display().to_string(),
    ]
    .iter()
    .map(|a| a.to_string())
    .collect();
    let env = [
        ("QILIN_API_KEYS", "app:qk-env-one-11111111,qk-env-two-22222222"),
        ("API_TOKENS", "qk-api-tokens-33333333"),
    ];
    let s = Server::spawn_env(args, dir, bare.to_string(), &env);
    assert!(!s.stderr().contains("generated API key"), "keys were configured: {}", s.stderr());

    let h = with_auth(&s, "GET", "/health", None);
    assert_eq!(h.status, 200, "/health is open: {h:?}");
    let real =
        [bare, labelled, "qk-env-one-11111111", "qk-env-two-22222222", "qk-api-tokens-33333333"];
    let bad_headers = [
        None,
        Some("Bearer".to_string()),
        Some("Bearer ".to_string()),
        Some("Bearer qk-wrong-token".to_string()),
        Some(format!("Bearer {bare}x")),
        Some(format!("Bearer {}", &bare[..bare.len() - 1])),
        Some(format!("Bearer ops:{labelled}")),
        Some(format!("Basic {bare}")),
        Some(bare.to_string()),
        Some("Bearer app".to_string()),
    ];
    for (method, path) in PROTECTED {
        for auth in &bad_headers {
            let r = with_auth(&s, method, path, auth.as_deref());
            let what = format!("{method} {path} with {auth:?}");
            let err = r.expect_error(401);
            assert_eq!(err["type"], "authentication_error", "{what}");
            assert_eq!(err["code"], "invalid_api_key", "{what}");
            let www = r
                .header("www-authenticate")
                .unwrap_or_else(|| panic!("{what}: no WWW-Authenticate"));
            assert!(www.starts_with("Bearer"), "{what}: {www}");
            for k in real.iter().chain(["qk-wrong-token"].iter()) {
                assert!(!r.body.contains(k), "{what}: the body echoes a token: {}", r.body);
            }
        }
    }
    for key in real {
        let r = with_auth(&s, "GET", "/v1/models", Some(&format!("Bearer {key}")));
        assert_eq!(r.status, 200, "key {key} should work: {r:?}");
    }
    let m = with_auth(&s, "GET", "/metrics", Some(&format!("Bearer {labelled}")));
    assert_eq!(m.status, 200);
    for key in real {
        assert!(!s.stderr().contains(key), "the process log contains a token");
    }
}

#[test]
fn metrics_public_opens_only_metrics() {
    let s = start(&["--metrics-public"]);
    let m = with_auth(&s, "GET", "/metrics", None);
    assert_eq!(m.status, 200, "{m:?}");
    assert!(m.body.contains("qilin:num_requests_running"));
    with_auth(&s, "GET", "/v1/models", None).expect_error(401);
    with_auth(&s, "POST", "/tokenize", None).expect_error(401);
}

#[test]
fn path_tricks() {
    let s = start(&[]);
    let key = s.api_key.clone();
    let get = |target: &str, auth: bool| {
        let a = if auth { format!("Authorization: Bearer {key}\r\n") } else { String::new() };
        let out = s.raw(
            format!("GET {target} HTTP/1.1\r\nHost: x\r\n{a}Connection: close\r\n\r\n").as_bytes(),
        );
        parse_raw(&out).unwrap_or_else(|| panic!("GET {target}: no response: {out:?}"))
    };
    let long = format!("/v1/{}", "a".repeat(6000));
    // (target, with key, statuses allowed)
    let cases: &[(&str, bool, &[u16])] = &[
        ("/health?x=1", false, &[200]),
        ("/health?x=1&y=%2F..", false, &[200]),
        ("/metrics?x=1", false, &[401]),
        ("/v1/models?x=1", true, &[200]),
        ("/v1/../metrics", false, &[401, 404]),
        ("/v1/../metrics", true, &[200, 404]),
        ("/health/../metrics", false, &[401, 404]),
        ("//v1/models", false, &[401, 404]),
        ("//v1/models", true, &[200, 404]),
        ("/v1/models%2F..", true, &[404]),
        ("/v1/models%2f..%2f..%2fmetrics", false, &[401, 404]),
        ("/v1/%6dodels", false, &[401, 404]),
        ("/%6detrics", false, &[401, 404]),
        // Unknown paths need a key too: 401 is as right as 404 there.
        ("/%68ealth", false, &[200, 401, 404]),
        ("/../../../../etc/passwd", true, &[400, 404]),
        ("/v1/models/../../../../etc/passwd", true, &[400, 404]),
        ("/v1/models/..%2F..%2F..%2Fetc%2Fpasswd", true, &[400, 404]),
        ("/health%00", false, &[400, 401, 404]),
        ("/v1/models#frag", true, &[200, 400, 404]),
        ("http://x/v1/models", true, &[200, 400, 404]),
        ("http://x/metrics", false, &[400, 401, 404]),
        ("*", true, &[400, 404, 405]),
        (&long, true, &[404, 414, 431]),
    ];
    for (target, auth, allowed) in cases {
        let r = get(target, *auth);
        let what = format!("GET {} (key: {auth})", &target[..target.len().min(60)]);
        assert!(allowed.contains(&r.status), "{what}: {} not in {allowed:?}: {r:?}", r.status);
        assert!(!r.body.contains("root:"), "{what}: file content leaked");
        if !auth {
            assert!(!r.body.contains("# TYPE"), "{what}: metrics without a key");
            assert!(!r.body.contains("\"list\""), "{what}: models without a key");
        }
        if r.status >= 400 && r.status != 414 && r.status != 431 {
            r.expect_error(r.status);
        }
        assert_no_leak(&s, &r, &what);
        still_serving(&s, &what);
    }
    // Unknown paths share one label: a URL cannot grow the metrics.
    let text = s.metrics_text();
    for bad in ["passwd", "%2F", "aaaaaaaaaa", "%6d", "http://"] {
        assert!(!text.contains(bad), "metrics carry a raw URL ({bad}):\n{text}");
    }
    assert!(
        s.metric("qilin:http_requests_total{route=\"other\",status=\"404\"}").unwrap_or(0.0) >= 3.0,
        "{text}"
    );
}

#[test]
fn framing_limits() {
    let s = start(&[]);
    let auth = format!("Authorization: Bearer {}\r\n", s.api_key);
    let status = |out: &str| parse_raw(out).map(|r| r.status);

    // Over --max-body-bytes (4096): 413, sized or chunked.
    let big = json!({"model": NAME, "prompt": "a".repeat(5000), "max_tokens": 1});
    s.post("/v1/completions", &big).expect_error(413);
    let chunk = "a".repeat(1000);
    let mut chunked = format!("POST /v1/completions HTTP/1.1\r\nHost: x\r\n{auth}Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n");
    chunked.push_str("6\r\n{\"a\":\"\r\n");
    for _ in 0..6 {
        chunked.push_str(&format!("3e8\r\n{chunk}\r\n"));
    }
    chunked.push_str("2\r\n\"}\r\n0\r\n\r\n");
    parse_raw(&s.raw(chunked.as_bytes())).expect("413 for a chunked body").expect_error(413);
    // A Content-Length over the limit is refused without waiting for the body.
    let lying = format!("POST /v1/completions HTTP/1.1\r\nHost: x\r\n{auth}Content-Length: 10000000\r\n\r\n{{\"a\":1}}");
    let (out, closed) = raw_then_close(&s, lying.as_bytes());
    assert!(closed, "the server must close, not wait for 10 MB");
    parse_raw(&out).expect("a 413").expect_error(413);
    still_serving(&s, "Content-Length 10000000");
    // A Content-Length under the limit but a shorter body, then EOF: 400 or a plain close.
    let short = format!(
        "POST /v1/completions HTTP/1.1\r\nHost: x\r\n{auth}Content-Length: 1000\r\n\r\n{{\"a\":1}}"
    );
    let (out, closed) = raw_then_close(&s, short.as_bytes());
    assert!(closed, "a truncated body must not hang the connection");
    assert!(out.is_empty() || matches!(status(&out), Some(400 | 408)), "{out}");
    still_serving(&s, "truncated body");

    // A POST body without a length: 411.
    let nolen = format!(
        "POST /tokenize HTTP/1.1\r\nHost: x\r\n{auth}Connection: close\r\n\r\n{{\"prompt\":\"x\"}}"
    );
    parse_raw(&s.raw(nolen.as_bytes())).expect("411").expect_error(411);
    let (out, _) =
        raw_then_close(&s, format!("POST /tokenize HTTP/1.1\r\nHost: x\r\n{auth}\r\n").as_bytes());
    assert!(matches!(status(&out), Some(400 | 411)), "{out}");

    // Broken framing: 400 (or 505 for an unknown version), and the server carries on.
    let cases: Vec<(String, &[u16])> = vec![
        (format!("POST /tokenize HTTP/1.1\r\nHost: x\r\n{auth}Content-Length: abc\r\n\r\n"), &[400]),
        (format!("POST /tokenize HTTP/1.1\r\nHost: x\r\n{auth}Content-Length: -1\r\n\r\n"), &[400]),
        (format!("POST /tokenize HTTP/1.1\r\nHost: x\r\n{auth}Content-Length: 14\r\nContent-Length: 15\r\n\r\n{{\"prompt\":\"x\"}}"), &[400]),
        (format!("POST /tokenize HTTP/1.1\r\nHost: x\r\n{auth}Transfer-Encoding: gzip\r\n\r\n"), &[400, 411, 501]),
        (format!("POST /tokenize HTTP/1.1\r\nHost: x\r\n{auth}Transfer-Encoding: chunked\r\n\r\nzz\r\nabc\r\n0\r\n\r\n"), &[400]),
        ("GET /health HTTP/1.1\r\nHost: x\r\nNoColonHere\r\n\r\n".into(), &[400]),
        ("GARBAGE\r\n\r\n".into(), &[400]),
        ("GET /health HTTP/9.9\r\n\r\n".into(), &[400, 505]),
        ("\x16\x03\x01\x02\x00\x01\x00\x01\x7f\x03\x03 binary junk\r\n\r\n".into(), &[400]),
        (format!("GET /health HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\n\r\n", "b".repeat(70_000)), &[431]),
        (format!("GET /health HTTP/1.1\r\nHost: x\r\n{}\r\n", "X-Many: 1\r\n".repeat(500)), &[400, 431]),
    ];
    for (req, allowed) in cases {
        let what = req.chars().take(70).collect::<String>().escape_debug().to_string();
        let (out, closed) = raw_then_close(&s, req.as_bytes());
        assert!(closed, "{what}: the server must answer and close");
        let st = status(&out);
        assert!(out.is_empty() || st.is_some_and(|st| allowed.contains(&st)), "{what}: {out:?}");
        still_serving(&s, &what);
    }
}

#[test]
fn slow_clients_are_cut_off_while_others_are_served() {
    let s = start(&[]);
    let addr = s.addr;
    let auth = format!("Authorization: Bearer {}\r\n", s.api_key);
    // Half a request head, then nothing; a full head and part of the body; a head that
    // trickles one byte a second forever (slowloris).
    let stalls = [
        "POST /v1/completions HTTP/1.1\r\nHost: x\r\n".to_string(),
        format!("POST /tokenize HTTP/1.1\r\nHost: x\r\n{auth}Content-Length: 100\r\n\r\n{{\"prom"),
    ];
    let mut threads: Vec<_> = stalls
        .into_iter()
        .map(|head| {
            std::thread::spawn(move || {
                let t0 = Instant::now();
                let mut c = TcpStream::connect(addr).unwrap();
                c.set_read_timeout(Some(Duration::from_secs(90))).unwrap();
                c.write_all(head.as_bytes()).unwrap();
                let mut out = Vec::new();
                let closed = c.read_to_end(&mut out).is_ok();
                (String::from_utf8_lossy(&out).into_owned(), closed, t0.elapsed())
            })
        })
        .collect();
    threads.push(std::thread::spawn(move || {
        let t0 = Instant::now();
        let mut c = TcpStream::connect(addr).unwrap();
        c.set_read_timeout(Some(Duration::from_secs(1))).unwrap();
        let _ = c.write_all(b"GET /health HTTP/1.1\r\nX-Slow: ");
        let mut out = Vec::new();
        while t0.elapsed() < Duration::from_secs(90) {
            if c.write_all(b"a").is_err() {
                return (String::from_utf8_lossy(&out).into_owned(), true, t0.elapsed());
            }
            let mut buf = [0u8; 512];
            match c.read(&mut buf) {
                Ok(0) => return (String::from_utf8_lossy(&out).into_owned(), true, t0.elapsed()),
                Ok(n) => out.extend_from_slice(&buf[..n]),
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) => {}
                Err(_) => return (String::from_utf8_lossy(&out).into_owned(), true, t0.elapsed()),
            }
        }
        (String::from_utf8_lossy(&out).into_owned(), false, t0.elapsed())
    }));
    // Meanwhile everyone else is served promptly.
    for i in 0..8 {
        std::thread::sleep(Duration::from_secs(1));
        let t0 = Instant::now();
        let r = s.call("GET", "/health", None, None);
        assert_eq!(r.status, 200, "request {i} during the stalls: {r:?}");
        assert!(
            t0.elapsed() < Duration::from_secs(5),
            "a stalled client held up others: {:?}",
            t0.elapsed()
        );
        still_serving(&s, "a stalled client");
    }
    for (i, t) in threads.into_iter().enumerate() {
        let (out, closed, took) = t.join().unwrap();
        assert!(closed, "stalled client {i} was never cut off (after {took:?})");
        assert!(took < Duration::from_secs(60), "stalled client {i} was held {took:?}");
        assert!(out.is_empty() || out.starts_with("HTTP/1.1 408"), "stalled client {i}: {out:?}");
    }
    still_serving(&s, "the stalled clients");
}

#[test]
fn a_thousand_random_malformed_bodies() {
    let s = start(&[]);
    let routes = [
        "/v1/chat/completions",
        "/v1/completions",
        "/tokenize",
        "/detokenize",
        "/generate",
        "/api/chat",
    ];
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(0x9117_2024);
    for i in 0..1000 {
        let route = routes[rng.random_range(0..routes.len())];
        let body = malformed::body(&mut rng, route);
        let what = format!(
            "case {i} (seed 0x91172024): POST {route} {:?}",
            String::from_utf8_lossy(&body)
        );
        let r = post_raw(&s, route, &body);
        assert!((400..500).contains(&r.status), "{what}: {r:?}");
        r.expect_error(r.status);
        assert_no_leak(&s, &r, &what);
        still_serving(&s, &what);
        if i % 100 == 99 {
            let ok =
                s.post("/v1/completions", &json!({"model": NAME, "prompt": "ok", "max_tokens": 2}));
            assert_eq!(ok.status, 200, "after {what}: {ok:?}");
        }
    }
}
