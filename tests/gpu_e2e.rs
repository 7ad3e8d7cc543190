//! End to end on a GPU: the CUDA backend's greedy output equals the CPU backend's on
//! the fixture models (tests/fixtures/models) and on SmolLM2-135M (the Q4_1 GGUF), token
//! by token, wherever the CPU's choice is clear. Both engines are loaded the way the
//! binary loads them (`load_engine` with `--device cuda` / `cpu`), run every case of the
//! model's expected.json concurrently (`run_all`: prefills and decodes share steps), and
//! on CUDA once more with a 9-token step budget so prompts are split into chunks that
//! share batches with other sequences' decodes (mixed prefill + decode batches).
//!
//! The reference. CUDA stores weights, activations, the residual stream, the KV cache
//! and the logits in bf16 (relative rounding 2^-9 per value, f32 accumulation). The
//! plain CPU backend keeps all of that in f32, and on the fixture models (random
//! weights, logits of tens) bf16 rounding alone moves logprobs by up to ~0.5 (seen on an
//! H200, bench/results/2026-11-26-h200.md): enough to flip clear-looking choices, so the
//! f32 CPU cannot tell a kernel error from rounding. The reference is therefore the CPU
//! backend emulating bf16 (`cpu_emulates_bf16`: each op in f32, its output rounded to
//! bf16 where CUDA stores it), which leaves only accumulation order between the two.
//! Where the reference's top-2 logprob margin is under `MIN_MARGIN` (0.5, four bf16
//! steps of these models' logits) either token is a correct greedy choice: at the first
//! such position the comparison of that case stops, after checking that CUDA's choice
//! there is among the reference's top 4, since after a flip the continuations
//! legitimately differ. Every position before it must carry the same token id, and
//! every model must compare at least one token. The CUDA engine then runs the cases
//! again on a fresh engine (so no prefix cache changes its shapes) without logprobs,
//! which sends every step through the device argmax (`qilin_argmax_bf16`) instead of
//! the host sampler: the tokens must be the same.
//! Where the f32 CPU's greedy output first departs from the bf16 reference is printed,
//! for the record.
//!
//! The CUDA engine's decode steps replay through CUDA graphs, and each run must have
//! captured some; tools/gpu-check's e2e_eager step runs the test again with
//! `QILIN_CUDA_GRAPHS=0` (every step eager).
//!
//! Penalties on the device (`cuda_device_penalties_match_the_host_sampler`, the
//! QILIN_CUDA_DEVICE_PENALTIES path switched on whatever the environment says): greedy requests with repetition
//! penalties 2 and 0.5, whose arithmetic on bf16 logits is exact (so the device path's
//! rounding to bf16 changes nothing), must give the same tokens through
//! qilin_apply_penalties_bf16 + qilin_sample_bf16 as through the host sampler (forced by
//! logprobs) on fresh CUDA engines; that proves the routing, the incremental prompt + output
//! entries and the kernel's in-place writes on real steps (graphs included). A seeded
//! sampled request with Qwen's repetition penalty 1.05 and a presence penalty must run and
//! give in-vocabulary tokens (its rounding may legitimately change a draw).
//!
//! Runs only with `QILIN_GPU_TESTS=1`; then a missing driver, GPU or PTX is a failure.
//! The SmolLM2 GGUF (93 MB) cannot travel to a GPU machine with the source tree (64 MiB
//! limit): where it is absent, `QILIN_GPU_E2E_NO_SMOLLM2=1` turns that case into a
//! printed skip (tools/gpu-check sets it and reports the skip); without it, a failure.
//! `QILIN_SOURCE_DIR` overrides the compile-time source path, for test binaries built
//! on one machine and run on another.

#[path = "common/gpu.rs"]
mod gpu_common;
use gpu_common::skip_without_gpu_tests;

mod common;

use std::path::{Path, PathBuf};

use qilin::backend::cpu::CpuActivations;
use qilin::backend::Backend;
use qilin::engine::load::{load_engine, AnyEngine, Device, EngineOptions};
use qilin::engine::{Engine, GenerationOutput, SamplingParams};
use qilin::model::ModelConfig;

/// Below this top-2 logprob margin of the bf16 reference, accumulation order alone may
/// flip the greedy choice. The fixture models' logits are tens, where bf16 values are
/// 0.125 apart: their margins come in steps of 0.125, two rounding steps upstream can
/// move a logit by one step each way, and chosen-token logprobs were seen to differ by up
/// to 0.18 between CUDA and the bf16 CPU (H200, 2026-11-26). Four steps is clear.
const MIN_MARGIN: f32 = 0.5;

fn source_root() -> PathBuf {
    match std::env::var_os("QILIN_SOURCE_DIR") {
        Some(dir) if !dir.is_empty() => PathBuf::from(dir),
        _ => common::manifest_dir(),
    }
}

fn fixture_models() -> Vec<PathBuf> {
    common::fixture_models_under(&source_root())
}

/// The SmolLM2 GGUF, or None when it is absent and the caller allowed that.
fn smollm2() -> Option<PathBuf> {
    let found = common::find_smollm2_gguf(&source_root()).filter(|p| p.is_file());
    if found.is_none() {
        assert!(
            std::env::var("QILIN_GPU_E2E_NO_SMOLLM2").as_deref() == Ok("1"),
            "SmolLM2 GGUF not found (QILIN_SMOLLM2_GGUF or tools/setup's .venv); set \
             QILIN_GPU_E2E_NO_SMOLLM2=1 to skip it on a machine without it"
        );
    }
    found
}

fn greedy(case: &common::Case) -> SamplingParams {
    SamplingParams {
        temperature: 0.0,
        max_tokens: case.output_ids.len(),
        ignore_eos: true,
        top_logprobs: Some(4),
        ..SamplingParams::default()
    }
}

fn run<B: Backend>(engine: &mut Engine<B>, cases: &[common::Case]) -> Vec<GenerationOutput> {
    let requests: Vec<_> = cases.iter().map(|c| (c.prompt_ids.clone(), greedy(c))).collect();
    engine.run_all(&requests, |_, _| {}).expect("run_all")
}

fn load(path: &Path, options: EngineOptions) -> AnyEngine {
    load_engine(path, &options).unwrap_or_else(|e| panic!("{}: {e:#}", path.display())).0
}

/// Token-by-token comparison up to the first unclear CPU position; returns
/// (positions compared, largest |logprob difference| of the chosen tokens there).
fn compare(label: &str, cpu: &GenerationOutput, gpu: &GenerationOutput) -> (usize, f32) {
    let steps = cpu.logprobs.as_ref().expect("logprobs were asked for");
    let gpu_steps = gpu.logprobs.as_ref().expect("logprobs were asked for");
    let mut worst = 0.0f32;
    for (i, step) in steps.iter().enumerate() {
        let top = &step.top_logprobs;
        let margin = match top.as_slice() {
            [first, second, ..] => first.logprob - second.logprob,
            _ => f32::INFINITY,
        };
        if margin < MIN_MARGIN {
            let g = gpu.output_ids.get(i).copied();
            assert!(
                top.iter().any(|t| Some(t.token_id) == g),
                "{label}: position {i}: CUDA chose {g:?}, not among the reference's top {:?}",
                top.iter().map(|t| t.token_id).collect::<Vec<_>>()
            );
            eprintln!("{label}: CPU margin {margin:.3} at position {i}: comparison stops");
            return (i, worst);
        }
        let (c, g) = (cpu.output_ids[i], gpu.output_ids.get(i).copied());
        let tops = |s: &qilin::engine::StepLogprobs| {
            s.top_logprobs
                .iter()
                .map(|t| format!("{}:{:.3}", t.token_id, t.logprob))
                .collect::<Vec<_>>()
        };
        assert_eq!(
            Some(c),
            g,
            "{label}: position {i}: CPU chose {c} (margin {margin:.3}), CUDA chose {g:?}; \
             CPU ids {:?}, CUDA ids {:?}; top logprobs there: CPU {:?}, CUDA {:?}; \
             chosen-token logprob differences before it: {:?}",
            cpu.output_ids,
            gpu.output_ids,
            tops(step),
            gpu_steps.get(i).map(tops),
            steps
                .iter()
                .zip(gpu_steps)
                .take(i)
                .map(|(a, b)| format!("{:.3}", a.logprob - b.logprob))
                .collect::<Vec<_>>()
        );
        worst = worst.max((step.logprob - gpu_steps[i].logprob).abs());
    }
    (steps.len(), worst)
}

fn check_model(path: &Path, cases: &[common::Case], max_model_len: usize) {
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let base = EngineOptions { max_model_len: Some(max_model_len), ..EngineOptions::default() };
    let cpu_run = |cpu_emulates_bf16| {
        // f32 activations, so the printed comparison is f32 against bf16 rounding only
        // (the CPU default multiplies generated tokens with 8-bit activations).
        let options = EngineOptions {
            device: Device::Cpu,
            cpu_emulates_bf16,
            cpu_activations: CpuActivations::F32,
            ..base
        };
        let AnyEngine::Cpu(mut cpu) = load(path, options) else {
            panic!("--device cpu gave another backend");
        };
        run(&mut cpu, cases)
    };
    let reference = cpu_run(true);
    for ((case, f32_out), bf16_out) in cases.iter().zip(cpu_run(false)).zip(&reference) {
        let first_difference =
            f32_out.output_ids.iter().zip(&bf16_out.output_ids).position(|(a, b)| a != b);
        eprintln!(
            "{name} / {}: f32 CPU vs bf16-emulating CPU: {}",
            case.name,
            match first_difference {
                Some(i) => format!("first different token at position {i}"),
                None => "same tokens".to_string(),
            }
        );
    }
    let budgets = [("default step budget", 512, 64), ("9-token steps", 9, 4)];
    let mut compared = 0;
    for (what, max_num_batched_tokens, max_num_seqs) in budgets {
        let cuda_engine = || {
            let options = EngineOptions {
                device: Device::Cuda,
                max_num_batched_tokens,
                max_num_seqs,
                max_model_len: Some(max_model_len),
                ..EngineOptions::default()
            };
            let AnyEngine::Cuda(gpu) = load(path, options) else {
                panic!("--device cuda gave another backend");
            };
            gpu
        };
        let outputs = run(&mut cuda_engine(), cases);
        for ((case, cpu_out), gpu_out) in cases.iter().zip(&reference).zip(&outputs) {
            let label = format!("{name} / {} ({what})", case.name);
            let (n, worst) = compare(&label, cpu_out, gpu_out);
            eprintln!(
                "{label}: {n} of {} tokens compared and equal; max |logprob CPU - CUDA| {worst:.3}",
                cpu_out.output_ids.len()
            );
            compared += n;
        }
        // Without logprobs every step takes the device argmax (qilin_argmax_bf16) instead
        // of the host sampler: the same logits, so the same tokens. A fresh engine runs
        // them: the first one's prefix cache would serve the prompts, so its steps would
        // compute other shapes (different bf16 rounding), and this truncated model has
        // near-ties that such rounding flips.
        let requests: Vec<_> = cases
            .iter()
            .map(|c| (c.prompt_ids.clone(), SamplingParams { top_logprobs: None, ..greedy(c) }))
            .collect();
        let mut gpu = cuda_engine();
        let chosen = gpu.run_all(&requests, |_, _| {}).expect("run_all");
        for ((case, sampled), chosen) in cases.iter().zip(&outputs).zip(&chosen) {
            // Prompts that share a prefix share its blocks within a run: the same ones in
            // both runs, or their steps would differ.
            assert_eq!(
                chosen.cached_prompt_tokens, sampled.cached_prompt_tokens,
                "{name} / {}: both fresh engines served the same prompt tokens from cache",
                case.name
            );
            assert_eq!(
                sampled.output_ids, chosen.output_ids,
                "{name} / {} ({what}): device argmax vs host sampler on the same CUDA logits",
                case.name
            );
        }
        let blocks = gpu.scheduler().blocks();
        assert_eq!(blocks.num_free_blocks(), blocks.num_blocks(), "{name}: every block is back");
        let backend = &gpu.model.backend;
        if backend.dev.paths.graphs {
            // The decode steps above must have gone through graphs, or the graph path
            // was compared with nothing.
            let graphs = backend.graphs.lock().unwrap_or_else(|e| e.into_inner()).len();
            assert!(graphs > 0, "{name} ({what}): CUDA graphs on but none was captured");
            eprintln!("{name} ({what}): {graphs} CUDA graphs captured");
        }
    }
    assert!(compared > 0, "{name}: no position had a clear CPU margin; nothing was compared");
}

#[test]
fn cuda_greedy_matches_cpu_on_the_fixture_models() {
    if skip_without_gpu_tests() {
        return;
    }
    for dir in fixture_models() {
        let expected = common::read_expected(&dir.join("expected.json"));
        let config = ModelConfig::from_hf_file(&dir.join("config.json")).expect("config.json");
        check_model(&dir, &expected.cases, config.max_context().min(1024));
    }
}

#[test]
fn cuda_greedy_matches_cpu_on_smollm2() {
    if skip_without_gpu_tests() {
        return;
    }
    let Some(gguf) = smollm2() else {
        eprintln!("skipped: SmolLM2 GGUF not on this machine (QILIN_GPU_E2E_NO_SMOLLM2=1)");
        return;
    };
    let expected =
        common::read_expected(&source_root().join("tests/fixtures/smollm2/expected.json"));
    check_model(&gguf, &expected.cases, 2048);
}

#[test]
fn cuda_device_penalties_match_the_host_sampler() {
    if skip_without_gpu_tests() {
        return;
    }
    for dir in fixture_models() {
        let expected = common::read_expected(&dir.join("expected.json"));
        let config = ModelConfig::from_hf_file(&dir.join("config.json")).expect("config.json");
        let (vocab, max_model_len) = (config.vocab_size, config.max_context().min(1024));
        let requests = |logprobs: bool| -> Vec<_> {
            (expected.cases.iter().enumerate())
                .map(|(i, c)| {
                    let p = SamplingParams {
                        repetition_penalty: if i % 2 == 0 { 2.0 } else { 0.5 },
                        top_logprobs: logprobs.then_some(1),
                        ..greedy(c)
                    };
                    (c.prompt_ids.clone(), p)
                })
                .collect()
        };
        // Fresh engines: a prefix cache would change the second run's shapes (see above).
        let run_with = |requests: &[(Vec<u32>, SamplingParams)]| {
            let options = EngineOptions {
                device: Device::Cuda,
                max_model_len: Some(max_model_len),
                ..EngineOptions::default()
            };
            let AnyEngine::Cuda(mut gpu) = load(&dir, options) else {
                panic!("--device cuda gave another backend");
            };
            gpu.model.backend.dev.paths.device_penalties = true;
            assert!(gpu.model.backend.device_penalties());
            gpu.run_all(requests, |_, _| {}).expect("run_all")
        };
        let host = run_with(&requests(true));
        let device = run_with(&requests(false));
        for ((case, h), d) in expected.cases.iter().zip(&host).zip(&device) {
            assert!(h.logprobs.is_some() && d.logprobs.is_none());
            assert_eq!(
                h.output_ids,
                d.output_ids,
                "{} / {}: device penalties vs host sampler on the same CUDA logits",
                dir.display(),
                case.name
            );
        }
        let sampled: Vec<_> = (expected.cases.iter().enumerate())
            .map(|(i, c)| {
                let p = SamplingParams {
                    temperature: 0.7,
                    top_k: 20,
                    top_p: 0.8,
                    repetition_penalty: 1.05,
                    presence_penalty: 0.3,
                    seed: Some(i as u64),
                    max_tokens: 16,
                    ignore_eos: true,
                    ..SamplingParams::default()
                };
                (c.prompt_ids.clone(), p)
            })
            .collect();
        for out in run_with(&sampled) {
            assert_eq!(out.output_ids.len(), 16);
            assert!(out.output_ids.iter().all(|&id| (id as usize) < vocab), "{:?}", out.output_ids);
        }
        eprintln!("{}: device penalties gave the host sampler's tokens", dir.display());
    }
}

#[test]
fn device_auto_picks_the_gpu() {
    if skip_without_gpu_tests() {
        return;
    }
    let dir = fixture_models().swap_remove(0);
    let engine = load(&dir, EngineOptions { max_model_len: Some(256), ..EngineOptions::default() });
    assert_eq!(engine.backend_name(), "cuda", "--device auto with a GPU present");
}
