//! Weights onto the device, once. Linear layers whose parts are all quantized keep their
//! levels (src/backend/packed_quant.rs: every format repacked losslessly into the layout
//! of kernels/quant_linear.cu); everything else (plain floats, embedding tables, norms,
//! biases) is decoded on the host and stored as bf16, the activation dtype.

use half::bf16;
use rayon::prelude::*;

use super::device::Device;
use super::quant_linear::reserve_dequant_scratch;
use super::tensor::{CudaLinear, CudaVector, LinearWeight, QuantWeight};
use crate::backend::cpu::weight_to_f32;
use crate::backend::packed_quant::PackedQuant;
use crate::backend::{BackendError, LinearPart};
use crate::model::WeightTensor;

fn to_bf16(name: &str, w: &WeightTensor) -> Result<Vec<bf16>, BackendError> {
    let values = weight_to_f32(name, w)?;
    Ok(values.par_iter().map(|&v| bf16::from_f32(v)).collect())
}

/// Parts stacked along the output dimension: `[sum(out_i), in]`, and a bias when any
/// part has one (zeros for the parts without). Quantized parts stay quantized (levels);
/// `dequantize` forces bf16 (embedding tables, which the gather kernel reads as bf16), and
/// so does `QILIN_CUDA_DEQUANTIZE=1` for every layer.
pub fn upload_linear(
    dev: &Device,
    name: &str,
    parts: &[LinearPart<'_>],
    dequantize: bool,
) -> Result<CudaLinear, BackendError> {
    let bad = |message: String| BackendError::Weight { name: name.to_string(), message };
    let first = parts.first().ok_or_else(|| bad("no weight parts".into()))?;
    let in_features = first.weight.row_len();
    let mut bias = Vec::new();
    let any_bias = parts.iter().any(|p| p.bias.is_some());
    for part in parts {
        if part.weight.row_len() != in_features || part.weight.shape.len() != 2 {
            return Err(bad(format!(
                "parts disagree on the input width ({:?} vs {in_features})",
                part.weight.shape
            )));
        }
        if part.weight.dtype.row_bytes(in_features).is_none() {
            return Err(bad(format!(
                "row of {in_features} values is not a whole number of {} blocks",
                part.weight.dtype
            )));
        }
        let rows = part.weight.rows();
        if any_bias {
            match part.bias {
                Some(b) if b.numel() == rows => bias.extend(to_bf16(name, b)?),
                Some(b) => {
                    return Err(bad(format!("bias of {} values for {rows} rows", b.numel())))
                }
                None => bias.extend(std::iter::repeat_n(bf16::ZERO, rows)),
            }
        }
    }
    let out_features: usize = parts.iter().map(|p| p.weight.rows()).sum();
    let weights: Vec<_> = parts.iter().map(|p| p.weight).collect();
    // QILIN_CUDA_DEQUANTIZE=1: every layer bf16, as before quantized kernels existed (to
    // bisect a quantized model's output on a GPU, or to trade memory for prefill speed).
    let forced_bf16 = std::env::var("QILIN_CUDA_DEQUANTIZE").as_deref() == Ok("1");
    let packed = if dequantize || forced_bf16 { None } else { PackedQuant::from_parts(&weights) };
    let weight = match packed {
        Some(packed) => {
            reserve_dequant_scratch(dev, in_features, out_features);
            LinearWeight::Quant(QuantWeight {
                format: packed.format,
                levels: dev.upload(&packed.levels),
                scale_min: dev.upload(&packed.scale_min),
            })
        }
        None => {
            let mut weight = Vec::with_capacity(out_features * in_features);
            for part in parts {
                weight.extend(to_bf16(name, part.weight)?);
            }
            LinearWeight::Bf16(dev.upload(&weight))
        }
    };
    Ok(CudaLinear { weight, bias: any_bias.then(|| dev.upload(&bias)), out_features, in_features })
}

pub fn upload_vector(
    dev: &Device,
    name: &str,
    w: &WeightTensor,
) -> Result<CudaVector, BackendError> {
    let values = to_bf16(name, w)?;
    Ok(CudaVector { len: values.len(), data: dev.upload(&values) })
}
