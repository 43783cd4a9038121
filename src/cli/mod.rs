//! The command line, so that any repository's xtask (or the standalone `isoenv` binary) is a few
//! lines: parsing and printing only; the logic lives in the library.
//!
//! ```no_run
//! // xtask/src/main.rs of a repository that adopts isoenv
//! fn main() -> std::process::ExitCode {
//!     let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
//!     isoenv::cli::main("cargo xtask", root.to_owned())
//! }
//! ```

mod db;
mod demo;
mod env;
mod hooks;
mod image;
pub mod test;

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::OnceLock;

use anyhow::Result;
use clap::{Args, CommandFactory, FromArgMatches, Parser, Subcommand};

use crate::{EnvFile, EnvironmentConfig, Vars};

/// isoenv's own command line: the global flags and isoenv's commands.
#[derive(Parser)]
#[command(
    about = "isoenv: isolated, real databases for this repository",
    version
)]
pub struct Cli {
    #[command(flatten)]
    pub global: Global,
    #[command(subcommand)]
    pub command: Command,
}

/// The flags every command takes.
#[derive(Args)]
pub struct Global {
    /// The .env file to read (default: .env at the project root, optional).
    #[arg(long, global = true, value_name = "PATH")]
    pub env_file: Option<PathBuf>,
}

impl Global {
    /// What the commands need, for the project at `root`.
    pub fn context(self, root: PathBuf) -> Context {
        Context {
            env_file: match self.env_file {
                Some(path) => EnvFile::Explicit(path),
                None => EnvFile::Default(root.join(".env")),
            },
            root,
        }
    }
}

/// isoenv's commands; a repository's own xtask can `#[command(flatten)]` them beside its own.
#[derive(Subcommand)]
pub enum Command {
    /// Show the resolved environment configuration (passwords redacted).
    Env(env::EnvArgs),
    /// What this machine has for each engine and backend, and how to get what is missing.
    Doctor {
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Create, run and remove isolated database environments.
    #[command(subcommand)]
    Db(db::DbCommand),
    /// Run the test suite; with --isolated, against databases provisioned for this run.
    Test(test::TestArgs),
    /// Run any command (pytest, npm test, a script); with --isolated, against databases
    /// provisioned for this run, always torn down, its exit code passed through.
    Run(test::RunArgs),
    /// The opt-in git pre-commit hook.
    #[command(subcommand)]
    Hooks(hooks::HooksCommand),
    /// isoenv's local Docker images, built from this machine's installed engines.
    #[command(subcommand)]
    Image(image::ImageCommand),
    /// A guided tour of the backends: create, activate, query, inspect, isolation, destroy.
    Demo(demo::DemoArgs),
}

impl Command {
    pub fn run(self, ctx: &Context) -> Result<ExitCode> {
        match self {
            Command::Env(args) => env::run(ctx, args),
            Command::Doctor { json } => env::doctor(ctx, json),
            Command::Db(cmd) => db::run(ctx, cmd),
            Command::Test(args) => test::test(ctx, args),
            Command::Run(args) => test::run(ctx, args),
            Command::Hooks(cmd) => hooks::run(ctx, cmd),
            Command::Image(cmd) => image::run(ctx, cmd),
            Command::Demo(args) => demo::run(ctx, args),
        }
    }
}

/// How users call this program, when it is not `cargo xtask` (set by [`main`]).
static INVOKED_AS: OnceLock<&'static str> = OnceLock::new();

/// How users call this program: `cargo xtask`, or the name given to [`main`].
pub fn invoked_as() -> &'static str {
    INVOKED_AS.get().copied().unwrap_or("cargo xtask")
}

/// A message for people, naming this program as they call it: the library's messages say
/// `cargo xtask ...`, its usual front end.
pub fn say(text: &str) -> String {
    as_called(text, invoked_as())
}

fn as_called(text: &str, program: &str) -> String {
    text.replace("cargo xtask ", &format!("{program} "))
}

/// The whole program: `name` is how users call it (`cargo xtask`, `isoenv`), `root` the
/// project it serves (its `.env`, where tests run).
pub fn main(name: &'static str, root: PathBuf) -> ExitCode {
    if let Some(code) = sandbox_supervisor() {
        return code;
    }
    let _ = INVOKED_AS.set(name);
    let matches = Cli::command().name(name).bin_name(name).get_matches();
    let cli = match Cli::from_arg_matches(&matches) {
        Ok(cli) => cli,
        Err(e) => e.exit(),
    };
    exit(cli.command.run(&cli.global.context(root)))
}

/// The sandbox supervisor is this executable re-run by the library: it must start
/// single-threaded and bypass everything else. Call it first in `main`.
pub fn sandbox_supervisor() -> Option<ExitCode> {
    let mut args = std::env::args();
    if args.nth(1).as_deref() != Some(crate::backend::sandbox::supervisor::SUPERVISOR_COMMAND) {
        return None;
    }
    let request = args.next().unwrap_or_default();
    Some(ExitCode::from(
        crate::backend::sandbox::supervisor::supervise(&request).clamp(0, 255) as u8,
    ))
}

/// A command's result as the process's exit code; an error is printed with its causes.
pub fn exit(result: Result<ExitCode>) -> ExitCode {
    result.unwrap_or_else(|err| {
        eprintln!("error: {}", say(&format!("{err:#}")));
        ExitCode::FAILURE
    })
}

/// The project a command in `dir` serves, found as git finds a repository: the nearest
/// directory, `dir` or above, that holds `.isoenv/`, `.env` or `.git`; else `dir` itself.
pub fn find_root(dir: &Path) -> PathBuf {
    dir.ancestors()
        .find(|d| {
            [".isoenv", ".env", ".git"]
                .iter()
                .any(|m| d.join(m).exists())
        })
        .unwrap_or(dir)
        .to_owned()
}

/// What every command needs: where the configuration comes from and the project's root.
/// Whether missing software is installed without asking: `ISOENV_AUTO_INSTALL=1` or `CI=true`.
pub fn installs_unasked(vars: &Vars) -> bool {
    vars.get("ISOENV_AUTO_INSTALL") == Some("1") || vars.get("CI") == Some("true")
}

/// Asks a yes/no question on the terminal (Enter means yes); no terminal means no.
pub fn confirm(question: &str) -> bool {
    use std::io::IsTerminal;
    if !std::io::stdin().is_terminal() {
        return false;
    }
    eprint!("isoenv: {question} [Y/n] ");
    let mut answer = String::new();
    std::io::stdin().read_line(&mut answer).is_ok()
        && matches!(
            answer.trim().to_ascii_lowercase().as_str(),
            "" | "y" | "yes"
        )
}

pub struct Context {
    pub env_file: EnvFile,
    pub root: PathBuf,
}

impl Context {
    pub fn vars(&self) -> Result<Vars> {
        let process = std::env::vars_os()
            .filter_map(|(k, v)| Some((k.into_string().ok()?, v.into_string().ok()?)));
        let vars = Vars::load(&self.env_file, process)?;
        Ok(crate::config::with_default_environment(vars, &self.root))
    }

    pub fn config(&self, vars: &Vars) -> Result<EnvironmentConfig> {
        let config = EnvironmentConfig::from_vars(vars, &self.root).map_err(|e| {
            anyhow::anyhow!(
                "{e}\n  (configuration read from {} and the process environment)",
                self.env_file.path().display()
            )
        })?;
        Ok(config)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every command and argument says what it is (`--help` is the documentation scripts read).
    #[test]
    fn every_argument_has_help() {
        fn undocumented(cmd: &clap::Command, path: &str, out: &mut Vec<String>) {
            let path = format!("{path} {}", cmd.get_name());
            if cmd.get_about().is_none() {
                out.push(path.clone());
            }
            for arg in cmd.get_arguments() {
                let builtin = ["help", "version"].contains(&arg.get_id().as_str());
                if !builtin && arg.get_help().is_none() {
                    out.push(format!("{path} {}", arg.get_id()));
                }
            }
            for sub in cmd.get_subcommands() {
                undocumented(sub, &path, out);
            }
        }
        let mut missing = Vec::new();
        undocumented(&Cli::command(), "", &mut missing);
        assert!(missing.is_empty(), "without help: {missing:#?}");
    }

    #[test]
    fn messages_name_the_program_as_it_was_called() {
        let text = "does not exist; `cargo xtask db up` creates it";
        assert_eq!(as_called(text, "cargo xtask"), text);
        assert_eq!(
            as_called(text, "isoenv"),
            "does not exist; `isoenv db up` creates it"
        );
    }

    #[test]
    fn the_root_is_the_nearest_marked_directory() {
        let top = tempfile::tempdir().unwrap();
        let deep = top.path().join("app/src/module");
        std::fs::create_dir_all(&deep).unwrap();
        assert_eq!(
            find_root(&deep),
            deep,
            "nothing marked: the directory itself"
        );
        std::fs::create_dir(top.path().join(".git")).unwrap();
        assert_eq!(find_root(&deep), top.path());
        std::fs::write(top.path().join("app/.env"), "").unwrap();
        assert_eq!(find_root(&deep), top.path().join("app"));
    }
}
