//! tools/gguf-truncate (the SmolLM2 cut that tools/gpu-check carries to the GPU machine)
//! checked by the Rust GGUF loader as the independent reader: the cut file of SmolLM2
//! loads, has the asked number of layers, every tensor it keeps is byte-for-byte the
//! source's (dtype and shape too), the layers past the cut are gone, and the tokenizer
//! encodes as the source's does. Bad arguments fail with a message, not a traceback.

mod common;

use std::path::Path;
use std::process::Command;

use qilin::model::loader::load_model;

fn truncate(source: &Path, out: &Path, blocks: &str) -> std::process::Output {
    Command::new("python3")
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("tools/gguf-truncate"))
        .arg(source)
        .arg(out)
        .arg(blocks)
        .output()
        .expect("python3 runs")
}

#[test]
fn smollm2_cut_to_two_blocks_keeps_its_tensors_and_tokenizer() {
    let source = common::smollm2_gguf();
    let dir = tempfile::tempdir().expect("temp dir");
    let out = dir.path().join("cut.gguf");
    let run = truncate(&source, &out, "2");
    assert!(run.status.success(), "gguf-truncate failed: {}", String::from_utf8_lossy(&run.stderr));

    let full = load_model(&source).expect("the source loads");
    let cut = load_model(&out).expect("the cut file loads");
    assert_eq!(cut.config.num_layers, 2);
    assert_eq!(full.config.num_layers, 30, "SmolLM2-135M has 30 layers");
    assert_eq!(cut.config.hidden_size, full.config.hidden_size);
    assert_eq!(cut.config.vocab_size, full.config.vocab_size);

    let layer_of = |name: &str| {
        name.strip_prefix("model.layers.")
            .and_then(|rest| rest.split('.').next())
            .and_then(|i| i.parse::<usize>().ok())
    };
    for (name, tensor) in &full.tensors {
        match (layer_of(name), cut.tensors.get(name)) {
            (Some(layer), Some(_)) if layer >= 2 => panic!("{name} survived the cut"),
            (Some(layer), None) if layer >= 2 => {}
            (_, None) => panic!("{name} is missing from the cut file"),
            (_, Some(kept)) => {
                assert_eq!(kept.dtype, tensor.dtype, "{name}: dtype");
                assert_eq!(kept.shape, tensor.shape, "{name}: shape");
                assert!(kept.data.as_slice() == tensor.data.as_slice(), "{name}: bytes differ");
            }
        }
    }
    assert!(cut.tensors.keys().all(|name| full.tensors.contains_key(name)));

    let text = "The cut keeps the tokenizer: naïve café, 12345, <|im_start|>user";
    assert_eq!(
        cut.tokenizer.encode(text, true).expect("encode"),
        full.tokenizer.encode(text, true).expect("encode")
    );
}

#[test]
fn bad_arguments_are_refused_with_a_message() {
    let dir = tempfile::tempdir().expect("temp dir");
    let out = dir.path().join("cut.gguf");
    let not_gguf = dir.path().join("not.gguf");
    std::fs::write(&not_gguf, b"definitely not a model").expect("write");
    let source = common::smollm2_gguf();
    for (input, blocks, expected) in [
        (source.as_path(), "0", "usage"),
        (source.as_path(), "31", "fewer than 31"),
        (not_gguf.as_path(), "2", "not a GGUF file"),
    ] {
        let run = truncate(input, &out, blocks);
        let stderr = String::from_utf8_lossy(&run.stderr);
        assert!(!run.status.success(), "{blocks} blocks of {}: accepted", input.display());
        assert!(stderr.contains(expected), "{blocks} blocks: stderr {stderr:?}");
        assert!(!stderr.contains("Traceback"), "a traceback instead of a message: {stderr}");
        assert!(!out.exists(), "a refused cut left {}", out.display());
    }
}
