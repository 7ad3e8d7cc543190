//! Build script: the two things Rust needs from `kernels/`.
//!
//! 1. nvcc compiles every `kernels/*.cu` to PTX in OUT_DIR, and `OUT_DIR/ptx.rs` embeds
//!    them (`<STEM>_PTX` constants and the `ALL` list; see `src/backend/ptx.rs`).
//!    No nvcc: one warning, empty PTX, `PTX_AVAILABLE = false`, a CPU-only build.
//! 2. bindgen turns `kernels/abi.h` into `OUT_DIR/abi_bindings.rs` and sets
//!    `cfg(qilin_bindgen)`. No libclang: one warning, and `src/backend/abi.rs` uses the
//!    committed `src/backend/abi_bindings.rs` (a test keeps the two identical).
//!
//! Neither missing tool fails the build; a kernel that nvcc rejects does, with nvcc's
//! message, because shipping a build without that kernel would hide the mistake.

use std::env;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};

/// Virtual architecture of the PTX. The driver JIT-compiles compute_80 PTX for any
/// sm_80+ GPU (A100, L40S, H100, H200); kernels that need sm_90a features will get
/// their own target when they exist.
const PTX_ARCH: &str = "compute_80";

/// nvcc 13.1+ emits PTX ISA 9.1+, which driver 580 and ptxas 13.0 reject.
const NEWEST_SAFE_NVCC: (u32, u32) = (13, 0);

const SETUP_HINT: &str = "run tools/setup (installs the pinned nvcc 13.0 into .venv, no GPU \
                          needed) or set NVCC=/path/to/nvcc";

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("error: {message}");
            ExitCode::FAILURE
        }
    }
}

fn run() -> Result<(), String> {
    let manifest_dir = PathBuf::from(env_path("CARGO_MANIFEST_DIR")?);
    let out_dir = PathBuf::from(env_path("OUT_DIR")?);
    let kernels_dir = manifest_dir.join("kernels");

    println!("cargo::rerun-if-changed=kernels");
    println!("cargo::rerun-if-changed=src/backend/abi_bindings.rs");
    for var in ["NVCC", "CUDA_HOME", "CUDA_PATH", "LIBCLANG_PATH"] {
        println!("cargo::rerun-if-env-changed={var}");
    }
    println!("cargo::rustc-check-cfg=cfg(qilin_bindgen)");

    let sources = kernel_sources(&kernels_dir)?;
    let nvcc = find_nvcc(&manifest_dir);
    let ptx_files = match &nvcc {
        Ok(nvcc) => {
            // A different compiler at the same path (pip upgrade) must rebuild the PTX.
            println!("cargo::rerun-if-changed={}", nvcc.display());
            check_nvcc_version(nvcc);
            Some(compile_all(nvcc, &kernels_dir, &sources, &out_dir)?)
        }
        Err(why) => {
            // tools/setup creates .venv; watching it lets the next build find the new nvcc.
            let venv = manifest_dir.join(".venv");
            if venv.is_dir() {
                println!("cargo::rerun-if-changed={}", venv.display());
            }
            println!(
                "cargo::warning=CPU-only build: {why}, so kernels/*.cu are not compiled and \
                 the CUDA backend is unavailable. To build the GPU kernels, {SETUP_HINT}."
            );
            None
        }
    };
    write_if_changed(&out_dir.join("ptx.rs"), &ptx_module(&sources, ptx_files.as_deref()))?;

    match generate_bindings(&kernels_dir.join("abi.h")) {
        Ok(text) => {
            write_if_changed(&out_dir.join("abi_bindings.rs"), &text)?;
            println!("cargo::rustc-cfg=qilin_bindgen");
        }
        Err(why) => println!(
            "cargo::warning=bindgen skipped ({why}); using the committed \
             src/backend/abi_bindings.rs. Install libclang (Debian: apt-get install \
             libclang1-14 libclang-common-14-dev) or set LIBCLANG_PATH to regenerate it."
        ),
    }
    Ok(())
}

fn env_path(name: &str) -> Result<std::ffi::OsString, String> {
    env::var_os(name).ok_or_else(|| format!("cargo did not set {name}"))
}

/// `kernels/*.cu`, sorted so the generated module is the same on every machine.
fn kernel_sources(kernels_dir: &Path) -> Result<Vec<PathBuf>, String> {
    let entries = fs::read_dir(kernels_dir)
        .map_err(|e| format!("cannot list {}: {e}", kernels_dir.display()))?;
    let mut sources = Vec::new();
    for entry in entries {
        let path = entry.map_err(|e| format!("cannot list {}: {e}", kernels_dir.display()))?.path();
        if path.extension().is_some_and(|ext| ext == "cu") {
            sources.push(path);
        }
    }
    sources.sort();
    Ok(sources)
}

fn stem(path: &Path) -> String {
    path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default()
}

/// `norm` -> `NORM_PTX`; anything that is not a letter or digit becomes `_`.
fn const_name(stem: &str) -> String {
    let mut name: String = stem
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c.to_ascii_uppercase() } else { '_' })
        .collect();
    if name.starts_with(|c: char| c.is_ascii_digit()) {
        name.insert(0, '_');
    }
    name + "_PTX"
}

/// Order: NVCC (exclusive: a wrong value is reported, not silently replaced), CUDA_HOME
/// and CUDA_PATH, PATH, then the project venv that tools/setup fills.
fn find_nvcc(manifest_dir: &Path) -> Result<PathBuf, String> {
    if let Some(explicit) = env::var_os("NVCC").filter(|v| !v.is_empty()) {
        let path = PathBuf::from(&explicit);
        return if path.is_file() {
            Ok(path)
        } else {
            Err(format!("NVCC={} is not a file", path.display()))
        };
    }
    for var in ["CUDA_HOME", "CUDA_PATH"] {
        if let Some(home) = env::var_os(var).filter(|v| !v.is_empty()) {
            let candidate = Path::new(&home).join("bin").join("nvcc");
            if candidate.is_file() {
                return Ok(candidate);
            }
        }
    }
    if let Some(path) = env::var_os("PATH") {
        for dir in env::split_paths(&path) {
            let candidate = dir.join("nvcc");
            if candidate.is_file() {
                return Ok(candidate);
            }
        }
    }
    let lib = manifest_dir.join(".venv").join("lib");
    if let Ok(entries) = fs::read_dir(&lib) {
        let mut pythons: Vec<PathBuf> = entries
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.file_name().is_some_and(|n| n.to_string_lossy().starts_with("python3")))
            .collect();
        pythons.sort();
        for python in pythons.iter().rev() {
            let candidate = python.join("site-packages/nvidia/cu13/bin/nvcc");
            if candidate.is_file() {
                return Ok(candidate);
            }
        }
    }
    Err("no nvcc found (NVCC, CUDA_HOME/bin, PATH, .venv)".to_string())
}

/// Warns (does not fail) when nvcc is newer than the drivers we deploy on can JIT.
fn check_nvcc_version(nvcc: &Path) {
    let Ok(output) = Command::new(nvcc).arg("--version").output() else { return };
    let text = String::from_utf8_lossy(&output.stdout);
    let release = text.split("release ").nth(1).and_then(|rest| rest.split(',').next());
    let parsed = release.and_then(|r| {
        let mut parts = r.trim().split('.').map(|n| n.parse::<u32>().ok());
        Some((parts.next()??, parts.next()??))
    });
    if let Some(version) = parsed {
        if version > NEWEST_SAFE_NVCC {
            println!(
                "cargo::warning={} is CUDA {}.{}: its PTX needs a driver newer than 580; \
                 the project pins nvcc 13.0 (tools/setup)",
                nvcc.display(),
                version.0,
                version.1
            );
        }
    }
}

/// Runs nvcc on every source in parallel (attention kernels take seconds each).
fn compile_all(
    nvcc: &Path,
    kernels_dir: &Path,
    sources: &[PathBuf],
    out_dir: &Path,
) -> Result<Vec<PathBuf>, String> {
    let results: Vec<Result<PathBuf, String>> = std::thread::scope(|scope| {
        let handles: Vec<_> = sources
            .iter()
            .map(|src| scope.spawn(move || compile_one(nvcc, kernels_dir, src, out_dir)))
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or_else(|_| Err("nvcc worker thread panicked".into())))
            .collect()
    });
    let mut ptx = Vec::new();
    let mut errors = Vec::new();
    for result in results {
        match result {
            Ok(path) => ptx.push(path),
            Err(e) => errors.push(e),
        }
    }
    if errors.is_empty() {
        Ok(ptx)
    } else {
        Err(errors.join("\n"))
    }
}

fn compile_one(
    nvcc: &Path,
    kernels_dir: &Path,
    src: &Path,
    out_dir: &Path,
) -> Result<PathBuf, String> {
    let ptx = out_dir.join(format!("{}.ptx", stem(src)));
    let output = Command::new(nvcc)
        .arg("--ptx")
        .arg(format!("-arch={PTX_ARCH}"))
        .args(["-O3", "-std=c++17"])
        // Source lines in the PTX let Nsight Compute attribute stalls to kernel code.
        .arg("-lineinfo")
        .arg("-I")
        .arg(kernels_dir)
        .arg("-o")
        .arg(&ptx)
        .arg(src)
        .output()
        .map_err(|e| format!("cannot run {}: {e}", nvcc.display()))?;
    let stderr = String::from_utf8_lossy(&output.stderr);
    if !output.status.success() {
        return Err(format!(
            "nvcc failed on {} ({}):\n{}{}",
            src.display(),
            output.status,
            String::from_utf8_lossy(&output.stdout),
            stderr
        ));
    }
    for line in stderr.lines().filter(|l| !l.trim().is_empty()) {
        println!("cargo::warning=nvcc: {line}");
    }
    Ok(ptx)
}

/// The text of `OUT_DIR/ptx.rs`. Every kernel file gets its constant even without nvcc,
/// so code that names one compiles in CPU-only builds (it is then empty).
fn ptx_module(sources: &[PathBuf], ptx: Option<&[PathBuf]>) -> String {
    let mut text = String::from("// @generated by build.rs from kernels/*.cu; do not edit.\n\n");
    text += &format!(
        "/// Whether nvcc compiled kernels/*.cu into this build.\n\
         pub const PTX_AVAILABLE: bool = {};\n\n\
         /// The virtual architecture of the embedded PTX.\n\
         pub const PTX_ARCH: &str = \"{PTX_ARCH}\";\n\n",
        ptx.is_some()
    );
    for src in sources {
        let stem = stem(src);
        let body = if ptx.is_some() {
            format!("include_str!(concat!(env!(\"OUT_DIR\"), \"/{stem}.ptx\"))")
        } else {
            "\"\"".to_string()
        };
        text += &format!(
            "/// PTX of kernels/{stem}.cu (empty in a CPU-only build).\n\
             pub const {}: &str = {body};\n\n",
            const_name(&stem)
        );
    }
    text += "/// Every compiled kernel file as (file stem, PTX); empty in a CPU-only build.\n\
             pub const ALL: &[(&str, &str)] = &[";
    if ptx.is_some() {
        for src in sources {
            let stem = stem(src);
            text += &format!("\n    (\"{stem}\", {}),", const_name(&stem));
        }
        text += "\n";
    }
    text += "];\n";
    text
}

/// bindgen on abi.h: only the Qilin names, in an order and form that depend on the header
/// alone, so the output can be compared byte for byte with the committed fallback.
fn generate_bindings(header: &Path) -> Result<String, String> {
    // bindgen panics when libclang cannot be loaded; loading it here first turns that
    // into a fallback. bindgen then reuses this thread's loaded library.
    clang_sys::load().map_err(|e| format!("libclang not loaded: {e}"))?;
    let bindings = bindgen::Builder::default()
        .header(header.to_string_lossy())
        .allowlist_type("Qilin.*")
        .allowlist_var("QILIN_.*")
        .use_core()
        .derive_default(true)
        .derive_partialeq(true)
        .generate_comments(true)
        // Fixed-width fields only (see abi.h), so the size/offset checks hold on every
        // 64-bit and 32-bit target: they compare bindgen's view with rustc's.
        .layout_tests(true)
        .raw_line("// @generated by build.rs (bindgen) from kernels/abi.h; do not edit.")
        .raw_line("// Committed copy of the bindings for builds without libclang;")
        .raw_line("// tests/abi_bindings.rs fails when it differs from the generated text.")
        .generate()
        .map_err(|e| format!("bindgen failed on {}: {e}", header.display()))?;
    Ok(bindings.to_string())
}

/// Rewriting an unchanged file would make cargo rebuild everything that includes it.
fn write_if_changed(path: &Path, text: &str) -> Result<(), String> {
    if fs::read_to_string(path).is_ok_and(|old| old == text) {
        return Ok(());
    }
    fs::write(path, text).map_err(|e| format!("cannot write {}: {e}", path.display()))
}
