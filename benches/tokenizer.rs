//! Tokenizer hot paths on the CPU: prompt encoding, per-token stream decoding and chat
//! template rendering. Uses the Qwen tokenizer from tools/setup when present (the
//! production vocabulary), else the small fixture tokenizer.
//!
//! cargo bench --bench tokenizer

use std::hint::black_box;
use std::path::Path;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use qilin::tokenizer::{ChatMessage, Tokenizer};

fn tokenizer() -> (Tokenizer, &'static str) {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let qwen = root.join(".cache/tokenizer-qwen3-3.7.2");
    if qwen.join("tokenizer.json").exists() {
        if let Ok(tok) = Tokenizer::from_hf_dir(&qwen) {
            return (tok, "qwen");
        }
    }
    let tiny = root.join("tests/fixtures/tokenizer/tiny_llama3");
    (Tokenizer::from_hf_dir(&tiny).expect("fixture tokenizer"), "tiny_llama3")
}

fn text() -> String {
    let para = "The engine thread owns the model, the KV cache and the scheduler. \
                一个引擎线程拥有模型、KV 缓存和调度器。 Streams never split a character: 😀🎉.\n";
    para.repeat(40)
}

fn bench(c: &mut Criterion) {
    let (tok, name) = tokenizer();
    let text = text();
    let ids = tok.encode(&text, false).expect("encode");

    let mut g = c.benchmark_group(format!("tokenizer/{name}"));
    g.throughput(Throughput::Bytes(text.len() as u64));
    g.bench_function("encode", |b| b.iter(|| tok.encode(black_box(&text), true).expect("encode")));

    g.throughput(Throughput::Elements(ids.len() as u64));
    g.bench_function("stream_decode_per_token", |b| {
        b.iter(|| {
            let mut dec = tok.stream_decoder(true);
            let mut n = 0;
            for &id in &ids {
                n += dec.push(black_box(id)).expect("push").len();
            }
            n + dec.finish().expect("finish").len()
        })
    });

    let messages = vec![
        ChatMessage { role: "system".into(), content: "You are a helpful assistant.".into() },
        ChatMessage { role: "user".into(), content: text.clone() },
    ];
    g.throughput(Throughput::Elements(1));
    if tok.chat_template().is_some() {
        g.bench_function("apply_chat_template", |b| {
            b.iter(|| tok.apply_chat_template(black_box(&messages), true).expect("render"))
        });
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
