//! The on-disk form of a `qilin quantize` result: a Hugging Face model directory
//! whose quantized tensors are stored as raw I8/I4 blocks.
//!
//! - `config.json`: the input's, plus `"quantization_config": {"quant_method": "qilin",
//!   "method": "int8" | "int4", "group_size": 128}` (other tools then refuse the
//!   directory instead of misreading it).
//! - `model.safetensors`: every tensor under its Hugging Face name. Unquantized ones
//!   (norms, biases, embeddings, layers whose width is not a multiple of 128) keep their
//!   dtype. A quantized `[out, in]` weight is a `U8` tensor of shape `[out, row_bytes]`
//!   holding the rows' blocks exactly as `DType::I8` / `DType::I4` define them
//!   (src/model/tensor.rs, src/model/quant/intq.rs): I8 rows are `in / 128` blocks of
//!   `f32 scale + 128 x i8` (132 B), I4 rows `in / 128` blocks of `f16 scale, u8 zero,
//!   u8 0, 64 bytes of nibbles` (68 B, value 2j in the low nibble of byte j).
//! - The safetensors header's `__metadata__` holds the marker the loader reads back:
//!   key `qilin.quantized`, value a JSON object `{"<tensor name>": {"dtype": "I4",
//!   "shape": [out, in]}, ...}`. A `U8` tensor without an entry is an error, and so is
//!   an entry whose byte length does not match its dtype and shape.
//! - Tokenizer and generation files are copied unchanged.

use std::borrow::Cow;
use std::collections::HashMap;
use std::path::Path;

use serde_json::{json, Value};

use crate::model::tensor::{Bytes, DType, WeightTensor};
use crate::model::LoadError;

/// The `__metadata__` key of the marker.
pub const METADATA_KEY: &str = "qilin.quantized";

/// The block formats `qilin quantize` writes, by their marker names.
fn dtype_from_name(name: &str) -> Option<DType> {
    match name {
        "I8" => Some(DType::I8),
        "I4" => Some(DType::I4),
        "Q8_0" => Some(DType::Q8_0),
        "Q4_1" => Some(DType::Q4_1),
        _ => None,
    }
}

/// The marker of one file: tensor name -> (block format, logical shape). Empty when
/// the file has none.
pub fn read_markers(
    path: &Path,
    metadata: &Option<HashMap<String, String>>,
) -> Result<HashMap<String, (DType, Vec<usize>)>, LoadError> {
    let Some(text) = metadata.as_ref().and_then(|m| m.get(METADATA_KEY)) else {
        return Ok(HashMap::new());
    };
    let bad = |msg: String| LoadError::invalid(path, format!("`{METADATA_KEY}` metadata: {msg}"));
    let json: Value = serde_json::from_str(text).map_err(|e| bad(format!("not JSON: {e}")))?;
    let entries = json.as_object().ok_or_else(|| bad("not a JSON object".into()))?;
    let mut out = HashMap::new();
    for (name, entry) in entries {
        let dtype_name = entry.get("dtype").and_then(Value::as_str).unwrap_or("");
        let dtype = dtype_from_name(dtype_name).ok_or_else(|| {
            bad(format!("tensor `{name}`: dtype `{dtype_name}` is not one of I8, I4, Q8_0, Q4_1"))
        })?;
        let shape: Option<Vec<usize>> =
            entry.get("shape").and_then(Value::as_array).and_then(|a| {
                a.iter().map(|d| d.as_u64().and_then(|d| usize::try_from(d).ok())).collect()
            });
        let shape =
            shape.ok_or_else(|| bad(format!("tensor `{name}`: no integer `shape` list")))?;
        out.insert(name.clone(), (dtype, shape));
    }
    Ok(out)
}

/// A marked U8 tensor as the weight it holds, its length checked.
pub fn weight(
    path: &Path,
    name: &str,
    dtype: DType,
    shape: &[usize],
    data: Bytes,
) -> Result<WeightTensor, LoadError> {
    let expected = WeightTensor::expected_bytes(dtype, shape);
    if expected != Some(data.as_slice().len()) {
        return Err(LoadError::tensor(
            path,
            name,
            format!(
                "{} bytes do not hold a {dtype} tensor of shape {shape:?} (rows must be whole 128-value blocks)",
                data.as_slice().len()
            ),
        ));
    }
    Ok(WeightTensor { dtype, shape: shape.to_vec(), data })
}

/// Why a directory could not be written.
#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    #[error("tensor `{0}` is {1}, which this format does not store (BF16, F16, F32, I8, I4, Q8_0, Q4_1)")]
    Unsupported(String, DType),
    #[error("{path}: {source}")]
    Safetensors { path: std::path::PathBuf, source: safetensors::SafeTensorError },
}

/// One tensor as safetensors writes it.
struct View<'a> {
    dtype: safetensors::Dtype,
    shape: Vec<usize>,
    data: &'a [u8],
}

impl safetensors::View for View<'_> {
    fn dtype(&self) -> safetensors::Dtype {
        self.dtype
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> Cow<'_, [u8]> {
        Cow::Borrowed(self.data)
    }
    fn data_len(&self) -> usize {
        self.data.len()
    }
}

/// Writes `tensors` to `path` (a `model.safetensors`) in the format above.
pub fn write_safetensors(
    path: &Path,
    tensors: &HashMap<String, WeightTensor>,
) -> Result<(), WriteError> {
    let mut marker = serde_json::Map::new();
    let mut views = Vec::with_capacity(tensors.len());
    let mut names: Vec<&String> = tensors.keys().collect();
    names.sort();
    for name in names {
        let t = &tensors[name];
        let (dtype, shape) = match t.dtype {
            DType::F32 => (safetensors::Dtype::F32, t.shape.clone()),
            DType::F16 => (safetensors::Dtype::F16, t.shape.clone()),
            DType::BF16 => (safetensors::Dtype::BF16, t.shape.clone()),
            DType::I8 | DType::I4 | DType::Q8_0 | DType::Q4_1 => {
                let row_bytes = t.dtype.row_bytes(t.row_len()).expect("validated at load");
                marker
                    .insert(name.clone(), json!({"dtype": t.dtype.to_string(), "shape": t.shape}));
                (safetensors::Dtype::U8, vec![t.rows(), row_bytes])
            }
            other => return Err(WriteError::Unsupported(name.clone(), other)),
        };
        views.push((name.clone(), View { dtype, shape, data: t.bytes() }));
    }
    let mut metadata = HashMap::from([("format".to_string(), "pt".to_string())]);
    if !marker.is_empty() {
        metadata.insert(METADATA_KEY.to_string(), Value::Object(marker).to_string());
    }
    safetensors::serialize_to_file(views, Some(metadata), path)
        .map_err(|source| WriteError::Safetensors { path: path.to_path_buf(), source })
}
