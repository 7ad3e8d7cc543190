//! `qilin bench`: end-to-end measurements of the engine, and of the CUDA backend's
//! kernels and model on a GPU.

pub mod gpu_model;
mod kernel_timer;
pub mod kernels;
pub mod model_steps;
pub mod perplexity;
pub mod serve;
pub mod throughput;
