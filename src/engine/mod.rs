//! The engine: sampling, stop handling and the generation loop.

pub mod generate;
pub mod load;
pub mod output;
pub mod sampler;
pub mod sampling_params;
pub mod stop;

pub use generate::{FinishReason, GenerateError, GenerationOutput, Generator};
pub use sampling_params::SamplingParams;
