//! `test [--isolated]` and `run [--isolated] -- COMMAND`: run the Rust test suite, or any
//! command (pytest, a Node test runner, a script), with isolated databases provisioned for the
//! run, exported to it, and always torn down (success, failure, panic, Ctrl-C, SIGTERM). The
//! command's exit code is passed through. A SIGKILLed run leaves environments whose owner is
//! dead, which the next isoenv command collects.

use std::process::{Command, ExitCode, ExitStatus};
use std::sync::atomic::{AtomicI32, Ordering};
use std::thread::sleep;
use std::time::{Duration, Instant};

use crate::backend::BackendKind;
use crate::engine::EngineKind;
use crate::sys::process::ProcessId;
use crate::testing::PoolKeeper;
use crate::workspace::test_run;
use crate::workspace::{self, CreateOptions, Workspace};
use anyhow::{Context as _, Result};
use clap::Args;
use nix::sys::signal::{self, SigHandler, Signal};
use nix::unistd::Pid;

use super::Context;

/// What to provision for a run.
#[derive(Args)]
pub struct Provision {
    /// Provision isolated databases for this run and export them to the command.
    #[arg(long)]
    isolated: bool,
    /// Backend for the databases: lightweight, sandbox or docker (default: from ENVIRONMENT).
    #[arg(long, value_parser = super::db::parse::<BackendKind>)]
    backend: Option<BackendKind>,
    /// Engine to provision: postgres, mysql or redis (repeatable; default: postgres).
    #[arg(long = "engine", value_parser = super::db::parse::<EngineKind>)]
    engines: Vec<EngineKind>,
    /// Also set up per-test database pools (PostgreSQL, MariaDB) from the migrations and keep
    /// them while the command runs, for tests in any language (README: "Per-test databases
    /// from any language"); each pool's key is exported as `ISOENV_<ENGINE>_POOL`.
    #[arg(long, requires = "isolated")]
    pool: bool,
    /// Leave the environments after the run, for debugging.
    #[arg(long)]
    keep: bool,
    /// After the command, print what was provisioned and its exit code as JSON on stdout
    /// (`{"exit_code", "environments", "kept"}`).
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
pub struct TestArgs {
    #[command(flatten)]
    provision: Provision,
    /// Run `cargo nextest run` instead of `cargo test`.
    #[arg(long)]
    nextest: bool,
    /// Arguments for the test command.
    #[arg(last = true)]
    args: Vec<String>,
}

impl TestArgs {
    /// What `cargo xtask ci` runs: the whole workspace against every engine.
    pub fn ci() -> Self {
        TestArgs {
            provision: Provision {
                isolated: true,
                backend: None,
                engines: EngineKind::ALL.to_vec(),
                pool: false,
                keep: false,
                json: false,
            },
            nextest: false,
            args: vec!["--workspace".into()],
        }
    }
}

#[derive(Args)]
pub struct RunArgs {
    #[command(flatten)]
    provision: Provision,
    /// The command and its arguments, run in the current directory.
    #[arg(last = true, required = true, value_name = "COMMAND")]
    command: Vec<String>,
}

/// The signal that asked us to stop, or 0.
static STOP: AtomicI32 = AtomicI32::new(0);

extern "C" fn on_signal(sig: i32) {
    STOP.store(sig, Ordering::SeqCst);
}

/// From here on Ctrl-C, SIGTERM and SIGHUP only set [`stop_requested`], so that the caller
/// always reaches its teardown.
pub fn trap_stop_signals() -> Result<()> {
    for sig in [Signal::SIGINT, Signal::SIGTERM, Signal::SIGHUP] {
        // SAFETY: the handler only stores to an atomic.
        unsafe { signal::signal(sig, SigHandler::Handler(on_signal)) }
            .context("cannot install the signal handlers")?;
    }
    Ok(())
}

/// The signal that asked us to stop, if any.
pub fn stop_requested() -> Option<i32> {
    Some(STOP.load(Ordering::SeqCst)).filter(|&s| s != 0)
}

/// `test`: the Rust test suite at the project's root.
pub fn test(ctx: &Context, args: TestArgs) -> Result<ExitCode> {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut command = Command::new(cargo);
    if args.nextest {
        command.args(["nextest", "run"]);
    } else {
        command.arg("test");
    }
    command.args(&args.args).current_dir(&ctx.root);
    provisioned(ctx, &args.provision, command, Pools::Ahead)
}

/// `run`: any command, in the current directory.
pub fn run(ctx: &Context, args: RunArgs) -> Result<ExitCode> {
    let (program, rest) = args
        .command
        .split_first()
        .context("name the command to run after `--`")?;
    let mut command = Command::new(program);
    command.args(rest);
    provisioned(ctx, &args.provision, command, Pools::Asked)
}

/// When the run's per-test pools are set up.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Pools {
    /// Only with `--pool`, before the command starts (its tests claim by SQL at once).
    Asked,
    /// Also without `--pool`, for the engines with migrations: while the command runs, so
    /// that the template and the first databases are made while `cargo` compiles the tests,
    /// not by the first test (a second or more of a short suite). The tests' own pools find
    /// them made, or wait for them on the pool's setup lock.
    Ahead,
}

/// Runs `command` (with what was provisioned exported to it) and passes its exit code on.
fn provisioned(
    ctx: &Context,
    args: &Provision,
    mut command: Command,
    pools: Pools,
) -> Result<ExitCode> {
    // Before anything is made: from here on, Ctrl-C and SIGTERM end in the teardown below.
    trap_stop_signals()?;
    own_group(&mut command);
    if !args.isolated {
        return Ok(to_exit(exit_code(wait(command.spawn()?)?)));
    }
    let vars = ctx.vars()?;
    let config = ctx.config(&vars)?;
    if let (true, Some(url)) = (config.is_prod(), vars.get(test_run::SHARED_VAR)) {
        // Explicitly configured: isoenv provisions and removes nothing here.
        eprintln!(
            "isoenv: production: using the shared test database from {}",
            test_run::SHARED_VAR
        );
        command.envs(test_run::shared_env(url).map_err(anyhow::Error::msg)?);
        return Ok(to_exit(exit_code(wait(command.spawn()?)?)));
    }
    let ws = Workspace::new(&config, vars.clone());
    let me = ProcessId::of(std::process::id() as i32)?;
    let run_id = format!("{}{:04x}", me.pid, rand_suffix());
    let plan = test_run::plan(
        config.profile(),
        args.backend,
        workspace::local_backend(&config),
        &args.engines,
        &run_id,
    )
    .map_err(anyhow::Error::msg)?;
    for name in ws.gc()? {
        eprintln!("isoenv: removed `{name}`: its owner is gone");
    }

    let mut made = Vec::new();
    let result = (|| -> Result<i32> {
        let mut exports = Vec::new();
        for (engine, name) in &plan.envs {
            stopped()?;
            let opts = CreateOptions {
                owner: Some(me),
                install: plan.backend.runs_locally()
                    && super::db::may_install(&vars, *engine, false),
                ..CreateOptions::server(name, *engine, plan.backend)
            };
            let info = ws.create(&opts, &|m| eprintln!("isoenv: {m}"))?;
            made.push(name.clone());
            eprintln!(
                "isoenv: {} {} ready at {}:{} for this run",
                info.engine, info.version, info.host, info.port
            );
            exports.push((*engine, ws.exports(name)?));
        }
        let mut keepers = Vec::new();
        let migrations = vars
            .get("ISOENV_MIGRATIONS_DIR")
            .map_or_else(|| ctx.root.join("migrations"), std::path::PathBuf::from);
        if args.pool {
            for (engine, url) in test_run::urls(&exports) {
                stopped()?;
                if let Some(keeper) = PoolKeeper::open(engine, &url, &migrations)? {
                    command.env(test_run::pool_var(engine), keeper.key());
                    keepers.push(keeper);
                }
            }
        }
        stopped()?;
        command.envs(test_run::child_env(&exports));
        let child = command
            .spawn()
            .with_context(|| format!("cannot start {:?}", command.get_program()))?;
        let runner = ProcessId::of(child.id() as i32)?;
        for keeper in keepers {
            keeper.keep(runner);
        }
        if pools == Pools::Ahead && !args.pool {
            for (engine, url) in test_run::urls(&exports) {
                if PoolKeeper::has_migrations(engine, &migrations) {
                    set_up_ahead(engine, url, migrations.clone(), runner);
                }
            }
        }
        Ok(exit_code(wait(child)?))
    })();

    if args.keep {
        for name in &made {
            let info = ws.disown(name, &|m| eprintln!("isoenv: {m}"))?;
            eprintln!(
                "isoenv: kept `{name}`: source {} (remove with `{} db destroy {name}`)",
                info.activate.display(),
                super::invoked_as()
            );
        }
    } else {
        for name in made.iter().rev() {
            if let Err(e) = ws.destroy(name) {
                eprintln!("isoenv: warning: cannot remove `{name}`: {e}");
            }
        }
    }
    // Stopped by a signal during provisioning: the shell's convention, not a plain failure.
    let result = match (result, stop_requested()) {
        (Err(e), Some(sig)) => {
            eprintln!("isoenv: {e}");
            Ok(128 + sig)
        }
        (result, _) => result,
    };
    if args.json {
        let said = serde_json::json!({
            "exit_code": result.as_ref().ok(),
            "environments": made,
            "kept": args.keep,
        });
        println!("{}", serde_json::to_string_pretty(&said)?);
    }
    result.map(to_exit)
}

/// Sets `engine`'s pool up on a thread and keeps it while `runner` lives (see [`Pools::Ahead`]).
/// A failure is only said while the run goes on: the tests then set it up themselves, and say
/// what fails.
fn set_up_ahead(
    engine: EngineKind,
    url: String,
    migrations: std::path::PathBuf,
    runner: ProcessId,
) {
    std::thread::spawn(move || match PoolKeeper::open(engine, &url, &migrations) {
        Ok(Some(keeper)) => keeper.keep(runner),
        Ok(None) => {}
        Err(e) if runner.is_running() => {
            eprintln!("isoenv: the {engine} pool was not set up ahead of the tests: {e}")
        }
        Err(_) => {}
    });
}

/// Its own process group, so that we decide how it is stopped; and if we are SIGKILLed, the
/// kernel stops it for us.
fn own_group(cmd: &mut Command) {
    std::os::unix::process::CommandExt::process_group(cmd, 0);
    // SAFETY: prctl is async-signal-safe and touches no state of the parent.
    unsafe {
        std::os::unix::process::CommandExt::pre_exec(cmd, || {
            nix::sys::prctl::set_pdeathsig(Signal::SIGTERM).map_err(std::io::Error::from)
        });
    }
}

/// Fails when a stop was asked for, so that provisioning stops early.
fn stopped() -> Result<()> {
    match STOP.load(Ordering::SeqCst) {
        0 => Ok(()),
        sig => anyhow::bail!("interrupted by signal {sig}; tearing down"),
    }
}

/// Waits for the test command; a stop request is passed on to its process group (SIGINT, as a
/// terminal would), then SIGKILL if it does not end within 10 s.
fn wait(mut child: std::process::Child) -> Result<ExitStatus> {
    let group = Pid::from_raw(child.id() as i32);
    let mut asked: Option<Instant> = None;
    loop {
        if let Some(status) = child.try_wait()? {
            return Ok(status);
        }
        match asked {
            None if STOP.load(Ordering::SeqCst) != 0 => {
                let _ = signal::killpg(group, Signal::SIGINT);
                asked = Some(Instant::now());
            }
            Some(t) if t.elapsed() > Duration::from_secs(10) => {
                let _ = signal::killpg(group, Signal::SIGKILL);
            }
            _ => {}
        }
        sleep(Duration::from_millis(20));
    }
}

/// The shell's number for how the command ended (128 + N when signal N stopped it or us).
fn exit_code(status: ExitStatus) -> i32 {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal(), STOP.load(Ordering::SeqCst)) {
        (_, _, sig) if sig != 0 => 128 + sig,
        (Some(code), _, _) => code,
        (None, Some(sig), _) => 128 + sig,
        (None, None, _) => 1,
    }
}

fn to_exit(code: i32) -> ExitCode {
    ExitCode::from(u8::try_from(code).unwrap_or(1))
}

fn rand_suffix() -> u16 {
    use std::hash::{BuildHasher, RandomState};
    RandomState::new().hash_one(std::time::SystemTime::now()) as u16
}
