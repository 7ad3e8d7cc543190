//! The CUDA backend: bf16 activations and KV cache, our own kernels (kernels/*.cu,
//! embedded as PTX) launched through cudarc, cuBLAS for prefill-sized matmuls. Every op
//! has the semantics of its CPU twin in `backend/cpu`, which its parity test in
//! `tests/gpu_*.rs` checks on a real GPU.
//!
//! Status: compiles; verified only where a GPU run of tools/gpu-check says so.

mod attention;
mod batch_meta;
mod decode_plan;
mod device;
mod elementwise;
pub mod graph;
mod launch;
mod linear;
mod norm;
pub mod pdl;
mod quant_gemm_mma;
mod quant_linear;
mod rope;
mod sampling;
mod tensor;
mod weights;

use std::sync::{Arc, Mutex};

pub use attention::{AttentionKernels, AttentionSwitches};
pub use batch_meta::DeviceBatch;
pub use device::{Device, FastPaths};
pub use launch::KernelLaunch;
pub use linear::{gemv_cublas_wins, gemv_mma_wins};
pub use quant_linear::reserve_dequant_scratch;
pub use sampling::{argmax_rows_on_device, SPLIT_MAX_BATCH as SAMPLE_SPLIT_MAX_BATCH};
pub use tensor::{CudaKvCache, CudaLinear, CudaTensor, CudaVector, LinearWeight, QuantWeight};

use super::{
    rope_qkv_by_split, run_eagerly, AttentionShape, Backend, BackendError, Batch, KvCacheShape,
    LinearPart, PenaltyBatch, RowSampling, StepFn,
};
use crate::model::rope::RopeTable;
use crate::model::WeightTensor;
use elementwise::RowIndex;
use graph::{GraphInputs, StepGraphs};

#[derive(Debug, thiserror::Error)]
pub enum CudaError {
    #[error("no NVIDIA driver (libcuda) could be loaded")]
    NoDriver,
    #[error(
        "this build has no PTX (nvcc was not found at build time; run tools/setup and rebuild)"
    )]
    NoPtx,
    #[error("{0}")]
    Driver(String),
}

pub struct CudaBackend {
    pub dev: Device,
    /// The last batch's metadata on the device, reused by every layer of a step.
    batch_cache: Mutex<Option<(Batch, Arc<DeviceBatch>)>>,
    /// Decode steps captured as CUDA graphs (graph.rs), when `dev.paths.graphs`.
    pub graphs: Mutex<StepGraphs>,
    /// While a step runs for a graph (its eager first run and its capture): the inputs
    /// the graph reads, which the ops take instead of uploading the step's own.
    bound: Mutex<Option<Arc<GraphInputs>>>,
}

impl CudaBackend {
    /// `Backend::rope_qkv_and_store_kv` through qilin_rope_qkv_store_kv_bf16 whatever
    /// `paths.rope_qkv` says (benchmarks).
    pub fn rope_qkv_in_one_kernel(
        &self,
        qkv: &CudaTensor,
        batch: &Batch,
        rope: &RopeTable,
        cache: &mut CudaKvCache,
        layer: usize,
        shape: AttentionShape,
    ) -> CudaTensor {
        let meta = self.device_batch(batch);
        rope::rope_qkv_and_store_kv(&self.dev, qkv, &meta, rope, cache, layer, shape)
    }

    pub fn new(ordinal: usize) -> Result<CudaBackend, CudaError> {
        Ok(CudaBackend {
            dev: Device::open(ordinal)?,
            batch_cache: Mutex::new(None),
            graphs: Mutex::new(StepGraphs::default()),
            bound: Mutex::new(None),
        })
    }

    /// Makes the ops read `inputs` (a graph's) until `unbind`.
    fn bind(&self, inputs: GraphInputs) {
        let mut bound = self.bound.lock().unwrap_or_else(|e| e.into_inner());
        assert!(bound.is_none(), "CUDA graphs: a step is already bound");
        *bound = Some(Arc::new(inputs));
    }

    fn unbind(&self) -> GraphInputs {
        let bound = self.bound.lock().unwrap_or_else(|e| e.into_inner()).take();
        let bound = bound.expect("CUDA graphs: unbind without bind");
        Arc::try_unwrap(bound)
            .unwrap_or_else(|_| panic!("CUDA graphs: a graph's inputs outlived its step"))
    }

    fn bound(&self) -> Option<Arc<GraphInputs>> {
        self.bound.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// A device tensor holding `data` (`[rows, cols]`, f32 on the host) rounded to bf16;
    /// for tests and benchmarks.
    pub fn tensor_from_host(&self, data: &[f32], rows: usize, cols: usize) -> CudaTensor {
        assert_eq!(data.len(), rows * cols, "tensor data does not match its shape");
        let bf: Vec<half::bf16> = data.iter().map(|&v| half::bf16::from_f32(v)).collect();
        CudaTensor { data: self.dev.upload(&bf), rows, cols }
    }

    /// `Backend::attention` through `kernels` (e.g. a kernel the default replaced, for its
    /// benchmark rows beside the default's).
    pub fn attention_with(
        &self,
        q: &CudaTensor,
        batch: &Batch,
        cache: &CudaKvCache,
        layer: usize,
        shape: AttentionShape,
        kernels: AttentionKernels,
    ) -> CudaTensor {
        let meta = self.device_batch(batch);
        attention::attention(&self.dev, q, &meta, cache, layer, shape, kernels)
    }

    /// The batch metadata on the device, uploaded once per distinct batch (a bound
    /// graph's own while a graph's step runs).
    pub fn device_batch(&self, batch: &Batch) -> Arc<DeviceBatch> {
        if let Some(bound) = self.bound() {
            assert_eq!(
                batch.n_tokens(),
                bound.n,
                "CUDA graphs: the step's batch is not the bound one"
            );
            return bound.meta.clone();
        }
        let mut cache = self.batch_cache.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((host, dev)) = cache.as_ref() {
            if host == batch {
                return dev.clone();
            }
        }
        let uploaded = Arc::new(DeviceBatch::upload(&self.dev, batch));
        *cache = Some((batch.clone(), uploaded.clone()));
        uploaded
    }
}

impl Backend for CudaBackend {
    type Tensor = CudaTensor;
    type Linear = CudaLinear;
    type Vector = CudaVector;
    type KvCache = CudaKvCache;

    fn name(&self) -> &'static str {
        "cuda"
    }

    fn upload_linear(
        &self,
        name: &str,
        parts: &[LinearPart<'_>],
    ) -> Result<CudaLinear, BackendError> {
        weights::upload_linear(&self.dev, name, parts, false)
    }

    fn upload_embedding(
        &self,
        name: &str,
        weight: &WeightTensor,
    ) -> Result<CudaLinear, BackendError> {
        weights::upload_linear(&self.dev, name, &[LinearPart { weight, bias: None }], true)
    }

    fn upload_vector(&self, name: &str, weight: &WeightTensor) -> Result<CudaVector, BackendError> {
        weights::upload_vector(&self.dev, name, weight)
    }

    fn alloc_kv_cache(&self, shape: KvCacheShape) -> Result<CudaKvCache, BackendError> {
        let per_layer = shape
            .num_blocks
            .checked_mul(super::BLOCK_SIZE * shape.num_kv_heads * shape.head_dim)
            .ok_or_else(|| BackendError::OutOfMemory(format!("KV cache of {shape:?}")))?;
        let alloc = || {
            self.dev.stream.alloc_zeros::<half::bf16>(per_layer.max(1)).map_err(|e| {
                BackendError::OutOfMemory(format!("KV cache of {shape:?} on the device: {e}"))
            })
        };
        let keys = (0..shape.num_layers).map(|_| alloc()).collect::<Result<_, _>>()?;
        let values = (0..shape.num_layers).map(|_| alloc()).collect::<Result<_, _>>()?;
        Ok(CudaKvCache { shape, keys, values })
    }

    fn embedding(&self, table: &CudaLinear, ids: &[u32]) -> CudaTensor {
        match self.bound() {
            Some(bound) => {
                // The bound buffer holds these ids (GraphInputs::upload / refresh).
                assert_eq!(
                    ids.len(),
                    bound.n,
                    "CUDA graphs: the step's ids are not the bound ones"
                );
                let index = RowIndex::Device { on_device: &bound.ids, host: ids };
                elementwise::embedding(&self.dev, table, index)
            }
            None => elementwise::embedding(&self.dev, table, RowIndex::Host(ids)),
        }
    }

    fn add_rms_norm(
        &self,
        residual: &mut CudaTensor,
        x: Option<&CudaTensor>,
        weight: &CudaVector,
        eps: f32,
    ) -> CudaTensor {
        norm::add_rms_norm(&self.dev, residual, x, weight, eps)
    }

    fn linear(&self, x: &CudaTensor, w: &CudaLinear) -> CudaTensor {
        linear::linear(&self.dev, x, w)
    }

    fn rope_and_store_kv(
        &self,
        q: &mut CudaTensor,
        k: &mut CudaTensor,
        v: &CudaTensor,
        batch: &Batch,
        rope: &RopeTable,
        cache: &mut CudaKvCache,
        layer: usize,
        shape: AttentionShape,
    ) {
        let meta = self.device_batch(batch);
        rope::rope_and_store_kv(&self.dev, q, k, v, &meta, rope, cache, layer, shape)
    }

    fn rope_qkv_and_store_kv(
        &self,
        qkv: &CudaTensor,
        batch: &Batch,
        rope: &RopeTable,
        cache: &mut CudaKvCache,
        layer: usize,
        shape: AttentionShape,
    ) -> CudaTensor {
        if !self.dev.paths.rope_qkv {
            return rope_qkv_by_split(self, qkv, batch, rope, cache, layer, shape);
        }
        self.rope_qkv_in_one_kernel(qkv, batch, rope, cache, layer, shape)
    }

    fn attention(
        &self,
        q: &CudaTensor,
        batch: &Batch,
        cache: &CudaKvCache,
        layer: usize,
        shape: AttentionShape,
    ) -> CudaTensor {
        self.attention_with(q, batch, cache, layer, shape, AttentionKernels::Dispatch)
    }

    fn silu_mul(&self, gate_up: &CudaTensor) -> CudaTensor {
        elementwise::silu_mul(&self.dev, gate_up)
    }

    fn split_cols(&self, x: &CudaTensor, widths: &[usize]) -> Vec<CudaTensor> {
        elementwise::split_cols(&self.dev, x, widths)
    }

    fn gather_rows(&self, x: &CudaTensor, rows: &[u32]) -> CudaTensor {
        match self.bound() {
            Some(bound) => {
                // A bound step gathers only its logits rows, 0..n: the bound buffer's.
                let identity = rows.iter().enumerate().all(|(i, &r)| r as usize == i);
                assert!(
                    rows.len() == bound.n && identity,
                    "CUDA graphs: a bound step gathers rows 0..{} only",
                    bound.n
                );
                let index = RowIndex::Device { on_device: &bound.rows, host: rows };
                elementwise::gather_rows(&self.dev, x, index)
            }
            None => elementwise::gather_rows(&self.dev, x, RowIndex::Host(rows)),
        }
    }

    fn to_host_into(&self, x: &CudaTensor, out: &mut Vec<f32>) {
        self.dev.download_f32_into(&x.data, x.rows * x.cols, out);
    }

    fn argmax_rows(&self, logits: &CudaTensor) -> Vec<u32> {
        sampling::argmax_rows(&self.dev, logits)
    }

    fn sample_rows(&self, logits: &CudaTensor, rows: &[RowSampling]) -> Vec<u32> {
        sampling::sample_rows(&self.dev, logits, rows)
    }

    fn device_penalties(&self) -> bool {
        self.dev.paths.device_penalties
    }

    fn sample_rows_penalized(
        &self,
        logits: &mut CudaTensor,
        rows: &[RowSampling],
        penalties: &PenaltyBatch,
    ) -> Vec<u32> {
        sampling::apply_penalties(&self.dev, logits, penalties);
        sampling::sample_rows(&self.dev, logits, rows)
    }

    fn run_step(
        &self,
        batch: &Batch,
        rope: &mut RopeTable,
        step: &mut StepFn<'_, CudaTensor>,
    ) -> Option<CudaTensor> {
        if self.dev.paths.graphs {
            graph::run_step(self, batch, rope, step)
        } else {
            run_eagerly(batch, rope, step)
        }
    }
}
