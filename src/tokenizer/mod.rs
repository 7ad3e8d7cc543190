//! Tokenizer: Hugging Face `tokenizers` + chat templates (minijinja, rendered as
//! transformers renders them) + incremental detokenization for streams.
//!
//! - `mod.rs`: loading (`tokenizer.json`, `tokenizer_config.json`, `chat_template.jinja`),
//!   encode/decode, special tokens.
//! - `chat_template.rs`: the jinja2-compatible template environment.
//! - `pyfmt.rs`: Python's `str()`/`repr()`/`json.dumps()` of template values.
//! - `stream.rs`: the incremental decoder.

mod chat_template;
mod pyfmt;
mod stream;

use std::path::Path;

use serde::{Deserialize, Serialize};

pub use chat_template::{strftime, ChatTemplate, RenderOptions};
pub use stream::{DecodeState, IncrementalDecoder};

/// Why text could not be turned into tokens or back.
#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    #[error("{path}: {message}")]
    Load { path: String, message: String },
    #[error("tokenizer: {0}")]
    Encode(String),
    #[error("chat template: {0}")]
    Template(String),
}

/// One chat message in OpenAI's shape (string content).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
}

/// What a model file says about its tokenizer besides the vocabulary itself; the GGUF
/// loader fills this from `tokenizer.ggml.*`, the HF loader from `tokenizer_config.json`.
#[derive(Clone, Debug, Default)]
pub struct SpecialTokens {
    pub bos_token: Option<String>,
    pub eos_token: Option<String>,
    pub pad_token: Option<String>,
    pub unk_token: Option<String>,
    /// Prepend bos when encoding a prompt (Llama 2/3 do; Qwen and SmolLM2 do not).
    pub add_bos: bool,
    pub chat_template: Option<String>,
}

/// The chat template as compiled at load; `from_parts` cannot fail, so a broken template
/// is kept as its error and reported when a chat is rendered.
#[derive(Clone, Debug)]
enum TemplateSlot {
    Missing,
    Ready(Box<ChatTemplate>),
    Invalid(String),
}

/// Cloning is cheap enough to do once per server start (the HTTP threads share a copy
/// with the engine thread's).
#[derive(Clone)]
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    special: SpecialTokens,
    bos_id: Option<u32>,
    template: TemplateSlot,
}

impl Tokenizer {
    /// Loads `tokenizer.json` and `tokenizer_config.json` from a model directory, and
    /// `chat_template.jinja` when present (newer transformers save the template there; it
    /// wins over the config's).
    pub fn from_hf_dir(dir: &Path) -> Result<Self, TokenizerError> {
        let file = dir.join("tokenizer.json");
        let inner = tokenizers::Tokenizer::from_file(&file)
            .map_err(|e| load_error(&file, e.to_string()))?;

        let config_file = dir.join("tokenizer_config.json");
        let text = std::fs::read_to_string(&config_file)
            .map_err(|e| load_error(&config_file, e.to_string()))?;
        let config: HfTokenizerConfig =
            serde_json::from_str(&text).map_err(|e| load_error(&config_file, e.to_string()))?;
        let mut chat_template = config
            .chat_template
            .map(|t| t.pick())
            .transpose()
            .map_err(|m| load_error(&config_file, m))?;

        let jinja_file = dir.join("chat_template.jinja");
        if jinja_file.exists() {
            let text = std::fs::read_to_string(&jinja_file)
                .map_err(|e| load_error(&jinja_file, e.to_string()))?;
            chat_template = Some(text);
        }

        let mut special = SpecialTokens {
            bos_token: config.bos_token.map(TokenSpec::content),
            eos_token: config.eos_token.map(TokenSpec::content),
            pad_token: config.pad_token.map(TokenSpec::content),
            unk_token: config.unk_token.map(TokenSpec::content),
            add_bos: config.add_bos_token.unwrap_or(false),
            chat_template,
        };
        // transformers takes bos from tokenizer.json's post-processor (Llama 3's
        // TemplateProcessing adds it while the config says nothing or even false).
        special.add_bos |= post_processor_adds_bos(&inner, special.bos_token.as_deref());
        let tok = Self::from_parts(inner, special);
        if let TemplateSlot::Invalid(msg) = &tok.template {
            return Err(load_error(&config_file, format!("chat template: {msg}")));
        }
        Ok(tok)
    }

    /// Wraps an already-built tokenizer (the GGUF loader builds one from metadata).
    /// The chat template is compiled here; an invalid one is reported by
    /// `apply_chat_template` (use `try_from_parts` to fail early).
    pub fn from_parts(inner: tokenizers::Tokenizer, special: SpecialTokens) -> Self {
        let bos_id = special.bos_token.as_deref().and_then(|t| inner.token_to_id(t));
        let template = match special.chat_template.as_deref() {
            None => TemplateSlot::Missing,
            Some(src) => match ChatTemplate::new(src) {
                Ok(t) => TemplateSlot::Ready(Box::new(t)),
                Err(e) => TemplateSlot::Invalid(e.to_string()),
            },
        };
        Tokenizer { inner, special, bos_id, template }
    }

    /// `from_parts` that fails on a chat template that does not compile.
    pub fn try_from_parts(
        inner: tokenizers::Tokenizer,
        special: SpecialTokens,
    ) -> Result<Self, TokenizerError> {
        let tok = Self::from_parts(inner, special);
        match &tok.template {
            TemplateSlot::Invalid(msg) => Err(TokenizerError::Template(msg.clone())),
            _ => Ok(tok),
        }
    }

    /// The same tokenizer with `source` as its chat template (`qilin serve
    /// --chat-template`); fails on a template that does not compile.
    pub fn with_chat_template(&self, source: String) -> Result<Self, TokenizerError> {
        let special = SpecialTokens { chat_template: Some(source), ..self.special.clone() };
        Self::try_from_parts(self.inner.clone(), special)
    }

    pub fn inner(&self) -> &tokenizers::Tokenizer {
        &self.inner
    }

    pub fn special(&self) -> &SpecialTokens {
        &self.special
    }

    /// Encodes a prompt. Special tokens written in the text (`<|im_start|>`) are
    /// recognised; with `add_special`, bos is prepended when the model asks for it and the
    /// text does not already start with it (a rendered Llama 3 chat carries its own bos).
    /// Other post-processor additions (an eos after a prompt) are never wanted here.
    pub fn encode(&self, text: &str, add_special: bool) -> Result<Vec<u32>, TokenizerError> {
        let enc = self
            .inner
            .encode_fast(text, false)
            .map_err(|e| TokenizerError::Encode(e.to_string()))?;
        let ids = enc.get_ids();
        match self.bos_id {
            Some(bos) if add_special && self.special.add_bos && ids.first() != Some(&bos) => {
                let mut out = Vec::with_capacity(ids.len() + 1);
                out.push(bos);
                out.extend_from_slice(ids);
                Ok(out)
            }
            _ => Ok(ids.to_vec()),
        }
    }

    pub fn decode(&self, ids: &[u32], skip_special: bool) -> Result<String, TokenizerError> {
        self.inner.decode(ids, skip_special).map_err(|e| TokenizerError::Encode(e.to_string()))
    }

    /// Token ids that end generation: the eos token, if the tokenizer knows it.
    pub fn eos_token_ids(&self) -> Vec<u32> {
        self.special
            .eos_token
            .as_deref()
            .and_then(|t| self.inner.token_to_id(t))
            .into_iter()
            .collect()
    }

    /// The bos token's id, if the model has one in its vocabulary.
    pub fn bos_token_id(&self) -> Option<u32> {
        self.bos_id
    }

    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// The compiled chat template, if the model has a valid one.
    pub fn chat_template(&self) -> Option<&ChatTemplate> {
        match &self.template {
            TemplateSlot::Ready(t) => Some(t),
            _ => None,
        }
    }

    /// Renders the chat template as transformers' `apply_chat_template(..., tokenize=False)`.
    pub fn apply_chat_template(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
    ) -> Result<String, TokenizerError> {
        let messages: Vec<serde_json::Value> = messages
            .iter()
            .map(|m| serde_json::json!({"role": m.role, "content": m.content}))
            .collect();
        self.apply_chat_template_json(&messages, add_generation_prompt, &RenderOptions::default())
    }

    /// `apply_chat_template` for messages of any shape (tool calls, content parts) and
    /// extra template variables (`tools`, `date_string`, ...).
    pub fn apply_chat_template_json(
        &self,
        messages: &[serde_json::Value],
        add_generation_prompt: bool,
        opts: &RenderOptions,
    ) -> Result<String, TokenizerError> {
        match &self.template {
            TemplateSlot::Ready(t) => {
                t.render(messages, add_generation_prompt, &self.special, opts)
            }
            TemplateSlot::Invalid(msg) => Err(TokenizerError::Template(msg.clone())),
            TemplateSlot::Missing => {
                Err(TokenizerError::Template("this model has no chat template".into()))
            }
        }
    }

    /// A streaming decoder over this tokenizer.
    pub fn stream_decoder(&self, skip_special: bool) -> IncrementalDecoder<'_> {
        IncrementalDecoder::new(self, skip_special)
    }
}

fn load_error(path: &Path, message: String) -> TokenizerError {
    TokenizerError::Load { path: path.display().to_string(), message }
}

/// Whether tokenizer.json's post-processor puts bos in front of a sequence.
fn post_processor_adds_bos(inner: &tokenizers::Tokenizer, bos: Option<&str>) -> bool {
    let Some(bos_id) = bos.and_then(|t| inner.token_to_id(t)) else {
        return false;
    };
    inner.encode_fast("a", true).is_ok_and(|enc| enc.get_ids().first() == Some(&bos_id))
}

/// The parts of `tokenizer_config.json` we read; everything else is ignored.
#[derive(Deserialize)]
struct HfTokenizerConfig {
    #[serde(default)]
    chat_template: Option<TemplateSpec>,
    #[serde(default)]
    bos_token: Option<TokenSpec>,
    #[serde(default)]
    eos_token: Option<TokenSpec>,
    #[serde(default)]
    pad_token: Option<TokenSpec>,
    #[serde(default)]
    unk_token: Option<TokenSpec>,
    #[serde(default)]
    add_bos_token: Option<bool>,
}

/// A special token: a plain string or an AddedToken dict (`{"content": ...}`).
#[derive(Deserialize)]
#[serde(untagged)]
enum TokenSpec {
    Plain(String),
    Added { content: String },
}

impl TokenSpec {
    fn content(self) -> String {
        match self {
            TokenSpec::Plain(s) | TokenSpec::Added { content: s } => s,
        }
    }
}

/// `chat_template`: a string, or a list of named templates of which we use "default".
#[derive(Deserialize)]
#[serde(untagged)]
enum TemplateSpec {
    One(String),
    Named(Vec<NamedTemplate>),
}

#[derive(Deserialize)]
struct NamedTemplate {
    name: String,
    template: String,
}

impl TemplateSpec {
    fn pick(self) -> Result<String, String> {
        match self {
            TemplateSpec::One(s) => Ok(s),
            TemplateSpec::Named(list) => {
                let names: Vec<String> = list.iter().map(|t| t.name.clone()).collect();
                list.into_iter().find(|t| t.name == "default").map(|t| t.template).ok_or_else(
                    || format!("chat_template has no \"default\" entry (has {names:?})"),
                )
            }
        }
    }
}
