//! Parity of kernels/rope.cu (RoPE on q and k fused with the paged K/V write) with its
//! CPU twin, `CpuBackend::rope_and_store_kv`, through the `Backend` trait: CudaBackend
//! against CpuBackend on identical inputs (rounded to bf16 first), fresh random values
//! and block tables each run (the seed is printed).
//!
//! Geometries: SmolLM2 (9 / 3 heads, head_dim 64, theta 1e5), Qwen2.5-7B (28 / 4, 128,
//! theta 1e6) with its default rope and with the 128K YaRN setting (factor 4 over
//! 32768), and Qwen2.5-0.5B's heads (14 / 2, 64) with the fixture model's YaRN (original
//! 64 positions, so every position is in YaRN's stretched range). Batches: prefill
//! chunks from 0 and mid-sequence, on and off block boundaries, decode tokens up to
//! position 32768, mixed prefill + decode, a single token, odd token counts, an empty
//! batch. Slots are scattered over a small pool (physical blocks shuffled). Each
//! geometry runs twice, interleaved with the others, so the launcher's device copy of
//! the cos/sin table is replaced and re-uploaded between calls (two geometries share
//! head_dim 128 and table length and differ only in the table's values). In the
//! second round a quarter of the tokens have the slot `NO_SLOT` (rotated, not stored:
//! the padding rows of a graph-replayed decode step); the cache must not change there.
//!
//! Tolerances: none. The kernel rotates with the twin's own f32 cos/sin tables and the
//! twin's f32 expression (x1*c - x2*s, x2*c + x1*s, each product and sum rounded on its
//! own, no FMA), so its f32 results equal the twin's bit for bit and the stored bf16 is
//! bf16_rne(twin) bit for bit; v is copied. The twin's cache write is a plain copy of
//! its rotated k and of v (CpuKvCache::store), so the expected device cache is built
//! from those rows.
//!
//! `qilin_rope_qkv_store_kv_bf16` (through `CudaBackend::rope_qkv_and_store_kv` with
//! `FastPaths::rope_qkv` on) runs every case too, from the q, k, v rows concatenated as
//! the fused projection writes them, against the same twin: its q must equal the twin's
//! rotated q and its cache the twin's cache, bit for bit. The trait's default for that op
//! (split_cols, then the in-place kernel) runs them as well.
//!
//! Poison: every layer of the device cache is filled with NaN before the launch; slots
//! the batch does not write, and the layer it does not write, must still hold it.
//! q and k are rotated in place, so they cannot be poisoned; every element of them
//! changes, which the comparison sees.
//!
//! Runs only with `QILIN_GPU_TESTS=1`; then a missing driver, GPU or PTX is a failure.

#[path = "common/gpu.rs"]
mod gpu_common;
use gpu_common::{open_gpu, skip_without_gpu_tests};

use std::collections::HashMap;
use std::time::{SystemTime, UNIX_EPOCH};

use half::bf16;
use qilin::backend::cpu::{CpuBackend, CpuTensor};
use qilin::backend::cuda::CudaBackend;
use qilin::backend::{AttentionShape, Backend, Batch, KvCacheShape, BLOCK_SIZE, NO_SLOT};
use qilin::model::rope::RopeTable;
use qilin::model::ModelConfig;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde_json::{json, Value};

const NAN_BITS: u16 = 0x7fc0;
const NUM_LAYERS: usize = 2;
/// The layer the op writes; the other must stay poisoned.
const LAYER: usize = 1;
/// Physical blocks in the pool: more than any batch below touches, odd, so slots are
/// scattered rather than packed.
const NUM_BLOCKS: usize = 61;

/// Sequences of a batch as (first position, new tokens).
const BATCHES: &[(&str, &[(usize, usize)])] = &[
    (
        "mixed prefill + decode",
        &[(0, 37), (15, 1), (16, 1), (31, 1), (96, 16), (1000, 33), (4095, 1), (7, 1)],
    ),
    ("long decode", &[(32767, 1), (32768, 1), (20000, 1), (8191, 5), (4095, 17), (31999, 2)]),
    ("one token", &[(12345, 1)]),
    ("chunk of 255 from a block boundary", &[(16, 255)]),
    ("empty", &[]),
];

struct Geometry {
    name: &'static str,
    config: Value,
}

fn geometries() -> Vec<Geometry> {
    let qwen7b = |rope_scaling: Value| {
        json!({
            "architectures": ["Qwen2ForCausalLM"], "hidden_size": 3584,
            "intermediate_size": 18944, "num_hidden_layers": 28, "num_attention_heads": 28,
            "num_key_value_heads": 4, "vocab_size": 152064, "max_position_embeddings": 32768,
            "rope_theta": 1e6, "rope_scaling": rope_scaling
        })
    };
    vec![
        Geometry {
            name: "SmolLM2",
            config: json!({
                "architectures": ["LlamaForCausalLM"], "hidden_size": 576,
                "intermediate_size": 1536, "num_hidden_layers": 30, "num_attention_heads": 9,
                "num_key_value_heads": 3, "vocab_size": 49152, "rope_theta": 1e5,
                "max_position_embeddings": 8192
            }),
        },
        Geometry { name: "Qwen2.5-7B", config: qwen7b(Value::Null) },
        Geometry {
            name: "Qwen2.5-7B YaRN 128K",
            config: qwen7b(json!({"type": "yarn", "factor": 4.0,
                                  "original_max_position_embeddings": 32768})),
        },
        Geometry {
            name: "Qwen2.5-0.5B heads, fixture YaRN",
            config: json!({
                "architectures": ["Qwen2ForCausalLM"], "hidden_size": 896,
                "intermediate_size": 4864, "num_hidden_layers": 24, "num_attention_heads": 14,
                "num_key_value_heads": 2, "vocab_size": 151936, "rope_theta": 1e6,
                "max_position_embeddings": 32768,
                "rope_scaling": {"type": "yarn", "factor": 4.0,
                                 "original_max_position_embeddings": 64}
            }),
        },
    ]
}

/// Values already rounded to bf16 and never zero.
fn random_bf16(rng: &mut ChaCha8Rng, n: usize, max: f32) -> Vec<f32> {
    (0..n)
        .map(|_| {
            let magnitude = rng.random_range(1.0 / 64.0..max);
            let sign = if rng.random_bool(0.5) { -1.0 } else { 1.0 };
            bf16::from_f32(sign * magnitude).to_f32()
        })
        .collect()
}

/// A batch of `seqs`, each block a sequence writes drawn without replacement from a
/// shuffled pool (so written slots are distinct and scattered); blocks of the older
/// context, which this op never touches, are arbitrary pool blocks.
fn build_batch(rng: &mut ChaCha8Rng, seqs: &[(usize, usize)]) -> Batch {
    let mut pool: Vec<u32> = (0..NUM_BLOCKS as u32).collect();
    pool.shuffle(rng);
    let mut fresh = pool.into_iter();
    let mut batch = Batch::default();
    for &(first_pos, len) in seqs {
        let context = first_pos + len;
        let table: Vec<u32> = (0..context.div_ceil(BLOCK_SIZE))
            .map(|b| {
                if b >= first_pos / BLOCK_SIZE {
                    fresh.next().expect("NUM_BLOCKS covers every written block")
                } else {
                    rng.random_range(0..NUM_BLOCKS as u32)
                }
            })
            .collect();
        let tokens: Vec<u32> = (0..len).map(|_| rng.random_range(0..1000)).collect();
        batch.push_seq(&tokens, first_pos, &table, true);
    }
    batch
}

fn bf16_bits(v: f32) -> u32 {
    bf16::from_f32(v).to_f32().to_bits()
}

/// bf16 ulps between two bf16-representable f32 values of the same sign (for messages).
fn ulps(a: f32, b: f32) -> i32 {
    (a.to_bits() >> 16) as i32 - (b.to_bits() >> 16) as i32
}

struct Case<'a> {
    label: String,
    batch: &'a Batch,
    rope: &'a RopeTable,
    shape: AttentionShape,
    /// Through `rope_qkv_and_store_kv` (the qkv-reading kernel when
    /// `FastPaths::rope_qkv`) instead of `rope_and_store_kv`.
    fused: bool,
}

fn check_case(gpu: &CudaBackend, rng: &mut ChaCha8Rng, case: &Case) {
    let Case { label, batch, rope, shape, fused } = case;
    let (n, hd) = (batch.n_tokens(), shape.head_dim);
    let (q_cols, kv_cols) = (shape.num_heads * hd, shape.num_kv_heads * hd);
    let q = random_bf16(rng, n * q_cols, 4.0);
    let k = random_bf16(rng, n * kv_cols, 4.0);
    let v = random_bf16(rng, n * kv_cols, 4.0);
    let cache_shape = KvCacheShape {
        num_layers: NUM_LAYERS,
        num_blocks: NUM_BLOCKS,
        num_kv_heads: shape.num_kv_heads,
        head_dim: hd,
    };

    let cpu = CpuBackend::new();
    let mut q_cpu = CpuTensor::from_vec(q.clone(), n, q_cols);
    let mut k_cpu = CpuTensor::from_vec(k.clone(), n, kv_cols);
    let v_cpu = CpuTensor::from_vec(v.clone(), n, kv_cols);
    let mut cache_cpu = cpu.alloc_kv_cache(cache_shape).expect("CPU cache");
    cpu.rope_and_store_kv(
        &mut q_cpu,
        &mut k_cpu,
        &v_cpu,
        batch,
        rope,
        &mut cache_cpu,
        LAYER,
        *shape,
    );

    let mut cache_gpu = gpu.alloc_kv_cache(cache_shape).expect("device cache");
    let slot_values = NUM_BLOCKS * BLOCK_SIZE * kv_cols;
    let poison = vec![bf16::from_bits(NAN_BITS); slot_values];
    for layer in 0..NUM_LAYERS {
        for buffer in [&mut cache_gpu.keys[layer], &mut cache_gpu.values[layer]] {
            gpu.dev.stream.memcpy_htod(&poison[..], buffer).expect("poison the cache");
        }
    }
    // In place (q and k rotated where they are), or from the fused projection's rows
    // (q returned; k reaches only the cache, which the comparison below covers).
    let (q_gpu, k_gpu) = if *fused {
        let qkv: Vec<f32> = (0..n)
            .flat_map(|t| {
                let row = |x: &[f32], cols: usize| x[t * cols..(t + 1) * cols].to_vec();
                [row(&q, q_cols), row(&k, kv_cols), row(&v, kv_cols)].concat()
            })
            .collect();
        let qkv_gpu = gpu.tensor_from_host(&qkv, n, q_cols + 2 * kv_cols);
        // Best-effort poison: free a NaN buffer the new q's allocation may reuse.
        drop(gpu.tensor_from_host(&vec![f32::NAN; n * q_cols], n, q_cols));
        (gpu.rope_qkv_and_store_kv(&qkv_gpu, batch, rope, &mut cache_gpu, LAYER, *shape), None)
    } else {
        let mut q_gpu = gpu.tensor_from_host(&q, n, q_cols);
        let mut k_gpu = gpu.tensor_from_host(&k, n, kv_cols);
        let v_gpu = gpu.tensor_from_host(&v, n, kv_cols);
        gpu.rope_and_store_kv(
            &mut q_gpu,
            &mut k_gpu,
            &v_gpu,
            batch,
            rope,
            &mut cache_gpu,
            LAYER,
            *shape,
        );
        (q_gpu, Some(k_gpu))
    };

    // q and k, element by element, with everything needed to find the bad one.
    let mut tensors = vec![("q", &q_gpu, &q_cpu, &q, q_cols)];
    if let Some(k_gpu) = &k_gpu {
        tensors.push(("k", k_gpu, &k_cpu, &k, kv_cols));
    }
    for (what, gpu_t, cpu_t, input, cols) in tensors {
        let got = gpu.to_host(gpu_t);
        assert_eq!(got.len(), n * cols, "{label}: {what} size");
        if let Some(i) = (0..got.len()).find(|&i| got[i].to_bits() != bf16_bits(cpu_t.data[i])) {
            let (t, col) = (i / cols, i % cols);
            let (head, d) = (col / hd, col % hd);
            let half = hd / 2;
            let pair = d % half;
            let base = t * cols + head * hd;
            let pos = batch.positions[t] as usize;
            let (cos, sin) = rope.at(pos);
            panic!(
                "{label}: {what}[token {t}, head {head}, dim {d}] at position {pos} = {} on GPU, \
                 bf16(CPU) = {} (CPU f32 {}, {} bf16 ulps); inputs x1 {} x2 {}, cos {} sin {}",
                got[i],
                bf16::from_f32(cpu_t.data[i]),
                cpu_t.data[i],
                ulps(got[i], bf16::from_f32(cpu_t.data[i]).to_f32()),
                input[base + pair],
                input[base + half + pair],
                cos[pair],
                sin[pair]
            );
        }
    }

    // The cache: written slots hold rotated k and v, everything else the poison.
    let stored: Vec<(usize, u32)> =
        batch.slot_mapping.iter().copied().enumerate().filter(|&(_, s)| s != NO_SLOT).collect();
    let writer: HashMap<usize, usize> = stored.iter().map(|&(t, s)| (s as usize, t)).collect();
    assert_eq!(writer.len(), stored.len(), "{label}: the test's slots must be distinct");
    let poison_bits = bf16::from_bits(NAN_BITS).to_f32().to_bits();
    for layer in 0..NUM_LAYERS {
        let (keys, values) = cache_gpu.download_layer(&gpu.dev, layer);
        assert_eq!(keys.len(), slot_values, "{label}: download_layer size");
        for (what, cache, source) in [("key", &keys, &k_cpu.data), ("value", &values, &v)] {
            for slot in 0..NUM_BLOCKS * BLOCK_SIZE {
                let row = &cache[slot * kv_cols..(slot + 1) * kv_cols];
                let token = if layer == LAYER { writer.get(&slot).copied() } else { None };
                let bad = match token {
                    Some(t) => {
                        let expected = &source[t * kv_cols..(t + 1) * kv_cols];
                        (0..kv_cols).find(|&i| row[i].to_bits() != bf16_bits(expected[i]))
                    }
                    None => (0..kv_cols).find(|&i| row[i].to_bits() != poison_bits),
                };
                if let Some(i) = bad {
                    let expected = match token {
                        Some(t) => format!(
                            "token {t} (position {}) value {}",
                            batch.positions[t],
                            bf16::from_f32(source[t * kv_cols + i])
                        ),
                        None => "untouched (NaN poison)".to_string(),
                    };
                    panic!(
                        "{label}: {what} cache layer {layer} slot {slot} (block {}, offset {}) \
                         [kv head {}, dim {}] = {}; expected {expected}",
                        slot / BLOCK_SIZE,
                        slot % BLOCK_SIZE,
                        i / hd,
                        i % hd,
                        row[i]
                    );
                }
            }
        }
    }
}

#[test]
fn rope_and_kv_write_match_the_cpu_twin() {
    if skip_without_gpu_tests() {
        return;
    }
    let mut gpu = open_gpu();
    let seed = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64);
    eprintln!("seed {seed}");
    let mut rng = ChaCha8Rng::seed_from_u64(seed);

    let geometries = geometries();
    let mut tables: Vec<(ModelConfig, RopeTable)> = geometries
        .iter()
        .map(|g| {
            let config =
                ModelConfig::from_hf_json(&g.config).unwrap_or_else(|e| panic!("{}: {e}", g.name));
            let table = RopeTable::new(&config.rope, config.head_dim);
            (config, table)
        })
        .collect();
    for round in 0..2 {
        for (g, (config, rope)) in geometries.iter().zip(&mut tables) {
            let shape = AttentionShape {
                num_heads: config.num_heads,
                num_kv_heads: config.num_kv_heads,
                head_dim: config.head_dim,
                scale: 1.0 / (config.head_dim as f32).sqrt(),
            };
            for &(batch_name, seqs) in BATCHES {
                let mut batch = build_batch(&mut rng, seqs);
                // Round 1: a quarter of the tokens are rotated without a store, as the
                // padding rows of a graph-replayed decode step are.
                let mut unstored = 0;
                for slot in batch.slot_mapping.iter_mut() {
                    if round == 1 && rng.random_bool(0.25) {
                        *slot = NO_SLOT;
                        unstored += 1;
                    }
                }
                // Grows the table batch by batch in round 0, as the engine's does.
                rope.ensure(batch.seqs.iter().map(|s| s.context_len).max().unwrap_or(0));
                let label = format!(
                    "{} ({}/{} heads, head_dim {}), {batch_name}, {} tokens ({unstored} at \
                     NO_SLOT), round {round}",
                    g.name,
                    shape.num_heads,
                    shape.num_kv_heads,
                    shape.head_dim,
                    batch.n_tokens()
                );
                // Both kernels; the qkv-reading one also through the trait's default
                // (split_cols, then the in-place kernel) when its switch is off.
                for (fused, rope_qkv) in [(false, false), (true, true), (true, false)] {
                    gpu.dev.paths.rope_qkv = rope_qkv;
                    let label = format!("{label}, fused {fused}, QILIN_CUDA_ROPE_QKV {rope_qkv}");
                    check_case(
                        &gpu,
                        &mut rng,
                        &Case { label: label.clone(), batch: &batch, rope, shape, fused },
                    );
                    eprintln!("{label}: bit-exact");
                }
            }
        }
    }
}
