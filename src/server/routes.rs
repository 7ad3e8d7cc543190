//! One request from head to audit line: route lookup, authentication, dispatch, the
//! error response, the metrics and the audit record.

use std::net::IpAddr;
use std::time::Instant;

use serde_json::{json, Value};

use super::audit::{now_rfc3339, AuditRecord};
use super::error::ApiError;
use super::generation;
use super::http::{Conn, HttpError, Request};
use super::openai::{self, ParseContext, Route as GenRoute};
use super::state::{App, MAX_STEP};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Handler {
    Health,
    Metrics,
    Models,
    Tokenize,
    Detokenize,
    Generation(GenRoute),
}

struct RouteSpec {
    pattern: &'static str,
    method: &'static str,
    handler: Handler,
}

const ROUTES: &[RouteSpec] = &[
    RouteSpec { pattern: "/health", method: "GET", handler: Handler::Health },
    RouteSpec { pattern: "/metrics", method: "GET", handler: Handler::Metrics },
    RouteSpec { pattern: "/v1/models", method: "GET", handler: Handler::Models },
    RouteSpec {
        pattern: "/v1/chat/completions",
        method: "POST",
        handler: Handler::Generation(GenRoute::ChatCompletions),
    },
    RouteSpec {
        pattern: "/v1/completions",
        method: "POST",
        handler: Handler::Generation(GenRoute::Completions),
    },
    RouteSpec { pattern: "/tokenize", method: "POST", handler: Handler::Tokenize },
    RouteSpec { pattern: "/detokenize", method: "POST", handler: Handler::Detokenize },
    RouteSpec {
        pattern: "/generate",
        method: "POST",
        handler: Handler::Generation(GenRoute::Generate),
    },
    RouteSpec {
        pattern: "/api/chat",
        method: "POST",
        handler: Handler::Generation(GenRoute::ApiChat),
    },
];

/// What the audit line and the metrics record about one exchange.
pub struct Exchange {
    pub request_id: String,
    pub start: Instant,
    pub route: &'static str,
    pub method: String,
    pub key_label: Option<String>,
    pub model: Option<String>,
    pub status: u16,
    pub prompt_tokens: Option<usize>,
    pub completion_tokens: Option<usize>,
    pub finish_reason: Option<String>,
}

impl Exchange {
    /// A request just read: a fresh id, the clock started, nothing answered yet.
    fn new(route: &'static str, method: String) -> Exchange {
        Exchange {
            request_id: new_request_id(),
            start: Instant::now(),
            route,
            method,
            key_label: None,
            model: None,
            status: 0,
            prompt_tokens: None,
            completion_tokens: None,
            finish_reason: None,
        }
    }
}

/// How a handler answered.
pub enum Reply {
    Json(u16, Value),
    Text(u16, &'static str, String),
    /// The handler wrote the response itself (a stream); `keep_alive` says whether the
    /// connection is still usable.
    Written {
        keep_alive: bool,
    },
    /// The client went away; nothing more can be written.
    ClientGone,
}

/// Status recorded for a request whose client disconnected (nginx's convention).
pub const CLIENT_CLOSED: u16 = 499;

/// Serves one request; returns whether the connection may carry another.
pub fn handle(app: &App, conn: &mut Conn, request: Request, peer: Option<IpAddr>) -> bool {
    let path = request.path().to_string();
    let spec = ROUTES.iter().find(|r| r.pattern == path);
    let mut ex = Exchange::new(spec.map_or("other", |s| s.pattern), request.method.clone());
    let head_only = request.method == "HEAD";
    let outcome = dispatch(app, conn, &request, spec, &mut ex);
    let keep_alive = match outcome {
        Ok(Reply::Json(status, body)) => {
            ex.status = status;
            let bytes = serde_json::to_vec(&body).unwrap_or_default();
            let headers = [json_type(), ("X-Request-Id", ex.request_id.clone())];
            conn.respond(status, &headers, &bytes, request.keep_alive, head_only).is_ok()
                && request.keep_alive
        }
        Ok(Reply::Text(status, content_type, body)) => {
            ex.status = status;
            let headers = [
                ("Content-Type", content_type.to_string()),
                ("X-Request-Id", ex.request_id.clone()),
            ];
            conn.respond(status, &headers, body.as_bytes(), request.keep_alive, head_only).is_ok()
                && request.keep_alive
        }
        Ok(Reply::Written { keep_alive }) => keep_alive && request.keep_alive,
        Ok(Reply::ClientGone) => {
            ex.status = CLIENT_CLOSED;
            false
        }
        Err(error) => {
            ex.status = error.status;
            send_error(conn, &error, &ex.request_id, request.keep_alive, head_only)
                && request.keep_alive
        }
    };
    finish(app, &ex, peer, &request);
    keep_alive
}

fn dispatch(
    app: &App,
    conn: &mut Conn,
    request: &Request,
    spec: Option<&RouteSpec>,
    ex: &mut Exchange,
) -> Result<Reply, ApiError> {
    let public = match spec.map(|s| s.handler) {
        Some(Handler::Health) => true,
        Some(Handler::Metrics) => app.metrics_public,
        _ => false,
    };
    if !public {
        // Authenticate before revealing which paths exist.
        let label =
            app.keys.check(request.header("authorization")).ok_or_else(ApiError::unauthorized)?;
        ex.key_label = Some(label.to_string());
    }
    let Some(spec) = spec else {
        return Err(ApiError::not_found("no such route"));
    };
    let method_ok =
        request.method == spec.method || (spec.method == "GET" && request.method == "HEAD");
    if !method_ok {
        return Err(ApiError::method_not_allowed(spec.method));
    }
    if app.is_draining() && spec.handler != Handler::Health {
        return Err(ApiError::unavailable("the server is shutting down"));
    }
    let ctx = ParseContext {
        tokenizer: &app.tokenizer,
        defaults: &app.defaults,
        max_model_len: app.max_model_len,
    };
    match spec.handler {
        Handler::Health => Ok(if app.engine.is_healthy(MAX_STEP) && !app.is_draining() {
            Reply::Json(200, json!({"status": "ok"}))
        } else {
            Reply::Json(503, json!({"status": "unavailable"}))
        }),
        Handler::Metrics => Ok(Reply::Text(
            200,
            super::metrics::CONTENT_TYPE,
            app.metrics.render(&app.engine.snapshot()),
        )),
        Handler::Models => Ok(Reply::Json(
            200,
            openai::models_list(&app.served_names, app.created, app.max_model_len),
        )),
        Handler::Tokenize => Ok(Reply::Json(200, openai::tokenize(&request.body, &ctx)?)),
        Handler::Detokenize => Ok(Reply::Json(200, openai::detokenize(&request.body, &ctx)?)),
        Handler::Generation(route) => generation::serve(app, conn, request, route, &ctx, ex),
    }
}

/// Answers a request that could not even be read, then the connection closes.
pub fn reject(app: &App, conn: &mut Conn, error: HttpError, peer: Option<IpAddr>) {
    let api = ApiError::new(error.status, "invalid_request_error", error.message);
    let ex = Exchange { status: api.status, ..Exchange::new("other", "-".into()) };
    send_error(conn, &api, &ex.request_id, false, false);
    app.metrics.http_request(ex.route, ex.status);
    write_audit(app, &ex, app.proxies.client_address(peer, None, None));
}

/// Refuses a connection beyond --max-connections.
pub fn refuse_connection(conn: &mut Conn) {
    let api = ApiError::unavailable("too many open connections");
    send_error(conn, &api, &new_request_id(), false, false);
}

fn send_error(
    conn: &mut Conn,
    error: &ApiError,
    request_id: &str,
    keep_alive: bool,
    head_only: bool,
) -> bool {
    let mut headers = vec![json_type(), ("X-Request-Id", request_id.to_string())];
    if error.status == 401 {
        headers.push(("WWW-Authenticate", "Bearer".into()));
    }
    if let Some(allow) = error.allow {
        headers.push(("Allow", allow.to_string()));
    }
    if let Some(seconds) = error.retry_after {
        headers.push(("Retry-After", seconds.to_string()));
    }
    let body = serde_json::to_vec(&error.body()).unwrap_or_default();
    conn.respond(error.status, &headers, &body, keep_alive, head_only).is_ok()
}

fn finish(app: &App, ex: &Exchange, peer: Option<IpAddr>, request: &Request) {
    app.metrics.http_request(ex.route, ex.status);
    let client = app.proxies.client_address(
        peer,
        request.header("x-real-ip"),
        request.header("x-forwarded-for"),
    );
    write_audit(app, ex, client);
}

fn write_audit(app: &App, ex: &Exchange, client: String) {
    let Some(log) = &app.audit else { return };
    let record = AuditRecord {
        time: now_rfc3339(),
        request_id: ex.request_id.clone(),
        key_label: ex.key_label.clone(),
        client,
        method: ex.method.clone(),
        route: ex.route.to_string(),
        model: ex.model.clone(),
        status: ex.status,
        prompt_tokens: ex.prompt_tokens,
        completion_tokens: ex.completion_tokens,
        duration_ms: ex.start.elapsed().as_secs_f64() * 1e3,
        finish_reason: ex.finish_reason.clone(),
    };
    if let Err(e) = log.write(&record) {
        tracing::error!("audit log write failed: {e}");
    }
}

fn json_type() -> (&'static str, String) {
    ("Content-Type", "application/json".into())
}

/// 128 random bits as hex: unique per request, and unguessable.
pub fn new_request_id() -> String {
    format!("{:032x}", rand::random::<u128>())
}
