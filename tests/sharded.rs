//! A model split into safetensors shards with an index (as large checkpoints ship)
//! loads to the same weights and generates exactly what the single file does.

mod common;

use std::collections::BTreeMap;

use qilin::engine::load::{load_cpu_engine, EngineOptions};
use qilin::engine::SamplingParams;
use safetensors::SafeTensors;

#[test]
fn sharded_checkpoint_generates_like_the_single_file() {
    let source = common::manifest_dir().join("tests/fixtures/models/qwen2_gqa7_yarn");
    let tmp = tempfile::tempdir().unwrap();
    for entry in std::fs::read_dir(&source).unwrap().flatten() {
        if entry.file_name() != "model.safetensors" {
            std::fs::copy(entry.path(), tmp.path().join(entry.file_name())).unwrap();
        }
    }
    let bytes = std::fs::read(source.join("model.safetensors")).unwrap();
    let single = SafeTensors::deserialize(&bytes).unwrap();
    // Layer 0 in one shard, everything else in the other, as transformers splits by size.
    let mut shards: [Vec<(String, safetensors::tensor::TensorView<'_>)>; 2] = Default::default();
    for (name, view) in single.tensors() {
        let shard = usize::from(!name.starts_with("model.layers.0."));
        shards[shard].push((name, view));
    }
    let mut weight_map = BTreeMap::new();
    for (i, tensors) in shards.iter().enumerate() {
        let file = format!("model-{:05}-of-00002.safetensors", i + 1);
        for (name, _) in tensors {
            weight_map.insert(name.clone(), file.clone());
        }
        let views: Vec<_> = tensors.iter().map(|(n, v)| (n.clone(), v.clone())).collect();
        safetensors::serialize_to_file(views, None, &tmp.path().join(&file)).unwrap();
    }
    let index =
        serde_json::json!({"metadata": {"total_size": bytes.len()}, "weight_map": weight_map});
    std::fs::write(tmp.path().join("model.safetensors.index.json"), index.to_string()).unwrap();

    let params = SamplingParams {
        temperature: 0.0,
        max_tokens: 12,
        ignore_eos: true,
        top_logprobs: Some(3),
        ..SamplingParams::default()
    };
    let prompt = [5u32, 17, 42, 99, 7];
    let run = |dir: &std::path::Path| {
        let (mut g, _) = load_cpu_engine(dir, &EngineOptions::default()).unwrap();
        g.generate(&prompt, &params, |_| {}).unwrap()
    };
    let (a, b) = (run(&source), run(tmp.path()));
    assert_eq!(a.output_ids, b.output_ids);
    assert_eq!(a.logprobs, b.logprobs, "same weights, same arithmetic: bit-identical");

    // A shard the index names but the directory lacks is an error naming it.
    std::fs::remove_file(tmp.path().join("model-00002-of-00002.safetensors")).unwrap();
    let err = match load_cpu_engine(tmp.path(), &EngineOptions::default()) {
        Ok(_) => panic!("loaded without a shard"),
        Err(e) => format!("{e:#}"),
    };
    assert!(err.contains("model-00002-of-00002.safetensors"), "{err}");
}
