//! GGUF loading against transformers: tensors (names, shapes, values with llama.cpp's Q/K
//! permutation undone), config and tokenizer. Fixtures: tools/make_gguf_fixtures.py.

mod common;

use std::path::{Path, PathBuf};

use qilin::model::loader::gguf::{load_gguf, GgufFile};
use qilin::model::quant::dequantize_row;
use qilin::model::{Architecture, DType, LoadError, RopeScaling};
use serde_json::Value;

fn fixture_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/gguf")
}

fn read_json(path: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(path).expect("read fixture")).expect("json")
}

/// Every tensor of `name`.gguf dequantized equals what transformers loads, bit for bit.
fn check_tiny_against_transformers(name: &str) -> qilin::model::LoadedModel {
    let dir = fixture_dir();
    let model = load_gguf(&dir.join(format!("{name}.gguf"))).expect("load");
    let expected = read_json(&dir.join(format!("{name}.expected.json")));
    let blob = std::fs::read(dir.join(format!("{name}.expected.bin"))).expect("blob");
    let floats: Vec<f32> =
        blob.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect();
    let index = expected["tensors"].as_object().unwrap();
    let mut ours: Vec<&String> = model.tensors.keys().collect();
    ours.sort();
    let mut theirs: Vec<&String> = index.keys().collect();
    theirs.sort();
    assert_eq!(ours, theirs, "tensor names");
    for (key, entry) in index {
        let t = &model.tensors[key];
        let shape: Vec<usize> = entry["shape"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as usize)
            .collect();
        assert_eq!(t.shape, shape, "{key} shape");
        let offset = entry["offset"].as_u64().unwrap() as usize;
        let want = &floats[offset..offset + t.numel()];
        let mut got = vec![0f32; t.numel()];
        for (r, out) in got.chunks_exact_mut(t.row_len()).enumerate() {
            dequantize_row(t.dtype, t.row(r), out);
        }
        for (i, (a, b)) in got.iter().zip(want).enumerate() {
            assert_eq!(a.to_bits(), b.to_bits(), "{key}[{i}]: {a} vs transformers {b}");
        }
    }
    let cfg = &expected["config"];
    let c = &model.config;
    assert_eq!(c.num_layers as u64, cfg["num_hidden_layers"].as_u64().unwrap());
    assert_eq!(c.hidden_size as u64, cfg["hidden_size"].as_u64().unwrap());
    assert_eq!(c.intermediate_size as u64, cfg["intermediate_size"].as_u64().unwrap());
    assert_eq!(c.num_heads as u64, cfg["num_attention_heads"].as_u64().unwrap());
    assert_eq!(c.num_kv_heads as u64, cfg["num_key_value_heads"].as_u64().unwrap());
    assert_eq!(c.vocab_size as u64, cfg["vocab_size"].as_u64().unwrap());
    assert_eq!(c.max_position_embeddings as u64, cfg["max_position_embeddings"].as_u64().unwrap());
    assert_eq!(c.tie_word_embeddings, cfg["tie_word_embeddings"].as_bool().unwrap());
    assert_eq!(c.rms_norm_eps, cfg["rms_norm_eps"].as_f64().unwrap() as f32);
    assert_eq!(c.rope.theta, cfg["rope_parameters"]["rope_theta"].as_f64().unwrap());
    let head_dim =
        cfg["head_dim"].as_u64().map(|v| v as usize).unwrap_or(c.hidden_size / c.num_heads);
    assert_eq!(c.head_dim, head_dim);
    model
}

#[test]
fn tiny_llama_matches_transformers_including_qk_permutation() {
    let model = check_tiny_against_transformers("tiny_llama");
    assert_eq!(model.config.architecture, Architecture::Llama);
    assert!(model.config.attention_bias);
    assert_eq!(model.tensors["model.layers.0.self_attn.q_proj.weight"].dtype, DType::Q4_1);
    assert_eq!(model.tensors["model.layers.1.self_attn.k_proj.weight"].dtype, DType::Q4_0);
    let tok = &model.tokenizer;
    assert!(tok.special().add_bos);
    assert_eq!(
        tok.encode("hello the thin", true).unwrap(),
        [1, 260, 78, 78, 81, 261, 259, 74, 262]
    );
    assert_eq!(model.generation.eos_token_ids, [2]);
}

#[test]
fn tiny_qwen2_matches_transformers_and_reads_yarn() {
    let model = check_tiny_against_transformers("tiny_qwen2");
    let c = &model.config;
    assert_eq!(c.architecture, Architecture::Qwen2);
    assert!(c.tie_word_embeddings && c.attention_bias);
    // Written by the fixture script as qwen2.rope.scaling.{type,factor,original_context_length}.
    match &c.rope.scaling {
        RopeScaling::Yarn {
            factor, original_max_position_embeddings, attention_factor, ..
        } => {
            assert_eq!((*factor, *original_max_position_embeddings), (4.0, 512));
            assert!((attention_factor - (0.1 * 4f64.ln() + 1.0)).abs() < 1e-12);
        }
        other => panic!("expected yarn, got {other:?}"),
    }
    assert!(!model.tokenizer.special().add_bos);
}

#[test]
fn smollm2_config_tokenizer_and_tensors() {
    let path = common::smollm2_gguf();
    let model = load_gguf(&path).expect("load SmolLM2");
    let cfg = read_json(&fixture_dir().join("smollm2_config.json"));
    let c = &model.config;
    assert_eq!(c.architecture, Architecture::Llama);
    assert_eq!((c.num_layers, c.hidden_size, c.intermediate_size), (30, 576, 1536));
    assert_eq!((c.num_heads, c.num_kv_heads, c.head_dim), (9, 3, 64));
    assert_eq!(c.num_layers as u64, cfg["num_hidden_layers"].as_u64().unwrap());
    assert_eq!(c.vocab_size as u64, cfg["vocab_size"].as_u64().unwrap());
    assert_eq!(c.vocab_size, 49152);
    assert_eq!(c.rope.theta, cfg["rope_parameters"]["rope_theta"].as_f64().unwrap());
    assert_eq!(c.rope.theta, 1e5);
    assert_eq!(c.rms_norm_eps, cfg["rms_norm_eps"].as_f64().unwrap() as f32);
    assert_eq!(c.max_position_embeddings as u64, cfg["max_position_embeddings"].as_u64().unwrap());
    assert!(c.tie_word_embeddings && cfg["tie_word_embeddings"].as_bool().unwrap());
    assert!(!c.attention_bias);
    assert_eq!(c.rope.scaling, RopeScaling::None);

    assert_eq!(model.tensors.len(), 272);
    let embed = &model.tensors["model.embed_tokens.weight"];
    assert_eq!((embed.dtype, embed.shape.as_slice()), (DType::Q8_0, &[49152, 576][..]));
    let q = &model.tensors["model.layers.0.self_attn.q_proj.weight"];
    assert_eq!((q.dtype, q.shape.as_slice()), (DType::Q4_1, &[576, 576][..]));
    let k = &model.tensors["model.layers.29.self_attn.k_proj.weight"];
    assert_eq!(k.shape, [192, 576]);
    assert_eq!(model.tensors["model.layers.3.mlp.down_proj.weight"].shape, [576, 1536]);
    assert_eq!(model.generation.eos_token_ids, [cfg["eos_token_id"].as_u64().unwrap() as u32]);

    let fx = read_json(&fixture_dir().join("smollm2_tokenize.json"));
    let tok = &model.tokenizer;
    let sp = tok.special();
    assert_eq!(sp.bos_token.as_deref(), fx["bos_token"].as_str());
    assert_eq!(sp.eos_token.as_deref(), fx["eos_token"].as_str());
    assert_eq!(sp.pad_token.as_deref(), fx["pad_token"].as_str());
    assert_eq!(sp.unk_token.as_deref(), fx["unk_token"].as_str());
    assert!(!sp.add_bos);
    assert!(sp.chat_template.as_deref().is_some_and(|t| t.contains("<|im_start|>")));
    assert_eq!(tok.vocab_size() as u64, fx["vocab_size"].as_u64().unwrap());
    assert_eq!(tok.eos_token_ids(), model.generation.eos_token_ids);
    for case in fx["cases"].as_array().unwrap() {
        let text = case["text"].as_str().unwrap();
        let ids = |k: &str| -> Vec<u32> {
            case[k].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u32).collect()
        };
        assert_eq!(tok.encode(text, false).unwrap(), ids("ids"), "encode {text:?}");
        assert_eq!(
            tok.encode(text, true).unwrap(),
            ids("ids_with_special"),
            "encode+special {text:?}"
        );
        assert_eq!(tok.decode(&ids("ids"), false).unwrap(), case["decoded"].as_str().unwrap());
        assert_eq!(
            tok.decode(&ids("ids"), true).unwrap(),
            case["decoded_skip_special"].as_str().unwrap(),
            "decode skipping special {text:?}"
        );
    }
}

// ---------------------------------------------------------------- hostile files

fn tiny_bytes() -> Vec<u8> {
    std::fs::read(fixture_dir().join("tiny_qwen2.gguf")).unwrap()
}

#[test]
fn truncation_at_every_offset_is_an_error_not_a_panic() {
    let bytes = tiny_bytes();
    assert!(GgufFile::parse(&bytes).is_ok());
    for len in 0..bytes.len() {
        assert!(GgufFile::parse(&bytes[..len]).is_err(), "truncated to {len} parsed");
    }
}

#[test]
fn corrupted_bytes_never_panic() {
    let bytes = tiny_bytes();
    let mut rng_state = 0x2545_f491_4f6c_dd1du64;
    let mut next = move || {
        rng_state ^= rng_state << 13;
        rng_state ^= rng_state >> 7;
        rng_state ^= rng_state << 17;
        rng_state
    };
    // The header and metadata are the first few KB; hit them densely.
    let header_end = 6000.min(bytes.len());
    for pos in 0..header_end {
        for v in [0x00, 0xff, 0x7f, 0x80, (next() & 0xff) as u8] {
            let mut b = bytes.clone();
            b[pos] = v;
            let _ = GgufFile::parse(&b);
        }
    }
    // Full loads (config, tensor mapping, tokenizer) on a sample, through real files.
    let dir = tempfile::tempdir().unwrap();
    for i in 0..300 {
        let mut b = bytes.clone();
        for _ in 0..1 + i % 3 {
            let pos = (next() as usize) % header_end;
            b[pos] = next() as u8;
        }
        let path = dir.path().join("c.gguf");
        std::fs::write(&path, &b).unwrap();
        let _ = load_gguf(&path);
    }
}

/// A minimal GGUF v3 writer for hand-made bad files.
fn gguf(kv: &[(&str, u32, Vec<u8>)], tensors: &[(&str, &[u64], u32, u64)], data: &[u8]) -> Vec<u8> {
    let mut b = b"GGUF".to_vec();
    b.extend(3u32.to_le_bytes());
    b.extend((tensors.len() as u64).to_le_bytes());
    b.extend((kv.len() as u64).to_le_bytes());
    let s = |b: &mut Vec<u8>, s: &str| {
        b.extend((s.len() as u64).to_le_bytes());
        b.extend(s.as_bytes());
    };
    for (k, ty, v) in kv {
        s(&mut b, k);
        b.extend(ty.to_le_bytes());
        b.extend(v);
    }
    for (name, dims, ty, off) in tensors {
        s(&mut b, name);
        b.extend((dims.len() as u32).to_le_bytes());
        for d in *dims {
            b.extend(d.to_le_bytes());
        }
        b.extend(ty.to_le_bytes());
        b.extend(off.to_le_bytes());
    }
    while !b.len().is_multiple_of(32) {
        b.push(0);
    }
    b.extend(data);
    b
}

fn str_val(s: &str) -> Vec<u8> {
    let mut v = (s.len() as u64).to_le_bytes().to_vec();
    v.extend(s.as_bytes());
    v
}

fn load_err(bytes: &[u8]) -> String {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.gguf");
    std::fs::write(&path, bytes).unwrap();
    let err: LoadError = match load_gguf(&path) {
        Ok(_) => panic!("loaded a bad file"),
        Err(e) => e,
    };
    let msg = err.to_string();
    assert!(msg.contains("bad.gguf"), "error names the file: {msg}");
    msg
}

#[test]
fn bad_files_give_clear_errors() {
    let arch = ("general.architecture", 8, str_val("llama"));
    assert!(load_err(b"GGML\x03\0\0\0").contains("not a GGUF file"));
    assert!(load_err(b"GGUF\x03\0").contains("truncated"));
    // An array claiming 2^60 elements must be refused before any allocation.
    let mut huge = 4u32.to_le_bytes().to_vec();
    huge.extend((1u64 << 60).to_le_bytes());
    assert!(load_err(&gguf(&[("x", 9, huge)], &[], &[])).contains("impossible"));
    // IQ2_XXS (16): a grid-coded type Qilin does not read, refused by name.
    let iq2 =
        gguf(std::slice::from_ref(&arch), &[("blk.0.attn_q.weight", &[256, 1], 16, 0)], &[0; 66]);
    let msg = load_err(&iq2);
    assert!(msg.contains("blk.0.attn_q.weight") && msg.contains("IQ2_XXS (16)"), "{msg}");
    let oob = gguf(std::slice::from_ref(&arch), &[("token_embd.weight", &[32, 4], 0, 0)], &[0; 64]);
    assert!(load_err(&oob).contains("beyond the end"));
    let partial =
        gguf(std::slice::from_ref(&arch), &[("token_embd.weight", &[33, 1], 8, 0)], &[0; 64]);
    assert!(load_err(&partial).contains("whole number of blocks"));
    let qwen3 = gguf(&[("general.architecture", 8, str_val("qwen3"))], &[], &[]);
    assert!(load_err(&qwen3).contains("unsupported GGUF architecture `qwen3`"));
}

#[test]
fn shape_mismatch_with_config_is_an_error() {
    // A tiny llama whose attn_k claims more rows than head_count_kv allows: rewrite the
    // fixture's metadata value for head_count_kv (2 -> 1) in place.
    let mut bytes = std::fs::read(fixture_dir().join("tiny_llama.gguf")).unwrap();
    let key = b"llama.attention.head_count_kv";
    let at = bytes.windows(key.len()).position(|w| w == key).unwrap() + key.len();
    assert_eq!(&bytes[at..at + 8], &[4, 0, 0, 0, 2, 0, 0, 0]); // type u32, value 2
    bytes[at + 4] = 1;
    let msg = load_err(&bytes);
    assert!(msg.contains("attn_k") && msg.contains("does not match"), "{msg}");
}
