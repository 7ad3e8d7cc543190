//! One forward step of the demo model (SmolLM2-135M, Q4_1 GGUF) on the CPU backend:
//! a decode step at a 512-token context and a 128-token prefill chunk, with 8-bit
//! activations (`q8`, the default: decode rows only, prompt chunks take the f32 GEMM
//! either way) and the f32 reference (`f32`). These are the numbers to hold against llama.cpp's tg128 /
//! pp512 on the same machine (shared/toolchain.md); `qilin generate` prints the
//! end-to-end equivalents.
//!
//! tools/setup && cargo bench --bench cpu_forward   (QILIN_SMOLLM2_GGUF overrides the path)

#[path = "../tests/common/mod.rs"]
mod common;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use qilin::backend::cpu::{CpuActivations, CpuBackend};
use qilin::backend::{Backend, Batch, KvCacheShape};
use qilin::kv::block_manager::blocks_for;
use qilin::kv::BlockManager;
use qilin::model::forward::Model;
use qilin::model::load_model;
use qilin::model::weights::ModelWeights;

fn forward_steps(c: &mut Criterion) {
    for (label, activations) in [("q8", CpuActivations::Q8), ("f32", CpuActivations::F32)] {
        forward_steps_with(c, label, activations);
    }
}

fn forward_steps_with(c: &mut Criterion, label: &str, activations: CpuActivations) {
    let loaded = load_model(&common::smollm2_gguf()).expect("load the demo model");
    let backend = CpuBackend::with_activations(activations);
    let weights = ModelWeights::load(&backend, &loaded).expect("weights");
    let config = loaded.config.clone();
    let mut model = Model::new(loaded.config, backend, weights);
    let context = 512;
    let mut pool = BlockManager::new(blocks_for(context + 1));
    let mut cache = model
        .backend
        .alloc_kv_cache(KvCacheShape {
            num_layers: config.num_layers,
            num_blocks: pool.num_blocks(),
            num_kv_heads: config.num_kv_heads,
            head_dim: config.head_dim,
        })
        .expect("KV cache");
    let mut table = Vec::new();
    assert!(pool.append_slot(&mut table, context + 1));
    // Arbitrary but fixed in-vocabulary tokens.
    let tokens: Vec<u32> = (0..context as u32).map(|i| (i * 7919) % 49152).collect();
    let mut prefill = Batch::default();
    prefill.push_seq(&tokens, 0, &table, true);
    model.forward(&prefill, &mut cache);

    let mut group = c.benchmark_group(format!("smollm2_q4_1_{label}"));
    group.sample_size(10);
    let mut chunk = Batch::default();
    chunk.push_seq(&tokens[..128], 0, &table, true);
    group.throughput(Throughput::Elements(128));
    group.bench_function("prefill_128_tokens", |b| b.iter(|| model.forward(&chunk, &mut cache)));
    let mut step = Batch::default();
    step.push_decode(42, context, &table);
    group.throughput(Throughput::Elements(1));
    group.bench_function("decode_step_ctx512", |b| b.iter(|| model.forward(&step, &mut cache)));
    group.finish();
}

criterion_group!(benches, forward_steps);
criterion_main!(benches);
