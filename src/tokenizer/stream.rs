//! Incremental detokenization: text deltas as tokens arrive, never half a UTF-8 character.
//!
//! Byte-level BPE splits one character over several tokens, and SentencePiece-style
//! decoders change a token's text depending on what precedes it, so a token cannot be
//! decoded alone. As in vLLM/TGI, each step decodes a short window: `ids[prefix..]`
//! against `ids[prefix..read]` (text already sent) and emits the difference once it no
//! longer ends in U+FFFD (an incomplete character). The window restarts at the last
//! emitted boundary, so a step costs a few tokens of decoding, not the whole sequence.

use super::{Tokenizer, TokenizerError};

/// The state of an incremental decode, without the tokenizer: for owners that keep
/// many streams next to one tokenizer (the engine's sequences). Each call takes the
/// tokenizer the stream was started with.
#[derive(Clone, Debug, Default)]
pub struct DecodeState {
    ids: Vec<u32>,
    /// Start of the decode window: text before it is already sent and stable.
    prefix_offset: usize,
    /// End of what has been sent; `ids[prefix_offset..read_offset]` decodes to `prefix_text`.
    read_offset: usize,
    prefix_text: String,
    skip_special: bool,
}

impl DecodeState {
    pub fn new(skip_special: bool) -> Self {
        DecodeState { skip_special, ..DecodeState::default() }
    }

    /// Adds one token; returns the new text that is now complete (possibly empty).
    pub fn push(&mut self, tokenizer: &Tokenizer, id: u32) -> Result<String, TokenizerError> {
        self.ids.push(id);
        let text = tokenizer.decode(&self.ids[self.prefix_offset..], self.skip_special)?;
        if text.len() <= self.prefix_text.len() || text.ends_with('\u{FFFD}') {
            return Ok(String::new());
        }
        let Some(delta) = text.strip_prefix(self.prefix_text.as_str()) else {
            // A decoder rewrote text already sent (none of the HF decoders we know
            // does): hold back until the stream ends rather than send wrong bytes.
            return Ok(String::new());
        };
        let delta = delta.to_string();
        self.prefix_offset = self.read_offset;
        self.read_offset = self.ids.len();
        self.prefix_text = tokenizer.decode(&self.ids[self.prefix_offset..], self.skip_special)?;
        Ok(delta)
    }

    /// Whatever is still held back at the end of the stream (an incomplete character
    /// comes out as U+FFFD, as in the full decode).
    pub fn finish(&mut self, tokenizer: &Tokenizer) -> Result<String, TokenizerError> {
        let text = tokenizer.decode(&self.ids[self.prefix_offset..], self.skip_special)?;
        let delta = text.strip_prefix(self.prefix_text.as_str()).unwrap_or("").to_string();
        self.prefix_offset = self.ids.len();
        self.read_offset = self.ids.len();
        self.prefix_text.clear();
        Ok(delta)
    }

    /// The ids pushed so far.
    pub fn ids(&self) -> &[u32] {
        &self.ids
    }
}

/// Turns a stream of token ids into text deltas that never end inside a UTF-8 character.
/// The concatenated deltas (with `finish`) equal `decode(all ids)`.
pub struct IncrementalDecoder<'a> {
    tokenizer: &'a Tokenizer,
    state: DecodeState,
}

impl<'a> IncrementalDecoder<'a> {
    pub(super) fn new(tokenizer: &'a Tokenizer, skip_special: bool) -> Self {
        IncrementalDecoder { tokenizer, state: DecodeState::new(skip_special) }
    }

    /// Adds one token; returns the new text that is now complete (possibly empty).
    pub fn push(&mut self, id: u32) -> Result<String, TokenizerError> {
        self.state.push(self.tokenizer, id)
    }

    /// Whatever is still held back at the end of the stream.
    pub fn finish(&mut self) -> Result<String, TokenizerError> {
        self.state.finish(self.tokenizer)
    }

    /// The ids pushed so far.
    pub fn ids(&self) -> &[u32] {
        self.state.ids()
    }
}
