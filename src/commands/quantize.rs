//! `qilin quantize --model IN --out DIR --method int8|int4 [--calibration TEXT]`:
//! quantizes a Hugging Face model directory once (src/model/quantize.rs, the same code
//! as `--quantize`; with `--calibration`, AWQ scales and clipping, then GPTQ for int4
//! groups: src/model/awq/) and saves a directory that qilin loads directly. The
//! on-disk format (config.json's `quantization_config`, U8 block tensors and the
//! `qilin.quantized` safetensors metadata marker) is documented in
//! src/model/loader/qilin_format.rs; `quantization_config.calibration` records a
//! calibrated run.

use std::path::Path;

use anyhow::{bail, Context};
use serde_json::{json, Value};

use crate::config::QuantizeArgs;
use crate::model::awq::quantize_calibrated;
use crate::model::loader::qilin_format;
use crate::model::quantize::{quantize_model, QuantizeMethod, Skip};

/// Files of the input directory never copied: the weights (rewritten) and formats we
/// do not read.
fn is_weight_file(name: &str) -> bool {
    name == "config.json"
        || name == "model.safetensors.index.json"
        || [".safetensors", ".bin", ".pt", ".pth", ".gguf", ".h5", ".msgpack", ".onnx"]
            .iter()
            .any(|ext| name.ends_with(ext))
}

pub fn run(args: &QuantizeArgs) -> anyhow::Result<()> {
    let (input, out) = (args.model.as_path(), args.out.as_path());
    if args.method == QuantizeMethod::None {
        bail!("--method none would write an unquantized copy; choose int8 or int4");
    }
    if let Some(text) = &args.calibration.calibration {
        // Before the output directory is made: a wrong path should leave nothing behind.
        if !text.is_file() {
            bail!("--calibration {}: no such file", text.display());
        }
    }
    if !input.is_dir() {
        bail!(
            "{}: qilin quantize reads a Hugging Face model directory (config.json + safetensors); GGUF files are quantized already",
            input.display()
        );
    }
    let config_path = input.join("config.json");
    let text = std::fs::read_to_string(&config_path)
        .with_context(|| format!("reading {}", config_path.display()))?;
    let mut config: Value = serde_json::from_str(&text)
        .with_context(|| format!("{}: not valid JSON", config_path.display()))?;
    if let Some(qc) = config.get("quantization_config").filter(|v| !v.is_null()) {
        let method = qc.get("quant_method").and_then(Value::as_str).unwrap_or("?");
        bail!(
            "{}: the model is quantized already (quant_method `{method}`); quantize its bf16/f16 original instead",
            input.display()
        );
    }
    prepare_out_dir(input, out)?;

    let mut model = crate::model::load_model(input)?;
    let (summary, awq) = match args.calibration.source() {
        None => (quantize_model(&mut model, args.method, args.include_embeddings)?, None),
        Some(source) => {
            let (summary, report) =
                quantize_calibrated(&mut model, args.method, args.include_embeddings, &source)?;
            (summary, Some(report))
        }
    };
    qilin_format::write_safetensors(&out.join("model.safetensors"), &model.tensors)?;
    let group_size = if args.method == QuantizeMethod::Int4 { 128 } else { -1 };
    let mut qc =
        json!({"quant_method": "qilin", "method": args.method.name(), "group_size": group_size});
    if let Some(report) = &awq {
        // Provenance only: the scales are folded into the weights, nothing reads this.
        let gptq = report.sites.iter().any(|s| s.gptq);
        let method = if gptq { "awq+gptq" } else { "awq" };
        qc["calibration"] = json!({"method": method, "tokens": report.tokens});
    }
    config["quantization_config"] = qc;
    let config_out = out.join("config.json");
    std::fs::write(&config_out, serde_json::to_string_pretty(&config)? + "\n")
        .with_context(|| format!("writing {}", config_out.display()))?;
    let mut copied = Vec::new();
    for entry in std::fs::read_dir(input).with_context(|| format!("listing {}", input.display()))? {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if entry.file_type()?.is_file() && !is_weight_file(&name) {
            std::fs::copy(entry.path(), out.join(&name))
                .with_context(|| format!("copying {name} to {}", out.display()))?;
            copied.push(name);
        }
    }
    copied.sort();
    let kept: Vec<String> = summary
        .skipped
        .iter()
        .filter(|(_, why)| !matches!(why, Skip::Embedding))
        .map(|(name, why)| format!("{name} ({why:?})"))
        .collect();
    eprintln!(
        "wrote {}: {} tensors as {}, {} MiB -> {} MiB; copied {}",
        out.display(),
        summary.quantized,
        args.method.dtype().map(|d| d.to_string()).unwrap_or_default(),
        summary.bytes_before >> 20,
        summary.bytes_after >> 20,
        copied.join(", ")
    );
    if !kept.is_empty() {
        eprintln!("kept in their format: {}", kept.join(", "));
    }
    if let Some(report) = &awq {
        eprintln!("calibrated on {} tokens (AWQ scales and clipping, GPTQ):", report.tokens);
        for line in report.summary() {
            eprintln!("  {line}");
        }
    }
    Ok(())
}

/// `out` must be new or empty, and not the input.
fn prepare_out_dir(input: &Path, out: &Path) -> anyhow::Result<()> {
    if out.exists() {
        let same = out.canonicalize().ok() == input.canonicalize().ok();
        let empty = std::fs::read_dir(out).map(|mut d| d.next().is_none()).unwrap_or(false);
        if same || !empty {
            bail!("{}: exists and is not empty; choose a new directory", out.display());
        }
    }
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))
}
