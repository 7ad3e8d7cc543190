//! The measuring half of `qilin bench kernels` (kernels.rs lists the ops): CUDA-event
//! timing of one op with L2 emptied before each call, the device's two ceilings (copy
//! bandwidth, bf16 GEMM rate), the roofline of an op against them, and the report rows.

use std::panic::{catch_unwind, AssertUnwindSafe};

use cudarc::cublas::{Gemm, GemmConfig};
use cudarc::driver::{sys, CudaSlice};
use half::bf16;

use super::gpu_model::DeviceRandom;
use super::kernels::{KernelReport, OpResult};
use crate::backend::cuda::{argmax_rows_on_device, CudaTensor, Device};

/// Bytes written before each timed call to push everything else out of L2 (50 MB on an
/// H100, 60 MB on an H200).
const FLUSH_BYTES: usize = 256 << 20;
/// The read flush's buffer: 128 MiB of bf16, over twice the largest L2 (an H200's 60 MB).
const FLUSH_ROWS: usize = 1024;
const FLUSH_COLS: usize = 65536;

/// Times a closure of stream work with CUDA events.
pub(super) struct Timer<'a> {
    pub(super) dev: &'a Device,
    pub(super) flush: Flush,
    pub(super) iters: usize,
}

/// How the L2 cache is emptied before a timed call (kernels.rs's module docs).
pub(super) enum Flush {
    /// Read: `[FLUSH_ROWS, FLUSH_COLS]` bf16 zeros, swept by the device argmax.
    Read(CudaTensor),
    /// Write: a memset of FLUSH_BYTES.
    Write(CudaSlice<u8>),
}

impl Flush {
    pub(super) fn describe(&self) -> &'static str {
        match self {
            Flush::Read(_) => "read of 128 MiB (clean lines)",
            Flush::Write(_) => "memset of 256 MiB (dirty lines; QILIN_BENCH_FLUSH_WRITE=1)",
        }
    }

    pub(super) fn new(dev: &Device) -> Flush {
        if std::env::var("QILIN_BENCH_FLUSH_WRITE").as_deref() == Ok("1") {
            Flush::Write(dev.alloc::<u8>(FLUSH_BYTES))
        } else {
            let data = dev.alloc::<bf16>(FLUSH_ROWS * FLUSH_COLS);
            Flush::Read(CudaTensor { data, rows: FLUSH_ROWS, cols: FLUSH_COLS })
        }
    }
}

impl<'a> Timer<'a> {
    /// Median time of one call in microseconds, after one untimed call; the panic
    /// message if any call panics.
    pub(super) fn time(&mut self, flush: bool, op: &mut dyn FnMut()) -> Result<f64, String> {
        let result = catch_unwind(AssertUnwindSafe(|| -> Result<f64, String> {
            let cuda = |what: &str, r: Result<(), cudarc::driver::DriverError>| {
                r.map_err(|e| format!("CUDA error while {what}: {e}"))
            };
            op();
            cuda("synchronizing after the warm-up call", self.dev.stream.synchronize())?;
            let ctx = &self.dev.ctx;
            let mut events = Vec::with_capacity(self.iters);
            // The read flush's ids, alive until the stream is done with them.
            let mut flush_ids = Vec::with_capacity(self.iters);
            for _ in 0..self.iters {
                let new = || ctx.new_event(Some(sys::CUevent_flags::CU_EVENT_DEFAULT));
                let start = new().map_err(|e| format!("creating an event: {e}"))?;
                let end = new().map_err(|e| format!("creating an event: {e}"))?;
                if flush {
                    match &mut self.flush {
                        Flush::Read(zeros) => {
                            flush_ids.push(argmax_rows_on_device(self.dev, zeros))
                        }
                        Flush::Write(bytes) => {
                            cuda("flushing L2", self.dev.stream.memset_zeros(bytes))?
                        }
                    }
                }
                cuda("recording an event", start.record(&self.dev.stream))?;
                op();
                cuda("recording an event", end.record(&self.dev.stream))?;
                events.push((start, end));
            }
            cuda("synchronizing", self.dev.stream.synchronize())?;
            drop(flush_ids);
            let mut times = Vec::with_capacity(events.len());
            for (start, end) in &events {
                let ms = start.elapsed_ms(end).map_err(|e| format!("reading an event: {e}"))?;
                times.push(ms as f64 * 1e3);
            }
            times.sort_by(|a, b| a.total_cmp(b));
            Ok(times[times.len() / 2])
        }));
        match result {
            Ok(r) => r,
            Err(payload) => Err(panic_message(payload.as_ref())),
        }
    }
}

fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        format!("panicked: {s}")
    } else if let Some(s) = payload.downcast_ref::<String>() {
        format!("panicked: {s}")
    } else {
        "panicked".into()
    }
}

pub(super) struct Bench<'a> {
    pub(super) timer: Timer<'a>,
    pub(super) copy_bytes_per_s: f64,
    pub(super) mm_flops_per_s: f64,
    pub(super) report: KernelReport,
    pub(super) json: Option<&'a std::path::Path>,
    /// `--only`: measure just the ops whose "op shape" contains one of these.
    pub(super) only: &'a [String],
}

impl Bench<'_> {
    pub(super) fn measure(
        &mut self,
        op: &str,
        shape: String,
        bytes: f64,
        flops: f64,
        f: &mut dyn FnMut(),
    ) {
        let name = format!("{op} {shape}");
        let mut only = self.only.iter().filter(|o| !o.is_empty()).peekable();
        if only.peek().is_some() && !only.any(|o| name.contains(o.as_str())) {
            return;
        }
        let t_mem = bytes / self.copy_bytes_per_s;
        let t_math = flops / self.mm_flops_per_s;
        let floor_us = t_mem.max(t_math) * 1e6;
        let bound = if t_mem >= t_math { "memory" } else { "compute" };
        let (time_us, error) = match self.timer.time(true, f) {
            Ok(t) => (Some(t), None),
            Err(e) => (None, Some(e)),
        };
        let per_s = |amount: f64, unit: f64| time_us.map(|t| amount / (t * 1e-6) / unit);
        let result = OpResult {
            op: op.to_string(),
            shape,
            bytes,
            flops,
            time_us,
            gb_per_s: per_s(bytes, 1e9),
            tflops: (flops > 0.0).then(|| per_s(flops, 1e12)).flatten(),
            floor_us,
            bound,
            of_floor: time_us.map(|t| floor_us / t),
            error,
        };
        print_row(&result);
        self.report.ops.push(result);
        // After every op, so a run stopped by its timeout still leaves its figures.
        if let Some(path) = self.json {
            let text = serde_json::to_string_pretty(&self.report).unwrap_or_default() + "\n";
            if let Err(e) = std::fs::write(path, text) {
                eprintln!("writing {}: {e}", path.display());
            }
        }
    }
}

pub(super) fn print_header() {
    println!(
        "{:<22} {:<34} {:>10} {:>9} {:>9} {:>10} {:>8} {:>8}",
        "op", "shape", "time us", "GB/s", "TFLOP/s", "floor us", "bound", "of floor"
    );
}

fn print_row(r: &OpResult) {
    let opt = |v: Option<f64>, prec: usize| match v {
        Some(v) => format!("{v:.prec$}"),
        None => "-".into(),
    };
    match &r.error {
        Some(e) => println!("{:<22} {:<34} FAILED: {e}", r.op, r.shape),
        None => println!(
            "{:<22} {:<34} {:>10} {:>9} {:>9} {:>10.2} {:>8} {:>7}%",
            r.op,
            r.shape,
            opt(r.time_us, 2),
            opt(r.gb_per_s, 0),
            opt(r.tflops, 1),
            r.floor_us,
            r.bound,
            opt(r.of_floor.map(|f| f * 100.0), 0),
        ),
    }
}

/// (copy bytes/s counting read + write, bf16 GEMM FLOP/s).
pub(super) fn ceilings(
    dev: &Device,
    timer: &mut Timer,
    rand: &mut DeviceRandom,
) -> anyhow::Result<(f64, f64)> {
    let bytes = 1usize << 30;
    let src = dev.alloc::<u8>(bytes);
    let mut dst = dev.alloc::<u8>(bytes);
    let copy_us = timer
        .time(false, &mut || {
            if let Err(e) = dev.stream.memcpy_dtod(&src, &mut dst) {
                panic!("device-to-device copy: {e}");
            }
        })
        .map_err(|e| anyhow::anyhow!("copy bandwidth: {e}"))?;
    drop((src, dst));
    let n = 8192usize;
    let a = rand.tensor(n, n, 1.0);
    let b = rand.tensor(n, n, 1.0);
    let mut c = dev.alloc::<bf16>(n * n);
    let cfg = GemmConfig {
        transa: cudarc::cublas::sys::cublasOperation_t::CUBLAS_OP_N,
        transb: cudarc::cublas::sys::cublasOperation_t::CUBLAS_OP_N,
        m: n as i32,
        n: n as i32,
        k: n as i32,
        alpha: bf16::ONE,
        lda: n as i32,
        ldb: n as i32,
        beta: bf16::ZERO,
        ldc: n as i32,
    };
    let gemm_us = timer
        .time(false, &mut || {
            // SAFETY: a, b and c each hold n * n bf16 values, column-major n x n with
            // leading dimension n, as cfg says.
            if let Err(e) = unsafe { dev.blas.gemm(cfg, &a.data, &b.data, &mut c) } {
                panic!("cuBLAS bf16 GEMM: {e}");
            }
        })
        .map_err(|e| anyhow::anyhow!("matrix rate: {e}"))?;
    let copy = 2.0 * bytes as f64 / (copy_us * 1e-6);
    let mm = 2.0 * (n as f64).powi(3) / (gemm_us * 1e-6);
    Ok((copy, mm))
}
