//! Parity of the paged-attention kernels (kernels/attention_decode.cu,
//! kernels/attention_prefill.cu, kernels/attention_simple.cu) with their CPU twin, `CpuBackend::attention`, through the
//! `Backend` trait: CudaBackend against CpuBackend on identical inputs (rounded to bf16
//! first), fresh random values and block tables each run (the seed is printed).
//!
//! Cases. Decode rows (one new token) at contexts 1, 15, 16, 17, 1000 and 32768, alone and
//! all in one batch; prefill chunks of 1, 7, 16, 33 and 512 tokens starting at position 0,
//! 37 (mid-block) and 1024 (chunked prefill after 64 full blocks); mixed batches of
//! several prefill chunks and decode rows, one with an empty sequence and one whose
//! sequences share their first physical blocks (a prefix-cache hit). Geometries: Qwen2.5-7B
//! (28 / 4 heads, head_dim 128), SmolLM2 (9 / 3, 64), and for the kernels' corner cases
//! a group of 16 (two decode chunks), head_dim 96 (no tensor-core kernel: the FMA
//! fallback; decode lanes with nothing to do), head_dim 256 and plain multi-head (group 1).
//! Queries come in two scales: mild (softmax spread over many keys) and peaky (scores in
//! the tens, the softmax dominated by a few keys, so a key read from the wrong slot,
//! dropped, or a split merged wrongly moves the output far beyond the tolerance).
//!
//! Every case runs under each launcher path (the bisecting switches of
//! src/backend/cuda/attention.rs, set on the device with `Device::set_attention_switches`;
//! each switch's environment variable is named below): default (the pipelined tensor-core
//! decode kernel, which merges its splits in the same launch, for one-token sequences
//! where head_dim is 64 or 128, tensor-core prefill for the rest: the v2 kernel at
//! head_dim 128), the decode kernel forced to 16-key splits (every context above 16 goes
//! through the counters and the last-block merge, and each case finds the counters as the
//! launches before it left them), both again with the tensor-core decode kernel and its
//! separate reduction pass (QILIN_ATTN_DECODE_PIPE=0) and with the FMA decode kernels,
//! the prefill kernel on every row, and the plain-FMA kernel on every row. A failure names
//! the path, so it tells which kernel
//! is wrong; rerun one path alone with QILIN_ATTN_TEST_PATH=<name>. Under racecheck,
//! tools/gpu-check cuts every context to QILIN_ATTN_TEST_MAX_CONTEXT positions (`capped`)
//! and the suite runs the mild queries only (`rounds`).
//!
//! Inputs and poison. Block tables are scattered over a shuffled pool of physical blocks.
//! The device cache holds the test's K/V in the slots of positions < context of some
//! sequence and NaN everywhere else (spare blocks, the tail of each last block, and all of
//! the other layer), so a read of a slot the semantics do not visit, or of the wrong
//! layer, turns the output into NaN. The output buffer starts as NaN (the launcher fills
//! it), so an element no kernel writes fails too.
//!
//! Tolerance, per output element o (row, head, dim), with bf16 inputs and f32 arithmetic on
//! both sides; a = sum_j p_j |v_j| (the same attention with |V|, computed by the twin):
//!   - the output is rounded to bf16: <= 2^-8 |o|;
//!   - the tensor-core kernel rounds the probabilities to bf16 before P.V (FlashAttention
//!     does the same), each p_j by <= 2^-8 p_j, while the normaliser sums the unrounded
//!     ones: <= 2^-8 a;
//!   - scores differ by the order and rounding of the q.k sums (the tensor cores' f32
//!     accumulation is not IEEE round-to-nearest): |ds| <= D * 2^-23 * scale * sum|q| *
//!     max|k| on each side, and a score error ds moves the output by <= 2 |ds| a;
//!   - exp2f/expf, the rescaling of partial sums and the final divisions add a few f32 ulps.
//!
//! So tol = 2 * (2^-8 |o| + 2^-8 a + 4 ds a) + 1e-6, a factor 2 of margin over the sum of
//! the bounds. The test prints the worst error as a fraction of tol per case: a healthy
//! kernel stays well under 1 and a wrong one (a missed key, a mis-scaled split) lands far
//! above it, since with the peaky queries a single key moves the output by O(|v|).
//!
//! Runs only with `QILIN_GPU_TESTS=1`; then a missing driver, GPU or PTX is a failure.

#[path = "common/gpu.rs"]
mod gpu_common;
use gpu_common::{env_cap, rounds, skip_without_gpu_tests};

use std::sync::{Mutex, OnceLock};
use std::time::{SystemTime, UNIX_EPOCH};

use half::bf16;
use qilin::backend::batch::slot_of;
use qilin::backend::cpu::{CpuBackend, CpuKvCache, CpuTensor};
use qilin::backend::cuda::{AttentionSwitches, CudaBackend, CudaKvCache};
use qilin::backend::{AttentionShape, Backend, Batch, KvCacheShape, BLOCK_SIZE};
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

const NUM_LAYERS: usize = 2;
/// The layer attention reads; the other one is all NaN on the device.
const LAYER: usize = 1;
/// Physical blocks in the pool beyond those the batch needs (left NaN, never read).
const SPARE_BLOCKS: usize = 7;

/// One launcher path: the switches it sets on the device (see the module docs).
struct Path {
    name: &'static str,
    switches: AttentionSwitches,
}

/// A path named `name` that sets `switches`.
const fn path(name: &'static str, switches: AttentionSwitches) -> Path {
    Path { name, switches }
}

const DISPATCH: AttentionSwitches = AttentionSwitches::DISPATCH;

const PATHS: &[Path] = &[
    path("default", DISPATCH),
    path("decode-split-16", AttentionSwitches { split_tokens: Some(16), ..DISPATCH }),
    path("decode-fma", AttentionSwitches { decode_fma: true, ..DISPATCH }),
    path(
        "decode-fma-split-16",
        AttentionSwitches { decode_fma: true, split_tokens: Some(16), ..DISPATCH },
    ),
    path("decode-mma", AttentionSwitches { decode_pipe: false, ..DISPATCH }),
    path(
        "decode-mma-split-16",
        AttentionSwitches { split_tokens: Some(16), decode_pipe: false, ..DISPATCH },
    ),
    path("prefill-kernel-only", AttentionSwitches { no_decode: true, ..DISPATCH }),
    path("simple-fma", AttentionSwitches { simple: true, ..DISPATCH }),
];

#[derive(Clone, Copy)]
struct Geometry {
    name: &'static str,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
}

const QWEN_7B: Geometry = Geometry { name: "Qwen2.5-7B", heads: 28, kv_heads: 4, head_dim: 128 };
const SMOLLM2: Geometry = Geometry { name: "SmolLM2", heads: 9, kv_heads: 3, head_dim: 64 };

impl Geometry {
    fn shape(&self) -> AttentionShape {
        AttentionShape {
            num_heads: self.heads,
            num_kv_heads: self.kv_heads,
            head_dim: self.head_dim,
            scale: 1.0 / (self.head_dim as f32).sqrt(),
        }
    }
}

/// (largest |q| element, name): mild and peaky queries (module docs).
const Q_SCALES: &[(f32, &str)] = &[(1.0, "mild q"), (12.0, "peaky q")];

/// The switches belong to the one device the tests share: the tests of this file take
/// turns.
static SERIAL: Mutex<()> = Mutex::new(());

fn gpu() -> &'static CudaBackend {
    static GPU: OnceLock<CudaBackend> = OnceLock::new();
    GPU.get_or_init(|| {
        CudaBackend::new(0).unwrap_or_else(|e| panic!("QILIN_GPU_TESTS=1 but no usable GPU: {e}"))
    })
}

fn set_path(path: &Path) {
    gpu().dev.set_attention_switches(path.switches);
}

/// The paths to run: all, or the one QILIN_ATTN_TEST_PATH names.
fn paths() -> Vec<&'static Path> {
    match std::env::var("QILIN_ATTN_TEST_PATH") {
        Ok(name) => {
            let path = PATHS.iter().find(|p| p.name == name);
            vec![path.unwrap_or_else(|| panic!("QILIN_ATTN_TEST_PATH={name} is not a path"))]
        }
        Err(_) => PATHS.iter().collect(),
    }
}

fn seeded_rng() -> ChaCha8Rng {
    let seed =
        std::env::var("QILIN_TEST_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(|| {
            SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64)
        });
    eprintln!("seed {seed} (rerun with QILIN_TEST_SEED={seed})");
    ChaCha8Rng::seed_from_u64(seed)
}

fn random_bf16(rng: &mut ChaCha8Rng, n: usize, max: f32) -> Vec<f32> {
    (0..n).map(|_| bf16::from_f32(rng.random_range(-max..max)).to_f32()).collect()
}

/// Sequences as (first position, new tokens). `shared_prefix`: every sequence after the
/// first reuses the first sequence's leading blocks, as many as lie wholly before both
/// sequences' first new positions (what a prefix-cache hit looks like).
fn build_batch(
    rng: &mut ChaCha8Rng,
    seqs: &[(usize, usize)],
    shared_prefix: bool,
) -> (Batch, usize) {
    let needed: usize = seqs.iter().map(|&(first, len)| (first + len).div_ceil(BLOCK_SIZE)).sum();
    let num_blocks = needed + SPARE_BLOCKS;
    let mut pool: Vec<u32> = (0..num_blocks as u32).collect();
    pool.shuffle(rng);
    let mut fresh = pool.into_iter();
    let mut batch = Batch::default();
    let mut first_table: Vec<u32> = Vec::new();
    for (i, &(first_pos, len)) in seqs.iter().enumerate() {
        let context = first_pos + len;
        let shared = if shared_prefix && i > 0 {
            (first_pos / BLOCK_SIZE).min(first_table.len()).min(seqs[0].0 / BLOCK_SIZE)
        } else {
            0
        };
        let table: Vec<u32> = (0..context.div_ceil(BLOCK_SIZE))
            .map(|b| if b < shared { first_table[b] } else { fresh.next().expect("pool") })
            .collect();
        if i == 0 {
            first_table = table.clone();
        }
        let tokens: Vec<u32> = (0..len).map(|_| rng.random_range(0..1000)).collect();
        batch.push_seq(&tokens, first_pos, &table, true);
    }
    (batch, num_blocks)
}

/// The same K/V on both sides, plus the twin's cache with |V| (for the tolerance).
struct Caches {
    cpu: CpuKvCache,
    cpu_abs_v: CpuKvCache,
    gpu: CudaKvCache,
    max_abs_k: f32,
}

fn fill_caches(
    gpu: &CudaBackend,
    rng: &mut ChaCha8Rng,
    shape: AttentionShape,
    batch: &Batch,
    num_blocks: usize,
) -> Caches {
    let kv_cols = shape.num_kv_heads * shape.head_dim;
    let cache_shape = KvCacheShape {
        num_layers: NUM_LAYERS,
        num_blocks,
        num_kv_heads: shape.num_kv_heads,
        head_dim: shape.head_dim,
    };
    let n_slots = num_blocks * BLOCK_SIZE;
    let mut used = vec![false; n_slots];
    for seq in &batch.seqs {
        for pos in 0..seq.context_len {
            used[slot_of(&seq.block_table, pos)] = true;
        }
    }
    let slots: Vec<u32> = (0..n_slots as u32).filter(|&s| used[s as usize]).collect();
    let k = random_bf16(rng, slots.len() * kv_cols, 1.0);
    let v = random_bf16(rng, slots.len() * kv_cols, 1.0);
    let abs_v: Vec<f32> = v.iter().map(|x| x.abs()).collect();
    let max_abs_k = k.iter().fold(0.0f32, |m, x| m.max(x.abs()));

    let cpu = CpuBackend::new();
    let mut cpu_cache = cpu.alloc_kv_cache(cache_shape).expect("CPU cache");
    let mut cpu_abs_v = cpu.alloc_kv_cache(cache_shape).expect("CPU cache");
    let k_rows = CpuTensor::from_vec(k, slots.len(), kv_cols);
    let v_rows = CpuTensor::from_vec(v, slots.len(), kv_cols);
    cpu_cache.store(LAYER, &slots, &k_rows, &v_rows);
    cpu_abs_v.store(LAYER, &slots, &k_rows, &CpuTensor::from_vec(abs_v, slots.len(), kv_cols));

    let mut gpu_cache = gpu.alloc_kv_cache(cache_shape).expect("device cache");
    let nan = vec![bf16::NAN; n_slots * kv_cols];
    for layer in 0..NUM_LAYERS {
        let (keys, values) = if layer == LAYER {
            let mut keys = nan.clone();
            let mut values = nan.clone();
            for (i, &slot) in slots.iter().enumerate() {
                let dst = slot as usize * kv_cols..(slot as usize + 1) * kv_cols;
                for (d, &x) in keys[dst.clone()].iter_mut().zip(k_rows.row(i)) {
                    *d = bf16::from_f32(x);
                }
                for (d, &x) in values[dst].iter_mut().zip(v_rows.row(i)) {
                    *d = bf16::from_f32(x);
                }
            }
            (keys, values)
        } else {
            (nan.clone(), nan.clone())
        };
        gpu.dev.stream.memcpy_htod(&keys[..], &mut gpu_cache.keys[layer]).expect("upload K");
        gpu.dev.stream.memcpy_htod(&values[..], &mut gpu_cache.values[layer]).expect("upload V");
    }
    Caches { cpu: cpu_cache, cpu_abs_v, gpu: gpu_cache, max_abs_k }
}

/// Runs one batch on every path and compares; panics on a mismatch with everything
/// needed to find it.
/// `seqs` with every sequence's context cut to QILIN_ATTN_TEST_MAX_CONTEXT positions when
/// that is set: tools/gpu-check sets it under compute-sanitizer racecheck, which tracks
/// every shared-memory access and would take hours over the 32K contexts. Cut contexts
/// still span many blocks and many 16-key splits, so every kernel and path still runs.
fn capped(seqs: &[(usize, usize)]) -> Vec<(usize, usize)> {
    match env_cap("QILIN_ATTN_TEST_MAX_CONTEXT") {
        Some(cap) => {
            let cut = |(first, len): (usize, usize)| {
                let len = len.min(cap);
                (first.min(cap - len), len)
            };
            seqs.iter().map(|&s| cut(s)).collect()
        }
        None => seqs.to_vec(),
    }
}

fn check_batch(
    rng: &mut ChaCha8Rng,
    geometry: Geometry,
    label: &str,
    seqs: &[(usize, usize)],
    shared_prefix: bool,
) {
    let gpu = gpu();
    let shape = geometry.shape();
    let seqs = &capped(seqs);
    let (batch, num_blocks) = build_batch(rng, seqs, shared_prefix);
    let caches = fill_caches(gpu, rng, shape, &batch, num_blocks);
    let n = batch.n_tokens();
    let hd = shape.head_dim;
    let cols = shape.num_heads * hd;
    let cpu = CpuBackend::new();
    // Under racecheck one scale: the shared-memory pattern does not depend on the values.
    for &(q_max, q_name) in Q_SCALES.iter().take(rounds(Q_SCALES.len())) {
        let q = random_bf16(rng, n * cols, q_max);
        let q_cpu = CpuTensor::from_vec(q.clone(), n, cols);
        let expected = cpu.attention(&q_cpu, &batch, &caches.cpu, LAYER, shape);
        let abs_ref = cpu.attention(&q_cpu, &batch, &caches.cpu_abs_v, LAYER, shape);
        let q_gpu = gpu.tensor_from_host(&q, n, cols);
        for path in paths() {
            set_path(path);
            let out = gpu.attention(&q_gpu, &batch, &caches.gpu, LAYER, shape);
            let got = gpu.to_host(&out);
            let case = format!(
                "{} ({}/{} heads, head_dim {hd}), {label}, {q_name}, path {}",
                geometry.name, shape.num_heads, shape.num_kv_heads, path.name
            );
            let worst =
                compare(&case, &batch, shape, &q, caches.max_abs_k, &got, &expected, &abs_ref);
            eprintln!("{case}: worst |err| / tol = {worst:.3}");
        }
        set_path(&PATHS[0]);
    }
}

/// Element-wise check against the tolerance of the module docs; returns the worst
/// error / tolerance ratio.
#[allow(clippy::too_many_arguments)]
fn compare(
    case: &str,
    batch: &Batch,
    shape: AttentionShape,
    q: &[f32],
    max_abs_k: f32,
    got: &[f32],
    expected: &CpuTensor,
    abs_ref: &CpuTensor,
) -> f32 {
    let hd = shape.head_dim;
    let cols = shape.num_heads * hd;
    assert_eq!(got.len(), batch.n_tokens() * cols, "{case}: output size");
    let u = 2f32.powi(-8);
    let mut worst = 0.0f32;
    let mut bad: Vec<String> = Vec::new();
    let mut n_bad = 0usize;
    for (s, seq) in batch.seqs.iter().enumerate() {
        for r in 0..seq.len {
            let t = seq.start + r;
            let pos = seq.context_len - seq.len + r;
            for h in 0..shape.num_heads {
                let q_head = &q[t * cols + h * hd..][..hd];
                let sum_abs_q: f32 = q_head.iter().map(|x| x.abs()).sum();
                let ds = hd as f32 * 2f32.powi(-23) * shape.scale * sum_abs_q * max_abs_k;
                for d in 0..hd {
                    let i = t * cols + h * hd + d;
                    let (g, c, a) = (got[i], expected.data[i], abs_ref.data[i]);
                    let tol = 2.0 * (u * c.abs() + u * a + 4.0 * ds * a) + 1e-6;
                    let err = (g - c).abs();
                    if err <= tol {
                        worst = worst.max(err / tol);
                        continue;
                    }
                    n_bad += 1;
                    if bad.len() < 8 {
                        bad.push(format!(
                            "row {t} (seq {s}, position {pos} of context {}, {} new tokens) \
                             head {h} (kv head {}) dim {d}: GPU {g}, CPU {c}, |diff| {err:.3e} \
                             > tol {tol:.3e} (sum p|v| {a:.3e})",
                            seq.context_len,
                            seq.len,
                            h / (shape.num_heads / shape.num_kv_heads)
                        ));
                    }
                }
            }
        }
    }
    assert!(
        n_bad == 0,
        "{case}: {n_bad} of {} outputs out of tolerance (NaN: never written, or a poisoned \
         slot/layer was read). First ones:\n  {}",
        got.len(),
        bad.join("\n  ")
    );
    worst
}

fn geometry_label(seqs: &[(usize, usize)]) -> String {
    let parts: Vec<String> = seqs.iter().map(|&(first, len)| format!("{len}@{first}")).collect();
    format!("seqs [{}] (new tokens@first position)", parts.join(", "))
}

#[test]
fn decode_rows_match_the_cpu_twin() {
    if skip_without_gpu_tests() {
        return;
    }
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let mut rng = seeded_rng();
    const CONTEXTS: &[usize] = &[1, 15, 16, 17, 1000, 32768];
    for geometry in [QWEN_7B, SMOLLM2] {
        for &ctx in CONTEXTS {
            let seqs = [(ctx - 1, 1)];
            check_batch(&mut rng, geometry, &format!("decode, context {ctx}"), &seqs, false);
        }
        let all: Vec<(usize, usize)> = CONTEXTS.iter().map(|&ctx| (ctx - 1, 1)).collect();
        check_batch(
            &mut rng,
            geometry,
            &format!("decode batch {}", geometry_label(&all)),
            &all,
            false,
        );
    }
}

#[test]
fn prefill_chunks_match_the_cpu_twin() {
    if skip_without_gpu_tests() {
        return;
    }
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let mut rng = seeded_rng();
    for geometry in [QWEN_7B, SMOLLM2] {
        for first_pos in [0, 37, 1024] {
            for len in [1, 7, 16, 33, 512] {
                let seqs = [(first_pos, len)];
                let label = format!("prefill chunk of {len} from position {first_pos}");
                check_batch(&mut rng, geometry, &label, &seqs, false);
            }
        }
    }
}

#[test]
fn mixed_batches_match_the_cpu_twin() {
    if skip_without_gpu_tests() {
        return;
    }
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let mut rng = seeded_rng();
    let mixed: &[(usize, usize)] =
        &[(0, 33), (998, 1), (100, 64), (4999, 1), (0, 1), (17, 7), (2000, 130), (15, 1), (31, 2)];
    let with_empty: &[(usize, usize)] = &[(5, 3), (300, 0), (63, 1), (0, 65)];
    let shared: &[(usize, usize)] = &[(200, 1), (160, 40), (250, 1), (64, 17)];
    for geometry in [QWEN_7B, SMOLLM2] {
        for (name, seqs, shared_prefix) in [
            ("mixed prefill + decode", mixed, false),
            ("with an empty sequence", with_empty, false),
            ("shared prefix blocks", shared, true),
        ] {
            let label = format!("{name}, {}", geometry_label(seqs));
            check_batch(&mut rng, geometry, &label, seqs, shared_prefix);
        }
    }
}

#[test]
fn other_head_shapes_match_the_cpu_twin() {
    if skip_without_gpu_tests() {
        return;
    }
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let mut rng = seeded_rng();
    let geometries = [
        Geometry { name: "group of 16", heads: 16, kv_heads: 1, head_dim: 64 },
        Geometry { name: "head_dim 96", heads: 12, kv_heads: 2, head_dim: 96 },
        Geometry { name: "head_dim 256", heads: 4, kv_heads: 1, head_dim: 256 },
        Geometry { name: "multi-head", heads: 8, kv_heads: 8, head_dim: 128 },
        Geometry { name: "Qwen2.5-0.5B heads", heads: 14, kv_heads: 2, head_dim: 64 },
    ];
    let seqs: &[(usize, usize)] = &[(0, 70), (700, 1), (33, 1), (129, 20), (4000, 1)];
    for geometry in geometries {
        let label = format!("mixed, {}", geometry_label(seqs));
        check_batch(&mut rng, geometry, &label, seqs, false);
    }
}
