//! Parity of kernels/norm.cu with its CPU twin (`qilin::backend::cpu::add_rms_norm_rows`)
//! on random inputs, fresh each run (the seed is printed), over shapes from the smallest
//! row to QILIN_NORM_MAX_HIDDEN, with outputs poisoned (NaN) before every launch.
//!
//! Runs only with `QILIN_GPU_TESTS=1`; then a missing driver, GPU or PTX is a failure.
//!
//! Tolerances. The twin works in f32 without intermediate rounding; the kernel stores
//! the residual sum as bf16 and normalises that. The sum of two bf16 values is exact in
//! f32, so the updated residual must equal bf16_rne(twin's residual) bit for bit. Each
//! output element carries the bf16 rounding of its residual (2^-9 relative), its own
//! output rounding (2^-9) and a slightly different inverse RMS (tree-order sum over
//! rounded values, rsqrtf): |gpu - cpu| <= 2^-7 |cpu| + 1e-6 bounds all three.

#[path = "common/gpu.rs"]
mod gpu_common;
use gpu_common::skip_without_gpu_tests;

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use cudarc::driver::{CudaContext, CudaFunction, CudaStream, LaunchConfig, PushKernelArg};
use cudarc::nvrtc::Ptx;
use half::bf16;
use qilin::backend::abi::{rms_norm_block_threads, QilinRmsNormParams};
use qilin::backend::cpu::add_rms_norm_rows;
use qilin::backend::ptx::{self, Kernel};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// (n_tokens, hidden): SmolLM2 (576), Qwen2.5-0.5B (896), Qwen2.5-7B (3584), Llama-8B
/// (4096), the one-vector-per-thread limit (8192), rows that need several vectors per
/// thread, and edge rows (one vector; not a multiple of the warp's 256 elements).
const SHAPES: &[(usize, usize)] = &[
    (1, 8),
    (3, 72),
    (1, 576),
    (17, 576),
    (5, 896),
    (1, 3584),
    (64, 3584),
    (9, 4096),
    (4, 8192),
    (3, 8200),
    (2, 16384),
    (1, 32768),
];

const EPS: f32 = 1e-6;
const NAN_BITS: u16 = 0x7fc0;

struct Gpu {
    stream: Arc<CudaStream>,
    fused: CudaFunction,
    plain: CudaFunction,
}

impl Gpu {
    /// Panics (fails the test) with the reason: with QILIN_GPU_TESTS=1 a GPU is required.
    fn open() -> Gpu {
        if !ptx::PTX_AVAILABLE {
            panic!("CPU-only build: no PTX embedded (run tools/setup)");
        }
        // SAFETY: only probes whether libcuda can be dlopened.
        let driver = unsafe { cudarc::driver::sys::is_culib_present() };
        assert!(driver, "QILIN_GPU_TESTS=1 but libcuda is not loadable (no NVIDIA driver)");
        let ctx = CudaContext::new(0).unwrap_or_else(|e| panic!("no CUDA device 0: {e}"));
        let module = ctx
            .load_module(Ptx::from_src(ptx::NORM_PTX))
            .unwrap_or_else(|e| panic!("driver rejected norm.ptx: {e}"));
        let load = |k: Kernel| {
            module.load_function(k.entry).unwrap_or_else(|e| panic!("{}: {e}", k.entry))
        };
        Gpu {
            stream: ctx.default_stream(),
            fused: load(ptx::FUSED_ADD_RMS_NORM_BF16),
            plain: load(ptx::RMS_NORM_BF16),
        }
    }
}

fn to_bits(values: &[f32]) -> Vec<u16> {
    values.iter().map(|&v| bf16::from_f32(v).to_bits()).collect()
}

fn to_f32(bits: &[u16]) -> Vec<f32> {
    bits.iter().map(|&b| bf16::from_bits(b).to_f32()).collect()
}

/// Values already rounded to bf16, so CPU and GPU start from identical inputs.
fn random_bf16(rng: &mut ChaCha8Rng, n: usize, lo: f32, hi: f32) -> Vec<f32> {
    (0..n).map(|_| bf16::from_f32(rng.random_range(lo..hi)).to_f32()).collect()
}

struct Case {
    n_tokens: usize,
    hidden: usize,
    residual: Vec<f32>,  // [n_tokens, hidden]
    x: Option<Vec<f32>>, // [n_tokens, hidden]
    weight: Vec<f32>,    // [hidden]
}

/// Launches one kernel on the case; returns (out, residual after the launch) as bf16 bits.
fn run_gpu(gpu: &Gpu, case: &Case, fused: bool) -> (Vec<u16>, Vec<u16>) {
    let stream = &gpu.stream;
    let n = case.n_tokens * case.hidden;
    let upload = |v: &[f32]| stream.clone_htod(&to_bits(v)).expect("upload");
    let mut residual = upload(&case.residual);
    let weight = upload(&case.weight);
    let mut out = stream.clone_htod(&vec![NAN_BITS; n]).expect("upload poison");
    let x = case.x.as_deref().map(upload);
    let threads = rms_norm_block_threads(case.hidden).expect("hidden accepted by the kernel");
    let params = QilinRmsNormParams {
        n_tokens: u32::try_from(case.n_tokens).expect("n_tokens fits u32"),
        hidden: u32::try_from(case.hidden).expect("hidden fits u32"),
        eps: EPS,
    };
    let cfg = LaunchConfig {
        grid_dim: (params.n_tokens, 1, 1),
        block_dim: (threads, 1, 1),
        shared_mem_bytes: 0,
    };
    let null: u64 = 0;
    let result = if fused {
        let mut launch = stream.launch_builder(&gpu.fused);
        launch.arg(&params).arg(&mut out).arg(&mut residual);
        match &x {
            Some(x) => launch.arg(x),
            None => launch.arg(&null),
        };
        launch.arg(&weight);
        // SAFETY: argument order and types follow qilin_fused_add_rms_norm_bf16; every
        // buffer holds n_tokens * hidden (weight: hidden) bf16 values.
        unsafe { launch.launch(cfg) }
    } else {
        let mut launch = stream.launch_builder(&gpu.plain);
        launch.arg(&params).arg(&mut out).arg(&residual).arg(&weight);
        // SAFETY: as above, for qilin_rms_norm_bf16 (input = residual, read only).
        unsafe { launch.launch(cfg) }
    };
    result.expect("launch");
    let out = stream.clone_dtoh(&out).expect("download out");
    let residual = stream.clone_dtoh(&residual).expect("download residual");
    (out, residual)
}

fn check_case(gpu: &Gpu, case: &Case, fused: bool, label: &str) -> f32 {
    let (out_gpu, residual_gpu) = run_gpu(gpu, case, fused);

    let mut residual_cpu = case.residual.clone();
    let mut out_cpu = vec![0.0f32; case.n_tokens * case.hidden];
    let x = if fused { case.x.as_deref() } else { None };
    add_rms_norm_rows(&mut residual_cpu, x, &case.weight, EPS, &mut out_cpu);

    let expected_residual = to_bits(&residual_cpu);
    if let Some(i) = (0..expected_residual.len()).find(|&i| residual_gpu[i] != expected_residual[i])
    {
        panic!(
            "{label}: residual[{}][{}] = {} on GPU, bf16(CPU) = {}",
            i / case.hidden,
            i % case.hidden,
            bf16::from_bits(residual_gpu[i]),
            bf16::from_bits(expected_residual[i])
        );
    }

    let out_gpu = to_f32(&out_gpu);
    let mut worst = 0.0f32;
    for (i, (&g, &c)) in out_gpu.iter().zip(&out_cpu).enumerate() {
        let tol = c.abs() / 128.0 + 1e-6;
        let err = (g - c).abs();
        assert!(
            err <= tol,
            "{label}: out[{}][{}] = {g} on GPU, {c} on CPU (|diff| {err} > {tol}); NaN means \
             the kernel never wrote it",
            i / case.hidden,
            i % case.hidden
        );
        worst = worst.max(err / c.abs().max(1e-6));
    }
    worst
}

#[test]
fn norm_kernels_match_the_cpu_twin() {
    if skip_without_gpu_tests() {
        return;
    }
    let gpu = Gpu::open();
    let seed = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64);
    eprintln!("seed {seed}");
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    for &(n_tokens, hidden) in SHAPES {
        let n = n_tokens * hidden;
        // Residual streams grow large in deep layers; sub-layer outputs are smaller.
        let case = Case {
            n_tokens,
            hidden,
            residual: random_bf16(&mut rng, n, -8.0, 8.0),
            x: Some(random_bf16(&mut rng, n, -2.0, 2.0)),
            weight: random_bf16(&mut rng, hidden, -1.5, 1.5),
        };
        let shape = format!("[{n_tokens}, {hidden}]");
        let add = check_case(&gpu, &case, true, &format!("fused add {shape}"));
        let no_x = Case { x: None, ..case };
        let fused_no_add = check_case(&gpu, &no_x, true, &format!("fused, x = NULL {shape}"));
        let plain = check_case(&gpu, &no_x, false, &format!("plain {shape}"));
        eprintln!(
            "{shape}: worst relative error fused {add:.2e}, x=NULL {fused_no_add:.2e}, \
             plain {plain:.2e}"
        );
    }
}
