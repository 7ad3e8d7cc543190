use clap::Parser;

use qilin::commands;
use qilin::config::{BenchCommand, Cli, Command};

fn main() -> std::process::ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("QILIN_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn,qilin=info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Generate(args) => commands::generate::run(&args),
        Command::Serve(args) => commands::serve::run(&args),
        Command::Quantize(args) => commands::quantize::run(&args),
        Command::Bench(BenchCommand::Throughput(args)) => commands::bench::throughput(&args),
        Command::Bench(BenchCommand::Serve(args)) => commands::bench::serve(&args),
        Command::Bench(BenchCommand::Kernels(args)) => commands::bench::kernels(&args),
        Command::Bench(BenchCommand::Decode(args)) => commands::bench::decode(&args),
        Command::Bench(BenchCommand::Prefill(args)) => commands::bench::prefill(&args),
        Command::Perplexity(args) => commands::perplexity::run(&args),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
