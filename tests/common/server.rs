//! A real `qilin serve` process for the HTTP tests: started on an OS-chosen loopback
//! port with a fresh API key, its stderr captured to a file, killed on drop.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct Server {
    child: Child,
    pub addr: SocketAddr,
    pub base_url: String,
    pub api_key: String,
    pub dir: tempfile::TempDir,
    stderr_path: PathBuf,
}

/// The label the key file gives the test key (it shows in the audit log).
pub const KEY_LABEL: &str = "test-suite";

impl Server {
    /// `qilin serve --model MODEL --port 0 --api-key-file KEYFILE EXTRA...`, waiting
    /// until it prints its `listening on http://ADDR` line.
    pub fn start(model: &Path, extra: &[&str]) -> Server {
        let dir = tempfile::tempdir().expect("tempdir");
        let api_key = format!("qk-test-{:016x}", rand::random::<u64>());
        let key_file = dir.path().join("keys");
        std::fs::write(&key_file, format!("# test keys\n{KEY_LABEL}:{api_key}\n")).unwrap();
        let mut args: Vec<String> = vec![
            "serve".into(),
            "--model".into(),
            model.display().to_string(),
            "--port".into(),
            "0".into(),
            "--api-key-file".into(),
            key_file.display().to_string(),
            "--threads".into(),
            "2".into(),
        ];
        args.extend(extra.iter().map(|s| s.to_string()));
        Self::spawn(args, dir, api_key)
    }

    /// Starts `qilin` with exactly `args` (no key file, no port added).
    pub fn spawn(args: Vec<String>, dir: tempfile::TempDir, api_key: String) -> Server {
        Self::spawn_env(args, dir, api_key, &[])
    }

    pub fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr_path).unwrap_or_default()
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits for the process to exit (after a signal) and returns its exit code.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<i32> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status.code();
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }

    /// One raw HTTP/1.1 exchange: sends `request` bytes as they are and returns
    /// everything the server wrote until it closed the connection (or 30 s passed).
    pub fn raw(&self, request: &[u8]) -> String {
        let mut stream = TcpStream::connect(self.addr).unwrap();
        stream.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        stream.write_all(request).unwrap();
        let mut out = Vec::new();
        let _ = stream.read_to_end(&mut out);
        String::from_utf8_lossy(&out).into_owned()
    }

    /// GET /metrics with the key; the Prometheus text.
    pub fn metrics_text(&self) -> String {
        let req = format!(
            "GET /metrics HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {}\r\nConnection: close\r\n\r\n",
            self.api_key
        );
        let resp = self.raw(req.as_bytes());
        assert!(resp.starts_with("HTTP/1.1 200"), "metrics: {resp}");
        resp.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default()
    }

    /// The value of one sample line of /metrics (`name` with its labels, as printed),
    /// e.g. `qilin:num_requests_running` or `qilin:http_requests_total{route="/health",status="200"}`.
    pub fn metric(&self, sample: &str) -> Option<f64> {
        metric_value(&self.metrics_text(), sample)
    }
}

pub fn metric_value(text: &str, sample: &str) -> Option<f64> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|l| l.strip_prefix(sample)?.strip_prefix(' ')?.trim().parse().ok())
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

// ---- helpers for the serve_* tests (helper E) ----

/// One HTTP response as the tests look at it.
#[derive(Debug)]
pub struct Reply {
    pub status: u16,
    /// Names lower-cased, in the order received.
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl Reply {
    pub fn header(&self, name: &str) -> Option<&str> {
        let name = name.to_ascii_lowercase();
        self.headers.iter().find(|(n, _)| *n == name).map(|(_, v)| v.as_str())
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| {
            panic!("not JSON ({e}): status {} body {:?}", self.status, self.body)
        })
    }

    /// Asserts `status` and OpenAI's error shape; returns the `error` object.
    pub fn expect_error(&self, status: u16) -> serde_json::Value {
        assert_eq!(self.status, status, "wanted {status}, got {self:?}");
        let v = self.json();
        let err = v.get("error").unwrap_or_else(|| panic!("no `error` object: {v}"));
        let obj = err.as_object().unwrap_or_else(|| panic!("`error` is not an object: {v}"));
        for key in ["message", "type", "param", "code"] {
            assert!(obj.contains_key(key), "error object lacks `{key}`: {v}");
        }
        assert!(err["message"].as_str().is_some_and(|m| !m.is_empty()), "empty message: {v}");
        assert!(err["type"].is_string(), "type not a string: {v}");
        err.clone()
    }
}

/// A ureq agent that returns 4xx/5xx as responses, with generous timeouts.
pub fn agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(300)))
        .build()
        .into()
}

/// Reads a ureq response into a `Reply`.
pub fn reply_of(mut resp: ureq::http::Response<ureq::Body>) -> Reply {
    let status = resp.status().as_u16();
    let headers = resp
        .headers()
        .iter()
        .map(|(n, v)| {
            (n.as_str().to_ascii_lowercase(), String::from_utf8_lossy(v.as_bytes()).into_owned())
        })
        .collect();
    let bytes = resp
        .body_mut()
        .with_config()
        .limit(64 << 20)
        .read_to_vec()
        .expect("reading the response body");
    Reply { status, headers, body: String::from_utf8_lossy(&bytes).into_owned() }
}

impl Server {
    /// `method path` with `key` as bearer token (None: no Authorization header) and an
    /// optional JSON body.
    pub fn call(&self, method: &str, path: &str, key: Option<&str>, body: Option<&str>) -> Reply {
        let url = format!("{}{}", self.base_url, path);
        let mut req = ureq::http::Request::builder().method(method).uri(&url);
        if let Some(k) = key {
            req = req.header("Authorization", format!("Bearer {k}"));
        }
        let result = match body {
            Some(b) => {
                let req =
                    req.header("Content-Type", "application/json").body(b.to_string()).unwrap();
                agent().run(req)
            }
            None => agent().run(req.body(()).unwrap()),
        };
        reply_of(result.unwrap_or_else(|e| panic!("{method} {path}: transport error {e}")))
    }

    /// GET with the test key.
    pub fn get(&self, path: &str) -> Reply {
        self.call("GET", path, Some(&self.api_key), None)
    }

    /// POST a JSON value with the test key.
    pub fn post(&self, path: &str, body: &serde_json::Value) -> Reply {
        self.call("POST", path, Some(&self.api_key), Some(&body.to_string()))
    }

    /// Like `spawn`, with extra environment variables; waits for either listening line
    /// (for `--uds`, `addr` is a placeholder: read the path from `stderr()`).
    pub fn spawn_env(
        args: Vec<String>,
        dir: tempfile::TempDir,
        api_key: String,
        env: &[(&str, &str)],
    ) -> Server {
        let stderr_path = dir.path().join("stderr.log");
        let stderr = std::fs::File::create(&stderr_path).unwrap();
        let mut child = Command::new(env!("CARGO_BIN_EXE_qilin"))
            .args(&args)
            .env_remove("QILIN_API_KEYS")
            .env_remove("API_TOKENS")
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .expect("spawning qilin serve");
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let log = std::fs::read_to_string(&stderr_path).unwrap_or_default();
            let tcp = log.split("listening on http://").nth(1);
            if tcp.is_some() || log.contains("listening on unix:") {
                let addr: SocketAddr = match tcp {
                    Some(rest) => rest.split_whitespace().next().unwrap().parse().unwrap(),
                    None => SocketAddr::from(([127, 0, 0, 1], 0)),
                };
                return Server {
                    child,
                    addr,
                    base_url: format!("http://{addr}"),
                    api_key,
                    dir,
                    stderr_path,
                };
            }
            if let Some(status) = child.try_wait().unwrap() {
                panic!("qilin serve exited ({status}) before listening:\n{log}");
            }
            assert!(Instant::now() < deadline, "qilin serve did not start in time:\n{log}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Polls `sample` until `pred` holds; returns the last value or panics after `timeout`.
    pub fn wait_metric(&self, sample: &str, timeout: Duration, pred: impl Fn(f64) -> bool) -> f64 {
        let deadline = Instant::now() + timeout;
        loop {
            let v = self.metric(sample);
            if let Some(v) = v.filter(|v| pred(*v)) {
                return v;
            }
            assert!(Instant::now() < deadline, "{sample} stayed at {v:?} for {timeout:?}");
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// Splits a raw HTTP/1.x response (as `Server::raw` returns it) into status, headers
/// and body (de-chunked); `None` when no status line came back.
pub fn parse_raw(resp: &str) -> Option<Reply> {
    let (head, rest) = resp.split_once("\r\n\r\n")?;
    let mut lines = head.split("\r\n");
    let status = lines.next()?.split_whitespace().nth(1)?.parse().ok()?;
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    let chunked = headers.iter().any(|(n, v)| n == "transfer-encoding" && v.contains("chunked"));
    let len = headers.iter().find(|(n, _)| n == "content-length").and_then(|(_, v)| v.parse().ok());
    let body = if chunked {
        dechunk(rest)
    } else if let Some(len) = len {
        rest.get(..len).unwrap_or(rest).to_string()
    } else {
        rest.to_string()
    };
    Some(Reply { status, headers, body })
}

fn dechunk(mut rest: &str) -> String {
    let mut out = String::new();
    while let Some((size, after)) = rest.split_once("\r\n") {
        let Ok(n) = usize::from_str_radix(size.split(';').next().unwrap_or("").trim(), 16) else {
            break;
        };
        let (Some(chunk), Some(tail)) = (after.get(..n), after.get(n..)) else { break };
        if n == 0 {
            break;
        }
        out.push_str(chunk);
        rest = tail.strip_prefix("\r\n").unwrap_or(tail);
    }
    out
}

/// The `data:` payloads of an SSE body, in order (including a final `[DONE]`).
pub fn sse_data(body: &str) -> Vec<String> {
    body.lines().filter_map(|l| l.strip_prefix("data:")).map(|d| d.trim().to_string()).collect()
}
