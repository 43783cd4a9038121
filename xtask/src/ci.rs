//! `ci`: the whole pipeline, as `.ci/run` and the README run it.

use std::process::ExitCode;

use anyhow::Result;
use xshell::{cmd, Shell};

pub fn run() -> Result<ExitCode> {
    let sh = Shell::new()?;
    sh.change_dir(crate::project_root());
    cmd!(sh, "cargo fmt --all -- --check").run()?;
    cmd!(
        sh,
        "cargo clippy --workspace --all-targets --quiet -- -D warnings"
    )
    .run()?;
    cmd!(sh, "cargo xtask env check --env-file .env.example").run()?;
    cmd!(sh, "cargo test --workspace").run()?;
    Ok(ExitCode::SUCCESS)
}
