//! The engine: requests in, tokens out. `batch_engine.rs` holds the loop
//! (schedule -> build the batch -> forward -> sample -> emit); `scheduler.rs` decides
//! what runs each step over the paged KV cache (`kv/`); `runner.rs` turns that plan
//! into the batch metadata every backend reads; `output.rs` turns each sequence's
//! logits into tokens, text and a finish reason.

pub mod batch_engine;
pub mod handle;
pub mod load;
pub mod output;
pub mod runner;
pub mod sampler;
pub mod sampling_params;
pub mod scheduler;
pub mod sequence;
pub mod stop;
pub mod workers;

pub use batch_engine::{Engine, EngineEvent, GenerateError};
pub use handle::{EngineHandle, EngineStats, RequestEvent};
pub use output::{FinishReason, GenerationOutput, StepLogprobs, Timings};
pub use sampling_params::SamplingParams;
