//! A generation request on its connection thread: admission, submission to the
//! engine, then either one JSON answer or an SSE stream. While it waits the thread
//! watches the socket, the request timeout and the shutdown, and aborts the sequence
//! the moment the answer can no longer be delivered.

use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use super::error::ApiError;
use super::http::{Conn, Request};
use super::listen::Stream;
use super::openai::{self, GenRequest, ParseContext, ResponseMeta, Route, StreamState};
use super::routes::{Exchange, Reply};
use super::sse;
use super::state::App;
use crate::engine::{GenerateError, GenerationOutput, RequestEvent};

/// How often a waiting thread looks at the socket and the clock.
const POLL: Duration = Duration::from_millis(20);

pub fn serve(
    app: &App,
    conn: &mut Conn,
    request: &Request,
    route: Route,
    ctx: &ParseContext,
    ex: &mut Exchange,
) -> Result<Reply, ApiError> {
    let req = openai::parse_request(route, &request.body, ctx)?;
    ex.model = req.model.clone();
    if let Some(model) = &req.model {
        if !app.served_names.iter().any(|n| n == model) {
            return Err(ApiError::model_not_found(model));
        }
    }
    if req.stream && !matches!(route, Route::ChatCompletions | Route::Completions) {
        return Err(ApiError::invalid_param(
            "stream",
            "streaming is supported on /v1/chat/completions and /v1/completions",
        ));
    }
    let _slot = app.admit()?;
    let prompt_tokens = req.prompt_ids.len();
    let (seq, events) = match app.engine.submit(req.prompt_ids.clone(), req.params.clone()) {
        Ok(Ok(submitted)) => submitted,
        Ok(Err(e)) => return Err(generate_error(e)),
        Err(_) => return Err(ApiError::unavailable("the engine has stopped")),
    };
    ex.prompt_tokens = Some(prompt_tokens);
    let meta = ResponseMeta {
        id: format!("{}-{}", id_prefix(route), ex.request_id),
        created: unix_now(),
        model: req.model.clone().unwrap_or_else(|| app.model_name().to_string()),
    };
    let mut watch = Watch::new(app, ex.start, events);
    let outcome = if req.stream {
        stream(app, conn, request, &req, meta, &mut watch, ex)
    } else {
        wait(app, conn, &req, &meta, &mut watch, ex)
    };
    if watch.finished.is_none() {
        // Timed out, client gone, shutdown or engine failure: stop spending compute.
        let _ = app.engine.abort(seq);
    }
    let reason = ex.finish_reason.clone().unwrap_or_else(|| "abort".into());
    app.metrics.request_finished(
        ex.start.elapsed(),
        watch.finished.as_ref().map(|o| o.timings.queued),
        prompt_tokens,
        watch.tokens,
        &reason,
    );
    ex.completion_tokens = Some(watch.tokens);
    outcome
}

fn wait(
    app: &App,
    conn: &mut Conn,
    req: &GenRequest,
    meta: &ResponseMeta,
    watch: &mut Watch,
    ex: &mut Exchange,
) -> Result<Reply, ApiError> {
    loop {
        match watch.next(&conn.stream) {
            Next::Token(_) => {}
            Next::Finished => break,
            Next::ClientGone => return Ok(Reply::ClientGone),
            Next::TimedOut => {
                ex.finish_reason = Some("timeout".into());
                return Err(ApiError::timeout());
            }
            Next::ShuttingDown => {
                ex.finish_reason = Some("abort".into());
                return Err(ApiError::unavailable("the server is shutting down"));
            }
            Next::Failed => return Err(ApiError::internal()),
        }
    }
    let output = watch.finished.as_ref().ok_or_else(ApiError::internal)?;
    ex.finish_reason = Some(finish_name(output).into());
    Ok(Reply::Json(200, openai::final_response(req, meta, output, &app.tokenizer)))
}

fn stream(
    app: &App,
    conn: &mut Conn,
    request: &Request,
    req: &GenRequest,
    meta: ResponseMeta,
    watch: &mut Watch,
    ex: &mut Exchange,
) -> Result<Reply, ApiError> {
    let mut headers: Vec<(&str, String)> = sse::headers().into();
    headers.push(("X-Request-Id", ex.request_id.clone()));
    let Ok(mut body) = conn.start_stream(200, &headers, request.minor_version) else {
        return Ok(Reply::ClientGone);
    };
    ex.status = 200;
    let mut state = StreamState::new(req, meta);
    let (reason, error) = loop {
        let next = watch.next_with(|| body.peer_closed());
        match next {
            Next::Token(step) => {
                for chunk in state.on_token(&step, &app.tokenizer) {
                    if body.send(&sse::event(&chunk)).is_err() {
                        return Ok(Reply::ClientGone);
                    }
                }
            }
            Next::Finished => {
                let output = watch.finished.as_ref().ok_or_else(ApiError::internal)?;
                break (finish_name(output), None);
            }
            Next::ClientGone => return Ok(Reply::ClientGone),
            Next::TimedOut => break ("timeout", None),
            Next::ShuttingDown => {
                break ("abort", Some(ApiError::unavailable("the server is shutting down")))
            }
            Next::Failed => break ("abort", Some(ApiError::internal())),
        }
    };
    ex.finish_reason = Some(reason.to_string());
    let cached = watch.finished.as_ref().map_or(0, |o| o.cached_prompt_tokens);
    let mut tail = Vec::new();
    if let Some(error) = error {
        // The status line is long gone; OpenAI-style clients read an error event.
        tail.extend(sse::event(&error.body()));
    } else {
        for chunk in state.on_finish(reason, req.prompt_ids.len(), watch.tokens, cached) {
            tail.extend(sse::event(&chunk));
        }
    }
    tail.extend_from_slice(sse::DONE);
    if body.send(&tail).and_then(|_| body.finish()).is_err() {
        return Ok(Reply::ClientGone);
    }
    Ok(Reply::Written { keep_alive: true })
}

enum Next {
    Token(crate::engine::output::TokenStep),
    Finished,
    ClientGone,
    TimedOut,
    ShuttingDown,
    Failed,
}

/// A request's event channel with everything that can end the wait.
struct Watch<'a> {
    app: &'a App,
    events: Receiver<RequestEvent>,
    start: Instant,
    deadline: Instant,
    last_token: Option<Instant>,
    tokens: usize,
    finished: Option<Box<GenerationOutput>>,
}

impl<'a> Watch<'a> {
    fn new(app: &'a App, start: Instant, events: Receiver<RequestEvent>) -> Self {
        Watch {
            app,
            events,
            start,
            deadline: start + app.request_timeout,
            last_token: None,
            tokens: 0,
            finished: None,
        }
    }

    fn next(&mut self, stream: &Stream) -> Next {
        self.next_with(|| stream.peer_closed())
    }

    fn next_with(&mut self, peer_closed: impl Fn() -> bool) -> Next {
        loop {
            let left = self.deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Next::TimedOut;
            }
            match self.events.recv_timeout(left.min(POLL)) {
                Ok(RequestEvent::Token(step)) => {
                    let now = Instant::now();
                    match self.last_token {
                        None => self.app.metrics.time_to_first_token(now - self.start),
                        Some(last) => self.app.metrics.inter_token_latency(now - last),
                    }
                    self.last_token = Some(now);
                    self.tokens += 1;
                    return Next::Token(step);
                }
                Ok(RequestEvent::Finished(output)) => {
                    self.finished = Some(output);
                    return Next::Finished;
                }
                Ok(RequestEvent::Failed(message)) => {
                    tracing::error!("engine failure while serving a request: {message}");
                    return Next::Failed;
                }
                Err(RecvTimeoutError::Disconnected) => return Next::Failed,
                Err(RecvTimeoutError::Timeout) => {}
            }
            if self.app.is_aborting() {
                return Next::ShuttingDown;
            }
            if peer_closed() {
                return Next::ClientGone;
            }
        }
    }
}

fn finish_name(output: &GenerationOutput) -> &'static str {
    match output.finish_reason {
        crate::engine::FinishReason::Stop => "stop",
        crate::engine::FinishReason::Length => "length",
    }
}

fn generate_error(e: GenerateError) -> ApiError {
    match e {
        GenerateError::EmptyPrompt => ApiError::invalid_param("prompt", "the prompt is empty"),
        GenerateError::TokenOutOfRange { .. } | GenerateError::PromptTooLong { .. } => {
            ApiError::invalid_param("prompt", e.to_string())
        }
        GenerateError::InvalidParam(p) => ApiError::invalid_param(p.param, p.message),
        GenerateError::Tokenizer(_) => ApiError::bad_request("the prompt could not be tokenized"),
        GenerateError::Rejected(message) => ApiError::bad_request(message),
        GenerateError::Stalled => ApiError::internal(),
    }
}

fn id_prefix(route: Route) -> &'static str {
    match route {
        Route::ChatCompletions | Route::ApiChat => "chatcmpl",
        Route::Completions | Route::Generate => "cmpl",
    }
}

fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}
