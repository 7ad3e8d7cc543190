//! OpenAI tool calling on `/v1/chat/completions`, for the two formats chat templates ask
//! models to call in (`ToolFormat`): Hermes (Qwen2.5, Qwen3, NousResearch Hermes), whose
//! template says to answer a call as
//! `<tool_call>\n{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call>`,
//! and Llama 3.1-3.3's JSON, `{"name": function name, "parameters": dictionary of argument
//! name and its value}` as the whole answer (both quoted from the templates). This module
//! checks the request's `tools`, `tool_choice` and tool messages, and turns such answers
//! into `tool_calls`, whole or streamed.
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
/// Llama 3.1-3.3's templates: what they tell the model, verbatim.
const LLAMA3_INSTRUCTION: &str = "\"parameters\": dictionary of argument name and its value}";
/// Llama 3.1's marker before a call (a special token, so usually decoded away).
const PYTHON_TAG: &str = "<|python_tag|>";

/// How a chat template asks the model to write a call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ToolFormat {
    /// `<tool_call>{"name", "arguments"}</tool_call>` blocks after optional text.
    Hermes,
    /// The whole answer is `{"name", "parameters"}` (several joined by `;`).
    Llama3Json,
}

impl ToolFormat {
    /// The format a template source teaches, if it is one this module reads.
    pub fn of_template(source: &str) -> Option<ToolFormat> {
        if source.contains(OPEN) {
            Some(ToolFormat::Hermes)
        } else if source.contains(LLAMA3_INSTRUCTION) {
            Some(ToolFormat::Llama3Json)
        } else {
            None
        }
    }
}

/// What the request asked of tool calling, once validated.
#[derive(Clone, Debug, PartialEq)]
pub struct ToolRequest {
    /// The `tools` as sent (OpenAI's `{"type": "function", "function": {...}}`), which the
    /// template renders: transformers and vLLM hand them over unchanged.
    pub tools: Vec<Value>,
    /// `parallel_tool_calls` (default true): false keeps only the first call.
    pub parallel: bool,
    pub format: ToolFormat,
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
    let Some(format) = chat_template.and_then(ToolFormat::of_template) else {
        return Err(ApiError::invalid_param(
            "tools",
            "this model's chat template has no tool-call format this server reads (the \
             <tool_call> blocks of Qwen2.5, Qwen3 and Hermes templates, or Llama 3.1-3.3's \
             JSON); serve one with --chat-template",
        ));
    };
    Ok(Some(ToolRequest { tools, parallel, format }))
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

/// An answer split into the text before the first call and the calls: `None` when it
/// holds no call in the request's format, or a call is not `{"name": string,
/// "arguments" (Hermes) or "parameters" (Llama 3): object}`; then the whole answer is
/// content.
pub fn split_answer(text: &str, req: &ToolRequest) -> Option<(String, Vec<ToolCall>)> {
    let (content, mut calls) = match req.format {
        ToolFormat::Hermes => hermes_calls(text)?,
        ToolFormat::Llama3Json => (String::new(), llama3_calls(text)?),
    };
    if !req.parallel {
        calls.truncate(1);
    }
    Some((content, calls))
}

/// Hermes: text, then `<tool_call>` blocks. An unclosed last block is read to the end,
/// since the model's end-of-turn token may come where `</tool_call>` should.
fn hermes_calls(text: &str) -> Option<(String, Vec<ToolCall>)> {
    let first = text.find(OPEN)?;
    let mut calls = Vec::new();
    let mut rest = &text[first..];
    while let Some(start) = rest.find(OPEN) {
        let body = &rest[start + OPEN.len()..];
        let (inside, after) = match body.find(CLOSE) {
            Some(end) => (&body[..end], &body[end + CLOSE.len()..]),
            None => (body, ""),
        };
        calls.push(read_call(&serde_json::from_str(inside.trim()).ok()?)?);
        rest = after;
    }
    Some((text[..first].to_string(), calls))
}

/// Llama 3: the whole answer (after an optional `<|python_tag|>`) is one or more JSON
/// objects, joined by `;` as the Llama 3.1 model card's multi-call form writes them.
fn llama3_calls(text: &str) -> Option<Vec<ToolCall>> {
    let mut rest = text.trim_start();
    rest = rest.strip_prefix(PYTHON_TAG).unwrap_or(rest).trim_start();
    if !rest.starts_with('{') {
        return None;
    }
    let mut calls = Vec::new();
    while !rest.is_empty() {
        let mut objects = serde_json::Deserializer::from_str(rest).into_iter::<Value>();
        let value = objects.next()?.ok()?;
        calls.push(read_call(&value)?);
        rest = rest[objects.byte_offset()..].trim_start();
        rest = rest.strip_prefix(';').unwrap_or(rest).trim_start();
    }
    Some(calls)
}

/// `{"name": string, "arguments" or "parameters": object}` as a call.
fn read_call(value: &Value) -> Option<ToolCall> {
    let name = value.get("name")?.as_str()?;
    let arguments = value.get("arguments").or_else(|| value.get("parameters"));
    let arguments = match arguments {
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
/// held back because it is, or may become, a call. Hermes: text before the first
/// `<tool_call>` streams as it comes, except for a tail that could be the start of the
/// tag; from the tag on, everything waits for the end of the answer. Llama 3: an answer
/// that starts (after blanks) with `{` or `<` may be a call and waits whole; any other
/// streams.
#[derive(Debug)]
pub struct ToolStream {
    format: ToolFormat,
    text: String,
    /// Bytes of `text` already released as content.
    released: usize,
    /// A call may have started: nothing more is released before the end.
    in_call: bool,
    /// Llama 3: the first visible character decided that this is prose.
    prose: bool,
}

impl ToolStream {
    pub fn new(format: ToolFormat) -> ToolStream {
        ToolStream { format, text: String::new(), released: 0, in_call: false, prose: false }
    }

    /// Takes a token's text; returns the content that can go out now (maybe empty).
    pub fn push(&mut self, delta: &str) -> String {
        self.text.push_str(delta);
        if self.in_call {
            return String::new();
        }
        let pending = &self.text[self.released..];
        let upto = match self.format {
            ToolFormat::Hermes => match pending.find(OPEN) {
                Some(at) => {
                    self.in_call = true;
                    at
                }
                // Hold back the longest tail that is a proper prefix of the tag (ASCII,
                // so the cut is a char boundary).
                None => {
                    let partial = (1..OPEN.len()).rev().find(|&n| pending.ends_with(&OPEN[..n]));
                    pending.len() - partial.unwrap_or(0)
                }
            },
            ToolFormat::Llama3Json if self.prose => pending.len(),
            ToolFormat::Llama3Json => match pending.trim_start().chars().next() {
                None => 0, // only blanks so far: undecided
                Some('{' | '<') => {
                    self.in_call = true;
                    0
                }
                Some(_) => {
                    self.prose = true;
                    pending.len()
                }
            },
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
