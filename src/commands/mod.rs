//! What each subcommand does, from parsed flags to output.

pub mod bench;
pub mod generate;
pub mod perplexity;
pub mod quantize;
pub mod serve;

/// Sizes the global worker pool (`--threads`); default: one thread per core.
pub fn set_threads(threads: Option<usize>) -> anyhow::Result<()> {
    if let Some(n) = threads {
        if n == 0 {
            anyhow::bail!("--threads must be at least 1");
        }
        rayon::ThreadPoolBuilder::new()
            .num_threads(n)
            .build_global()
            .map_err(|e| anyhow::anyhow!("setting up the worker threads: {e}"))?;
    }
    Ok(())
}
