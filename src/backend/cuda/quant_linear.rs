//! Launchers of kernels/quant_linear.cu: the W4A16/W8A16 GEMV of decode-sized batches and
//! the dequantization of weight rows to bf16 for the cuBLAS path (linear.rs dispatches;
//! the CPU twin of both is `CpuLinear::forward` on the original weight); and of
//! kernels/quant_gemv_mma.cu's tensor-core W4A16 GEMVs (`ptx::QGEMV_MMA_W4_BF16` and, opt-in,
//! its split-K variant `ptx::QGEMV_MMA_SPLITK_W4_BF16`).

use cudarc::driver::{CudaSlice, DevicePtr, LaunchConfig};
use half::bf16;

use super::attention::sm_count;
use super::device::{check, Device};
use super::tensor::{CudaLinear, CudaTensor, LinearWeight, QuantWeight};
use super::CudaBackend;
use crate::backend::abi::{
    dequant_blocks, qgemm_geometry, qgemv_geometry, qgemv_mma_geometry, qgemv_mma_ok,
    qgemv_splitk_geometry, quant_layout_ok, QilinDequantParams, QilinQuantGemvParams,
    GEMV_MAX_TOKENS, QILIN_ATTN_DECODE_PIPE_MAX_COUNTERS, QILIN_DEQUANT_THREADS,
    QILIN_QGEMM_PARTIALS, QILIN_QGEMV_MMA_MAX_TOKENS, QILIN_QGEMV_SMALL_MAX_TOKENS,
    QILIN_QGEMV_SPLITK_PARTIALS, QILIN_QGEMV_VALUES_PER_LANE,
};
use crate::backend::ptx;

/// About the largest bf16 scratch (values) the cuBLAS path of a quantized layer
/// dequantizes into: 128 MiB (plus under 128 rows of rounding, see `dequant_chunk_rows`).
const DEQUANT_SCRATCH_MAX_VALUES: usize = 64 << 20;

/// Chunks' rows are a multiple of this: each chunk's GEMM writes output columns from
/// row0 on, and an unaligned column offset (12629 rows of gate_up before) leaves cuBLAS
/// only its unvectorized kernels (H200, 2026-11-26: int4 gate_up at 2048 tokens took
/// 2232 us against bf16's 685).
const DEQUANT_CHUNK_ALIGN: usize = 128;

/// Output rows dequantized per chunk for a `[m, k]` weight: as few chunks as the scratch
/// bound allows, balanced, each a multiple of DEQUANT_CHUNK_ALIGN rows (but the last).
/// Qwen2.5-7B's gate_up (37888 x 3584) runs as 12672 + 12672 + 12544 rows.
pub fn dequant_chunk_rows(k: usize, m: usize) -> usize {
    let m = m.max(1);
    let most = (DEQUANT_SCRATCH_MAX_VALUES / k.max(1)).max(1);
    let chunks = m.div_ceil(most);
    m.div_ceil(chunks).next_multiple_of(DEQUANT_CHUNK_ALIGN).min(m)
}

/// Grows the device's bf16 scratch to what a `[m, k]` quantized layer's cuBLAS path needs,
/// at upload time: the KV pool is sized from the memory left afterwards.
pub fn reserve_dequant_scratch(dev: &Device, k: usize, m: usize) {
    drop(dev.scratch_bf16(dequant_chunk_rows(k, m) * k));
}

#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum Op {
    Gemv,
    /// The GEMV compiled for up to QILIN_QGEMV_SMALL_MAX_TOKENS rows.
    GemvSmall,
    /// The tensor-core GEMV (4-bit levels, groups a multiple of 128, 1..=8 rows).
    GemvMma,
    Gemm,
    /// The 4-bit GEMM on the tensor-core GEMV's path (quant_gemm_mma.rs).
    GemmMma,
    Dequant,
}

fn kernel_for(bits: u32, op: Op) -> ptx::Kernel {
    match (bits, op) {
        (4, Op::Gemv) => ptx::QGEMV_W4_BF16,
        (8, Op::Gemv) => ptx::QGEMV_W8_BF16,
        (4, Op::GemvSmall) => ptx::QGEMV_SMALL_W4_BF16,
        (8, Op::GemvSmall) => ptx::QGEMV_SMALL_W8_BF16,
        (4, Op::GemvMma) => ptx::QGEMV_MMA_W4_BF16,
        (4, Op::Gemm) => ptx::QGEMM_W4_BF16,
        (8, Op::Gemm) => ptx::QGEMM_W8_BF16,
        (4, Op::GemmMma) => ptx::QGEMM_MMA_W4_BF16,
        (4, Op::Dequant) => ptx::DEQUANT_W4_BF16,
        (8, Op::Dequant) => ptx::DEQUANT_W8_BF16,
        _ => panic!("no quantized-linear kernel for {bits}-bit levels"),
    }
}

/// The GEMV's and GEMM's parameters; their geometry functions checked that every
/// dimension fits u32.
pub(super) fn matmul_params(n: usize, k: usize, m: usize, group: usize) -> QilinQuantGemvParams {
    QilinQuantGemvParams {
        n_tokens: n as u32,
        in_features: k as u32,
        out_features: m as u32,
        group_size: group as u32,
    }
}

/// Launches the GEMV or the GEMM, whose arguments are the same.
#[allow(clippy::too_many_arguments)]
pub(super) fn launch_matmul(
    dev: &Device,
    op: Op,
    cfg: LaunchConfig,
    params: QilinQuantGemvParams,
    x: &CudaTensor,
    w: &CudaLinear,
    q: &QuantWeight,
    out: &mut CudaTensor,
) {
    let kernel = kernel_for(q.format.bits, op);
    let null: u64 = 0;
    let mut launch = dev.launch_builder(kernel);
    launch.arg(&params).arg(&mut out.data).arg(&x.data).arg(&q.levels).arg(&q.scale_min);
    match &w.bias {
        Some(bias) => launch.arg(bias),
        None => launch.arg(&null),
    };
    // SAFETY: argument order and types follow qilin_qgemv/qgemm_w{4,8}_bf16,
    // qilin_qgemv_mma_w4_bf16 and qilin_qgemm_mma_w4_bf16, which share them (scale_min's
    // f32 pairs are their float2). linear.rs's check_shapes showed out holds n * m values,
    // x n * k, levels m * k * bits / 8 bytes, scale_min m * k / group pairs, bias (or
    // null) m; out is a separate allocation (&mut). Whole cudarc allocations are >= 256-
    // byte aligned and k % 32 == 0, so every row of x and of the levels starts 16-byte
    // aligned.
    check(unsafe { launch.launch(cfg) }, kernel.entry);
}

/// The GEMV, `out [n, m] = x [n, k] W^T + b`: qilin_qgemv_mma_w4_bf16 where it takes
/// the layer (`qgemv_mma_ok`: 4-bit, groups a power of two >= 128; unless
/// QILIN_CUDA_QGEMV_MMA=0), or its split-K variant there with QILIN_CUDA_QGEMV_MMA2=1, and
/// from 9 to QGEMV_MMA_CHUNKED_MAX_TOKENS tokens in chunks of 8 (`qgemv_mma_takes`);
/// else qilin_qgemv_small_w{4,8}_bf16 up to QILIN_QGEMV_SMALL_MAX_TOKENS rows (unless
/// QILIN_CUDA_QGEMV_SMALL=0); else qilin_qgemv_w{4,8}_bf16. Panics when the kernel cannot
/// take the shape (n outside 1..=GEMV_MAX_TOKENS for the FMA GEMVs, k not a multiple of 32
/// and the group). linear.rs's `check_shapes` has checked every buffer against the shapes.
pub fn qgemv_into(
    dev: &Device,
    x: &CudaTensor,
    w: &CudaLinear,
    q: &QuantWeight,
    out: &mut CudaTensor,
) {
    if qgemv_mma_takes(dev, x.rows, w) {
        if dev.paths.qgemv_mma2 && x.rows <= GEMV_MAX_TOKENS {
            return qgemv_splitk(dev, x, w, q, out);
        }
        return qgemv_with(dev, Op::GemvMma, x, w, q, out);
    }
    let small = dev.paths.qgemv_small && x.rows <= QILIN_QGEMV_SMALL_MAX_TOKENS as usize;
    qgemv_with(dev, if small { Op::GemvSmall } else { Op::Gemv }, x, w, q, out);
}

/// Most tokens the dispatch sends through qilin_qgemv_mma_w4_bf16 in chunks of
/// GEMV_MAX_TOKENS (unless QILIN_CUDA_QGEMV_MMA_WIDE=0) instead of dequantization + cuBLAS.
/// The kernel takes up to QILIN_QGEMV_MMA_MAX_TOKENS, but every chunk repeats its
/// instructions: on an H200 (b908988) the chunks won every Qwen2.5-7B layer at 16 and 32
/// tokens (gate_up 79 and 153 us against 276) and lost three of four at 64 (gate_up 299
/// against 277), so the line sits at the last measured win.
pub const QGEMV_MMA_CHUNKED_MAX_TOKENS: usize = 32;

/// Whether the dispatch sends `n` tokens through `w` by the tensor-core GEMV: a layer it
/// takes (`qgemv_mma_ok`) at up to GEMV_MAX_TOKENS tokens, or up to
/// QGEMV_MMA_CHUNKED_MAX_TOKENS in chunks of 8 unless QILIN_CUDA_QGEMV_MMA_WIDE=0, except
/// where the tensor-core GEMM beats four chunks (`qgemm_beats_chunks`, unless
/// QILIN_CUDA_QGEMM=0).
pub fn qgemv_mma_takes(dev: &Device, n: usize, w: &CudaLinear) -> bool {
    let LinearWeight::Quant(q) = &w.weight else { return false };
    let chunked = dev.paths.qgemv_mma_wide;
    let most = if chunked { QGEMV_MMA_CHUNKED_MAX_TOKENS } else { GEMV_MAX_TOKENS };
    dev.paths.qgemv_mma
        && n <= most
        && qgemv_mma_ok(n, q.format.bits, w.in_features, q.format.group)
        && !(dev.paths.qgemm && qgemm_beats_chunks(n, w.in_features * w.out_features))
}

/// Whether the tensor-core GEMM (one pass over the weights for up to 64 tokens) beats the
/// GEMV's chunks of 8 tokens (a pass each) on a layer of `weights` weights at `n` tokens:
/// on four chunks, 25-32 tokens, from QGEMM_OVER_CHUNKS_MIN_WEIGHTS. H200 at 00b0a12, int4
/// us at 32 tokens (chunks / GEMM): gate_up (135.8M weights) 153.9 / 127.6, down (67.9M)
/// 72.5 / 80.5; at 16 the chunks won both (79.1 / 126.4, 39.6 / 79.3). The chunks cost
/// ~1.13 us per million weights at four, the GEMM ~34 + 0.72, so the line is ~83M weights;
/// three chunks (17-24 tokens, ~116 us for gate_up by the 16 and 32 rows) still win.
fn qgemm_beats_chunks(n: usize, weights: usize) -> bool {
    n > 3 * GEMV_MAX_TOKENS && weights >= QGEMM_OVER_CHUNKS_MIN_WEIGHTS
}

/// The fewest weights `qgemm_beats_chunks` takes from the chunked GEMV: between Qwen2.5-7B's
/// down (67.9M, the chunks won) and gate_up (135.8M, the GEMM won); Llama-3-8B's gate_up
/// (117.4M) falls with the latter.
const QGEMM_OVER_CHUNKS_MIN_WEIGHTS: usize = 96 << 20;

/// qilin_qgemv_small_w{4,8}_bf16 whatever the dispatch would pick (n <= 2): for its parity
/// test and benchmark.
pub fn qgemv_small_into(
    dev: &Device,
    x: &CudaTensor,
    w: &CudaLinear,
    q: &QuantWeight,
    out: &mut CudaTensor,
) {
    assert!(
        x.rows <= QILIN_QGEMV_SMALL_MAX_TOKENS as usize,
        "qilin_qgemv_small_*: {} rows, at most {QILIN_QGEMV_SMALL_MAX_TOKENS}",
        x.rows
    );
    qgemv_with(dev, Op::GemvSmall, x, w, q, out);
}

fn qgemv_with(
    dev: &Device,
    op: Op,
    x: &CudaTensor,
    w: &CudaLinear,
    q: &QuantWeight,
    out: &mut CudaTensor,
) {
    let (n, k, m) = (x.rows, w.in_features, w.out_features);
    let (bits, group) = (q.format.bits, q.format.group);
    // qilin_qgemv_mma_w4_bf16: one 256-thread block per 16 output channels; the FMA GEMVs:
    // one block per QILIN_QGEMV_ROWS_PER_BLOCK.
    let geometry = if op == Op::GemvMma { qgemv_mma_geometry } else { qgemv_geometry };
    let (grid, threads) = geometry(n, bits, k, m, group).unwrap_or_else(|| {
        let needs = if op == Op::GemvMma {
            format!(
                "4-bit levels, 1 <= n <= {QILIN_QGEMV_MMA_MAX_TOKENS} and a power-of-two group \
                 that is a multiple of 128 and divides in"
            )
        } else {
            format!(
                "1 <= n <= {GEMV_MAX_TOKENS}, in a multiple of {QILIN_QGEMV_VALUES_PER_LANE} \
                 and of the group"
            )
        };
        panic!(
            "{} cannot take x [{n}, {k}] W [{m}, {k}]^T at {bits} bits, group {group}: it \
             needs {needs}",
            kernel_for(bits, op).entry
        )
    });
    let params = matmul_params(n, k, m, group);
    let cfg =
        LaunchConfig { grid_dim: (grid, 1, 1), block_dim: (threads, 1, 1), shared_mem_bytes: 0 };
    launch_matmul(dev, op, cfg, params, x, w, q, out);
}

/// qilin_qgemv_mma_splitk_w4_bf16 for a layer `qgemv_mma_ok` accepts (panics otherwise):
/// grid (row tiles, splits) from `qgemv_splitk_geometry`, merged as `launch_split_k` says.
fn qgemv_splitk(
    dev: &Device,
    x: &CudaTensor,
    w: &CudaLinear,
    q: &QuantWeight,
    out: &mut CudaTensor,
) {
    let (n, k, m) = (x.rows, w.in_features, w.out_features);
    let (bits, group) = (q.format.bits, q.format.group);
    let kernel = ptx::QGEMV_MMA_SPLITK_W4_BF16;
    let max_counters = QILIN_ATTN_DECODE_PIPE_MAX_COUNTERS as usize;
    let ((tiles, splits), threads) =
        qgemv_splitk_geometry(n, bits, k, m, group, sm_count(dev), max_counters).unwrap_or_else(
            || {
                panic!(
                    "{} cannot take x [{n}, {k}] W [{m}, {k}]^T at {bits} bits, group {group}",
                    kernel.entry
                )
            },
        );
    let cfg = LaunchConfig {
        grid_dim: (tiles, splits, 1),
        block_dim: (threads, 1, 1),
        shared_mem_bytes: 0,
    };
    let partials = (splits > 1)
        .then(|| tiles as usize * splits as usize * QILIN_QGEMV_SPLITK_PARTIALS as usize);
    launch_split_k(dev, kernel, cfg, matmul_params(n, k, m, group), x, w, q, out, partials);
}

/// Launches a split-K matmul kernel (qilin_qgemv_mma_splitk_w4_bf16, qilin_qgemm_w{4,8}_bf16):
/// launch_matmul's six arguments, then the merge's f32 partial sums and u32 counters.
/// `partials`: how many f32 the kernel's blocks write when the launch splits K (None for
/// one split, and then both pointers are null). The sums go to the device's f32 scratch
/// (written and read within the launch, so its earlier contents do not matter) and the
/// merge counts arrivals in the device's split-merge counters, the ones the pipelined
/// decode-attention kernel uses: zero between launches (the merging block resets its own),
/// so sharing them is safe on the one stream that orders every kernel, and a captured
/// graph replays without a memset.
#[allow(clippy::too_many_arguments)]
fn launch_split_k(
    dev: &Device,
    kernel: ptx::Kernel,
    cfg: LaunchConfig,
    params: QilinQuantGemvParams,
    x: &CudaTensor,
    w: &CudaLinear,
    q: &QuantWeight,
    out: &mut CudaTensor,
    partials: Option<usize>,
) {
    let null: u64 = 0;
    let mut merge = partials.map(|sums| (dev.scratch_f32(sums), dev.merge_counters()));
    let mut launch = dev.launch_builder(kernel);
    launch.arg(&params).arg(&mut out.data).arg(&x.data).arg(&q.levels).arg(&q.scale_min);
    match &w.bias {
        Some(bias) => launch.arg(bias),
        None => launch.arg(&null),
    };
    match &mut merge {
        Some((sums, counters)) => launch.arg(&mut **sums).arg(&**counters),
        None => launch.arg(&null).arg(&null),
    };
    // SAFETY: argument order and types follow both kernels: the first six as
    // launch_matmul's (same buffers, checked by linear.rs's check_shapes); then, when the
    // grid splits K, the f32 scratch of the `partials` values the callers computed from
    // their grids and the counters (one per tile, tiles <= QILIN_ATTN_DECODE_PIPE_MAX_COUNTERS
    // by both geometries, all zero between launches), both held locked until the launch is
    // queued; null otherwise (the kernels touch them only when the grid splits K). The
    // geometries keep the split count within the steps of k, as the kernels check.
    check(unsafe { launch.launch(cfg) }, kernel.entry);
    drop(merge);
}

/// Whether the dispatch sends `n` tokens through a quantized layer by
/// qilin_qgemm_w{4,8}_bf16 instead of dequantization + cuBLAS (unless QILIN_CUDA_QGEMM=0):
/// past the tokens a GEMV takes (8, or 32 in the tensor-core GEMV's chunks, 24 on the
/// layers where the GEMM beats four chunks: `qgemm_beats_chunks`), up to
/// QGEMM_MAX_TOKENS, on layers of at least QGEMM_MIN_WEIGHTS weights.
pub fn qgemm_wins(dev: &Device, n: usize, w: &CudaLinear) -> bool {
    let LinearWeight::Quant(q) = &w.weight else { return false };
    dev.paths.qgemm
        && !qgemv_mma_takes(dev, n, w)
        && qgemm_shape_wins(n, q.format.bits, w.in_features, w.out_features, q.format.group)
}

/// `qgemm_wins` on the shape alone.
fn qgemm_shape_wins(n: usize, bits: u32, k: usize, m: usize, group: usize) -> bool {
    n > GEMV_MAX_TOKENS
        && n <= QGEMM_MAX_TOKENS
        && k * m >= QGEMM_MIN_WEIGHTS
        && qgemm_geometry(n, bits, k, m, group, 1, 0, None).is_some()
}

/// The most tokens `qgemm_wins` routes: one 64-token tile. H200, `qilin bench kernels` at
/// 771cd47, int4 us at 64 tokens (dequantization + cuBLAS / GEMM): gate_up 278 / 132,
/// down 145 / 83; at 256 the GEMM lost every layer (gate_up 293 / 389), since it
/// dequantizes the weights again for every 64-token tile. 65-128 tokens were not measured.
const QGEMM_MAX_TOKENS: usize = 64;

/// The fewest weights of a layer `qgemm_wins` routes. The same run at 64 tokens fits the
/// GEMM's time to ~34 us + 0.72 us per million weights (gate_up 135.8M: 132 us; down
/// 67.9M: 83; qkv 16.5M: 41) against ~2.1-2.5 us per million through dequantization +
/// cuBLAS (278, 145, 41), so it wins from ~25M weights: qkv and o_proj (12.8M) stay on
/// cuBLAS. Int8 has the same crossover (gate_up [16-64] 160-164 / 202-203 us, down
/// 101-103 / 107-108, o_proj 33-38 / 24-25).
const QGEMM_MIN_WEIGHTS: usize = 1 << 25;

/// qilin_qgemm_w{4,8}_bf16 (tensor cores, any n): `out [n, m] = x [n, k] W^T + b`, split-K
/// as `qgemm_geometry` decides (or `splits`, for tests) and merged as `launch_split_k`
/// says. In the dispatch only where `qgemm_wins`; tests and benchmarks call it directly.
pub fn qgemm_into(
    dev: &Device,
    x: &CudaTensor,
    w: &CudaLinear,
    q: &QuantWeight,
    out: &mut CudaTensor,
    splits: Option<usize>,
) {
    let (n, k, m) = (x.rows, w.in_features, w.out_features);
    let (bits, group) = (q.format.bits, q.format.group);
    let kernel = kernel_for(bits, Op::Gemm);
    let max_counters = QILIN_ATTN_DECODE_PIPE_MAX_COUNTERS as usize;
    let ((grid_x, grid_y, splits), threads) =
        qgemm_geometry(n, bits, k, m, group, sm_count(dev), max_counters, splits).unwrap_or_else(
            || {
                panic!(
                    "{} cannot take x [{n}, {k}] W [{m}, {k}]^T at {bits} bits, group {group}",
                    kernel.entry
                )
            },
        );
    let cfg = LaunchConfig {
        grid_dim: (grid_x, grid_y, splits),
        block_dim: (threads, 1, 1),
        shared_mem_bytes: 0,
    };
    let tiles = grid_x as usize * grid_y as usize;
    let partials = (splits > 1).then(|| tiles * splits as usize * QILIN_QGEMM_PARTIALS as usize);
    launch_split_k(dev, kernel, cfg, matmul_params(n, k, m, group), x, w, q, out, partials);
}

/// Rows `row0..row0 + rows` of a `[*, k]` quantized weight to bf16 into `dst`
/// (`[rows, k]`): qilin_dequant_w{4,8}_bf16.
pub fn dequantize_rows(
    dev: &Device,
    q: &QuantWeight,
    k: usize,
    row0: usize,
    rows: usize,
    dst: &mut CudaSlice<bf16>,
) {
    let (bits, group) = (q.format.bits, q.format.group);
    assert!(quant_layout_ok(bits, k, group), "dequantize: {bits}-bit levels, group {group}, k {k}");
    let level_bytes = k * bits as usize / 8;
    let pairs = k / group;
    assert!(
        dst.len() >= rows * k
            && q.levels.len() >= (row0 + rows) * level_bytes
            && q.scale_min.len() >= (row0 + rows) * pairs * 2,
        "dequantize: rows {row0}..{} of [*, {k}] do not fit the buffers",
        row0 + rows
    );
    let params = QilinDequantParams {
        rows: u32::try_from(rows).expect("rows fit u32"),
        cols: k as u32, // quant_layout_ok: k fits u32
        group_size: group as u32,
    };
    let cfg = LaunchConfig {
        grid_dim: (dequant_blocks(rows * k, bits), 1, 1),
        block_dim: (QILIN_DEQUANT_THREADS, 1, 1),
        shared_mem_bytes: 0,
    };
    let (levels, _l_sync) = q.levels.device_ptr(&dev.stream);
    let (scale_min, _s_sync) = q.scale_min.device_ptr(&dev.stream);
    let levels = levels + (row0 * level_bytes) as u64;
    let scale_min = scale_min + (row0 * pairs * 2 * size_of::<f32>()) as u64;
    let mut launch = dev.launch_builder(kernel_for(bits, Op::Dequant));
    launch.arg(&params).arg(dst).arg(&levels).arg(&scale_min);
    // SAFETY: argument order and types follow qilin_dequant_w{4,8}_bf16; dst holds rows * k
    // values, and the level and pair pointers start at row row0 of buffers that hold
    // row0 + rows rows (asserted above). Row starts stay 16-byte (levels: k % 32 == 0)
    // and 8-byte (pairs) aligned; the grid-stride loop is correct for any grid.
    check(unsafe { launch.launch(cfg) }, "launching qilin_dequant_bf16");
}

/// The quantized weight of a layer the tensor-core GEMVs take (`qgemv_mma_ok`), after
/// `check_shapes`; None for a bf16 layer or one they cannot take.
fn mma_weight<'a>(x: &CudaTensor, w: &'a CudaLinear, out: &CudaTensor) -> Option<&'a QuantWeight> {
    let super::LinearWeight::Quant(q) = &w.weight else { return None };
    if !qgemv_mma_ok(x.rows, q.format.bits, w.in_features, q.format.group) {
        return None;
    }
    super::linear::check_shapes(x, w, out);
    Some(q)
}

/// Entry points for the parity test (`tests/gpu_quant_linear.rs`) and `qilin bench`.
impl CudaBackend {
    /// The tensor-core GEMM whatever the dispatch would pick, split-K as its geometry
    /// decides for this device, or into `splits` (clamped to the input's steps; 1 when the
    /// tiles outnumber the merge counters); panics for a bf16 layer or a shape the kernel
    /// cannot take.
    pub fn linear_qgemm_into(
        &self,
        x: &CudaTensor,
        w: &CudaLinear,
        out: &mut CudaTensor,
        splits: Option<usize>,
    ) {
        let super::LinearWeight::Quant(q) = &w.weight else {
            panic!("linear_qgemm_into: a bf16 layer has no quantized GEMM")
        };
        super::linear::check_shapes(x, w, out);
        qgemm_into(&self.dev, x, w, q, out, splits)
    }

    /// The small-batch GEMV (n <= QILIN_QGEMV_SMALL_MAX_TOKENS) whatever the dispatch
    /// would pick. Panics as `linear_qgemm_into`, and for more rows.
    pub fn linear_qgemv_small_into(&self, x: &CudaTensor, w: &CudaLinear, out: &mut CudaTensor) {
        let super::LinearWeight::Quant(q) = &w.weight else {
            panic!("linear_qgemv_small_into: a bf16 layer has no quantized GEMV")
        };
        super::linear::check_shapes(x, w, out);
        qgemv_small_into(&self.dev, x, w, q, out)
    }

    /// The tensor-core GEMV (qilin_qgemv_mma_w4_bf16) whatever the dispatch would pick;
    /// false (nothing launched) for a layer it cannot take (`qgemv_mma_ok`: a bf16 layer,
    /// 8-bit levels, a group not a multiple of 128, n outside 1..=QILIN_QGEMV_MMA_MAX_TOKENS).
    pub fn linear_qgemv_mma_into(
        &self,
        x: &CudaTensor,
        w: &CudaLinear,
        out: &mut CudaTensor,
    ) -> bool {
        let Some(q) = mma_weight(x, w, out) else { return false };
        qgemv_with(&self.dev, Op::GemvMma, x, w, q, out);
        true
    }

    /// The split-K tensor-core GEMV (qilin_qgemv_mma_splitk_w4_bf16) whatever the dispatch
    /// would pick; false (nothing launched) where `linear_qgemv_mma_into` would be, and
    /// above GEMV_MAX_TOKENS tokens (it takes one chunk of 8).
    pub fn linear_qgemv_splitk_into(
        &self,
        x: &CudaTensor,
        w: &CudaLinear,
        out: &mut CudaTensor,
    ) -> bool {
        if x.rows > GEMV_MAX_TOKENS {
            return false;
        }
        let Some(q) = mma_weight(x, w, out) else { return false };
        qgemv_splitk(&self.dev, x, w, q, out);
        true
    }

    /// The whole weight of a quantized layer dequantized to bf16 on the device, copied
    /// to the host: `[out, in]`, row-major. None for a bf16 layer.
    pub fn dequantized_weight(&self, w: &CudaLinear) -> Option<Vec<bf16>> {
        let super::LinearWeight::Quant(q) = &w.weight else { return None };
        let (k, m) = (w.in_features, w.out_features);
        let mut dst = self.dev.alloc_output::<bf16>(m * k);
        dequantize_rows(&self.dev, q, k, 0, m, &mut dst);
        Some(self.dev.download(&dst, m * k))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn qgemm_takes_the_large_quantized_layers_past_the_gemv_up_to_64_tokens() {
        // Qwen2.5-7B's gate_up and down, Llama-3-8B's down (58.7M weights).
        for (k, m) in [(3584, 37888), (18944, 3584), (14336, 4096)] {
            assert!(qgemm_shape_wins(9, 4, k, m, 128), "k {k} m {m}");
            assert!(qgemm_shape_wins(64, 8, k, m, 128), "k {k} m {m}");
            assert!(!qgemm_shape_wins(8, 4, k, m, 128), "the GEMV's tokens");
            assert!(!qgemm_shape_wins(65, 4, k, m, 128), "a second token tile: cuBLAS");
        }
        // qkv and o_proj: dequantization + cuBLAS won at every token count measured.
        for (k, m) in [(3584, 4608), (3584, 3584)] {
            assert!(!qgemm_shape_wins(64, 4, k, m, 128), "k {k} m {m}");
        }
        // GGUF layouts: 8-bit levels in groups of 16, 4-bit in 32 (Q4_K_M's gate_up).
        assert!(qgemm_shape_wins(64, 8, 3584, 37888, 16));
        assert!(qgemm_shape_wins(64, 4, 3584, 37888, 32));
        assert!(!qgemm_shape_wins(64, 4, 3584, 37888, 16), "4-bit groups under a vector");
        assert!(!qgemm_shape_wins(64, 4, 3600, 37888, 16), "in not whole 32-channel steps");
    }

    #[test]
    fn the_gemm_takes_gate_up_from_the_chunked_gemv_only_at_four_chunks() {
        let (gate_up, down, llama_gate_up) = (3584 * 37888, 18944 * 3584, 4096 * 2 * 14336);
        for n in 25..=32 {
            assert!(qgemm_beats_chunks(n, gate_up), "n {n}");
            assert!(qgemm_beats_chunks(n, llama_gate_up), "n {n}");
            assert!(!qgemm_beats_chunks(n, down), "n {n}: down lost at 32 tokens");
        }
        for n in 1..=24 {
            assert!(!qgemm_beats_chunks(n, gate_up), "n {n}: up to three chunks won");
        }
    }

    #[test]
    fn dequant_chunks_are_aligned_balanced_and_bounded() {
        for (k, m) in [(3584, 37888), (18944, 3584), (3584, 4608), (576, 1536), (64, 1), (32, 7)] {
            let rows = dequant_chunk_rows(k, m);
            assert!(rows >= 1 && rows <= m, "k {k} m {m}: {rows} rows");
            assert!(
                rows == m || rows.is_multiple_of(DEQUANT_CHUNK_ALIGN),
                "k {k} m {m}: {rows} rows"
            );
            assert!(rows * k <= DEQUANT_SCRATCH_MAX_VALUES + DEQUANT_CHUNK_ALIGN * k);
            // As few chunks as the bound allows.
            let fewest = (m * k).div_ceil(DEQUANT_SCRATCH_MAX_VALUES);
            assert_eq!(m.div_ceil(rows), fewest.max(1), "k {k} m {m}: {rows} rows");
        }
        assert_eq!(dequant_chunk_rows(3584, 37888), 12672);
    }
}
