//! OpenAI tool calling on `/v1/chat/completions`, for chat templates of the Hermes format
//! (Qwen2.5, Qwen3, NousResearch Hermes): the template puts the `tools` into the prompt
//! and tells the model to answer a call as
//! `<tool_call>\n{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call>`
//! (Qwen2.5's template, verbatim). This module checks the request's `tools`,
//! `tool_choice` and tool messages, and turns such blocks in the answer into
//! `tool_calls`, whole or streamed.
//!
//! Without constrained decoding the model may answer in prose instead; so `auto` and
//! `none` are served, and `required` or a named function are refused with a 400 rather than
//! silently not enforced. An answer whose blocks are not the JSON the template asks for
//! stays plain content, as vLLM's Hermes parser leaves it.

use serde_json::{json, Map, Value};

use super::error::ApiError;

/// The tag pair of the Hermes format.
const OPEN: &str = "<tool_call>";
const CLOSE: &str = "</tool_call>";

/// What the request asked of tool calling, once validated.
#[derive(Clone, Debug, PartialEq)]
pub struct ToolRequest {
    /// The `tools` as sent (OpenAI's `{"type": "function", "function": {...}}`), which the
    /// template renders: transformers and vLLM hand them over unchanged.
    pub tools: Vec<Value>,
    /// `parallel_tool_calls` (default true): false keeps only the first call.
    pub parallel: bool,
}

/// `tools`, `tool_choice` and `parallel_tool_calls` of a chat request: `None` when the
/// answer is not to be parsed for calls (no tools, or `tool_choice: "none"`, whose
/// prompt then carries no tools either, as with OpenAI where the model cannot call).
pub fn parse_request(
    tools: Option<&Value>,
    tool_choice: Option<&Value>,
    parallel: Option<&Value>,
    chat_template: Option<&str>,
) -> Result<Option<ToolRequest>, ApiError> {
    let tools = match tools {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Array(items)) => {
            items.iter().enumerate().map(|(i, t)| check_tool(i, t)).collect::<Result<_, _>>()?
        }
        Some(_) => return Err(ApiError::invalid_param("tools", "`tools` must be an array")),
    };
    let auto = match tool_choice {
        None | Some(Value::Null) => !tools.is_empty(),
        Some(Value::String(s)) if s == "none" => false,
        Some(Value::String(s)) if s == "auto" => !tools.is_empty(),
        Some(Value::String(s)) if s == "required" => return Err(not_enforced("`required`")),
        Some(Value::Object(_)) => return Err(not_enforced("a named function")),
        Some(_) => {
            return Err(ApiError::invalid_param(
                "tool_choice",
                "`tool_choice` must be \"none\", \"auto\", \"required\" or a named function",
            ))
        }
    };
    let parallel = match parallel {
        None | Some(Value::Null) => true,
        Some(Value::Bool(b)) => *b,
        Some(_) => {
            return Err(ApiError::invalid_param(
                "parallel_tool_calls",
                "`parallel_tool_calls` must be a boolean",
            ))
        }
    };
    if !auto {
        return Ok(None);
    }
    if !chat_template.is_some_and(|t| t.contains(OPEN)) {
        return Err(ApiError::invalid_param(
            "tools",
            "this model's chat template has no tool-call format this server reads (the \
             Hermes <tool_call> blocks of Qwen2.5, Qwen3 and Hermes templates)",
        ));
    }
    Ok(Some(ToolRequest { tools, parallel }))
}

fn not_enforced(what: &str) -> ApiError {
    ApiError::invalid_param(
        "tool_choice",
        format!(
            "{what} as `tool_choice` needs constrained decoding, which this server does not \
             implement; use \"auto\" (the model decides) or \"none\""
        ),
    )
}

/// One entry of `tools`, checked as OpenAI checks it.
fn check_tool(i: usize, tool: &Value) -> Result<Value, ApiError> {
    let bad = |msg: String| ApiError::invalid_param("tools", format!("tools[{i}]: {msg}"));
    let obj = tool.as_object().ok_or_else(|| bad("must be an object".into()))?;
    if obj.get("type").and_then(Value::as_str) != Some("function") {
        return Err(bad("`type` must be \"function\"".into()));
    }
    let function = obj
        .get("function")
        .and_then(Value::as_object)
        .ok_or_else(|| bad("`function` must be an object".into()))?;
    let name = function
        .get("name")
        .and_then(Value::as_str)
        .ok_or_else(|| bad("`function.name` must be a string".into()))?;
    if !valid_name(name) {
        return Err(bad(
            "`function.name` must be 1-64 letters, digits, underscores or dashes".into()
        ));
    }
    match function.get("description") {
        None | Some(Value::Null | Value::String(_)) => {}
        Some(_) => return Err(bad("`function.description` must be a string".into())),
    }
    match function.get("parameters") {
        None | Some(Value::Null | Value::Object(_)) => {}
        Some(_) => return Err(bad("`function.parameters` must be a JSON Schema object".into())),
    }
    Ok(tool.clone())
}

fn valid_name(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// An assistant message's `tool_calls` as the templates read them: OpenAI sends each
/// call's `arguments` as a JSON string, the Hermes and Llama templates print them with
/// `tojson`, so (as vLLM does) the string is parsed into its JSON value first.
pub fn message_tool_calls(i: usize, calls: &Value) -> Result<Value, ApiError> {
    let bad = |msg: String| ApiError::invalid_param("messages", format!("message {i}: {msg}"));
    let calls = calls.as_array().ok_or_else(|| bad("`tool_calls` must be an array".into()))?;
    let mut out = Vec::with_capacity(calls.len());
    for (j, call) in calls.iter().enumerate() {
        let at = |msg: &str| bad(format!("tool_calls[{j}]: {msg}"));
        let call = call.as_object().ok_or_else(|| at("must be an object"))?;
        if call.get("type").and_then(Value::as_str).is_some_and(|t| t != "function") {
            return Err(at("`type` must be \"function\""));
        }
        let function = call
            .get("function")
            .and_then(Value::as_object)
            .ok_or_else(|| at("needs `function`"))?;
        let name = function
            .get("name")
            .and_then(Value::as_str)
            .ok_or_else(|| at("`function.name` must be a string"))?;
        let arguments = match function.get("arguments") {
            Some(Value::String(s)) => serde_json::from_str::<Value>(s)
                .map_err(|_| at("`function.arguments` is not valid JSON"))?,
            Some(Value::Object(o)) => Value::Object(o.clone()),
            _ => return Err(at("`function.arguments` must be a JSON string")),
        };
        let mut entry = Map::new();
        if let Some(id) = call.get("id").and_then(Value::as_str) {
            entry.insert("id".into(), json!(id));
        }
        entry.insert("type".into(), json!("function"));
        entry.insert("function".into(), json!({"name": name, "arguments": arguments}));
        out.push(Value::Object(entry));
    }
    Ok(Value::Array(out))
}

/// One call the model made.
#[derive(Clone, Debug, PartialEq)]
pub struct ToolCall {
    /// `call_` and 24 random letters and digits, as OpenAI's ids look.
    pub id: String,
    pub name: String,
    /// The arguments object as a JSON string (OpenAI's wire form).
    pub arguments: String,
}

impl ToolCall {
    /// The `tool_calls` entry of a message; streamed, with its `index`.
    pub fn to_json(&self, index: Option<usize>) -> Value {
        let mut call = json!({
            "id": self.id,
            "type": "function",
            "function": {"name": self.name, "arguments": self.arguments},
        });
        if let Some(index) = index {
            call["index"] = json!(index);
        }
        call
    }
}

/// An answer split into the text before the first call and the calls: `None` when it has
/// no `<tool_call>` block or any block is not `{"name": string, "arguments": object}`
/// (then the whole answer is content). An unclosed last block is read to the end, since
/// the model's end-of-turn token may come where `</tool_call>` should.
pub fn split_answer(text: &str, req: &ToolRequest) -> Option<(String, Vec<ToolCall>)> {
    let first = text.find(OPEN)?;
    let mut calls = Vec::new();
    let mut rest = &text[first..];
    while let Some(start) = rest.find(OPEN) {
        let body = &rest[start + OPEN.len()..];
        let (inside, after) = match body.find(CLOSE) {
            Some(end) => (&body[..end], &body[end + CLOSE.len()..]),
            None => (body, ""),
        };
        calls.push(read_call(inside)?);
        rest = after;
    }
    if !req.parallel {
        calls.truncate(1);
    }
    Some((text[..first].to_string(), calls))
}

fn read_call(inside: &str) -> Option<ToolCall> {
    let value: Value = serde_json::from_str(inside.trim()).ok()?;
    let name = value.get("name")?.as_str()?;
    let arguments = match value.get("arguments") {
        Some(args @ Value::Object(_)) => args.to_string(),
        // A model that writes the arguments as a JSON string already: kept if it parses.
        Some(Value::String(s)) if serde_json::from_str::<Map<String, Value>>(s).is_ok() => {
            s.clone()
        }
        None | Some(Value::Null) => "{}".to_string(),
        Some(_) => return None,
    };
    Some(ToolCall { id: call_id(), name: name.to_string(), arguments })
}

fn call_id() -> String {
    use rand::Rng;
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";
    let mut rng = rand::rng();
    let tail: String =
        (0..24).map(|_| ALPHABET[rng.random_range(0..ALPHABET.len())] as char).collect();
    format!("call_{tail}")
}

/// A streamed answer's text as it comes: what may go out as content at once, and what is
/// held back because it is, or may become, a tool call. Text before the first
/// `<tool_call>` streams as it comes, except for a tail that could be the start of the
/// tag; from the tag on, everything waits for the end of the answer.
#[derive(Debug, Default)]
pub struct ToolStream {
    text: String,
    /// Bytes of `text` already released as content.
    released: usize,
    /// The tag was seen: nothing more is released before the end.
    in_call: bool,
}

impl ToolStream {
    /// Takes a token's text; returns the content that can go out now (maybe empty).
    pub fn push(&mut self, delta: &str) -> String {
        self.text.push_str(delta);
        if self.in_call {
            return String::new();
        }
        let pending = &self.text[self.released..];
        let upto = match pending.find(OPEN) {
            Some(at) => {
                self.in_call = true;
                at
            }
            // Hold back the longest tail that is a proper prefix of the tag (ASCII, so the
            // cut is a char boundary).
            None => {
                pending.len()
                    - (1..OPEN.len()).rev().find(|&n| pending.ends_with(&OPEN[..n])).unwrap_or(0)
            }
        };
        let out = pending[..upto].to_string();
        self.released += upto;
        out
    }

    /// The end of the answer: the calls it made, with whatever content is still held back
    /// (all of it when it turned out not to be calls).
    pub fn finish(&mut self, req: &ToolRequest) -> (String, Vec<ToolCall>) {
        let held = self.text[self.released..].to_string();
        self.released = self.text.len();
        if self.in_call {
            if let Some((_, calls)) = split_answer(&self.text, req) {
                return (String::new(), calls);
            }
        }
        (held, Vec::new())
    }
}

#[cfg(test)]
mod tests;
