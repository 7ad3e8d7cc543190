//! Launchers of kernels/elementwise.cu: embedding gather, row gather, column split and
//! SiLU-and-multiply. CPU twins: `CpuBackend::{embedding, gather_rows, split_cols,
//! silu_mul}` (backend/cpu/mod.rs).

use cudarc::driver::{CudaSlice, LaunchConfig};

use super::device::{check, Device};
use super::tensor::{CudaLinear, CudaTensor, LinearWeight};
use crate::backend::abi::{
    elementwise_blocks_per_row, QilinCopyColsParams, QilinGatherRowsParams, QilinSiluMulParams,
    QILIN_ELEMENTWISE_THREADS, VEC_ELEMS,
};
use crate::backend::ptx::{self, Kernel};

/// A size as the u32 the kernels take; larger ones are launcher bugs.
fn as_u32(value: usize, what: &str) -> u32 {
    u32::try_from(value)
        .unwrap_or_else(|_| panic!("{what} = {value} does not fit the kernel's u32"))
}

/// One block row per grid.x (at most 2^31 - 1 rows), `units` work units per row.
fn row_config(n_rows: usize, units: usize) -> LaunchConfig {
    assert!(n_rows <= i32::MAX as usize, "{n_rows} rows exceed the grid's x dimension");
    LaunchConfig {
        grid_dim: (n_rows as u32, elementwise_blocks_per_row(units), 1),
        block_dim: (QILIN_ELEMENTWISE_THREADS, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// Work units of a row copy: 16-byte vectors when the kernel can use them (it also
/// needs 16-byte aligned bases, which device allocations are), else elements.
fn copy_units(len: usize, vectorised: bool) -> usize {
    if vectorised {
        len / VEC_ELEMS
    } else {
        len
    }
}

/// The row indices of a gather, checked on the host either way: uploaded for the launch,
/// or already on the device, where a captured graph reads them.
#[derive(Clone, Copy)]
pub enum RowIndex<'a> {
    Host(&'a [u32]),
    /// `host`'s values, held in the first `host.len()` values of `on_device`.
    Device {
        on_device: &'a CudaSlice<u32>,
        host: &'a [u32],
    },
}

/// `out[r] = src[index[r]]` with qilin_embedding_bf16 or qilin_gather_rows_bf16; every
/// index must be < `src_rows` (checked here, on the host, for a host index).
fn gather(
    dev: &Device,
    kernel: Kernel,
    src: &CudaSlice<half::bf16>, // [src_rows, cols]
    src_rows: usize,
    cols: usize,
    index: RowIndex<'_>, // [n]
    what: &str,
) -> CudaTensor {
    let host = match index {
        RowIndex::Host(rows) | RowIndex::Device { host: rows, .. } => rows,
    };
    if let Some((i, &bad)) = host.iter().enumerate().find(|(_, &r)| r as usize >= src_rows) {
        panic!("{what}: index {bad} at position {i} is out of range (only {src_rows} rows)");
    }
    let n = host.len();
    let mut out = CudaTensor { data: dev.alloc_output(n * cols), rows: n, cols };
    if n == 0 || cols == 0 {
        return out;
    }
    let params = QilinGatherRowsParams {
        n_rows: as_u32(n, "rows"),
        cols: as_u32(cols, "cols"),
        src_rows: as_u32(src_rows, "source rows"),
    };
    let cfg = row_config(n, copy_units(cols, cols.is_multiple_of(VEC_ELEMS)));
    let uploaded;
    let index = match index {
        RowIndex::Host(rows) => {
            uploaded = dev.upload(rows);
            &uploaded
        }
        RowIndex::Device { on_device, .. } => {
            assert!(n <= on_device.len(), "{what}: {n} indices in a buffer of {}", on_device.len());
            on_device
        }
    };
    let mut launch = dev.launch_builder(kernel);
    launch.arg(&params).arg(&mut out.data).arg(src).arg(index);
    // SAFETY: argument order and types follow the kernel (params, out, src, index); out
    // holds n * cols bf16, src src_rows * cols bf16, index n u32, each < src_rows
    // (checked above).
    check(unsafe { launch.launch(cfg) }, &format!("launching {} ({what})", kernel.entry));
    out
}

/// Rows `ids` of the embedding table `[vocab, hidden]` -> `[ids.len(), hidden]`.
/// Panics on an id outside the vocabulary (the engine validates prompts before this).
pub fn embedding(dev: &Device, table: &CudaLinear, ids: RowIndex<'_>) -> CudaTensor {
    let (vocab, hidden) = (table.out_features, table.in_features);
    let LinearWeight::Bf16(weight) = &table.weight else {
        panic!("embedding tables are bf16 on the device (Backend::upload_embedding)")
    };
    gather(dev, ptx::EMBEDDING_BF16, weight, vocab, hidden, ids, "embedding")
}

/// `gate_up [n, 2*ffn]` (gate first) -> `silu(gate) * up`, `[n, ffn]`.
pub fn silu_mul(dev: &Device, gate_up: &CudaTensor) -> CudaTensor {
    assert!(gate_up.cols.is_multiple_of(2), "silu_mul: gate_up has an odd width {}", gate_up.cols);
    let (n, ffn) = (gate_up.rows, gate_up.cols / 2);
    let mut out = CudaTensor { data: dev.alloc_output(n * ffn), rows: n, cols: ffn };
    if n == 0 || ffn == 0 {
        return out;
    }
    let params = QilinSiluMulParams { n_rows: as_u32(n, "rows"), ffn: as_u32(ffn, "ffn") };
    let cfg = row_config(n, copy_units(ffn, ffn % VEC_ELEMS == 0));
    let mut launch = dev.launch_builder(ptx::SILU_MUL_BF16);
    launch.arg(&params).arg(&mut out.data).arg(&gate_up.data);
    // SAFETY: argument order and types follow qilin_silu_mul_bf16; out holds n * ffn
    // bf16, gate_up n * 2 * ffn.
    check(unsafe { launch.launch(cfg) }, "launching qilin_silu_mul_bf16");
    out
}

/// Splits `x [n, sum(widths)]` into column blocks `[n, widths[i]]`: one launch per
/// non-empty part.
pub fn split_cols(dev: &Device, x: &CudaTensor, widths: &[usize]) -> Vec<CudaTensor> {
    let total: usize = widths.iter().sum();
    assert_eq!(total, x.cols, "split_cols: widths {widths:?} do not add up to {} columns", x.cols);
    let n = x.rows;
    let mut col0 = 0;
    let mut parts = Vec::with_capacity(widths.len());
    for &width in widths {
        let mut out = CudaTensor { data: dev.alloc_output(n * width), rows: n, cols: width };
        if n > 0 && width > 0 {
            let params = QilinCopyColsParams {
                n_rows: as_u32(n, "rows"),
                src_cols: as_u32(x.cols, "columns"),
                col0: as_u32(col0, "first column"),
                width: as_u32(width, "width"),
            };
            let vectorised = (width | col0 | x.cols).is_multiple_of(VEC_ELEMS);
            let cfg = row_config(n, copy_units(width, vectorised));
            let mut launch = dev.launch_builder(ptx::COPY_COLS_BF16);
            launch.arg(&params).arg(&mut out.data).arg(&x.data);
            // SAFETY: argument order and types follow qilin_copy_cols_bf16; out holds
            // n * width bf16, x n * x.cols, and col0 + width <= x.cols (the widths sum
            // to x.cols).
            check(unsafe { launch.launch(cfg) }, "launching qilin_copy_cols_bf16");
        }
        parts.push(out);
        col0 += width;
    }
    parts
}

/// Rows `rows` of x, in that order (repeats allowed).
pub fn gather_rows(dev: &Device, x: &CudaTensor, rows: RowIndex<'_>) -> CudaTensor {
    gather(dev, ptx::GATHER_ROWS_BF16, &x.data, x.rows, x.cols, rows, "gather_rows")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_unit_per_thread_and_at_least_one_block() {
        let threads = QILIN_ELEMENTWISE_THREADS as usize;
        assert_eq!(elementwise_blocks_per_row(0), 1);
        assert_eq!(elementwise_blocks_per_row(1), 1);
        assert_eq!(elementwise_blocks_per_row(threads), 1);
        assert_eq!(elementwise_blocks_per_row(threads + 1), 2);
        // Qwen2.5-7B's FFN row in 16-byte vectors.
        assert_eq!(elementwise_blocks_per_row(18944 / VEC_ELEMS), 10);
        assert_eq!(elementwise_blocks_per_row(usize::MAX / 2), 65535);
    }

    #[test]
    fn scalar_rows_count_elements() {
        assert_eq!(copy_units(3584, true), 448);
        assert_eq!(copy_units(37, false), 37);
    }
}
