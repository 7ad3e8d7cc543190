//! The engine: sequences, sampling, and the generation loop.

pub mod sampler;
pub mod sampling_params;
pub mod stop;
