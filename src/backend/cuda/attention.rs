//! Launcher of kernels/attention_decode.cu and kernels/attention_prefill.cu: causal paged
//! attention over a batch mixing prefill chunks and decode tokens. CPU twin:
//! `backend::cpu::attention::paged_attention` (behind `CpuBackend::attention`).
//!
//! Which kernel writes which rows:
//! - sequences with exactly one new token (decode): qilin_attention_decode_g{4,8}_bf16,
//!   split-K over the context, then qilin_attention_decode_reduce_bf16 when the plan has
//!   more than one split;
//! - every other sequence: qilin_attention_prefill_hd{64,128}_bf16 (tensor cores), or
//!   qilin_attention_prefill_simple_bf16 for head sizes without a tensor-core kernel.
//!
//! Both kernels are launched over the whole `DeviceBatch` and skip the sequences the other
//! one owns, so the host needs no per-sequence lengths (the step's metadata stays on the
//! device and the launches are the same for every layer). The output starts as NaN (all
//! bits set), so a row that no kernel wrote shows up in any comparison.
//!
//! Switches for bisecting a parity failure on a GPU, read at every call (a process sets
//! them once; they are not for production):
//! - `QILIN_ATTN_SIMPLE=1`: the plain-FMA kernel writes every row;
//! - `QILIN_ATTN_NO_DECODE=1`: the prefill kernel writes every row, decode rows included;
//! - `QILIN_ATTN_DECODE_FMA=1`: the FMA decode kernels instead of the tensor-core one;
//! - `QILIN_ATTN_DECODE_SPLIT_TOKENS=N` (a positive multiple of 16): the decode kernel's
//!   keys per split, instead of the occupancy-based choice;
//! - `QILIN_ATTN_PREFILL_WIDE=1`: the prefill rows take the 128-row-tile kernels
//!   (qilin_attention_prefill_wide_hd{64,128}_bf16; opt-in until a GPU verifies them).

use std::sync::Once;

use cudarc::driver::sys::CUdevice_attribute;
use cudarc::driver::{CudaSlice, DevicePtrMut, LaunchConfig, PushKernelArg};
use half::bf16;

use super::batch_meta::DeviceBatch;
use super::device::{check, Device};
use super::tensor::{CudaKvCache, CudaTensor};
use crate::backend::abi::{
    QilinAttentionParams, BLOCK_SIZE, QILIN_ATTN_DECODE_MAX_GROUP, QILIN_ATTN_DECODE_MMA_MAX_GROUP,
    QILIN_ATTN_DECODE_MMA_THREADS, QILIN_ATTN_DECODE_THREADS, QILIN_ATTN_MAX_HEAD_DIM,
    QILIN_ATTN_PREFILL_BLOCK_M, QILIN_ATTN_PREFILL_THREADS, QILIN_ATTN_PREFILL_WIDE_BLOCK_M,
    QILIN_ATTN_PREFILL_WIDE_HD128_SMEM_BYTES, QILIN_ATTN_SIMPLE_THREADS, QILIN_WARP_SIZE,
    VEC_ELEMS,
};
use crate::backend::ptx::{self, Kernel};
use crate::backend::AttentionShape;

/// Decode blocks to aim for, in multiples of the SM count: several resident blocks per SM
/// keep enough K/V loads in flight to approach the memory bandwidth.
const DECODE_WAVES: usize = 4;
/// Fewest keys per decode split (unless forced): below this the per-split merge and the
/// reduction pass cost more than the extra parallelism gains.
const MIN_SPLIT_TOKENS: usize = 256;
/// As MIN_SPLIT_TOKENS for the tensor-core decode kernel, whose 4 warps take 16 keys
/// each: two rounds per split.
const MMA_MIN_SPLIT_TOKENS: usize = 128;
/// SM count assumed when the driver cannot be asked (an H100 SXM's).
const FALLBACK_SM_COUNT: usize = 132;
/// Largest grid.y / grid.z the hardware accepts.
const MAX_GRID_YZ: usize = 65535;

/// Causal paged attention of `q [n_tokens, heads*head_dim]` over layer `layer` of `cache`;
/// returns `[n_tokens, heads*head_dim]`. `force_wide_prefill`: the 128-row-tile prefill
/// kernels whatever QILIN_ATTN_PREFILL_WIDE says (their benchmark row).
pub fn attention(
    dev: &Device,
    q: &CudaTensor,      // [n_tokens, num_heads * head_dim]
    batch: &DeviceBatch, // the step's sequences, on the device
    cache: &CudaKvCache, // [layers][num_blocks * 16, num_kv_heads * head_dim] K and V
    layer: usize,
    shape: AttentionShape,
    force_wide_prefill: bool,
) -> CudaTensor {
    let mut switches = Switches::from_env();
    switches.prefill_wide |= force_wide_prefill;
    let (heads, kv_heads, hd) = (shape.num_heads, shape.num_kv_heads, shape.head_dim);
    assert!(
        kv_heads > 0 && heads > 0 && heads % kv_heads == 0,
        "attention: {heads} query heads are not a multiple of {kv_heads} KV heads"
    );
    assert!(
        hd > 0 && hd % VEC_ELEMS == 0 && hd <= QILIN_ATTN_MAX_HEAD_DIM as usize,
        "attention: head_dim {hd} is not a multiple of {VEC_ELEMS} in 8..={QILIN_ATTN_MAX_HEAD_DIM}"
    );
    assert_eq!(
        (q.rows, q.cols),
        (batch.n_tokens, heads * hd),
        "attention: q is not [n_tokens, heads * head_dim]"
    );
    assert_eq!(
        (cache.shape.num_kv_heads, cache.shape.head_dim),
        (kv_heads, hd),
        "attention: the KV cache's geometry differs from the layer's"
    );
    assert!(
        layer < cache.keys.len() && layer < cache.values.len(),
        "attention: layer {layer} is not in a cache of {} layers",
        cache.keys.len()
    );
    let n = batch.n_tokens;
    let mut out = CudaTensor { data: nan_filled(dev, n * q.cols), rows: n, cols: q.cols };
    if n == 0 {
        return out;
    }
    assert!(batch.n_seqs > 0, "attention: {n} tokens but no sequence");
    let cache_slots = cache.shape.num_blocks * BLOCK_SIZE;
    let (keys, values) = (&cache.keys[layer], &cache.values[layer]);
    assert!(
        keys.len() >= cache_slots * kv_heads * hd && values.len() >= cache_slots * kv_heads * hd,
        "attention: layer {layer}'s K/V buffers are smaller than the cache shape says"
    );
    let params = QilinAttentionParams {
        n_tokens: as_u32(n, "n_tokens"),
        n_seqs: as_u32(batch.n_seqs, "n_seqs"),
        num_heads: as_u32(heads, "num_heads"),
        num_kv_heads: as_u32(kv_heads, "num_kv_heads"),
        head_dim: as_u32(hd, "head_dim"),
        max_blocks_per_seq: as_u32(batch.max_blocks_per_seq, "max_blocks_per_seq"),
        cache_slots: as_u32(cache_slots, "cache slots"),
        scale: shape.scale,
        split_tokens: 0,
        n_splits: 1,
        group_chunk: 0,
        skip_decode_rows: 0,
    };
    let kv = KvLayer { keys, values };

    if switches.simple {
        launch_simple(dev, &mut out, q, batch, kv, params);
        return out;
    }
    let use_decode_kernel = !switches.no_decode;
    // A batch whose longest sequence has one token is all decode rows.
    if batch.max_query_len > 1 || !use_decode_kernel {
        let params = QilinAttentionParams { skip_decode_rows: use_decode_kernel as u32, ..params };
        match prefill_kernel(hd, switches.prefill_wide) {
            Some(kernel) => launch_prefill(dev, kernel, &mut out, q, batch, kv, params),
            None => launch_simple(dev, &mut out, q, batch, kv, params),
        }
    }
    if use_decode_kernel {
        let plan = DecodePlan::new(
            batch.n_seqs,
            shape,
            batch.max_context_len,
            sm_count(dev),
            switches.split_tokens,
            switches.decode_fma,
        );
        launch_decode(dev, &plan, &mut out, q, batch, kv, params);
    }
    out
}

/// One layer's K and V buffers, `[num_blocks * 16, kv_heads * head_dim]` each.
#[derive(Clone, Copy)]
struct KvLayer<'a> {
    keys: &'a CudaSlice<bf16>,
    values: &'a CudaSlice<bf16>,
}

/// A tensor-core prefill kernel and how it is launched.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct PrefillKernel {
    kernel: Kernel,
    /// Query rows per tile (grid.y counts tiles of this many rows).
    block_m: usize,
    /// Dynamic shared memory (the wide head_dim-128 kernel keeps Q there).
    smem_bytes: u32,
}

/// The tensor-core prefill kernel for this head size, if there is one: the 64-row-tile
/// kernels, or with `wide` the 128-row-tile ones.
fn prefill_kernel(head_dim: usize, wide: bool) -> Option<PrefillKernel> {
    let (narrow_m, wide_m) =
        (QILIN_ATTN_PREFILL_BLOCK_M as usize, QILIN_ATTN_PREFILL_WIDE_BLOCK_M as usize);
    let (kernel, block_m, smem_bytes) = match (head_dim, wide) {
        (64, false) => (ptx::ATTENTION_PREFILL_HD64_BF16, narrow_m, 0),
        (128, false) => (ptx::ATTENTION_PREFILL_HD128_BF16, narrow_m, 0),
        (64, true) => (ptx::ATTENTION_PREFILL_WIDE_HD64_BF16, wide_m, 0),
        (128, true) => (
            ptx::ATTENTION_PREFILL_WIDE_HD128_BF16,
            wide_m,
            QILIN_ATTN_PREFILL_WIDE_HD128_SMEM_BYTES,
        ),
        _ => return None,
    };
    Some(PrefillKernel { kernel, block_m, smem_bytes })
}

/// grid.y of the tensor-core prefill kernel: `n_tokens / block_m + n_seqs` query-tile
/// slots, enough for every sequence's tiles (see kernels/attention_prefill.cu).
fn prefill_tile_slots(n_tokens: usize, n_seqs: usize, block_m: usize) -> usize {
    n_tokens / block_m + n_seqs
}

fn launch_prefill(
    dev: &Device,
    prefill: PrefillKernel,
    out: &mut CudaTensor,
    q: &CudaTensor,
    batch: &DeviceBatch,
    kv: KvLayer<'_>,
    params: QilinAttentionParams,
) {
    // Heads on x, tile slots on y (walked in reverse by the kernel): the expensive last
    // causal tiles of every head start first.
    let slots = prefill_tile_slots(batch.n_tokens, batch.n_seqs, prefill.block_m);
    assert!(
        (1..=MAX_GRID_YZ).contains(&slots),
        "attention: {slots} query-tile slots exceed grid.y ({} tokens)",
        batch.n_tokens
    );
    let cfg = LaunchConfig {
        grid_dim: (as_grid_x(params.num_heads as usize), slots as u32, 1),
        block_dim: (QILIN_ATTN_PREFILL_THREADS, 1, 1),
        // Static 2 * 64 * (head_dim + 8) * 2 B <= 34,816 B, but for the wide head_dim-128
        // kernel's dynamic Q, K and V tiles (Device::open raised its limit).
        shared_mem_bytes: prefill.smem_bytes,
    };
    let mut launch = dev.stream.launch_builder(dev.function(prefill.kernel));
    launch
        .arg(&params)
        .arg(&mut out.data)
        .arg(&q.data)
        .arg(kv.keys)
        .arg(kv.values)
        .arg(&batch.seq_starts)
        .arg(&batch.context_lens)
        .arg(&batch.block_tables);
    // SAFETY: argument order and types follow qilin_attention_prefill_hd{64,128}_bf16.
    // out and q hold n_tokens * heads * head_dim bf16 (checked by the caller); keys and
    // values cache_slots * kv_heads * head_dim bf16 (checked); seq_starts n_seqs + 1 u32,
    // context_lens n_seqs u32, block_tables n_seqs * max_blocks_per_seq u32 (DeviceBatch
    // builds them so). The kernel traps on a block id >= cache_slots or a position past
    // the block table instead of reading out of bounds.
    check(unsafe { launch.launch(cfg) }, "launching qilin_attention_prefill (tensor cores)");
}

fn launch_simple(
    dev: &Device,
    out: &mut CudaTensor,
    q: &CudaTensor,
    batch: &DeviceBatch,
    kv: KvLayer<'_>,
    params: QilinAttentionParams,
) {
    assert!(params.num_heads as usize <= MAX_GRID_YZ, "attention: too many heads for grid.y");
    let cfg = LaunchConfig {
        grid_dim: (as_grid_x(batch.n_tokens), params.num_heads, 1),
        block_dim: (QILIN_ATTN_SIMPLE_THREADS, 1, 1),
        shared_mem_bytes: 0,
    };
    let mut launch = dev.stream.launch_builder(dev.function(ptx::ATTENTION_PREFILL_SIMPLE_BF16));
    launch
        .arg(&params)
        .arg(&mut out.data)
        .arg(&q.data)
        .arg(kv.keys)
        .arg(kv.values)
        .arg(&batch.seq_starts)
        .arg(&batch.context_lens)
        .arg(&batch.block_tables)
        .arg(&batch.token_seq);
    // SAFETY: argument order and types follow qilin_attention_prefill_simple_bf16; buffer
    // lengths as in launch_prefill, plus token_seq with n_tokens u32 < n_seqs (DeviceBatch).
    check(unsafe { launch.launch(cfg) }, "launching qilin_attention_prefill_simple_bf16");
}

/// How the decode kernel covers the batch: grid (n_seqs, kv_heads * chunks, n_splits).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct DecodePlan {
    kernel: Kernel,
    /// Query heads per block and blocks per KV head (grid.y = kv_heads * chunks).
    group_chunk: usize,
    chunks: usize,
    /// Keys per split (a multiple of 16) and splits per sequence (grid.z).
    split_tokens: usize,
    n_splits: usize,
    /// Dynamic shared memory of one block: the cross-warp merge buffers.
    smem_bytes: usize,
    /// Threads per block of `kernel`.
    threads: u32,
}

impl DecodePlan {
    /// `n_seqs` bounds the decode rows (the kernel skips the other sequences) and
    /// `max_context` their context; `forced_split` overrides the split size.
    fn new(
        n_seqs: usize,
        shape: AttentionShape,
        max_context: usize,
        sm_count: usize,
        forced_split: Option<usize>,
        force_fma: bool,
    ) -> DecodePlan {
        let group = shape.num_heads / shape.num_kv_heads;
        let mma_kernel = match shape.head_dim {
            64 => Some(ptx::ATTENTION_DECODE_MMA_HD64_BF16),
            128 => Some(ptx::ATTENTION_DECODE_MMA_HD128_BF16),
            _ => None,
        }
        .filter(|_| !force_fma);
        let max_group = match mma_kernel {
            Some(_) => QILIN_ATTN_DECODE_MMA_MAX_GROUP,
            None => QILIN_ATTN_DECODE_MAX_GROUP,
        } as usize;
        // Balanced chunks: a group of 12 runs as 6 + 6, not 8 + 4.
        let chunks = group.div_ceil(max_group);
        let group_chunk = group.div_ceil(chunks);
        let kernel = match mma_kernel {
            Some(kernel) => kernel,
            None if group_chunk <= 4 => ptx::ATTENTION_DECODE_G4_BF16,
            None => ptx::ATTENTION_DECODE_G8_BF16,
        };
        let min_split = if mma_kernel.is_some() { MMA_MIN_SPLIT_TOKENS } else { MIN_SPLIT_TOKENS };
        let max_context = max_context.max(1);
        let split_tokens = match forced_split {
            Some(tokens) => tokens,
            None => {
                let blocks_per_split = (n_seqs * shape.num_kv_heads * chunks).max(1);
                let wanted = (DECODE_WAVES * sm_count).div_ceil(blocks_per_split).max(1);
                let most = max_context.div_ceil(min_split).max(1);
                max_context.div_ceil(wanted.min(most)).next_multiple_of(BLOCK_SIZE)
            }
        };
        assert!(
            split_tokens > 0 && split_tokens % BLOCK_SIZE == 0,
            "attention: decode split of {split_tokens} keys"
        );
        let n_splits = max_context.div_ceil(split_tokens);
        let warps = (QILIN_ATTN_DECODE_THREADS / QILIN_WARP_SIZE) as usize;
        // The tensor-core kernel's buffers are static.
        let smem_bytes = match mma_kernel {
            Some(_) => 0,
            None => warps * group_chunk * (shape.head_dim + 2) * std::mem::size_of::<f32>(),
        };
        let threads = match mma_kernel {
            Some(_) => QILIN_ATTN_DECODE_MMA_THREADS,
            None => QILIN_ATTN_DECODE_THREADS,
        };
        DecodePlan { kernel, group_chunk, chunks, split_tokens, n_splits, smem_bytes, threads }
    }
}

fn launch_decode(
    dev: &Device,
    plan: &DecodePlan,
    out: &mut CudaTensor,
    q: &CudaTensor,
    batch: &DeviceBatch,
    kv: KvLayer<'_>,
    params: QilinAttentionParams,
) {
    let heads = params.num_heads as usize;
    let hd = params.head_dim as usize;
    let grid_y = params.num_kv_heads as usize * plan.chunks;
    assert!(
        grid_y <= MAX_GRID_YZ && plan.n_splits <= MAX_GRID_YZ,
        "attention: decode grid ({grid_y}, {}) exceeds the hardware's limits",
        plan.n_splits
    );
    // Fits the default 48 KiB without an opt-in: 4 warps * 8 heads * (256 + 2) * 4 B.
    assert!(plan.smem_bytes <= 48 * 1024, "attention: decode needs {} B", plan.smem_bytes);
    let params = QilinAttentionParams {
        split_tokens: as_u32(plan.split_tokens, "split_tokens"),
        n_splits: as_u32(plan.n_splits, "n_splits"),
        group_chunk: as_u32(plan.group_chunk, "group_chunk"),
        ..params
    };
    // Partials: [n_seqs, heads, n_splits, head_dim] outputs and [.., 2] (max, sum).
    let partials = (plan.n_splits > 1).then(|| {
        let parts = batch.n_seqs * heads * plan.n_splits;
        // The decode kernel writes every split the reduction reads (z < ceil(ctx / split)).
        (dev.alloc_output::<f32>(parts * hd), dev.alloc_output::<f32>(parts * 2))
    });
    let null: u64 = 0;
    let cfg = LaunchConfig {
        grid_dim: (as_grid_x(batch.n_seqs), grid_y as u32, plan.n_splits as u32),
        block_dim: (plan.threads, 1, 1),
        shared_mem_bytes: plan.smem_bytes as u32,
    };
    let mut launch = dev.stream.launch_builder(dev.function(plan.kernel));
    launch.arg(&params).arg(&mut out.data);
    match &partials {
        Some((part_out, part_ml)) => launch.arg(part_out).arg(part_ml),
        None => launch.arg(&null).arg(&null),
    };
    launch
        .arg(&q.data)
        .arg(kv.keys)
        .arg(kv.values)
        .arg(&batch.seq_starts)
        .arg(&batch.context_lens)
        .arg(&batch.block_tables);
    // SAFETY: argument order and types follow qilin_attention_decode_g{4,8}_bf16. out and
    // q hold n_tokens * heads * head_dim bf16; part_out n_seqs * heads * n_splits *
    // head_dim f32 and part_ml n_seqs * heads * n_splits * 2 f32 when n_splits > 1 (the
    // kernel touches them only then; null otherwise); K/V, seq_starts, context_lens and
    // block_tables as in launch_prefill. n_splits * split_tokens >= max_context_len, so
    // every context is covered (the kernel traps otherwise); smem_bytes is the dynamic
    // shared memory the kernel's merge needs for group_chunk heads of head_dim.
    check(unsafe { launch.launch(cfg) }, "launching qilin_attention_decode");

    let Some((part_out, part_ml)) = &partials else { return };
    let threads = hd.div_ceil(QILIN_WARP_SIZE as usize) * QILIN_WARP_SIZE as usize;
    let cfg = LaunchConfig {
        grid_dim: (as_grid_x(batch.n_seqs), heads as u32, 1),
        block_dim: (threads as u32, 1, 1),
        shared_mem_bytes: 0,
    };
    let mut launch = dev.stream.launch_builder(dev.function(ptx::ATTENTION_DECODE_REDUCE_BF16));
    launch
        .arg(&params)
        .arg(&mut out.data)
        .arg(part_out)
        .arg(part_ml)
        .arg(&batch.seq_starts)
        .arg(&batch.context_lens);
    // SAFETY: argument order and types follow qilin_attention_decode_reduce_bf16; buffers
    // as for the decode launch above, which wrote every split the reduction reads (the
    // splits below ceil(context / split_tokens) of each decode row, for every head).
    check(unsafe { launch.launch(cfg) }, "launching qilin_attention_decode_reduce_bf16");
}

/// `len` bf16 values with every bit set (NaN), so an element no kernel writes is visible.
fn nan_filled(dev: &Device, len: usize) -> CudaSlice<bf16> {
    let len = len.max(1);
    // SAFETY: every byte is set by the memset below, queued before any use of the buffer.
    let mut data = check(unsafe { dev.stream.alloc::<bf16>(len) }, "allocating attention output");
    {
        let (ptr, _record) = data.device_ptr_mut(&dev.stream);
        // SAFETY: ptr addresses len * 2 bytes owned by `data`, on this stream.
        let set = unsafe {
            cudarc::driver::result::memset_d8_async(
                ptr,
                0xff,
                len * std::mem::size_of::<bf16>(),
                dev.stream.cu_stream(),
            )
        };
        check(set, "poisoning the attention output");
    }
    data
}

fn sm_count(dev: &Device) -> usize {
    dev.ctx
        .attribute(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
        .ok()
        .and_then(|n| usize::try_from(n).ok())
        .filter(|&n| n > 0)
        .unwrap_or(FALLBACK_SM_COUNT)
}

/// A size as the u32 the kernels take; larger ones are launcher bugs.
fn as_u32(value: usize, what: &str) -> u32 {
    u32::try_from(value)
        .unwrap_or_else(|_| panic!("attention: {what} = {value} does not fit the kernel's u32"))
}

fn as_grid_x(blocks: usize) -> u32 {
    assert!((1..=i32::MAX as usize).contains(&blocks), "attention: {blocks} blocks on grid.x");
    blocks as u32
}

/// The bisecting switches (module docs).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Switches {
    simple: bool,
    no_decode: bool,
    /// `QILIN_ATTN_DECODE_FMA=1`: the FMA decode kernels even where a tensor-core one
    /// exists.
    decode_fma: bool,
    split_tokens: Option<usize>,
    /// `QILIN_ATTN_PREFILL_WIDE=1`: the 128-row-tile prefill kernels.
    prefill_wide: bool,
}

impl Switches {
    fn from_env() -> Switches {
        let on = |name: &str| std::env::var_os(name).is_some_and(|v| v == "1");
        let split = std::env::var("QILIN_ATTN_DECODE_SPLIT_TOKENS").ok();
        Switches {
            simple: on("QILIN_ATTN_SIMPLE"),
            no_decode: on("QILIN_ATTN_NO_DECODE"),
            decode_fma: on("QILIN_ATTN_DECODE_FMA"),
            prefill_wide: on("QILIN_ATTN_PREFILL_WIDE"),
            split_tokens: split.as_deref().and_then(parse_split_tokens),
        }
    }
}

/// A forced decode split size: a positive multiple of 16; anything else is ignored with
/// one warning.
fn parse_split_tokens(value: &str) -> Option<usize> {
    let parsed = value.trim().parse::<usize>().ok().filter(|&t| t > 0 && t % BLOCK_SIZE == 0);
    if parsed.is_none() {
        static WARN: Once = Once::new();
        WARN.call_once(|| {
            tracing::warn!(
                "QILIN_ATTN_DECODE_SPLIT_TOKENS={value:?} ignored: not a positive multiple of \
                 {BLOCK_SIZE}"
            )
        });
    }
    parsed
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shape(heads: usize, kv: usize, hd: usize) -> AttentionShape {
        AttentionShape {
            num_heads: heads,
            num_kv_heads: kv,
            head_dim: hd,
            scale: 1.0 / (hd as f32).sqrt(),
        }
    }

    #[test]
    fn decode_plan_covers_every_context_and_fills_the_gpu() {
        for (heads, kv, hd) in [(28, 4, 128), (9, 3, 64), (16, 1, 64), (12, 1, 96), (8, 8, 256)] {
            for n_seqs in [1, 3, 8, 64, 256] {
                for ctx in [1, 15, 16, 17, 255, 1000, 8192, 32768, 131072] {
                    for fma in [false, true] {
                        let plan =
                            DecodePlan::new(n_seqs, shape(heads, kv, hd), ctx, 132, None, fma);
                        let label =
                            format!("{heads}/{kv}/{hd}, {n_seqs} seqs, ctx {ctx}: {plan:?}");
                        assert!(plan.n_splits * plan.split_tokens >= ctx, "{label}");
                        assert!(
                            (plan.n_splits - 1) * plan.split_tokens < ctx,
                            "{label}: empty split"
                        );
                        assert_eq!(plan.split_tokens % BLOCK_SIZE, 0, "{label}");
                        assert!(plan.n_splits <= MAX_GRID_YZ, "{label}");
                        assert!(plan.group_chunk * plan.chunks >= heads / kv, "{label}");
                        let mma = !fma && (hd == 64 || hd == 128);
                        let (max_group, min_split) = match mma {
                            true => (QILIN_ATTN_DECODE_MMA_MAX_GROUP, MMA_MIN_SPLIT_TOKENS),
                            false => (QILIN_ATTN_DECODE_MAX_GROUP, MIN_SPLIT_TOKENS),
                        };
                        assert!(plan.group_chunk <= max_group as usize, "{label}");
                        assert!(plan.smem_bytes <= 48 * 1024, "{label}");
                        if ctx >= 2 * min_split {
                            assert!(plan.split_tokens >= min_split, "{label}: tiny splits");
                        }
                    }
                }
            }
        }
        // One 32K sequence of Qwen2.5-7B: 4 KV heads alone would use 4 SMs.
        for fma in [false, true] {
            let plan = DecodePlan::new(1, shape(28, 4, 128), 32768, 132, None, fma);
            let blocks = 4 * plan.n_splits;
            assert!((2 * 132..=4 * 132).contains(&blocks), "{plan:?}: {blocks} blocks");
            // A full decode batch needs no split at all.
            let plan = DecodePlan::new(256, shape(28, 4, 128), 2000, 132, None, fma);
            assert_eq!(plan.n_splits, 1, "{plan:?}");
        }
        let kernel = |shape, fma| DecodePlan::new(1, shape, 100, 132, None, fma).kernel;
        assert_eq!(kernel(shape(28, 4, 128), false), ptx::ATTENTION_DECODE_MMA_HD128_BF16);
        assert_eq!(kernel(shape(28, 4, 128), true), ptx::ATTENTION_DECODE_G8_BF16);
        assert_eq!(kernel(shape(9, 3, 64), false), ptx::ATTENTION_DECODE_MMA_HD64_BF16);
        // SmolLM2 (group 3) takes the narrow FMA kernel; head_dim 96 has no mma kernel.
        assert_eq!(kernel(shape(9, 3, 64), true), ptx::ATTENTION_DECODE_G4_BF16);
        assert_eq!(kernel(shape(12, 1, 96), false), ptx::ATTENTION_DECODE_G8_BF16);
        // A group of 16 is one mma tile, or two FMA chunks of 8; 32 two tiles.
        let plan = DecodePlan::new(1, shape(16, 1, 64), 100, 132, None, false);
        assert_eq!((plan.chunks, plan.group_chunk), (1, 16));
        let plan = DecodePlan::new(1, shape(16, 1, 64), 100, 132, None, true);
        assert_eq!((plan.chunks, plan.group_chunk), (2, 8));
        let plan = DecodePlan::new(1, shape(32, 1, 128), 100, 132, None, false);
        assert_eq!((plan.chunks, plan.group_chunk), (2, 16));
    }

    #[test]
    fn forced_split_is_used_as_is() {
        let plan = DecodePlan::new(2, shape(28, 4, 128), 1000, 132, Some(16), false);
        assert_eq!((plan.split_tokens, plan.n_splits), (16, 63));
        assert_eq!(parse_split_tokens("32"), Some(32));
        assert_eq!(parse_split_tokens("0"), None);
        assert_eq!(parse_split_tokens("24"), None);
        assert_eq!(parse_split_tokens("many"), None);
    }

    #[test]
    fn prefill_grid_has_a_slot_for_every_query_tile() {
        // Mirror of the kernel's slot -> (sequence, tile) search over random batches.
        for bm in [QILIN_ATTN_PREFILL_BLOCK_M, QILIN_ATTN_PREFILL_WIDE_BLOCK_M] {
            check_tile_slots(bm as usize);
        }
    }

    fn check_tile_slots(bm: usize) {
        let lens_cases: &[&[usize]] = &[
            &[1],
            &[64],
            &[65],
            &[1, 1, 1],
            &[0, 5, 0],
            &[63, 1, 64, 129, 7, 512, 1],
            &[200, 0, 0, 3, 64, 64, 1000],
        ];
        for lens in lens_cases {
            let mut starts = vec![0usize];
            for len in *lens {
                starts.push(starts.last().unwrap() + len);
            }
            let n_tokens = *starts.last().unwrap();
            let n_seqs = lens.len();
            let key = |s: usize| starts[s] / bm + s;
            let mut served = vec![vec![false; 0]; n_seqs];
            for (s, len) in lens.iter().enumerate() {
                served[s] = vec![false; len.div_ceil(bm)];
            }
            for b in 0..prefill_tile_slots(n_tokens, n_seqs, bm) {
                let s = (0..n_seqs).rev().find(|&s| key(s) <= b).expect("key(0) == 0");
                let tile = b - key(s);
                if tile * bm < lens[s] {
                    assert!(!served[s][tile], "{lens:?}: tile {tile} of seq {s} twice");
                    served[s][tile] = true;
                }
            }
            for (s, tiles) in served.iter().enumerate() {
                assert!(tiles.iter().all(|&t| t), "{lens:?}: seq {s} tiles {tiles:?}");
            }
        }
    }
}
