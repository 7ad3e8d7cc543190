//! Decode steps replayed through CUDA graphs: a decode step of Qwen2.5-7B is ~400 small
//! launches, and at batch 1 the host's time to queue them is a visible share of the
//! step. A graph queues them all with one launch.
//!
//! Which steps: decode-only batches (one new token per sequence, every row wanting
//! logits, in order) of at most `MAX_GRAPH_BATCH` sequences and `MAX_GRAPH_CONTEXT`
//! tokens of context. Everything else (prefill, chunked prefill, larger batches) runs
//! eagerly. On by default (verified on an H200, bench/notes.md); QILIN_CUDA_GRAPHS=0 runs
//! every step eagerly.
//!
//! How: a graph bakes in its launch parameters and pointers, so each is captured for a
//! key of (batch bucket, context bucket) and reads the step's tokens and metadata from
//! buffers of its own (`GraphInputs`), rewritten before every launch. A batch smaller
//! than its bucket gets padding rows: token 0 at position 0 with `NO_SLOT` (rotated, not
//! stored) and a context of one key (block 0, read and discarded), so no real sequence's
//! cache is touched. The decode-attention plan is sized for the bucket's context; the
//! kernels skip the splits beyond each sequence's own context.
//!
//! The first step of a key runs eagerly through those buffers (its logits are that
//! step's; it also uploads the RoPE table and grows the scratch buffers the capture then
//! uses), then the same ops are captured. The graph's own allocations (every activation)
//! are freed inside it; its logits are copied into one buffer shared by every graph,
//! `[MAX_GRAPH_BATCH, vocab]`, from which each step copies its rows out.

use std::collections::{HashMap, HashSet};
use std::panic::AssertUnwindSafe;
use std::sync::Arc;

use cudarc::driver::{CudaGraph, CudaSlice};
use half::bf16;

use super::batch_meta::DeviceBatch;
use super::device::{check, Device};
use super::rope::{self, PinnedTable};
use super::tensor::CudaTensor;
use super::CudaBackend;
use crate::backend::{run_eagerly, Batch, StepFn, BLOCK_SIZE, NO_SLOT};
use crate::model::rope::RopeTable;

/// Largest decode batch replayed through a graph; beyond it a step's launches are a
/// negligible share of its time.
pub const MAX_GRAPH_BATCH: usize = 256;
/// Longest context replayed through a graph (Qwen2.5's 128K with YaRN).
pub const MAX_GRAPH_CONTEXT: usize = 131_072;
/// Shortest context bucket: below it a larger plan costs nothing measurable.
const MIN_CONTEXT_BUCKET: usize = 512;
/// Batch buckets above 8 (up to 8, every size has its own graph: the GEMV kernels'
/// cost grows with the token count, so padding there is not free).
const LARGE_BATCH_BUCKETS: [usize; 9] = [16, 24, 32, 48, 64, 96, 128, 192, 256];
/// Graphs kept at once; the least recently used one is dropped first. There are 17 batch
/// buckets and 9 context buckets; a server's contexts usually span a few, so this keeps
/// every key in use without churn. Each graph holds its inputs (block tables of
/// `batch * context / 16` u32: all 153 keys together ~60 MB) and the driver's node data;
/// the activations of graphs launched on one stream share physical memory.
const MAX_GRAPHS: usize = 128;

/// Which graph a step replays through.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct GraphKey {
    /// Rows of the captured batch (the step's sequences, padded up).
    pub batch: usize,
    /// Context the decode plan was sized for; every sequence's is at most this.
    pub context: usize,
}

/// The batch bucket of `n` decode sequences, if graphs take that many.
pub fn batch_bucket(n: usize) -> Option<usize> {
    match n {
        0 => None,
        1..=8 => Some(n),
        _ => LARGE_BATCH_BUCKETS.iter().copied().find(|&b| b >= n),
    }
}

/// The context bucket of a longest context of `ctx` tokens, if graphs take it.
pub fn context_bucket(ctx: usize) -> Option<usize> {
    let bucket = ctx.max(MIN_CONTEXT_BUCKET).checked_next_power_of_two()?;
    (bucket <= MAX_GRAPH_CONTEXT).then_some(bucket)
}

impl GraphKey {
    /// The key of a decode-only step: every sequence has one new token, in order, and
    /// every row wants its logits, in order. None for any other batch.
    pub fn for_batch(batch: &Batch) -> Option<GraphKey> {
        let n = batch.n_tokens();
        let decode_only = n > 0
            && batch.seqs.len() == n
            && batch.seqs.iter().enumerate().all(|(i, s)| s.start == i && s.len == 1)
            && batch.logits_from_every_row();
        if !decode_only {
            return None;
        }
        let context = batch.seqs.iter().map(|s| s.context_len).max().unwrap_or(0);
        Some(GraphKey { batch: batch_bucket(n)?, context: context_bucket(context)? })
    }

    /// Block-table columns of the captured batch.
    fn stride(self) -> usize {
        self.context / BLOCK_SIZE
    }
}

/// `batch` (a decode-only step of `key`) with padding rows up to `key.batch`: token 0 at
/// position 0, not stored (`NO_SLOT`), attending to one key of block 0.
pub fn padded(batch: &Batch, key: GraphKey) -> Batch {
    let mut out = batch.clone();
    for _ in batch.n_tokens()..key.batch {
        let row = out.token_ids.len();
        out.token_ids.push(0);
        out.positions.push(0);
        out.slot_mapping.push(NO_SLOT);
        out.generated.push(true);
        out.seqs.push(crate::backend::SeqSlice {
            start: row,
            len: 1,
            context_len: 1,
            block_table: vec![0],
        });
        out.logits_rows.push(row as u32);
    }
    out
}

/// What a captured graph reads: the step's token ids, the logits rows (always 0..n) and
/// the batch metadata, at the addresses the graph was captured with.
pub struct GraphInputs {
    /// Rows of the captured batch.
    pub n: usize,
    pub ids: CudaSlice<u32>,  // [n]
    pub rows: CudaSlice<u32>, // [n] = 0..n
    pub meta: Arc<DeviceBatch>,
}

impl GraphInputs {
    fn upload(dev: &Device, padded: &Batch, key: GraphKey) -> GraphInputs {
        let rows: Vec<u32> = (0..key.batch as u32).collect();
        GraphInputs {
            n: key.batch,
            ids: dev.upload(&padded.token_ids),
            rows: dev.upload(&rows),
            meta: Arc::new(DeviceBatch::upload_padded(dev, padded, key.stride(), key.context)),
        }
    }

    fn refresh(&mut self, dev: &Device, padded: &Batch) {
        dev.upload_into(&padded.token_ids, &mut self.ids);
        let meta = Arc::get_mut(&mut self.meta)
            .expect("a graph's batch metadata is only shared while its step runs");
        meta.refresh(dev, padded);
    }
}

/// A graph and what must outlive it.
struct Captured {
    graph: SendGraph,
    inputs: GraphInputs,
    /// The RoPE table it reads, should the engine's grow and replace it.
    _rope: PinnedTable,
    last_used: u64,
}

/// A `CudaGraph`, which cudarc leaves `!Send` because graph objects are not internally
/// synchronised.
struct SendGraph(CudaGraph);
// SAFETY: a graph is only touched under the `StepGraphs` mutex (launch, drop), which
// serialises every call on it, as the CUDA documentation asks.
unsafe impl Send for SendGraph {}

/// The backend's graphs, behind `CudaBackend::graphs`.
#[derive(Default)]
pub struct StepGraphs {
    graphs: HashMap<GraphKey, Captured>,
    /// Keys whose capture failed: they run eagerly (one warning each).
    failed: HashSet<GraphKey>,
    /// `[MAX_GRAPH_BATCH, vocab]`: where every graph leaves its logits.
    logits: Option<(CudaSlice<bf16>, usize)>,
    clock: u64,
}

impl StepGraphs {
    /// How many graphs are captured now.
    pub fn len(&self) -> usize {
        self.graphs.len()
    }

    pub fn is_empty(&self) -> bool {
        self.graphs.is_empty()
    }

    /// The shared logits buffer for a vocabulary of `vocab`, allocated on first use.
    fn logits_buffer(&mut self, dev: &Device, vocab: usize) -> &mut CudaSlice<bf16> {
        if let Some((_, have)) = &self.logits {
            assert_eq!(*have, vocab, "CUDA graphs: one backend serves one model's vocabulary");
        }
        let (buffer, _) =
            self.logits.get_or_insert_with(|| (dev.alloc_output(MAX_GRAPH_BATCH * vocab), vocab));
        buffer
    }

    /// The first `n` rows of the shared logits, copied out (the next step overwrites it).
    fn output(&self, dev: &Device, n: usize) -> CudaTensor {
        let (buffer, vocab) = self.logits.as_ref().expect("a graph was captured");
        copy_rows(dev, buffer, n, *vocab)
    }

    fn evict_to(&mut self, keep: usize) {
        while self.graphs.len() > keep {
            let oldest = self.graphs.iter().min_by_key(|(_, c)| c.last_used).map(|(k, _)| *k);
            match oldest {
                Some(key) => self.graphs.remove(&key),
                None => break,
            };
        }
    }
}

/// `Backend::run_step` of the CUDA backend with graphs on.
pub fn run_step(
    backend: &CudaBackend,
    batch: &Batch,
    rope: &mut RopeTable,
    step: &mut StepFn<'_, CudaTensor>,
) -> Option<CudaTensor> {
    let Some(key) = GraphKey::for_batch(batch) else {
        return run_eagerly(batch, rope, step);
    };
    let dev = &backend.dev;
    let mut graphs = backend.graphs.lock().unwrap_or_else(|e| e.into_inner());
    if graphs.failed.contains(&key) {
        return run_eagerly(batch, rope, step);
    }
    rope.ensure(key.context);
    let padded = padded(batch, key);
    graphs.clock += 1;
    let clock = graphs.clock;
    if let Some(captured) = graphs.graphs.get_mut(&key) {
        captured.last_used = clock;
        captured.inputs.refresh(dev, &padded);
        check(captured.graph.0.launch(), "launching a CUDA graph");
        return Some(graphs.output(dev, batch.n_tokens()));
    }

    // First step of this key: eagerly, through the inputs the graph will read.
    let inputs = GraphInputs::upload(dev, &padded, key);
    backend.bind(inputs);
    let logits = step(&padded, rope).expect("a decode step wants logits for every row");
    let vocab = logits.cols;
    let out = first_rows(dev, logits, batch.n_tokens());
    let pinned_rope = rope::pin_table(dev, rope);
    let shared = graphs.logits_buffer(dev, vocab);
    // A capture that fails (an op the driver will not record, a launcher that copies to
    // the host) costs its key the graph, not the step: this step's logits are computed.
    let captured = std::panic::catch_unwind(AssertUnwindSafe(|| {
        dev.capture(|| {
            let logits = step(&padded, rope).expect("a decode step wants logits for every row");
            dev.copy_within_device(&logits.data, shared, key.batch * vocab);
        })
    }));
    let inputs = backend.unbind();
    let why = match captured {
        Ok(Ok(((), graph))) => {
            graphs.evict_to(MAX_GRAPHS - 1);
            let captured =
                Captured { graph: SendGraph(graph), inputs, _rope: pinned_rope, last_used: clock };
            graphs.graphs.insert(key, captured);
            return Some(out);
        }
        Ok(Err(e)) => e.to_string(),
        Err(_) => "a launcher panicked while capturing (message above)".to_string(),
    };
    tracing::warn!("CUDA graph capture of decode steps {key:?} failed ({why}); they run eagerly");
    graphs.failed.insert(key);
    Some(out)
}

/// The first `n` rows of `x` (all of it, without a copy, when it has `n`).
fn first_rows(dev: &Device, x: CudaTensor, n: usize) -> CudaTensor {
    if x.rows == n {
        return x;
    }
    copy_rows(dev, &x.data, n, x.cols)
}

/// A new `[n, cols]` tensor holding the first `n` rows of `src` (`[>= n, cols]`).
fn copy_rows(dev: &Device, src: &CudaSlice<bf16>, n: usize, cols: usize) -> CudaTensor {
    let mut data = dev.alloc_output(n * cols);
    dev.copy_within_device(src, &mut data, n * cols);
    CudaTensor { data, rows: n, cols }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode_batch(contexts: &[usize]) -> Batch {
        let mut batch = Batch::default();
        for (i, &ctx) in contexts.iter().enumerate() {
            let blocks = ctx.div_ceil(BLOCK_SIZE);
            let table: Vec<u32> = (0..blocks as u32).map(|b| 1 + i as u32 * 1000 + b).collect();
            batch.push_seq(&[7 + i as u32], ctx - 1, &table, true);
        }
        batch
    }

    #[test]
    fn buckets_cover_every_size_once_and_never_shrink() {
        let mut last = 0;
        for n in 1..=MAX_GRAPH_BATCH {
            let b = batch_bucket(n).expect("every size up to the largest has a bucket");
            assert!(b >= n && b >= last, "{n} -> {b}");
            assert!(n > 8 || b == n, "small batches are not padded: {n} -> {b}");
            // Padding stays under half the bucket above 8.
            assert!(n <= 8 || 2 * n > b, "{n} -> {b}");
            last = b;
        }
        assert_eq!(batch_bucket(0), None);
        assert_eq!(batch_bucket(MAX_GRAPH_BATCH + 1), None);
        assert_eq!(context_bucket(1), Some(MIN_CONTEXT_BUCKET));
        assert_eq!(context_bucket(513), Some(1024));
        assert_eq!(context_bucket(MAX_GRAPH_CONTEXT), Some(MAX_GRAPH_CONTEXT));
        assert_eq!(context_bucket(MAX_GRAPH_CONTEXT + 1), None);
    }

    #[test]
    fn only_decode_steps_get_a_key() {
        let batch = decode_batch(&[5, 700, 17]);
        assert_eq!(GraphKey::for_batch(&batch), Some(GraphKey { batch: 3, context: 1024 }));
        // A prefill chunk, a row without logits, logits out of order, nothing at all.
        let mut prefill = decode_batch(&[5]);
        prefill.push_seq(&[1, 2, 3], 0, &[9], true);
        assert_eq!(GraphKey::for_batch(&prefill), None);
        let mut quiet = decode_batch(&[5, 6]);
        quiet.logits_rows.pop();
        assert_eq!(GraphKey::for_batch(&quiet), None);
        let mut swapped = decode_batch(&[5, 6]);
        swapped.logits_rows.reverse();
        assert_eq!(GraphKey::for_batch(&swapped), None);
        assert_eq!(GraphKey::for_batch(&Batch::default()), None);
        assert_eq!(GraphKey::for_batch(&decode_batch(&[MAX_GRAPH_CONTEXT + 1])), None);
    }

    #[test]
    fn padding_rows_store_nothing_and_read_one_key() {
        let batch = decode_batch(&[40, 3000, 2, 9, 100, 1, 64, 65, 77]);
        let key = GraphKey::for_batch(&batch).expect("a decode step");
        assert_eq!(key, GraphKey { batch: 16, context: 4096 });
        let padded = padded(&batch, key);
        assert_eq!(padded.n_tokens(), 16);
        assert_eq!(padded.logits_rows, (0..16).collect::<Vec<u32>>());
        // The real rows are untouched, so the step's own rows compute what they would.
        assert_eq!(padded.token_ids[..9], batch.token_ids[..]);
        assert_eq!(padded.slot_mapping[..9], batch.slot_mapping[..]);
        assert_eq!(padded.seqs[..9], batch.seqs[..]);
        for (row, seq) in padded.seqs.iter().enumerate().skip(9) {
            assert_eq!(padded.slot_mapping[row], NO_SLOT);
            assert_eq!((seq.start, seq.len, seq.context_len), (row, 1, 1));
            assert_eq!(padded.positions[row], 0);
        }
        // The padded batch is still a decode step of the same key.
        assert_eq!(GraphKey::for_batch(&padded), Some(key));
        assert!(padded.seqs.iter().all(|s| s.context_len <= key.stride() * BLOCK_SIZE));
    }
}
