//! Calibrated quantization (`--calibration`, src/model/awq): folding the AWQ scales
//! keeps the unquantized model's function; on a model whose activations have outlier
//! channels, calibration lowers the int4 model's error against the unquantized one
//! well below plain int4; the flags end to end, and what they refuse.

mod common;
mod quant_common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use qilin::backend::cpu::CpuBackend;
use qilin::backend::{Backend, Batch, KvCacheShape, BLOCK_SIZE};
use qilin::engine::load::{load_cpu_engine, EngineOptions};
use qilin::engine::SamplingParams;
use qilin::model::awq::{apply_awq, fold_site, load_calibrated, quantize_calibrated};
use qilin::model::calibration::{collect, CalibrationSource, Site};
use qilin::model::forward::Model;
use qilin::model::quantize::{load_quantized, quantize_model_with, QuantizeMethod};
use qilin::model::weights::ModelWeights;
use qilin::model::{load_model, DType, LoadedModel};

/// Calibration text (written for these tests): plain English prose, enough tokens for
/// the fixture tokenizers.
const CALIBRATION: &str = "The river ran low that summer, and the ferryman spent his \
    mornings mending nets on the bank. Travellers came less often than before; the new \
    bridge upstream had taken most of them. Still, a few preferred the slow crossing, the \
    smell of the water and the sound of the oars. In the evenings he counted the coins in \
    a tin box and wrote the number in a small book, as his father had done. Some weeks \
    the number grew, some weeks it did not, and he wrote it all the same. When autumn \
    came the river rose again and the fog hid the far bank until noon.";

/// Held-out text the errors are measured on (never calibrated on).
const EVALUATION: &str = "A merchant from the coast arrived at the inn after dark and \
    asked for bread, cheese and a room facing the square. He paid in silver, which the \
    innkeeper weighed twice before he smiled. In the morning the merchant was gone, and \
    the only trace of him was a map left on the table, folded into eight.";

fn fixture(name: &str) -> PathBuf {
    common::manifest_dir().join("tests/fixtures/models").join(name)
}

fn qilin(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_qilin")).args(args).output().expect("run qilin")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn calibration_file(dir: &Path) -> PathBuf {
    let path = dir.join("calibration.txt");
    std::fs::write(&path, CALIBRATION).unwrap();
    path
}

/// The logits of every position of `text` read as one sequence, on the CPU.
fn logits(model: &LoadedModel, text: &str) -> Vec<f32> {
    let ids = model.tokenizer.encode(text, true).unwrap();
    let c = model.config.clone();
    let backend = CpuBackend::new();
    let weights = ModelWeights::load(&backend, model).unwrap();
    let mut m = Model::new(c.clone(), backend, weights);
    let blocks = ids.len().div_ceil(BLOCK_SIZE);
    let mut cache = m
        .backend
        .alloc_kv_cache(KvCacheShape {
            num_layers: c.num_layers,
            num_blocks: blocks,
            num_kv_heads: c.num_kv_heads,
            head_dim: c.head_dim,
        })
        .unwrap();
    let table: Vec<u32> = (0..blocks as u32).collect();
    let mut batch = Batch::default();
    batch.push_seq(&ids, 0, &table, false);
    batch.logits_rows = (0..ids.len() as u32).collect();
    let out = m.forward(&batch, &mut cache);
    assert_eq!(out.len(), ids.len() * c.vocab_size);
    out
}

fn squared_distance(a: &[f32], b: &[f32]) -> f64 {
    a.iter().zip(b).map(|(&x, &y)| (x as f64 - y as f64).powi(2)).sum()
}

/// A copy of the fixture `base` (as F32) with outlier activation channels made on
/// purpose, without changing the model's function: in every layer, rows `rows` of
/// up_proj times 30 and the down_proj columns they feed divided by 30; with `attention`
/// also rows `rows` of v_proj times 30 and the o_proj columns they feed (that channel of
/// every query head of the group) divided by 30.
fn outlier_model(base: &Path, rows: &[usize], attention: bool) -> tempfile::TempDir {
    let model = load_model(base).unwrap();
    let c = &model.config;
    let group = c.num_heads / c.num_kv_heads;
    let mut replace = HashMap::new();
    let mut scale =
        |layer: usize, producer: &str, consumer: &str, columns: &dyn Fn(usize) -> Vec<usize>| {
            let p = format!("model.layers.{layer}");
            let (wp, wc) = (format!("{p}.{producer}.weight"), format!("{p}.{consumer}.weight"));
            let mut a = quant_common::dequantize(&model.tensors[&wp]);
            let mut b = quant_common::dequantize(&model.tensors[&wc]);
            let (ka, kb) = (model.tensors[&wp].row_len(), model.tensors[&wc].row_len());
            for &r in rows {
                a[r * ka..(r + 1) * ka].iter_mut().for_each(|v| *v *= 30.0);
                for col in columns(r) {
                    b.chunks_mut(kb).for_each(|row| row[col] /= 30.0);
                }
            }
            replace.insert(wp, a);
            replace.insert(wc, b);
        };
    for layer in 0..c.num_layers {
        scale(layer, "mlp.up_proj", "mlp.down_proj", &|r| vec![r]);
        if attention {
            let hd = c.head_dim;
            let columns = |r: usize| -> Vec<usize> {
                (0..group).map(|g| ((r / hd) * group + g) * hd + r % hd).collect()
            };
            scale(layer, "self_attn.v_proj", "self_attn.o_proj", &columns);
        }
    }
    quant_common::float_model(base, &replace)
}

/// Scales spread over [0.25, 4], different for every index.
fn spread_scales(n: usize, seed: usize) -> Vec<f32> {
    (0..n).map(|i| 0.25 * 16f32.powf(((i * 7919 + seed * 104_729) % 101) as f32 / 100.0)).collect()
}

/// Every site of every layer of every fixture model (MHA and GQA, Llama and Qwen2 with
/// its q/k/v biases, tied and untied) scaled by very uneven scales: the logits stay
/// those of the original model within f32 rounding, while the weights did change.
#[test]
fn folded_scales_keep_the_unquantized_model_the_same() {
    for dir in common::fixture_models() {
        let original = load_model(&dir).unwrap();
        let mut folded = load_model(&dir).unwrap();
        let c = original.config.clone();
        let mut sites = 0;
        for layer in 0..c.num_layers {
            for (i, site) in Site::ALL.into_iter().enumerate() {
                let n = match site {
                    Site::Qkv | Site::GateUp => c.hidden_size,
                    Site::O => c.num_kv_heads * c.head_dim,
                    Site::Down => c.intermediate_size,
                };
                fold_site(&mut folded, layer, site, &spread_scales(n, layer * 4 + i))
                    .unwrap_or_else(|e| panic!("{}: layer {layer} {site:?}: {e}", dir.display()));
                sites += 1;
            }
        }
        assert_eq!(sites, 4 * c.num_layers);
        let norm = "model.layers.0.input_layernorm.weight";
        assert_eq!(folded.tensors[norm].dtype, DType::F32);
        let (a, b) = (
            quant_common::dequantize(&original.tensors[norm]),
            quant_common::dequantize(&folded.tensors[norm]),
        );
        assert!(
            a.iter().zip(&b).filter(|(x, y)| x != y).count() > a.len() / 2,
            "the norm was not rescaled"
        );

        let (want, got) = (logits(&original, EVALUATION), logits(&folded, EVALUATION));
        let scale = want.iter().fold(0f32, |m, v| m.max(v.abs()));
        let worst = want.iter().zip(&got).fold(0f32, |m, (x, y)| m.max((x - y).abs()));
        eprintln!("{}: largest logit {scale:.3}, largest difference {worst:.2e}", dir.display());
        assert!(worst <= 2e-5 * scale.max(1.0), "{}: logits moved by {worst}", dir.display());
    }
}

/// The Qwen2 fixture (down_proj has 128 inputs: one I4 group per row) with outlier
/// activation channels made on purpose: 8 of up_proj's 128 rows times 30 and the
/// down_proj columns they feed divided by 30, which leaves the model's function as it
/// was. Plain int4 rounds those now tiny down_proj weights to the group's coarse grid
/// (mostly to zero), and the large activations multiply that error. On text it was not
/// calibrated on, calibration must cut down_proj's output error at least in half, and
/// bring the logits closer to the unquantized model's than plain int4 does (the other
/// layers' errors, which the outliers do not concern, dominate the logits of this
/// random-weight model).
#[test]
fn calibration_beats_plain_int4_on_outlier_channels() {
    let outliers =
        outlier_model(&fixture("qwen2_gqa4_hd128_tied"), &[5, 17, 40, 63, 77, 99, 110, 121], false);
    let dir = outliers.path();
    let model = load_model(dir).unwrap();
    let c = model.config.clone();
    let ffn = c.intermediate_size;
    let eval_ids = model.tokenizer.encode(EVALUATION, false).unwrap();
    let held_out = collect(&model, &eval_ids, &|_, _| false).unwrap();

    let plain = load_quantized(dir, QuantizeMethod::Int4).unwrap();
    let mut calibrated = load_model(dir).unwrap();
    let cal_ids = calibrated.tokenizer.encode(CALIBRATION, false).unwrap();
    let acts = collect(&calibrated, &cal_ids, &|_, k| k.is_multiple_of(128)).unwrap();
    let (report, gptq) = apply_awq(&mut calibrated, &acts, QuantizeMethod::Int4).unwrap();
    quantize_model_with(&mut calibrated, QuantizeMethod::Int4, false, gptq).unwrap();

    // || X (W - W_q)^T ||^2 of each layer's down_proj on the held-out inputs; the
    // calibrated model computes with its weights divided by the scales (its inputs
    // are divided by them, through up_proj).
    let (mut e_plain, mut e_calibrated) = (0f64, 0f64);
    for layer in 0..c.num_layers {
        let name = format!("model.layers.{layer}.mlp.down_proj.weight");
        assert_eq!(calibrated.tensors[&name].dtype, DType::I4);
        let w = quant_common::dequantize(&model.tensors[&name]);
        let site = report.sites.iter().find(|s| s.layer == layer && s.site == Site::Down).unwrap();
        assert!(site.alpha > 0.0 && site.gptq, "layer {layer}: {site:?}");
        let mut w_cal = quant_common::dequantize(&calibrated.tensors[&name]);
        for row in w_cal.chunks_mut(ffn) {
            row.iter_mut().zip(&site.scales).for_each(|(v, &s)| *v /= s);
        }
        let w_plain = quant_common::dequantize(&plain.tensors[&name]);
        let x = held_out.get(layer, Site::Down).unwrap();
        assert_eq!(x.rows, eval_ids.len());
        let error = |wq: &[f32]| -> f64 {
            let mut total = 0f64;
            for xr in x.samples.chunks(ffn) {
                for (a, b) in w.chunks(ffn).zip(wq.chunks(ffn)) {
                    let y: f64 = xr
                        .iter()
                        .zip(a.iter().zip(b))
                        .map(|(&x, (&a, &b))| x as f64 * (a - b) as f64)
                        .sum();
                    total += y * y;
                }
            }
            total
        };
        e_plain += error(&w_plain);
        e_calibrated += error(&w_cal);
    }
    eprintln!("down_proj output error on held-out text: plain int4 {e_plain:.4e}, calibrated {e_calibrated:.4e}");
    assert!(e_calibrated < 0.5 * e_plain, "calibrated {e_calibrated} vs plain {e_plain}");

    let reference = logits(&model, EVALUATION);
    let l_plain = squared_distance(&logits(&plain, EVALUATION), &reference);
    let l_calibrated = squared_distance(&logits(&calibrated, EVALUATION), &reference);
    eprintln!("squared logit error: plain int4 {l_plain:.4e}, calibrated {l_calibrated:.4e}");
    assert!(l_calibrated < 0.9 * l_plain, "calibrated {l_calibrated} vs plain {l_plain}");
}

/// Every fixture model, calibrated int4 against plain int4, on held-out text: a broad
/// bound, since random weights have no outlier channels to exploit and their logits
/// amplify any error; calibration must not make any of them clearly worse.
#[test]
fn calibrated_int4_stays_as_close_as_plain_int4() {
    let tmp = tempfile::tempdir().unwrap();
    let calibration = calibration_file(tmp.path());
    for dir in common::fixture_models() {
        let reference = logits(&load_model(&dir).unwrap(), EVALUATION);
        let plain = load_quantized(&dir, QuantizeMethod::Int4).unwrap();
        let source = CalibrationSource { path: &calibration, max_tokens: 4096 };
        let calibrated = load_calibrated(&dir, QuantizeMethod::Int4, &source).unwrap();
        let e_plain = squared_distance(&logits(&plain, EVALUATION), &reference);
        let e_calibrated = squared_distance(&logits(&calibrated, EVALUATION), &reference);
        eprintln!(
            "{}: squared logit error plain {e_plain:.4e}, calibrated {e_calibrated:.4e}",
            dir.display()
        );
        assert!(e_calibrated < 1.2 * e_plain, "{}: {e_calibrated} vs {e_plain}", dir.display());
    }
}

/// Undoing every fold of a calibrated int4 model (columns divided by their scales,
/// fold-target rows multiplied back) must give the original weights up to int4's
/// error, site by site, on fixtures with outlier channels in the v -> o and up -> down
/// paths. The Llama MHA fixture has 128 inputs everywhere but down_proj: q/k/v, o,
/// gate and up all go through GPTQ, and the o and down folds rescale rows of v_proj
/// and up_proj, which must happen before those are quantized.
#[test]
fn calibrated_weights_undo_to_the_originals_within_int4_error() {
    let tmp = tempfile::tempdir().unwrap();
    let calibration = calibration_file(tmp.path());
    let source = CalibrationSource { path: &calibration, max_tokens: 4096 };
    for name in ["llama_mha_untied_bos", "qwen2_gqa4_hd128_tied"] {
        // Outliers make the scales far from 1, so a fold applied to already quantized
        // rows (or not at all) could not hide inside int4's error.
        let outliers = outlier_model(&fixture(name), &[3, 50, 100], true);
        let dir = outliers.path();
        let original = load_model(dir).unwrap();
        let mut calibrated = load_model(dir).unwrap();
        let (_, report) =
            quantize_calibrated(&mut calibrated, QuantizeMethod::Int4, false, &source).unwrap();
        for line in report.summary() {
            eprintln!("{name}: {line}");
        }
        let c = &original.config;
        let scales = |layer: usize, site: Site| -> Vec<f32> {
            let s = report.sites.iter().find(|s| s.layer == layer && s.site == site);
            s.map(|s| s.scales.clone()).unwrap_or_default()
        };
        let mut folded_rows = 0;
        for layer in 0..c.num_layers {
            let p = format!("model.layers.{layer}");
            let (s_o, s_down) = (scales(layer, Site::O), scales(layer, Site::Down));
            folded_rows += s_o.iter().chain(&s_down).filter(|&&s| s != 1.0).count();
            for (site, parts) in [
                (Site::Qkv, vec!["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"]),
                (Site::O, vec!["self_attn.o_proj"]),
                (Site::GateUp, vec!["mlp.gate_proj", "mlp.up_proj"]),
                (Site::Down, vec!["mlp.down_proj"]),
            ] {
                let cols = scales(layer, site);
                let group = c.num_heads / c.num_kv_heads;
                for part in parts {
                    let tensor = format!("{p}.{part}.weight");
                    let want = quant_common::dequantize(&original.tensors[&tensor]);
                    let mut got = quant_common::dequantize(&calibrated.tensors[&tensor]);
                    let k = original.tensors[&tensor].row_len();
                    for (r, row) in got.chunks_mut(k).enumerate() {
                        for (j, v) in row.iter_mut().enumerate() {
                            // o_proj's scales are per v row, shared across the group.
                            let hd = c.head_dim;
                            let col = match site {
                                Site::O => (j / hd / group) * hd + j % hd,
                                _ => j,
                            };
                            *v /= cols.get(col).copied().unwrap_or(1.0);
                            *v *= match part {
                                "self_attn.v_proj" => s_o.get(r).copied().unwrap_or(1.0),
                                "mlp.up_proj" => s_down.get(r).copied().unwrap_or(1.0),
                                _ => 1.0,
                            };
                        }
                    }
                    let err: f64 =
                        want.iter().zip(&got).map(|(a, b)| (a - b) as f64 * (a - b) as f64).sum();
                    let norm: f64 = want.iter().map(|&a| a as f64 * a as f64).sum();
                    let relative = (err / norm).sqrt();
                    eprintln!("{name} {tensor}: relative error {relative:.4}");
                    assert!(relative < 0.35, "{name} {tensor}: relative error {relative}");
                }
            }
        }
        assert!(folded_rows > 0, "{name}: no o_proj or down_proj scales were folded into rows");
        let spread = report
            .sites
            .iter()
            .filter(|s| matches!(s.site, Site::O | Site::Down))
            .flat_map(|s| s.scales.iter())
            .fold(1f32, |m, &s| m.max(s).max(1.0 / s));
        assert!(spread > 3.0, "{name}: row scales within {spread}x of 1 would not show a bad fold");
    }
}

/// `qilin quantize --calibration` saves what `--quantize int4 --calibration` computes
/// at load: same bytes, same tokens; config.json records the calibration.
#[test]
fn saved_calibrated_directory_matches_the_load_time_path() {
    let base = fixture("qwen2_gqa4_hd128_tied");
    let tmp = tempfile::tempdir().unwrap();
    let calibration = calibration_file(tmp.path());
    let out = tmp.path().join("q");
    let o = qilin(&[
        "quantize",
        "--model",
        base.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--method",
        "int4",
        "--calibration",
        calibration.to_str().unwrap(),
        "--calibration-tokens",
        "100",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stderr(&o).contains("down_proj: 3 layers"), "{}", stderr(&o));
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap()).unwrap();
    // o_proj (512 inputs) and down_proj (128) are I4: GPTQ ran.
    assert_eq!(config["quantization_config"]["calibration"]["method"], "awq+gptq");
    assert_eq!(config["quantization_config"]["calibration"]["tokens"], 100);

    let saved = load_model(&out).unwrap();
    let source = CalibrationSource { path: &calibration, max_tokens: 100 };
    let fly = load_calibrated(&base, QuantizeMethod::Int4, &source).unwrap();
    assert_eq!(saved.tensors.len(), fly.tensors.len());
    for (name, t) in &fly.tensors {
        let s = &saved.tensors[name];
        assert_eq!((s.dtype, &s.shape), (t.dtype, &t.shape), "{name}");
        assert!(s.bytes() == t.bytes(), "{name}: saved bytes differ");
    }

    let options = EngineOptions {
        quantize: QuantizeMethod::Int4,
        calibration: Some(source),
        ..EngineOptions::default()
    };
    let (mut on_the_fly, _) = load_cpu_engine(&base, &options).unwrap();
    let (mut from_disk, _) = load_cpu_engine(&out, &EngineOptions::default()).unwrap();
    let params = SamplingParams {
        temperature: 0.0,
        max_tokens: 12,
        ignore_eos: true,
        ..SamplingParams::default()
    };
    let prompt = on_the_fly.tokenizer.encode(EVALUATION, true).unwrap();
    let a = on_the_fly.generate(&prompt, &params, |_| {}).unwrap();
    let b = from_disk.generate(&prompt, &params, |_| {}).unwrap();
    assert_eq!(a.output_ids, b.output_ids);
}

#[test]
fn calibration_flags_refuse_what_they_cannot_do() {
    let base = fixture("qwen2_gqa4_hd128_tied");
    let tmp = tempfile::tempdir().unwrap();
    let calibration = calibration_file(tmp.path());
    let generate = |extra: &[&str]| {
        let mut args = vec![
            "generate",
            "--model",
            base.to_str().unwrap(),
            "--prompt",
            "Hello",
            "--max-tokens",
            "2",
            "--device",
            "cpu",
        ];
        args.extend(extra);
        qilin(&args)
    };
    let cal = calibration.to_str().unwrap();
    // Without --quantize there is nothing to calibrate.
    let o = generate(&["--calibration", cal]);
    assert!(!o.status.success() && stderr(&o).contains("add --quantize"), "{}", stderr(&o));
    // --calibration-tokens alone.
    let o = generate(&["--quantize", "int4", "--calibration-tokens", "100"]);
    assert!(!o.status.success() && stderr(&o).contains("--calibration"), "{}", stderr(&o));
    // Too few tokens asked for, a missing file, a text too short.
    let o = generate(&["--quantize", "int4", "--calibration", cal, "--calibration-tokens", "10"]);
    assert!(!o.status.success() && stderr(&o).contains("at least 64"), "{}", stderr(&o));
    let missing = tmp.path().join("missing.txt");
    let o = generate(&["--quantize", "int4", "--calibration", missing.to_str().unwrap()]);
    assert!(!o.status.success() && stderr(&o).contains("missing.txt"), "{}", stderr(&o));
    let short = tmp.path().join("short.txt");
    std::fs::write(&short, "Too short.").unwrap();
    let o = generate(&["--quantize", "int4", "--calibration", short.to_str().unwrap()]);
    assert!(!o.status.success() && stderr(&o).contains("fewer than"), "{}", stderr(&o));
    // It works with both.
    let o = generate(&["--quantize", "int4", "--calibration", cal]);
    assert!(o.status.success(), "{}", stderr(&o));
    // A model quantized already (this GGUF's layers are Q8_0): said, and no harm done.
    let gguf = common::manifest_dir().join("tests/fixtures/gguf/tiny_qwen2.gguf");
    let o = qilin(&[
        "generate",
        "--model",
        gguf.to_str().unwrap(),
        "--prompt",
        "Hello",
        "--max-tokens",
        "2",
        "--device",
        "cpu",
        "--quantize",
        "int4",
        "--calibration",
        cal,
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stderr(&o).contains("changes nothing here"), "{}", stderr(&o));
    // qilin quantize: a wrong --calibration path leaves no output directory behind.
    let out = tmp.path().join("never");
    let o = qilin(&[
        "quantize",
        "--model",
        base.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--method",
        "int4",
        "--calibration",
        missing.to_str().unwrap(),
    ]);
    assert!(!o.status.success() && stderr(&o).contains("no such file"), "{}", stderr(&o));
    assert!(!out.exists());
}
