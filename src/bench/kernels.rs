//! `qilin bench kernels`: every op of the CUDA backend at Qwen2.5-7B's shapes, timed
//! with CUDA events, next to the two ceilings measured on the same device: copy
//! bandwidth (a 1 GiB device-to-device copy, bytes read + written) and the bf16 matrix
//! rate (cuBLAS, 8192^3, random data).
//!
//! Each op is called through the `Backend` trait, exactly as `model::forward` calls it,
//! so its time includes what the launcher does around the kernel (allocating and
//! zeroing the output, uploading batch metadata on the first call of a batch). The
//! L2 cache is flushed before every timed call so weights and KV blocks come from device
//! memory as they do in a real step: by reading a 128 MiB buffer (the device argmax over
//! it), which leaves L2 holding clean lines. The flush is queued without waiting for it,
//! so the host has launched the timed op before the GPU gets there: the time is the
//! GPU's, from the flush's end to the op's end. Until 2026-11-26 (late) the flush
//! downloaded its ids, the GPU idled from the start event until the host's launch
//! arrived, and small ops read 5-13 us slower than Nsight Compute's kernel time (decode
//! attention of one 8K sequence: 29.3 us against 16.4 us; H200, abc5642). A 256 MiB memset, the flush before
//! 2026-11-26 and again with QILIN_BENCH_FLUSH_WRITE=1, leaves it full of dirty lines
//! that the timed op then writes back: up to L2's size of extra traffic, an overhead that
//! looked like ~7-14 us per op on an H200 (qkv_proj at batch 1 took 17 us for 7.8 us of
//! bytes). Per op, the roofline: the
//! fewest bytes it must move (each input read once, each output written once) over the
//! copy bandwidth, and its FLOPs over the matrix rate; the larger is the floor, and
//! "of floor" is floor / measured time. An op that panics (not implemented yet, a
//! launcher assertion) is reported with its message and the rest still run.

use anyhow::{bail, Context};
use cudarc::driver::sys;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::Serialize;

use super::gpu_model::{quant_format, shape_config, DeviceRandom};
use super::kernel_timer::{ceilings, print_header, Bench, Flush, Timer};
use crate::backend::abi::{GEMV_MAX_TOKENS, QILIN_QGEMV_SMALL_MAX_TOKENS};
use crate::backend::cuda::{gemv_cublas_wins, gemv_mma_wins};
use crate::backend::cuda::{AttentionKernels, CudaBackend, CudaTensor};
use crate::backend::{
    rope_qkv_by_split, AttentionShape, Backend, Batch, KvCacheShape, PenaltyBatch, PenaltyToken,
    RowSampling,
};
use crate::config::BenchKernelsArgs;
use crate::engine::load::open_cuda;
use crate::kv::block_manager::blocks_for;
use crate::model::quantize::QuantizeMethod;
use crate::model::rope::RopeTable;

#[derive(Debug, Serialize)]
pub struct OpResult {
    pub op: String,
    pub shape: String,
    /// Fewest bytes the op must move through device memory.
    pub bytes: f64,
    pub flops: f64,
    /// Median over the timed calls, microseconds; None when the op failed.
    pub time_us: Option<f64>,
    pub gb_per_s: Option<f64>,
    pub tflops: Option<f64>,
    /// max(bytes / copy bandwidth, flops / matrix rate), microseconds.
    pub floor_us: f64,
    /// "memory" or "compute": which term sets the floor.
    pub bound: &'static str,
    /// floor / time: 1.0 is the roofline.
    pub of_floor: Option<f64>,
    pub error: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct KernelReport {
    pub device: String,
    pub multiprocessors: i32,
    pub l2_bytes: i32,
    /// Device-to-device copy, bytes read + written per second, GB/s (1e9).
    pub copy_gb_per_s: f64,
    /// cuBLAS bf16 GEMM 8192^3 on random data, TFLOP/s (1e12).
    pub bf16_mm_tflops: f64,
    pub iters: usize,
    /// How L2 was emptied before each timed call (module docs).
    pub l2_flush: &'static str,
    pub ops: Vec<OpResult>,
}

pub fn run(args: &BenchKernelsArgs) -> anyhow::Result<()> {
    if args.iters == 0 {
        bail!("--iters must be at least 1");
    }
    if args.context == 0 || args.prefill_len == 0 {
        bail!("--context and --prefill-len must be at least 1");
    }
    let c = shape_config("qwen2.5-7b")?;
    if args.context > c.max_position_embeddings || args.prefill_len > c.max_position_embeddings {
        bail!("--context and --prefill-len must be at most {}", c.max_position_embeddings);
    }
    let backend: CudaBackend =
        open_cuda().map_err(|why| anyhow::anyhow!("this benchmark needs a GPU: {why}"))?;
    let dev = &backend.dev;
    let attr = |a| dev.ctx.attribute(a).unwrap_or(0);
    let multiprocessors = attr(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT);
    let l2_bytes = attr(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_L2_CACHE_SIZE);
    let mut rand = DeviceRandom::new(dev, args.seed);
    let mut timer = Timer { dev, flush: Flush::new(dev), iters: args.iters };
    let (copy, mm) = ceilings(dev, &mut timer, &mut rand)?;
    println!(
        "{}: {multiprocessors} SMs, {} MiB L2; copy {:.0} GB/s (read + write), bf16 GEMM {:.0} TFLOP/s",
        dev.name(),
        l2_bytes >> 20,
        copy / 1e9,
        mm / 1e12
    );
    print_header();
    let report = KernelReport {
        device: dev.name(),
        multiprocessors,
        l2_bytes,
        copy_gb_per_s: copy / 1e9,
        bf16_mm_tflops: mm / 1e12,
        iters: args.iters,
        l2_flush: timer.flush.describe(),
        ops: Vec::new(),
    };
    let mut bench = Bench {
        timer,
        copy_bytes_per_s: copy,
        mm_flops_per_s: mm,
        report,
        json: args.json.as_deref(),
        only: &args.only,
    };
    let b = &backend;
    let (h, hd, ffn, vocab) = (c.hidden_size, c.head_dim, c.intermediate_size, c.vocab_size);
    let (q, kv) = (c.num_heads * hd, c.num_kv_heads * hd);
    let mut rng = ChaCha8Rng::seed_from_u64(args.seed);
    let bf = 2.0; // bytes per bf16 value

    // Embedding gather.
    {
        let table = rand.linear(vocab, h, false);
        for n in [1usize, 2048] {
            let ids: Vec<u32> = (0..n).map(|_| rng.random_range(0..vocab as u32)).collect();
            let bytes = (2 * n * h) as f64 * bf + 4.0 * n as f64;
            bench.measure("embedding", format!("{n} ids, [{vocab}, {h}]"), bytes, 0.0, &mut || {
                drop(b.embedding(&table, &ids));
            });
        }
    }

    // Fused residual add + RMSNorm.
    for n in [1usize, 64, 2048] {
        let mut residual = rand.tensor(n, h, 4.0);
        let x = rand.tensor(n, h, 1.0);
        let weight = rand.vector(h);
        let bytes = (4 * n * h + h) as f64 * bf;
        bench.measure("add_rms_norm", format!("[{n}, {h}]"), bytes, 0.0, &mut || {
            drop(b.add_rms_norm(&mut residual, Some(&x), &weight, c.rms_norm_eps));
        });
    }

    // Linear layers: GEMV at decode batch sizes, GEMM at a prefill chunk.
    let linears = [
        ("linear qkv_proj", q + 2 * kv, h, true),
        ("linear o_proj", h, q, false),
        ("linear gate_up_proj", 2 * ffn, h, false),
        ("linear down_proj", h, ffn, false),
        ("linear lm_head", vocab, h, false),
    ];
    for (name, out, inp, bias) in linears {
        let w = rand.linear(out, inp, bias);
        let sizes: &[usize] = if name.ends_with("lm_head") {
            &[1, 2, 4, 8, 64, 256]
        } else {
            &[1, 2, 4, 8, 64, 256, 2048]
        };
        for &n in sizes {
            let x = rand.tensor(n, inp, 1.0);
            let values = out * inp + n * inp + n * out + if bias { out } else { 0 };
            let flops = 2.0 * (n * out * inp) as f64;
            let shape = format!("[{n}, {inp}] x [{out}, {inp}]^T");
            bench.measure(name, shape.clone(), values as f64 * bf, flops, &mut || {
                drop(b.linear(&x, &w));
            });
            // At 2-8 tokens, the paths the dispatch does not take beside the one it does:
            // cuBLAS (the dispatch's from 4 tokens, `gemv_cublas_wins`) and the two GEMVs
            // (`gemv_mma_wins` picks one below that, or with QILIN_CUDA_GEMV_CUBLAS=0).
            if (2..=GEMV_MAX_TOKENS).contains(&n) {
                let mut y = rand.tensor(n, out, 1.0);
                let cublas_takes = gemv_cublas_wins(n);
                if !cublas_takes {
                    let op = format!("{name} (cublas)");
                    bench.measure(&op, shape.clone(), values as f64 * bf, flops, &mut || {
                        b.linear_cublas_into(&x, &w, &mut y)
                    });
                }
                for mma in [false, true] {
                    if !cublas_takes && mma == gemv_mma_wins(n, inp, out) {
                        continue; // the dispatch row above
                    }
                    let op = format!("{name} ({})", if mma { "gemv mma" } else { "gemv fma" });
                    bench.measure(&op, shape.clone(), values as f64 * bf, flops, &mut || {
                        if mma {
                            b.linear_gemv_mma_into(&x, &w, &mut y)
                        } else {
                            b.linear_gemv_fma_into(&x, &w, &mut y)
                        }
                    });
                }
            }
        }
    }

    // The same layers quantized (kernels/quant_linear.cu): int4 and int8 levels in groups
    // of 128, as --quantize and AWQ/GPTQ checkpoints give them; the GEMV up to 8 tokens,
    // dequantization + cuBLAS above (whose extra traffic shows as a lower "of floor").
    for method in [QuantizeMethod::Int4, QuantizeMethod::Int8] {
        let format = quant_format(method).context("a quantizing method has a format")?;
        for &(name, out, inp, bias) in linears.iter().filter(|l| !l.0.ends_with("lm_head")) {
            let w = rand.quant_linear(out, inp, bias, format);
            let weight_bytes =
                (out * inp * format.bits as usize / 8 + out * inp / format.group * 8) as f64;
            // 16 and 32: where the tensor-core GEMV's chunks of 8 tokens
            // (QILIN_CUDA_QGEMV_MMA_WIDE) meet the tensor-core GEMM and dequantization +
            // cuBLAS; 64: the most the GEMM takes (`qgemm_wins`); 256: past it.
            for n in [1usize, 8, 16, 32, 64, 256, 2048] {
                let x = rand.tensor(n, inp, 1.0);
                let values = n * inp + n * out + if bias { out } else { 0 };
                let bytes = weight_bytes + values as f64 * bf;
                let flops = 2.0 * (n * out * inp) as f64;
                let shape = format!("[{n}, {inp}] x [{out}, {inp}]^T");
                let op = format!("{name} {}", method.name());
                bench.measure(&op, shape.clone(), bytes, flops, &mut || {
                    drop(b.linear(&x, &w));
                });
                // The small-batch GEMV called directly (the dispatch's choice up to its
                // token limit unless QILIN_CUDA_QGEMV_SMALL=0).
                if n <= QILIN_QGEMV_SMALL_MAX_TOKENS as usize {
                    let mut y = rand.tensor(n, out, 1.0);
                    let op = format!("{name} {} (qgemv small)", method.name());
                    bench.measure(&op, shape.clone(), bytes, flops, &mut || {
                        b.linear_qgemv_small_into(&x, &w, &mut y);
                    });
                }
                // The tensor-core GEMV called directly, where it takes the layer.
                let mut y = rand.tensor(n, out, 1.0);
                let op = format!("{name} {} (qgemv mma)", method.name());
                if b.linear_qgemv_mma_into(&x, &w, &mut y) {
                    bench.measure(&op, shape.clone(), bytes, flops, &mut || {
                        b.linear_qgemv_mma_into(&x, &w, &mut y);
                    });
                }
                // Its split-K variant (opt-in with QILIN_CUDA_QGEMV_MMA2=1), called directly.
                let op = format!("{name} {} (qgemv mma2)", method.name());
                if b.linear_qgemv_splitk_into(&x, &w, &mut y) {
                    bench.measure(&op, shape.clone(), bytes, flops, &mut || {
                        b.linear_qgemv_splitk_into(&x, &w, &mut y);
                    });
                }
                // Past the GEMVs' tokens, the two paths for the same layer whichever the
                // dispatch takes (`qgemm_wins`): the tensor-core GEMM, split-K as its
                // geometry decides, and dequantization + cuBLAS. Not at 2048 tokens, where
                // the GEMM lost by 3-4x (771cd47).
                if n > GEMV_MAX_TOKENS && n <= 256 {
                    let mut y = rand.tensor(n, out, 1.0);
                    let op = format!("{name} {} (qgemm)", method.name());
                    bench.measure(&op, shape.clone(), bytes, flops, &mut || {
                        b.linear_qgemm_into(&x, &w, &mut y, None);
                    });
                    let op = format!("{name} {} (dequant + cublas)", method.name());
                    bench.measure(&op, shape.clone(), bytes, flops, &mut || {
                        b.linear_cublas_into(&x, &w, &mut y);
                    });
                    // The int4 GEMM on the tensor-core GEMV's path (opt-in with
                    // QILIN_CUDA_QGEMM_MMA=1), called directly where it takes the layer.
                    let op = format!("{name} {} (qgemm mma)", method.name());
                    if b.linear_qgemm_mma_into(&x, &w, &mut y) {
                        bench.measure(&op, shape, bytes, flops, &mut || {
                            b.linear_qgemm_mma_into(&x, &w, &mut y);
                        });
                    }
                }
            }
        }
    }

    // SiLU-and-multiply.
    for n in [1usize, 64, 2048] {
        let gate_up = rand.tensor(n, 2 * ffn, 2.0);
        let bytes = (3 * n * ffn) as f64 * bf;
        bench.measure("silu_mul", format!("[{n}, {}]", 2 * ffn), bytes, 0.0, &mut || {
            drop(b.silu_mul(&gate_up));
        });
    }

    // Column split of the fused qkv output, and the gather of the logits rows.
    {
        let n = 2048;
        let qkv = rand.tensor(n, q + 2 * kv, 1.0);
        let bytes = (2 * n * (q + 2 * kv)) as f64 * bf;
        bench.measure("split_cols", format!("[{n}, {}]", q + 2 * kv), bytes, 0.0, &mut || {
            drop(b.split_cols(&qkv, &[q, kv, kv]));
        });
        let residual = rand.tensor(n, h, 1.0);
        let rows: Vec<u32> = (0..64).map(|i| i * 32 + 31).collect();
        let bytes = (2 * rows.len() * h) as f64 * bf;
        bench.measure("gather_rows", format!("64 of [{n}, {h}]"), bytes, 0.0, &mut || {
            drop(b.gather_rows(&residual, &rows));
        });
    }

    // Greedy choice on the device, against the logits download it replaces.
    for n in [1usize, 64, 256] {
        let logits = rand.tensor(n, c.vocab_size, 4.0);
        let bytes = (n * c.vocab_size) as f64 * bf + 4.0 * n as f64;
        bench.measure("argmax", format!("[{n}, {}]", c.vocab_size), bytes, 0.0, &mut || {
            drop(b.argmax_rows(&logits));
        });
        // The split kernels (several blocks per row; opt-in QILIN_CUDA_SAMPLE_SPLIT=1),
        // called directly.
        let shape = format!("[{n}, {}]", c.vocab_size);
        bench.measure("argmax (split)", shape.clone(), bytes, 0.0, &mut || {
            drop(b.split_rows(&logits, None));
        });
        // Sampling on the device (qilin_sample_bf16): each row is read once per search pass.
        let samplings = [
            ("sample (T 0.7)", 0, 1.0),
            ("sample (top_p 0.9, T 0.7)", 0, 0.9),
            ("sample (top_k 50, top_p 0.9, T 0.7)", 50, 0.9),
        ];
        for (op, top_k, top_p) in samplings {
            let rows = vec![RowSampling { temperature: 0.7, top_k, top_p, min_p: 0.0, u: 0.5 }; n];
            bench.measure(op, shape.clone(), bytes, 0.0, &mut || {
                drop(b.sample_rows(&logits, &rows));
            });
            bench.measure(&format!("{op} (split)"), shape.clone(), bytes, 0.0, &mut || {
                drop(b.split_rows(&logits, Some(&rows)));
            });
        }
        // Top-p alone on logits shaped like a model's (a few confident tokens over a broad
        // base): uniform logits at T 0.7 put the nucleus over ~20% of the vocabulary, past
        // the split kernel's candidates, which then falls back to the one-block algorithm.
        let peaked = peaked_logits(b, n, c.vocab_size, &mut rng);
        let rows =
            vec![RowSampling { temperature: 0.7, top_k: 0, top_p: 0.9, min_p: 0.0, u: 0.5 }; n];
        let op = "sample (top_p 0.9, T 0.7, peaked logits)";
        bench.measure(op, shape.clone(), bytes, 0.0, &mut || {
            drop(b.sample_rows(&peaked, &rows));
        });
        bench.measure(&format!("{op} (split)"), shape.clone(), bytes, 0.0, &mut || {
            drop(b.split_rows(&peaked, Some(&rows)));
        });
        // Qwen2.5's defaults, without and with its repetition penalty on the device
        // (qilin_apply_penalties_bf16 + its per-step upload, then qilin_sample_bf16):
        // PENALTY_IDS distinct ids per row, a long prompt's worth. The penalised logits
        // drift from one call to the next (in place), which changes no kernel's work.
        let qwen = RowSampling { temperature: 0.7, top_k: 20, top_p: 0.8, min_p: 0.0, u: 0.5 };
        let rows = vec![qwen; n];
        let op = "sample (top_k 20, top_p 0.8, T 0.7)";
        bench.measure(op, shape.clone(), bytes, 0.0, &mut || {
            drop(b.sample_rows(&logits, &rows));
        });
        bench.measure(&format!("{op} (split)"), shape.clone(), bytes, 0.0, &mut || {
            drop(b.split_rows(&logits, Some(&rows)));
        });
        let penalties = bench_penalties(n, c.vocab_size, &mut rng);
        let mut scratch = rand.tensor(n, c.vocab_size, 4.0);
        let op = "sample + penalties (rep 1.05, top_k 20, top_p 0.8, T 0.7)";
        bench.measure(op, shape, bytes, 0.0, &mut || {
            drop(b.sample_rows_penalized(&mut scratch, &rows, &penalties));
        });
        // Into a reused buffer, as the engine copies them.
        let mut host = Vec::new();
        bench.measure(
            "to_host (logits)",
            format!("[{n}, {}]", c.vocab_size),
            bytes,
            0.0,
            &mut || b.to_host_into(&logits, &mut host),
        );
    }

    // RoPE + K/V cache write, and attention, over one layer's paged cache.
    let shape = AttentionShape {
        num_heads: c.num_heads,
        num_kv_heads: c.num_kv_heads,
        head_dim: hd,
        scale: 1.0 / (hd as f32).sqrt(),
    };
    let decode_batches = [1usize, 8, 64];
    let per_seq = blocks_for(args.context);
    let max_batch = decode_batches.iter().copied().max().unwrap_or(1);
    let num_blocks = (max_batch * per_seq).max(blocks_for(args.prefill_len)).max(blocks_for(2048));
    let mut cache = b
        .alloc_kv_cache(KvCacheShape {
            num_layers: 1,
            num_blocks,
            num_kv_heads: c.num_kv_heads,
            head_dim: hd,
        })
        .context("allocating the KV cache")?;
    rand.fill_kv(&mut cache);
    let mut rope = RopeTable::new(&c.rope, hd);
    rope.ensure(args.context.max(args.prefill_len).max(2048) + 1);
    // Decode: every sequence at `context`, one new token each.
    let decode_batch = |n_seqs: usize| {
        let mut batch = Batch::default();
        for s in 0..n_seqs {
            let first = (s * per_seq) as u32;
            let table: Vec<u32> = (first..first + per_seq as u32).collect();
            batch.push_decode(0, args.context - 1, &table);
        }
        batch
    };
    // Prefill: one sequence of `len` tokens from position 0.
    let prefill_batch = |len: usize| {
        let mut batch = Batch::default();
        let table: Vec<u32> = (0..blocks_for(len) as u32).collect();
        batch.push_seq(&vec![0; len], 0, &table, true);
        batch
    };
    for (label, batch) in [("decode", decode_batch(64)), ("prefill", prefill_batch(2048))] {
        let n = batch.n_tokens();
        let mut qt = rand.tensor(n, q, 1.0);
        let mut kt = rand.tensor(n, kv, 1.0);
        let v = rand.tensor(n, kv, 1.0);
        // q and k read and written, v read, K and V written to the cache, cos/sin (f32) read.
        let bytes =
            (2 * n * q + 2 * n * kv + n * kv + 2 * n * kv) as f64 * bf + (n * hd) as f64 * 4.0;
        let what = format!("{label}: {n} tokens, q [{n}, {q}], kv [{n}, {kv}]");
        bench.measure("rope_and_store_kv", what.clone(), bytes, 0.0, &mut || {
            b.rope_and_store_kv(&mut qt, &mut kt, &v, &batch, &rope, &mut cache, 0, shape);
        });
        // From the fused projection, as a layer runs it: the dispatch's split copies and
        // the in-place kernel, then the kernel reading the columns (QILIN_CUDA_ROPE_QKV=1).
        let qkv = rand.tensor(n, q + 2 * kv, 1.0);
        // qkv read, q written, K and V written to the cache, cos/sin read.
        let fused_bytes =
            (n * (q + 2 * kv) + n * q + 2 * n * kv) as f64 * bf + (n * hd) as f64 * 4.0;
        // The copies read qkv and write q, k, v; then the in-place kernel's bytes.
        let copies_bytes = bytes + (2 * n * (q + 2 * kv)) as f64 * bf;
        bench.measure(
            "split_cols + rope_and_store_kv",
            what.clone(),
            copies_bytes,
            0.0,
            &mut || {
                drop(rope_qkv_by_split(b, &qkv, &batch, &rope, &mut cache, 0, shape));
            },
        );
        bench.measure("rope_qkv_and_store_kv (one kernel)", what, fused_bytes, 0.0, &mut || {
            drop(b.rope_qkv_in_one_kernel(&qkv, &batch, &rope, &mut cache, 0, shape));
        });
    }
    for &n_seqs in &decode_batches {
        let batch = decode_batch(n_seqs);
        let qt = rand.tensor(n_seqs, q, 1.0);
        let ctx = args.context;
        let bytes = (n_seqs * ctx * 2 * kv + 2 * n_seqs * q) as f64 * bf;
        let flops = 4.0 * (n_seqs * ctx * q) as f64;
        let what = format!("decode: {n_seqs} seqs x {ctx} ctx");
        bench.measure("attention", what, bytes, flops, &mut || {
            drop(b.attention(&qt, &batch, &cache, 0, shape));
        });
        // The kernel and reduction pass that the pipelined one replaced.
        let what = format!("decode (mma + reduce): {n_seqs} seqs x {ctx} ctx");
        bench.measure("attention", what, bytes, flops, &mut || {
            drop(b.attention_with(&qt, &batch, &cache, 0, shape, AttentionKernels::UnpipedDecode));
        });
    }
    // An experiment on the 8-sequence rows (69% of copy bandwidth at 00b0a12, where 64
    // sequences reach 97% and more splits did not help): the same bytes, grid and work
    // per block as 8 sequences x Qwen's 4 KV heads, from a cache of one KV head. A block
    // then reads whole 256-byte slot rows, back to back, instead of every fourth 256-byte
    // piece of 1 KiB rows. Much faster than "decode: 8 seqs" would say DRAM locality of
    // the cache layout caps those rows, not the kernel's pipeline.
    {
        let group = c.num_heads / c.num_kv_heads;
        let n_seqs = 8 * c.num_kv_heads;
        let one_head = AttentionShape { num_heads: group, num_kv_heads: 1, ..shape };
        let mut one_cache = b
            .alloc_kv_cache(KvCacheShape {
                num_layers: 1,
                num_blocks: n_seqs * per_seq,
                num_kv_heads: 1,
                head_dim: hd,
            })
            .context("allocating the one-KV-head cache")?;
        rand.fill_kv(&mut one_cache);
        let batch = decode_batch(n_seqs);
        let qt = rand.tensor(n_seqs, group * hd, 1.0);
        let ctx = args.context;
        let bytes = (n_seqs * ctx * 2 * hd + 2 * n_seqs * group * hd) as f64 * bf;
        let flops = 4.0 * (n_seqs * ctx * group * hd) as f64;
        let what = format!("decode: {n_seqs} seqs x {ctx} ctx");
        let op = format!("attention, 1 KV head of {group} query heads");
        bench.measure(&op, what, bytes, flops, &mut || {
            drop(b.attention(&qt, &batch, &one_cache, 0, one_head));
        });
    }
    {
        let len = args.prefill_len;
        let batch = prefill_batch(len);
        let qt = rand.tensor(len, q, 1.0);
        let bytes = (2 * len * q + 2 * len * kv) as f64 * bf;
        let flops = 4.0 * q as f64 * (len as f64 * (len as f64 + 1.0) / 2.0);
        let what = format!("prefill: {len} tokens, causal");
        bench.measure("attention", what, bytes, flops, &mut || {
            drop(b.attention(&qt, &batch, &cache, 0, shape));
        });
    }

    let report = &bench.report;
    let failed = report.ops.iter().filter(|o| o.error.is_some()).count();
    if failed > 0 {
        bail!("{failed} of {} ops failed (see FAILED above)", report.ops.len());
    }
    Ok(())
}

/// Distinct ids per row of the penalties benchmark: the distinct tokens of a few-thousand
/// token prompt plus its output.
const PENALTY_IDS: usize = 1536;

/// `rows` rows of repetition penalty 1.05 over PENALTY_IDS distinct ids each (a quarter of
/// them also in the output, counts 1-3), as `Sampler::penalty_row` builds them.
fn bench_penalties(rows: usize, vocab: usize, rng: &mut ChaCha8Rng) -> PenaltyBatch {
    let mut batch = PenaltyBatch::default();
    let stride = (vocab / PENALTY_IDS).max(1);
    for _ in 0..rows {
        let start = rng.random_range(0..stride);
        let entries = (0..PENALTY_IDS.min(vocab)).map(|i| PenaltyToken {
            id: ((start + i * stride) % vocab) as u32,
            count: if i % 4 == 0 { rng.random_range(1..4) } else { 0 },
        });
        batch.push_row(1.05, 0.0, 0.0, entries);
    }
    batch
}

/// `[n, vocab]` logits like a language model's: normal-ish (sigma 2) with eight tokens per
/// row at 12 to 20, which carry most of the probability at T 0.7.
fn peaked_logits(b: &CudaBackend, n: usize, vocab: usize, rng: &mut ChaCha8Rng) -> CudaTensor {
    let mut values: Vec<f32> = (0..n * vocab)
        .map(|_| (0..3).map(|_| rng.random_range(-1.0f32..1.0)).sum::<f32>() * 2.0)
        .collect();
    for row in values.chunks_mut(vocab) {
        for _ in 0..8 {
            row[rng.random_range(0..vocab)] = rng.random_range(12.0f32..20.0);
        }
    }
    b.tensor_from_host(&values, n, vocab)
}
