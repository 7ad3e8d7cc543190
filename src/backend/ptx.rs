//! PTX of `kernels/*.cu`, compiled by build.rs and embedded in the binary, and the entry
//! points the Rust launchers use. A CPU-only build (no nvcc) has `PTX_AVAILABLE ==
//! false`, an empty `ALL` and empty per-file constants.

include!(concat!(env!("OUT_DIR"), "/ptx.rs"));

/// One `extern "C"` kernel: the `kernels/<module>.cu` file that defines it and its name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Kernel {
    pub module: &'static str,
    pub entry: &'static str,
}

/// Residual add (optional) + RMSNorm, bf16; see kernels/norm.cu.
pub const FUSED_ADD_RMS_NORM_BF16: Kernel =
    Kernel { module: "norm", entry: "qilin_fused_add_rms_norm_bf16" };
/// RMSNorm of a read-only input, bf16; see kernels/norm.cu.
pub const RMS_NORM_BF16: Kernel = Kernel { module: "norm", entry: "qilin_rms_norm_bf16" };

/// Every kernel the Rust side launches; tests/ptx_kernels.rs checks each against the PTX.
pub const KERNELS: &[Kernel] = &[FUSED_ADD_RMS_NORM_BF16, RMS_NORM_BF16];

/// The PTX of one kernels/ file by stem (`"norm"`); `None` in a CPU-only build.
pub fn module_ptx(module: &str) -> Option<&'static str> {
    ALL.iter().find(|(name, _)| *name == module).map(|(_, ptx)| *ptx)
}

/// The names of the `.entry` functions (kernels) a PTX text defines, in file order.
pub fn entry_names(ptx: &str) -> Vec<&str> {
    ptx.lines()
        .filter_map(|line| {
            let mut words = line.split_whitespace();
            words.by_ref().find(|w| *w == ".entry")?;
            let name = words.next()?;
            Some(name.split('(').next().unwrap_or(name))
        })
        .filter(|name| !name.is_empty())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entry_names_reads_visible_and_plain_entries() {
        let ptx = ".version 9.0\n.target sm_80\n.visible .entry first(\n\t.param .u64 a\n)\n\
                   {\n\tret;\n}\n.entry second (\n)\n{\n}\n.func helper(\n)\n";
        assert_eq!(entry_names(ptx), ["first", "second"]);
    }
}
