//! GGUF k-quants (Q2_K, Q3_K, Q4_K, Q5_K, Q6_K) and the formats read through their
//! decoded levels (Q5_0, Q5_1, IQ4_NL, IQ4_XS) against the python `gguf` package,
//! fixtures made by tools/make_kquant_fixtures.py (gguf 0.19.0, numpy 2.4.6).
//!
//! - dequantize_row equals gguf.quants.dequantize bit for bit: both compute each value
//!   with the same f32 operations in the same order (`d * sc` once per sub-block, then
//!   `* q`, then `- dmin * m`; Q6_K `(d * sc) * q`), numpy in f32 without fusing, Rust
//!   never contracting mul+add.
//! - dot_row (AVX2 where present) and dot_row_portable agree with the f64 dot of those
//!   exact values within 1e-5 * sum |w * x|. The portable path sums the exact `w * x` in
//!   8 f32 lanes; the AVX2 path sums `q * x` per sub-block and applies `d * sc` (and
//!   `- dmin * m * sum x`) once, as the Q4_1 kernel does. Both are f32 dot products of
//!   up to 11008 terms in 8+ lanes: their error is ~1e-8..1e-7 of the scale here (the
//!   worst is printed), while a wrong scale, nibble or bit lands at 1e-2..1 of it.
//!   The decoded formats compute every value as `scale * level - offset` from levels
//!   (model/quant/decoded_levels.rs); ggml's products are exact in the same places.
//! - Llama GGUFs in a Q4_K_M-like mix and in the other formats, written by gguf's
//!   GGUFWriter, load, and every tensor dequantizes to gguf's values (hashed), Q/K rows
//!   unpermuted as transformers does.

use std::path::{Path, PathBuf};

use qilin::backend::cpu::{CpuActivations, CpuBackend};
use qilin::backend::{Backend, Batch, KvCacheShape, BLOCK_SIZE};
use qilin::model::forward::Model;
use qilin::model::loader::gguf::{load_gguf, GgufFile};
use qilin::model::quant::{dequantize_row, dot_row, dot_row_portable};
use qilin::model::tensor::Bytes;
use qilin::model::weights::ModelWeights;
use qilin::model::{DType, WeightTensor};
use rand::{Rng, SeedableRng};
use serde_json::Value;

const KQUANTS: [DType; 3] = [DType::Q4_K, DType::Q5_K, DType::Q6_K];
/// The formats of tiny_lowbit_llama.gguf and the rest of the block fixture.
const OTHERS: [DType; 6] =
    [DType::Q5_0, DType::Q5_1, DType::IQ4_NL, DType::Q2_K, DType::Q3_K, DType::IQ4_XS];

fn dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/kquants")
}

fn read_json(name: &str) -> Value {
    serde_json::from_str(&std::fs::read_to_string(dir().join(name)).expect("read fixture"))
        .expect("json")
}

fn dtype(name: &str) -> DType {
    match name {
        "Q4_K" => DType::Q4_K,
        "Q5_K" => DType::Q5_K,
        "Q6_K" => DType::Q6_K,
        "Q5_0" => DType::Q5_0,
        "Q5_1" => DType::Q5_1,
        "IQ4_NL" => DType::IQ4_NL,
        "Q2_K" => DType::Q2_K,
        "Q3_K" => DType::Q3_K,
        "IQ4_XS" => DType::IQ4_XS,
        "Q4_0" => DType::Q4_0,
        "Q4_1" => DType::Q4_1,
        "F32" => DType::F32,
        other => panic!("unexpected dtype {other} in fixture"),
    }
}

/// Fixture rows: (dtype, raw blocks, f32 values as gguf dequantizes them).
fn rows() -> Vec<(DType, Vec<u8>, Vec<f32>)> {
    let index = read_json("blocks.json");
    let raw = std::fs::read(dir().join("blocks.bin")).expect("blocks.bin");
    let values: Vec<f32> = std::fs::read(dir().join("values.bin"))
        .expect("values.bin")
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect();
    let field = |r: &Value, k: &str| r[k].as_u64().unwrap() as usize;
    index["rows"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            let (at, len) = (field(r, "bytes_offset"), field(r, "bytes_len"));
            let (v, n) = (field(r, "values_offset"), field(r, "n"));
            let dt = dtype(r["dtype"].as_str().unwrap());
            (dt, raw[at..at + len].to_vec(), values[v..v + n].to_vec())
        })
        .collect()
}

#[test]
fn dequantize_matches_gguf_python_exactly() {
    let rows = rows();
    for dt in KQUANTS.into_iter().chain(OTHERS) {
        let n = dt.block_elems();
        let blocks: usize = rows.iter().filter(|r| r.0 == dt).map(|r| r.2.len() / n).sum();
        assert!(blocks >= 4, "{dt}: fixture has {blocks} blocks");
    }
    for (dt, bytes, expected) in &rows {
        let mut out = vec![f32::NAN; expected.len()];
        dequantize_row(*dt, bytes, &mut out);
        for (i, (a, b)) in out.iter().zip(expected).enumerate() {
            assert_eq!(a.to_bits(), b.to_bits(), "{dt} element {i}: {a} vs gguf {b}");
        }
    }
}

/// `got` within 1e-5 * sum |w x| of the f64 dot of `w` (gguf's values) and `x`.
fn check_dot(what: &str, dt: DType, w: &[f32], x: &[f32], got: f32) -> f64 {
    let exact: f64 = w.iter().zip(x).map(|(a, b)| *a as f64 * *b as f64).sum();
    let scale: f64 = w.iter().zip(x).map(|(a, b)| (*a as f64 * *b as f64).abs()).sum();
    let err = (got as f64 - exact).abs();
    assert!(err <= 1e-5 * scale, "{what} {dt} n={}: {got} vs {exact} (scale {scale})", x.len());
    err / scale
}

#[test]
fn dot_row_matches_the_gguf_values() {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(6);
    let mut worst = 0f64;
    for (dt, bytes, w) in rows() {
        for _ in 0..4 {
            let x: Vec<f32> = (0..w.len()).map(|_| rng.random_range(-2.0..2.0)).collect();
            worst = worst.max(check_dot("dot_row", dt, &w, &x, dot_row(dt, &bytes, &x)));
            let portable = dot_row_portable(dt, &bytes, &x);
            worst = worst.max(check_dot("portable", dt, &w, &x, portable));
        }
    }
    eprintln!("worst |err| / sum|w x| on fixture rows: {worst:.2e}");
}

/// Model-sized rows made of the fixture's blocks (each checked exact above) in random
/// order, so the long accumulations run over gguf-verified values.
#[test]
fn dot_row_on_long_rows() {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(66);
    let mut worst = 0f64;
    let rows = rows();
    for dt in KQUANTS.into_iter().chain(OTHERS) {
        let (bb, be) = (dt.block_bytes(), dt.block_elems());
        let blocks: Vec<(&[u8], &[f32])> = rows
            .iter()
            .filter(|r| r.0 == dt)
            .flat_map(|r| r.1.chunks_exact(bb).zip(r.2.chunks_exact(be)))
            .collect();
        for n in [512usize, 1536, 4096, 11008] {
            let (mut bytes, mut w) = (Vec::new(), Vec::new());
            for _ in 0..n / be {
                let (b, v) = blocks[rng.random_range(0..blocks.len())];
                bytes.extend_from_slice(b);
                w.extend_from_slice(v);
            }
            let x: Vec<f32> = (0..n).map(|_| rng.random_range(-1.0..1.0)).collect();
            worst = worst.max(check_dot("dot_row", dt, &w, &x, dot_row(dt, &bytes, &x)));
            let portable = dot_row_portable(dt, &bytes, &x);
            worst = worst.max(check_dot("portable", dt, &w, &x, portable));
        }
    }
    eprintln!("worst |err| / sum|w x| on long rows: {worst:.2e}");
}

#[test]
fn tiny_kquant_gguf_loads_with_gguf_values() {
    tiny_gguf_loads_with_gguf_values("tiny_kquant_llama", &KQUANTS);
}

#[test]
fn tiny_lowbit_gguf_loads_with_gguf_values() {
    tiny_gguf_loads_with_gguf_values("tiny_lowbit_llama", &OTHERS);
}

/// `stem`.gguf loads with the config and tensors of `stem`.expected.json, holding a
/// tensor of each of `formats`.
fn tiny_gguf_loads_with_gguf_values(stem: &str, formats: &[DType]) {
    let expected = read_json(&format!("{stem}.expected.json"));
    let model = load_gguf(&dir().join(format!("{stem}.gguf"))).expect("load");
    let cfg = &expected["config"];
    let c = &model.config;
    let want = |k: &str| cfg[k].as_u64().unwrap() as usize;
    assert_eq!(
        (c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim),
        (want("hidden_size"), want("num_heads"), want("num_kv_heads"), want("head_dim"))
    );
    assert_eq!(
        (c.intermediate_size, c.vocab_size),
        (want("intermediate_size"), want("vocab_size"))
    );
    assert!(!c.tie_word_embeddings);

    let tensors = expected["tensors"].as_object().unwrap();
    assert_eq!(model.tensors.len(), tensors.len(), "tensor count");
    let mut seen = std::collections::HashSet::new();
    for (name, e) in tensors {
        let t = model.tensors.get(name).unwrap_or_else(|| panic!("{name} missing"));
        let shape: Vec<usize> =
            e["shape"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as usize).collect();
        assert_eq!(t.shape, shape, "{name} shape");
        assert_eq!(t.dtype, dtype(e["dtype"].as_str().unwrap()), "{name} dtype");
        seen.insert(t.dtype);
        let mut values = vec![0f32; t.numel()];
        for (r, out) in values.chunks_exact_mut(t.row_len()).enumerate() {
            dequantize_row(t.dtype, t.row(r), out);
        }
        let first: Vec<f32> = e["first_values"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap() as f32)
            .collect();
        assert_eq!(&values[..4], &first[..], "{name} first values");
        let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        assert_eq!(
            format!("{:016x}", fnv1a64(&bytes)),
            e["fnv1a64_f32"].as_str().unwrap(),
            "{name}: values differ from gguf's"
        );
    }
    for dt in formats {
        assert!(seen.contains(dt), "fixture model has a {dt} tensor");
    }
    // The decode path on a loaded quantized matrix: each row's dot with x equals the
    // dequantized row's f64 dot.
    let q = &model.tensors["model.layers.0.self_attn.q_proj.weight"];
    let x: Vec<f32> = (0..q.row_len()).map(|i| ((i * 37) % 17) as f32 / 8.0 - 1.0).collect();
    let mut w = vec![0f32; q.row_len()];
    for r in 0..q.shape[0] {
        dequantize_row(q.dtype, q.row(r), &mut w);
        check_dot("loaded q_proj", q.dtype, &w, &x, dot_row(q.dtype, q.row(r), &x));
    }
}

fn fnv1a64(bytes: &[u8]) -> u64 {
    bytes
        .iter()
        .fold(0xcbf2_9ce4_8422_2325u64, |h, &b| (h ^ b as u64).wrapping_mul(0x100_0000_01b3))
}

/// A one-tensor GGUF v3 of GGML type `ty` with `data` (minimal header, no metadata).
fn one_tensor_gguf(ty: u32, dims: &[u64], data: &[u8]) -> Vec<u8> {
    let mut b = b"GGUF".to_vec();
    b.extend(3u32.to_le_bytes());
    b.extend(1u64.to_le_bytes()); // tensors
    b.extend(0u64.to_le_bytes()); // metadata
    let name = "blk.0.ffn_down.weight";
    b.extend((name.len() as u64).to_le_bytes());
    b.extend(name.as_bytes());
    b.extend((dims.len() as u32).to_le_bytes());
    for d in dims {
        b.extend(d.to_le_bytes());
    }
    b.extend(ty.to_le_bytes());
    b.extend(0u64.to_le_bytes());
    while !b.len().is_multiple_of(32) {
        b.push(0);
    }
    b.extend(data);
    b
}

#[test]
fn ggml_type_ids_map_to_block_formats() {
    for (ty, dt, bytes) in [
        (6u32, DType::Q5_0, 22usize),
        (7, DType::Q5_1, 24),
        (10, DType::Q2_K, 84),
        (11, DType::Q3_K, 110),
        (12, DType::Q4_K, 144),
        (13, DType::Q5_K, 176),
        (14, DType::Q6_K, 210),
        (20, DType::IQ4_NL, 18),
        (23, DType::IQ4_XS, 136),
    ] {
        // Three rows of two blocks.
        let block = dt.block_elems() as u64;
        let file = one_tensor_gguf(ty, &[2 * block, 3], &vec![0u8; 6 * bytes]);
        let g = GgufFile::parse(&file).unwrap_or_else(|e| panic!("type {ty}: {e}"));
        assert_eq!((g.tensors[0].dtype, g.tensors[0].len), (dt, 6 * bytes));
        // Rows must be whole blocks.
        let err = GgufFile::parse(&one_tensor_gguf(ty, &[block / 2, 3], &vec![0u8; 6 * bytes]))
            .expect_err("half a block");
        assert!(err.contains("whole number of blocks"), "{err}");
        let err =
            GgufFile::parse(&one_tensor_gguf(ty, &[block + block / 2, 3], &vec![0u8; 6 * bytes]))
                .expect_err("a block and a half");
        assert!(err.contains("whole number of blocks"), "{err}");
        // One byte short of the data is a truncated file, not a panic.
        let err = GgufFile::parse(&file[..file.len() - 1]).expect_err("truncated");
        assert!(err.contains("beyond the end"), "{err}");
    }
}

#[test]
fn other_kquant_family_types_stay_clear_errors() {
    for (ty, name) in [(15u32, "Q8_K"), (16, "IQ2_XXS"), (21, "IQ3_S"), (24, "I8")] {
        let err = GgufFile::parse(&one_tensor_gguf(ty, &[256, 1], &[0u8; 512])).expect_err(name);
        assert!(
            err.contains(&format!("{name} ({ty})")) && err.contains("not supported"),
            "type {ty}: {err}"
        );
        assert!(err.contains("blk.0.ffn_down.weight"), "{err}");
    }
}

/// The logits of `ids` read as one sequence by the CPU backend with `activations`:
/// `prompt_len` leading tokens as prompt, the rest as generated tokens (the integer
/// path under `CpuActivations::Q8`).
fn forward_logits(
    model: &qilin::model::LoadedModel,
    ids: &[u32],
    prompt_len: usize,
    activations: CpuActivations,
) -> Vec<f32> {
    let c = model.config.clone();
    let backend = CpuBackend::with_activations(activations);
    let weights = ModelWeights::load(&backend, model).expect("weights");
    let mut m = Model::new(c.clone(), backend, weights);
    let blocks = ids.len().div_ceil(BLOCK_SIZE);
    let shape = KvCacheShape {
        num_layers: c.num_layers,
        num_blocks: blocks,
        num_kv_heads: c.num_kv_heads,
        head_dim: c.head_dim,
    };
    let mut cache = m.backend.alloc_kv_cache(shape).expect("cache");
    let table: Vec<u32> = (0..blocks as u32).collect();
    let mut batch = Batch::default();
    batch.push_seq_of_prompt(ids, 0, &table, false, prompt_len);
    batch.logits_rows = (0..ids.len() as u32).collect();
    m.forward(&batch, &mut cache)
}

/// The tiny models compute as their own weights dequantized to F32 (gguf's values,
/// checked above) do: every linear layer, the quantized embedding table and lm_head
/// through the CPU backend's paths for each format (the dot product of a 3-token step,
/// the GEMM of a 24-token one), against the plain f32 path. f32 activations: 8-bit ones
/// move these random models' logits by several percent whatever the format (the k-quant
/// model as much as the other one), so their kernels are held to the exact dot of the
/// rounded operands instead (q8_activations.rs) and the models' perplexity to
/// llama.cpp's in bench/notes.md.
#[test]
fn tiny_lowbit_model_computes_as_its_dequantized_weights() {
    model_computes_as_its_dequantized_weights("tiny_lowbit_llama");
}

#[test]
fn tiny_kquant_model_computes_as_its_dequantized_weights() {
    model_computes_as_its_dequantized_weights("tiny_kquant_llama");
}

fn model_computes_as_its_dequantized_weights(stem: &str) {
    let path = dir().join(format!("{stem}.gguf"));
    let model = load_gguf(&path).expect("load");
    let mut plain = load_gguf(&path).expect("load");
    for t in plain.tensors.values_mut() {
        let mut values = vec![0f32; t.numel()];
        for (r, out) in values.chunks_exact_mut(t.row_len()).enumerate() {
            dequantize_row(t.dtype, t.row(r), out);
        }
        let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        *t = WeightTensor {
            dtype: DType::F32,
            shape: t.shape.clone(),
            data: Bytes::Owned(std::sync::Arc::new(bytes)),
        };
    }
    let vocab = model.config.vocab_size as u32;
    for tokens in [3u32, 24] {
        let ids: Vec<u32> = (0..tokens).map(|i| (i * 7 + 3) % vocab).collect();
        let reference = forward_logits(&plain, &ids, ids.len(), CpuActivations::F32);
        let scale = reference.iter().fold(0f32, |m, v| m.max(v.abs()));
        assert!(scale > 0.1, "logits of size {scale}: the test would not see a wrong weight");
        let got = forward_logits(&model, &ids, ids.len(), CpuActivations::F32);
        let worst = got.iter().zip(&reference).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        eprintln!("{stem}, {tokens} tokens: worst |logit difference| {worst:.2e} of {scale:.2}");
        assert!(worst <= 1e-4 * scale, "{stem}: logits differ by {worst} (scale {scale})");
    }
}
