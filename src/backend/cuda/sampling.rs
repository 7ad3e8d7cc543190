//! Sampling on the device: greedy argmax of each logits row (kernels/sampling.cu,
//! `qilin_argmax_bf16`; CPU twin `backend::cpu::argmax_row` through
//! `CpuBackend::argmax_rows`) and temperature / top-k / top-p / min-p sampling with a
//! uniform drawn on the host (`qilin_sample_bf16`; CPU twin `CpuBackend::sample_rows`,
//! i.e. `engine::sampler::sample_row`). The engine uses them when every sequence of a step
//! needs nothing but its token (no logprobs, no penalties), so only one u32 per sequence
//! crosses to the host instead of `[n, vocab]` logits. With penalties (the default since
//! the H200 run at b908988; `FastPaths::device_penalties`, QILIN_CUDA_DEVICE_PENALTIES=0 to
//! send them to the host sampler), `qilin_apply_penalties_bf16` (kernels/penalties.cu; CPU
//! twin `backend::cpu::penalize_row_bf16`) first penalises each row's listed tokens in
//! place, rounding each to bf16, on the same stream after the step (never in a graph).

use cudarc::driver::{CudaSlice, LaunchConfig};

use super::device::{check, Device};
use super::tensor::CudaTensor;
use crate::backend::abi::{
    QilinArgmaxParams, QilinPenaltyParams, QilinPenaltyRow, QilinPenaltyToken, QilinSampleParams,
    QilinSampleRow, QilinSampleSplitParams, QilinSampleSplitPart, QILIN_ARGMAX_THREADS,
    QILIN_ATTN_DECODE_PIPE_MAX_COUNTERS, QILIN_PENALTY_THREADS, QILIN_SAMPLE_SPLIT_CAP,
    QILIN_SAMPLE_SPLIT_CHUNK, QILIN_SAMPLE_SPLIT_MAX_BLOCKS, QILIN_SAMPLE_SPLIT_MAX_ROWS,
    QILIN_SAMPLE_THREADS,
};
use crate::backend::{ptx, PenaltyBatch, RowSampling};
use crate::engine::sampler::inv_temperature;

// SAFETY: #[repr(C)] plain old data from kernels/abi.h (bindgen), passed by value.
unsafe impl cudarc::driver::DeviceRepr for QilinSampleParams {}
// SAFETY: #[repr(C)] plain old data from kernels/abi.h (bindgen), copied to the device as
// an array the kernel reads.
unsafe impl cudarc::driver::DeviceRepr for QilinSampleRow {}
// SAFETY: as above (by value).
unsafe impl cudarc::driver::DeviceRepr for QilinSampleSplitParams {}
// SAFETY: as above; device scratch the split kernels write and read, never the host.
unsafe impl cudarc::driver::DeviceRepr for QilinSampleSplitPart {}
// SAFETY: as above (by value).
unsafe impl cudarc::driver::DeviceRepr for QilinPenaltyParams {}
// SAFETY: as above (arrays the kernel reads).
unsafe impl cudarc::driver::DeviceRepr for QilinPenaltyRow {}
// SAFETY: as above.
unsafe impl cudarc::driver::DeviceRepr for QilinPenaltyToken {}

/// `ids [n]`: the greedy choice of each row of `logits [n, vocab]`.
pub fn argmax_rows(dev: &Device, logits: &CudaTensor) -> Vec<u32> {
    let n = logits.rows;
    if n == 0 {
        return Vec::new();
    }
    let ids = match split_path(dev, n, logits.cols) {
        Some(geometry) => split_rows(dev, logits, None, geometry),
        None => argmax_rows_on_device(dev, logits),
    };
    dev.download(&ids, n)
}

/// `ids [n]` by qilin_argmax_bf16 (one block per row, whatever `paths.sample_split`
/// says), on the device, queued on the stream and not waited for: the benchmark's L2
/// flush (a read of a large buffer) must not stop the host while it runs, or the timed
/// op after it would be measured from a GPU idling until the host's launch arrives.
pub fn argmax_rows_on_device(dev: &Device, logits: &CudaTensor) -> CudaSlice<u32> {
    let (n, vocab) = (logits.rows, logits.cols);
    assert!(n > 0, "argmax: no rows (an empty grid is not a launch)");
    assert!(logits.data.len() >= n * vocab, "argmax: logits buffer shorter than [{n}, {vocab}]");
    let params = QilinArgmaxParams {
        rows: u32::try_from(n).expect("argmax: rows fit u32"),
        cols: u32::try_from(vocab).expect("argmax: vocab fits u32"),
    };
    let mut ids = dev.alloc_output::<u32>(n); // [n]
    let cfg = LaunchConfig {
        grid_dim: (params.rows, 1, 1),
        block_dim: (QILIN_ARGMAX_THREADS, 1, 1),
        shared_mem_bytes: 0,
    };
    let mut launch = dev.launch_builder(ptx::ARGMAX_BF16);
    launch.arg(&params).arg(&mut ids).arg(&logits.data);
    // SAFETY: argument order and types follow qilin_argmax_bf16; ids holds n u32, logits
    // n * vocab bf16 (asserted above); one block per row writes that row's id.
    check(unsafe { launch.launch(cfg) }, "launching qilin_argmax_bf16");
    ids
}

/// The kernel's form of a row: 1/T computed as the host sampler does (0 for greedy).
fn device_row(row: &RowSampling) -> QilinSampleRow {
    QilinSampleRow {
        u: row.u,
        inv_t: inv_temperature(row.temperature).unwrap_or(0.0),
        top_k: row.top_k,
        top_p: row.top_p,
        min_p: row.min_p,
    }
}

/// `ids [n]`: the sampled token of each row of `logits [n, vocab]` (`Backend::sample_rows`).
pub fn sample_rows(dev: &Device, logits: &CudaTensor, rows: &[RowSampling]) -> Vec<u32> {
    let (n, vocab) = (logits.rows, logits.cols);
    assert_eq!(rows.len(), n, "sample_rows: one RowSampling per logits row");
    if n == 0 {
        return Vec::new();
    }
    assert!(logits.data.len() >= n * vocab, "sample: logits buffer shorter than [{n}, {vocab}]");
    if let Some(geometry) = split_path(dev, n, vocab) {
        let ids = split_rows(dev, logits, Some(rows), geometry);
        return dev.download(&ids, n);
    }
    let params = QilinSampleParams {
        rows: u32::try_from(n).expect("sample: rows fit u32"),
        cols: u32::try_from(vocab).expect("sample: vocab fits u32"),
    };
    let meta: Vec<QilinSampleRow> = rows.iter().map(device_row).collect();
    let meta = dev.upload(&meta); // [n]
    let mut ids = dev.alloc_output::<u32>(n); // [n]
    let cfg = LaunchConfig {
        grid_dim: (params.rows, 1, 1),
        block_dim: (QILIN_SAMPLE_THREADS, 1, 1),
        shared_mem_bytes: 0,
    };
    let mut launch = dev.launch_builder(ptx::SAMPLE_BF16);
    launch.arg(&params).arg(&mut ids).arg(&meta).arg(&logits.data);
    // SAFETY: argument order and types follow qilin_sample_bf16; ids and meta hold n
    // entries, logits n * vocab bf16 (asserted above); one block per row writes that row's id.
    check(unsafe { launch.launch(cfg) }, "launching qilin_sample_bf16");
    dev.download(&ids, n)
}

impl super::CudaBackend {
    /// The split kernels whatever `paths.sample_split` says (benchmarks): argmax (`rows`
    /// None) or sampling of every row of `logits`; None (nothing launched) for rows they
    /// cannot take (`split_geometry`).
    pub fn split_rows(
        &self,
        logits: &CudaTensor,
        rows: Option<&[RowSampling]>,
    ) -> Option<Vec<u32>> {
        let geometry = split_geometry(logits.cols)?;
        if logits.rows == 0 || rows.is_some_and(|r| r.len() != logits.rows) {
            return None;
        }
        let ids = split_rows(&self.dev, logits, rows, geometry);
        Some(self.dev.download(&ids, logits.rows))
    }
}

// The split kernels share the merge counters, one per row of a launch.
const _: () = assert!(QILIN_SAMPLE_SPLIT_MAX_ROWS <= QILIN_ATTN_DECODE_PIPE_MAX_COUNTERS);

/// How the split kernels cut a row of `cols` logits: `(splits, chunk)`, `splits` blocks of
/// `chunk` elements (a multiple of 8, at most QILIN_SAMPLE_SPLIT_CHUNK), every block
/// starting inside the row; None for rows the one-block kernels must take (empty, or
/// longer than QILIN_SAMPLE_SPLIT_MAX_BLOCKS chunks).
pub fn split_geometry(cols: usize) -> Option<(u32, u32)> {
    if cols == 0 {
        return None;
    }
    let splits = cols.div_ceil(QILIN_SAMPLE_SPLIT_CHUNK as usize);
    if splits > QILIN_SAMPLE_SPLIT_MAX_BLOCKS as usize {
        return None;
    }
    let chunk = cols.div_ceil(splits).next_multiple_of(8);
    Some((splits as u32, chunk as u32))
}

/// Most rows the dispatch gives the split kernels. H200, `qilin bench kernels` at 771cd47,
/// Qwen's vocabulary, us one block per row / split: at 1 and 64 rows the split kernels won
/// argmax (53 / 24, 56 / 32), top-k sampling (274 / 79, 260 / 199) and top-p over peaked
/// logits (509 / 99, 497 / 256); at 256 rows, where one block per row already fills the
/// GPU, they lost all but the last (argmax 61 / 77, top-k 516 / 644). Top-p alone over
/// flat random logits lost at every batch (696 / 766 at 1 row), a case real logits rarely
/// are.
pub const SPLIT_MAX_BATCH: usize = 64;

/// The split kernels' geometry for `rows` rows of `cols` logits when the dispatch takes
/// them (`paths.sample_split`, at most SPLIT_MAX_BATCH rows, and rows they can cut).
fn split_path(dev: &Device, rows: usize, cols: usize) -> Option<(u32, u32)> {
    split_geometry(cols).filter(|_| dev.paths.sample_split && rows <= SPLIT_MAX_BATCH)
}

/// The split kernels (kernels/sampling_split.cu) over `logits [n, vocab]`: argmax
/// (`rows` None) or sampling as `rows` say, QILIN_SAMPLE_SPLIT_MAX_ROWS rows per launch;
/// `ids [n]` queued on the stream.
pub fn split_rows(
    dev: &Device,
    logits: &CudaTensor,
    rows: Option<&[RowSampling]>,
    (splits, chunk): (u32, u32),
) -> CudaSlice<u32> {
    let (n, vocab) = (logits.rows, logits.cols);
    assert!(n > 0, "split sampling: no rows (an empty grid is not a launch)");
    assert!(logits.data.len() >= n * vocab, "split sampling: logits shorter than [{n}, {vocab}]");
    assert!(rows.is_none_or(|r| r.len() == n), "split sampling: one RowSampling per row");
    let per_launch = QILIN_SAMPLE_SPLIT_MAX_ROWS as usize;
    let mut ids = dev.alloc_output::<u32>(n); // [n]

    // Scratch for one launch: [rows, splits] parts and [rows, splits, CAP] candidates.
    let parts = dev.alloc_output::<QilinSampleSplitPart>(n.min(per_launch) * splits as usize);
    let cands = rows.map(|_| {
        dev.alloc_output::<u32>(n.min(per_launch) * (splits * QILIN_SAMPLE_SPLIT_CAP) as usize)
    });
    let meta = rows.map(|rows| dev.upload(&rows.iter().map(device_row).collect::<Vec<_>>()));
    let counters = dev.merge_counters();
    for first in (0..n).step_by(per_launch) {
        let count = (n - first).min(per_launch);
        let params = QilinSampleSplitParams {
            rows: count as u32,
            cols: u32::try_from(vocab).expect("sample: vocab fits u32"),
            splits,
            chunk,
        };
        let cfg = LaunchConfig {
            grid_dim: (params.rows, splits, 1),
            block_dim: (QILIN_SAMPLE_THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        let mut ids_part = ids.slice_mut(first..first + count);
        let logits_part = logits.data.slice(first * vocab..(first + count) * vocab);
        let meta_part = meta.as_ref().map(|meta| meta.slice(first..first + count));
        let kernel = if rows.is_some() { ptx::SAMPLE_SPLIT_BF16 } else { ptx::ARGMAX_SPLIT_BF16 };
        let mut launch = dev.launch_builder(kernel);
        launch.arg(&params).arg(&mut ids_part);
        if let Some(meta_part) = &meta_part {
            launch.arg(meta_part);
        }
        launch.arg(&parts);
        if let Some(cands) = &cands {
            launch.arg(cands);
        }
        launch.arg(&*counters).arg(&logits_part);
        // SAFETY: argument order and types follow qilin_{argmax,sample}_split_bf16; ids and
        // meta hold these `count` rows' entries, logits their count * vocab values, parts
        // and cands count * splits (* CAP) entries; split_geometry's (splits, chunk) meet
        // the kernels' contract, count <= QILIN_SAMPLE_SPLIT_MAX_ROWS counters, all zero
        // (every launch leaves them so).
        check(unsafe { launch.launch(cfg) }, "launching the split sampling kernel");
    }
    drop(counters);
    ids
}

/// Applies `penalties` (one row per logits row) to `logits [n, vocab]` in place
/// (qilin_apply_penalties_bf16; twin: `backend::penalize_rows_host`). Costs one upload of
/// 20 bytes per row and 8 per entry, and one launch of one thread per entry.
pub fn apply_penalties(dev: &Device, logits: &mut CudaTensor, penalties: &PenaltyBatch) {
    let (n, vocab) = (logits.rows, logits.cols);
    assert_eq!(penalties.rows.len(), n, "apply_penalties: one RowPenalties per logits row");
    assert!(logits.data.len() >= n * vocab, "penalties: logits buffer shorter than [{n}, {vocab}]");
    let fits = |x: usize| u32::try_from(x).expect("penalties: entry offsets fit u32");
    let meta: Vec<QilinPenaltyRow> = (penalties.rows.iter())
        .map(|r| QilinPenaltyRow {
            offset: fits(r.tokens.start),
            len: fits(r.tokens.len()),
            repetition: r.repetition,
            presence: r.presence,
            frequency: r.frequency,
        })
        .collect();
    let longest = meta.iter().map(|m| m.len).max().unwrap_or(0);
    if longest == 0 {
        return;
    }
    let end = penalties.rows.iter().map(|r| r.tokens.end).max().unwrap_or(0);
    assert!(end <= penalties.tokens.len(), "penalties: a row's entries past the tokens array");
    let params = QilinPenaltyParams {
        rows: u32::try_from(n).expect("penalties: rows fit u32"),
        cols: u32::try_from(vocab).expect("penalties: vocab fits u32"),
    };
    let meta = dev.upload(&meta); // [n]
    let tokens = dev.upload(&penalties.tokens); // [sum of the rows' entries]
    let cfg = LaunchConfig {
        grid_dim: (longest.div_ceil(QILIN_PENALTY_THREADS), params.rows, 1),
        block_dim: (QILIN_PENALTY_THREADS, 1, 1),
        shared_mem_bytes: 0,
    };
    let mut launch = dev.launch_builder(ptx::APPLY_PENALTIES_BF16);
    launch.arg(&params).arg(&meta).arg(&tokens).arg(&mut logits.data);
    // SAFETY: argument order and types follow qilin_apply_penalties_bf16; meta holds n rows
    // whose entries lie in tokens (asserted above), logits n * vocab bf16; the entries of a
    // row are distinct ids (PenaltyBatch's contract), so no two threads write one logit.
    check(unsafe { launch.launch(cfg) }, "launching qilin_apply_penalties_bf16");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_geometry_covers_each_row_with_blocks_that_start_inside_it() {
        let limit = (QILIN_SAMPLE_SPLIT_CHUNK * QILIN_SAMPLE_SPLIT_MAX_BLOCKS) as usize;
        let mut cols: Vec<usize> = (1..3000).collect();
        cols.extend((12_280..12_300).chain([49_152, 128_256, 151_936, 152_064, limit - 1, limit]));
        for c in cols {
            let (splits, chunk) = split_geometry(c).expect("rows up to the limit split");
            let (splits, chunk) = (splits as usize, chunk as usize);
            assert!((1..=QILIN_SAMPLE_SPLIT_MAX_BLOCKS as usize).contains(&splits), "{c}");
            assert!(chunk % 8 == 0 && chunk <= QILIN_SAMPLE_SPLIT_CHUNK as usize, "{c}: {chunk}");
            assert!(splits * chunk >= c, "{c}: {splits} x {chunk} leaves keys unread");
            assert!((splits - 1) * chunk < c, "{c}: the last of {splits} x {chunk} is empty");
        }
        assert_eq!(split_geometry(0), None);
        assert_eq!(split_geometry(limit + 1), None);
        assert_eq!(split_geometry(152_064), Some((13, 11_704)));
    }
}
