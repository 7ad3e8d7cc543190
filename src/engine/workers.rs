//! Runs a thread's engine work as one of the rayon workers.
//!
//! The CPU backend splits each op over the global rayon pool (one worker per core). A
//! thread outside the pool that calls into it blocks while the workers run, and does its
//! own work (the sequential parts of a step: norms, sampling, bookkeeping) while idle
//! workers spin and yield on every core: one thread too many. On the 2-core CI machine,
//! perf put ~15-19% of a decode run's samples in the kernel's scheduler. Running the
//! engine on a pool that counts the calling thread as worker 0 keeps the threads at one
//! per core, the caller taking its share of every parallel op.

/// Runs `f` on the current thread as worker 0 of a pool as large as the global one, so
/// the rayon work `f` starts runs on this thread and the pool's other workers. Falls back
/// to running `f` as is when the pool cannot be built (e.g. this thread is already a
/// worker). Rayon keeps the thread registered with the pool after it is dropped (its
/// documented leak), so later rayon calls from the thread run on it alone: wrap the work a
/// thread does until it ends (the engine thread's loop, a command's run), once.
pub fn as_rayon_worker<R>(f: impl FnOnce() -> R) -> R {
    let threads = rayon::current_num_threads();
    match rayon::ThreadPoolBuilder::new().num_threads(threads).use_current_thread().build() {
        Ok(pool) => {
            let out = f();
            drop(pool);
            out
        }
        Err(e) => {
            tracing::debug!("engine thread as a rayon worker: {e}; using the global pool");
            f()
        }
    }
}
