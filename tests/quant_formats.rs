//! GGUF block formats against the python `gguf` package (`gguf.quants.dequantize`),
//! fixture made by tools/make_gguf_fixtures.py.

use qilin::model::quant::{dequantize_row, dot_row};
use qilin::model::DType;
use rand::{Rng, SeedableRng};
use serde_json::Value;

fn fixture() -> Value {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/gguf/quant_blocks.json");
    serde_json::from_str(&std::fs::read_to_string(path).expect("read fixture")).expect("json")
}

fn dtype(name: &str) -> DType {
    match name {
        "F32" => DType::F32,
        "F16" => DType::F16,
        "BF16" => DType::BF16,
        "Q8_0" => DType::Q8_0,
        "Q4_0" => DType::Q4_0,
        "Q4_1" => DType::Q4_1,
        other => panic!("unknown dtype {other}"),
    }
}

fn unhex(s: &str) -> Vec<u8> {
    (0..s.len()).step_by(2).map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap()).collect()
}

/// Fixture rows: (dtype, bytes, values as gguf dequantizes them).
fn rows() -> Vec<(DType, Vec<u8>, Vec<f32>)> {
    let fx = fixture();
    let mut out = Vec::new();
    for case in fx["cases"].as_array().unwrap() {
        let dt = dtype(case["dtype"].as_str().unwrap());
        for row in case["rows"].as_array().unwrap() {
            let values: Vec<f32> = row["values"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_f64().unwrap() as f32)
                .collect();
            out.push((dt, unhex(row["hex"].as_str().unwrap()), values));
        }
    }
    out
}

#[test]
fn dequantize_matches_gguf_python_exactly() {
    let rows = rows();
    let mut seen = std::collections::HashSet::new();
    for (dt, bytes, expected) in &rows {
        seen.insert(*dt);
        let mut out = vec![f32::NAN; expected.len()];
        dequantize_row(*dt, bytes, &mut out);
        for (i, (a, b)) in out.iter().zip(expected).enumerate() {
            assert_eq!(a.to_bits(), b.to_bits(), "{dt} element {i}: {a} vs gguf {b}");
        }
    }
    assert_eq!(seen.len(), 6, "fixture covers every dtype");
}

/// |dot - reference| within 1e-5 of the sum of |w * x| (relative error that does not
/// blow up when the terms cancel).
fn check_dot(dt: DType, bytes: &[u8], x: &[f32]) {
    let mut w = vec![0f32; x.len()];
    dequantize_row(dt, bytes, &mut w);
    let reference: f64 = w.iter().zip(x).map(|(a, b)| *a as f64 * *b as f64).sum();
    let scale: f64 = w.iter().zip(x).map(|(a, b)| (*a as f64 * *b as f64).abs()).sum();
    let got = dot_row(dt, bytes, x) as f64;
    assert!(
        (got - reference).abs() <= 1e-5 * scale + 1e-30,
        "{dt} n={}: dot {got} vs reference {reference} (scale {scale})",
        x.len()
    );
}

#[test]
fn dot_row_matches_dequantize_on_fixture_rows() {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
    for (dt, bytes, expected) in rows() {
        let x: Vec<f32> = (0..expected.len()).map(|_| rng.random_range(-2.0..2.0)).collect();
        check_dot(dt, &bytes, &x);
    }
}

/// Random rows of model-sized lengths; dequantize_row is the oracle (it matches gguf).
#[test]
fn dot_row_matches_dequantize_on_long_rows() {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(11);
    let dtypes = [DType::F32, DType::F16, DType::BF16, DType::Q8_0, DType::Q4_0, DType::Q4_1];
    for dt in dtypes {
        for n in [32, 64, 576, 1536, 4096] {
            let bytes = random_row(&mut rng, dt, n);
            let x: Vec<f32> = (0..n).map(|_| rng.random_range(-1.0..1.0)).collect();
            check_dot(dt, &bytes, &x);
        }
    }
    // Plain float rows need not be a multiple of the vector width.
    for n in [1, 7, 9, 33, 577] {
        let bytes = random_row(&mut rng, DType::F16, n);
        let x: Vec<f32> = (0..n).map(|_| rng.random_range(-1.0..1.0)).collect();
        check_dot(DType::F16, &bytes, &x);
    }
}

fn random_row(rng: &mut impl Rng, dt: DType, n: usize) -> Vec<u8> {
    let scale = |rng: &mut dyn rand::RngCore| {
        half::f16::from_f32(rand::Rng::random_range(rng, -0.1f32..0.1)).to_le_bytes()
    };
    match dt {
        DType::F32 => (0..n).flat_map(|_| rng.random_range(-1f32..1.0).to_le_bytes()).collect(),
        DType::F16 => (0..n)
            .flat_map(|_| half::f16::from_f32(rng.random_range(-1f32..1.0)).to_le_bytes())
            .collect(),
        DType::BF16 => (0..n)
            .flat_map(|_| half::bf16::from_f32(rng.random_range(-1f32..1.0)).to_le_bytes())
            .collect(),
        _ => {
            let mut out = Vec::new();
            for _ in 0..n / 32 {
                out.extend(scale(rng));
                if dt == DType::Q4_1 {
                    out.extend(scale(rng));
                }
                let payload = if dt == DType::Q8_0 { 32 } else { 16 };
                out.extend((0..payload).map(|_| rng.random::<u8>()));
            }
            out
        }
    }
}

#[test]
#[should_panic(expected = "does not hold")]
fn mismatched_row_length_is_a_caller_bug() {
    let x = vec![0f32; 64];
    dot_row(DType::Q4_1, &[0u8; 20], &x);
}
