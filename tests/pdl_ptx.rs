//! Programmatic dependent launch (src/backend/cuda/pdl.rs) on the embedded PTX: every
//! entry of every module keeps kernels/pdl.cuh's contract (its wait first, nothing that
//! touches global memory or branches before it), and every module rewritten for sm_90
//! assembles with ptxas for sm_90a with no marker left, no spill and no stack frame: the
//! code an H100/H200 JIT-compiles with QILIN_CUDA_PDL=1.
//!
//! In a CPU-only build there is no PTX: the tests say so and pass, unless
//! `QILIN_REQUIRE_PTX=1` (CI sets it). ptxas comes from PTXAS, the project venv
//! (tools/setup) or PATH; with PTX embedded, its absence is a failure.

use std::path::{Path, PathBuf};
use std::process::Command;

use qilin::backend::cuda::pdl::{check_entries, rewrite_for_sm90};
use qilin::backend::ptx::{self, entry_names};

#[path = "common/ptx.rs"]
mod ptx_common;
use ptx_common::ptx_available;

#[test]
fn every_entry_waits_before_touching_memory() {
    if !ptx_available() {
        return;
    }
    let mut problems = Vec::new();
    for (module, text) in ptx::ALL {
        let checks = check_entries(text);
        for entry in entry_names(text) {
            match checks.get(entry) {
                Some(Ok(())) => {}
                Some(Err(why)) => problems.push(format!("{module}.ptx {entry}: {why}")),
                None => problems.push(format!("{module}.ptx {entry}: not checked")),
            }
        }
    }
    assert!(problems.is_empty(), "entries that break the PDL contract:\n{}", problems.join("\n"));
    for kernel in ptx::KERNELS {
        let text = ptx::module_ptx(kernel.module).expect("module of a listed kernel");
        assert_eq!(check_entries(text).get(kernel.entry), Some(&Ok(())), "{}", kernel.entry);
    }
}

fn find_ptxas() -> PathBuf {
    if let Some(explicit) = std::env::var_os("PTXAS") {
        return explicit.into();
    }
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let lib = root.join(".venv/lib");
    if let Ok(dirs) = std::fs::read_dir(&lib) {
        let mut found: Vec<PathBuf> = dirs
            .flatten()
            .map(|d| d.path().join("site-packages/nvidia/cu13/bin/ptxas"))
            .filter(|p| p.is_file())
            .collect();
        found.sort();
        if let Some(ptxas) = found.pop() {
            return ptxas;
        }
    }
    "ptxas".into()
}

#[test]
fn rewritten_modules_assemble_for_sm90a_without_spills() {
    if !ptx_available() {
        return;
    }
    let ptxas = find_ptxas();
    let dir = std::env::temp_dir().join(format!("qilin-pdl-ptx-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    // One ptxas per module, side by side: the large modules take seconds each.
    let problems: Vec<String> = std::thread::scope(|scope| {
        let workers: Vec<_> = ptx::ALL
            .iter()
            .map(|(module, text)| {
                let (ptxas, dir) = (&ptxas, &dir);
                scope.spawn(move || assemble_rewritten(ptxas, dir, module, text))
            })
            .collect();
        workers.into_iter().flat_map(|w| w.join().expect("ptxas worker")).collect()
    });
    let _ = std::fs::remove_dir_all(&dir);
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

/// ptxas -arch=sm_90a on `module` rewritten for PDL: what is wrong with it, if anything.
fn assemble_rewritten(ptxas: &Path, dir: &Path, module: &str, text: &str) -> Vec<String> {
    let rewritten = rewrite_for_sm90(text).unwrap_or_else(|e| panic!("{module}.ptx: {e}"));
    assert!(!rewritten.contains("qilin:pdl"), "{module}.ptx: a marker was left");
    assert!(rewritten.contains("griddepcontrol.wait;"), "{module}.ptx: no wait");
    let path = dir.join(format!("{module}.ptx"));
    std::fs::write(&path, &rewritten).expect("writing the rewritten PTX");
    let output = Command::new(ptxas)
        .args(["-arch=sm_90a", "-v", "-o", "/dev/null"])
        .arg(&path)
        .output()
        .unwrap_or_else(|e| {
            panic!("cannot run {} (run tools/setup or set PTXAS): {e}", ptxas.display())
        });
    let log = String::from_utf8_lossy(&output.stderr);
    if !output.status.success() {
        return vec![format!("{module}.ptx: ptxas failed:\n{log}")];
    }
    log.lines()
        .filter(|l| l.contains("stack frame"))
        .filter(|l| !l.contains("0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads"))
        .map(|l| format!("{module}.ptx: {}", l.trim()))
        .collect()
}
