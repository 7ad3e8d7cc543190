//! Backends: the fused ops the transformer needs, on CPU (reference) or CUDA.

pub mod abi;
pub mod cpu;
pub mod ptx;
