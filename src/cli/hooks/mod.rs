//! `hooks install|uninstall|status|run pre-commit`: an opt-in pre-commit hook that never
//! touches a hook it did not write.

mod state;

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context as _, Result};
use clap::Subcommand;
use state::HookState;
use xshell::{cmd, Shell};

use super::Context;

#[derive(Subcommand)]
pub enum HooksCommand {
    /// Install the pre-commit hook (never over someone else's).
    Install,
    /// Remove the pre-commit hook if it is isoenv's.
    Uninstall,
    /// Whether the hook is installed.
    Status {
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Run a hook's checks now (what the installed hook does).
    Run {
        /// The hook: pre-commit.
        #[arg(value_parser = ["pre-commit"])]
        hook: String,
    },
}

pub fn run(ctx: &Context, cmd: HooksCommand) -> Result<ExitCode> {
    let sh = Shell::new()?;
    match cmd {
        HooksCommand::Install => {
            let path = hook_path(&sh)?;
            match state(&path)? {
                HookState::Foreign => bail!(
                    "{} exists and is not isoenv's; it was left alone. To run isoenv's checks from it, add the line `{} hooks run pre-commit`",
                    path.display(),
                    super::invoked_as()
                ),
                HookState::Ours | HookState::Absent => {
                    if let Some(dir) = path.parent() {
                        fs::create_dir_all(dir)?;
                    }
                    fs::write(&path, state::stub(super::invoked_as()))
                        .with_context(|| format!("cannot write {}", path.display()))?;
                    fs::set_permissions(&path, fs::Permissions::from_mode(0o755))?;
                    println!("installed {} (skip once with `git commit --no-verify` or {}=1)", path.display(), state::SKIP_VAR);
                }
            }
        }
        HooksCommand::Uninstall => {
            let path = hook_path(&sh)?;
            match state(&path)? {
                HookState::Ours => {
                    fs::remove_file(&path)?;
                    println!("removed {}", path.display());
                }
                HookState::Foreign => println!("{} is not isoenv's; left alone", path.display()),
                HookState::Absent => println!("no pre-commit hook installed"),
            }
        }
        HooksCommand::Status { json } => {
            let path = hook_path(&sh)?;
            let (key, what) = match state(&path)? {
                HookState::Ours => ("isoenv", "installed (isoenv)"),
                HookState::Foreign => ("foreign", "another tool's hook (not isoenv's)"),
                HookState::Absent => ("absent", "not installed"),
            };
            if json {
                let said = serde_json::json!({ "hook": "pre-commit", "path": path, "state": key });
                println!("{}", serde_json::to_string_pretty(&said)?);
            } else {
                println!("pre-commit: {what} ({})", path.display());
            }
        }
        HooksCommand::Run { .. } => return pre_commit(ctx, &sh),
    }
    Ok(ExitCode::SUCCESS)
}

fn hook_path(sh: &Shell) -> Result<PathBuf> {
    // Honours core.hooksPath and worktrees.
    let path = cmd!(
        sh,
        "git rev-parse --path-format=absolute --git-path hooks/pre-commit"
    )
    .quiet()
    .read()
    .context("not in a git repository")?;
    Ok(PathBuf::from(path))
}

fn state(path: &PathBuf) -> Result<HookState> {
    match fs::read_to_string(path) {
        Ok(text) => Ok(state::classify(Some(&text))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(state::classify(None)),
        Err(e) => Err(e).with_context(|| format!("cannot read {}", path.display())),
    }
}

/// The fast checks: no `.env` and no configured password staged, `env check`, then fmt and
/// clippy when Rust files are staged.
fn pre_commit(ctx: &Context, sh: &Shell) -> Result<ExitCode> {
    let staged = cmd!(sh, "git diff --cached --name-only --diff-filter=ACMR -z")
        .quiet()
        .read()?;
    let staged: Vec<&str> = staged.split('\0').filter(|p| !p.is_empty()).collect();
    let mut problems = Vec::new();
    for path in staged.iter().filter(|p| state::is_env_file(p)) {
        problems.push(format!("{path}: a .env file holds real settings and secrets; unstage it (git restore --staged {path}) and keep it in .gitignore"));
    }
    let vars = ctx.vars()?;
    let secrets: Vec<(String, String)> = [
        "DB_VM_PASSWORD",
        "DB_STAGING_PASSWORD",
        "DB_PROD_PASSWORD",
        "DB_PASSWORD",
    ]
    .into_iter()
    .filter_map(|k| Some((k.to_owned(), vars.get(k)?.to_owned())))
    .collect();
    // Only read the staged contents when there is a password to look for.
    for path in staged.iter().filter(|_| !secrets.is_empty()) {
        let spec = format!(":{path}");
        let Ok(content) = cmd!(sh, "git show {spec}").quiet().ignore_stderr().read() else {
            continue; // binary or unreadable as text: nothing to match
        };
        for var in state::leaked(&content, &secrets) {
            problems.push(format!("{path}: contains the value of {var}; remove it (and rotate the password if it was ever committed)"));
        }
    }
    if !problems.is_empty() {
        for p in &problems {
            eprintln!("pre-commit: {p}");
        }
        eprintln!(
            "pre-commit: refused ({} problem(s)); `git commit --no-verify` skips the hook",
            problems.len()
        );
        return Ok(ExitCode::FAILURE);
    }
    if super::env::check(ctx)? != ExitCode::SUCCESS {
        return Ok(ExitCode::FAILURE);
    }
    let rust: Vec<&str> = staged
        .iter()
        .copied()
        .filter(|p| p.ends_with(".rs"))
        .collect();
    if !rust.is_empty() {
        cmd!(sh, "cargo fmt --all -- --check").run()?;
        // Clippy for the packages the staged files belong to.
        let mut packages = vec![];
        if rust.iter().any(|p| p.starts_with("xtask/")) {
            packages.extend(["-p", "xtask"]);
        }
        if rust.iter().any(|p| !p.starts_with("xtask/")) {
            packages.extend(["-p", "isoenv"]);
        }
        cmd!(
            sh,
            "cargo clippy {packages...} --all-targets --quiet -- -D warnings"
        )
        .run()?;
    }
    eprintln!("pre-commit: ok");
    Ok(ExitCode::SUCCESS)
}
