//! `image build`: isoenv's local images, for Docker engines that reach no registry.

use std::process::ExitCode;

use crate::engine::EngineKind;
use crate::workspace::Workspace;
use anyhow::Result;
use clap::Subcommand;

use super::db::parse;
use super::Context;

#[derive(Subcommand)]
pub enum ImageCommand {
    /// Build `isoenv/ENGINE:VERSION-local` from this machine's installed server (binaries,
    /// shared libraries, share files, an initialized data directory; FROM scratch). Skipped
    /// when an image built from the same installation exists, unless --force.
    Build {
        /// Engines to build: postgres, mysql, redis (default: all three).
        #[arg(value_parser = parse::<EngineKind>)]
        engines: Vec<EngineKind>,
        /// Build even when an image from the same installation exists.
        #[arg(long)]
        force: bool,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
}

pub fn run(ctx: &Context, cmd: ImageCommand) -> Result<ExitCode> {
    let vars = ctx.vars()?;
    let config = ctx.config(&vars)?;
    let ws = Workspace::new(&config, vars);
    let ImageCommand::Build {
        engines,
        force,
        json,
    } = cmd;
    let engines = if engines.is_empty() {
        EngineKind::ALL.to_vec()
    } else {
        engines
    };
    let mut built = Vec::new();
    for engine in engines {
        let image = ws.build_image(engine, force, &|m| eprintln!("isoenv: {m}"))?;
        if !json {
            let verb = if image.reused { "up to date" } else { "built" };
            println!("{verb}: {} ({engine} {})", image.reference, image.version);
        }
        built.push(image);
    }
    if json {
        println!("{}", serde_json::to_string_pretty(&built)?);
    }
    Ok(ExitCode::SUCCESS)
}
