//! AWQ and GPTQ checkpoints made by tools/make_awq_gptq_fixtures.py (packed as AutoAWQ
//! and AutoGPTQ pack; tools/check_awq_gptq_fixtures.py confirms the references with
//! those projects' own readers): our load-time conversion reproduces the reference
//! weights bit for bit, in the format the loader promises, and the quantized models
//! answer like their bf16 originals.

mod common;
mod quant_common;

use std::collections::HashMap;
use std::path::PathBuf;

use qilin::engine::load::EngineOptions;
use qilin::model::{load_model, DType};
use quant_common::{
    agreement, base_values, dequantize, float_model, fnv1a64, report, shuffled_error,
};
use serde_json::Value;

fn fixtures() -> PathBuf {
    common::manifest_dir().join("tests/fixtures/awq_gptq")
}

fn reference(variant: &str) -> Value {
    let path = fixtures().join(variant).join("reference.json");
    serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap()
}

/// The full checkpoint of `variant`: the base fixture model with the quantized linears'
/// tensors in place of their `.weight`, and `quantization_config` in config.json (the
/// same assembly as the script's --write-full).
fn assemble(variant: &str) -> tempfile::TempDir {
    let r = reference(variant);
    let base =
        common::manifest_dir().join("tests/fixtures/models").join(r["base"].as_str().unwrap());
    let dir = tempfile::tempdir().unwrap();
    for f in ["tokenizer.json", "tokenizer_config.json", "generation_config.json"] {
        std::fs::copy(base.join(f), dir.path().join(f)).unwrap();
    }
    let mut config: Value =
        serde_json::from_str(&std::fs::read_to_string(base.join("config.json")).unwrap()).unwrap();
    config["quantization_config"] = r["quantization_config"].clone();
    std::fs::write(dir.path().join("config.json"), config.to_string()).unwrap();
    let base_bytes = std::fs::read(base.join("model.safetensors")).unwrap();
    let quant_bytes =
        std::fs::read(fixtures().join(variant).join("quantized.safetensors")).unwrap();
    let base_st = safetensors::SafeTensors::deserialize(&base_bytes).unwrap();
    let quant_st = safetensors::SafeTensors::deserialize(&quant_bytes).unwrap();
    let replaced: Vec<String> =
        quant_st.names().iter().map(|n| n.rsplit_once('.').unwrap().0.to_string()).collect();
    let mut tensors: Vec<(String, safetensors::tensor::TensorView)> = quant_st.tensors();
    for (name, view) in base_st.tensors() {
        if !replaced.contains(&name.rsplit_once('.').unwrap().0.to_string()) {
            tensors.push((name, view));
        }
    }
    safetensors::serialize_to_file(tensors, None, &dir.path().join("model.safetensors")).unwrap();
    dir
}

/// What the loader must turn each linear into (src/model/loader/awq_gptq.rs header).
fn expected_dtype(variant: &str, prefix: &str) -> DType {
    match variant {
        "awq_g128" | "gptq_v2_4bit_asym_g256" => DType::I4,
        // down_proj: 192 inputs, not whole 128-value blocks.
        "gptq_4bit_sym_g128" if prefix.ends_with("down_proj") => DType::F16,
        "gptq_4bit_sym_g128" => DType::I4,
        // Zero 128 everywhere: q - 128 is the i8.
        "gptq_8bit_sym_g128" => DType::I8,
        // q_proj has a zero read as 16 (v1), which I4 cannot hold.
        "gptq_4bit_asym_g128" if prefix.ends_with("q_proj") => DType::I8,
        "gptq_4bit_asym_g128" => DType::I4,
        // Act-order groups, 8-bit asymmetric zeros, groups of 64.
        "gptq_4bit_asym_desc_act" | "gptq_8bit_asym_g128" | "awq_g64" => DType::F16,
        other => panic!("no expectation for {other}"),
    }
}

const VARIANTS: [&str; 8] = [
    "awq_g128",
    "awq_g64",
    "gptq_4bit_sym_g128",
    "gptq_8bit_sym_g128",
    "gptq_4bit_asym_g128",
    "gptq_4bit_asym_desc_act",
    "gptq_8bit_asym_g128",
    "gptq_v2_4bit_asym_g256",
];

#[test]
fn load_time_dequantization_equals_the_reference_exactly() {
    let mut seen = HashMap::new();
    for variant in VARIANTS {
        let dir = assemble(variant);
        let model = load_model(dir.path()).unwrap_or_else(|e| panic!("{variant}: {e}"));
        let r = reference(variant);
        for (prefix, t_ref) in r["tensors"].as_object().unwrap() {
            let t = &model.tensors[&format!("{prefix}.weight")];
            let want = expected_dtype(variant, prefix);
            assert_eq!(t.dtype, want, "{variant} {prefix}");
            *seen.entry(want).or_insert(0) += 1;
            let shape: Vec<usize> = t_ref["shape"]
                .as_array()
                .unwrap()
                .iter()
                .map(|d| d.as_u64().unwrap() as usize)
                .collect();
            assert_eq!(t.shape, shape, "{variant} {prefix}");
            let values = dequantize(t);
            // I4 and I8 hold the exact values; F16 holds them rounded once to f16.
            let f16 = t.dtype == DType::F16;
            for s in t_ref["samples"].as_array().unwrap() {
                let (o, i) = (s[0].as_u64().unwrap() as usize, s[1].as_u64().unwrap() as usize);
                let exact = s[2].as_f64().unwrap() as f32;
                let want = if f16 { half::f16::from_f32(exact).to_f32() } else { exact };
                let got = values[o * shape[1] + i];
                assert_eq!(
                    got.to_bits(),
                    want.to_bits(),
                    "{variant} {prefix}[{o}, {i}]: {got} vs {want}"
                );
            }
            let key = if f16 { "fnv1a64_f16" } else { "fnv1a64_f32" };
            let hash = fnv1a64(values.iter().flat_map(|v| v.to_le_bytes()));
            assert_eq!(hash, t_ref[key].as_str().unwrap(), "{variant} {prefix}: {key}");
        }
    }
    // Every conversion path was taken.
    for d in [DType::I4, DType::I8, DType::F16] {
        assert!(seen.get(&d).is_some_and(|&n| n > 0), "no linear became {d}");
    }
}

/// The quantized fixture models against two yardsticks, teacher-forced along the
/// yardstick's greedy continuations of the fixture prompts (16 tokens x 4 prompts):
///
/// 1. The same model holding, in f32, exactly the weights our loader decoded. Only the
///    summation order differs (block dot products vs f32 rows), so logprobs agree to
///    ~1e-4 of logits that span tens of nats: bar 2e-3, and top-1 may differ only at
///    ties that close. This is where a kernel or loader bug would show.
/// 2. The bf16 original. These random fixture models are built to be confident (weights
///    of std ~0.18, logits spanning tens of nats) and have none of a trained model's
///    redundancy, so even 8-bit weights (~0.7% relative error) move logprobs by ~0.5
///    nats and 4-bit ones (~10%) by several: an absolute bar would only restate this
///    run. The bar is relative to a control: the original plus the *same* weight errors
///    shuffled to random positions within each tensor. The quantized model must deviate
///    no more than 1.5x the control's logprob RMS (seen: 0.8x-1.1x) with top-1
///    agreement within 15 points of it (seen: -8 to +14): quantization error acts like
///    random error of its size, with no systematic part (a bias in every group, errors
///    concentrated on a few rows) that would make it worse.
#[test]
fn quantized_fixture_models_stay_close_to_bf16() {
    let default = EngineOptions::default();
    for variant in VARIANTS {
        if variant == "gptq_4bit_asym_g128" {
            continue; // a group was altered on purpose before quantizing (reference.json)
        }
        let r = reference(variant);
        let base =
            common::manifest_dir().join("tests/fixtures/models").join(r["base"].as_str().unwrap());
        let dir = assemble(variant);
        let loaded = load_model(dir.path()).unwrap();
        let names: Vec<String> =
            r["tensors"].as_object().unwrap().keys().map(|p| format!("{p}.weight")).collect();
        let decoded: HashMap<String, Vec<f32>> =
            names.iter().map(|n| (n.clone(), dequantize(&loaded.tensors[n]))).collect();
        drop(loaded);

        let float = float_model(&base, &decoded);
        let fidelity = agreement(&base, float.path(), &default, dir.path(), &default);
        report(&format!("{variant} vs its decoded weights in f32"), &fidelity);
        assert!(fidelity.max <= 2e-3, "{variant}: {fidelity:?}");
        assert!(fidelity.max_flipped_margin <= 2e-3, "{variant}: {fidelity:?}");

        let quantized = agreement(&base, &base, &default, dir.path(), &default);
        report(&format!("{variant} vs bf16"), &quantized);
        let control_dir =
            float_model(&base, &shuffled_error(&base_values(&base, &names), &decoded, 7));
        let control = agreement(&base, &base, &default, control_dir.path(), &default);
        report(&format!("{variant} control (shuffled error) vs bf16"), &control);
        assert!(
            quantized.rms <= 1.5 * control.rms,
            "{variant}: {quantized:?} vs control {control:?}"
        );
        assert!(
            quantized.top1_rate() >= control.top1_rate() - 0.15,
            "{variant}: {quantized:?} vs control {control:?}"
        );
    }
}

#[test]
fn unsupported_quantization_is_a_clear_error() {
    let dir = assemble("awq_g128");
    let config_path = dir.path().join("config.json");
    let config: Value =
        serde_json::from_str(&std::fs::read_to_string(&config_path).unwrap()).unwrap();
    let with = |qc: Value| {
        let mut c = config.clone();
        c["quantization_config"] = qc;
        std::fs::write(&config_path, c.to_string()).unwrap();
        match load_model(dir.path()) {
            Ok(_) => panic!("loaded with {}", c["quantization_config"]),
            Err(e) => e.to_string(),
        }
    };
    let err = with(serde_json::json!({"quant_method": "fp8"}));
    assert!(err.contains("config.json") && err.contains("`fp8`"), "{err}");
    let err = with(serde_json::json!({"quant_method": "awq", "bits": 4, "version": "gemv"}));
    assert!(err.contains("`gemv`"), "{err}");
    let err = with(serde_json::json!({"quant_method": "gptq", "bits": 2, "group_size": 128}));
    assert!(err.contains("2 bits"), "{err}");
    // The GEMM tensors read as GPTQ: qweight [128, 16] is not [in * 4 / 32, out] for
    // scales of 128 outputs.
    let err = with(serde_json::json!({"quant_method": "gptq", "bits": 4, "group_size": 128}));
    assert!(err.contains("qweight") || err.contains("scales") || err.contains("qzeros"), "{err}");
    // Without a quantization_config, the packed tensors are an error naming the dtype.
    let mut c = config.clone();
    c.as_object_mut().unwrap().remove("quantization_config");
    std::fs::write(&config_path, c.to_string()).unwrap();
    let err = load_model(dir.path()).err().expect("I32 tensors without a quant method").to_string();
    assert!(
        err.contains("model.layers.0.mlp.gate_proj.qweight") && err.contains("quantization_config"),
        "{err}"
    );
}

#[test]
fn a_linear_missing_its_zeros_is_named() {
    let dir = assemble("awq_g64");
    let path = dir.path().join("model.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let kept: Vec<_> = st.tensors().into_iter().filter(|(n, _)| !n.ends_with(".qzeros")).collect();
    let out = safetensors::serialize(kept, None).unwrap();
    std::fs::write(&path, out).unwrap();
    let err = load_model(dir.path()).err().expect("missing qzeros").to_string();
    assert!(
        err.contains("model.layers.0.self_attn.q_proj.qzeros") && err.contains("missing"),
        "{err}"
    );
}
