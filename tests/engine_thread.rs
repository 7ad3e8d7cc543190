//! The engine on its own thread: concurrent submitters get their own answers (equal to
//! each request run alone), and a client that goes away frees its KV blocks.

mod common;

use std::time::{Duration, Instant};

use qilin::engine::load::{load_cpu_engine, EngineOptions};
use qilin::engine::{EngineHandle, RequestEvent, SamplingParams};

fn params(max_tokens: usize) -> SamplingParams {
    SamplingParams {
        temperature: 0.0,
        max_tokens,
        ignore_eos: true,
        top_logprobs: Some(2),
        ..SamplingParams::default()
    }
}

#[test]
fn concurrent_submitters_get_what_they_would_get_alone() {
    let model = common::a_fixture_model();
    let prompts: Vec<Vec<u32>> =
        (0..4u32).map(|i| (0..(5 + 9 * i)).map(|t| (t * 31 + i * 7) % 500).collect()).collect();
    let (mut alone, _) = load_cpu_engine(&model, &EngineOptions::default()).unwrap();
    let expected: Vec<Vec<u32>> = prompts
        .iter()
        .map(|p| alone.generate(p, &params(12), |_| {}).unwrap().output_ids)
        .collect();

    let (engine, _) = load_cpu_engine(&model, &EngineOptions::default()).unwrap();
    let handle = EngineHandle::spawn(engine).unwrap();
    std::thread::scope(|s| {
        let joins: Vec<_> = prompts
            .iter()
            .map(|p| {
                let handle = &handle;
                s.spawn(move || {
                    let (_, events) = handle.submit(p.clone(), params(12)).unwrap().unwrap();
                    let mut streamed = Vec::new();
                    let mut streamed_logprobs = Vec::new();
                    for event in events {
                        match event {
                            RequestEvent::Token(step) => {
                                streamed.push(step.token_id);
                                streamed_logprobs.extend(step.logprobs);
                            }
                            RequestEvent::Finished(out) => {
                                assert_eq!(out.output_ids, streamed, "events and result agree");
                                assert_eq!(out.logprobs, Some(streamed_logprobs));
                                return out.output_ids;
                            }
                            RequestEvent::Failed(e) => panic!("{e}"),
                        }
                    }
                    panic!("the channel closed without a Finished event")
                })
            })
            .collect();
        for (join, want) in joins.into_iter().zip(&expected) {
            assert_eq!(&join.join().unwrap(), want);
        }
    });
    let stats = handle.stats().unwrap();
    assert_eq!((stats.running, stats.waiting), (0, 0));
    assert_eq!(stats.free_blocks, stats.num_blocks);
}

#[test]
fn a_dropped_receiver_frees_its_blocks() {
    let model = common::a_fixture_model();
    let (engine, _) = load_cpu_engine(&model, &EngineOptions::default()).unwrap();
    let handle = EngineHandle::spawn(engine).unwrap();
    let prompt: Vec<u32> = (0..40).collect();
    let (_, events) = handle.submit(prompt, params(400)).unwrap().unwrap();
    match events.recv_timeout(Duration::from_secs(30)).unwrap() {
        RequestEvent::Token(_) => {}
        other => panic!("expected a token first, got {other:?}"),
    }
    assert!(handle.stats().unwrap().free_blocks < handle.stats().unwrap().num_blocks);
    drop(events);
    // The engine notices at its next step; allow generous time on a loaded machine.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let stats = handle.stats().unwrap();
        if stats.running == 0 && stats.free_blocks == stats.num_blocks {
            break;
        }
        assert!(Instant::now() < deadline, "blocks still held: {stats:?}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn bad_requests_are_refused_and_the_engine_keeps_serving() {
    let model = common::a_fixture_model();
    let (engine, _) = load_cpu_engine(&model, &EngineOptions::default()).unwrap();
    let handle = EngineHandle::spawn(engine).unwrap();
    let err = handle.submit(vec![], params(4)).unwrap().unwrap_err();
    assert!(err.to_string().contains("empty"), "{err}");
    let err = handle.submit(vec![1_000_000], params(4)).unwrap().unwrap_err();
    assert!(err.to_string().contains("vocabulary"), "{err}");
    let (_, events) = handle.submit(vec![1, 2, 3], params(4)).unwrap().unwrap();
    let last = events.into_iter().last().unwrap();
    assert!(matches!(last, RequestEvent::Finished(out) if out.output_ids.len() == 4));
}
