//! `cargo xtask demo [--yes]`: a guided tour of the backends for a newcomer. Each step says in
//! one sentence what it does, then does it for real. It works in its own state root under
//! `target/` and removes everything, also after Ctrl-C.

use std::io::Write;
use std::os::fd::AsFd;
use std::process::{Command, ExitCode};

use crate::backend::BackendKind;
use crate::engine::EngineKind;
use crate::sys::process::ProcessId;
use crate::workspace::{CreateOptions, Workspace};
use crate::EnvironmentConfig;
use anyhow::{Context as _, Result};
use clap::Args;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};

use super::test::{stop_requested, trap_stop_signals};
use super::Context;

#[derive(Args)]
pub struct DemoArgs {
    /// Run every step without waiting for Enter.
    #[arg(long)]
    yes: bool,
}

pub fn run(ctx: &Context, args: DemoArgs) -> Result<ExitCode> {
    trap_stop_signals()?;
    let root = ctx
        .root
        .join("target")
        .join(format!("isoenv-demo-{}", std::process::id()));
    std::fs::create_dir_all(&root)?;
    crate::sys::files::set_mode(&root, 0o755)?;
    let vars = ctx
        .vars()?
        .with("ENVIRONMENT", "development")
        .with("WASI_SANDBOX_DIR", root.display().to_string());
    let config = EnvironmentConfig::from_vars(&vars, &ctx.root)?;
    let ws = Workspace::new(&config, vars);
    let tour = Tour {
        ws: &ws,
        yes: args.yes,
    };
    let result = tour.all();
    // Whatever happened, nothing of the demo stays.
    for name in ["demo-lightweight", "demo-sandbox"] {
        let _ = ws.destroy(name);
    }
    let _ = std::fs::remove_dir_all(&root);
    match (result, stop_requested()) {
        (_, Some(sig)) => {
            eprintln!("demo interrupted; everything it made is removed");
            Ok(ExitCode::from(128 + sig as u8))
        }
        (Ok(()), None) => {
            say("That was the tour: every environment above is gone again.");
            Ok(ExitCode::SUCCESS)
        }
        (Err(e), None) => Err(e),
    }
}

struct Tour<'a> {
    ws: &'a Workspace,
    yes: bool,
}

fn say(text: &str) {
    println!("\n==> {text}");
}

/// Returned when the user interrupted: the caller cleans up.
#[derive(Debug)]
struct Interrupted;

impl std::fmt::Display for Interrupted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("interrupted")
    }
}

impl std::error::Error for Interrupted {}

impl Tour<'_> {
    /// Waits for Enter (or goes on at once with --yes); Ctrl-C ends the tour.
    fn step(&self, text: &str) -> Result<()> {
        say(text);
        if stop_requested().is_some() {
            return Err(Interrupted.into());
        }
        if self.yes {
            return Ok(());
        }
        print!("    [Enter] ");
        let _ = std::io::stdout().flush();
        let stdin = std::io::stdin();
        loop {
            if stop_requested().is_some() {
                return Err(Interrupted.into());
            }
            let mut fds = [PollFd::new(stdin.as_fd(), PollFlags::POLLIN)];
            if poll(&mut fds, PollTimeout::from(100u8)).unwrap_or(0) > 0 {
                let mut line = String::new();
                std::io::stdin().read_line(&mut line)?;
                return Ok(());
            }
        }
    }

    fn shell(&self, what: &str, script: &str) -> Result<()> {
        println!("    $ {what}");
        let out = Command::new("bash").args(["-c", script]).output()?;
        let text = String::from_utf8_lossy(&out.stdout);
        for line in text
            .lines()
            .chain(String::from_utf8_lossy(&out.stderr).lines())
        {
            println!("    {line}");
        }
        if !out.status.success() {
            anyhow::bail!("`{what}` failed");
        }
        Ok(())
    }

    fn all(&self) -> Result<()> {
        say("isoenv gives this repository real, isolated databases. Three backends, one workflow: create, activate, query, inspect, destroy.");
        self.backend(BackendKind::Lightweight)?;
        if !nix::unistd::geteuid().is_root() {
            say("Not root: the sandbox runs in a user namespace, and its cgroup limits may not be enforced (inspect says which).");
        }
        self.backend(BackendKind::Sandbox)?;
        self.step("Backend `docker` needs an image. Where no registry is reachable, isoenv builds one from this machine's PostgreSQL: its binaries, their libraries and a ready data directory, FROM scratch.")?;
        match self
            .ws
            .build_image(EngineKind::Postgres, false, &|m| println!("    {m}"))
        {
            Ok(image) => {
                let verb = if image.reused { "reused" } else { "built" };
                println!("    {verb} {}", image.reference);
                self.backend(BackendKind::Docker)?;
            }
            Err(crate::Error::Docker(e)) => {
                say(&format!("The docker backend needs a Docker engine: {e}"))
            }
            Err(e) => return Err(e.into()),
        }
        Ok(())
    }

    fn backend(&self, backend: BackendKind) -> Result<()> {
        let name = format!("demo-{backend}");
        match backend {
            BackendKind::Sandbox => self.step("Backend `sandbox`: the same PostgreSQL, now inside Linux namespaces, confined by a JSON capability manifest that the kernel enforces.")?,
            BackendKind::Docker => self.step("Backend `docker`: the same PostgreSQL in a container made through the Docker API, its data in a named volume, its port published on 127.0.0.1 only.")?,
            _ => self.step("Backend `lightweight`: a directory, variables, and the real PostgreSQL server as a local process. No root, no Docker.")?,
        }
        self.step(&format!("Create `{name}`: initialize (or copy a cached) data directory, start the server, wait until it answers a real query."))?;
        let owner = ProcessId::of(std::process::id() as i32)?;
        let info = self.ws.create(
            &CreateOptions {
                // Owned by the demo: if it is killed outright, its servers die with it.
                owner: Some(owner),
                ..CreateOptions::server(&name, EngineKind::Postgres, backend)
            },
            &|m| println!("    {m}"),
        )?;
        println!(
            "    {} {} on {}:{} ({})",
            info.engine, info.version, info.host, info.port, info.backend
        );
        self.step("Activate it like a Python venv: `source bin/activate` exports DATABASE_URL, PG* and DB_*, and a real client just works.")?;
        let activate = info.activate.display().to_string();
        self.shell(
            &format!("source {activate} && psql -c 'SELECT current_user, version()'"),
            &format!(
                "source {activate} && psql -Atc 'SELECT current_user, version()' && deactivate"
            ),
        )?;
        if backend == BackendKind::Docker {
            self.step("The same manifest schema as the sandbox sets the container's limits; Docker reports what it applied.")?;
            let info = self.ws.inspect(&name)?;
            let iso = info.isolation.context("a container has a manifest")?;
            for l in &iso.limits {
                println!(
                    "    limit {} {} ({}, enforced: {})",
                    l.limit, l.value, l.via, l.enforced
                );
            }
            if let Some(c) = info.container {
                println!(
                    "    container {} (image {}), volume {}",
                    c.name, c.image, c.volume
                );
            }
        }
        if backend == BackendKind::Sandbox {
            self.step("Inspect the manifest: these paths, this one port, these limits, and nothing else exist for the server.")?;
            let iso = self
                .ws
                .inspect(&name)?
                .isolation
                .context("a sandbox has a manifest")?;
            if let Ok(m) = &iso.manifest {
                for bind in &m.fs {
                    println!("    fs {:?} {}", bind.mode, bind.host.display());
                }
                println!("    network: {} (inside: only lo)", m.network.expose);
            }
            for l in &iso.limits {
                println!(
                    "    limit {} {} ({}, enforced: {})",
                    l.limit, l.value, l.via, l.enforced
                );
            }
            self.step("Show the isolation from the server's own point of view.")?;
            let init = iso.init_pid.context("a running sandbox has an init")?;
            let server = std::fs::read_to_string(format!("/proc/{init}/task/{init}/children"))?
                .split_whitespace()
                .next()
                .context("the sandbox runs its server")?
                .to_owned();
            self.shell(
                "what the server sees",
                &format!(
                    "r=/proc/{server}/root; echo \"uid: $(awk '/^Uid/{{print $2}}' /proc/{server}/status), capabilities: $(awk '/^CapEff/{{print $2}}' /proc/{server}/status)\"; \
                     echo \"/etc inside: $(ls $r/etc | tr '\\n' ' ')\"; \
                     test -e $r/etc/shadow && echo '/etc/shadow: visible' || echo '/etc/shadow: does not exist'; \
                     echo \"network interfaces (/sys/class/net): $(ls $r/sys/class/net | tr '\\n' ' ')\""
                ),
            )?;
        }
        self.step(&format!("Destroy `{name}`: the server stops and its directory (for docker, its container and volume) is removed; nothing is left running."))?;
        self.ws.destroy(&name)?;
        println!("    destroyed `{name}`");
        Ok(())
    }
}
