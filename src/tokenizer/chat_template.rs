//! Chat templates rendered the way transformers' `apply_chat_template(..., tokenize=False)`
//! renders them (transformers/utils/chat_template_utils.py): a jinja2 sandbox with
//! `trim_blocks`, `lstrip_blocks`, loop controls, `raise_exception`, `strftime_now`, and a
//! `tojson` that is `json.dumps(x, ensure_ascii=False)`. minijinja plays jinja2; the
//! differences that change bytes are patched here: Python's `str()` of values, `tojson`,
//! jinja2's `sequence` test, and Python string/dict methods (minijinja-contrib pycompat).

use std::fmt::Write as _;

use chrono::NaiveDateTime;
use minijinja::value::{Kwargs, Rest, Serde, Value, ValueKind};
use minijinja::{AutoEscape, Environment, Error, ErrorKind};

use super::pyfmt::{py_json, py_str, JsonOptions};
use super::{SpecialTokens, TokenizerError};

const TEMPLATE_NAME: &str = "chat_template";

/// What a render needs beyond the messages.
#[derive(Clone, Debug, Default)]
pub struct RenderOptions {
    /// Extra template variables (transformers' `**kwargs`: `tools`, `date_string`,
    /// `enable_thinking`...). They override the special tokens of the same name.
    pub extra_context: serde_json::Map<String, serde_json::Value>,
    /// The clock `strftime_now` reads; `None`: the local time at render.
    pub now: Option<NaiveDateTime>,
}

/// A compiled chat template: parsed once, rendered per request.
#[derive(Clone)]
pub struct ChatTemplate {
    env: Environment<'static>,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ChatTemplate")
    }
}

impl ChatTemplate {
    /// Parses `source`; a syntax error is reported with its line.
    pub fn new(source: &str) -> Result<Self, TokenizerError> {
        let mut env = Environment::new();
        let syntax = minijinja::syntax::SyntaxConfig::builder()
            .trim_blocks(true)
            .lstrip_blocks(true)
            .keep_trailing_newline(false)
            .build()
            .map_err(template_error)?;
        env.set_syntax(syntax);
        // jinja2's Environment defaults to autoescape=False whatever the template name.
        env.set_auto_escape_callback(|_| AutoEscape::None);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.set_formatter(|out, _state, value| {
            let text = py_str(value)?;
            out.write_str(&text).map_err(|_| Error::from(ErrorKind::WriteFailure))
        });
        env.add_filter("tojson", tojson);
        env.add_filter("string", |v: Value| py_str(&v));
        env.add_test("sequence", is_py_sequence);
        env.add_function("raise_exception", raise_exception);
        env.add_template_owned(TEMPLATE_NAME, source.to_owned()).map_err(template_error)?;
        Ok(ChatTemplate { env })
    }

    /// Renders `messages` (each a JSON object with at least `role`) with the context
    /// transformers builds: `messages`, `tools` = None, `documents` = None,
    /// `add_generation_prompt`, the special tokens that are set, then `extra_context`.
    pub fn render(
        &self,
        messages: &[serde_json::Value],
        add_generation_prompt: bool,
        special: &SpecialTokens,
        opts: &RenderOptions,
    ) -> Result<String, TokenizerError> {
        if messages.is_empty() {
            return Err(TokenizerError::Template(
                "cannot apply chat template to an empty conversation".into(),
            ));
        }
        let mut ctx = serde_json::Map::new();
        ctx.insert("messages".into(), normalize_messages(messages)?.into());
        ctx.insert("tools".into(), serde_json::Value::Null);
        ctx.insert("documents".into(), serde_json::Value::Null);
        ctx.insert("add_generation_prompt".into(), add_generation_prompt.into());
        // transformers passes only the special tokens that are set: an unset one is
        // undefined in the template, not None.
        let named = [
            ("bos_token", &special.bos_token),
            ("eos_token", &special.eos_token),
            ("unk_token", &special.unk_token),
            ("pad_token", &special.pad_token),
        ];
        for (name, token) in named {
            if let Some(token) = token {
                ctx.insert(name.into(), token.clone().into());
            }
        }
        for (k, v) in &opts.extra_context {
            ctx.insert(k.clone(), v.clone());
        }
        let now = opts.now.unwrap_or_else(|| chrono::Local::now().naive_local());
        let strftime_now = Value::from_function(move |format: &str| strftime(&now, format));
        let ctx = minijinja::context! { strftime_now => strftime_now, ..Value::from(Serde(ctx)) };

        let template = self.env.get_template(TEMPLATE_NAME).map_err(template_error)?;
        template.render(ctx).map_err(template_error)
    }
}

/// transformers drops message keys whose value is None before rendering.
fn normalize_messages(
    messages: &[serde_json::Value],
) -> Result<Vec<serde_json::Value>, TokenizerError> {
    messages
        .iter()
        .map(|m| match m {
            serde_json::Value::Object(map) => Ok(serde_json::Value::Object(
                map.iter()
                    .filter(|(_, v)| !v.is_null())
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect(),
            )),
            other => Err(TokenizerError::Template(format!(
                "chat messages should be objects, got {other}"
            ))),
        })
        .collect()
}

/// `datetime.strftime(format)` for the C locale (English month and day names).
pub fn strftime(now: &NaiveDateTime, format: &str) -> Result<String, Error> {
    let mut out = String::new();
    // chrono reports an unknown specifier as a fmt error (Display would panic).
    write!(out, "{}", now.format(format)).map_err(|_| {
        Error::new(ErrorKind::InvalidOperation, format!("strftime_now: bad format {format:?}"))
    })?;
    Ok(out)
}

fn raise_exception(message: String) -> Result<Value, Error> {
    Err(Error::new(ErrorKind::InvalidOperation, message))
}

/// jinja2's `sequence` test is "has len() and []": strings and dicts pass too.
fn is_py_sequence(value: &Value) -> bool {
    matches!(
        value.kind(),
        ValueKind::Undefined | ValueKind::Seq | ValueKind::String | ValueKind::Map
    )
}

/// transformers' `tojson(x, ensure_ascii=False, indent=None, separators=None,
/// sort_keys=False)`, positional or keyword.
fn tojson(value: &Value, args: Rest<Value>, kwargs: Kwargs) -> Result<String, Error> {
    let arg = |pos: usize, name: &str| -> Result<Option<Value>, Error> {
        match kwargs.get::<Option<Value>>(name)? {
            Some(v) => Ok(Some(v)),
            None => Ok(args.get(pos).cloned()),
        }
    };
    let ensure_ascii = arg(0, "ensure_ascii")?.is_some_and(|v| v.is_true());
    let indent = match arg(1, "indent")? {
        None => None,
        Some(v) if v.is_none() => None,
        Some(v) if v.kind() == ValueKind::String => {
            Some(v.as_str().unwrap_or_default().to_string())
        }
        Some(v) => {
            let n = i64::try_from(v)?;
            Some(" ".repeat(n.max(0) as usize))
        }
    };
    let mut opts = JsonOptions::new(ensure_ascii, indent);
    if let Some(sep) = arg(2, "separators")?.filter(|v| !v.is_none()) {
        let parts: Vec<Value> = sep.try_iter()?.collect();
        match parts.as_slice() {
            [item, key] => {
                opts.item_separator = py_str(item)?;
                opts.key_separator = py_str(key)?;
            }
            _ => {
                return Err(Error::new(
                    ErrorKind::InvalidOperation,
                    "tojson: separators must be an (item, key) pair",
                ))
            }
        }
    }
    opts.sort_keys = arg(3, "sort_keys")?.is_some_and(|v| v.is_true());
    kwargs.assert_all_used()?;
    py_json(value, &opts)
}

/// Keeps minijinja's message and the template line; drops its debug dump of the state.
fn template_error(err: Error) -> TokenizerError {
    let mut msg = match err.detail() {
        Some(detail) => format!("{}: {detail}", err.kind()),
        None => err.kind().to_string(),
    };
    if let Some(line) = err.line() {
        let _ = write!(msg, " (line {line})");
    }
    if let Some(source) = std::error::Error::source(&err) {
        let _ = write!(msg, ": {source}");
    }
    TokenizerError::Template(msg)
}
