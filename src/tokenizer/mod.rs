//! Tokenizer: Hugging Face `tokenizers` + chat templates (minijinja) + incremental
//! detokenization. STUB: the interface below is fixed; the implementation is pending.

use std::path::Path;

use serde::{Deserialize, Serialize};

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

pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    special: SpecialTokens,
}

impl Tokenizer {
    /// Loads `tokenizer.json` and `tokenizer_config.json` from a model directory.
    pub fn from_hf_dir(dir: &Path) -> Result<Self, TokenizerError> {
        let file = dir.join("tokenizer.json");
        let inner = tokenizers::Tokenizer::from_file(&file).map_err(|e| TokenizerError::Load {
            path: file.display().to_string(),
            message: e.to_string(),
        })?;
        Ok(Self::from_parts(inner, SpecialTokens::default()))
    }

    /// Wraps an already-built tokenizer (the GGUF loader builds one from metadata).
    pub fn from_parts(inner: tokenizers::Tokenizer, special: SpecialTokens) -> Self {
        Tokenizer { inner, special }
    }

    pub fn inner(&self) -> &tokenizers::Tokenizer {
        &self.inner
    }

    pub fn special(&self) -> &SpecialTokens {
        &self.special
    }

    /// Encodes a prompt. Special tokens written in the text (`<|im_start|>`) are
    /// recognised; bos is prepended when the model asks for it and `add_special`.
    pub fn encode(&self, text: &str, add_special: bool) -> Result<Vec<u32>, TokenizerError> {
        let enc = self
            .inner
            .encode(text, add_special)
            .map_err(|e| TokenizerError::Encode(e.to_string()))?;
        Ok(enc.get_ids().to_vec())
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

    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// Renders the chat template as transformers' `apply_chat_template(..., tokenize=False)`.
    pub fn apply_chat_template(
        &self,
        _messages: &[ChatMessage],
        _add_generation_prompt: bool,
    ) -> Result<String, TokenizerError> {
        Err(TokenizerError::Template("not implemented".into()))
    }

    /// A streaming decoder over this tokenizer.
    pub fn stream_decoder(&self, skip_special: bool) -> IncrementalDecoder<'_> {
        IncrementalDecoder { tokenizer: self, ids: Vec::new(), emitted: 0, skip_special }
    }
}

/// Turns a stream of token ids into text deltas that never end inside a UTF-8 character.
pub struct IncrementalDecoder<'a> {
    tokenizer: &'a Tokenizer,
    ids: Vec<u32>,
    emitted: usize,
    skip_special: bool,
}

impl IncrementalDecoder<'_> {
    /// Adds one token; returns the new text that is now complete (possibly empty).
    pub fn push(&mut self, id: u32) -> Result<String, TokenizerError> {
        self.ids.push(id);
        let text = self.tokenizer.decode(&self.ids, self.skip_special)?;
        if text.ends_with('\u{FFFD}') {
            return Ok(String::new());
        }
        let delta = text.get(self.emitted..).unwrap_or("").to_string();
        self.emitted = text.len();
        Ok(delta)
    }

    /// Whatever is still held back at the end of the stream.
    pub fn finish(&mut self) -> Result<String, TokenizerError> {
        let text = self.tokenizer.decode(&self.ids, self.skip_special)?;
        let delta = text.get(self.emitted..).unwrap_or("").to_string();
        self.emitted = text.len();
        Ok(delta)
    }
}
