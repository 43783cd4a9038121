//! `cargo xtask`: the command line over the `isoenv` library. Parsing and printing only; the
//! logic lives in the library.

mod bench;
mod ci;
mod db;
mod demo;
mod env;
mod hooks;
mod image;
mod test;

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Result;
use clap::{Parser, Subcommand};
use isoenv::{EnvFile, EnvironmentConfig, Vars};

#[derive(Parser)]
#[command(
    name = "cargo xtask",
    about = "isoenv: isolated, real databases for this repository",
    version
)]
struct Cli {
    /// The .env file to read (default: .env at the project root, optional).
    #[arg(long, global = true, value_name = "PATH")]
    env_file: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Show the resolved environment configuration (passwords redacted).
    Env(env::EnvArgs),
    /// What this machine has for each engine and backend, and how to get what is missing.
    Doctor {
        #[arg(long)]
        json: bool,
    },
    /// Create, run and remove isolated database environments.
    #[command(subcommand)]
    Db(db::DbCommand),
    /// Run the test suite; with --isolated, against databases provisioned for this run.
    Test(test::TestArgs),
    /// The opt-in git pre-commit hook.
    #[command(subcommand)]
    Hooks(hooks::HooksCommand),
    /// isoenv's local Docker images, built from this machine's installed engines.
    #[command(subcommand)]
    Image(image::ImageCommand),
    /// The full pipeline CI runs: fmt, clippy, env check, all tests (isolated).
    Ci,
    /// Measure create/start/handout/throughput figures on this machine (medians, p95, ratios).
    Bench(bench::BenchArgs),
    /// A guided tour of the backends: create, activate, query, inspect, isolation, destroy.
    Demo(demo::DemoArgs),
}

fn main() -> ExitCode {
    // The sandbox supervisor is this executable re-run by the library; it must start
    // single-threaded and bypass everything else.
    let mut args = std::env::args();
    if args.nth(1).as_deref() == Some(isoenv::sandbox::SUPERVISOR_COMMAND) {
        let request = args.next().unwrap_or_default();
        return ExitCode::from(isoenv::sandbox::supervise(&request).clamp(0, 255) as u8);
    }
    let cli = Cli::parse();
    match run(cli) {
        Ok(code) => code,
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<ExitCode> {
    let ctx = Context {
        env_file: match cli.env_file {
            Some(path) => EnvFile::Explicit(path),
            None => EnvFile::Default(project_root().join(".env")),
        },
    };
    match cli.command {
        Command::Env(args) => env::run(&ctx, args),
        Command::Doctor { json } => env::doctor(&ctx, json),
        Command::Db(cmd) => db::run(&ctx, cmd),
        Command::Test(args) => test::run(&ctx, args),
        Command::Hooks(cmd) => hooks::run(&ctx, cmd),
        Command::Image(cmd) => image::run(&ctx, cmd),
        Command::Ci => ci::run(&ctx),
        Command::Bench(args) => bench::run(&ctx, args),
        Command::Demo(args) => demo::run(&ctx, args),
    }
}

/// What every command needs: where the configuration comes from.
pub struct Context {
    pub env_file: EnvFile,
}

impl Context {
    pub fn vars(&self) -> Result<Vars> {
        let process = std::env::vars_os()
            .filter_map(|(k, v)| Some((k.into_string().ok()?, v.into_string().ok()?)));
        Ok(Vars::load(&self.env_file, process)?)
    }

    pub fn config(&self, vars: &Vars) -> Result<EnvironmentConfig> {
        let config = EnvironmentConfig::from_vars(vars, &project_root()).map_err(|e| {
            anyhow::anyhow!(
                "{e}\n  (configuration read from {} and the process environment)",
                self.env_file.path().display()
            )
        })?;
        Ok(config)
    }
}

pub fn project_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace")
        .to_owned()
}
