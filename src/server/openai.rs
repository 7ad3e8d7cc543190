//! OpenAI / vLLM wire formats, request side: request bodies of every generation route
//! parsed and validated into an engine request, and the small vLLM utility routes
//! (`/tokenize`, `/detokenize`). Pure functions, no I/O; the answer side
//! (response bodies, SSE chunks) is `openai_response.rs`.
//!
//! A parameter that would change the output and that the engine does not implement is
//! a 400 naming it, never silently ignored; unknown fields are ignored (clients send
//! many). `null` counts as absent, as OpenAI's clients send nulls for unset fields.

use serde_json::{json, Map, Value};

use super::error::ApiError;
use super::tool_calls::ToolRequest;
use crate::engine::SamplingParams;
use crate::model::loader::GenerationDefaults;
use crate::tokenizer::{RenderOptions, Tokenizer};
use chat::{apply_template, chat_tools, render_chat};

pub use super::openai_response::{final_response, models_list, ResponseMeta, StreamState};

pub struct ParseContext<'a> {
    pub tokenizer: &'a Tokenizer,
    pub defaults: &'a GenerationDefaults,
    pub max_model_len: usize,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Route {
    ChatCompletions,
    Completions,
    Generate,
    ApiChat,
}

impl Route {
    fn streams(self) -> bool {
        matches!(self, Route::ChatCompletions | Route::Completions)
    }
}

/// A generation request as the engine and the response builders need it.
#[derive(Clone, Debug, PartialEq)]
pub struct GenRequest {
    pub route: Route,
    /// As sent; the router checks it against the served names.
    pub model: Option<String>,
    pub prompt_ids: Vec<u32>,
    /// The rendered prompt (for `echo` and `/generate`'s prompt + completion).
    pub prompt_text: String,
    /// Validated, `max_tokens` resolved.
    pub params: SamplingParams,
    pub stream: bool,
    /// `stream_options.include_usage`.
    pub include_usage: bool,
    /// Completions only: the prompt text goes in front of the answer.
    pub echo: bool,
    /// Report logprobs in the response (`params.top_logprobs` is then `Some(k)`).
    pub logprobs: bool,
    /// Chat with `tools` (and `tool_choice` "auto"): the answer is read for tool calls.
    pub tools: Option<ToolRequest>,
}

/// The most stop sequences a request may carry (OpenAI allows 4; vLLM has no limit).
const MAX_STOP: usize = 16;

type IsSet = fn(&Value) -> bool;

/// Fields that would change the output and that the engine does not implement, with
/// the test for "set to something other than its neutral value".
const UNSUPPORTED: &[(&str, IsSet)] = &[
    ("logit_bias", |v| !v.as_object().is_some_and(Map::is_empty)),
    ("functions", |v| !v.as_array().is_some_and(Vec::is_empty)),
    ("function_call", |v| !matches!(v.as_str(), Some("none" | "auto"))),
    ("response_format", |v| v.get("type").and_then(Value::as_str) != Some("text")),
    ("suffix", |v| v.as_str() != Some("")),
    ("best_of", |v| int_of(v) != Some(1)),
    ("use_beam_search", |v| v != &Value::Bool(false)),
    ("min_tokens", |v| int_of(v) != Some(0)),
    ("prompt_logprobs", |_| true),
    ("include_stop_str_in_output", |v| v != &Value::Bool(false)),
    ("skip_special_tokens", |v| v != &Value::Bool(true)),
    ("truncate_prompt_tokens", |_| true),
    ("chat_template", |_| true),
    ("documents", |v| !v.as_array().is_some_and(Vec::is_empty)),
    ("guided_json", |_| true),
    ("guided_regex", |_| true),
    ("guided_choice", |_| true),
    ("guided_grammar", |_| true),
    ("structured_outputs", |_| true),
    ("bad_words", |v| !v.as_array().is_some_and(Vec::is_empty)),
    ("allowed_token_ids", |_| true),
    ("logits_processors", |v| !v.as_array().is_some_and(Vec::is_empty)),
    ("audio", |_| true),
    ("modalities", |v| v != &json!(["text"])),
    ("prompt_embeds", |_| true),
];

/// Parses and validates the body of a generation route.
pub fn parse_request(
    route: Route,
    body: &[u8],
    ctx: &ParseContext,
) -> Result<GenRequest, ApiError> {
    let obj = parse_object(body)?;
    let f = Fields(&obj);
    let model = f.string("model")?.map(str::to_string);
    if let Some(n) = f.uint("n")? {
        if n != 1 {
            return Err(ApiError::invalid_param("n", "only n=1 is supported"));
        }
    }
    for (name, active) in UNSUPPORTED {
        if f.get(name).is_some_and(active) {
            return Err(ApiError::invalid_param(
                name,
                format!("`{name}` is not supported by this server"),
            ));
        }
    }
    let tools = if route == Route::ChatCompletions {
        chat_tools(&f, ctx)?
    } else {
        for name in ["tools", "tool_choice"] {
            if f.get(name).is_some_and(|v| !v.is_null()) {
                return Err(ApiError::invalid_param(
                    name,
                    format!("`{name}` is only supported on /v1/chat/completions"),
                ));
            }
        }
        None
    };

    let stream = f.bool("stream")?.unwrap_or(false);
    if stream && !route.streams() {
        return Err(ApiError::invalid_param(
            "stream",
            "streaming is only supported on /v1/chat/completions and /v1/completions",
        ));
    }
    let include_usage = match f.get("stream_options") {
        None => false,
        Some(_) if !stream => {
            return Err(ApiError::invalid_param(
                "stream_options",
                "`stream_options` is only allowed when `stream` is true",
            ))
        }
        Some(Value::Object(opts)) => {
            let opts = Fields(opts);
            if opts.bool("continuous_usage_stats")? == Some(true) {
                return Err(ApiError::invalid_param(
                    "stream_options",
                    "`continuous_usage_stats` is not supported by this server",
                ));
            }
            opts.bool("include_usage")
                .map_err(|_| {
                    ApiError::invalid_param("stream_options", "`include_usage` must be a boolean")
                })?
                .unwrap_or(false)
        }
        Some(_) => return Err(ApiError::invalid_param("stream_options", "must be an object")),
    };

    let echo = f.bool("echo")?.unwrap_or(false);
    if echo && route == Route::ChatCompletions {
        return Err(ApiError::invalid_param("echo", "`echo` is not supported for chat"));
    }
    // `/generate` always answers prompt + completion; `/api/chat` never does.
    let echo = echo && route == Route::Completions;
    let top_logprobs = requested_logprobs(route, &f)?;
    if echo && top_logprobs.is_some() {
        return Err(ApiError::invalid_param(
            "echo",
            "`echo` together with `logprobs` is not supported (prompt logprobs are not computed)",
        ));
    }
    // Bad sampling fields are found before the (costlier) prompt.
    let mut params = sampling_params(route, &f, ctx, top_logprobs)?;
    params.validate().map_err(|e| ApiError::invalid_param(e.param, e.to_string()))?;

    let (prompt_ids, prompt_text, prompt_param) = match route {
        Route::ChatCompletions => {
            let text = render_chat(&f, ctx, tools.as_ref())?;
            let ids = encode(ctx, &text, f.bool("add_special_tokens")?.unwrap_or(false))?;
            (ids, text, "messages")
        }
        Route::Completions | Route::Generate => {
            let (ids, text) = completion_prompt(&f, ctx)?;
            (ids, text, "prompt")
        }
        Route::ApiChat => {
            let message = f.string("message")?.ok_or_else(|| missing("message"))?;
            if message.is_empty() {
                return Err(ApiError::invalid_param("message", "`message` must not be empty"));
            }
            let messages = [json!({"role": "user", "content": message})];
            let text = apply_template(ctx, &messages, true, &RenderOptions::default())?;
            (encode(ctx, &text, false)?, text, "message")
        }
    };

    params.max_tokens =
        resolve_max_tokens(route, &f, ctx.max_model_len, prompt_ids.len(), prompt_param)?;
    params.validate().map_err(|e| ApiError::invalid_param(e.param, e.to_string()))?;
    Ok(GenRequest {
        route,
        model,
        prompt_ids,
        prompt_text,
        params,
        stream,
        include_usage,
        echo,
        logprobs: top_logprobs.is_some(),
        tools,
    })
}

/// The `model` a body names, for routes that parse no generation request
/// (`/tokenize`, `/detokenize`); `None` when absent or unreadable.
pub fn body_model(body: &[u8]) -> Option<String> {
    let value: Value = serde_json::from_slice(body).ok()?;
    value.get("model")?.as_str().map(str::to_string)
}

/// vLLM's `/tokenize`: `{"prompt", "add_special_tokens" = true}` or
/// `{"messages", "add_generation_prompt" = true, "add_special_tokens" = false}`.
pub fn tokenize(body: &[u8], ctx: &ParseContext) -> Result<Value, ApiError> {
    let obj = parse_object(body)?;
    let f = Fields(&obj);
    let ids = match (f.get("prompt"), f.get("messages")) {
        (Some(_), Some(_)) => {
            return Err(ApiError::bad_request("give either `prompt` or `messages`, not both"))
        }
        (None, Some(_)) => {
            let tools = chat_tools(&f, ctx)?;
            let text = render_chat(&f, ctx, tools.as_ref())?;
            encode(ctx, &text, f.bool("add_special_tokens")?.unwrap_or(false))?
        }
        (_, None) => {
            let prompt = f.string("prompt")?.ok_or_else(|| missing("prompt"))?;
            encode(ctx, prompt, f.bool("add_special_tokens")?.unwrap_or(true))?
        }
    };
    let mut out = json!({"count": ids.len(), "max_model_len": ctx.max_model_len, "tokens": ids});
    if f.bool("return_token_strs")? == Some(true) {
        let inner = ctx.tokenizer.inner();
        out["token_strs"] = ids.iter().map(|&id| inner.id_to_token(id)).collect();
    }
    Ok(out)
}

/// vLLM's `/detokenize`: `{"tokens": [ids]}` -> `{"prompt": text}`.
pub fn detokenize(body: &[u8], ctx: &ParseContext) -> Result<Value, ApiError> {
    let obj = parse_object(body)?;
    let tokens = Fields(&obj).get("tokens").ok_or_else(|| missing("tokens"))?;
    let ids = token_ids(tokens, ctx.tokenizer, "tokens")?;
    let text = ctx.tokenizer.decode(&ids, false).map_err(|_| ApiError::internal())?;
    Ok(json!({"prompt": text}))
}

/// The body as a JSON object. serde_json's syntax errors say what and where (line,
/// column) without quoting the input, so they are safe to return.
fn parse_object(body: &[u8]) -> Result<Map<String, Value>, ApiError> {
    let text = std::str::from_utf8(body)
        .map_err(|_| ApiError::bad_request("request body is not valid UTF-8"))?;
    match serde_json::from_str::<Value>(text) {
        Ok(Value::Object(obj)) => Ok(obj),
        Ok(_) => Err(ApiError::bad_request("request body must be a JSON object")),
        Err(e) => Err(ApiError::bad_request(format!("request body is not valid JSON: {e}"))),
    }
}

fn missing(param: &str) -> ApiError {
    ApiError::invalid_param(param, format!("`{param}` is required"))
}

fn encode(ctx: &ParseContext, text: &str, add_special: bool) -> Result<Vec<u32>, ApiError> {
    ctx.tokenizer.encode(text, add_special).map_err(|_| ApiError::internal())
}

/// `prompt`: a string, an array of token ids, or either wrapped in a one-element array.
fn completion_prompt(f: &Fields, ctx: &ParseContext) -> Result<(Vec<u32>, String), ApiError> {
    let bad = |msg: &str| ApiError::invalid_param("prompt", msg);
    let mut prompt = f.get("prompt").ok_or_else(|| missing("prompt"))?;
    if let Value::Array(items) = prompt {
        if items.len() > 1 && items.iter().all(|p| p.is_string() || p.is_array()) {
            return Err(bad(
                "several prompts in one request are not supported; send one request per prompt",
            ));
        }
        if let [one @ (Value::String(_) | Value::Array(_))] = items.as_slice() {
            prompt = one;
        }
    }
    let (ids, text) = match prompt {
        Value::String(text) => {
            if text.is_empty() {
                return Err(bad("`prompt` must not be empty"));
            }
            (encode(ctx, text, f.bool("add_special_tokens")?.unwrap_or(true))?, text.clone())
        }
        Value::Array(_) => {
            let ids = token_ids(prompt, ctx.tokenizer, "prompt")?;
            let text = ctx.tokenizer.decode(&ids, false).map_err(|_| ApiError::internal())?;
            (ids, text)
        }
        _ => return Err(bad("`prompt` must be a string or an array of token ids")),
    };
    if ids.is_empty() {
        return Err(bad("`prompt` must not be empty"));
    }
    Ok((ids, text))
}

/// An array of token ids, each in the tokenizer's vocabulary.
fn token_ids(value: &Value, tokenizer: &Tokenizer, param: &str) -> Result<Vec<u32>, ApiError> {
    let vocab = tokenizer.vocab_size();
    let bad = || {
        ApiError::invalid_param(
            param,
            format!("`{param}` must be an array of token ids in [0, {vocab})"),
        )
    };
    let items = value.as_array().ok_or_else(bad)?;
    items
        .iter()
        .map(|v| match int_of(v) {
            Some(id) if (0..vocab as i128).contains(&id) => Ok(id as u32),
            _ => Err(bad()),
        })
        .collect()
}

/// The `top_logprobs` count the request asks for, if it asks for logprobs at all.
fn requested_logprobs(route: Route, f: &Fields) -> Result<Option<usize>, ApiError> {
    match route {
        Route::ChatCompletions => {
            let top = f.uint("top_logprobs")?;
            match f.bool("logprobs")? {
                Some(true) => Ok(Some(top.unwrap_or(0) as usize)),
                // vLLM: a zero `top_logprobs` alone asks for nothing and is accepted.
                _ if top.is_some_and(|k| k > 0) => Err(ApiError::invalid_param(
                    "top_logprobs",
                    "`top_logprobs` needs `logprobs` set to true",
                )),
                _ => Ok(None),
            }
        }
        Route::Completions => match f.uint("logprobs")? {
            Some(k) if k > crate::engine::sampling_params::MAX_TOP_LOGPROBS as u64 => {
                Err(ApiError::invalid_param("logprobs", format!("must be in [0, 20], got {k}")))
            }
            k => Ok(k.map(|k| k as usize)),
        },
        // Their answers have no place for logprobs.
        Route::Generate | Route::ApiChat => Ok(None),
    }
}

/// `max_tokens` (chat: `max_completion_tokens` first, as vLLM) checked against the
/// context; absent, the route's default capped by the room the prompt leaves.
fn resolve_max_tokens(
    route: Route,
    f: &Fields,
    max_model_len: usize,
    prompt_len: usize,
    prompt_param: &str,
) -> Result<usize, ApiError> {
    let mut requested = None;
    let names: &[&str] = match route {
        Route::ChatCompletions => &["max_completion_tokens", "max_tokens"],
        _ => &["max_tokens"],
    };
    for &name in names {
        if let Some(n) = f.uint(name)? {
            if n == 0 {
                return Err(ApiError::invalid_param(name, format!("`{name}` must be at least 1")));
            }
            requested = requested.or(Some((name, n)));
        }
    }
    let what = prompt_param;
    if prompt_len >= max_model_len {
        return Err(ApiError::invalid_param(
            prompt_param,
            format!(
                "This model's maximum context length is {max_model_len} tokens. However, you \
                 requested {prompt_len} tokens in the {what}, which leaves no room for the \
                 completion. Please reduce the length of the {what}."
            ),
        ));
    }
    let room = max_model_len - prompt_len;
    match requested {
        Some((name, n)) if n > room as u64 => Err(ApiError::invalid_param(
            name,
            format!(
                "This model's maximum context length is {max_model_len} tokens. However, you \
                 requested {} tokens ({prompt_len} in the {what}, {n} in the completion). \
                 Please reduce the length of the {what} or completion.",
                prompt_len as u64 + n
            ),
        )),
        Some((_, n)) => Ok(n as usize),
        None => Ok(match route {
            Route::ChatCompletions => room,
            Route::Completions | Route::Generate => room.min(16),
            Route::ApiChat => room.min(1024),
        }),
    }
}

/// Request value, else the model's generation_config, else OpenAI's default
/// (`/api/chat`: temperature 0.7). `max_tokens` is left to `resolve_max_tokens`.
fn sampling_params(
    route: Route,
    f: &Fields,
    ctx: &ParseContext,
    top_logprobs: Option<usize>,
) -> Result<SamplingParams, ApiError> {
    let base = SamplingParams::default();
    let d = ctx.defaults;
    let default_temperature = match route {
        Route::ApiChat => Some(0.7),
        _ => d.temperature,
    };
    let top_k = match f.int("top_k")? {
        Some(-1 | 0) => 0,
        Some(k) if k > 0 => usize::try_from(k).unwrap_or(usize::MAX),
        Some(_) => {
            return Err(ApiError::invalid_param(
                "top_k",
                "must be -1 (disabled) or a positive integer",
            ))
        }
        None => d.top_k.unwrap_or(base.top_k),
    };
    let stop = match f.get("stop") {
        None => Vec::new(),
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(items)) if items.len() <= MAX_STOP => items
            .iter()
            .map(|s| s.as_str().map(str::to_string))
            .collect::<Option<Vec<_>>>()
            .ok_or_else(|| {
                ApiError::invalid_param("stop", "`stop` must be a string or an array of strings")
            })?,
        Some(Value::Array(_)) => {
            return Err(ApiError::invalid_param(
                "stop",
                format!("at most {MAX_STOP} stop sequences"),
            ))
        }
        Some(_) => {
            return Err(ApiError::invalid_param(
                "stop",
                "`stop` must be a string or an array of strings",
            ))
        }
    };
    let stop_token_ids = match f.get("stop_token_ids") {
        None => Vec::new(),
        Some(v) => token_ids(v, ctx.tokenizer, "stop_token_ids")?,
    };
    let params = SamplingParams {
        temperature: f.number("temperature")?.or(default_temperature).unwrap_or(base.temperature),
        top_k,
        top_p: f.number("top_p")?.or(d.top_p).unwrap_or(base.top_p),
        min_p: f.number("min_p")?.unwrap_or(base.min_p),
        repetition_penalty: f
            .number("repetition_penalty")?
            .or(d.repetition_penalty)
            .unwrap_or(base.repetition_penalty),
        presence_penalty: f.number("presence_penalty")?.unwrap_or(base.presence_penalty),
        frequency_penalty: f.number("frequency_penalty")?.unwrap_or(base.frequency_penalty),
        seed: f.uint("seed")?,
        max_tokens: base.max_tokens, // resolved once the prompt length is known
        stop,
        stop_token_ids,
        ignore_eos: f.bool("ignore_eos")?.unwrap_or(false),
        top_logprobs,
    };
    Ok(params)
}

/// An integer, also when written as an integral float (`5.0`); `None` for anything else.
fn int_of(v: &Value) -> Option<i128> {
    if let Some(i) = v.as_i64() {
        return Some(i.into());
    }
    if let Some(u) = v.as_u64() {
        return Some(u.into());
    }
    // 2^64 is the first float past u64; integral floats below it convert exactly.
    v.as_f64()
        .filter(|x| x.fract() == 0.0 && x.abs() < 18_446_744_073_709_551_616.0)
        .map(|x| x as i128)
}

/// Typed access to a request object's fields; a wrong type is a 400 naming the field.
struct Fields<'a>(&'a Map<String, Value>);

impl<'a> Fields<'a> {
    fn get(&self, key: &str) -> Option<&'a Value> {
        self.0.get(key).filter(|v| !v.is_null())
    }

    fn typed<T>(
        &self,
        key: &str,
        what: &str,
        f: impl Fn(&'a Value) -> Option<T>,
    ) -> Result<Option<T>, ApiError> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => f(v)
                .map(Some)
                .ok_or_else(|| ApiError::invalid_param(key, format!("`{key}` must be {what}"))),
        }
    }

    fn string(&self, key: &str) -> Result<Option<&'a str>, ApiError> {
        self.typed(key, "a string", Value::as_str)
    }

    fn bool(&self, key: &str) -> Result<Option<bool>, ApiError> {
        self.typed(key, "a boolean", Value::as_bool)
    }

    /// A number that fits an f32.
    fn number(&self, key: &str) -> Result<Option<f32>, ApiError> {
        self.typed(key, "a number", |v| v.as_f64().map(|x| x as f32).filter(|x| x.is_finite()))
    }

    fn int(&self, key: &str) -> Result<Option<i64>, ApiError> {
        self.typed(key, "an integer", |v| int_of(v).and_then(|i| i64::try_from(i).ok()))
    }

    fn uint(&self, key: &str) -> Result<Option<u64>, ApiError> {
        self.typed(key, "a non-negative integer", |v| int_of(v).and_then(|i| u64::try_from(i).ok()))
    }
}

mod chat;
#[cfg(test)]
mod tests;
