//! `dot_row` throughput in GB/s of weight bytes, per dtype, for the row lengths of
//! SmolLM2-135M (576 = hidden, 1536 = FFN). Two working sets: one matrix that stays in
//! L2 (compute bound: what the kernel itself can do) and ~48 MB that streams from DRAM
//! (what a decode step sees: the 135M Q4_1 model reads ~80 MB per token).
//!
//! cargo bench --bench quant_dot

use std::hint::black_box;

use criterion::measurement::WallTime;
use criterion::{criterion_group, criterion_main, BenchmarkGroup, Criterion, Throughput};
use qilin::model::quant::q8_activations::{dot_row_q8, dot_rows_q8_tokens, Q8Activations, Q8Row};
use qilin::model::quant::{dot_row, f16_fields};
use qilin::model::DType;

const DTYPES: [DType; 6] =
    [DType::Q4_1, DType::Q4_0, DType::Q8_0, DType::F16, DType::BF16, DType::F32];

/// Random bytes with finite f16 scales (0x2000..0x3000 is ~1e-4..0.1).
fn matrix(dtype: DType, rows: usize, cols: usize) -> Vec<u8> {
    let row_bytes = dtype.row_bytes(cols).expect("whole blocks");
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let mut bytes: Vec<u8> = (0..rows * row_bytes)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state as u8
        })
        .collect();
    let fix = |b: &mut [u8]| b.copy_from_slice(&0x2c00u16.to_le_bytes());
    match dtype {
        DType::F16 | DType::BF16 => bytes.chunks_exact_mut(2).for_each(|b| b[1] &= 0x3f),
        DType::F32 => bytes.chunks_exact_mut(4).for_each(|b| b[3] = 0x3f),
        DType::I8 => {
            let s = 0.01f32.to_le_bytes();
            bytes.chunks_exact_mut(132).for_each(|b| b[..4].copy_from_slice(&s));
        }
        _ => {
            for blk in bytes.chunks_exact_mut(dtype.block_bytes()) {
                f16_fields(dtype).iter().for_each(|&a| fix(&mut blk[a..a + 2]));
            }
        }
    }
    bytes
}

/// One benchmark: `dot_row` over every row of a `[rows, cols]` matrix of `dtype`.
fn bench_rows(group: &mut BenchmarkGroup<'_, WallTime>, dtype: DType, rows: usize, cols: usize) {
    let row_bytes = dtype.row_bytes(cols).expect("whole blocks");
    let w = matrix(dtype, rows, cols);
    let x: Vec<f32> = (0..cols).map(|i| ((i * 7919) % 13) as f32 * 0.1 - 0.6).collect();
    let mut out = vec![0f32; rows];
    group.throughput(Throughput::Bytes(w.len() as u64));
    group.bench_function(format!("{dtype}/{cols}"), |b| {
        b.iter(|| {
            for (o, row) in out.iter_mut().zip(w.chunks_exact(row_bytes)) {
                *o = dot_row(dtype, row, black_box(&x));
            }
            black_box(&out);
        })
    });
}

/// Rows of `dtype` at `cols` that fill `target_bytes`, or `l2_rows` when
/// `target_bytes` is 0 (the L2-resident set).
fn rows_for(dtype: DType, cols: usize, target_bytes: usize, l2_rows: usize) -> usize {
    let row_bytes = dtype.row_bytes(cols).expect("whole blocks");
    if target_bytes == 0 {
        l2_rows
    } else {
        target_bytes / row_bytes
    }
}

fn bench(c: &mut Criterion) {
    for (label, target_bytes) in [("l2", 0usize), ("dram", 48 << 20)] {
        let mut group = c.benchmark_group(format!("dot_row_{label}"));
        group.sample_size(10).measurement_time(std::time::Duration::from_secs(2));
        for cols in [576usize, 1536] {
            for dtype in DTYPES {
                // L2: one 576x1536 / 1536x576 projection.
                let l2_rows = if cols == 576 { 1536 } else { 576 };
                bench_rows(&mut group, dtype, rows_for(dtype, cols, target_bytes, l2_rows), cols);
            }
        }
        group.finish();
    }
}

/// GGUF k-quants and the other formats read through their levels on a 4096-wide row (7B
/// hidden size) next to Q4_1, in GB/s of weight bytes: 64 rows (L2-resident, the
/// kernel's own speed) and ~48 MB (streamed from DRAM).
fn bench_kquants(c: &mut Criterion) {
    const COLS: usize = 4096;
    for (label, target_bytes) in [("l2", 0usize), ("dram", 48 << 20)] {
        let mut group = c.benchmark_group(format!("dot_row_kquant_{label}"));
        group.sample_size(10).measurement_time(std::time::Duration::from_secs(2));
        for dtype in [
            DType::Q4_K,
            DType::Q5_K,
            DType::Q6_K,
            DType::Q2_K,
            DType::Q3_K,
            DType::IQ4_XS,
            DType::Q5_0,
            DType::Q5_1,
            DType::IQ4_NL,
            DType::Q4_1,
        ] {
            bench_rows(&mut group, dtype, rows_for(dtype, COLS, target_bytes, 64), COLS);
        }
        group.finish();
    }
}

/// Qilin I8 / I4 (`--quantize`, AWQ/GPTQ) on a 3584-wide row (Qwen2.5-7B hidden size)
/// next to the GGUF formats of the same widths and bf16, in GB/s of weight bytes.
fn bench_intq(c: &mut Criterion) {
    const COLS: usize = 3584;
    for (label, target_bytes) in [("l2", 0usize), ("dram", 48 << 20)] {
        let mut group = c.benchmark_group(format!("dot_row_intq_{label}"));
        group.sample_size(10).measurement_time(std::time::Duration::from_secs(2));
        for dtype in [DType::I8, DType::I4, DType::Q8_0, DType::Q4_1, DType::BF16] {
            bench_rows(&mut group, dtype, rows_for(dtype, COLS, target_bytes, 64), COLS);
        }
        group.finish();
    }
}

/// Quantized activations (`dot_row_q8`, the CPU backend's `--cpu-activations q8`)
/// against f32 activations (`dot_row`) on the same matrix, in GB/s of weight bytes. The
/// q8 rows include quantizing x once per matrix, as a decode step does per linear layer.
fn bench_q8(c: &mut Criterion) {
    for (label, target_bytes) in [("l2", 0usize), ("dram", 48 << 20)] {
        let mut group = c.benchmark_group(format!("dot_row_q8_{label}"));
        group.sample_size(10).measurement_time(std::time::Duration::from_secs(2));
        for cols in [576usize, 1536] {
            for dtype in [
                DType::Q4_1,
                DType::Q4_0,
                DType::Q8_0,
                DType::Q4_K,
                DType::Q5_K,
                DType::Q6_K,
                DType::I8,
                DType::I4,
                DType::Q5_0,
                DType::Q5_1,
                DType::IQ4_NL,
                DType::Q2_K,
                DType::Q3_K,
                DType::IQ4_XS,
            ] {
                if dtype.row_bytes(cols).is_none() {
                    continue;
                }
                let l2_rows = if cols == 576 { 1536 } else { 576 };
                let rows = rows_for(dtype, cols, target_bytes, l2_rows);
                bench_rows(&mut group, dtype, rows, cols);
                bench_rows_q8(&mut group, dtype, rows, cols);
            }
        }
        group.finish();
    }
}

/// As `bench_rows`, through `dot_row_q8`.
fn bench_rows_q8(group: &mut BenchmarkGroup<'_, WallTime>, dtype: DType, rows: usize, cols: usize) {
    let row_bytes = dtype.row_bytes(cols).expect("whole blocks");
    let w = matrix(dtype, rows, cols);
    let x: Vec<f32> = (0..cols).map(|i| ((i * 7919) % 13) as f32 * 0.1 - 0.6).collect();
    let mut q = Q8Activations::default();
    let mut out = vec![0f32; rows];
    group.throughput(Throughput::Bytes(w.len() as u64));
    group.bench_function(format!("{dtype}/{cols}/q8"), |b| {
        b.iter(|| {
            q.quantize(black_box(&x), cols);
            for (o, row) in out.iter_mut().zip(w.chunks_exact(row_bytes)) {
                *o = dot_row_q8(dtype, row, q.row(0)).expect("an integer format");
            }
            black_box(&out);
        })
    });
}

/// Several tokens at once (`dot_rows_q8_tokens`, a decode step of several sequences):
/// each weight block is unpacked once per group of tokens. In GB/s of weight bytes
/// times tokens, so that 16 tokens at the one-token rate would read as the `/1` row.
fn bench_q8_tokens(c: &mut Criterion) {
    let mut group = c.benchmark_group("dot_rows_q8_tokens");
    group.sample_size(10).measurement_time(std::time::Duration::from_secs(2));
    let cols = 576;
    for dtype in [DType::Q4_1, DType::Q8_0] {
        let rows = 256; // L2-resident, as CpuLinear's tasks of 16 rows are in L1
        let w = matrix(dtype, rows, cols);
        for tokens in [1usize, 2, 4, 16] {
            let x: Vec<f32> =
                (0..tokens * cols).map(|i| ((i * 7919) % 13) as f32 * 0.1 - 0.6).collect();
            let mut q = Q8Activations::default();
            q.quantize(&x, cols);
            let xs: Vec<Q8Row<'_>> = (0..tokens).map(|t| q.row(t)).collect();
            let mut out = vec![0f32; rows * tokens];
            group.throughput(Throughput::Bytes((w.len() * tokens) as u64));
            group.bench_function(format!("{dtype}/{cols}/{tokens}"), |b| {
                b.iter(|| {
                    dot_rows_q8_tokens(dtype, black_box(&w), &xs, &mut out, tokens);
                    black_box(&out);
                })
            });
        }
    }
    group.finish();
}

criterion_group!(benches, bench, bench_kquants, bench_intq, bench_q8, bench_q8_tokens);
criterion_main!(benches);
