//! One CUDA device as the backend uses it: context, the stream every op is queued on,
//! cuBLAS, and every kernel of the embedded PTX loaded once at start-up.

use std::any::Any;
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use cudarc::cublas::CudaBlas;
use cudarc::driver::sys::{CUfunction_attribute, CUgraphInstantiate_flags, CUstreamCaptureMode};
use cudarc::driver::{
    CudaContext, CudaEvent, CudaFunction, CudaGraph, CudaSlice, CudaStream, DevicePtrMut,
    DeviceRepr, DriverError, PinnedHostSlice, ValidAsZeroBits,
};
use cudarc::nvrtc::Ptx;
use half::bf16;

use super::attention::AttentionSwitches;
use super::pdl;
use super::CudaError;
use crate::backend::abi::{
    QILIN_ATTN_DECODE_PIPE_HD128_SMEM_BYTES, QILIN_ATTN_DECODE_PIPE_HD64_SMEM_BYTES,
    QILIN_ATTN_DECODE_PIPE_MAX_COUNTERS, QILIN_ATTN_PREFILL_V2_HD128_SMEM_BYTES,
    QILIN_QGEMM_MMA_SMEM_BYTES,
};
use crate::backend::ptx::{self, Kernel};

pub struct Device {
    pub ctx: Arc<CudaContext>,
    /// Every launch and copy goes on this stream, so ops are ordered without events. A
    /// stream of our own, not the legacy default stream, which cannot be captured into a
    /// CUDA graph.
    pub stream: Arc<CudaStream>,
    pub blas: CudaBlas,
    /// cuBLAS's workspace, set once (`[BLAS_WORKSPACE_BYTES]`): without one, cuBLAS
    /// would allocate its own, which a captured graph must not do.
    _blas_workspace: CudaSlice<u8>,
    /// f32 scratch of the cuBLAS path of biased linear layers (linear.rs), grown on
    /// demand and kept: `[up to BIAS_SCRATCH_MAX_VALUES]`.
    scratch_f32: Mutex<CudaSlice<f32>>,
    /// bf16 scratch of the cuBLAS path of quantized linear layers (dequantized weight
    /// rows), sized at upload so that the KV pool, sized afterwards, leaves room for it.
    scratch_bf16: Mutex<CudaSlice<bf16>>,
    /// Two page-locked buffers of `[STAGING_VALUES]` bf16 that device-to-host copies go
    /// through, allocated on first use: a copy into pageable memory is staged by the
    /// driver anyway, and a fresh `Vec` faults in its pages on every call (on the H200
    /// VM, [64, 152064] logits took 24 ms that way; the decode step itself takes 6).
    staging: Mutex<Option<Staging>>,
    /// Scratch buffers replaced by larger ones after a graph was captured: a graph keeps
    /// the addresses it was captured with, so they are kept for the device's lifetime.
    retired_scratch: Mutex<Vec<Box<dyn Any + Send>>>,
    /// Kernels whose dynamic shared memory could not be raised to what they need on this
    /// device: never launched (`launchable`).
    smem_refused: Vec<Kernel>,
    /// The split-merge counters of the pipelined decode-attention kernel, the split-K
    /// GEMV and split sampling (`[QILIN_ATTN_DECODE_PIPE_MAX_COUNTERS]` u32): zeroed
    /// here, once, and left zero by every launch (the merging block resets its counter),
    /// so a captured graph can replay a kernel without a memset; one stream orders every
    /// launch that uses them.
    merge_counters: Mutex<CudaSlice<u32>>,
    /// The attention's bisecting switches (attention.rs), read from the environment at
    /// open; tests set them per path.
    attention_switches: Mutex<AttentionSwitches>,
    /// Set once any graph has been captured (`capture`).
    graphs_exist: AtomicBool,
    /// While a graph is being captured: copies to or from the host and synchronisation,
    /// which a capture cannot contain, panic instead of corrupting it.
    capturing: AtomicBool,
    functions: HashMap<(&'static str, &'static str), CudaFunction>,
    /// Entries loaded from PTX rewritten for programmatic dependent launch (pdl.rs) whose
    /// markers keep its contract: the only ones `launch` gives the attribute. Empty
    /// unless `paths.pdl` and an sm_90+ device.
    pdl_entries: HashSet<String>,
    /// Which verified fast paths the dispatch takes, read from the environment at open.
    pub paths: FastPaths,
}

/// Fast paths that a GPU run verified (parity with the CPU twin) and measured faster than
/// what they replace (bench/notes.md, 2026-11-26 H200 runs at 12332f8 and 1bf3ca5). Each
/// is on unless its variable is `0`, which brings back the path it replaced: for bisecting
/// a failure or comparing speeds, not for production. The exception is opt-in: a path
/// not yet verified on a GPU is off unless its variable is `1` (`device_penalties`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FastPaths {
    /// `QILIN_CUDA_GEMV_MMA`: qilin_gemv_mma_bf16 for bf16 layers at
    /// 4..=8 tokens where it wins (`linear::gemv_mma_wins`).
    pub gemv_mma: bool,
    /// `QILIN_CUDA_QGEMV_SMALL`: qilin_qgemv_small_w{4,8}_bf16 for quantized layers at
    /// 1..=QILIN_QGEMV_SMALL_MAX_TOKENS tokens.
    pub qgemv_small: bool,
    /// `QILIN_CUDA_QGEMV_MMA`: qilin_qgemv_mma_w4_bf16 for 4-bit layers in groups of a
    /// power of two >= 128 at 1..=8 tokens (before the small-batch kernel).
    pub qgemv_mma: bool,
    /// `QILIN_CUDA_QGEMV_MMA2=1` (opt-in, unverified): qilin_qgemv_mma_splitk_w4_bf16
    /// instead of qilin_qgemv_mma_w4_bf16 for the layers that one takes.
    pub qgemv_mma2: bool,
    /// `QILIN_CUDA_GRAPHS`: decode steps replayed through CUDA graphs (graph.rs).
    pub graphs: bool,
    /// `QILIN_CUDA_QGEMV_MMA_WIDE`: 9 to `QGEMV_MMA_CHUNKED_MAX_TOKENS` tokens of 4-bit
    /// layers through qilin_qgemv_mma_w4_bf16 in chunks of 8 instead of dequantization +
    /// cuBLAS (verified on an H200 at b908988: int4 decode at batch 16 5.14 ms against
    /// 14.30, at 32 8.69 against 14.51).
    pub qgemv_mma_wide: bool,
    /// `QILIN_CUDA_DEVICE_PENALTIES`: steps with repetition / presence / frequency
    /// penalties are sampled on the device (qilin_apply_penalties_bf16, then
    /// qilin_sample_bf16) instead of on the host (verified on an H200 at b908988; Qwen's
    /// defaults at batch 256: 0.74 ms on the device against 13.2 ms of host sampling plus
    /// 5.6 ms of logits copy).
    pub device_penalties: bool,
    /// Unless `QILIN_CUDA_SAMPLE_SPLIT=0`: argmax and sampling of up to
    /// `sampling::SPLIT_MAX_BATCH` rows, each up to 16 chunks long, by one block per chunk
    /// (qilin_argmax_split_bf16, qilin_sample_split_bf16) instead of one block per row
    /// (verified on an H200 at 771cd47: Qwen's defaults at batch 1, 0.08 ms against 0.29).
    pub sample_split: bool,
    /// Unless `QILIN_CUDA_ROPE_QKV=0`: RoPE and the K/V cache write read q, k and v from
    /// the fused qkv projection (qilin_rope_qkv_store_kv_bf16) instead of three column
    /// copies and qilin_rope_store_kv_bf16 (verified on an H200 at 771cd47: 64 decode
    /// tokens 6.0 us against 14.4, 2048 prefill tokens 15.1 against 31.2).
    pub rope_qkv: bool,
    /// Unless `QILIN_CUDA_QGEMM=0`: the large quantized layers at the token counts where
    /// the tensor-core GEMM qilin_qgemm_w{4,8}_bf16 won (`quant_linear::qgemm_wins`)
    /// instead of dequantization + cuBLAS (verified on an H200 at 771cd47), and int4
    /// layers of gate_up's size at 25-32 tokens instead of four chunks of the tensor-core
    /// GEMV (`quant_linear::qgemm_beats_chunks`, from the kernel rows at 00b0a12).
    pub qgemm: bool,
    /// Unless `QILIN_CUDA_GEMV_CUBLAS=0`: bf16 layers at 4-8 tokens through cuBLAS instead
    /// of the GEMVs (`linear::gemv_cublas_wins`; H200, 771cd47: cuBLAS won every
    /// Qwen2.5-7B layer there).
    pub gemv_cublas: bool,
    /// `QILIN_CUDA_QGEMM_MMA=1` (opt-in, unverified): 4-bit layers of gate_up's size at
    /// 9..=64 tokens through qilin_qgemm_mma_w4_bf16, the GEMM on the tensor-core GEMV's
    /// path (`quant_gemm_mma::qgemm_mma_takes`), instead of the GEMV's chunks or
    /// qilin_qgemm_w4_bf16.
    pub qgemm_mma: bool,
    /// `QILIN_CUDA_PDL=1` (opt-in, unverified; sm_90+): every kernel of ours launched with
    /// programmatic dependent launch, so that it is placed, and a GEMV's first weights
    /// requested, while the kernel before it finishes (pdl.rs). Read when the device
    /// opens, which loads the rewritten PTX; turning it off later only drops the launch
    /// attribute.
    pub pdl: bool,
}

impl Default for FastPaths {
    fn default() -> FastPaths {
        FastPaths {
            gemv_mma: true,
            qgemv_small: true,
            qgemv_mma: true,
            qgemv_mma2: false,
            graphs: true,
            qgemv_mma_wide: true,
            device_penalties: true,
            sample_split: true,
            rope_qkv: true,
            qgemm: true,
            gemv_cublas: true,
            qgemm_mma: false,
            pdl: false,
        }
    }
}

impl FastPaths {
    fn from_env() -> FastPaths {
        let on = |name: &str| std::env::var(name).as_deref() != Ok("0");
        let opt_in = |name: &str| std::env::var(name).as_deref() == Ok("1");
        FastPaths {
            gemv_mma: on("QILIN_CUDA_GEMV_MMA"),
            qgemv_small: on("QILIN_CUDA_QGEMV_SMALL"),
            qgemv_mma: on("QILIN_CUDA_QGEMV_MMA"),
            qgemv_mma2: opt_in("QILIN_CUDA_QGEMV_MMA2"),
            graphs: on("QILIN_CUDA_GRAPHS"),
            qgemv_mma_wide: on("QILIN_CUDA_QGEMV_MMA_WIDE"),
            device_penalties: on("QILIN_CUDA_DEVICE_PENALTIES"),
            sample_split: on("QILIN_CUDA_SAMPLE_SPLIT"),
            rope_qkv: on("QILIN_CUDA_ROPE_QKV"),
            qgemm: on("QILIN_CUDA_QGEMM"),
            gemv_cublas: on("QILIN_CUDA_GEMV_CUBLAS"),
            qgemm_mma: opt_in("QILIN_CUDA_QGEMM_MMA"),
            pdl: opt_in("QILIN_CUDA_PDL"),
        }
    }
}

/// Bytes of cuBLAS's workspace: what NVIDIA recommends for Hopper (32 MiB), more than
/// earlier architectures use.
const BLAS_WORKSPACE_BYTES: usize = 32 << 20;

impl Device {
    /// Opens device `ordinal` and loads every kernel in `ptx::KERNELS`; fails with the
    /// reason when there is no driver, no device, no PTX, or the driver rejects it.
    pub fn open(ordinal: usize) -> Result<Device, CudaError> {
        if !ptx::PTX_AVAILABLE {
            return Err(CudaError::NoPtx);
        }
        // SAFETY: only probes whether libcuda can be dlopened.
        if !unsafe { cudarc::driver::sys::is_culib_present() } {
            return Err(CudaError::NoDriver);
        }
        let ctx = CudaContext::new(ordinal)
            .map_err(|e| CudaError::Driver(format!("opening CUDA device {ordinal}: {e}")))?;
        // SAFETY: every op, copy and free goes on the one stream below, which orders them;
        // cudarc's per-buffer events (two created per allocation) would only add work, and
        // waits on events recorded before a capture would invalidate it.
        unsafe { ctx.disable_event_tracking() };
        let stream = ctx
            .new_stream()
            .map_err(|e| CudaError::Driver(format!("creating a CUDA stream: {e}")))?;
        let blas = CudaBlas::new(stream.clone())
            .map_err(|e| CudaError::Driver(format!("starting cuBLAS: {e}")))?;
        let blas_workspace = set_blas_workspace(&stream, &blas)?;
        let scratch_f32 = empty_scratch(&stream)?;
        let scratch_bf16 = empty_scratch(&stream)?;
        let paths = FastPaths::from_env();
        let (major, _) = ctx
            .compute_capability()
            .map_err(|e| CudaError::Driver(format!("reading the compute capability: {e}")))?;
        let pdl = paths.pdl && major >= 9;
        let mut pdl_entries = HashSet::new();
        let mut modules = HashMap::new();
        let mut functions = HashMap::new();
        for kernel in ptx::KERNELS {
            if !modules.contains_key(kernel.module) {
                let source = ptx::module_ptx(kernel.module).ok_or(CudaError::NoPtx)?;
                let (text, mut dependent) = pdl::module_text(kernel.module, source, pdl);
                let rewritten = text != source;
                let module = match ctx.load_module(Ptx::from_src(text)) {
                    Ok(module) => Ok(module),
                    // PDL is an optimisation: a rewritten module the driver refuses loads
                    // as built, its kernels launched without it.
                    Err(e) if rewritten => {
                        tracing::warn!(
                            "{}.ptx rewritten for PDL was refused ({e}); loading it as built",
                            kernel.module
                        );
                        dependent.clear();
                        ctx.load_module(Ptx::from_src(source))
                    }
                    Err(e) => Err(e),
                }
                .map_err(|e| {
                    CudaError::Driver(format!("the driver rejected {}.ptx: {e}", kernel.module))
                })?;
                modules.insert(kernel.module, module);
                pdl_entries.extend(dependent);
            }
            let function = modules[kernel.module].load_function(kernel.entry).map_err(|e| {
                CudaError::Driver(format!("kernel {} missing from the PTX: {e}", kernel.entry))
            })?;
            functions.insert((kernel.module, kernel.entry), function);
        }
        // Dynamic shared memory beyond the 48 KiB a launch gets without asking.
        let raise_smem = |kernel: Kernel, bytes: u32| {
            functions[&(kernel.module, kernel.entry)].set_attribute(
                CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                bytes as i32,
            )
        };
        // The head_dim-128 prefill kernel's Q tile and two K/V buffers (68 KiB), and the
        // pipelined decode kernels' rings of K/V buffers: a device whose blocks cannot
        // have that much (sm_86/sm_89: 99 KiB, under the head_dim-128 ring's 102 KiB)
        // takes the plain-FMA prefill kernel or the mma decode kernel instead of failing
        // to open. And the int4 GEMM on the GEMV's path (its three x stages, 52 KiB),
        // without which the dispatch keeps the GEMV's chunks and qilin_qgemm_w4_bf16.
        let mut smem_refused = Vec::new();
        for (kernel, bytes) in [
            (ptx::ATTENTION_PREFILL_V2_HD128_BF16, QILIN_ATTN_PREFILL_V2_HD128_SMEM_BYTES),
            (ptx::ATTENTION_DECODE_PIPE_HD128_BF16, QILIN_ATTN_DECODE_PIPE_HD128_SMEM_BYTES),
            (ptx::ATTENTION_DECODE_PIPE_HD64_BF16, QILIN_ATTN_DECODE_PIPE_HD64_SMEM_BYTES),
            (ptx::QGEMM_MMA_W4_BF16, QILIN_QGEMM_MMA_SMEM_BYTES),
        ] {
            if let Err(e) = raise_smem(kernel, bytes) {
                tracing::debug!("{} unavailable: {bytes} B of shared memory: {e}", kernel.entry);
                smem_refused.push(kernel);
            }
        }
        let merge_counters = stream
            .alloc_zeros::<u32>(QILIN_ATTN_DECODE_PIPE_MAX_COUNTERS as usize)
            .map_err(|e| CudaError::Driver(format!("allocating merge counters: {e}")))?;
        Ok(Device {
            ctx,
            stream,
            blas,
            _blas_workspace: blas_workspace,
            scratch_f32,
            scratch_bf16,
            staging: Mutex::new(None),
            retired_scratch: Mutex::new(Vec::new()),
            smem_refused,
            merge_counters: Mutex::new(merge_counters),
            attention_switches: Mutex::new(AttentionSwitches::from_env()),
            graphs_exist: AtomicBool::new(false),
            capturing: AtomicBool::new(false),
            functions,
            pdl_entries,
            paths,
        })
    }

    /// Whether `kernel` is launched with programmatic dependent launch (`paths.pdl`, and
    /// its module was loaded rewritten with the entry's markers checked).
    pub fn dependent_launch(&self, kernel: Kernel) -> bool {
        self.paths.pdl && self.pdl_entries.contains(kernel.entry)
    }

    /// How many kernels are launched with programmatic dependent launch: 0 unless
    /// `QILIN_CUDA_PDL=1` on an sm_90+ device whose driver took the rewritten PTX.
    pub fn dependent_launch_kernels(&self) -> usize {
        if self.paths.pdl {
            self.pdl_entries.len()
        } else {
            0
        }
    }

    /// Records what `body` queues on the stream into a graph instead of running it. Host
    /// copies and synchronisation inside `body` panic (they cannot be captured); device
    /// memory `body` allocates must be freed by it, and memory it frees must have been
    /// allocated by it (a graph would free it again at every launch).
    pub fn capture<R>(&self, body: impl FnOnce() -> R) -> Result<(R, CudaGraph), DriverError> {
        assert!(!self.capturing.swap(true, Ordering::SeqCst), "nested CUDA graph capture");
        // Ends a capture that `body` left by panicking, so the stream stays usable.
        struct Abandon<'a>(&'a Device);
        impl Drop for Abandon<'_> {
            fn drop(&mut self) {
                if self.0.capturing.swap(false, Ordering::SeqCst) {
                    let _ = self.0.stream.end_capture(CUgraphInstantiate_flags(0));
                }
            }
        }
        let _abandon = Abandon(self);
        self.stream.begin_capture(CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)?;
        let result = body();
        self.capturing.store(false, Ordering::SeqCst);
        let graph = self.stream.end_capture(CUgraphInstantiate_flags(0))?;
        let graph = graph.ok_or(DriverError(
            cudarc::driver::sys::CUresult::CUDA_ERROR_STREAM_CAPTURE_INVALIDATED,
        ))?;
        self.graphs_exist.store(true, Ordering::SeqCst);
        Ok((result, graph))
    }

    /// Panics while a graph is being captured: `what` cannot be part of one.
    fn not_capturing(&self, what: &str) {
        assert!(
            !self.capturing.load(Ordering::SeqCst),
            "CUDA graph capture: {what} cannot be captured (a launcher bug; set \
             QILIN_CUDA_GRAPHS=0 to run without graphs)"
        );
    }

    pub fn function(&self, kernel: Kernel) -> &CudaFunction {
        // Every entry of ptx::KERNELS was loaded in `open`; a launcher naming another is
        // a programming error caught by tests/ptx_kernels.rs.
        self.functions
            .get(&(kernel.module, kernel.entry))
            .unwrap_or_else(|| panic!("kernel {} is not listed in ptx::KERNELS", kernel.entry))
    }

    /// Whether this device can run `kernel` (false for the kernels whose shared memory it
    /// cannot provide, which the launchers then replace).
    pub fn launchable(&self, kernel: Kernel) -> bool {
        !self.smem_refused.contains(&kernel)
    }

    pub fn name(&self) -> String {
        self.ctx.name().unwrap_or_else(|_| "CUDA device".into())
    }

    /// An op's output of `n` values, not initialised. Every kernel that fills one writes
    /// each element (the GPU parity suite compares every element on NaN-poisoned or
    /// all-nonzero data), so zeroing it first would only add a memset launch per op,
    /// ~170 per decode step of Qwen2.5-7B.
    pub fn alloc_output<T: DeviceRepr>(&self, n: usize) -> CudaSlice<T> {
        // SAFETY: stream-ordered memory that the op's kernel writes before any read.
        check(unsafe { self.stream.alloc::<T>(n.max(1)) }, "allocating an op output")
    }

    /// `n` zeroed values (benchmark inputs are then filled with random data).
    pub fn alloc<T: DeviceRepr + ValidAsZeroBits>(&self, n: usize) -> CudaSlice<T> {
        check(self.stream.alloc_zeros::<T>(n.max(1)), "allocating device memory")
    }

    /// The attention's bisecting switches now (field docs).
    pub fn attention_switches(&self) -> AttentionSwitches {
        *self.attention_switches.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Replaces the attention's bisecting switches, for the launches that follow (the
    /// parity tests' paths; a captured graph keeps the kernels it was captured with).
    pub fn set_attention_switches(&self, switches: AttentionSwitches) {
        *self.attention_switches.lock().unwrap_or_else(|e| e.into_inner()) = switches;
    }

    /// The split-merge counters (field docs): all zero between launches.
    pub fn merge_counters(&self) -> MutexGuard<'_, CudaSlice<u32>> {
        self.merge_counters.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The f32 scratch buffer, at least `n` values long; its contents are unspecified.
    pub fn scratch_f32(&self, n: usize) -> MutexGuard<'_, CudaSlice<f32>> {
        self.grown(&self.scratch_f32, n)
    }

    /// The bf16 scratch buffer, at least `n` values long; its contents are unspecified.
    pub fn scratch_bf16(&self, n: usize) -> MutexGuard<'_, CudaSlice<bf16>> {
        self.grown(&self.scratch_bf16, n)
    }

    /// `slot`'s buffer, re-allocated to `n` values when it is shorter (and kept).
    fn grown<'a, T: DeviceRepr + Send + 'static>(
        &self,
        slot: &'a Mutex<CudaSlice<T>>,
        n: usize,
    ) -> MutexGuard<'a, CudaSlice<T>> {
        let mut scratch = slot.lock().unwrap_or_else(|e| e.into_inner());
        if scratch.len() < n {
            self.not_capturing(
                "growing a scratch buffer (the eager run before a capture grows it)",
            );
            // SAFETY: callers of the scratch accessors write the buffer before reading it.
            let grown = check(unsafe { self.stream.alloc::<T>(n) }, "allocating scratch");
            let old = std::mem::replace(&mut *scratch, grown);
            if self.graphs_exist.load(Ordering::SeqCst) {
                self.retired_scratch.lock().unwrap_or_else(|e| e.into_inner()).push(Box::new(old));
            }
        }
        scratch
    }

    pub fn upload<T: DeviceRepr>(&self, host: &[T]) -> CudaSlice<T> {
        self.not_capturing("a copy to the device");
        if host.is_empty() {
            // cudarc refuses zero-length copies; a one-element buffer is never read.
            // SAFETY: the value is overwritten before any read (it never is read).
            return check(unsafe { self.stream.alloc::<T>(1) }, "allocating device memory");
        }
        check(self.stream.clone_htod(host), "copying to the device")
    }

    pub fn download<T: DeviceRepr + Clone + Default>(
        &self,
        dev: &CudaSlice<T>,
        n: usize,
    ) -> Vec<T> {
        self.not_capturing("a copy to the host");
        let mut host = check(self.stream.clone_dtoh(dev), "copying to the host");
        host.truncate(n);
        host
    }

    /// The first `n` values of `dev` as f32 in `out` (its contents replaced, its capacity
    /// reused). Chunks alternate between the two pinned staging buffers, so the host
    /// converts one chunk while the next is copied.
    pub fn download_f32_into(&self, dev: &CudaSlice<bf16>, n: usize, out: &mut Vec<f32>) {
        self.not_capturing("a copy to the host");
        out.clear();
        if n == 0 {
            return;
        }
        assert!(n <= dev.len(), "download of {n} values from a buffer of {}", dev.len());
        out.reserve(n);
        let mut staging = self.staging.lock().unwrap_or_else(|e| e.into_inner());
        let staging = staging.get_or_insert_with(|| Staging::new(&self.ctx));
        let chunks: Vec<(usize, usize)> =
            (0..n).step_by(STAGING_VALUES).map(|a| (a, (a + STAGING_VALUES).min(n))).collect();
        // Each copy is as long as its source view (b - a values), into the front of a
        // staging buffer that nothing reads until the event recorded after it completes.
        let copy = |staging: &mut Staging, i: usize| {
            let (a, b) = chunks[i];
            let host = staging.chunk(i % 2, b - a);
            check(self.stream.memcpy_dtoh(&dev.slice(a..b), host), "copying to the host");
            check(staging.copied[i % 2].record(&self.stream), "recording a copy");
        };
        copy(staging, 0);
        for (i, &(a, b)) in chunks.iter().enumerate() {
            if i + 1 < chunks.len() {
                copy(staging, i + 1);
            }
            check(staging.copied[i % 2].synchronize(), "waiting for a copy to the host");
            widen_into(staging.chunk(i % 2, b - a), &mut out.spare_capacity_mut()[..b - a]);
            // SAFETY: widen_into initialised the b - a values after the first a (reserved
            // above: capacity >= n >= b).
            unsafe { out.set_len(b) };
        }
    }

    /// Copies `host` into the start of `dev` (which must hold at least `host.len()`
    /// values), in stream order; the host slice may be reused once this returns.
    pub fn upload_into<T: DeviceRepr>(&self, host: &[T], dev: &mut CudaSlice<T>) {
        self.not_capturing("a copy to the device");
        assert!(host.len() <= dev.len(), "upload of {} values into {}", host.len(), dev.len());
        if host.is_empty() {
            return;
        }
        // A copy from pageable host memory returns once the source has been read.
        check(self.stream.memcpy_htod(host, dev), "copying to the device");
    }

    /// Copies the first `n` values of `src` into the start of `dst`, in stream order
    /// (also inside a capture).
    pub fn copy_within_device<T: DeviceRepr>(
        &self,
        src: &CudaSlice<T>,
        dst: &mut CudaSlice<T>,
        n: usize,
    ) {
        assert!(n <= src.len() && n <= dst.len(), "device copy of {n} values");
        if n == 0 {
            return;
        }
        let copied = self.stream.memcpy_dtod(&src.slice(..n), &mut dst.slice_mut(..n));
        check(copied, "copying on the device");
    }

    pub fn synchronize(&self) {
        self.not_capturing("synchronising the stream");
        check(self.stream.synchronize(), "synchronizing the stream");
    }
}

/// `dst[i] = src[i]` as f32, on every core: at batch 64, Qwen2.5's logits are 9.7 M values
/// (59 MB of memory traffic), milliseconds on one core of the host.
fn widen_into(src: &[bf16], dst: &mut [std::mem::MaybeUninit<f32>]) {
    use rayon::prelude::*;
    assert_eq!(src.len(), dst.len(), "widen_into: lengths differ");
    const PIECE: usize = 1 << 16;
    dst.par_chunks_mut(PIECE).zip(src.par_chunks(PIECE)).for_each(|(d, s)| {
        for (d, s) in d.iter_mut().zip(s) {
            d.write(s.to_f32());
        }
    });
}

/// Two page-locked buffers of `[STAGING_VALUES]` bf16 and the event after the last copy
/// into each.
struct Staging {
    buffers: [PinnedHostSlice<bf16>; 2],
    copied: [CudaEvent; 2],
}

impl Staging {
    fn new(ctx: &Arc<CudaContext>) -> Staging {
        // Flags 0: cached memory. cudarc's `alloc_pinned` asks for write-combined memory,
        // which is fast to write from the host and very slow to read back.
        let buffer = || {
            // SAFETY: a chunk is read only after the copy into it has completed.
            let pinned = unsafe { ctx.alloc_pinned_with_flags::<bf16>(STAGING_VALUES, 0) };
            check(pinned, "allocating page-locked host memory")
        };
        let event = || check(ctx.new_event(None), "creating an event");
        Staging { buffers: [buffer(), buffer()], copied: [event(), event()] }
    }

    /// The first `len` (<= STAGING_VALUES) values of buffer `i`.
    fn chunk(&mut self, i: usize, len: usize) -> &mut [bf16] {
        let all = check(self.buffers[i].as_mut_slice(), "reading page-locked memory");
        &mut all[..len]
    }
}

/// Values per pinned staging buffer of `Device::download_f32_into` (2 MiB of bf16): large
/// enough that a chunk's copy outlasts its launch, small enough to pin at start-up cost.
const STAGING_VALUES: usize = 1 << 20;

/// Gives cuBLAS a workspace of its own (kept by the caller as long as the handle lives).
fn set_blas_workspace(
    stream: &Arc<CudaStream>,
    blas: &CudaBlas,
) -> Result<CudaSlice<u8>, CudaError> {
    let mut workspace = stream
        .alloc_zeros::<u8>(BLAS_WORKSPACE_BYTES)
        .map_err(|e| CudaError::Driver(format!("allocating cuBLAS's workspace: {e}")))?;
    let (ptr, record) = workspace.device_ptr_mut(stream);
    // SAFETY: ptr addresses BLAS_WORKSPACE_BYTES bytes that the Device keeps for as long
    // as the handle (declared before it, so dropped first).
    let status = unsafe {
        cudarc::cublas::sys::cublasSetWorkspace_v2(
            *blas.handle(),
            ptr as *mut std::ffi::c_void,
            BLAS_WORKSPACE_BYTES,
        )
    };
    if status != cudarc::cublas::sys::cublasStatus_t::CUBLAS_STATUS_SUCCESS {
        return Err(CudaError::Driver(format!("setting cuBLAS's workspace: {status:?}")));
    }
    drop(record);
    Ok(workspace)
}

/// A one-value scratch buffer, grown on first use (`Device::grown`).
fn empty_scratch<T: DeviceRepr>(
    stream: &Arc<CudaStream>,
) -> Result<Mutex<CudaSlice<T>>, CudaError> {
    // SAFETY: every scratch buffer is written (by cuBLAS, by the dequant kernel) before it
    // is read; this one-value placeholder is never read.
    let buffer = unsafe { stream.alloc::<T>(1) }
        .map_err(|e| CudaError::Driver(format!("allocating scratch: {e}")))?;
    Ok(Mutex::new(buffer))
}

/// The Backend trait's ops cannot return errors (the CPU twin never fails); a CUDA error
/// there means a lost device or a launcher bug, so it ends the process with the reason.
pub fn check<T>(result: Result<T, DriverError>, what: &str) -> T {
    result.unwrap_or_else(|e| panic!("CUDA error while {what}: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every bf16 bit pattern, then a length that is not a multiple of the pieces.
    #[test]
    fn widening_is_to_f32_of_every_value_in_place() {
        let all: Vec<bf16> = (0..=u16::MAX).map(bf16::from_bits).collect();
        let src: Vec<bf16> = all.iter().cycle().take(3 * 65_536 + 12_345).copied().collect();
        let mut out: Vec<f32> = Vec::with_capacity(src.len());
        widen_into(&src, &mut out.spare_capacity_mut()[..src.len()]);
        // SAFETY: widen_into wrote every one of the src.len() values.
        unsafe { out.set_len(src.len()) };
        for (i, (&s, &d)) in src.iter().zip(&out).enumerate() {
            assert_eq!(d.to_bits(), s.to_f32().to_bits(), "value {i} ({:#06x})", s.to_bits());
        }
    }
}
