//! Launcher of kernels/rope.cu: RoPE on q and k fused with the K/V cache write (CPU twin:
//! `CpuBackend::rope_and_store_kv`, i.e. backend/cpu/attention.rs `apply_rope` +
//! `CpuKvCache::store`), and the device copy of the cos/sin tables it reads.
//!
//! The kernel reads `RopeTable`'s own f32 cos/sin (with YaRN's attention factor already
//! folded in), so its results equal the twin's bit for bit before the bf16 store. The
//! table is uploaded whole once and kept on the device: every layer of every step reads
//! the same rows, and the engine's table only grows (geometrically, `RopeTable::ensure`),
//! so a re-upload happens a handful of times per process. The copy lives here, keyed by
//! the CUDA context, because the `Backend` trait hands over a `&RopeTable` per call and
//! the table has no identity of its own; see `DeviceTable::matches`.

use std::sync::{Arc, Mutex};

use cudarc::driver::{CudaSlice, LaunchConfig};
use half::bf16;

use super::batch_meta::DeviceBatch;
use super::device::{check, Device};
use super::launch::KernelLaunch;
use super::tensor::{CudaKvCache, CudaTensor};
use crate::backend::abi::{rope_block_threads, QilinRopeParams};
use crate::backend::ptx::{self, Kernel};
use crate::backend::{AttentionShape, BLOCK_SIZE};
use crate::model::rope::RopeTable;

/// A RopeTable's cos/sin on one device.
struct DeviceTable {
    /// `Arc::as_ptr` of the owning context; the slices keep that context alive, so the
    /// address cannot be reused by another context while this entry exists.
    ctx: usize,
    len: usize,
    half: usize,
    /// cos and sin rows 1 and len - 1 of the table that was uploaded.
    fingerprint: Vec<u32>,
    /// Shared with the CUDA graphs captured while this was the table (`pin_table`).
    cos: Arc<CudaSlice<f32>>, // [len, half]
    sin: Arc<CudaSlice<f32>>, // [len, half]
}

/// A device table kept alive by a captured graph that reads it, after the engine's table
/// has grown and the entry here was replaced.
pub struct PinnedTable {
    cos: Arc<CudaSlice<f32>>, // [len, half]
    sin: Arc<CudaSlice<f32>>, // [len, half]
}

/// The device copy of `rope` that the RoPE kernels read (uploaded if it is not yet), kept
/// alive for as long as the result is: by a captured graph, and by each launch until it is
/// queued (the engine's table may grow meanwhile on another thread and replace this one;
/// a drop after the launch is ordered after the kernel on the stream).
pub fn pin_table(dev: &Device, rope: &RopeTable) -> PinnedTable {
    let mut tables = TABLES.lock().unwrap_or_else(|e| e.into_inner());
    let table = device_table(dev, &mut tables, rope);
    PinnedTable { cos: table.cos.clone(), sin: table.sin.clone() }
}

/// At most this many contexts keep a table (tests open several backends; production one
/// per GPU); the oldest entry is dropped first.
const MAX_TABLES: usize = 4;

static TABLES: Mutex<Vec<DeviceTable>> = Mutex::new(Vec::new());

/// Bits of the rows that tell two tables apart: row 1 holds `attention_factor *
/// cos/sin(inv_freq[i])` (every frequency and the factor), the last row the same at the
/// largest angle, where frequencies that agree to f32 rounding at row 1 still differ.
/// Equal fingerprints and lengths mean equal tables for every rope config we build;
/// tables are a pure function of (config, head_dim, length).
fn fingerprint(rope: &RopeTable) -> Vec<u32> {
    let mut bits = Vec::new();
    for pos in [1.min(rope.len() - 1), rope.len() - 1] {
        let (cos, sin) = rope.at(pos);
        bits.extend(cos.iter().chain(sin).map(|v| v.to_bits()));
    }
    bits
}

impl DeviceTable {
    fn matches(&self, ctx: usize, rope: &RopeTable, fingerprint: &[u32]) -> bool {
        self.ctx == ctx
            && self.len == rope.len()
            && self.half == rope.half_dim()
            && self.fingerprint == fingerprint
    }
}

/// Rotates q `[n, heads*head_dim]` and k `[n, kv_heads*head_dim]` in place at the batch's
/// positions, then writes k and v `[n, kv_heads*head_dim]` into layer `layer` of the
/// cache at the batch's slots. `rope` must cover every position of the batch.
#[allow(clippy::too_many_arguments)]
pub fn rope_and_store_kv(
    dev: &Device,
    q: &mut CudaTensor,
    k: &mut CudaTensor,
    v: &CudaTensor,
    batch: &DeviceBatch,
    rope: &RopeTable,
    cache: &mut CudaKvCache,
    layer: usize,
    shape: AttentionShape,
) {
    let n = batch.n_tokens;
    let kv_width = shape.num_kv_heads * shape.head_dim;
    assert_eq!((q.rows, q.cols), (n, shape.num_heads * shape.head_dim), "rope: q vs the batch");
    assert_eq!((k.rows, k.cols), (n, kv_width), "rope: k does not match the batch");
    assert_eq!((v.rows, v.cols), (n, kv_width), "rope: v does not match the batch");
    let Some((params, cfg)) = launch_shape(batch, rope, cache, layer, shape) else { return };
    let table = pin_table(dev, rope);
    // SAFETY (with launch's): q holds n * heads * head_dim bf16, k and v n * kv_heads *
    // head_dim (asserted above), in qilin_rope_store_kv_bf16's order.
    unsafe {
        launch(dev, ptx::ROPE_STORE_KV_BF16, &params, cfg, batch, &table, cache, layer, |l| {
            l.arg(&mut q.data).arg(&mut k.data).arg(&v.data);
        })
    }
}

/// `Backend::rope_qkv_and_store_kv` in one kernel (qilin_rope_qkv_store_kv_bf16): reads
/// q, k and v from the columns of `qkv [n, (heads + 2*kv_heads) * head_dim]`, returns q
/// rotated and writes k rotated and v into layer `layer` of the cache, with no split
/// copies.
pub fn rope_qkv_and_store_kv(
    dev: &Device,
    qkv: &CudaTensor,
    batch: &DeviceBatch,
    rope: &RopeTable,
    cache: &mut CudaKvCache,
    layer: usize,
    shape: AttentionShape,
) -> CudaTensor {
    let n = batch.n_tokens;
    let q_width = shape.num_heads * shape.head_dim;
    let width = q_width + 2 * shape.num_kv_heads * shape.head_dim;
    assert_eq!((qkv.rows, qkv.cols), (n, width), "rope: qkv does not match the batch");
    let mut q = CudaTensor { data: dev.alloc_output(n * q_width), rows: n, cols: q_width };
    let Some((params, cfg)) = launch_shape(batch, rope, cache, layer, shape) else { return q };
    let table = pin_table(dev, rope);
    // SAFETY (with launch's): q holds n * heads * head_dim bf16 (allocated above), qkv n
    // rows of (heads + 2 * kv_heads) * head_dim (asserted), in
    // qilin_rope_qkv_store_kv_bf16's order.
    unsafe {
        launch(dev, ptx::ROPE_QKV_STORE_KV_BF16, &params, cfg, batch, &table, cache, layer, |l| {
            l.arg(&mut q.data).arg(&qkv.data);
        })
    };
    q
}

/// Launches a RoPE kernel: its params, then what `tensors` pushes (the kernel's own
/// tensors), then the cos/sin tables, positions, slots, and layer `layer`'s keys and
/// values, the arguments both kernels end with.
///
/// # Safety
/// `tensors` must push exactly the kernel's tensor arguments, in order, each holding the
/// values the kernel reads or writes for `batch.n_tokens` tokens.
#[allow(clippy::too_many_arguments)]
unsafe fn launch<'a>(
    dev: &'a Device,
    kernel: Kernel,
    params: &'a QilinRopeParams,
    cfg: LaunchConfig,
    batch: &'a DeviceBatch,
    table: &'a PinnedTable,
    cache: &'a mut CudaKvCache,
    layer: usize,
    tensors: impl FnOnce(&mut KernelLaunch<'a>),
) {
    let mut launch = dev.launch_builder(kernel);
    launch.arg(params);
    tensors(&mut launch);
    launch
        .arg(table.cos.as_ref())
        .arg(table.sin.as_ref())
        .arg(&batch.positions)
        .arg(&batch.slot_mapping)
        .arg(&mut cache.keys[layer])
        .arg(&mut cache.values[layer]);
    // SAFETY: cos and sin hold table_len * head_dim / 2 f32; positions and slot_mapping
    // n u32 (DeviceBatch of the same batch); keys and values num_slots * kv_heads *
    // head_dim bf16 (one layer of alloc_kv_cache; launch_shape checked the geometry).
    // Positions >= table_len and slots >= num_slots trap in the kernel. The caller
    // vouches for the tensors.
    check(unsafe { launch.launch(cfg) }, kernel.entry);
}

/// Checks what both RoPE kernels need of the batch, table and cache; their parameters and
/// launch geometry, or None for an empty batch (nothing to launch).
fn launch_shape(
    batch: &DeviceBatch,
    rope: &RopeTable,
    cache: &CudaKvCache,
    layer: usize,
    shape: AttentionShape,
) -> Option<(QilinRopeParams, LaunchConfig)> {
    let n = batch.n_tokens;
    let (heads, kv_heads, head_dim) = (shape.num_heads, shape.num_kv_heads, shape.head_dim);
    let cs = cache.shape;
    assert_eq!(
        (cs.num_kv_heads, cs.head_dim),
        (kv_heads, head_dim),
        "rope: KV cache geometry differs from the attention shape"
    );
    assert!(layer < cs.num_layers, "rope: layer {layer} of a {}-layer cache", cs.num_layers);
    assert_eq!(rope.half_dim() * 2, head_dim, "rope: table built for another head_dim");
    if n == 0 {
        return None;
    }
    // Positions are < context_len of their sequence; the kernel traps on any beyond.
    assert!(
        rope.len() >= batch.max_context_len.max(1),
        "rope: table covers {} positions, the batch reaches {} (RopeTable::ensure first)",
        rope.len(),
        batch.max_context_len
    );
    let threads = rope_block_threads(heads, kv_heads, head_dim).unwrap_or_else(|| {
        panic!(
            "rope: kernels/rope.cu cannot take {heads} heads / {kv_heads} KV heads of \
             head_dim {head_dim} (needs a multiple of 16)"
        )
    });
    let as_u32 = |value: usize, what: &str| {
        u32::try_from(value).unwrap_or_else(|_| panic!("rope: {what} = {value} exceeds u32"))
    };
    let params = QilinRopeParams {
        n_tokens: as_u32(n, "tokens"),
        num_heads: as_u32(heads, "heads"),
        num_kv_heads: as_u32(kv_heads, "KV heads"),
        head_dim: as_u32(head_dim, "head_dim"),
        table_len: as_u32(rope.len(), "table length"),
        num_slots: as_u32(cs.num_blocks * BLOCK_SIZE, "cache slots"),
    };
    assert!(n <= i32::MAX as usize, "rope: {n} tokens exceed the grid");
    let cfg = LaunchConfig {
        grid_dim: (n as u32, 1, 1),
        block_dim: (threads, 1, 1),
        shared_mem_bytes: 0,
    };
    Some((params, cfg))
}

/// The device copy of `rope` on `dev`'s context, uploaded when missing or stale.
fn device_table<'a>(
    dev: &Device,
    tables: &'a mut Vec<DeviceTable>,
    rope: &RopeTable,
) -> &'a DeviceTable {
    let ctx = Arc::as_ptr(&dev.ctx) as usize;
    let print = fingerprint(rope);
    if let Some(at) = tables.iter().position(|t| t.matches(ctx, rope, &print)) {
        return &tables[at];
    }
    // Replace this context's stale table (the engine's grew); free the oldest other one
    // when full. Dropping a slice frees it in stream order, after kernels that read it.
    tables.retain(|t| t.ctx != ctx);
    if tables.len() >= MAX_TABLES {
        tables.remove(0);
    }
    tables.push(DeviceTable {
        ctx,
        len: rope.len(),
        half: rope.half_dim(),
        fingerprint: print,
        cos: Arc::new(dev.upload(&rope.cos)),
        sin: Arc::new(dev.upload(&rope.sin)),
    });
    tables.last().expect("just pushed")
}

impl CudaKvCache {
    /// Keys and values of `layer`, each `[num_blocks * BLOCK_SIZE, kv_heads * head_dim]`,
    /// as f32 (exact: every bf16 is an f32); for tests and debugging. Synchronises.
    pub fn download_layer(&self, dev: &Device, layer: usize) -> (Vec<f32>, Vec<f32>) {
        assert!(layer < self.shape.num_layers, "layer {layer} of {}", self.shape.num_layers);
        let len =
            self.shape.num_blocks * BLOCK_SIZE * self.shape.num_kv_heads * self.shape.head_dim;
        let to_f32 = |slice: &CudaSlice<bf16>| {
            dev.download(slice, len).iter().map(|v| v.to_f32()).collect::<Vec<f32>>()
        };
        (to_f32(&self.keys[layer]), to_f32(&self.values[layer]))
    }
}
