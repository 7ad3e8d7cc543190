//! `qilin serve`: load the model, start the engine thread, serve HTTP until SIGTERM.

pub fn run(args: &crate::config::ServeArgs) -> anyhow::Result<()> {
    super::set_threads(args.engine.threads)?;
    crate::server::run(args)
}
