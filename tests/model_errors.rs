//! Bad model files give an error that names the file and the problem, never a panic.

mod common;

use std::path::Path;

use common::a_fixture_model;
use qilin::model::load_model;

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap().flatten() {
        std::fs::copy(entry.path(), to.join(entry.file_name())).unwrap();
    }
}

fn load_err(path: &Path) -> String {
    match load_model(path) {
        Ok(_) => panic!("{} loaded but should not have", path.display()),
        Err(e) => e.to_string(),
    }
}

#[test]
fn missing_path_is_named() {
    let err = load_err(Path::new("/nonexistent/model"));
    assert!(err.contains("/nonexistent/model"), "{err}");
}

#[test]
fn directory_without_weights_is_explained() {
    let tmp = tempfile::tempdir().unwrap();
    copy_dir(&a_fixture_model(), tmp.path());
    std::fs::remove_file(tmp.path().join("model.safetensors")).unwrap();
    let err = load_err(tmp.path());
    assert!(err.contains("model.safetensors"), "{err}");
}

#[test]
fn unsupported_architecture_is_named() {
    let tmp = tempfile::tempdir().unwrap();
    copy_dir(&a_fixture_model(), tmp.path());
    let path = tmp.path().join("config.json");
    let mut config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    config["architectures"] = serde_json::json!(["GPT2LMHeadModel"]);
    config["model_type"] = serde_json::json!("gpt2");
    std::fs::write(&path, config.to_string()).unwrap();
    let err = load_err(tmp.path());
    assert!(err.contains("config.json") && err.contains("GPT2LMHeadModel"), "{err}");
}

#[test]
fn truncated_safetensors_never_panics() {
    let tmp = tempfile::tempdir().unwrap();
    copy_dir(&a_fixture_model(), tmp.path());
    let weights = tmp.path().join("model.safetensors");
    let full = std::fs::read(&weights).unwrap();
    for cut in [0, 4, 8, 9, 100, full.len() / 2, full.len() - 1] {
        std::fs::write(&weights, &full[..cut]).unwrap();
        let err = load_err(tmp.path());
        assert!(err.contains("model.safetensors"), "cut at {cut}: {err}");
    }
}

#[test]
fn shape_mismatch_names_the_tensor() {
    let tmp = tempfile::tempdir().unwrap();
    copy_dir(&a_fixture_model(), tmp.path());
    let path = tmp.path().join("config.json");
    let mut config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    let ffn = config["intermediate_size"].as_u64().unwrap();
    config["intermediate_size"] = serde_json::json!(ffn + 16);
    std::fs::write(&path, config.to_string()).unwrap();
    let loaded = load_model(tmp.path()).expect("config and files parse");
    let backend = qilin::backend::cpu::CpuBackend::new();
    let err = match qilin::model::weights::ModelWeights::load(&backend, &loaded) {
        Ok(_) => panic!("shape mismatch went unnoticed"),
        Err(e) => e.to_string(),
    };
    assert!(err.contains("mlp.gate_proj.weight") && err.contains("shape"), "{err}");
}

#[test]
fn garbage_file_is_not_a_model() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("model.bin");
    std::fs::write(&path, b"definitely not weights").unwrap();
    let err = load_err(&path);
    assert!(err.contains("model.bin") && err.contains("not a model"), "{err}");
}
