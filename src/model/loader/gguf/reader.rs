//! The GGUF container (v2/v3, little endian): header, metadata key/values, tensor
//! infos, and where the tensor data starts. Parses a byte slice (the memory map) and
//! trusts nothing in it: every count and length is checked against the bytes that are
//! actually left before anything is allocated, so a hostile header cannot ask for
//! terabytes.

use std::collections::HashMap;

use crate::model::DType;

/// GGML_MAX_DIMS.
const MAX_DIMS: u32 = 4;
const DEFAULT_ALIGNMENT: u64 = 32;

/// A metadata value. Integers keep their width so that type errors can be reported.
#[derive(Clone, Debug, PartialEq)]
pub enum MetaValue {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    U64(u64),
    I64(i64),
    F32(f32),
    F64(f64),
    Bool(bool),
    Str(String),
    Array(Vec<MetaValue>),
}

impl MetaValue {
    /// Any integer type that fits a u64 (GGUF writers differ in the widths they use).
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            MetaValue::U8(v) => Some(v.into()),
            MetaValue::U16(v) => Some(v.into()),
            MetaValue::U32(v) => Some(v.into()),
            MetaValue::U64(v) => Some(v),
            MetaValue::I8(v) => u64::try_from(v).ok(),
            MetaValue::I16(v) => u64::try_from(v).ok(),
            MetaValue::I32(v) => u64::try_from(v).ok(),
            MetaValue::I64(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }

    pub fn as_i64(&self) -> Option<i64> {
        match *self {
            MetaValue::I8(v) => Some(v.into()),
            MetaValue::I16(v) => Some(v.into()),
            MetaValue::I32(v) => Some(v.into()),
            MetaValue::I64(v) => Some(v),
            _ => self.as_u64().and_then(|v| i64::try_from(v).ok()),
        }
    }

    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            MetaValue::F32(v) => Some(v.into()),
            MetaValue::F64(v) => Some(v),
            _ => self.as_i64().map(|v| v as f64),
        }
    }

    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            MetaValue::Bool(v) => Some(v),
            _ => None,
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            MetaValue::Str(s) => Some(s),
            _ => None,
        }
    }

    pub fn as_array(&self) -> Option<&[MetaValue]> {
        match self {
            MetaValue::Array(a) => Some(a),
            _ => None,
        }
    }
}

/// One tensor as the file describes it.
#[derive(Clone, Debug)]
pub struct TensorInfo {
    pub name: String,
    /// GGML order: fastest-varying dimension first (`token_embd.weight` is [hidden, vocab]).
    pub dims: Vec<usize>,
    pub dtype: DType,
    /// Absolute byte range in the file.
    pub start: usize,
    pub len: usize,
}

#[derive(Debug)]
pub struct GgufFile {
    pub version: u32,
    pub metadata: HashMap<String, MetaValue>,
    /// In file order.
    pub tensors: Vec<TensorInfo>,
}

impl GgufFile {
    pub fn get(&self, key: &str) -> Option<&MetaValue> {
        self.metadata.get(key)
    }

    /// Parses the whole container; tensor byte ranges are checked against `bytes.len()`.
    pub fn parse(bytes: &[u8]) -> Result<GgufFile, String> {
        let mut r = Cursor { bytes, pos: 0 };
        let magic = r.take(4, "magic")?;
        if magic != b"GGUF" {
            return Err(format!("not a GGUF file (magic {magic:02x?}, expected \"GGUF\")"));
        }
        let version = r.u32("version")?;
        match version {
            2 | 3 => {}
            1 => return Err("GGUF version 1 is not supported (re-convert the model)".into()),
            v if (1..=3).contains(&v.swap_bytes()) => {
                return Err("big-endian GGUF files are not supported".into());
            }
            v => return Err(format!("unsupported GGUF version {v} (supported: 2, 3)")),
        }
        let n_tensors = r.u64("tensor count")?;
        let n_kv = r.u64("metadata count")?;
        // A key/value takes at least 8 (key length) + 4 (type) + 1 bytes, a tensor info
        // 8 + 4 + 4 + 8.
        r.check_count(n_kv, 13, "metadata count")?;
        r.check_count(n_tensors, 24, "tensor count")?;

        let mut metadata = HashMap::new();
        for _ in 0..n_kv {
            let key = r.string("metadata key")?;
            let ty = r.u32("metadata type")?;
            let value = r.value(ty, &key, 0)?;
            if metadata.insert(key.clone(), value).is_some() {
                return Err(format!("metadata key `{key}` appears twice"));
            }
        }

        let alignment = match metadata.get("general.alignment") {
            None => DEFAULT_ALIGNMENT,
            Some(v) => match v.as_u64() {
                // The spec asks for a multiple of 8, which also keeps f32/f16 data aligned.
                Some(a) if a.is_power_of_two() && (8..=1 << 20).contains(&a) => a,
                _ => return Err(format!("invalid general.alignment {v:?}")),
            },
        };

        let mut raw = Vec::new();
        for _ in 0..n_tensors {
            let name = r.string("tensor name")?;
            let n_dims = r.u32("tensor dimension count")?;
            if n_dims == 0 || n_dims > MAX_DIMS {
                return Err(format!("tensor `{name}`: {n_dims} dimensions (1 to {MAX_DIMS})"));
            }
            let mut dims = Vec::with_capacity(n_dims as usize);
            for _ in 0..n_dims {
                let d = r.u64("tensor dimension")?;
                let d = usize::try_from(d)
                    .ok()
                    .filter(|&d| d > 0)
                    .ok_or_else(|| format!("tensor `{name}`: invalid dimension {d}"))?;
                dims.push(d);
            }
            let ty = r.u32("tensor type")?;
            let offset = r.u64("tensor offset")?;
            raw.push((name, dims, ty, offset));
        }
        let data_start = align_up(r.pos as u64, alignment).ok_or("tensor data offset overflows")?;

        let mut tensors = Vec::with_capacity(raw.len());
        let mut seen = std::collections::HashSet::new();
        for (name, dims, ty, offset) in raw {
            if !seen.insert(name.clone()) {
                return Err(format!("tensor `{name}` appears twice"));
            }
            let dtype = dtype_of(ty).map_err(|t| {
                format!(
                    "tensor `{name}` has type {t}, which is not supported (supported: {SUPPORTED})"
                )
            })?;
            if offset % alignment != 0 {
                return Err(format!("tensor `{name}`: offset {offset} is not {alignment}-aligned"));
            }
            let len = byte_len(dtype, &dims).ok_or_else(|| {
                format!("tensor `{name}`: {dtype} shape {dims:?} is not a whole number of blocks or overflows")
            })?;
            let start = data_start.checked_add(offset).and_then(|s| usize::try_from(s).ok());
            let end = start.and_then(|s| s.checked_add(len));
            match (start, end) {
                (Some(start), Some(end)) if end <= bytes.len() => {
                    tensors.push(TensorInfo { name, dims, dtype, start, len })
                }
                _ => {
                    return Err(format!(
                        "tensor `{name}`: data ({len} bytes at offset {offset}) lies beyond the end of the file ({} bytes): truncated file?",
                        bytes.len()
                    ))
                }
            }
        }
        Ok(GgufFile { version, metadata, tensors })
    }
}

fn align_up(v: u64, a: u64) -> Option<u64> {
    v.checked_add(a - 1).map(|x| x / a * a)
}

/// Bytes of a tensor with GGML dims (fastest first), None on overflow or partial blocks.
fn byte_len(dtype: DType, dims: &[usize]) -> Option<usize> {
    let first = *dims.first()?;
    if first % dtype.block_elems() != 0 {
        return None;
    }
    // Not DType::row_bytes: its product may overflow on a hostile dimension.
    let row = (first / dtype.block_elems()).checked_mul(dtype.block_bytes())?;
    dims[1..].iter().try_fold(row, |acc, &d| acc.checked_mul(d))
}

/// The GGML types `dtype_of` accepts, for the error that names an unsupported one.
const SUPPORTED: &str =
    "F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K, IQ4_NL, IQ4_XS";

/// GGML type ids (ggml.h `enum ggml_type`); Err carries the name of an unsupported one.
fn dtype_of(ty: u32) -> Result<DType, String> {
    const NAMES: [&str; 42] = [
        "F32",
        "F16",
        "Q4_0",
        "Q4_1",
        "Q4_2",
        "Q4_3",
        "Q5_0",
        "Q5_1",
        "Q8_0",
        "Q8_1",
        "Q2_K",
        "Q3_K",
        "Q4_K",
        "Q5_K",
        "Q6_K",
        "Q8_K",
        "IQ2_XXS",
        "IQ2_XS",
        "IQ3_XXS",
        "IQ1_S",
        "IQ4_NL",
        "IQ3_S",
        "IQ2_S",
        "IQ4_XS",
        "I8",
        "I16",
        "I32",
        "I64",
        "F64",
        "IQ1_M",
        "BF16",
        "Q4_0_4_4",
        "Q4_0_4_8",
        "Q4_0_8_8",
        "TQ1_0",
        "TQ2_0",
        "IQ4_NL_4_4",
        "IQ4_NL_4_8",
        "IQ4_NL_8_8",
        "MXFP4",
        "NVFP4",
        "?",
    ];
    match ty {
        0 => Ok(DType::F32),
        1 => Ok(DType::F16),
        2 => Ok(DType::Q4_0),
        3 => Ok(DType::Q4_1),
        6 => Ok(DType::Q5_0),
        7 => Ok(DType::Q5_1),
        8 => Ok(DType::Q8_0),
        10 => Ok(DType::Q2_K),
        11 => Ok(DType::Q3_K),
        12 => Ok(DType::Q4_K),
        13 => Ok(DType::Q5_K),
        14 => Ok(DType::Q6_K),
        20 => Ok(DType::IQ4_NL),
        23 => Ok(DType::IQ4_XS),
        30 => Ok(DType::BF16),
        // GGML's own I8 (24) is a plain int8 tensor, not Qilin's block format DType::I8:
        // it stays unsupported like the rest.
        t => Err(match NAMES.get(t as usize) {
            Some(n) if *n != "?" => format!("{n} ({t})"),
            _ => format!("unknown ({t})"),
        }),
    }
}

struct Cursor<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn remaining(&self) -> usize {
        self.bytes.len() - self.pos
    }

    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8], String> {
        if n > self.remaining() {
            return Err(format!(
                "truncated file: {what} needs {n} bytes at offset {}, {} left",
                self.pos,
                self.remaining()
            ));
        }
        let s = &self.bytes[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }

    fn array<const N: usize>(&mut self, what: &str) -> Result<[u8; N], String> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N, what)?);
        Ok(a)
    }

    fn u32(&mut self, what: &str) -> Result<u32, String> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }

    fn u64(&mut self, what: &str) -> Result<u64, String> {
        Ok(u64::from_le_bytes(self.array(what)?))
    }

    /// Fails unless `count` items of at least `min_size` bytes each could fit.
    fn check_count(&self, count: u64, min_size: u64, what: &str) -> Result<(), String> {
        match count.checked_mul(min_size) {
            Some(n) if n <= self.remaining() as u64 => Ok(()),
            _ => Err(format!(
                "{what} {count} is impossible with {} bytes left (corrupt header?)",
                self.remaining()
            )),
        }
    }

    fn string(&mut self, what: &str) -> Result<String, String> {
        let len = self.u64(what)?;
        self.check_count(len, 1, &format!("{what} length"))?;
        let raw = self.take(len as usize, what)?;
        String::from_utf8(raw.to_vec()).map_err(|_| format!("{what} is not valid UTF-8"))
    }

    fn value(&mut self, ty: u32, key: &str, depth: u32) -> Result<MetaValue, String> {
        let what = key;
        Ok(match ty {
            0 => MetaValue::U8(self.array::<1>(what)?[0]),
            1 => MetaValue::I8(self.array::<1>(what)?[0] as i8),
            2 => MetaValue::U16(u16::from_le_bytes(self.array(what)?)),
            3 => MetaValue::I16(i16::from_le_bytes(self.array(what)?)),
            4 => MetaValue::U32(self.u32(what)?),
            5 => MetaValue::I32(i32::from_le_bytes(self.array(what)?)),
            6 => MetaValue::F32(f32::from_le_bytes(self.array(what)?)),
            7 => match self.array::<1>(what)?[0] {
                0 => MetaValue::Bool(false),
                1 => MetaValue::Bool(true),
                b => return Err(format!("metadata `{key}`: invalid bool byte {b}")),
            },
            8 => MetaValue::Str(self.string(what)?),
            9 => {
                // Nested arrays are legal but never used by models; one level of nesting
                // is plenty and bounds the recursion.
                if depth > 1 {
                    return Err(format!("metadata `{key}`: arrays nested too deeply"));
                }
                let elem_ty = self.u32(what)?;
                let n = self.u64(what)?;
                let min_size = match elem_ty {
                    0 | 1 | 7 => 1,
                    2 | 3 => 2,
                    4..=6 => 4,
                    8..=12 => 8,
                    t => return Err(format!("metadata `{key}`: unknown array element type {t}")),
                };
                self.check_count(n, min_size, &format!("metadata `{key}` array length"))?;
                let mut items = Vec::with_capacity(n as usize);
                for _ in 0..n {
                    items.push(self.value(elem_ty, key, depth + 1)?);
                }
                MetaValue::Array(items)
            }
            10 => MetaValue::U64(self.u64(what)?),
            11 => MetaValue::I64(i64::from_le_bytes(self.array(what)?)),
            12 => MetaValue::F64(f64::from_le_bytes(self.array(what)?)),
            t => return Err(format!("metadata `{key}`: unknown value type {t}")),
        })
    }
}
