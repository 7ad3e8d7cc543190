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

/// Newest PTX ISA that driver 580 (our H100/H200 machines) JIT-compiles: nvcc 13.0's.
const NEWEST_LOADABLE_PTX_ISA: (u32, u32) = (9, 0);

fn ptx_available() -> bool {
    if ptx::PTX_AVAILABLE {
        return true;
    }
    assert!(
        std::env::var("QILIN_REQUIRE_PTX").as_deref() != Ok("1"),
        "QILIN_REQUIRE_PTX=1 but this is a CPU-only build: build.rs found no nvcc (run \
         tools/setup)"
    );
    eprintln!("skipped: CPU-only build, no PTX embedded (run tools/setup for nvcc)");
    false
}

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
