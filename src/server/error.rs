//! Errors as clients see them: an HTTP status and OpenAI's error object
//! `{"error": {"message", "type", "param", "code"}}`. Messages say what the client did
//! wrong and never echo internals, file paths or tokens.

use serde_json::{json, Value};

#[derive(Clone, Debug, PartialEq)]
pub struct ApiError {
    pub status: u16,
    pub message: String,
    /// OpenAI's `type`: `invalid_request_error`, `authentication_error`, ...
    pub kind: &'static str,
    /// The request field at fault, when there is one.
    pub param: Option<String>,
    pub code: Option<&'static str>,
    /// Seconds a client should wait before retrying (429, 503).
    pub retry_after: Option<u64>,
    /// The methods a 405 names in its `Allow` header.
    pub allow: Option<&'static str>,
}

impl ApiError {
    pub fn new(status: u16, kind: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            status,
            message: message.into(),
            kind,
            param: None,
            code: None,
            retry_after: None,
            allow: None,
        }
    }

    /// 400 about one request field.
    pub fn invalid_param(param: &str, message: impl Into<String>) -> Self {
        ApiError { param: Some(param.to_string()), ..Self::bad_request(message) }
    }

    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(400, "invalid_request_error", message)
    }

    pub fn unauthorized() -> Self {
        ApiError {
            code: Some("invalid_api_key"),
            ..Self::new(401, "authentication_error", "missing or invalid bearer token")
        }
    }

    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(404, "not_found_error", message)
    }

    pub fn model_not_found(model: &str) -> Self {
        ApiError {
            param: Some("model".into()),
            code: Some("model_not_found"),
            ..Self::not_found(format!("the model `{}` does not exist", clip(model, 64)))
        }
    }

    /// 405 for a route served only by `allowed`; a GET route also answers HEAD.
    pub fn method_not_allowed(allowed: &'static str) -> Self {
        ApiError {
            allow: Some(if allowed == "GET" { "GET, HEAD" } else { allowed }),
            ..Self::new(405, "invalid_request_error", format!("method not allowed; use {allowed}"))
        }
    }

    pub fn payload_too_large(limit: usize) -> Self {
        Self::new(413, "invalid_request_error", format!("request body exceeds {limit} bytes"))
    }

    pub fn too_many_requests() -> Self {
        ApiError {
            retry_after: Some(1),
            code: Some("queue_full"),
            ..Self::new(429, "rate_limit_error", "the server's request queue is full; retry later")
        }
    }

    pub fn timeout() -> Self {
        Self::new(504, "timeout_error", "the request ran past the server's request timeout")
    }

    pub fn internal() -> Self {
        Self::new(500, "internal_error", "the engine failed while serving this request")
    }

    pub fn unavailable(message: impl Into<String>) -> Self {
        ApiError { retry_after: Some(1), ..Self::new(503, "service_unavailable", message) }
    }

    pub fn body(&self) -> Value {
        json!({"error": {
            "message": self.message,
            "type": self.kind,
            "param": self.param,
            "code": self.code,
        }})
    }
}

/// A user-supplied string shortened for an error message, on a character boundary.
pub fn clip(s: &str, max_chars: usize) -> String {
    match s.char_indices().nth(max_chars) {
        Some((i, _)) => format!("{}...", &s[..i]),
        None => s.to_string(),
    }
}
