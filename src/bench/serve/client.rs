//! The HTTP side of `qilin bench serve`: one shared ureq agent (plain HTTP only; qilin
//! listens on loopback and TLS belongs to the reverse proxy in front of it).

use std::io::ErrorKind;
use std::time::{Duration, Instant};

use serde_json::Value;

use super::sse::{self, clip, Endpoint, StreamError};
use super::stats::RequestTiming;

/// Problems found before the first timed request; each ends the run with its message.
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    #[error(
        "`{0}`: https is not supported here (this client speaks plain HTTP); point --url at \
         the server's loopback port instead, e.g. http://127.0.0.1:8000"
    )]
    Https(String),
    #[error("`{0}`: --url must be an http:// URL, e.g. http://127.0.0.1:8000")]
    BadUrl(String),
    #[error("cannot reach {url}: {reason}")]
    Unreachable { url: String, reason: String },
    #[error(
        "{url} refused the API key (HTTP {status}: {message}); pass --api-key or set QILIN_API_KEY"
    )]
    Unauthorized { url: String, status: u16, message: String },
    #[error("GET {url}/v1/models failed (HTTP {status}: {message}); name the model with --model")]
    Models { url: String, status: u16, message: String },
    #[error("{0}/v1/models lists no model; name one with --model")]
    NoModels(String),
}

/// Why one benchmark request failed; its text goes into the report's error samples.
#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    #[error("HTTP {status}: {message}")]
    Status { status: u16, message: String },
    #[error("{0}")]
    Transport(String),
    #[error(transparent)]
    Stream(#[from] StreamError),
}

pub struct Client {
    agent: ureq::Agent,
    /// Scheme, host and port, no trailing slash, no `/v1`.
    pub base: String,
    auth: Option<String>,
}

/// `http://host:port` from what the user typed; `/v1` (OpenAI's base-URL habit) and
/// trailing slashes are dropped since the routes are appended here.
pub fn normalize_url(url: &str) -> Result<String, SetupError> {
    let url = url.trim();
    let lower = url.to_ascii_lowercase();
    if lower.starts_with("https://") {
        return Err(SetupError::Https(url.to_string()));
    }
    if !lower.starts_with("http://") || url.len() == "http://".len() {
        return Err(SetupError::BadUrl(url.to_string()));
    }
    let mut base = url.trim_end_matches('/');
    if let Some(stripped) = base.strip_suffix("/v1") {
        base = stripped.trim_end_matches('/');
    }
    Ok(base.to_string())
}

impl Client {
    pub fn new(url: &str, api_key: Option<&str>, connections: usize) -> Result<Client, SetupError> {
        let base = normalize_url(url)?;
        let config = ureq::Agent::config_builder()
            // Error statuses are results to report, not transport failures.
            .http_status_as_error(false)
            .timeout_connect(Some(Duration::from_secs(10)))
            // A queued request may wait long for its first byte; a stalled stream
            // should still not hang the run forever.
            .timeout_per_read(Some(Duration::from_secs(600)))
            .max_idle_connections(connections.max(1))
            .max_idle_connections_per_host(connections.max(1))
            .user_agent("qilin-bench-serve")
            .build();
        Ok(Client {
            agent: config.new_agent(),
            base,
            auth: api_key.filter(|k| !k.is_empty()).map(|k| format!("Bearer {k}")),
        })
    }

    /// The model ids of GET /v1/models, turning the first contact into a clear error
    /// when the server is not there or refuses the key.
    pub fn models(&self) -> Result<Vec<String>, SetupError> {
        let url = format!("{}/v1/models", self.base);
        let mut req = self.agent.get(&url);
        if let Some(auth) = &self.auth {
            req = req.header("Authorization", auth);
        }
        let mut resp = req.call().map_err(|e| SetupError::Unreachable {
            url: self.base.clone(),
            reason: describe(&e),
        })?;
        let status = resp.status().as_u16();
        let body =
            resp.body_mut().with_config().limit(1 << 20).read_to_string().unwrap_or_default();
        if status == 401 || status == 403 {
            let message = error_message(&body, status);
            return Err(SetupError::Unauthorized { url: self.base.clone(), status, message });
        }
        if status != 200 {
            let message = error_message(&body, status);
            return Err(SetupError::Models { url: self.base.clone(), status, message });
        }
        let json: Value = serde_json::from_str(&body).unwrap_or(Value::Null);
        let ids = json
            .get("data")
            .and_then(Value::as_array)
            .map(|d| d.iter().filter_map(|m| m.get("id")?.as_str().map(str::to_string)).collect())
            .unwrap_or_default();
        Ok(ids)
    }

    /// Sends one streaming request (`body` is its JSON) and times it to `[DONE]`.
    pub fn stream(&self, endpoint: Endpoint, body: &[u8]) -> Result<RequestTiming, RequestError> {
        let url = format!("{}{}", self.base, endpoint.path());
        let mut req = self
            .agent
            .post(&url)
            .header("Content-Type", "application/json")
            .header("Accept", "text/event-stream");
        if let Some(auth) = &self.auth {
            req = req.header("Authorization", auth);
        }
        let start = Instant::now();
        let mut resp = req.send(body).map_err(|e| RequestError::Transport(describe(&e)))?;
        let status = resp.status().as_u16();
        if status != 200 {
            let text = resp.body_mut().with_config().limit(1 << 20).read_to_string();
            let message = error_message(&text.unwrap_or_default(), status);
            return Err(RequestError::Status { status, message });
        }
        Ok(sse::read_stream(resp.into_body().into_reader(), endpoint, start, Instant::now)?)
    }
}

/// The `error.message` of an OpenAI-shaped error body, else the body itself, else the
/// status's reason phrase.
fn error_message(body: &str, status: u16) -> String {
    let json: Option<Value> = serde_json::from_str(body).ok();
    let message = json.as_ref().and_then(|j| {
        let e = j.get("error")?;
        e.get("message").and_then(Value::as_str).or_else(|| e.as_str()).map(str::to_string)
    });
    match message {
        Some(m) => clip(&m),
        None if !body.trim().is_empty() => clip(body.trim()),
        None => ureq::http::StatusCode::from_u16(status)
            .ok()
            .and_then(|s| s.canonical_reason())
            .unwrap_or("no message")
            .to_string(),
    }
}

fn describe(e: &ureq::Error) -> String {
    match e {
        ureq::Error::Io(io) => match io.kind() {
            ErrorKind::ConnectionRefused => "connection refused".into(),
            ErrorKind::ConnectionReset => "connection reset by the server".into(),
            ErrorKind::ConnectionAborted => "connection aborted".into(),
            ErrorKind::UnexpectedEof => "the server closed the connection".into(),
            _ => io.to_string(),
        },
        ureq::Error::Timeout(t) => format!("timed out ({t})"),
        ureq::Error::HostNotFound => "host not found".into(),
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_normalised_and_https_refused() {
        assert_eq!(normalize_url("http://127.0.0.1:8000").unwrap(), "http://127.0.0.1:8000");
        assert_eq!(normalize_url(" http://127.0.0.1:8000/ ").unwrap(), "http://127.0.0.1:8000");
        assert_eq!(normalize_url("http://localhost:9/v1/").unwrap(), "http://localhost:9");
        let e = normalize_url("https://example.org").unwrap_err().to_string();
        assert!(e.contains("https is not supported") && e.contains("loopback"), "{e}");
        assert!(matches!(normalize_url("127.0.0.1:8000"), Err(SetupError::BadUrl(_))));
        assert!(matches!(normalize_url("http://"), Err(SetupError::BadUrl(_))));
    }

    #[test]
    fn error_messages_come_from_the_openai_error_body() {
        let body = r#"{"error":{"message":"The model `x` does not exist.","type":"invalid_request_error","param":"model","code":"model_not_found"}}"#;
        assert_eq!(error_message(body, 404), "The model `x` does not exist.");
        assert_eq!(error_message("  upstream down ", 502), "upstream down");
        assert_eq!(error_message("", 429), "Too Many Requests");
    }

    #[test]
    fn unreachable_server_is_one_clear_error() {
        // A port that was just free: bind, read the number, close.
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let client = Client::new(&format!("http://127.0.0.1:{port}"), None, 1).unwrap();
        let e = client.models().unwrap_err().to_string();
        assert_eq!(e, format!("cannot reach http://127.0.0.1:{port}: connection refused"));
    }
}
