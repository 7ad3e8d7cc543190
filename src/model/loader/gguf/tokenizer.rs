//! A `tokenizers::Tokenizer` rebuilt from `tokenizer.ggml.*` metadata, the way
//! transformers builds one from the same file (`integrations/gguf/gguf_tokenizer_mapping.py`):
//! byte-level BPE over the file's tokens and merges, control tokens as special added
//! tokens, user-defined ones as plain added tokens, and the split regex chosen by
//! `tokenizer.ggml.pre`.

use std::collections::HashMap;

use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::{Vocab, BPE};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::processors::template::TemplateProcessing;
use tokenizers::{AddedToken, PreTokenizerWrapper, SplitDelimiterBehavior};

use serde_json::json;

use super::reader::{GgufFile, MetaValue};
use crate::tokenizer::{SpecialTokens, Tokenizer};

/// llama.cpp token types (`llama_token_type`).
const TOKEN_CONTROL: i64 = 3;
const TOKEN_USER_DEFINED: i64 = 4;

/// Llama 3's split (transformers `_LLAMA3_SPLIT`): digits in groups of up to three.
const LLAMA3_SPLIT: &str = concat!(
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}",
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
);
/// Qwen2's split (transformers `qwen2.tokenization_qwen2.PRETOKENIZE_REGEX`): single digits.
const QWEN2_SPLIT: &str = concat!(
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}",
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
);

/// The split regex transformers uses for a `tokenizer.ggml.pre` value. Anything else
/// (`gpt-2`, `default`, `smollm`, ...) gets GPT-2's own ByteLevel regex, as in
/// transformers. (llama.cpp splits `smollm` digits first; SmolLM2's vocabulary has no
/// multi-digit tokens, so the two differ only on rare whitespace-before-digit cases.)
fn split_regex(pre: &str) -> Option<&'static str> {
    match pre {
        "llama3" | "llama-v3" | "llama-bpe" | "falcon3" | "falcon-h1" | "pixtral" | "midm-2.0"
        | "lfm2" | "dbrx" | "smaug-bpe" => Some(LLAMA3_SPLIT),
        "qwen2" | "deepseek-r1-qwen" | "megrez" => Some(QWEN2_SPLIT),
        _ => None,
    }
}

/// GPT-2's byte -> printable char table (`bytes_to_unicode`).
fn byte_chars() -> [char; 256] {
    let mut table = ['\0'; 256];
    let mut extra = 0u32;
    for b in 0..256u32 {
        let printable =
            (0x21..=0x7e).contains(&b) || (0xa1..=0xac).contains(&b) || (0xae..=0xff).contains(&b);
        let c = if printable {
            b
        } else {
            extra += 1;
            255 + extra
        };
        table[b as usize] = char::from_u32(c).unwrap_or('\0');
    }
    table
}

fn string_array<'a>(g: &'a GgufFile, key: &str) -> Result<Option<Vec<&'a str>>, String> {
    match g.get(key) {
        None => Ok(None),
        Some(v) => v
            .as_array()
            .and_then(|a| a.iter().map(MetaValue::as_str).collect::<Option<Vec<_>>>())
            .map(Some)
            .ok_or_else(|| format!("metadata `{key}` is not an array of strings")),
    }
}

fn token_id(g: &GgufFile, key: &str, n_tokens: usize) -> Result<Option<u32>, String> {
    match g.get(key) {
        None => Ok(None),
        Some(v) => match v.as_u64() {
            Some(id) if (id as usize) < n_tokens => Ok(Some(id as u32)),
            // Some converters write -1 (as i32 / u32::MAX) for "none".
            _ if v.as_i64() == Some(-1) || v.as_u64() == Some(u32::MAX as u64) => Ok(None),
            _ => Err(format!("metadata `{key}` = {v:?} is not a token id below {n_tokens}")),
        },
    }
}

/// Builds the tokenizer; also returns the eos id for generation defaults.
pub fn build(g: &GgufFile) -> Result<(Tokenizer, Option<u32>), String> {
    let model = g.get("tokenizer.ggml.model").and_then(MetaValue::as_str).unwrap_or("");
    if model != "gpt2" {
        return Err(format!(
            "tokenizer model `{model}` is not supported (supported: gpt2 byte-level BPE)"
        ));
    }
    let tokens = string_array(g, "tokenizer.ggml.tokens")?
        .ok_or("missing metadata tokenizer.ggml.tokens")?;
    if tokens.is_empty() || tokens.len() > u32::MAX as usize {
        return Err("tokenizer.ggml.tokens is empty or too large".into());
    }
    let merges = string_array(g, "tokenizer.ggml.merges")?.ok_or(
        "missing metadata tokenizer.ggml.merges (byte-level BPE without merges is not supported)",
    )?;
    let token_types: Vec<i64> = match g.get("tokenizer.ggml.token_type") {
        None => Vec::new(),
        Some(v) => v
            .as_array()
            .and_then(|a| a.iter().map(MetaValue::as_i64).collect::<Option<Vec<_>>>())
            .filter(|t| t.len() == tokens.len())
            .ok_or("metadata tokenizer.ggml.token_type is not one integer per token")?,
    };

    // Tokens outside the byte alphabet (e.g. written as raw text by a converter) are
    // respelled byte by byte, as transformers' `byte_level_tokenizer` does.
    let chars = byte_chars();
    let alphabet: std::collections::HashSet<char> = chars.iter().copied().collect();
    let spelled = |t: &str| t.chars().all(|c| alphabet.contains(&c));
    let vocab: HashMap<String, u32> = tokens
        .iter()
        .enumerate()
        .map(|(i, t)| {
            let key = if spelled(t) {
                t.to_string()
            } else {
                t.bytes().map(|b| chars[b as usize]).collect()
            };
            (key, i as u32)
        })
        .collect();
    let merges: Vec<(String, String)> = merges
        .iter()
        .map(|m| {
            m.split_once(' ')
                .filter(|(_, b)| !b.contains(' '))
                .map(|(a, b)| (a.to_string(), b.to_string()))
                .ok_or_else(|| format!("malformed merge `{m}`"))
        })
        .collect::<Result<_, _>>()?;
    let bpe = BPE::builder()
        .vocab_and_merges(vocab.iter().map(|(k, v)| (k.clone(), *v)).collect::<Vocab>(), merges)
        .build()
        .map_err(|e| format!("invalid BPE vocabulary: {e}"))?;
    let mut inner = tokenizers::Tokenizer::new(bpe);

    let control: Vec<AddedToken> = tokens
        .iter()
        .zip(&token_types)
        .filter(|(t, &ty)| ty == TOKEN_CONTROL && spelled(t))
        .map(|(t, _)| AddedToken::from(t.to_string(), true).normalized(false))
        .collect();
    inner.add_special_tokens(control).map_err(|e| format!("special tokens: {e}"))?;
    let user: Vec<AddedToken> = tokens
        .iter()
        .zip(&token_types)
        .filter(|(t, &ty)| ty == TOKEN_USER_DEFINED && vocab.contains_key(**t))
        .map(|(t, _)| AddedToken::from(t.to_string(), false).normalized(false))
        .collect();
    inner.add_tokens(user).map_err(|e| format!("added tokens: {e}"))?;

    let pre = g.get("tokenizer.ggml.pre").and_then(MetaValue::as_str).unwrap_or("default");
    let pre_tokenizer: PreTokenizerWrapper = match split_regex(pre) {
        Some(regex) => {
            let split = Split::new(
                SplitPattern::Regex(regex.into()),
                SplitDelimiterBehavior::Isolated,
                false,
            )
            .map_err(|e| format!("split regex: {e}"))?;
            Sequence::new(vec![split.into(), ByteLevel::new(false, true, false).into()]).into()
        }
        None => ByteLevel::new(false, true, true).into(),
    };
    inner.with_pre_tokenizer(Some(pre_tokenizer));
    inner.with_decoder(Some(ByteLevelDecoder::default()));

    let n = tokens.len();
    let bos = token_id(g, "tokenizer.ggml.bos_token_id", n)?;
    let eos = token_id(g, "tokenizer.ggml.eos_token_id", n)?;
    let unk = token_id(g, "tokenizer.ggml.unknown_token_id", n)?;
    let pad = token_id(g, "tokenizer.ggml.padding_token_id", n)?;
    let flag = |k: &str| g.get(k).and_then(MetaValue::as_bool).unwrap_or(false);
    let add_bos = flag("tokenizer.ggml.add_bos_token") && bos.is_some();
    let add_eos = flag("tokenizer.ggml.add_eos_token") && eos.is_some();
    let name = |id: Option<u32>| id.map(|i| tokens[i as usize].to_string());
    let named = |id: Option<u32>| id.map(|i| (tokens[i as usize], i));
    let post = post_processor(named(bos).filter(|_| add_bos), named(eos).filter(|_| add_eos))?;
    if let Some(post) = post {
        inner.with_post_processor(Some(post));
    }

    let special = SpecialTokens {
        bos_token: name(bos),
        eos_token: name(eos),
        pad_token: name(pad),
        unk_token: name(unk),
        add_bos,
        chat_template: g
            .get("tokenizer.chat_template")
            .and_then(MetaValue::as_str)
            .map(String::from),
    };
    Ok((Tokenizer::from_parts(inner, special), eos))
}

/// `bos $A eos` (and `bos $A eos bos $B eos` for pairs) as a TemplateProcessing, built
/// through serde because token names with spaces cannot go through the template syntax.
fn post_processor(
    bos: Option<(&str, u32)>,
    eos: Option<(&str, u32)>,
) -> Result<Option<TemplateProcessing>, String> {
    if bos.is_none() && eos.is_none() {
        return Ok(None);
    }
    let mut single = Vec::new();
    let mut pair = Vec::new();
    let mut tokens = serde_json::Map::new();
    for (seq, type_id) in [("A", 0), ("B", 1)] {
        let special = |name: &str| json!({"SpecialToken": {"id": name, "type_id": type_id}});
        let mut pieces = Vec::new();
        pieces.extend(bos.map(|(name, _)| special(name)));
        pieces.push(json!({"Sequence": {"id": seq, "type_id": type_id}}));
        pieces.extend(eos.map(|(name, _)| special(name)));
        if seq == "A" {
            single.extend(pieces.iter().cloned());
        }
        pair.extend(pieces);
    }
    for (name, id) in bos.into_iter().chain(eos) {
        tokens.insert(name.to_string(), json!({"id": name, "ids": [id], "tokens": [name]}));
    }
    let value = json!({"type": "TemplateProcessing", "single": single, "pair": pair, "special_tokens": tokens});
    serde_json::from_value(value).map(Some).map_err(|e| format!("post-processor: {e}"))
}
