//! Weights onto the device, once: every file format (bf16, f16, f32, GGUF blocks) is
//! decoded on the host and stored as bf16, the dtype every kernel of this backend reads.

use half::bf16;
use rayon::prelude::*;

use super::device::Device;
use super::tensor::{CudaLinear, CudaVector};
use crate::backend::cpu::weight_to_f32;
use crate::backend::{BackendError, LinearPart};
use crate::model::WeightTensor;

fn to_bf16(name: &str, w: &WeightTensor) -> Result<Vec<bf16>, BackendError> {
    let values = weight_to_f32(name, w)?;
    Ok(values.par_iter().map(|&v| bf16::from_f32(v)).collect())
}

/// Parts stacked along the output dimension: `[sum(out_i), in]`, and a bias when any
/// part has one (zeros for the parts without).
pub fn upload_linear(
    dev: &Device,
    name: &str,
    parts: &[LinearPart<'_>],
) -> Result<CudaLinear, BackendError> {
    let bad = |message: String| BackendError::Weight { name: name.to_string(), message };
    let first = parts.first().ok_or_else(|| bad("no weight parts".into()))?;
    let in_features = first.weight.row_len();
    let mut weight = Vec::new();
    let mut bias = Vec::new();
    let any_bias = parts.iter().any(|p| p.bias.is_some());
    for part in parts {
        if part.weight.row_len() != in_features || part.weight.shape.len() != 2 {
            return Err(bad(format!(
                "parts disagree on the input width ({:?} vs {in_features})",
                part.weight.shape
            )));
        }
        let rows = part.weight.rows();
        weight.extend(to_bf16(name, part.weight)?);
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
    let out_features = weight.len() / in_features.max(1);
    Ok(CudaLinear {
        weight: dev.upload(&weight),
        bias: any_bias.then(|| dev.upload(&bias)),
        out_features,
        in_features,
    })
}

pub fn upload_vector(
    dev: &Device,
    name: &str,
    w: &WeightTensor,
) -> Result<CudaVector, BackendError> {
    let values = to_bf16(name, w)?;
    Ok(CudaVector { len: values.len(), data: dev.upload(&values) })
}
