//! `ci`: the whole pipeline, as `.ci/run` and the README run it: fmt, clippy, `env check` on
//! `.env.example`, then the whole test suite through `test --isolated` on every engine.

use std::process::ExitCode;

use anyhow::Result;
use xshell::{cmd, Shell};

pub fn run(ctx: &crate::Context) -> Result<ExitCode> {
    let sh = Shell::new()?;
    sh.change_dir(crate::project_root());
    cmd!(sh, "cargo fmt --all -- --check").run()?;
    cmd!(
        sh,
        "cargo clippy --workspace --all-targets --quiet -- -D warnings"
    )
    .run()?;
    cmd!(sh, "cargo xtask env check --env-file .env.example").run()?;
    crate::test::run(ctx, crate::test::TestArgs::ci())
}
