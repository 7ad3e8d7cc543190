//! Programmatic dependent launch (PDL): on Hopper and later a kernel launched with it may
//! start while the kernel before it is still running. Its blocks are placed, and a GEMV's
//! first weights requested, during the previous kernel's tail, instead of after it. A
//! decode step is a chain of ~300 short kernels (at batch 1 most last 3-15 us), so the
//! gap between two of them (the last block's exit, the next launch, its first DRAM round
//! trip: ~1-3 us) is a large part of the step.
//!
//! The kernels carry PTX comment markers (kernels/pdl.cuh), because the embedded PTX is
//! compute_80 and the instructions need sm_90. This module checks every entry's markers
//! ([`check_entries`]: the wait dominates every global access) and, for an sm_90+ device
//! with `QILIN_CUDA_PDL=1`, retargets a module to sm_90 with the markers turned into
//! instructions ([`rewrite_for_sm90`]). The launcher then sets the launch attribute only
//! for entries that passed the check (`Device::launch`).

use std::collections::BTreeMap;

use thiserror::Error;

/// griddepcontrol.wait: returns once the previous kernel has finished and its writes are
/// visible (at once for a launch without PDL).
pub const WAIT_MARKER: &str = "// qilin:pdl-wait";
/// griddepcontrol.launch_dependents: the next kernel's blocks may be placed once every
/// block of this one has passed it.
pub const LAUNCH_DEPENDENTS_MARKER: &str = "// qilin:pdl-launch-dependents";
/// A bulk L2 prefetch of weights, operands `address, bytes, issue`.
pub const PREFETCH_MARKER: &str = "// qilin:pdl-prefetch-l2";

/// What is wrong with a module's PTX for PDL.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum PdlError {
    #[error("the PTX targets `{0}`, not sm_80: the markers of kernels/pdl.cuh expect build.rs's compute_80 PTX")]
    Target(String),
    #[error("the PTX declares ISA {0}; griddepcontrol needs 7.8 or later")]
    Version(String),
    #[error("line {line}: a malformed PDL prefetch marker `{text}`")]
    Prefetch { line: usize, text: String },
}

/// Opcodes that must not come before an entry's wait: they touch memory another kernel
/// may write or read (loads other than ld.param, stores, atomics, async copies,
/// prefetches, texture and surface access, barriers and fences) or leave the straight
/// line from the entry to the wait (branches, calls, returns, traps).
const BEFORE_WAIT_FORBIDDEN: &[&str] = &[
    "ld.", "ldu.", "ldmatrix", "st.", "stmatrix", "atom.", "red.", "cp.", "prefetch", "tex.",
    "tld4", "suld", "sust", "sured", "bar.", "barrier", "membar", "fence", "bra", "brx", "call",
    "ret", "exit", "trap", "mbarrier",
];

/// For every `.entry` of `ptx`, whether its PDL markers keep the contract of
/// kernels/pdl.cuh: a wait, and a launch_dependents after it, with nothing before the wait
/// that touches global memory or branches (no label either), so that the wait dominates
/// every access. `Err` says what breaks it, with the line.
pub fn check_entries(ptx: &str) -> BTreeMap<String, Result<(), String>> {
    let mut checks = BTreeMap::new();
    let mut lines = ptx.lines().enumerate();
    while let Some((_, line)) = lines.next() {
        let Some(name) = entry_name(line) else { continue };
        // The body ends at the first unindented `}` (nested scopes are indented).
        let body = lines.by_ref().take_while(|(_, l)| *l != "}");
        checks.insert(name.to_string(), check_body(body));
    }
    checks
}

/// The verdict of [`check_entries`] on one entry's lines (numbered from 0).
fn check_body<'a>(body: impl Iterator<Item = (usize, &'a str)>) -> Result<(), String> {
    let mut waited = false;
    for (number, line) in body {
        let text = line.trim();
        if !waited {
            if text.starts_with(WAIT_MARKER) {
                waited = true;
            } else if let Some(why) = forbidden_before_wait(text) {
                return Err(format!("line {}: {why} before the PDL wait", number + 1));
            }
        } else if text.starts_with(LAUNCH_DEPENDENTS_MARKER) {
            return Ok(());
        }
    }
    Err(if waited {
        "no launch_dependents marker after the wait".to_string()
    } else {
        "no PDL wait marker (QILIN_PDL_ENTRY() missing)".to_string()
    })
}

/// The name of the entry a `.entry` line declares.
fn entry_name(line: &str) -> Option<&str> {
    let rest = line.trim_start().strip_prefix(".visible ").unwrap_or(line.trim_start());
    let rest = rest.strip_prefix(".entry ")?;
    Some(rest.split(|c: char| c == '(' || c.is_whitespace()).next().unwrap_or(rest))
}

/// Why `text` (one line of an entry body, trimmed) may not come before the wait.
fn forbidden_before_wait(text: &str) -> Option<String> {
    if text.is_empty() || text.starts_with("//") || text.starts_with('.') || text == "{" {
        return None;
    }
    if text.ends_with(':') {
        return Some(format!("label `{text}`"));
    }
    // A guard predicate does not change what the instruction is.
    let instruction = match text.strip_prefix('@') {
        Some(rest) => rest.split_once(char::is_whitespace).map_or("", |(_, i)| i.trim_start()),
        None => text,
    };
    let opcode = instruction.split(|c: char| c.is_whitespace() || c == ';').next()?;
    if opcode.starts_with("ld.param") {
        return None;
    }
    BEFORE_WAIT_FORBIDDEN
        .iter()
        .any(|prefix| opcode.starts_with(prefix))
        .then(|| format!("`{opcode}`"))
}

/// `ptx` (build.rs's compute_80 module) retargeted to sm_90, with every PDL marker turned
/// into its instruction. Only for a device of compute capability 9.0 or later.
pub fn rewrite_for_sm90(ptx: &str) -> Result<String, PdlError> {
    let mut out = String::with_capacity(ptx.len() + 4096);
    for (number, line) in ptx.lines().enumerate() {
        let text = line.trim();
        if let Some(target) = text.strip_prefix(".target ") {
            if target.trim() != "sm_80" {
                return Err(PdlError::Target(target.trim().to_string()));
            }
            out += ".target sm_90";
        } else if let Some(version) = text.strip_prefix(".version ") {
            if !isa_has_griddepcontrol(version.trim()) {
                return Err(PdlError::Version(version.trim().to_string()));
            }
            out += line;
        } else if text == WAIT_MARKER {
            out += "\tgriddepcontrol.wait;";
        } else if text == LAUNCH_DEPENDENTS_MARKER {
            out += "\tgriddepcontrol.launch_dependents;";
        } else if let Some(operands) = text.strip_prefix(PREFETCH_MARKER) {
            out += &prefetch_instruction(operands)
                .ok_or_else(|| PdlError::Prefetch { line: number + 1, text: text.to_string() })?;
        } else {
            out += line;
        }
        out.push('\n');
    }
    Ok(out)
}

/// Whether PTX ISA `version` ("major.minor") has griddepcontrol (7.8+).
fn isa_has_griddepcontrol(version: &str) -> bool {
    let mut parts = version.split('.').map(|p| p.parse::<u32>());
    matches!((parts.next(), parts.next()), (Some(Ok(major)), Some(Ok(minor))) if (major, minor) >= (7, 8))
}

/// The instruction block of a prefetch marker's ` address, bytes, issue;` operands: a
/// bulk prefetch of [address, address + bytes) into L2 when issue != 0, in a scope of its
/// own registers (the marker's operands may be immediates).
fn prefetch_instruction(operands: &str) -> Option<String> {
    let operands: Vec<&str> =
        operands.trim().trim_end_matches(';').split(',').map(str::trim).collect();
    let [address, bytes, issue] = operands.as_slice() else { return None };
    let operand_ok = |o: &str| {
        !o.is_empty() && o.chars().all(|c| c.is_ascii_alphanumeric() || "%_$".contains(c))
    };
    if ![address, bytes, issue].iter().all(|o| operand_ok(o)) {
        return None;
    }
    Some(format!(
        "\t{{\n\t.reg .pred %qilin_pf_go;\n\t.reg .b32 %qilin_pf_issue;\n\t.reg .b64 %qilin_pf_addr;\n\
         \tmov.b32 %qilin_pf_issue, {issue};\n\tsetp.ne.b32 %qilin_pf_go, %qilin_pf_issue, 0;\n\
         \tcvta.to.global.u64 %qilin_pf_addr, {address};\n\
         \t@%qilin_pf_go cp.async.bulk.prefetch.L2.global [%qilin_pf_addr], {bytes};\n\t}}"
    ))
}

/// The PTX text to load for `module` and the entries that may be launched dependent:
/// with `pdl`, the module rewritten for sm_90 and its entries that keep the
/// markers' contract; otherwise, or when the rewrite fails (logged), the module as built.
pub fn module_text(module: &str, source: &str, pdl: bool) -> (String, Vec<String>) {
    if !pdl {
        return (source.to_string(), Vec::new());
    }
    match rewrite_for_sm90(source) {
        Ok(text) => {
            let mut dependent = Vec::new();
            for (entry, verdict) in check_entries(source) {
                match verdict {
                    Ok(()) => dependent.push(entry),
                    Err(why) => tracing::warn!("{entry} launches without PDL: {why}"),
                }
            }
            (text, dependent)
        }
        Err(e) => {
            tracing::warn!("{module}.ptx loads without PDL: {e}");
            (source.to_string(), Vec::new())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::ptx;

    const GOOD: &str = "\
.version 9.0
.target sm_80
.address_size 64

.visible .entry k(
\t.param .u64 k_param_0
)
{
\t.reg .b64 \t%rd<4>;
\tld.param.u64 \t%rd1, [k_param_0];
\tadd.s64 \t%rd2, %rd1, 15;
\t// begin inline asm
\t// qilin:pdl-prefetch-l2 %rd2, %r2, %r3;
\t// end inline asm
\t// begin inline asm
\t// qilin:pdl-wait
\t// end inline asm
\t// begin inline asm
\t// qilin:pdl-launch-dependents
\t// end inline asm
\t@%p1 bra \t$L__BB0_2;
\tst.global.u32 \t[%rd3], %r1;
$L__BB0_2:
\tret;
}
";

    #[test]
    fn an_entry_waiting_first_passes_and_is_rewritten() {
        assert_eq!(check_entries(GOOD).get("k"), Some(&Ok(())));
        let sm90 = rewrite_for_sm90(GOOD).unwrap();
        assert!(sm90.contains(".target sm_90\n"));
        assert!(sm90.contains("griddepcontrol.wait;"));
        assert!(sm90.contains("griddepcontrol.launch_dependents;"));
        assert!(sm90.contains("cp.async.bulk.prefetch.L2.global [%qilin_pf_addr], %r2;"));
        assert!(sm90.contains("mov.b32 %qilin_pf_issue, %r3;"));
        assert!(!sm90.contains("qilin:pdl"));
    }

    #[test]
    fn accesses_branches_and_labels_before_the_wait_fail() {
        let wait = "\t// qilin:pdl-wait\n";
        for (early, what) in [
            ("\tld.global.u32 \t%r1, [%rd1];\n", "`ld.global.u32`"),
            ("\t@%p1 st.global.u32 \t[%rd1], %r1;\n", "`st.global.u32`"),
            ("\t@%p1 bra \t$L__BB0_2;\n", "`bra`"),
            ("$L__BB0_1:\n", "label"),
            ("\tatom.global.add.u32 \t%r1, [%rd1], 1;\n", "`atom.global.add.u32`"),
            ("\tcp.async.ca.shared.global [%r1], [%rd1], 16;\n", "`cp.async.ca.shared.global`"),
        ] {
            let ptx = GOOD.replacen(wait, &format!("{early}{wait}"), 1);
            let verdict = check_entries(&ptx)["k"].clone();
            assert!(
                verdict
                    .as_ref()
                    .is_err_and(|e| e.contains(what) && e.contains("before the PDL wait")),
                "{early:?}: {verdict:?}"
            );
        }
    }

    #[test]
    fn missing_markers_fail() {
        // Without its wait, the entry's first branch is what comes before none.
        let no_wait = GOOD.replace("// qilin:pdl-wait", "// nothing");
        assert!(check_entries(&no_wait)["k"].as_ref().is_err_and(|e| e.contains("`bra` before")));
        let unmarked = ".visible .entry j(\n)\n{\n\tmov.u32 \t%r1, %tid.x;\n}\n";
        assert!(check_entries(unmarked)["j"].as_ref().is_err_and(|e| e.contains("no PDL wait")));
        let no_launch = GOOD.replace("// qilin:pdl-launch-dependents", "// nothing");
        assert!(check_entries(&no_launch)["k"]
            .as_ref()
            .is_err_and(|e| e.contains("launch_dependents")));
    }

    #[test]
    fn only_compute_80_ptx_of_a_recent_isa_is_retargeted() {
        assert_eq!(
            rewrite_for_sm90(&GOOD.replace("sm_80", "sm_86")),
            Err(PdlError::Target("sm_86".into()))
        );
        assert_eq!(
            rewrite_for_sm90(&GOOD.replace(".version 9.0", ".version 7.7")),
            Err(PdlError::Version("7.7".into()))
        );
        let bad = GOOD.replace("%rd2, %r2, %r3;", "%rd2, %r2;");
        assert!(matches!(rewrite_for_sm90(&bad), Err(PdlError::Prefetch { .. })));
    }

    /// With the switch off a module loads as built; on, rewritten, with every listed entry
    /// of it launchable dependent; a module the rewrite refuses loads as built, none dependent.
    #[test]
    fn modules_load_rewritten_only_with_pdl() {
        let Some(kernel) =
            ptx::KERNELS.iter().find(|k| !ptx::module_ptx(k.module).unwrap_or("").is_empty())
        else {
            return; // CPU-only build: no PTX (tests/ptx_kernels.rs says so)
        };
        let source = ptx::module_ptx(kernel.module).unwrap_or_default();
        let (text, dependent) = module_text(kernel.module, source, false);
        assert_eq!((text.as_str(), dependent.len()), (source, 0));
        let (text, dependent) = module_text(kernel.module, source, true);
        assert!(text.contains(".target sm_90\n") && text.contains("griddepcontrol.wait;"));
        for k in ptx::KERNELS.iter().filter(|k| k.module == kernel.module) {
            assert!(dependent.iter().any(|e| e == k.entry), "{} not dependent", k.entry);
        }
        let refused = source.replace(".target sm_80", ".target sm_75");
        let (text, dependent) = module_text(kernel.module, &refused, true);
        assert_eq!((text, dependent.len()), (refused, 0));
    }
}
