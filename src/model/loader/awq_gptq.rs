//! AWQ and GPTQ checkpoints (safetensors, `config.json` `quantization_config`),
//! converted at load into our block formats; and the dispatch on `quant_method`.
//!
//! Each quantized linear `P` ships `P.qweight`, `P.qzeros`, `P.scales` (and for GPTQ
//! `P.g_idx`) instead of `P.weight`; every published reader dequantizes it as
//! `w[o][i] = scales[g][o] * (q[o][i] - z[g][o])` with `g = g_idx[i]` (AWQ and GPTQ
//! without act-order: `g = i / group_size`). Packing, as the published code does it:
//!
//! - AWQ, `version: "gemm"` (AutoAWQ `awq/modules/linear/gemm.py` `WQLinear_GEMM`,
//!   `awq/utils/packing_utils.py`): `qweight` int32 `[in, out / 8]`, `qzeros` int32
//!   `[in / group, out / 8]`, `scales` f16 `[in / group, out]`. Eight 4-bit values of
//!   consecutive *outputs* per int32; nibble `k` (bits `4k..4k+4`) holds output column
//!   `8c + AWQ_ORDER[k]` with `AWQ_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]`. Zeros are stored as
//!   they are (0..=15).
//! - GPTQ (AutoGPTQ `auto_gptq/nn_modules/qlinear/qlinear_cuda.py` `pack`, vLLM
//!   `csrc/quantization/gptq/q_gemm.cu`): `qweight` int32 `[in * bits / 32, out]`,
//!   field `k` (bits `bits*k..`) of row `r` holds *input* `r * 32 / bits + k`; `qzeros`
//!   int32 `[groups, out * bits / 32]`, field `k` of column `c` holds output
//!   `c * 32 / bits + k`; `scales` f16 `[groups, out]`; `g_idx` int32 `[in]`. Format v1
//!   (`checkpoint_format` "gptq", the default) stores `zero - 1`: readers add 1 after
//!   masking (vLLM's `zero_offset = 1`, qlinear_cuda's `zeros + 1`), so a stored 15
//!   reads as 16 for 4-bit. (qlinear_cuda_old masks after adding and reads 0 instead;
//!   we follow vLLM and the current AutoGPTQ kernels.) `gptq_v2` stores the zero itself.
//!
//! What each linear becomes (exact unless noted):
//! - I4 (same bytes per weight as the checkpoint) when bits = 4, groups are contiguous
//!   runs of a multiple of 128 inputs (`g_idx[i] == i / group_size`, no act-order
//!   reordering), `in` is a multiple of 128, every zero is 0..=15 and every scale is an
//!   f16: the AWQ case and GPTQ-Int4 as published for Qwen2.5.
//! - I8 (one scale per 128-value block) when the grouping fits but I4 does not: a
//!   4-bit zero of 16 (v1 asymmetric) or non-f16 scales; or 8 bits with every zero 128
//!   (GPTQ-Int8 symmetric: `q - 128` is the i8).
//! - F16 otherwise: act-order (`desc_act`, a group per input scattered across the row,
//!   which 128-wide blocks cannot express without permuting the activations), groups
//!   smaller than 128, widths not a multiple of 128, 8-bit asymmetric zeros. Each value is
//!   `scale * (q - z)` computed exactly in f32 (the scale is an f16) and rounded once to
//!   f16 — the weights AutoGPTQ's and vLLM's fp16 dequantization produce — at twice the
//!   checkpoint's memory. One info line lists these tensors.

use std::collections::HashMap;
use std::path::Path;

use half::f16;
use rayon::prelude::*;
use serde_json::Value;

use super::safetensors::RawTensor;
use crate::model::tensor::{Bytes, DType, WeightTensor};
use crate::model::LoadError;

/// Nibble `k` of an AWQ int32 holds column `8c + AWQ_ORDER[k]`
/// (AutoAWQ `awq/utils/packing_utils.py`).
pub const AWQ_ORDER: [usize; 8] = [0, 2, 4, 6, 1, 3, 5, 7];

/// Values per I4/I8 block.
const BLOCK: usize = 128;

/// `quantization_config` of a checkpoint.
#[derive(Clone, Debug, PartialEq)]
pub enum QuantMethod {
    /// AWQ GEMM, 4-bit; `group_size` None = one group per row (-1).
    Awq { group_size: Option<usize> },
    Gptq {
        bits: u32,
        group_size: Option<usize>,
        /// Informational: `g_idx` decides how groups map to inputs.
        desc_act: bool,
        /// `checkpoint_format: "gptq_v2"`: zeros stored without the -1.
        v2: bool,
    },
    /// `qilin quantize` output (loaded by the plain path; see qilin_format.rs).
    Qilin,
}

impl QuantMethod {
    /// Reads `quantization_config` from a `config.json`; None when there is none (or no
    /// config.json: `load_tensors` may be pointed at a bare directory).
    pub fn from_config_file(path: &Path) -> Result<Option<Self>, LoadError> {
        if !path.exists() {
            return Ok(None);
        }
        let text = std::fs::read_to_string(path).map_err(|e| LoadError::io(path, e))?;
        let json: Value = serde_json::from_str(&text)
            .map_err(|e| LoadError::invalid(path, format!("not valid JSON: {e}")))?;
        match json.get("quantization_config") {
            None | Some(Value::Null) => Ok(None),
            Some(qc) => Self::from_json(qc)
                .map(Some)
                .map_err(|m| LoadError::invalid(path, format!("quantization_config: {m}"))),
        }
    }

    /// Parses one `quantization_config` object; an unsupported method or layout is an
    /// error naming it.
    pub fn from_json(qc: &Value) -> Result<Self, String> {
        let method = qc.get("quant_method").and_then(Value::as_str).unwrap_or("");
        let int = |k: &str| qc.get(k).and_then(Value::as_i64);
        let group_size = match int("group_size") {
            None | Some(-1) => None,
            Some(g) if g > 0 => Some(g as usize),
            Some(g) => return Err(format!("group_size {g} is not positive or -1")),
        };
        match method.to_ascii_lowercase().as_str() {
            "awq" => {
                let bits = int("bits").or_else(|| int("w_bit")).unwrap_or(4);
                if bits != 4 {
                    return Err(format!("AWQ with {bits} bits is not supported (4 is)"));
                }
                let version = qc.get("version").and_then(Value::as_str).unwrap_or("gemm");
                if !version.eq_ignore_ascii_case("gemm") {
                    return Err(format!(
                        "AWQ version `{version}` is not supported (the GEMM layout, `gemm`, is)"
                    ));
                }
                if qc.get("zero_point").and_then(Value::as_bool) == Some(false) {
                    return Err(
                        "AWQ without zero points (`zero_point: false`) is not supported".into()
                    );
                }
                Ok(QuantMethod::Awq { group_size })
            }
            "gptq" => {
                let bits = int("bits").unwrap_or(0);
                if bits != 4 && bits != 8 {
                    return Err(format!("GPTQ with {bits} bits is not supported (4 and 8 are)"));
                }
                let format = qc
                    .get("checkpoint_format")
                    .or_else(|| qc.get("format"))
                    .and_then(Value::as_str)
                    .unwrap_or("gptq");
                let v2 = match format {
                    "gptq" => false,
                    "gptq_v2" => true,
                    other => {
                        return Err(format!(
                        "GPTQ checkpoint_format `{other}` is not supported (gptq and gptq_v2 are)"
                    ))
                    }
                };
                let desc_act = qc.get("desc_act").and_then(Value::as_bool).unwrap_or(false);
                Ok(QuantMethod::Gptq { bits: bits as u32, group_size, desc_act, v2 })
            }
            "qilin" => Ok(QuantMethod::Qilin),
            "" => Err("no `quant_method`".into()),
            other => {
                Err(format!("quant_method `{other}` is not supported (awq, gptq and qilin are)"))
            }
        }
    }

    /// Whether the loader must convert packed tensors (AWQ, GPTQ).
    pub fn converts_at_load(&self) -> bool {
        !matches!(self, QuantMethod::Qilin)
    }
}

/// A quantized linear, unpacked: `[out, in]` integers, per-group zeros and scales.
#[derive(Debug)]
pub struct Unpacked {
    pub out: usize,
    pub inp: usize,
    pub bits: u32,
    /// `[out * in]`, row o = output channel o.
    pub q: Vec<u8>,
    /// `[groups * out]`, zeros as readers use them (v1's +1 applied).
    pub z: Vec<u16>,
    /// `[groups * out]`.
    pub s: Vec<f32>,
    /// Whether every scale is exactly an f16.
    pub scales_f16: bool,
    /// `[in]`: the group of each input.
    pub g_idx: Vec<u32>,
    /// Inputs per group when groups are contiguous runs (`g_idx[i] == i / g`).
    pub contiguous_group: Option<usize>,
}

/// What a converted linear became.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Target {
    I4,
    I8,
    F16,
}

/// Converts every AWQ/GPTQ linear in `raw` to a `.weight` (I4, I8 or F16, module
/// header) and passes the other tensors through.
pub fn convert(
    mut raw: HashMap<String, RawTensor>,
    method: &QuantMethod,
) -> Result<HashMap<String, WeightTensor>, LoadError> {
    let mut prefixes: Vec<String> =
        raw.keys().filter_map(|k| k.strip_suffix(".qweight")).map(str::to_string).collect();
    prefixes.sort();
    let mut out = HashMap::new();
    let mut counts = [0usize; 3];
    let mut f16_names = Vec::new();
    for p in &prefixes {
        let take = |raw: &mut HashMap<String, RawTensor>, suffix: &str| {
            raw.remove(&format!("{p}.{suffix}"))
        };
        let qweight = take(&mut raw, "qweight").expect("listed above");
        let file = qweight.file.clone();
        let missing = |s: &str| {
            LoadError::tensor(&file, format!("{p}.{s}"), "missing (the linear has a qweight)")
        };
        let qzeros = take(&mut raw, "qzeros").ok_or_else(|| missing("qzeros"))?;
        let scales = take(&mut raw, "scales").ok_or_else(|| missing("scales"))?;
        let g_idx = take(&mut raw, "g_idx");
        if raw.contains_key(&format!("{p}.weight")) {
            return Err(LoadError::tensor(
                &file,
                format!("{p}.weight"),
                "present next to a qweight",
            ));
        }
        let unpacked = match method {
            QuantMethod::Awq { group_size } => unpack_awq(&qweight, &qzeros, &scales, *group_size),
            QuantMethod::Gptq { bits, group_size, v2, .. } => {
                unpack_gptq(&qweight, &qzeros, &scales, g_idx.as_ref(), *bits, *group_size, *v2)
            }
            QuantMethod::Qilin => unreachable!("qilin checkpoints load through the plain path"),
        }
        .map_err(|m| LoadError::tensor(&file, format!("{p}.qweight"), m))?;
        let (weight, target) =
            encode(&unpacked).map_err(|m| LoadError::tensor(&file, format!("{p}.qweight"), m))?;
        counts[target as usize] += 1;
        if target == Target::F16 {
            f16_names.push(p.clone());
        }
        out.insert(format!("{p}.weight"), weight);
    }
    let mut rest: Vec<(String, RawTensor)> = raw.into_iter().collect();
    rest.sort_by(|a, b| a.0.cmp(&b.0)); // the same error for the same bad file
    for (name, t) in rest {
        let w = t.into_weight(&name)?;
        out.insert(name, w);
    }
    tracing::info!(
        "{method:?} checkpoint: {} linears as I4, {} as I8, {} dequantized to F16",
        counts[0],
        counts[1],
        counts[2]
    );
    if !f16_names.is_empty() {
        tracing::info!(
            "dequantized to F16 (act-order groups, groups under 128, widths not a multiple of 128 or 8-bit asymmetric zeros; exact values, twice the memory): {}",
            f16_names.join(", ")
        );
    }
    Ok(out)
}

/// The tensor's values as u32 (int32 packed words), after checking dtype and shape.
fn words(t: &RawTensor, what: &str, shape: [usize; 2]) -> Result<Vec<u32>, String> {
    if t.dtype != safetensors::Dtype::I32 && t.dtype != safetensors::Dtype::U32 {
        return Err(format!("{what} is {:?}, expected I32", t.dtype));
    }
    if t.shape != shape {
        return Err(format!("{what} has shape {:?}, expected {shape:?}", t.shape));
    }
    Ok(t.data
        .as_slice()
        .chunks_exact(4)
        .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect())
}

/// Scales as f32, and whether every one is exactly an f16.
fn scales_f32(t: &RawTensor, shape: [usize; 2]) -> Result<(Vec<f32>, bool), String> {
    if t.shape != shape {
        return Err(format!("scales have shape {:?}, expected {shape:?}", t.shape));
    }
    let b = t.data.as_slice();
    let v: Vec<f32> = match t.dtype {
        safetensors::Dtype::F16 => {
            return Ok((
                b.chunks_exact(2).map(|h| f16::from_le_bytes([h[0], h[1]]).to_f32()).collect(),
                true,
            ))
        }
        safetensors::Dtype::BF16 => b
            .chunks_exact(2)
            .map(|h| f32::from_bits((u16::from_le_bytes([h[0], h[1]]) as u32) << 16))
            .collect(),
        safetensors::Dtype::F32 => {
            b.chunks_exact(4).map(|h| f32::from_le_bytes([h[0], h[1], h[2], h[3]])).collect()
        }
        other => return Err(format!("scales are {other:?}, expected F16")),
    };
    let exact = v.iter().all(|&s| f16::from_f32(s).to_f32() == s);
    Ok((v, exact))
}

/// The `[out, in]` matrix of `value(i, o)`. Tiles of 64 outputs walk the inputs in
/// the outer loop, so the packed words they read (64 consecutive outputs of one input
/// row, in both layouts) are contiguous instead of one cache line per value.
fn unpack_rows(out: usize, inp: usize, value: impl Fn(usize, usize) -> u8 + Sync) -> Vec<u8> {
    const TILE: usize = 64;
    let mut q = vec![0u8; out * inp];
    q.par_chunks_mut(TILE * inp).enumerate().for_each(|(t, tile)| {
        let rows = tile.len() / inp;
        for i in 0..inp {
            for r in 0..rows {
                tile[r * inp + i] = value(i, t * TILE + r);
            }
        }
    });
    q
}

/// Group size `g` when `g_idx[i] == i / g` for every input.
fn contiguous(g_idx: &[u32], group: usize) -> Option<usize> {
    g_idx.iter().enumerate().all(|(i, &g)| g as usize == i / group).then_some(group)
}

pub fn unpack_awq(
    qweight: &RawTensor,
    qzeros: &RawTensor,
    scales: &RawTensor,
    group_size: Option<usize>,
) -> Result<Unpacked, String> {
    let (inp, packed_out) = match qweight.shape[..] {
        [a, b] => (a, b),
        _ => return Err(format!("qweight has shape {:?}, expected [in, out / 8]", qweight.shape)),
    };
    let out = packed_out * 8;
    let group = group_size.unwrap_or(inp);
    if group == 0 || inp % group != 0 {
        return Err(format!("{inp} inputs are not whole groups of {group}"));
    }
    let groups = inp / group;
    let qw = words(qweight, "qweight", [inp, packed_out])?;
    let qz = words(qzeros, "qzeros", [groups, packed_out])?;
    let (s, scales_f16) = scales_f32(scales, [groups, out])?;
    // Column j of a word sits in nibble INV[j].
    let mut inv = [0usize; 8];
    for (k, &j) in AWQ_ORDER.iter().enumerate() {
        inv[j] = k;
    }
    let nib = |w: u32, j: usize| ((w >> (4 * inv[j])) & 0xf) as u8;
    let q = unpack_rows(out, inp, |i, o| nib(qw[i * packed_out + o / 8], o % 8));
    let z = (0..groups * out)
        .map(|gi| {
            let (g, o) = (gi / out, gi % out);
            nib(qz[g * packed_out + o / 8], o % 8) as u16
        })
        .collect();
    let g_idx: Vec<u32> = (0..inp).map(|i| (i / group) as u32).collect();
    Ok(Unpacked { out, inp, bits: 4, q, z, s, scales_f16, g_idx, contiguous_group: Some(group) })
}

pub fn unpack_gptq(
    qweight: &RawTensor,
    qzeros: &RawTensor,
    scales: &RawTensor,
    g_idx: Option<&RawTensor>,
    bits: u32,
    group_size: Option<usize>,
    v2: bool,
) -> Result<Unpacked, String> {
    let per = (32 / bits) as usize;
    let mask = (1u32 << bits) - 1;
    let (packed_in, out) = match qweight.shape[..] {
        [a, b] => (a, b),
        _ => {
            return Err(format!(
                "qweight has shape {:?}, expected [in * bits / 32, out]",
                qweight.shape
            ))
        }
    };
    let inp = packed_in * per;
    if out % per != 0 {
        return Err(format!("{out} outputs are not whole int32 words of {bits}-bit zeros"));
    }
    let groups = scales.shape.first().copied().unwrap_or(0);
    let qw = words(qweight, "qweight", [packed_in, out])?;
    let qz = words(qzeros, "qzeros", [groups, out / per])?;
    let (s, scales_f16) = scales_f32(scales, [groups, out])?;
    let group = group_size.unwrap_or(inp);
    let g_idx: Vec<u32> = match g_idx {
        Some(t) => {
            if t.shape != [inp] {
                return Err(format!("g_idx has shape {:?}, expected [{inp}]", t.shape));
            }
            let b = t.data.as_slice();
            match t.dtype {
                safetensors::Dtype::I32 => b
                    .chunks_exact(4)
                    .map(|w| u32::from_le_bytes([w[0], w[1], w[2], w[3]]))
                    .collect(),
                safetensors::Dtype::I64 => b
                    .chunks_exact(8)
                    .map(|w| u64::from_le_bytes(w.try_into().unwrap()).min(u32::MAX as u64) as u32)
                    .collect(),
                other => return Err(format!("g_idx is {other:?}, expected I32")),
            }
        }
        None => (0..inp).map(|i| (i / group.max(1)) as u32).collect(),
    };
    if let Some(bad) = g_idx.iter().find(|&&g| g as usize >= groups) {
        return Err(format!("g_idx names group {bad}, the scales have {groups}"));
    }
    let q = unpack_rows(out, inp, |i, o| {
        ((qw[(i / per) * out + o] >> (bits as usize * (i % per))) & mask) as u8
    });
    let offset = if v2 { 0 } else { 1 };
    let z = (0..groups * out)
        .map(|gi| {
            let (g, o) = (gi / out, gi % out);
            (((qz[g * (out / per) + o / per] >> (bits as usize * (o % per))) & mask) + offset)
                as u16
        })
        .collect();
    let contiguous_group = if group > 0 { contiguous(&g_idx, group) } else { None };
    Ok(Unpacked { out, inp, bits, q, z, s, scales_f16, g_idx, contiguous_group })
}

/// Which format holds `u` exactly and compactly (module header).
pub fn target(u: &Unpacked) -> Target {
    let blocks_fit =
        u.inp.is_multiple_of(BLOCK) && u.contiguous_group.is_some_and(|g| g % BLOCK == 0);
    if !blocks_fit {
        return Target::F16;
    }
    if u.bits == 4 && u.scales_f16 && u.z.iter().all(|&z| z <= 15) {
        return Target::I4;
    }
    // Every q - z in i8: 4-bit q - z is within -16..=15; 8-bit needs z = 128.
    if u.bits == 4 || u.z.iter().all(|&z| z == 128) {
        return Target::I8;
    }
    Target::F16
}

/// The weight `[out, in]` in the format `target` picks.
pub fn encode(u: &Unpacked) -> Result<(WeightTensor, Target), String> {
    let t = target(u);
    let (out, inp) = (u.out, u.inp);
    let dtype = match t {
        Target::I4 => DType::I4,
        Target::I8 => DType::I8,
        Target::F16 => DType::F16,
    };
    let row_bytes = dtype.row_bytes(inp).expect("target checked whole blocks");
    let mut data = vec![0u8; out * row_bytes];
    let group_of_block = |b: usize| b * BLOCK / u.contiguous_group.unwrap_or(1);
    data.par_chunks_mut(row_bytes).enumerate().for_each(|(o, dst)| {
        let q = &u.q[o * inp..(o + 1) * inp];
        match t {
            Target::I4 => {
                for (b, blk) in dst.chunks_exact_mut(68).enumerate() {
                    let gi = group_of_block(b) * out + o;
                    blk[..2].copy_from_slice(&f16::from_f32(u.s[gi]).to_le_bytes());
                    blk[2] = u.z[gi] as u8;
                    blk[3] = 0;
                    for (j, byte) in blk[4..].iter_mut().enumerate() {
                        *byte = q[b * BLOCK + 2 * j] | (q[b * BLOCK + 2 * j + 1] << 4);
                    }
                }
            }
            Target::I8 => {
                for (b, blk) in dst.chunks_exact_mut(132).enumerate() {
                    let gi = group_of_block(b) * out + o;
                    blk[..4].copy_from_slice(&u.s[gi].to_le_bytes());
                    let z = u.z[gi] as i32;
                    for (v, &qv) in blk[4..].iter_mut().zip(&q[b * BLOCK..(b + 1) * BLOCK]) {
                        *v = (qv as i32 - z) as i8 as u8;
                    }
                }
            }
            Target::F16 => {
                for (i, h) in dst.chunks_exact_mut(2).enumerate() {
                    let gi = u.g_idx[i] as usize * out + o;
                    // Exact in f32 for f16/bf16 scales (<= 11 + 9 significant bits).
                    let v = u.s[gi] * (q[i] as i32 - u.z[gi] as i32) as f32;
                    h.copy_from_slice(&f16::from_f32(v).to_le_bytes());
                }
            }
        }
    });
    if t == Target::F16 {
        let overflow = data.chunks_exact(2).any(|h| !f16::from_le_bytes([h[0], h[1]]).is_finite());
        if overflow {
            return Err("a dequantized weight overflows f16 (scale too large)".into());
        }
    }
    Ok((WeightTensor { dtype, shape: vec![out, inp], data: Bytes::Owned(data.into()) }, t))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn configs_of_the_published_qwen_checkpoints_parse() {
        // Qwen2.5-7B-Instruct-AWQ and -GPTQ-Int4 / -Int8 config.json quantization_config.
        let awq = json!({"bits": 4, "group_size": 128, "modules_to_not_convert": null,
                         "quant_method": "awq", "version": "gemm", "zero_point": true});
        assert_eq!(QuantMethod::from_json(&awq), Ok(QuantMethod::Awq { group_size: Some(128) }));
        for bits in [4, 8] {
            let gptq = json!({"bits": bits, "damp_percent": 0.01, "desc_act": false,
                              "group_size": 128, "quant_method": "gptq", "static_groups": false,
                              "sym": true, "true_sequential": true});
            assert_eq!(
                QuantMethod::from_json(&gptq),
                Ok(QuantMethod::Gptq { bits, group_size: Some(128), desc_act: false, v2: false })
            );
        }
    }

    #[test]
    fn unsupported_methods_and_layouts_are_named() {
        for (qc, needle) in [
            (json!({"quant_method": "fp8"}), "`fp8`"),
            (json!({"quant_method": "bitsandbytes", "load_in_4bit": true}), "`bitsandbytes`"),
            (json!({"quant_method": "awq", "bits": 4, "version": "gemv"}), "`gemv`"),
            (json!({"quant_method": "awq", "bits": 4, "zero_point": false}), "zero_point"),
            (json!({"quant_method": "gptq", "bits": 3}), "3 bits"),
            (json!({"quant_method": "gptq", "bits": 4, "checkpoint_format": "marlin"}), "`marlin`"),
            (json!({"quant_method": "gptq", "bits": 4, "group_size": 0}), "group_size 0"),
        ] {
            let err = QuantMethod::from_json(&qc).unwrap_err();
            assert!(err.contains(needle), "{qc}: {err}");
        }
    }
}
