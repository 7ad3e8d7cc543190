//! The committed `src/backend/abi_bindings.rs` (used by builds without libclang) must be
//! byte-identical to what bindgen generates from `kernels/abi.h` in this build, so the
//! fallback can never drift from the header the kernels are compiled with.
//!
//! When build.rs could not run bindgen (no libclang) there is nothing to compare: the
//! test says so and passes, unless `QILIN_REQUIRE_BINDGEN=1` (CI sets it) makes the
//! missing generator a failure.

const COMMITTED: &str = include_str!("../src/backend/abi_bindings.rs");

#[cfg(qilin_bindgen)]
#[test]
fn committed_fallback_equals_generated_bindings() {
    const GENERATED: &str = include_str!(concat!(env!("OUT_DIR"), "/abi_bindings.rs"));
    if GENERATED == COMMITTED {
        return;
    }
    let first_diff = GENERATED
        .lines()
        .zip(COMMITTED.lines())
        .position(|(generated, committed)| generated != committed)
        .unwrap_or_else(|| GENERATED.lines().count().min(COMMITTED.lines().count()));
    panic!(
        "src/backend/abi_bindings.rs is stale (first difference at line {}): kernels/abi.h \
         changed or bindgen/libclang moved. Refresh it with\n  cp {}/abi_bindings.rs \
         src/backend/abi_bindings.rs\nand commit it together with the header.",
        first_diff + 1,
        env!("OUT_DIR")
    );
}

#[cfg(not(qilin_bindgen))]
#[test]
fn committed_fallback_equals_generated_bindings() {
    assert!(
        std::env::var("QILIN_REQUIRE_BINDGEN").as_deref() != Ok("1"),
        "QILIN_REQUIRE_BINDGEN=1 but build.rs did not run bindgen (no libclang?); \
         see the cargo warning of the build"
    );
    eprintln!("skipped: bindgen did not run in this build (no libclang), nothing to compare");
}

#[test]
fn fallback_is_what_the_crate_uses_without_libclang() {
    // The fallback must at least carry the structs the launchers use; a truncated or
    // empty file would only show up on a machine without libclang.
    assert!(COMMITTED.contains("pub struct QilinRmsNormParams"));
    assert!(COMMITTED.contains("pub const QILIN_BLOCK_SIZE: u32 = 16;"));
}
