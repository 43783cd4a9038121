//! The standalone `isoenv` command, for repositories that are not Rust workspaces: it serves the
//! project found from the current directory, as git finds its repository.

use std::process::ExitCode;

fn main() -> ExitCode {
    let here = std::env::current_dir().unwrap_or_else(|_| ".".into());
    isoenv::cli::main("isoenv", isoenv::cli::find_root(&here))
}
