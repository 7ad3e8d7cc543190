//! `qilin generate` as a user runs it: flags, errors and the JSON output shape.

mod common;

use std::process::{Command, Output};

fn qilin(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_qilin")).args(args).output().expect("run qilin")
}

fn tiny_model() -> String {
    common::a_fixture_model().to_string_lossy().into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn json_output_has_the_documented_fields() {
    let model = tiny_model();
    let o = qilin(&[
        "generate",
        "--model",
        &model,
        "--prompt",
        "Hello there",
        "--max-tokens",
        "5",
        "--temperature",
        "0",
        "--ignore-eos",
        "--json",
        "--top-logprobs",
        "2",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let stdout = String::from_utf8(o.stdout).unwrap();
    let json: serde_json::Value = serde_json::from_str(stdout.lines().last().unwrap()).unwrap();
    assert!(json["prompt_ids"].as_array().is_some_and(|a| !a.is_empty()));
    assert_eq!(json["output_ids"].as_array().map(Vec::len), Some(5));
    assert!(json["text"].is_string());
    assert_eq!(json["finish_reason"], "length");
    let logprobs = json["logprobs"].as_array().unwrap();
    assert_eq!(logprobs.len(), 5);
    assert!(logprobs.iter().all(|s| s.as_array().map(Vec::len) == Some(2)));
}

#[test]
fn messages_and_chat_prompt_render_the_same_conversation() {
    let model = tiny_model();
    let common = ["--max-tokens", "3", "--temperature", "0", "--json"];
    let mut a = vec!["generate", "--model", &model, "--chat", "--system", "Be brief."];
    a.extend(["--prompt", "Hi"]);
    a.extend(common);
    let messages = r#"[{"role":"system","content":"Be brief."},{"role":"user","content":[{"type":"text","text":"Hi"}]}]"#;
    let mut b = vec!["generate", "--model", &model, "--messages", messages];
    b.extend(common);
    let (a, b) = (qilin(&a), qilin(&b));
    assert!(a.status.success() && b.status.success(), "{} {}", stderr(&a), stderr(&b));
    let last = |o: &Output| {
        let s = String::from_utf8_lossy(&o.stdout).into_owned();
        let v: serde_json::Value = serde_json::from_str(s.lines().last().unwrap()).unwrap();
        v["prompt_ids"].clone()
    };
    assert_eq!(last(&a), last(&b));
}

#[test]
fn bad_input_is_a_clear_error() {
    let model = tiny_model();
    let cases: &[(&[&str], &str)] = &[
        (&["--messages", "{not json"], "not valid JSON"),
        (&["--messages", "[]"], "empty"),
        (&["--messages", r#"[{"role":"wizard","content":"x"}]"#], "unknown role"),
        (&["--prompt", "x", "--system", "s"], "--system needs --chat"),
        (&["--prompt", "x", "--temperature", "-1"], "temperature"),
        (&["--prompt", "x", "--top-p", "0"], "top_p"),
        (&["--prompt", "x", "--max-tokens", "0"], "max_tokens"),
        (&["--prompt", "x", "--max-model-len", "100000000"], "exceeds the model's limit"),
    ];
    for (extra, needle) in cases {
        let mut args = vec!["generate", "--model", &model];
        args.extend_from_slice(extra);
        let o = qilin(&args);
        assert!(!o.status.success(), "{extra:?} should fail");
        let err = stderr(&o);
        assert!(err.contains(needle), "{extra:?}: expected `{needle}` in: {err}");
        assert!(!err.contains("panicked"), "{extra:?} panicked: {err}");
    }
    let o = qilin(&["generate", "--model", "/no/such/model", "--prompt", "x"]);
    assert!(!o.status.success() && stderr(&o).contains("/no/such/model"), "{}", stderr(&o));
}

#[test]
fn bench_throughput_reports_what_it_ran() {
    let model = tiny_model();
    let dir = tempfile::tempdir().unwrap();
    let report = dir.path().join("report.json");
    let o = qilin(&[
        "bench",
        "throughput",
        "--model",
        &model,
        "--num-prompts",
        "3",
        "--input-len",
        "8",
        "--random-output-range",
        "4:4",
        "--json",
        report.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(String::from_utf8_lossy(&o.stdout).contains("output tokens/s"));
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&report).unwrap()).unwrap();
    assert_eq!(json["num_requests"], 3);
    assert_eq!(json["prompt_tokens"], 24);
    assert_eq!(json["output_tokens"], 12);
    assert!(json["output_tokens_per_s"].as_f64().is_some_and(|v| v > 0.0));

    let o = qilin(&["bench", "throughput", "--model", &model, "--input-len", "9:3"]);
    assert!(!o.status.success() && stderr(&o).contains("A <= B"), "{}", stderr(&o));
}

#[test]
fn prompts_file_results_come_back_in_input_order() {
    let model = tiny_model();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("prompts.jsonl");
    std::fs::write(
        &file,
        "{\"prompt\": \"Hello there\", \"max_tokens\": 3}\n\n\
         {\"messages\": [{\"role\": \"user\", \"content\": \"Hi\"}], \"max_tokens\": 5, \"ignore_eos\": true}\n\
         {\"prompt\": \"x\", \"max_tokens\": 1, \"top_logprobs\": 2}\n",
    )
    .unwrap();
    let o = qilin(&[
        "generate",
        "--model",
        &model,
        "--prompts-file",
        file.to_str().unwrap(),
        "--temperature",
        "0",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let lines: Vec<serde_json::Value> = String::from_utf8(o.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 3);
    // Each result answers its own line: compare with that prompt run alone.
    let alone = qilin(&[
        "generate",
        "--model",
        &model,
        "--chat",
        "--prompt",
        "Hi",
        "--max-tokens",
        "5",
        "--ignore-eos",
        "--temperature",
        "0",
        "--json",
    ]);
    let alone: serde_json::Value =
        serde_json::from_str(String::from_utf8_lossy(&alone.stdout).lines().last().unwrap())
            .unwrap();
    assert_eq!(lines[1]["prompt_ids"], alone["prompt_ids"]);
    assert_eq!(lines[1]["output_ids"], alone["output_ids"]);
    assert_eq!(lines[2]["logprobs"].as_array().map(Vec::len), Some(1));

    std::fs::write(&file, "{\"prompt\": \"x\", \"temprature\": 0}\n").unwrap();
    let o = qilin(&["generate", "--model", &model, "--prompts-file", file.to_str().unwrap()]);
    assert!(!o.status.success(), "a misspelt field must not be ignored");
    let err = stderr(&o);
    assert!(err.contains("line 1") && err.contains("temprature"), "{err}");
}
