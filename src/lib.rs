//! Qilin: a private LLM inference engine. See README.md and shared design notes.

pub mod backend;
pub mod engine;
pub mod model;
pub mod tokenizer;
