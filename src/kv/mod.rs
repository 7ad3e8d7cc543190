//! The paged KV cache's bookkeeping (the storage itself belongs to the backend).

pub mod block_pool;

pub use block_pool::BlockPool;
