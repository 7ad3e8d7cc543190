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

use cudarc::driver::{CudaSlice, LaunchConfig, PushKernelArg};
use half::bf16;

use super::batch_meta::DeviceBatch;
use super::device::{check, Device};
use super::tensor::{CudaKvCache, CudaTensor};
use crate::backend::abi::{rope_block_threads, QilinRopeParams};
use crate::backend::{ptx, AttentionShape, BLOCK_SIZE};
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
    _cos: Arc<CudaSlice<f32>>,
    _sin: Arc<CudaSlice<f32>>,
}

/// The device copy of `rope` that `rope_and_store_kv` reads (uploaded if it is not yet),
/// kept alive for as long as the result is.
pub fn pin_table(dev: &Device, rope: &RopeTable) -> PinnedTable {
    let mut tables = TABLES.lock().unwrap_or_else(|e| e.into_inner());
    let table = device_table(dev, &mut tables, rope);
    PinnedTable { _cos: table.cos.clone(), _sin: table.sin.clone() }
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
    let (heads, kv_heads, head_dim) = (shape.num_heads, shape.num_kv_heads, shape.head_dim);
    let kv_width = kv_heads * head_dim;
    assert_eq!((q.rows, q.cols), (n, heads * head_dim), "rope: q does not match the batch");
    assert_eq!((k.rows, k.cols), (n, kv_width), "rope: k does not match the batch");
    assert_eq!((v.rows, v.cols), (n, kv_width), "rope: v does not match the batch");
    let cs = cache.shape;
    assert_eq!(
        (cs.num_kv_heads, cs.head_dim),
        (kv_heads, head_dim),
        "rope: KV cache geometry differs from the attention shape"
    );
    assert!(layer < cs.num_layers, "rope: layer {layer} of a {}-layer cache", cs.num_layers);
    assert_eq!(rope.half_dim() * 2, head_dim, "rope: table built for another head_dim");
    if n == 0 {
        return;
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

    // The lock is held until the launch is queued, so no other thread can drop the table
    // in between (a later drop is ordered after the kernel on the stream).
    let mut tables = TABLES.lock().unwrap_or_else(|e| e.into_inner());
    let table = device_table(dev, &mut tables, rope);
    let keys = &mut cache.keys[layer];
    let values = &mut cache.values[layer];
    let mut launch = dev.stream.launch_builder(dev.function(ptx::ROPE_STORE_KV_BF16));
    launch
        .arg(&params)
        .arg(&mut q.data)
        .arg(&mut k.data)
        .arg(&v.data)
        .arg(table.cos.as_ref())
        .arg(table.sin.as_ref())
        .arg(&batch.positions)
        .arg(&batch.slot_mapping)
        .arg(keys)
        .arg(values);
    // SAFETY: argument order and types follow qilin_rope_store_kv_bf16. q holds
    // n * heads * head_dim bf16, k and v n * kv_heads * head_dim; cos and sin
    // table_len * head_dim / 2 f32; positions and slot_mapping n u32 (DeviceBatch of the
    // same batch); keys and values num_slots * kv_heads * head_dim bf16 (one layer of
    // alloc_kv_cache). Positions >= table_len and slots >= num_slots trap in the kernel.
    check(unsafe { launch.launch(cfg) }, "launching qilin_rope_store_kv_bf16");
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
