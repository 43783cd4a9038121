//! `ci`: the whole pipeline, as `.ci/run` and the README run it: fmt, clippy, `env check` on
//! `.env.example`, then the whole test suite through `test --isolated` on every engine.

use std::process::ExitCode;

use anyhow::Result;
use xshell::{cmd, Shell};

pub fn run(ctx: &isoenv::cli::Context) -> Result<ExitCode> {
    let sh = Shell::new()?;
    sh.change_dir(crate::project_root());
    cmd!(sh, "cargo fmt --all -- --check").run()?;
    cmd!(
        sh,
        "cargo clippy --workspace --all-targets --quiet -- -D warnings"
    )
    .run()?;
    cmd!(sh, "cargo xtask env check --env-file .env.example").run()?;
    isoenv::cli::test::test(ctx, isoenv::cli::test::TestArgs::ci())
}
