//! Structs and constants shared with the CUDA kernels (kernels/abi.h through bindgen).
