//! The embedded PTX against what the Rust side expects of it: one module per
//! `kernels/*.cu`, every entry point the launchers name present in its module, the PTX
//! version loadable by the deployed drivers, and struct parameters the size and alignment
//! that Rust (via bindgen) gives them.
//!
//! In a CPU-only build (no nvcc) there is no PTX: the tests say so and pass, unless
//! `QILIN_REQUIRE_PTX=1` (CI sets it) makes the missing compiler a failure.

use std::collections::BTreeSet;
use std::mem::{align_of, size_of};

use qilin::backend::abi::QilinRmsNormParams;
use qilin::backend::ptx::{self, entry_names, module_ptx, Kernel};

#[path = "common/ptx.rs"]
mod ptx_common;
use ptx_common::ptx_available;

/// Newest PTX ISA that driver 580 (our H100/H200 machines) JIT-compiles: nvcc 13.0's.
const NEWEST_LOADABLE_PTX_ISA: (u32, u32) = (9, 0);

#[test]
fn every_kernel_file_has_a_module_and_nothing_else_does() {
    if !ptx_available() {
        assert!(ptx::ALL.is_empty());
        return;
    }
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/kernels");
    let files: BTreeSet<String> = std::fs::read_dir(dir)
        .expect("kernels/ is readable")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "cu"))
        .filter_map(|p| p.file_stem().map(|s| s.to_string_lossy().into_owned()))
        .collect();
    let modules: BTreeSet<String> = ptx::ALL.iter().map(|(m, _)| m.to_string()).collect();
    assert_eq!(files, modules, "kernels/*.cu vs embedded modules");
}

#[test]
fn entries_are_listed_prefixed_and_unique() {
    if !ptx_available() {
        return;
    }
    let mut seen = BTreeSet::new();
    for (module, text) in ptx::ALL {
        let entries = entry_names(text);
        eprintln!("{module}.ptx: {}", entries.join(", "));
        assert!(!entries.is_empty(), "{module}.ptx defines no kernel");
        for entry in entries {
            // extern "C" + the prefix keeps names unmangled and clear of library symbols.
            assert!(entry.starts_with("qilin_"), "{module}.ptx: unprefixed or mangled {entry}");
            assert!(seen.insert(entry), "{entry} is defined by two modules");
        }
    }
}

#[test]
fn every_launched_kernel_exists_in_its_module() {
    if !ptx_available() {
        return;
    }
    for Kernel { module, entry } in ptx::KERNELS {
        let text = module_ptx(module).unwrap_or_else(|| panic!("no module {module}"));
        assert!(entry_names(text).contains(entry), "{module}.ptx lacks {entry}");
    }
    let norm: BTreeSet<&str> = entry_names(ptx::NORM_PTX).into_iter().collect();
    let expected: BTreeSet<&str> =
        [ptx::FUSED_ADD_RMS_NORM_BF16.entry, ptx::RMS_NORM_BF16.entry].into_iter().collect();
    assert_eq!(norm, expected);
}

#[test]
fn ptx_targets_what_the_deployed_driver_loads() {
    if !ptx_available() {
        return;
    }
    for (module, text) in ptx::ALL {
        let version = directive(text, ".version")
            .and_then(|v| v.split_once('.'))
            .and_then(|(major, minor)| Some((major.parse().ok()?, minor.parse().ok()?)));
        let Some(version) = version else { panic!("{module}.ptx has no .version") };
        assert!(
            version <= NEWEST_LOADABLE_PTX_ISA,
            "{module}.ptx is PTX ISA {version:?}: driver 580 rejects it (use nvcc 13.0)"
        );
        assert_eq!(directive(text, ".target"), Some("sm_80"), "{module}.ptx target");
    }
}

#[test]
fn struct_params_match_the_rust_layout() {
    if !ptx_available() {
        return;
    }
    let size = size_of::<QilinRmsNormParams>();
    let align = align_of::<QilinRmsNormParams>();
    for kernel in [ptx::FUSED_ADD_RMS_NORM_BF16, ptx::RMS_NORM_BF16] {
        let text = module_ptx(kernel.module).expect("module embedded");
        // nvcc declares a by-value struct as `.param .align A .b8 <entry>_param_0[S]`.
        assert_eq!(
            byte_param(text, kernel.entry, 0),
            Some((align, size)),
            "{}: params struct as nvcc sees it vs as Rust sees it",
            kernel.entry
        );
    }
}

/// The first word after a top-level directive such as `.version` or `.target`.
fn directive<'a>(text: &'a str, name: &str) -> Option<&'a str> {
    text.lines().find_map(|line| {
        let mut words = line.split_whitespace();
        (words.next() == Some(name)).then(|| words.next()).flatten()
    })
}

/// (alignment, size in bytes) of the `index`-th parameter of `entry`, when it is a byte
/// array (how nvcc passes structs).
fn byte_param(text: &str, entry: &str, index: usize) -> Option<(usize, usize)> {
    let name = format!("{entry}_param_{index}[");
    let line = text.lines().find(|l| l.contains(".param") && l.contains(&name))?;
    let words: Vec<&str> = line.split_whitespace().collect();
    let align_at = words.iter().position(|w| *w == ".align")?;
    let align = words.get(align_at + 1)?.parse().ok()?;
    let size = line.split(&name).nth(1)?.split(']').next()?.parse().ok()?;
    Some((align, size))
}

/// One kernel entry point and what must exist around it: the Rust launcher in
/// `src/backend/cuda/` that launches it (it names the entry's `ptx::` constant), the CPU
/// twin whose semantics it has (a `fn` under `src/backend/cpu/`), and the parity test
/// that compares the two on a GPU (`tests/gpu_*.rs`, gated on QILIN_GPU_TESTS, naming
/// the twin).
struct Coverage {
    entry: &'static str,
    launcher: &'static str,
    twin: &'static str,
    parity: &'static str,
}

/// Every `extern "C" __global__` kernel in kernels/*.cu has a row here; a new kernel
/// without one fails `every_entry_point_has_a_launcher_a_twin_and_a_parity_test`.
const COVERAGE: &[Coverage] = &[
    Coverage {
        entry: "qilin_fused_add_rms_norm_bf16",
        launcher: "src/backend/cuda/norm.rs",
        twin: "add_rms_norm_rows",
        parity: "tests/gpu_norm.rs",
    },
    Coverage {
        entry: "qilin_rms_norm_bf16",
        launcher: "src/backend/cuda/norm.rs",
        twin: "add_rms_norm_rows",
        parity: "tests/gpu_norm.rs",
    },
    Coverage {
        entry: "qilin_embedding_bf16",
        launcher: "src/backend/cuda/elementwise.rs",
        twin: "embedding",
        parity: "tests/gpu_elementwise.rs",
    },
    Coverage {
        entry: "qilin_gather_rows_bf16",
        launcher: "src/backend/cuda/elementwise.rs",
        twin: "gather_rows",
        parity: "tests/gpu_elementwise.rs",
    },
    Coverage {
        entry: "qilin_copy_cols_bf16",
        launcher: "src/backend/cuda/elementwise.rs",
        twin: "split_cols",
        parity: "tests/gpu_elementwise.rs",
    },
    Coverage {
        entry: "qilin_silu_mul_bf16",
        launcher: "src/backend/cuda/elementwise.rs",
        twin: "silu_mul",
        parity: "tests/gpu_elementwise.rs",
    },
    Coverage {
        entry: "qilin_rope_store_kv_bf16",
        launcher: "src/backend/cuda/rope.rs",
        twin: "rope_and_store_kv",
        parity: "tests/gpu_rope.rs",
    },
    Coverage {
        entry: "qilin_rope_qkv_store_kv_bf16",
        launcher: "src/backend/cuda/rope.rs",
        twin: "rope_and_store_kv",
        parity: "tests/gpu_rope.rs",
    },
    Coverage {
        entry: "qilin_gemv_bf16",
        launcher: "src/backend/cuda/linear.rs",
        twin: "linear",
        parity: "tests/gpu_linear.rs",
    },
    Coverage {
        entry: "qilin_gemv_mma_bf16",
        launcher: "src/backend/cuda/linear.rs",
        twin: "linear",
        parity: "tests/gpu_linear.rs",
    },
    Coverage {
        entry: "qilin_bias_round_bf16",
        launcher: "src/backend/cuda/linear.rs",
        twin: "linear",
        parity: "tests/gpu_linear.rs",
    },
    Coverage {
        entry: "qilin_qgemv_w4_bf16",
        launcher: "src/backend/cuda/quant_linear.rs",
        twin: "linear",
        parity: "tests/gpu_quant_linear.rs",
    },
    Coverage {
        entry: "qilin_qgemv_w8_bf16",
        launcher: "src/backend/cuda/quant_linear.rs",
        twin: "linear",
        parity: "tests/gpu_quant_linear.rs",
    },
    Coverage {
        entry: "qilin_qgemv_small_w4_bf16",
        launcher: "src/backend/cuda/quant_linear.rs",
        twin: "linear",
        parity: "tests/gpu_quant_linear.rs",
    },
    Coverage {
        entry: "qilin_qgemv_small_w8_bf16",
        launcher: "src/backend/cuda/quant_linear.rs",
        twin: "linear",
        parity: "tests/gpu_quant_linear.rs",
    },
    Coverage {
        entry: "qilin_qgemv_mma_w4_bf16",
        launcher: "src/backend/cuda/quant_linear.rs",
        twin: "linear",
        parity: "tests/gpu_quant_linear.rs",
    },
    Coverage {
        entry: "qilin_qgemv_mma_splitk_w4_bf16",
        launcher: "src/backend/cuda/quant_linear.rs",
        twin: "linear",
        parity: "tests/gpu_quant_linear.rs",
    },
    Coverage {
        entry: "qilin_dequant_w4_bf16",
        launcher: "src/backend/cuda/quant_linear.rs",
        twin: "linear",
        parity: "tests/gpu_quant_linear.rs",
    },
    Coverage {
        entry: "qilin_dequant_w8_bf16",
        launcher: "src/backend/cuda/quant_linear.rs",
        twin: "linear",
        parity: "tests/gpu_quant_linear.rs",
    },
    Coverage {
        entry: "qilin_qgemm_w4_bf16",
        launcher: "src/backend/cuda/quant_linear.rs",
        twin: "linear",
        parity: "tests/gpu_quant_linear.rs",
    },
    Coverage {
        entry: "qilin_qgemm_w8_bf16",
        launcher: "src/backend/cuda/quant_linear.rs",
        twin: "linear",
        parity: "tests/gpu_quant_linear.rs",
    },
    Coverage {
        entry: "qilin_qgemm_mma_w4_bf16",
        launcher: "src/backend/cuda/quant_gemm_mma.rs",
        twin: "linear",
        parity: "tests/gpu_quant_linear.rs",
    },
    Coverage {
        entry: "qilin_argmax_bf16",
        launcher: "src/backend/cuda/sampling.rs",
        twin: "argmax_rows",
        parity: "tests/gpu_sampling.rs",
    },
    Coverage {
        entry: "qilin_sample_bf16",
        launcher: "src/backend/cuda/sampling.rs",
        twin: "sample_rows",
        parity: "tests/gpu_sampling.rs",
    },
    Coverage {
        entry: "qilin_argmax_split_bf16",
        launcher: "src/backend/cuda/sampling.rs",
        twin: "argmax_rows",
        parity: "tests/gpu_sampling.rs",
    },
    Coverage {
        entry: "qilin_sample_split_bf16",
        launcher: "src/backend/cuda/sampling.rs",
        twin: "sample_rows",
        parity: "tests/gpu_sampling.rs",
    },
    Coverage {
        entry: "qilin_apply_penalties_bf16",
        launcher: "src/backend/cuda/sampling.rs",
        twin: "penalize_row_bf16",
        parity: "tests/gpu_sampling.rs",
    },
    Coverage {
        entry: "qilin_attention_decode_g4_bf16",
        launcher: "src/backend/cuda/decode_plan.rs",
        twin: "attention",
        parity: "tests/gpu_attention.rs",
    },
    Coverage {
        entry: "qilin_attention_decode_g8_bf16",
        launcher: "src/backend/cuda/decode_plan.rs",
        twin: "attention",
        parity: "tests/gpu_attention.rs",
    },
    Coverage {
        entry: "qilin_attention_decode_mma_hd128_bf16",
        launcher: "src/backend/cuda/decode_plan.rs",
        twin: "attention",
        parity: "tests/gpu_attention.rs",
    },
    Coverage {
        entry: "qilin_attention_decode_mma_hd64_bf16",
        launcher: "src/backend/cuda/decode_plan.rs",
        twin: "attention",
        parity: "tests/gpu_attention.rs",
    },
    Coverage {
        entry: "qilin_attention_decode_pipe_hd128_bf16",
        launcher: "src/backend/cuda/decode_plan.rs",
        twin: "attention",
        parity: "tests/gpu_attention.rs",
    },
    Coverage {
        entry: "qilin_attention_decode_pipe_hd64_bf16",
        launcher: "src/backend/cuda/decode_plan.rs",
        twin: "attention",
        parity: "tests/gpu_attention.rs",
    },
    Coverage {
        entry: "qilin_attention_decode_reduce_bf16",
        launcher: "src/backend/cuda/attention.rs",
        twin: "attention",
        parity: "tests/gpu_attention.rs",
    },
    Coverage {
        entry: "qilin_attention_prefill_wide_hd64_bf16",
        launcher: "src/backend/cuda/attention.rs",
        twin: "attention",
        parity: "tests/gpu_attention.rs",
    },
    Coverage {
        entry: "qilin_attention_prefill_v2_hd128_bf16",
        launcher: "src/backend/cuda/attention.rs",
        twin: "attention",
        parity: "tests/gpu_attention.rs",
    },
    Coverage {
        entry: "qilin_attention_prefill_simple_bf16",
        launcher: "src/backend/cuda/attention.rs",
        twin: "attention",
        parity: "tests/gpu_attention.rs",
    },
];

fn source(rel: &str) -> Option<String> {
    std::fs::read_to_string(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(rel)).ok()
}

fn rust_files_under(rel: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut dirs = vec![std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(rel)];
    while let Some(dir) = dirs.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else { continue };
        for path in entries.flatten().map(|e| e.path()) {
            if path.is_dir() {
                dirs.push(path);
            } else if path.extension().is_some_and(|x| x == "rs") {
                let text = std::fs::read_to_string(&path).unwrap_or_default();
                out.push((path.display().to_string(), text));
            }
        }
    }
    out
}

/// Whether `text` contains `word` with no identifier character on either side.
fn has_word(text: &str, word: &str) -> bool {
    let ident = |c: char| c.is_ascii_alphanumeric() || c == '_';
    text.match_indices(word).any(|(at, _)| {
        let before = text[..at].chars().next_back();
        let after = text[at + word.len()..].chars().next();
        !before.is_some_and(ident) && !after.is_some_and(ident)
    })
}

/// `extern "C" __global__` kernels defined in kernels/*.cu, read from the source so the
/// check runs in CPU-only builds too: (file stem, entry name).
fn source_entries() -> BTreeSet<(String, String)> {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("kernels");
    let mut entries = BTreeSet::new();
    for path in std::fs::read_dir(&dir).expect("kernels/ is readable").flatten().map(|e| e.path()) {
        if path.extension().is_none_or(|x| x != "cu") {
            continue;
        }
        let stem = path.file_stem().unwrap_or_default().to_string_lossy().into_owned();
        let text = std::fs::read_to_string(&path).expect("kernel source is readable");
        for (at, _) in text.match_indices("__global__") {
            // The kernel's name is the first identifier before `(` that is not a
            // qualifier or a __launch_bounds__ argument.
            let rest = &text[at + "__global__".len()..];
            let name = rest
                .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .find(|w| w.starts_with("qilin_"));
            if let Some(name) = name {
                entries.insert((stem.clone(), name.to_string()));
            }
        }
    }
    entries
}

/// `pub const NAME: Kernel = Kernel { module: "...", entry: "..." }` in ptx.rs, by entry.
fn kernel_constants() -> Vec<(String, String)> {
    let text = source("src/backend/ptx.rs").expect("src/backend/ptx.rs is readable");
    let mut out = Vec::new();
    for piece in text.split("pub const ").skip(1) {
        let Some((name, rest)) = piece.split_once(':') else { continue };
        if !rest.trim_start().starts_with("Kernel") {
            continue;
        }
        let Some(entry) = rest.split("entry:").nth(1).and_then(|e| e.split('"').nth(1)) else {
            continue;
        };
        out.push((name.trim().to_string(), entry.to_string()));
    }
    out
}

#[test]
fn every_entry_point_has_a_launcher_a_twin_and_a_parity_test() {
    let entries = source_entries();
    assert!(!entries.is_empty(), "no __global__ kernels found in kernels/*.cu");
    let constants = kernel_constants();
    let twins = rust_files_under("src/backend/cpu");
    let mut problems = Vec::new();
    for (module, entry) in &entries {
        let Some(row) = COVERAGE.iter().find(|r| r.entry == entry) else {
            problems.push(format!(
                "{entry} (kernels/{module}.cu) has no row in COVERAGE (tests/ptx_kernels.rs): \
                 add its launcher, CPU twin and parity test"
            ));
            continue;
        };
        // Launcher: names the ptx:: constant of this entry, which KERNELS lists.
        match constants.iter().find(|(_, e)| e == entry) {
            None => {
                problems.push(format!("{entry}: no `pub const ...: Kernel` in src/backend/ptx.rs"))
            }
            Some((name, _)) => {
                if !ptx::KERNELS.iter().any(|k| k.entry == entry) {
                    problems.push(format!("{entry}: ptx::{name} is not listed in ptx::KERNELS"));
                }
                match source(row.launcher) {
                    None => {
                        problems.push(format!("{entry}: launcher {} does not exist", row.launcher))
                    }
                    Some(text) if !text.contains(&format!("ptx::{name}")) => problems.push(
                        format!("{entry}: launcher {} never names ptx::{name}", row.launcher),
                    ),
                    Some(_) => {}
                }
            }
        }
        // CPU twin: a function of that name in the CPU backend.
        let twin_def = format!("fn {}", row.twin);
        if !twins.iter().any(|(_, text)| {
            text.match_indices(&twin_def)
                .any(|(at, _)| text[at + twin_def.len()..].starts_with(['(', '<']))
        }) {
            problems.push(format!("{entry}: no CPU twin `fn {}` under src/backend/cpu/", row.twin));
        }
        // Parity test: a gated tests/gpu_*.rs that exercises the twin.
        if !row.parity.starts_with("tests/gpu_") {
            problems.push(format!("{entry}: parity test {} is not a tests/gpu_*.rs", row.parity));
        }
        match source(row.parity) {
            None => problems.push(format!("{entry}: parity test {} does not exist", row.parity)),
            Some(text) => {
                if !text.contains("QILIN_GPU_TESTS") {
                    problems
                        .push(format!("{entry}: {} is not gated on QILIN_GPU_TESTS", row.parity));
                }
                if !has_word(&text, row.twin) {
                    problems.push(format!(
                        "{entry}: {} never mentions its twin {}",
                        row.parity, row.twin
                    ));
                }
            }
        }
    }
    for row in COVERAGE {
        if !entries.iter().any(|(_, e)| e == row.entry) {
            problems.push(format!("COVERAGE row {} matches no kernel in kernels/*.cu", row.entry));
        }
    }
    if ptx_available() {
        let compiled: BTreeSet<(String, String)> = ptx::ALL
            .iter()
            .flat_map(|(m, text)| {
                entry_names(text).into_iter().map(|e| (m.to_string(), e.to_string()))
            })
            .collect();
        if compiled != entries {
            problems.push(format!(
                "kernels found in the .cu sources {entries:?} differ from the PTX's {compiled:?}"
            ));
        }
    }
    assert!(problems.is_empty(), "{} problem(s):\n  {}", problems.len(), problems.join("\n  "));
}

#[test]
fn elementwise_and_rope_params_match_the_rust_layout() {
    use qilin::backend::abi::{
        QilinCopyColsParams, QilinGatherRowsParams, QilinRopeParams, QilinSiluMulParams,
    };
    if !ptx_available() {
        return;
    }
    let layout = |size: usize, align: usize| Some((align, size));
    let gather = layout(size_of::<QilinGatherRowsParams>(), align_of::<QilinGatherRowsParams>());
    let cases = [
        (ptx::EMBEDDING_BF16, gather),
        (ptx::GATHER_ROWS_BF16, gather),
        (
            ptx::COPY_COLS_BF16,
            layout(size_of::<QilinCopyColsParams>(), align_of::<QilinCopyColsParams>()),
        ),
        (
            ptx::SILU_MUL_BF16,
            layout(size_of::<QilinSiluMulParams>(), align_of::<QilinSiluMulParams>()),
        ),
        (
            ptx::ROPE_STORE_KV_BF16,
            layout(size_of::<QilinRopeParams>(), align_of::<QilinRopeParams>()),
        ),
        (
            ptx::ROPE_QKV_STORE_KV_BF16,
            layout(size_of::<QilinRopeParams>(), align_of::<QilinRopeParams>()),
        ),
    ];
    for (kernel, expected) in cases {
        let text = module_ptx(kernel.module).expect("module embedded");
        assert_eq!(
            byte_param(text, kernel.entry, 0),
            expected,
            "{}: params struct as nvcc sees it vs as Rust sees it",
            kernel.entry
        );
    }
}

#[test]
fn gemv_module_entries_and_params_match_the_rust_side() {
    use qilin::backend::abi::{QilinBiasParams, QilinGemvParams};
    if !ptx_available() {
        return;
    }
    let gemv: BTreeSet<&str> = entry_names(ptx::GEMV_PTX).into_iter().collect();
    let expected: BTreeSet<&str> =
        [ptx::GEMV_BF16.entry, ptx::GEMV_MMA_BF16.entry, ptx::BIAS_ROUND_BF16.entry]
            .into_iter()
            .collect();
    assert_eq!(gemv, expected);
    let layouts = [
        (ptx::GEMV_BF16, (align_of::<QilinGemvParams>(), size_of::<QilinGemvParams>())),
        (ptx::GEMV_MMA_BF16, (align_of::<QilinGemvParams>(), size_of::<QilinGemvParams>())),
        (ptx::BIAS_ROUND_BF16, (align_of::<QilinBiasParams>(), size_of::<QilinBiasParams>())),
    ];
    for (kernel, layout) in layouts {
        let text = module_ptx(kernel.module).expect("module embedded");
        assert_eq!(
            byte_param(text, kernel.entry, 0),
            Some(layout),
            "{}: params struct as nvcc sees it vs as Rust sees it",
            kernel.entry
        );
    }
}

#[test]
fn quant_gemv_mma_module_entries_and_params_match_the_rust_side() {
    use qilin::backend::abi::QilinQuantGemvParams;
    if !ptx_available() {
        return;
    }
    module_is_these_kernels_taking::<QilinQuantGemvParams>(&[
        ptx::QGEMV_MMA_W4_BF16,
        ptx::QGEMV_MMA_SPLITK_W4_BF16,
    ]);
}

#[test]
fn quant_gemm_mma_module_entries_and_params_match_the_rust_side() {
    use qilin::backend::abi::QilinQuantGemvParams;
    if !ptx_available() {
        return;
    }
    module_is_these_kernels_taking::<QilinQuantGemvParams>(&[ptx::QGEMM_MMA_W4_BF16]);
}

/// `kernels` are every entry of their (one) module, each taking a `P` first, by value, as
/// nvcc lays it out.
fn module_is_these_kernels_taking<P>(kernels: &[ptx::Kernel]) {
    let text = module_ptx(kernels[0].module).expect("module embedded");
    let entries: BTreeSet<&str> = entry_names(text).into_iter().collect();
    assert_eq!(entries, kernels.iter().map(|k| k.entry).collect::<BTreeSet<&str>>());
    for kernel in kernels {
        assert_eq!(kernel.module, kernels[0].module);
        assert_eq!(
            byte_param(text, kernel.entry, 0),
            Some((align_of::<P>(), size_of::<P>())),
            "{}: params struct as nvcc sees it vs as Rust sees it",
            kernel.entry
        );
    }
}

#[test]
fn sampling_module_entries_and_params_match_the_rust_side() {
    use qilin::backend::abi::{QilinArgmaxParams, QilinSampleParams};
    if !ptx_available() {
        return;
    }
    let entries: BTreeSet<&str> = entry_names(ptx::SAMPLING_PTX).into_iter().collect();
    assert_eq!(entries, [ptx::ARGMAX_BF16.entry, ptx::SAMPLE_BF16.entry].into_iter().collect());
    let text = module_ptx(ptx::ARGMAX_BF16.module).expect("module embedded");
    assert_eq!(
        byte_param(text, ptx::ARGMAX_BF16.entry, 0),
        Some((align_of::<QilinArgmaxParams>(), size_of::<QilinArgmaxParams>())),
        "qilin_argmax_bf16: params struct as nvcc sees it vs as Rust sees it"
    );
    assert_eq!(
        byte_param(text, ptx::SAMPLE_BF16.entry, 0),
        Some((align_of::<QilinSampleParams>(), size_of::<QilinSampleParams>())),
        "qilin_sample_bf16: params struct as nvcc sees it vs as Rust sees it"
    );
}

#[test]
fn sampling_split_module_entries_and_params_match_the_rust_side() {
    use qilin::backend::abi::QilinSampleSplitParams;
    if !ptx_available() {
        return;
    }
    module_is_these_kernels_taking::<QilinSampleSplitParams>(&[
        ptx::ARGMAX_SPLIT_BF16,
        ptx::SAMPLE_SPLIT_BF16,
    ]);
}

#[test]
fn penalties_module_entries_and_params_match_the_rust_side() {
    use qilin::backend::abi::QilinPenaltyParams;
    if !ptx_available() {
        return;
    }
    module_is_these_kernels_taking::<QilinPenaltyParams>(&[ptx::APPLY_PENALTIES_BF16]);
}

#[test]
fn attention_module_entries_and_params_match_the_rust_side() {
    use qilin::backend::abi::QilinAttentionParams;
    if !ptx_available() {
        return;
    }
    let decode: BTreeSet<&str> = entry_names(ptx::ATTENTION_DECODE_PTX).into_iter().collect();
    let expected: BTreeSet<&str> = [
        ptx::ATTENTION_DECODE_G4_BF16.entry,
        ptx::ATTENTION_DECODE_G8_BF16.entry,
        ptx::ATTENTION_DECODE_MMA_HD128_BF16.entry,
        ptx::ATTENTION_DECODE_MMA_HD64_BF16.entry,
        ptx::ATTENTION_DECODE_REDUCE_BF16.entry,
    ]
    .into_iter()
    .collect();
    assert_eq!(decode, expected);
    let pipe: BTreeSet<&str> = entry_names(ptx::ATTENTION_DECODE_PIPE_PTX).into_iter().collect();
    let expected: BTreeSet<&str> =
        [ptx::ATTENTION_DECODE_PIPE_HD128_BF16.entry, ptx::ATTENTION_DECODE_PIPE_HD64_BF16.entry]
            .into_iter()
            .collect();
    assert_eq!(pipe, expected);
    let prefill: BTreeSet<&str> = entry_names(ptx::ATTENTION_PREFILL_PTX).into_iter().collect();
    assert_eq!(prefill, BTreeSet::from([ptx::ATTENTION_PREFILL_WIDE_HD64_BF16.entry]));
    let v2: BTreeSet<&str> = entry_names(ptx::ATTENTION_PREFILL_V2_PTX).into_iter().collect();
    assert_eq!(v2, BTreeSet::from([ptx::ATTENTION_PREFILL_V2_HD128_BF16.entry]));
    let simple: BTreeSet<&str> = entry_names(ptx::ATTENTION_SIMPLE_PTX).into_iter().collect();
    assert_eq!(simple, BTreeSet::from([ptx::ATTENTION_PREFILL_SIMPLE_BF16.entry]));
    let layout = (align_of::<QilinAttentionParams>(), size_of::<QilinAttentionParams>());
    for kernel in [
        ptx::ATTENTION_DECODE_G4_BF16,
        ptx::ATTENTION_DECODE_G8_BF16,
        ptx::ATTENTION_DECODE_MMA_HD128_BF16,
        ptx::ATTENTION_DECODE_MMA_HD64_BF16,
        ptx::ATTENTION_DECODE_PIPE_HD128_BF16,
        ptx::ATTENTION_DECODE_PIPE_HD64_BF16,
        ptx::ATTENTION_DECODE_REDUCE_BF16,
        ptx::ATTENTION_PREFILL_WIDE_HD64_BF16,
        ptx::ATTENTION_PREFILL_V2_HD128_BF16,
        ptx::ATTENTION_PREFILL_SIMPLE_BF16,
    ] {
        let text = module_ptx(kernel.module).expect("module embedded");
        assert_eq!(
            byte_param(text, kernel.entry, 0),
            Some(layout),
            "{}: params struct as nvcc sees it vs as Rust sees it",
            kernel.entry
        );
    }
}
