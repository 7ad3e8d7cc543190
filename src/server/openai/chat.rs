//! The chat prompt of a request: OpenAI messages (text parts, tool calls and results)
//! turned into what the chat template reads, rendered as vLLM renders them.

use serde_json::{json, Value};

use super::{missing, Fields, ParseContext, ToolRequest};
use crate::server::error::{clip, ApiError};
use crate::server::tool_calls;
use crate::tokenizer::RenderOptions;

/// A chat request's `tools`, `tool_choice` and `parallel_tool_calls`, checked against
/// the model's chat template (`tool_calls::parse_request`).
pub(super) fn chat_tools(f: &Fields, ctx: &ParseContext) -> Result<Option<ToolRequest>, ApiError> {
    tool_calls::parse_request(
        f.get("tools"),
        f.get("tool_choice"),
        f.get("parallel_tool_calls"),
        ctx.tokenizer.special().chat_template.as_deref(),
    )
}

/// The chat prompt of `messages` (+ `add_generation_prompt`, `continue_final_message`,
/// `chat_template_kwargs`), rendered as vLLM renders it.
pub(super) fn render_chat(
    f: &Fields,
    ctx: &ParseContext,
    tools: Option<&ToolRequest>,
) -> Result<String, ApiError> {
    let messages = chat_messages(f.get("messages").ok_or_else(|| missing("messages"))?)?;
    let continue_final = f.bool("continue_final_message")?.unwrap_or(false);
    let add_generation_prompt = f.bool("add_generation_prompt")?.unwrap_or(!continue_final);
    if continue_final && add_generation_prompt {
        return Err(ApiError::invalid_param(
            "continue_final_message",
            "`continue_final_message` and `add_generation_prompt` cannot both be true",
        ));
    }
    let mut opts = RenderOptions::default();
    match f.get("chat_template_kwargs") {
        None => {}
        Some(Value::Object(kwargs)) => {
            const RESERVED: [&str; 5] = [
                "messages",
                "add_generation_prompt",
                "continue_final_message",
                "tools",
                "documents",
            ];
            if let Some(k) = kwargs.keys().find(|k| RESERVED.contains(&k.as_str())) {
                return Err(ApiError::invalid_param(
                    "chat_template_kwargs",
                    format!("`{}` cannot be set through `chat_template_kwargs`", clip(k, 40)),
                ));
            }
            opts.extra_context = kwargs.clone();
        }
        Some(_) => {
            return Err(ApiError::invalid_param("chat_template_kwargs", "must be an object"))
        }
    }
    if let Some(tools) = tools {
        opts.extra_context.insert("tools".into(), Value::Array(tools.tools.clone()));
    }
    let mut text = apply_template(ctx, &messages, add_generation_prompt, &opts)?;
    if continue_final {
        // transformers: cut the render right after the final message's content, so the
        // model goes on with it instead of starting a new turn.
        let last = messages.last().and_then(|m| m["content"].as_str()).unwrap_or_default();
        for needle in [last, last.trim()] {
            if let Some(at) = text.rfind(needle) {
                text.truncate(at + needle.len());
                break;
            }
        }
    }
    Ok(text)
}

pub(super) fn apply_template(
    ctx: &ParseContext,
    messages: &[Value],
    add_generation_prompt: bool,
    opts: &RenderOptions,
) -> Result<String, ApiError> {
    if ctx.tokenizer.chat_template().is_none() {
        return Err(ApiError::bad_request(
            "this model has no chat template; send a plain prompt to /v1/completions instead",
        ));
    }
    ctx.tokenizer.apply_chat_template_json(messages, add_generation_prompt, opts).map_err(|e| {
        ApiError::invalid_param(
            "messages",
            format!(
                "the model's chat template rejected these messages: {}",
                clip(&e.to_string(), 200)
            ),
        )
    })
}

/// OpenAI messages -> `{"role", "content"}` objects with string content, as vLLM
/// hands them to the template: text parts joined by newlines, `developer` as `system`,
/// an assistant's `tool_calls` with their arguments parsed, a tool's `tool_call_id`.
fn chat_messages(value: &Value) -> Result<Vec<Value>, ApiError> {
    let bad = |msg: String| ApiError::invalid_param("messages", msg);
    let items = value.as_array().ok_or_else(|| bad("`messages` must be an array".into()))?;
    if items.is_empty() {
        return Err(bad("`messages` must not be empty".into()));
    }
    let mut out = Vec::with_capacity(items.len());
    for (i, m) in items.iter().enumerate() {
        let m = m.as_object().ok_or_else(|| bad(format!("message {i} must be an object")))?;
        let m = Fields(m);
        let role = m
            .get("role")
            .and_then(Value::as_str)
            .ok_or_else(|| bad(format!("message {i}: `role` must be a string")))?;
        let role = match role {
            "system" | "user" | "assistant" | "tool" => role,
            "developer" => "system",
            "function" => {
                return Err(bad(format!(
                    "message {i}: the legacy role `function` is not supported; use `tool`"
                )))
            }
            other => return Err(bad(format!("message {i}: unknown role `{}`", clip(other, 32)))),
        };
        if m.get("function_call").is_some_and(|v| !v.is_null()) {
            return Err(bad(format!(
                "message {i}: the legacy `function_call` is not supported; use `tool_calls`"
            )));
        }
        let calls = match m.get("tool_calls") {
            None | Some(Value::Null) => None,
            Some(Value::Array(a)) if a.is_empty() => None,
            Some(_) if role != "assistant" => {
                return Err(bad(format!("message {i}: only assistant messages carry `tool_calls`")))
            }
            Some(calls) => Some(tool_calls::message_tool_calls(i, calls)?),
        };
        let content = match m.get("content") {
            Some(Value::String(s)) => s.clone(),
            Some(Value::Array(parts)) => {
                text_parts(parts).map_err(|e| bad(format!("message {i}: {e}")))?
            }
            None | Some(Value::Null) if role == "assistant" => String::new(),
            None => return Err(bad(format!("message {i}: `content` is required"))),
            Some(_) => {
                return Err(bad(format!(
                    "message {i}: `content` must be a string or an array of text parts"
                )))
            }
        };
        let mut message = json!({"role": role, "content": content});
        if let Some(calls) = calls {
            message["tool_calls"] = calls;
        }
        if role == "tool" {
            if let Some(id) = m.get("tool_call_id").and_then(Value::as_str) {
                message["tool_call_id"] = json!(id);
            }
        }
        out.push(message);
    }
    Ok(out)
}

fn text_parts(parts: &[Value]) -> Result<String, String> {
    let mut texts = Vec::with_capacity(parts.len());
    for part in parts {
        match (part.get("type").and_then(Value::as_str), part.get("text")) {
            (Some("text"), Some(Value::String(t))) => texts.push(t.as_str()),
            (Some("text"), _) => return Err("a text part needs a string `text`".into()),
            (Some(kind), _) => {
                return Err(format!(
                    "only text content is supported, got a `{}` part",
                    clip(kind, 32)
                ))
            }
            (None, _) => return Err("each content part needs a `type`".into()),
        }
    }
    Ok(texts.join("\n"))
}
