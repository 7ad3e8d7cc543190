//! The paged KV cache's bookkeeping (the storage itself belongs to the backend).

pub mod block_manager;
pub mod prefix_cache;

pub use block_manager::{Allocation, BlockManager};
