//! `relq-bench`: the benchmarks behind every figure in the docs, and the workload of the kill -9
//! test. A binary of its own so the shipped `relq` links none of it; `relq bench ...` runs this
//! binary when it is installed beside `relq` (or on the PATH).
//!
//! Exit codes: 0 success, 1 the benchmark failed, 2 bad usage (clap's), 130 interrupted.

mod bench;
mod bench_compression;
mod bench_memory;
mod bench_ordering;
mod bench_rate;
mod bench_redis;
mod crash;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "relq-bench",
    version,
    about = "relq's benchmarks: every figure in the docs comes from here"
)]
struct Cli {
    /// Print machine-readable JSON.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    #[command(flatten)]
    Bench(bench::BenchCommand),
    /// The workload of the kill -9 crash test (see crates/relq-bench/tests/crash.rs).
    #[command(hide = true)]
    CrashChild(crash::CrashArgs),
}

const INTERRUPTED: u8 = 130;

#[tokio::main]
async fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("RELQ_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::CrashChild(args) => crash::run(args).await,
        // A benchmark has nothing to drain: on a signal it stops where it is (its temporary
        // directories are removed as its futures are dropped).
        Command::Bench(command) => tokio::select! {
            r = bench::run(command, cli.json) => r,
            name = signal() => {
                eprintln!("{name}: benchmark interrupted");
                return ExitCode::from(INTERRUPTED);
            }
        },
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// The first SIGINT or SIGTERM, by name (never resolves where they cannot be handled).
async fn signal() -> &'static str {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        if let (Ok(mut int), Ok(mut term)) = (
            signal(SignalKind::interrupt()),
            signal(SignalKind::terminate()),
        ) {
            return tokio::select! {
                _ = int.recv() => "SIGINT",
                _ = term.recv() => "SIGTERM",
            };
        }
    }
    std::future::pending().await
}
