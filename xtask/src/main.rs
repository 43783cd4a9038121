//! `cargo xtask`: isoenv's command line (from the library) plus this repository's own
//! pipeline and benchmarks.

mod bench;
mod ci;

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "cargo xtask",
    bin_name = "cargo xtask",
    about = "isoenv: isolated, real databases for this repository",
    version
)]
struct Cli {
    #[command(flatten)]
    global: isoenv::cli::Global,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    #[command(flatten)]
    Isoenv(isoenv::cli::Command),
    /// The full pipeline CI runs: what the suite needs installed, then fmt, clippy, env check,
    /// all tests (isolated).
    Ci(ci::CiArgs),
    /// Measure create/start/handout/throughput figures on this machine (medians, p95, ratios).
    Bench(bench::BenchArgs),
}

fn main() -> ExitCode {
    if let Some(code) = isoenv::cli::sandbox_supervisor() {
        return code;
    }
    let cli = Cli::parse();
    let ctx = cli.global.context(project_root());
    isoenv::cli::exit(match cli.command {
        Command::Isoenv(command) => command.run(&ctx),
        Command::Ci(args) => ci::run(&ctx, args),
        Command::Bench(args) => bench::run(&ctx, args),
    })
}

pub fn project_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace")
        .to_owned()
}
