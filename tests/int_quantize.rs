//! On-the-fly int8/int4 quantization (`--quantize`) and `qilin quantize`: error bounds
//! on real fixture weights, the saved directory loading back to the very same weights
//! and tokens, the flags end to end, and how far the quantized fixture model moves from
//! its bf16 original.

mod common;
mod quant_common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use qilin::engine::load::{load_cpu_engine, EngineOptions};
use qilin::engine::SamplingParams;
use qilin::model::quantize::{load_quantized, QuantizeMethod};
use qilin::model::{load_model, DType};
use quant_common::{agreement, base_values, dequantize, float_model, report, shuffled_error};

/// hidden 128: q/k/v/o/gate/up have 128 inputs (quantized), down_proj 192 (kept).
fn base() -> PathBuf {
    common::manifest_dir().join("tests/fixtures/models/llama_mha_untied_bos")
}

fn qilin(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_qilin")).args(args).output().expect("run qilin")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn quantize_cli(model: &Path, out: &Path, method: &str, extra: &[&str]) -> Output {
    let mut args =
        vec!["quantize", "--model", model.to_str().unwrap(), "--out", out.to_str().unwrap()];
    args.extend(["--method", method]);
    args.extend(extra);
    qilin(&args)
}

fn f16_at(b: &[u8], at: usize) -> f32 {
    half::f16::from_le_bytes([b[at], b[at + 1]]).to_f32()
}

#[test]
fn every_quantized_weight_is_within_half_a_step() {
    let original = load_model(&base()).unwrap();
    for method in [QuantizeMethod::Int8, QuantizeMethod::Int4] {
        let q = load_quantized(&base(), method).unwrap();
        let mut checked = 0;
        for (name, t) in &q.tensors {
            if !t.dtype.is_quantized() {
                continue;
            }
            checked += 1;
            let w = dequantize(&original.tensors[name]);
            let back = dequantize(t);
            let k = t.row_len();
            for (r, (wr, br)) in w.chunks(k).zip(back.chunks(k)).enumerate() {
                let row = t.row(r);
                let n = t.dtype.block_elems();
                for (b, (wb, bb)) in wr.chunks(n).zip(br.chunks(n)).enumerate() {
                    let blk = &row[b * t.dtype.block_bytes()..];
                    let s = match t.dtype {
                        DType::I8 => f32::from_le_bytes(blk[..4].try_into().unwrap()),
                        _ => f16_at(blk, 0),
                    };
                    // I8/I4 round their scale up, so half a step holds exactly; the
                    // 32-value GGUF blocks (rows not whole 128-blocks) round it to
                    // nearest f16 like llama.cpp: up to 2^-11 relative per level more.
                    let slack = match t.dtype {
                        DType::Q8_0 => 1.0 + 127.0 / 1024.0,
                        DType::Q4_1 => 1.0 + 2.0 * 15.0 / 1024.0,
                        _ => 1.0 + 1e-5,
                    };
                    for (x, y) in wb.iter().zip(bb) {
                        // Half a step plus the f32 rounding of s * q.
                        let bound = s / 2.0 * slack + y.abs() * 6e-8;
                        assert!(
                            (x - y).abs() <= bound,
                            "{method:?} {name} row {r}: {x} vs {y}, s {s}"
                        );
                    }
                }
            }
        }
        // 2 layers x q, k, v, o, gate, up, down.
        assert_eq!(checked, 14, "{method:?}");
    }
}

#[test]
fn saved_directory_loads_the_same_weights_and_tokens_as_on_the_fly() {
    for (method, flag) in [(QuantizeMethod::Int4, "int4"), (QuantizeMethod::Int8, "int8")] {
        let out = tempfile::tempdir().unwrap();
        let dir = out.path().join("q");
        let o = quantize_cli(&base(), &dir, flag, &[]);
        assert!(o.status.success(), "{}", stderr(&o));
        let config: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap())
                .unwrap();
        assert_eq!(config["quantization_config"]["quant_method"], "qilin");
        assert_eq!(config["quantization_config"]["method"], flag);
        for f in ["tokenizer.json", "tokenizer_config.json", "generation_config.json"] {
            assert!(dir.join(f).exists(), "{f} not copied");
        }

        let saved = load_model(&dir).unwrap();
        let fly = load_quantized(&base(), method).unwrap();
        assert_eq!(saved.tensors.len(), fly.tensors.len());
        for (name, t) in &fly.tensors {
            let s = &saved.tensors[name];
            assert_eq!((s.dtype, &s.shape), (t.dtype, &t.shape), "{name}");
            assert!(s.bytes() == t.bytes(), "{flag} {name}: saved bytes differ");
        }
        let want = method.dtype().unwrap();
        assert_eq!(saved.tensors["model.layers.0.self_attn.q_proj.weight"].dtype, want);
        assert_eq!(saved.tensors["model.layers.1.mlp.up_proj.weight"].dtype, want);
        // The 192-wide down_proj (not whole 128-blocks) takes the 32-value GGUF block.
        let narrow = if want == DType::I8 { DType::Q8_0 } else { DType::Q4_1 };
        assert_eq!(saved.tensors["model.layers.0.mlp.down_proj.weight"].dtype, narrow);
        // Kept: embeddings, lm_head, norms.
        assert_eq!(saved.tensors["lm_head.weight"].dtype, DType::BF16);
        assert_eq!(saved.tensors["model.embed_tokens.weight"].dtype, DType::BF16);

        let options = EngineOptions { quantize: method, ..EngineOptions::default() };
        let (mut on_the_fly, _) = load_cpu_engine(&base(), &options).unwrap();
        let (mut from_disk, _) = load_cpu_engine(&dir, &EngineOptions::default()).unwrap();
        let params = SamplingParams {
            temperature: 0.0,
            max_tokens: 24,
            ignore_eos: true,
            top_logprobs: Some(5),
            ..SamplingParams::default()
        };
        let expected = common::read_expected(&base().join("expected.json"));
        for case in &expected.cases {
            let a = on_the_fly.generate(&case.prompt_ids, &params, |_| {}).unwrap();
            let b = from_disk.generate(&case.prompt_ids, &params, |_| {}).unwrap();
            assert_eq!(a.output_ids, b.output_ids, "{flag} {}", case.name);
            assert_eq!(common::our_top_logprobs(&a), common::our_top_logprobs(&b));
        }
    }
}

#[test]
fn include_embeddings_quantizes_lm_head_too() {
    let out = tempfile::tempdir().unwrap();
    let dir = out.path().join("q");
    let o = quantize_cli(&base(), &dir, "int8", &["--include-embeddings"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let saved = load_model(&dir).unwrap();
    assert_eq!(saved.tensors["lm_head.weight"].dtype, DType::I8);
    assert_eq!(saved.tensors["model.embed_tokens.weight"].dtype, DType::I8);
    let (mut engine, _) = load_cpu_engine(&dir, &EngineOptions::default()).unwrap();
    let params = SamplingParams { temperature: 0.0, max_tokens: 4, ..SamplingParams::default() };
    assert_eq!(engine.generate(&[1, 2, 3], &params, |_| {}).unwrap().output_ids.len(), 4);
}

#[test]
fn quantize_refuses_what_it_cannot_do() {
    let out = tempfile::tempdir().unwrap();
    // Output directory not empty.
    std::fs::write(out.path().join("keep.txt"), "x").unwrap();
    let o = quantize_cli(&base(), out.path(), "int4", &[]);
    assert!(!o.status.success() && stderr(&o).contains("not empty"), "{}", stderr(&o));
    // A file (GGUF) instead of a directory.
    let gguf = out.path().join("m.gguf");
    std::fs::write(&gguf, b"GGUF").unwrap();
    let o = quantize_cli(&gguf, &out.path().join("a"), "int4", &[]);
    assert!(
        !o.status.success() && stderr(&o).contains("Hugging Face model directory"),
        "{}",
        stderr(&o)
    );
    // Quantizing a quantized model.
    let first = out.path().join("first");
    assert!(quantize_cli(&base(), &first, "int4", &[]).status.success());
    let o = quantize_cli(&first, &out.path().join("second"), "int8", &[]);
    assert!(!o.status.success() && stderr(&o).contains("quantized already"), "{}", stderr(&o));
    // --method none.
    let o = quantize_cli(&base(), &out.path().join("b"), "none", &[]);
    assert!(!o.status.success() && stderr(&o).contains("int8 or int4"), "{}", stderr(&o));
}

#[test]
fn generate_takes_the_quantize_flag() {
    let model = base();
    let run = |q: &str| {
        qilin(&[
            "generate",
            "--model",
            model.to_str().unwrap(),
            "--prompt",
            "Hello there",
            "--max-tokens",
            "6",
            "--temperature",
            "0",
            "--ignore-eos",
            "--json",
            "--device",
            "cpu",
            "--quantize",
            q,
        ])
    };
    let o = run("int4");
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stderr(&o).contains("--quantize int4: 14 tensors"), "{}", stderr(&o));
    let o = run("int3");
    assert!(!o.status.success() && stderr(&o).contains("int3"), "{}", stderr(&o));
}

/// On-the-fly int8 and int4 of the fixture model against its bf16 original, with the
/// control and the bars of tests/awq_gptq.rs (`quantized_fixture_models_stay_close_to_bf16`,
/// which explains them): the quantized model must be no worse than its own weight
/// errors placed at random.
#[test]
fn on_the_fly_quantized_model_stays_close_to_bf16() {
    let default = EngineOptions::default();
    for method in [QuantizeMethod::Int8, QuantizeMethod::Int4] {
        let q = load_quantized(&base(), method).unwrap();
        let decoded: HashMap<String, Vec<f32>> = q
            .tensors
            .iter()
            .filter(|(_, t)| t.dtype.is_quantized())
            .map(|(n, t)| (n.clone(), dequantize(t)))
            .collect();
        drop(q);
        let names: Vec<String> = decoded.keys().cloned().collect();
        let options = EngineOptions { quantize: method, ..EngineOptions::default() };

        let float = float_model(&base(), &decoded);
        let fidelity = agreement(&base(), float.path(), &default, &base(), &options);
        report(&format!("{method:?} vs its decoded weights in f32"), &fidelity);
        assert!(fidelity.max <= 2e-3, "{method:?}: {fidelity:?}");
        assert!(fidelity.max_flipped_margin <= 2e-3, "{method:?}: {fidelity:?}");

        let quantized = agreement(&base(), &base(), &default, &base(), &options);
        report(&format!("{method:?} vs bf16"), &quantized);
        let control_dir =
            float_model(&base(), &shuffled_error(&base_values(&base(), &names), &decoded, 7));
        let control = agreement(&base(), &base(), &default, control_dir.path(), &default);
        report(&format!("{method:?} control (shuffled error) vs bf16"), &control);
        assert!(quantized.rms <= 1.5 * control.rms, "{method:?}: {quantized:?} vs {control:?}");
        assert!(
            quantized.top1_rate() >= control.top1_rate() - 0.15,
            "{method:?}: {quantized:?} vs {control:?}"
        );
    }
}

/// A `qilin quantize` file whose marker disagrees with its bytes, or a U8 tensor with
/// no marker, is an error naming the tensor, never a misread.
#[test]
fn a_broken_marker_is_named() {
    let out = tempfile::tempdir().unwrap();
    let dir = out.path().join("q");
    assert!(quantize_cli(&base(), &dir, "int4", &[]).status.success());
    let path = dir.join("model.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let marker: serde_json::Value =
        serde_json::from_str(&meta.metadata().as_ref().unwrap()["qilin.quantized"]).unwrap();
    let name = "model.layers.0.self_attn.q_proj.weight";
    assert_eq!(marker[name]["dtype"], "I4");
    let rewrite = |marker: serde_json::Value| {
        let meta = HashMap::from([("qilin.quantized".to_string(), marker.to_string())]);
        std::fs::write(&path, safetensors::serialize(st.tensors(), Some(meta)).unwrap()).unwrap();
        load_model(&dir).err().expect("the broken file loaded").to_string()
    };
    let mut wrong_shape = marker.clone();
    wrong_shape[name]["shape"] = serde_json::json!([128, 256]);
    let err = rewrite(wrong_shape);
    assert!(err.contains(name) && err.contains("do not hold"), "{err}");
    let mut wrong_dtype = marker.clone();
    wrong_dtype[name]["dtype"] = serde_json::json!("Q4_K");
    let err = rewrite(wrong_dtype);
    assert!(err.contains(name) && err.contains("`Q4_K`"), "{err}");
    let mut unmarked = marker.clone();
    unmarked.as_object_mut().unwrap().remove(name);
    let err = rewrite(unmarked);
    assert!(err.contains(name) && err.contains("U8"), "{err}");
}
