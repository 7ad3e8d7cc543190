//! `qilin bench`: end-to-end measurements of the engine.

pub mod serve;
pub mod throughput;
