//! Launcher of kernels/attention_decode.cu, kernels/attention_prefill.cu and
//! kernels/attention_simple.cu: causal paged attention over a batch mixing prefill chunks
//! and decode tokens. CPU twin: `backend::cpu::attention::paged_attention` (behind
//! `CpuBackend::attention`).
//!
//! Which kernel writes which rows:
//! - sequences with exactly one new token (decode): the decode kernel decode_plan.rs
//!   picks: qilin_attention_decode_pipe_hd{64,128}_bf16 (tensor cores, three cache blocks
//!   in flight per warp, split-K over the context merged by the last split in the same
//!   launch), or with QILIN_ATTN_DECODE_PIPE=0 (or where its shared memory is refused)
//!   qilin_attention_decode_mma_hd{64,128}_bf16, or the FMA
//!   qilin_attention_decode_g{4,8}_bf16, split-K then qilin_attention_decode_reduce_bf16
//!   when the plan has more than one split;
//! - every other sequence: qilin_attention_prefill_wide_hd64_bf16 or
//!   qilin_attention_prefill_v2_hd128_bf16 (tensor cores, 128-row tiles), or
//!   qilin_attention_prefill_simple_bf16 for other head sizes (and where the head_dim-128
//!   kernel cannot have its shared memory or a non-positive softmax scale breaks its
//!   contract).
//!
//! Both kernels are launched over the whole `DeviceBatch` and skip the sequences the other
//! one owns, so the host needs no per-sequence lengths (the step's metadata stays on the
//! device and the launches are the same for every layer). The output starts as NaN (all
//! bits set), so a row that no kernel wrote shows up in any comparison.
//!
//! Switches for bisecting a parity failure on a GPU, read from the environment once, when
//! the device opens (`Device::attention_switches`; tests/gpu_attention.rs sets them per
//! path through `Device::set_attention_switches`); they are not for production:
//! - `QILIN_ATTN_SIMPLE=1`: the plain-FMA kernel writes every row;
//! - `QILIN_ATTN_NO_DECODE=1`: the prefill kernel writes every row, decode rows included;
//! - `QILIN_ATTN_DECODE_FMA=1`: the FMA decode kernels instead of the tensor-core one;
//! - `QILIN_ATTN_DECODE_PIPE=0`: the tensor-core decode kernel with a separate reduction
//!   pass instead of the pipelined one (H200, 8 sequences x 8K: 81 against 53 us; the
//!   FMA switch wins over both);
//! - `QILIN_ATTN_DECODE_SPLIT_TOKENS=N` (a positive multiple of 16): the decode kernel's
//!   keys per split, instead of the occupancy-based choice;
//!
//! The prefill kernels the current ones replaced went after the H200 run at 771cd47 (16K
//! causal at head_dim 128: 64-row tiles 161 TFLOP/s, 128-row tiles 221, v2 339), with
//! their switches.

use std::sync::Once;

use cudarc::driver::sys::CUdevice_attribute;
use cudarc::driver::{CudaSlice, DevicePtrMut, LaunchConfig};
use half::bf16;

use super::batch_meta::DeviceBatch;
use super::decode_plan::DecodePlan;
use super::device::{check, Device};
use super::tensor::{CudaKvCache, CudaTensor};
use crate::backend::abi::{
    QilinAttentionParams, BLOCK_SIZE, QILIN_ATTN_MAX_HEAD_DIM, QILIN_ATTN_PREFILL_THREADS,
    QILIN_ATTN_PREFILL_V2_HD128_SMEM_BYTES, QILIN_ATTN_PREFILL_WIDE_BLOCK_M,
    QILIN_ATTN_SIMPLE_THREADS, QILIN_WARP_SIZE, VEC_ELEMS,
};
use crate::backend::ptx::{self, Kernel};
use crate::backend::AttentionShape;

/// SM count assumed when the driver cannot be asked (an H100 SXM's).
const FALLBACK_SM_COUNT: usize = 132;
/// Largest grid.y / grid.z the hardware accepts.
pub(super) const MAX_GRID_YZ: usize = 65535;

/// Which kernels `attention` launches: the dispatch's (the environment's switches), or a
/// kernel the default replaced whatever the switches say, for its benchmark rows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AttentionKernels {
    Dispatch,
    /// The tensor-core decode kernel and its reduction pass (QILIN_ATTN_DECODE_PIPE=0).
    UnpipedDecode,
}

/// Causal paged attention of `q [n_tokens, heads*head_dim]` over layer `layer` of `cache`;
/// returns `[n_tokens, heads*head_dim]`.
pub fn attention(
    dev: &Device,
    q: &CudaTensor,      // [n_tokens, num_heads * head_dim]
    batch: &DeviceBatch, // the step's sequences, on the device
    cache: &CudaKvCache, // [layers][num_blocks * 16, num_kv_heads * head_dim] K and V
    layer: usize,
    shape: AttentionShape,
    kernels: AttentionKernels,
) -> CudaTensor {
    let mut switches = dev.attention_switches();
    match kernels {
        AttentionKernels::Dispatch => {}
        AttentionKernels::UnpipedDecode => switches.decode_pipe = false,
    }
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
        match prefill_kernel(dev, hd, shape.scale) {
            Some(kernel) => launch_prefill(dev, kernel, &mut out, q, batch, kv, params),
            None => launch_simple(dev, &mut out, q, batch, kv, params),
        }
    }
    if use_decode_kernel {
        let plan_with = |pipe| {
            DecodePlan::new(
                batch.n_seqs,
                shape,
                batch.max_context_len,
                sm_count(dev),
                switches.split_tokens,
                switches.decode_fma,
                pipe,
            )
        };
        let mut plan = plan_with(switches.decode_pipe);
        if plan.pipe && !dev.launchable(plan.kernel) {
            plan = plan_with(false); // this device's blocks cannot hold its K/V ring
        }
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
    /// Dynamic shared memory (the head_dim-128 kernel keeps Q there).
    smem_bytes: u32,
}

/// The tensor-core prefill kernel for this head size, if there is one this device can
/// launch: head_dim 128's keeps the max of the raw scores as the max of the scaled ones,
/// so it needs a positive softmax scale.
fn prefill_kernel(dev: &Device, head_dim: usize, scale: f32) -> Option<PrefillKernel> {
    let block_m = QILIN_ATTN_PREFILL_WIDE_BLOCK_M as usize;
    let (kernel, smem_bytes) = match head_dim {
        64 => (ptx::ATTENTION_PREFILL_WIDE_HD64_BF16, 0),
        128 if scale > 0.0 => {
            (ptx::ATTENTION_PREFILL_V2_HD128_BF16, QILIN_ATTN_PREFILL_V2_HD128_SMEM_BYTES)
        }
        _ => return None,
    };
    dev.launchable(kernel).then_some(PrefillKernel { kernel, block_m, smem_bytes })
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
    let mut launch = dev.launch_builder(prefill.kernel);
    launch
        .arg(&params)
        .arg(&mut out.data)
        .arg(&q.data)
        .arg(kv.keys)
        .arg(kv.values)
        .arg(&batch.seq_starts)
        .arg(&batch.context_lens)
        .arg(&batch.block_tables);
    // SAFETY: argument order and types follow qilin_attention_prefill_wide_hd64_bf16 (and
    // the v2 kernel's, the same).
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
    let mut launch = dev.launch_builder(ptx::ATTENTION_PREFILL_SIMPLE_BF16);
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
    // Fits the default 48 KiB without an opt-in (4 warps * 8 heads * (256 + 2) * 4 B), but
    // for the pipelined kernel's K/V ring, whose limit Device::open raised.
    assert!(
        plan.smem_bytes <= 48 * 1024 || plan.pipe,
        "attention: decode needs {} B",
        plan.smem_bytes
    );
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
    // The pipelined kernel's merge counters (one per sequence and grid.y row, fewer than
    // the device holds: the plan checked), held for the launch.
    let counters = plan.pipe.then(|| dev.merge_counters());
    let cfg = LaunchConfig {
        grid_dim: (as_grid_x(batch.n_seqs), grid_y as u32, plan.n_splits as u32),
        block_dim: (plan.threads, 1, 1),
        shared_mem_bytes: plan.smem_bytes as u32,
    };
    let mut launch = dev.launch_builder(plan.kernel);
    launch.arg(&params).arg(&mut out.data);
    match &partials {
        Some((part_out, part_ml)) => launch.arg(part_out).arg(part_ml),
        None => launch.arg(&null).arg(&null),
    };
    if let Some(counters) = &counters {
        launch.arg(&**counters);
    }
    launch
        .arg(&q.data)
        .arg(kv.keys)
        .arg(kv.values)
        .arg(&batch.seq_starts)
        .arg(&batch.context_lens)
        .arg(&batch.block_tables);
    // SAFETY: argument order and types follow qilin_attention_decode_g{4,8}_bf16 (and
    // qilin_attention_decode_pipe_hd{64,128}_bf16, which adds the counters after
    // part_ml). out and q hold n_tokens * heads * head_dim bf16; part_out n_seqs * heads *
    // n_splits * head_dim f32 and part_ml n_seqs * heads * n_splits * 2 f32 when n_splits
    // > 1 (the kernel touches them only then; null otherwise); the counters
    // QILIN_ATTN_DECODE_PIPE_MAX_COUNTERS u32, all zero (every launch leaves them so),
    // at least n_seqs * grid.y when n_splits > 1 (the plan checked); K/V, seq_starts, context_lens and block_tables as in
    // launch_prefill. n_splits * split_tokens >= max_context_len, so every context is
    // covered (the kernel traps otherwise); smem_bytes is the dynamic shared memory the
    // kernel needs for group_chunk heads of head_dim (the merge, or the pipelined
    // kernel's K/V ring).
    check(unsafe { launch.launch(cfg) }, "launching qilin_attention_decode");
    drop(counters);

    // The pipelined kernel merged its splits.
    let Some((part_out, part_ml)) = partials.as_ref().filter(|_| !plan.pipe) else { return };
    let threads = hd.div_ceil(QILIN_WARP_SIZE as usize) * QILIN_WARP_SIZE as usize;
    let cfg = LaunchConfig {
        grid_dim: (as_grid_x(batch.n_seqs), heads as u32, 1),
        block_dim: (threads as u32, 1, 1),
        shared_mem_bytes: 0,
    };
    let mut launch = dev.launch_builder(ptx::ATTENTION_DECODE_REDUCE_BF16);
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

pub(super) fn sm_count(dev: &Device) -> usize {
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
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AttentionSwitches {
    /// `QILIN_ATTN_SIMPLE=1`: the plain-FMA kernel writes every row.
    pub simple: bool,
    /// `QILIN_ATTN_NO_DECODE=1`: the prefill kernel writes every row.
    pub no_decode: bool,
    /// `QILIN_ATTN_DECODE_FMA=1`: the FMA decode kernels even where a tensor-core one
    /// exists.
    pub decode_fma: bool,
    /// Unless `QILIN_ATTN_DECODE_PIPE=0`: the pipelined decode kernel where one exists.
    pub decode_pipe: bool,
    /// `QILIN_ATTN_DECODE_SPLIT_TOKENS=N`: the decode kernel's keys per split.
    pub split_tokens: Option<usize>,
}

impl AttentionSwitches {
    /// The dispatch's own choices: no switch set.
    pub const DISPATCH: AttentionSwitches = AttentionSwitches {
        simple: false,
        no_decode: false,
        decode_fma: false,
        decode_pipe: true,
        split_tokens: None,
    };

    pub fn from_env() -> AttentionSwitches {
        let on = |name: &str| std::env::var_os(name).is_some_and(|v| v == "1");
        let split = std::env::var("QILIN_ATTN_DECODE_SPLIT_TOKENS").ok();
        AttentionSwitches {
            simple: on("QILIN_ATTN_SIMPLE"),
            no_decode: on("QILIN_ATTN_NO_DECODE"),
            decode_fma: on("QILIN_ATTN_DECODE_FMA"),
            decode_pipe: std::env::var_os("QILIN_ATTN_DECODE_PIPE").is_none_or(|v| v != "0"),
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

    #[test]
    fn forced_split_sizes_are_positive_multiples_of_a_block() {
        assert_eq!(parse_split_tokens("32"), Some(32));
        assert_eq!(parse_split_tokens("0"), None);
        assert_eq!(parse_split_tokens("24"), None);
        assert_eq!(parse_split_tokens("many"), None);
    }

    #[test]
    fn prefill_grid_has_a_slot_for_every_query_tile() {
        // Mirror of the kernel's slot -> (sequence, tile) search over random batches.
        // The kernels' 128-row tiles, and 64 (smaller tiles meet more boundaries).
        for bm in [64, QILIN_ATTN_PREFILL_WIDE_BLOCK_M as usize] {
            check_tile_slots(bm);
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
