//! Real clients against a real `qilin serve`: the official `openai` Python package
//! (tests/clients/openai_client.py, on SmolLM2), curl (SSE framing, Expect:
//! 100-continue with bodies over --max-body-bytes) and tools/healthcheck.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::server::Server;
use serde_json::Value;

fn text(out: &Output) -> String {
    format!(
        "status {}\n--- stdout\n{}--- stderr\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn venv_python() -> PathBuf {
    let python = common::manifest_dir().join(".venv/bin/python");
    assert!(python.exists(), "{} not found: run tools/setup", python.display());
    python
}

#[test]
fn official_openai_python_client() {
    let server = Server::start(&common::smollm2_gguf(), &["--served-model-name", "smollm2"]);
    run_client_script(&server, "openai_client.py");
}

/// tests/clients/`script` against `server` (served as "smollm2"): it must pass every check.
fn run_client_script(server: &Server, script: &str) {
    let out = Command::new(venv_python())
        .arg(common::manifest_dir().join("tests/clients").join(script))
        .env("QILIN_URL", &server.base_url)
        .env("QILIN_KEY", &server.api_key)
        .env("QILIN_MODEL", "smollm2")
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .output()
        .expect("running a client script");
    let report = text(&out);
    assert!(
        out.status.success(),
        "{script}: {report}\n--- server stderr\n{}\n(`No module named 'openai'`: run tools/setup)",
        server.stderr()
    );
    // The scripts print this only after every check ran.
    assert!(report.contains("all checks passed"), "{script}: {report}");
}

/// Tool calling end to end (tests/clients/openai_tools.py): SmolLM2 served with
/// Qwen2.5's chat template through `--chat-template`, the template taken from the
/// transformers-rendered fixture (tests/fixtures/tokenizer/chat_templates.json).
#[test]
fn official_openai_python_client_tool_calls() {
    let fixture = common::manifest_dir().join("tests/fixtures/tokenizer/chat_templates.json");
    let fx: Value = serde_json::from_str(&std::fs::read_to_string(fixture).unwrap()).unwrap();
    let qwen = fx["templates"].as_array().unwrap().iter().find(|t| t["name"] == "qwen2.5");
    let source = qwen.and_then(|t| t["template"].as_str()).expect("Qwen2.5's template");
    let dir = tempfile::tempdir().unwrap();
    let template = dir.path().join("qwen2.5.jinja");
    std::fs::write(&template, source).unwrap();
    let template = template.display().to_string();
    let server = Server::start(
        &common::smollm2_gguf(),
        &["--served-model-name", "smollm2", "--chat-template", &template],
    );
    run_client_script(&server, "openai_tools.py");
}

/// curl -i with the server's key; everything it printed.
fn curl(server: &Server, args: &[&str]) -> Output {
    Command::new("curl")
        .args(["-sS", "--max-time", "60", "-H"])
        .arg(format!("Authorization: Bearer {}", server.api_key))
        .args(args)
        .output()
        .expect("running curl (apt-get install curl)")
}

fn fixture_server(extra: &[&str]) -> Server {
    let mut args = vec!["--served-model-name", "fixture"];
    args.extend_from_slice(extra);
    Server::start(&common::a_fixture_model(), &args)
}

#[test]
fn curl_reads_a_well_formed_event_stream() {
    let server = fixture_server(&[]);
    let body = r#"{"model":"fixture","prompt":"Once upon a time","max_tokens":12,"temperature":0,"ignore_eos":true,"stream":true,"stream_options":{"include_usage":true}}"#;
    let url = format!("{}/v1/completions", server.base_url);
    let out = curl(
        &server,
        &["-i", "-N", "-H", "Content-Type: application/json", "--data-binary", body, &url],
    );
    assert!(out.status.success(), "{}", text(&out));
    let raw = String::from_utf8_lossy(&out.stdout).into_owned();
    let (head, body) = raw.split_once("\r\n\r\n").unwrap_or_else(|| panic!("{raw}"));
    let head = head.to_ascii_lowercase();
    assert!(head.starts_with("http/1.1 200"), "{raw}");
    for want in [
        "content-type: text/event-stream",
        "cache-control: no-cache",
        "x-accel-buffering: no",
        "transfer-encoding: chunked",
        "x-request-id: ",
    ] {
        assert!(head.contains(want), "missing `{want}` in:\n{head}");
    }

    // SSE framing: every event is one `data: ` line followed by a blank line.
    assert!(body.ends_with("data: [DONE]\n\n"), "stream end: {body:?}");
    let events: Vec<&str> = body.split_terminator("\n\n").collect();
    let mut text_chunks = 0;
    let mut usage = None;
    for (i, event) in events.iter().enumerate() {
        let data = event.strip_prefix("data: ").unwrap_or_else(|| panic!("event {i}: {event:?}"));
        assert!(!data.contains('\n'), "event {i} spans lines: {event:?}");
        if data == "[DONE]" {
            assert_eq!(i, events.len() - 1, "[DONE] before the end");
            continue;
        }
        let chunk: Value = serde_json::from_str(data).unwrap_or_else(|e| panic!("{e}: {data}"));
        assert_eq!(chunk["object"], "text_completion", "{data}");
        assert_eq!(chunk["model"], "fixture", "{data}");
        if chunk["usage"].is_object() {
            assert_eq!(chunk["choices"], Value::Array(vec![]), "usage chunk: {data}");
            usage = Some(chunk["usage"].clone());
        } else {
            assert!(usage.is_none(), "a chunk after the usage chunk: {data}");
            text_chunks += 1;
        }
    }
    let usage = usage.expect("no usage chunk with include_usage");
    assert_eq!(usage["completion_tokens"], 12, "{usage}");
    assert!(text_chunks >= 2, "{text_chunks} text chunks for 12 tokens");
}

#[test]
fn curl_expect_100_continue_and_bodies_over_the_limit() {
    let server = fixture_server(&["--max-body-bytes", "1048576"]);
    let url = format!("{}/v1/completions", server.base_url);
    let dir = tempfile::tempdir().unwrap();

    // 2 MB over a 1 MiB limit: 413 in OpenAI's shape; curl (Expect: 100-continue)
    // need not send the body at all.
    let big = dir.path().join("big.json");
    let padding = "a".repeat(2_000_000);
    let request =
        format!(r#"{{"model":"fixture","prompt":"Hi","max_tokens":2,"x_padding":"{padding}"}}"#);
    std::fs::write(&big, &request).unwrap();
    let data = format!("@{}", big.display());
    let expect = ["-H", "Expect: 100-continue", "-H", "Content-Type: application/json"];
    let mut args = vec!["-i"];
    args.extend_from_slice(&expect);
    args.extend_from_slice(&["--data-binary", &data, &url]);
    let out = curl(&server, &args);
    let raw = String::from_utf8_lossy(&out.stdout).into_owned();
    let final_head = raw.rsplit("HTTP/1.1 ").next().unwrap_or_default();
    assert!(final_head.starts_with("413"), "{}", text(&out));
    let body = raw.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or_default();
    let body = body.rsplit("\r\n\r\n").next().unwrap_or_default();
    let err: Value = serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {raw}"));
    assert!(err["error"]["message"].is_string(), "{body}");

    // Under the limit, with the same header: answered normally (unknown fields ignored).
    let small = dir.path().join("small.json");
    let padding = "a".repeat(600_000);
    std::fs::write(
        &small,
        format!(r#"{{"model":"fixture","prompt":"Hi","max_tokens":2,"x_padding":"{padding}"}}"#),
    )
    .unwrap();
    let data = format!("@{}", small.display());
    let mut args = vec!["-o", "/dev/null", "-w", "%{http_code}"];
    args.extend_from_slice(&expect);
    args.extend_from_slice(&["--data-binary", &data, &url]);
    let out = curl(&server, &args);
    assert_eq!(String::from_utf8_lossy(&out.stdout), "200", "{}", text(&out));

    // And the server kept serving.
    let health = format!("{}/health", server.base_url);
    let out = curl(&server, &["-o", "/dev/null", "-w", "%{http_code}", &health]);
    assert_eq!(String::from_utf8_lossy(&out.stdout), "200", "{}", text(&out));
}

fn healthcheck(args: &[&str]) -> Output {
    Command::new(common::manifest_dir().join("tools/healthcheck"))
        .args(args)
        .output()
        .expect("running tools/healthcheck")
}

/// `qilin serve --uds PATH` on the fixture model, waiting for its listening line.
fn start_uds(dir: &Path, socket: &Path) -> Child {
    let keys = dir.join("keys");
    std::fs::write(&keys, format!("uds:qk-uds-{:016x}\n", rand::random::<u64>())).unwrap();
    let log = dir.join("stderr.log");
    let mut child = Command::new(env!("CARGO_BIN_EXE_qilin"))
        .args(["serve", "--threads", "1", "--model"])
        .arg(common::a_fixture_model())
        .arg("--uds")
        .arg(socket)
        .arg("--api-key-file")
        .arg(&keys)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .expect("spawning qilin serve --uds");
    let deadline = Instant::now() + Duration::from_secs(120);
    while !std::fs::read_to_string(&log).unwrap_or_default().contains("listening on unix:") {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        if let Some(status) = child.try_wait().unwrap() {
            panic!("qilin serve --uds exited ({status}):\n{text}");
        }
        assert!(Instant::now() < deadline, "qilin serve --uds did not start:\n{text}");
        std::thread::sleep(Duration::from_millis(50));
    }
    child
}

#[test]
fn healthcheck_script_reports_up_and_down() {
    let server = fixture_server(&[]);
    let out = healthcheck(&[&server.base_url]);
    assert!(out.status.success(), "{}", text(&out));
    let line = String::from_utf8_lossy(&out.stdout);
    assert!(line.starts_with("qilin healthy:") && line.lines().count() == 1, "{line}");

    // A port nothing listens on: exit 1, one line saying why.
    let dead = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        format!("http://{}", l.local_addr().unwrap())
    };
    let out = healthcheck(&[&dead]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let line = String::from_utf8_lossy(&out.stdout);
    assert!(line.starts_with("qilin UNHEALTHY:") && line.lines().count() == 1, "{line}");

    // A unix socket server.
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("qilin.sock");
    let mut child = start_uds(dir.path(), &socket);
    let out = healthcheck(&["--uds", &socket.display().to_string()]);
    let _ = child.kill();
    let _ = child.wait();
    assert!(out.status.success(), "{}", text(&out));
    let out = healthcheck(&["--uds", &socket.display().to_string()]);
    assert_eq!(out.status.code(), Some(1), "after the server is gone: {}", text(&out));
}
