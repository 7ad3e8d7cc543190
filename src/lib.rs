//! Qilin: a private LLM inference engine. See README.md for the map.

pub mod backend;
pub mod bench;
pub mod commands;
pub mod config;
pub mod engine;
pub mod kv;
pub mod model;
pub mod server;
pub mod tokenizer;
