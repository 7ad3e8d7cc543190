//! Debian's nginx running the shipped site config (tools/nginx/qilin.conf, only ports
//! and certificate paths substituted) with a self-signed certificate in front of a real
//! `qilin serve` on SmolLM2; curl as the TLS client. Proves what production relies on:
//! TLS, the security headers, auth passing through, bodies over the limit stopped at
//! nginx, the client address reaching the audit log from nginx rather than from the
//! client, and SSE chunks arriving one by one rather than all at the end.
//!
//! Without nginx installed these tests fail (CI installs it) unless QILIN_SKIP_NGINX=1.

mod common;

use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::server::{Server, KEY_LABEL};
use serde_json::Value;

const MODEL_NAME: &str = "smollm2";
/// server_name in the shipped config; curl resolves it to 127.0.0.1 and checks the
/// certificate against it.
const HOST: &str = "qilin.example.com";

/// The nginx binary, or None when the caller allowed skipping.
fn nginx_binary() -> Option<PathBuf> {
    if std::env::var("QILIN_SKIP_NGINX").is_ok_and(|v| v == "1") {
        eprintln!("QILIN_SKIP_NGINX=1: skipping the nginx test");
        return None;
    }
    // /usr/sbin is not on every user's PATH.
    let found = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .unwrap_or_default()
        .into_iter()
        .chain([PathBuf::from("/usr/sbin")])
        .map(|d| d.join("nginx"))
        .find(|p| p.is_file());
    match found {
        Some(p) => Some(p),
        None => panic!(
            "nginx not found: install Debian's nginx (`apt-get install nginx`; .ci/run does), \
             or set QILIN_SKIP_NGINX=1 to skip this test"
        ),
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// A self-signed certificate for HOST: (cert.pem, key.pem).
fn self_signed_cert(dir: &Path) -> (PathBuf, PathBuf) {
    let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
    let out = Command::new("openssl")
        .args(["req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1"])
        .args(["-nodes", "-days", "2", "-subj", &format!("/CN={HOST}")])
        .args(["-addext", &format!("subjectAltName=DNS:{HOST}")])
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .output()
        .expect("running openssl (apt-get install openssl)");
    assert!(out.status.success(), "openssl: {}", String::from_utf8_lossy(&out.stderr));
    (cert, key)
}

/// tools/nginx/qilin.conf with the listen ports, the upstream and the certificate
/// replaced; IPv6 listens dropped (not every test machine has ::1).
fn site_config(upstream: SocketAddr, https: u16, http: u16, cert: &Path, key: &Path) -> String {
    let path = common::manifest_dir().join("tools/nginx/qilin.conf");
    let shipped = std::fs::read_to_string(&path).expect("reading tools/nginx/qilin.conf");
    let mut conf: String = shipped
        .lines()
        .filter(|l| !l.trim_start().starts_with("listen [::]"))
        .map(|l| format!("{l}\n"))
        .collect();
    let replacements = [
        ("server 127.0.0.1:8000;".to_string(), format!("server {upstream};")),
        ("listen 443 ssl http2;".to_string(), format!("listen 127.0.0.1:{https} ssl http2;")),
        ("listen 80;".to_string(), format!("listen 127.0.0.1:{http};")),
        ("/etc/ssl/qilin/fullchain.pem".to_string(), cert.display().to_string()),
        ("/etc/ssl/qilin/privkey.pem".to_string(), key.display().to_string()),
    ];
    for (from, to) in replacements {
        assert!(
            conf.contains(&from),
            "tools/nginx/qilin.conf no longer contains `{from}`: update tests/serve_nginx.rs"
        );
        conf = conf.replace(&from, &to);
    }
    conf
}

/// nginx as a child process, everything it writes inside `dir`, killed on drop.
struct Nginx {
    child: Child,
    https: u16,
    http: u16,
    cert: PathBuf,
    dir: PathBuf,
}

impl Nginx {
    fn start(binary: &Path, dir: &Path, upstream: SocketAddr) -> Nginx {
        let (cert, key) = self_signed_cert(dir);
        let (https, http) = (free_port(), free_port());
        std::fs::write(dir.join("site.conf"), site_config(upstream, https, http, &cert, &key))
            .unwrap();
        let d = dir.display();
        // Foreground, one process, no root needed: every path nginx writes is in `dir`.
        let main = format!(
            "daemon off;\nmaster_process off;\nworker_processes 1;\npid {d}/nginx.pid;\n\
             error_log {d}/error.log info;\nevents {{ worker_connections 256; }}\nhttp {{\n\
             access_log {d}/access.log;\nclient_body_temp_path {d}/client_body;\n\
             proxy_temp_path {d}/proxy;\nfastcgi_temp_path {d}/fastcgi;\n\
             uwsgi_temp_path {d}/uwsgi;\nscgi_temp_path {d}/scgi;\ninclude {d}/site.conf;\n}}\n"
        );
        std::fs::write(dir.join("nginx.conf"), main).unwrap();
        let stderr = std::fs::File::create(dir.join("nginx.stderr")).unwrap();
        let child = Command::new(binary)
            .arg("-p")
            .arg(dir)
            .arg("-c")
            .arg(dir.join("nginx.conf"))
            .arg("-e")
            .arg(dir.join("error.log"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .expect("spawning nginx");
        let mut nginx = Nginx { child, https, http, cert, dir: dir.to_path_buf() };
        let deadline = Instant::now() + Duration::from_secs(20);
        while TcpStream::connect(("127.0.0.1", https)).is_err() {
            if let Some(status) = nginx.child.try_wait().unwrap() {
                panic!("nginx exited ({status}):\n{}", nginx.logs());
            }
            assert!(Instant::now() < deadline, "nginx did not listen:\n{}", nginx.logs());
            std::thread::sleep(Duration::from_millis(50));
        }
        nginx
    }

    fn logs(&self) -> String {
        let read = |f: &str| std::fs::read_to_string(self.dir.join(f)).unwrap_or_default();
        format!("{}{}", read("nginx.stderr"), read("error.log"))
    }

    fn url(&self, path: &str) -> String {
        format!("https://{HOST}:{}{path}", self.https)
    }

    /// curl with the test CA, HOST resolved to 127.0.0.1 on both ports.
    fn curl(&self) -> Command {
        let mut cmd = Command::new("curl");
        cmd.args(["-sS", "--max-time", "120", "--cacert"]).arg(&self.cert);
        for port in [self.https, self.http] {
            cmd.args(["--resolve", &format!("{HOST}:{port}:127.0.0.1")]);
        }
        cmd
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One HTTP response as `curl -i` printed it (HTTP/2: lowercase header names).
struct Response {
    status: u16,
    headers: Vec<(String, String)>,
    body: String,
}

impl Response {
    fn parse(out: &Output) -> Response {
        assert!(out.status.success(), "curl failed: {}", String::from_utf8_lossy(&out.stderr));
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
        let mut lines = head.lines();
        let status_line = lines.next().unwrap_or_default();
        let status = status_line
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("no status line in: {text}"));
        let headers = lines
            .filter_map(|l| l.split_once(':'))
            .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
            .collect();
        Response { status, headers, body: body.to_string() }
    }

    fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
    }

    fn json(&self) -> Value {
        serde_json::from_str(&self.body)
            .unwrap_or_else(|e| panic!("{e}: status {} body {}", self.status, self.body))
    }
}

fn run(cmd: &mut Command) -> Response {
    Response::parse(&cmd.output().expect("running curl (apt-get install curl)"))
}

/// qilin (trusting nginx's headers, writing an audit log) with nginx in front.
struct Stack {
    nginx: Nginx,
    qilin: Server,
    audit: PathBuf,
    _dir: tempfile::TempDir,
}

fn stack() -> Option<Stack> {
    let binary = nginx_binary()?;
    let dir = tempfile::tempdir().unwrap();
    let audit = dir.path().join("audit.jsonl");
    let audit_arg = audit.display().to_string();
    let qilin = Server::start(
        &common::smollm2_gguf(),
        &[
            "--served-model-name",
            MODEL_NAME,
            "--trusted-proxy",
            "127.0.0.1",
            "--audit-log",
            &audit_arg,
        ],
    );
    let nginx = Nginx::start(&binary, dir.path(), qilin.addr);
    Some(Stack { nginx, qilin, audit, _dir: dir })
}

impl Stack {
    fn post(&self, path: &str, key: Option<&str>, body: &str) -> Command {
        let mut cmd = self.nginx.curl();
        cmd.args(["-i", "-X", "POST", "-H", "Content-Type: application/json"]);
        if let Some(key) = key {
            cmd.args(["-H", &format!("Authorization: Bearer {key}")]);
        }
        cmd.args(["--data-binary", body]).arg(self.nginx.url(path));
        cmd
    }

    /// The audit line with this request id (qilin appends it after answering).
    fn audit_line(&self, request_id: &str) -> Value {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let log = std::fs::read_to_string(&self.audit).unwrap_or_default();
            let found = log.lines().find_map(|l| {
                let v: Value = serde_json::from_str(l)
                    .unwrap_or_else(|e| panic!("audit line is not JSON ({e}): {l}"));
                let ours = v.as_object()?.values().any(|x| x.as_str() == Some(request_id));
                ours.then_some(v)
            });
            if let Some(v) = found {
                return v;
            }
            assert!(Instant::now() < deadline, "no audit line for {request_id} in:\n{log}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

fn assert_security_headers(r: &Response, what: &str) {
    let expect = [
        ("strict-transport-security", "max-age=63072000; includeSubDomains"),
        ("x-content-type-options", "nosniff"),
        ("x-frame-options", "DENY"),
        ("referrer-policy", "no-referrer"),
    ];
    for (name, value) in expect {
        assert_eq!(r.header(name), Some(value), "{what}: header {name} in {:?}", r.headers);
    }
    // server_tokens off: no version for scanners.
    let server = r.header("server").unwrap_or_default();
    assert!(!server.contains('/'), "{what}: Server header names a version: {server}");
}

#[test]
fn nginx_terminates_tls_and_forwards_auth_headers_and_client_address() {
    let Some(s) = stack() else { return };

    // /health through TLS (HTTP/2 by ALPN), security headers on it.
    let health = run(s.nginx.curl().arg("-i").arg(s.nginx.url("/health")));
    assert_eq!(health.status, 200, "{}\n{}", health.body, s.nginx.logs());
    assert_eq!(health.json()["status"], "ok");
    assert_security_headers(&health, "/health");
    assert!(health.header("x-request-id").is_some(), "X-Request-Id lost: {:?}", health.headers);

    // Plain HTTP only redirects to https.
    let plain = format!("http://{HOST}:{}/v1/models", s.nginx.http);
    let redirect = run(s.nginx.curl().arg("-i").arg(&plain));
    assert_eq!(redirect.status, 301, "{}", redirect.body);
    let location = redirect.header("location").unwrap_or_default();
    assert!(location.starts_with("https://") && location.ends_with("/v1/models"), "{location}");

    // No token, and a wrong token: qilin's 401 passes through, headers added.
    let chat = format!(
        r#"{{"model":"{MODEL_NAME}","messages":[{{"role":"user","content":"What is the capital of France?"}}],"max_tokens":16,"temperature":0}}"#
    );
    for key in [None, Some("qk-wrong")] {
        let r = run(&mut s.post("/v1/chat/completions", key, &chat));
        assert_eq!(r.status, 401, "key {key:?}: {}", r.body);
        assert_eq!(r.json()["error"]["type"], "authentication_error", "{}", r.body);
        let challenge = r.header("www-authenticate").unwrap_or_default();
        assert!(challenge.starts_with("Bearer"), "WWW-Authenticate: {:?}", r.headers);
        assert_security_headers(&r, "401");
    }

    // A real answer through the whole chain, with spoofed client addresses: nginx
    // replaces X-Real-IP with the address it saw, and qilin (trusting 127.0.0.1) logs that.
    let mut cmd = s.post("/v1/chat/completions", Some(&s.qilin.api_key), &chat);
    cmd.args(["-H", "X-Forwarded-For: 203.0.113.7", "-H", "X-Real-IP: 203.0.113.8"]);
    let r = run(&mut cmd);
    assert_eq!(r.status, 200, "{}", r.body);
    let answer =
        r.json()["choices"][0]["message"]["content"].as_str().unwrap_or_default().to_string();
    assert!(answer.contains("Paris"), "answer: {answer}");
    assert_security_headers(&r, "chat");
    let id = r.header("x-request-id").expect("X-Request-Id through nginx").to_string();
    let line = s.audit_line(&id);
    assert_eq!(line["client"], "127.0.0.1", "audit client should be nginx's $remote_addr: {line}");
    let text = line.to_string();
    assert!(!text.contains("203.0.113"), "a client-supplied address reached the audit log: {line}");
    assert!(text.contains(KEY_LABEL), "audit line without the key label: {line}");
    assert!(!text.contains(&s.qilin.api_key), "audit line contains the token: {line}");
    assert!(!text.contains("Paris") && !text.contains("capital"), "audit has content: {line}");

    // client_max_body_size 8m: a 7 MiB body reaches qilin (its JSON error), 9 MiB stops at nginx.
    for (mib, want) in [(7usize, 400u16), (9, 413)] {
        let file = s.nginx.dir.join(format!("body-{mib}"));
        std::fs::write(&file, vec![b'x'; mib << 20]).unwrap();
        let mut cmd = s.nginx.curl();
        cmd.args(["-i", "-H", "Content-Type: application/json", "-H"])
            .arg(format!("Authorization: Bearer {}", s.qilin.api_key))
            .arg("--data-binary")
            .arg(format!("@{}", file.display()))
            .arg(s.nginx.url("/v1/completions"));
        let r = run(&mut cmd);
        assert_eq!(r.status, want, "{mib} MiB body: {}", r.body);
        if want == 400 {
            assert!(r.json()["error"]["message"].is_string(), "{}", r.body);
        }
    }

    // Still serving after all of it.
    let health = run(s.nginx.curl().arg("-i").arg(s.nginx.url("/health")));
    assert_eq!(health.status, 200);
}

#[test]
fn sse_chunks_arrive_one_by_one_through_nginx() {
    let Some(s) = stack() else { return };
    // A first request pages the weights in; time the stream on a warm server.
    let warm = format!(r#"{{"model":"{MODEL_NAME}","prompt":"Hello","max_tokens":2}}"#);
    let r = run(&mut s.post("/v1/completions", Some(&s.qilin.api_key), &warm));
    assert_eq!(r.status, 200, "{}", r.body);
    let body = format!(
        r#"{{"model":"{MODEL_NAME}","messages":[{{"role":"user","content":"Tell me a long story about a dragon."}}],"max_tokens":64,"temperature":0,"ignore_eos":true,"stream":true}}"#
    );
    let mut cmd = s.post("/v1/chat/completions", Some(&s.qilin.api_key), &body);
    // -N: curl writes every piece it receives at once; we timestamp each line.
    cmd.arg("-N").stdout(Stdio::piped()).stderr(Stdio::piped());
    let start = Instant::now();
    let mut child = cmd.spawn().expect("running curl");
    let stdout = child.stdout.take().unwrap();
    let mut lines: Vec<(Duration, String)> = Vec::new();
    for line in BufReader::new(stdout).lines() {
        let line = line.expect("reading curl's output");
        lines.push((start.elapsed(), line.trim_end_matches('\r').to_string()));
    }
    let status = child.wait().unwrap();
    let all: Vec<&str> = lines.iter().map(|(_, l)| l.as_str()).collect();
    assert!(status.success(), "curl failed: {status}\n{}", all.join("\n"));

    let head_end = all.iter().position(|l| l.is_empty()).expect("no end of headers");
    let head = &all[..head_end];
    assert!(head[0].contains(" 200"), "{}", all.join("\n"));
    let header = |name: &str| {
        head.iter()
            .filter_map(|l| l.split_once(':'))
            .find(|(k, _)| k.trim().eq_ignore_ascii_case(name))
            .map(|(_, v)| v.trim().to_string())
    };
    let content_type = header("content-type").unwrap_or_default();
    assert!(content_type.starts_with("text/event-stream"), "{}", head.join("\n"));
    assert_eq!(header("x-content-type-options").as_deref(), Some("nosniff"));

    let events: Vec<(Duration, &str)> = lines[head_end..]
        .iter()
        .filter_map(|(t, l)| Some((*t, l.strip_prefix("data: ")?)))
        .collect();
    assert_eq!(events.last().map(|e| e.1), Some("[DONE]"), "{}", all.join("\n"));
    let mut text = String::new();
    for (_, data) in &events[..events.len() - 1] {
        let chunk: Value = serde_json::from_str(data).unwrap_or_else(|e| panic!("{e}: {data}"));
        assert_eq!(chunk["object"], "chat.completion.chunk", "{data}");
        if let Some(t) = chunk["choices"][0]["delta"]["content"].as_str() {
            text.push_str(t);
        }
    }
    assert!(events.len() >= 32, "{} events for 64 tokens:\n{}", events.len(), all.join("\n"));
    assert!(!text.is_empty(), "no content in the stream");

    // Arrival times: at ~100 tokens/s, 64 tokens take most of a second. Buffering
    // anywhere on the way would deliver them in a few bursts instead.
    let times: Vec<Duration> = events.iter().map(|e| e.0).collect();
    let mut distinct = 1;
    let mut last = times[0];
    for &t in &times[1..] {
        if t - last > Duration::from_millis(5) {
            distinct += 1;
            last = t;
        }
    }
    let (first, end) = (times[0], times[times.len() - 1]);
    let report =
        format!("arrivals (ms): {:?}", times.iter().map(|t| t.as_millis()).collect::<Vec<_>>());
    assert!(distinct >= 10, "only {distinct} distinct arrival times; {report}");
    assert!(end - first >= Duration::from_millis(100), "stream arrived at once; {report}");
    assert!(first < end / 2, "first chunk only at {first:?} of {end:?}; {report}");
}
