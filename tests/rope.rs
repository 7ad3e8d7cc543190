//! RoPE frequencies and YaRN's attention factor from config.json, against the values
//! transformers' own rotary modules compute for the same JSON
//! (tests/fixtures/rope/transformers_rope.json, made by tools/make_rope_fixtures.py).
//!
//! transformers computes inv_freq in f32 (`base ** (arange / dim)`); we compute in f64
//! and the table rounds to f32, so agreement is to f32 precision: 1e-6 relative.

mod common;

use qilin::model::ModelConfig;
use serde_json::Value;

#[test]
fn inverse_frequencies_and_attention_factor_match_transformers() {
    let path = common::manifest_dir().join("tests/fixtures/rope/transformers_rope.json");
    let fixture: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    let cases = fixture["cases"].as_array().unwrap();
    assert!(cases.len() >= 5);
    for case in cases {
        let name = case["name"].as_str().unwrap();
        let config =
            ModelConfig::from_hf_json(&case["config"]).unwrap_or_else(|e| panic!("{name}: {e}"));
        let (inv_freq, attention_factor) = config.rope.inv_freq(config.head_dim);
        let expected: Vec<f64> =
            case["inv_freq"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap()).collect();
        assert_eq!(inv_freq.len(), expected.len(), "{name}");
        for (i, (&ours, &theirs)) in inv_freq.iter().zip(&expected).enumerate() {
            let rel = (ours - theirs).abs() / theirs.abs();
            assert!(rel < 1e-6, "{name}: inv_freq[{i}] = {ours}, transformers {theirs}");
        }
        let theirs = case["attention_factor"].as_f64().unwrap();
        assert!(
            (attention_factor - theirs).abs() < 1e-12,
            "{name}: attention factor {attention_factor} vs {theirs}"
        );
    }
}

#[test]
fn qwen25_yarn_128k_has_the_documented_scaling() {
    // Qwen2.5's model card: factor 4 over 32768 positions, attention scaling 0.1 ln 4 + 1.
    let json: Value = serde_json::json!({
        "architectures": ["Qwen2ForCausalLM"], "hidden_size": 3584, "intermediate_size": 18944,
        "num_hidden_layers": 28, "num_attention_heads": 28, "num_key_value_heads": 4,
        "vocab_size": 152064, "max_position_embeddings": 32768, "rope_theta": 1e6,
        "rope_scaling": {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}
    });
    let config = ModelConfig::from_hf_json(&json).unwrap();
    let (_, factor) = config.rope.inv_freq(config.head_dim);
    assert!((factor - (0.1 * 4f64.ln() + 1.0)).abs() < 1e-12);
    assert_eq!(config.max_context(), 131072, "YaRN stretches the 32K window to 128K");
    assert!(config.attention_bias, "Qwen2 always has Q/K/V bias");
}

#[test]
fn unsupported_rope_types_are_named() {
    let json: Value = serde_json::json!({
        "architectures": ["LlamaForCausalLM"], "hidden_size": 64, "intermediate_size": 128,
        "num_hidden_layers": 1, "num_attention_heads": 4, "vocab_size": 10,
        "rope_scaling": {"rope_type": "dynamic", "factor": 2.0}
    });
    let err = ModelConfig::from_hf_json(&json).unwrap_err();
    assert!(err.contains("dynamic"), "{err}");
}
