//! `db ...`: environment lifecycle commands.

use std::process::ExitCode;

use crate::backend::{BackendKind, Status};
use crate::engine::EngineKind;
use crate::workspace::{CreateOptions, Down, EnvInfo, UpOutcome, Workspace};
use anyhow::Result;
use clap::Subcommand;

use super::{invoked_as, say, Context};

#[derive(Subcommand)]
pub enum DbCommand {
    /// Bring up this ENVIRONMENT's database: development, the local `dev` PostgreSQL (or the
    /// VM through an SSH tunnel); production, a read-only check of the configured database.
    Up {
        /// Install a missing engine with the system package manager.
        #[arg(long)]
        install: bool,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Undo `up`: stop the local server or the development tunnel (data kept); in staging,
    /// remove the container and its volume.
    Down {
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Whether what `up` brings up is running and its database answers (exit 1 if not).
    Status {
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Create an environment (and start its server unless --no-service).
    Create {
        /// The environment: letters, digits, `.`, `_` and `-`, at most 48 characters.
        name: String,
        /// The database: postgres, mysql (MariaDB) or redis.
        #[arg(long, value_parser = parse::<EngineKind>)]
        engine: EngineKind,
        /// Where it runs: lightweight (a local process), sandbox (Linux namespaces confined by
        /// manifest.json) or docker (a container).
        #[arg(long, default_value = "lightweight", value_parser = parse::<BackendKind>)]
        backend: BackendKind,
        /// Port on 127.0.0.1 (default: a free one, kept across starts; for a Docker engine on
        /// another machine, one it picks at each start).
        #[arg(long)]
        port: Option<u16>,
        /// The docker backend's image (default: ISOENV_<ENGINE>_IMAGE, else the official
        /// image, else isoenv's local one when the official cannot be pulled).
        #[arg(long, value_name = "REF")]
        image: Option<String>,
        /// Variables and activate script only; no server.
        #[arg(long)]
        no_service: bool,
        /// Install a missing engine with the system package manager.
        #[arg(long)]
        install: bool,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Start a stopped (or crashed) environment's server.
    Start {
        /// The environment: letters, digits, `.`, `_` and `-`, at most 48 characters.
        name: String,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Stop an environment's server; its data stays.
    Stop {
        /// The environment.
        name: String,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Stop the server and remove the environment with its data.
    Destroy {
        /// The environment.
        name: String,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// List environments.
    List {
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Show one environment.
    Inspect {
        /// The environment: letters, digits, `.`, `_` and `-`, at most 48 characters.
        name: String,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Remove environments whose owner (e.g. a killed `test --isolated`) is gone, what a
    /// killed `create` left half-made, and this project's containers and volumes that no
    /// environment accounts for.
    Gc {
        /// Also remove the stopped servers that plain test runs (`isoenv::testing` without
        /// `test --isolated`) keep for the next run, this user's, whatever the project.
        #[arg(long)]
        test_servers: bool,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Print the full connection URL, password included.
    Url {
        /// The environment.
        name: String,
    },
    /// Print the server's log.
    Logs {
        /// The environment: letters, digits, `.`, `_` and `-`, at most 48 characters.
        name: String,
        /// Number of lines from the end.
        #[arg(short = 'n', long, default_value_t = 50)]
        lines: usize,
    },
}

pub fn parse<T: std::str::FromStr<Err = String>>(s: &str) -> Result<T, String> {
    s.parse()
}

/// Whether to install `engine` if it is missing: `--install`, `ISOENV_AUTO_INSTALL=1` and
/// `CI=true` install without asking; on a terminal the user is asked (Enter means yes);
/// otherwise not, and the error names the command to run.
pub(super) fn may_install(vars: &crate::Vars, engine: EngineKind, asked: bool) -> bool {
    if asked || super::installs_unasked(vars) {
        return true;
    }
    let engine = engine.engine();
    if engine.locate(vars).is_ok() {
        return false;
    }
    let Some(command) = crate::engine::install_command(engine) else {
        return false;
    };
    super::confirm(&format!(
        "{} is not installed. Install it now with `{command}`?",
        engine.kind()
    ))
}

fn progress(message: &str) {
    eprintln!("isoenv: {}", say(message));
}

pub fn run(ctx: &Context, cmd: DbCommand) -> Result<ExitCode> {
    let vars = ctx.vars()?;
    let config = ctx.config(&vars)?;
    let ws = Workspace::new(&config, vars.clone());
    if !matches!(cmd, DbCommand::Gc { .. }) && !config.is_prod() {
        // What a killed run left behind goes first, so names and ports are free again.
        for name in ws.gc()? {
            progress(&format!("removed `{name}`: its owner is gone"));
        }
    }
    match cmd {
        DbCommand::Up { install, json } => {
            let install = match crate::workspace::plan_up(&config) {
                crate::workspace::UpPlan::Env {
                    engine, backend, ..
                } if backend.runs_locally() => may_install(&vars, engine, install),
                _ => install,
            };
            let outcome = ws.up(&config, install, &progress)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&outcome)?);
            } else {
                let (verb, info) = match &outcome {
                    UpOutcome::Created(i) => ("created and started", i),
                    UpOutcome::Started(i) => ("started", i),
                    UpOutcome::AlreadyUp(i) => ("already up", i),
                    UpOutcome::Verified { target, report } => {
                        println!("production database {target} verified (read-only; nothing was created or changed)");
                        println!("  {report}");
                        return Ok(ExitCode::SUCCESS);
                    }
                };
                print_usage(verb, info);
            }
        }
        DbCommand::Down { json: true } => {
            let (outcome, name) = match ws.down(&config)? {
                Down::Stopped(name) => ("stopped", Some(name)),
                Down::Removed(name) => ("removed", Some(name.to_owned())),
                Down::Nothing => ("nothing", None),
            };
            let said = serde_json::json!({ "outcome": outcome, "name": name });
            println!("{}", serde_json::to_string_pretty(&said)?);
        }
        DbCommand::Down { json: false } => match ws.down(&config)? {
            Down::Stopped(name) => {
                println!(
                    "{}",
                    say(&format!(
                        "stopped `{name}` (kept; `cargo xtask db up` starts it again)"
                    ))
                )
            }
            Down::Removed(name) => println!("removed `{name}` with its container and volume"),
            Down::Nothing => {
                println!(
                    "{}",
                    say("nothing to stop: `cargo xtask db up` has not created anything")
                )
            }
        },
        DbCommand::Status { json } => {
            let report = ws.status(&config)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                println!("ENVIRONMENT={}", report.environment);
                for check in &report.checks {
                    let mark = if check.ok { "ok  " } else { "FAIL" };
                    println!("  {mark} {}: {}", check.what, say(&check.detail));
                }
            }
            if !report.healthy() {
                return Ok(ExitCode::FAILURE);
            }
        }
        DbCommand::Create {
            name,
            engine,
            backend,
            port,
            image,
            no_service,
            install,
            json,
        } => {
            let install = match backend.runs_locally() && !no_service {
                true => may_install(&vars, engine, install),
                false => install,
            };
            let opts = CreateOptions {
                name,
                engine,
                backend,
                port,
                service: !no_service,
                install,
                owner: None,
                image,
            };
            let info = ws.create(&opts, &progress)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&info)?);
            } else {
                print_usage("created", &info);
            }
        }
        DbCommand::Start { name, json } => {
            // Read before (a missing one is the verb's to report, after its own checks); the
            // same server afterwards means nothing was started.
            let was = ws
                .inspect(&name)
                .ok()
                .filter(|i| i.status == Status::Running);
            let info = ws.start(&name, &progress)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&info)?);
            } else if was.is_some_and(|was| was.pid == info.pid) {
                print_usage("already running:", &info);
            } else {
                print_usage("started", &info);
            }
        }
        DbCommand::Stop { name, json } => {
            let was = ws.inspect(&name).map(|i| i.status).ok();
            let info = ws.stop(&name)?;
            match was {
                _ if json => println!("{}", serde_json::to_string_pretty(&info)?),
                Some(Status::Running) | None => println!("stopped `{name}`"),
                Some(other) => println!("`{name}` was already {}", other.as_str()),
            }
        }
        DbCommand::Destroy { name, json } => {
            // Stopping a server can take seconds (PostgreSQL's checkpoint): say so first.
            if ws.inspect(&name).is_ok_and(|i| i.status == Status::Running) {
                progress(&format!("stopping `{name}` and removing it with its data"));
            }
            ws.destroy(&name)?;
            if json {
                let said = serde_json::json!({ "destroyed": name });
                println!("{}", serde_json::to_string_pretty(&said)?);
            } else {
                println!("destroyed `{name}`");
            }
        }
        DbCommand::List { json } => {
            let envs = ws.list()?;
            let broken = ws.broken()?;
            if json {
                // Broken ones as `{"name", "status": "broken", "error"}` after the others.
                let mut all = serde_json::to_value(&envs)?;
                if let Some(list) = all.as_array_mut() {
                    list.extend(broken.iter().map(|(name, error)| {
                        serde_json::json!({ "name": name, "status": "broken", "error": error })
                    }));
                }
                println!("{}", serde_json::to_string_pretty(&all)?);
            } else {
                print_table(&envs, &broken);
            }
        }
        DbCommand::Inspect { name, json } => {
            let info = ws.inspect(&name)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&info)?);
            } else {
                print_inspect(&info);
            }
        }
        DbCommand::Gc { test_servers, json } => {
            let removed = ws.gc()?;
            let (leftovers, unchecked) = ws.gc_leftovers()?;
            let test_servers = match test_servers {
                true => crate::testing::remove_kept_servers()?,
                false => Vec::new(),
            };
            if json {
                let unchecked: Vec<String> = unchecked.iter().map(|e| e.to_string()).collect();
                let said = serde_json::json!({
                    "environments": removed, "leftovers": leftovers, "unchecked": unchecked,
                    "test_servers": test_servers
                });
                println!("{}", serde_json::to_string_pretty(&said)?);
                return Ok(ExitCode::SUCCESS);
            }
            for name in &removed {
                println!("removed `{name}` (its owner is gone)");
            }
            for e in &unchecked {
                progress(&format!("not checked: {e}"));
            }
            for what in &leftovers {
                println!("removed {what} (no environment accounts for it)");
            }
            for name in &test_servers {
                println!("removed test server `{name}` (stopped, kept for the next test run)");
            }
            if removed.is_empty() && leftovers.is_empty() && test_servers.is_empty() {
                println!("nothing to collect");
            }
        }
        DbCommand::Url { name } => println!("{}", ws.url(&name)?),
        DbCommand::Logs { name, lines } => println!("{}", ws.logs(&name, lines)?),
    }
    Ok(ExitCode::SUCCESS)
}

fn print_usage(verb: &str, info: &EnvInfo) {
    println!(
        "{verb} `{}`: {} {} ({}), {}",
        info.name,
        info.engine,
        info.version,
        info.backend,
        info.status.as_str()
    );
    println!("  url:      {}", info.url);
    println!("  activate: source {}", info.activate.display());
    println!(
        "  password: `{} db url {}` prints the full URL",
        invoked_as(),
        info.name
    );
}

fn print_table(envs: &[EnvInfo], broken: &[(String, String)]) {
    if envs.is_empty() && broken.is_empty() {
        println!("{}", say("no environments (create one with `cargo xtask db up` or `cargo xtask db create NAME --engine postgres`)"));
        return;
    }
    println!(
        "{:<20} {:<9} {:<12} {:<9} {:<22} {:<8} VERSION",
        "NAME", "ENGINE", "BACKEND", "STATUS", "ADDRESS", "PID"
    );
    for e in envs {
        let pid = e.pid.map_or_else(|| "-".into(), |p| p.to_string());
        println!(
            "{:<20} {:<9} {:<12} {:<9} {:<22} {:<8} {}",
            e.name,
            e.engine.as_str(),
            e.backend.as_str(),
            e.status.as_str(),
            format!("{}:{}", e.host, e.port),
            pid,
            e.version
        );
    }
    for (name, error) in broken {
        println!("{name:<20} {:<9} {:<12} broken    {error}", "-", "-");
    }
    if let Some((name, _)) = broken.first() {
        println!(
            "{}",
            say(&format!("(`cargo xtask db destroy {name}` removes a broken environment, stopping what runs in it)"))
        );
    }
}

fn print_inspect(e: &EnvInfo) {
    let pid = e.pid.map_or_else(|| "-".into(), |p| p.to_string());
    println!(
        "name:     {}\nengine:   {} {}\nbackend:  {}\nstatus:   {}",
        e.name,
        e.engine,
        e.version,
        e.backend,
        e.status.as_str()
    );
    println!(
        "address:  {}:{}\npid:      {pid}\ndir:      {}",
        e.host,
        e.port,
        e.dir.display()
    );
    println!(
        "url:      {}\nactivate: source {}",
        e.url,
        e.activate.display()
    );
    if let Some(dir) = &e.socket_dir {
        println!("socket:   {} (Unix socket directory)", dir.display());
    }
    if let Some(data) = &e.data_in_memory {
        println!("data:     {} (in memory: a test run's)", data.display());
    }
    if let Some(c) = &e.container {
        println!(
            "container: {} (image {})\nvolume:   {}",
            c.name, c.image, c.volume
        );
    }
    if let Some(iso) = &e.isolation {
        print_isolation(iso, e.backend);
    }
}

fn print_isolation(iso: &crate::backend::Isolation, backend: BackendKind) {
    println!("manifest: {}", iso.manifest_file.display());
    let m = match &iso.manifest {
        Ok(m) => m,
        Err(e) => {
            println!("  INVALID: {e}");
            return;
        }
    };
    for bind in &m.fs {
        let mode = format!("{:?}", bind.mode).to_lowercase();
        match &bind.guest {
            Some(guest) => println!("  fs {mode} {} -> {}", bind.host.display(), guest.display()),
            None => println!("  fs {mode} {}", bind.host.display()),
        }
    }
    match (backend, m.network.expose.port(), &iso.exposed) {
        (BackendKind::Docker, 0, Some(exposed)) => {
            println!("  network: a port Docker picks at each start, published on {exposed}")
        }
        (BackendKind::Docker, _, Some(exposed)) => println!("  network: published on {exposed}"),
        (_, port, _) => println!(
            "  network: 127.0.0.1:{port} on the host; inside only `lo`, no outbound access"
        ),
    }
    let env: Vec<&str> = m.env.keys().map(String::as_str).collect();
    println!("  env: {}", env.join(" "));
    for l in &iso.limits {
        let state = match (l.enforced, iso.running) {
            (true, _) => "enforced",
            (false, true) => "NOT enforced",
            (false, false) => "not running",
        };
        println!("  limit {} {} ({}, {state})", l.limit, l.value, l.via);
    }
    if let Some(pid) = iso.init_pid {
        println!("  sandbox init pid {pid} (enter with: nsenter --target {pid} --mount --pid --net --ipc --uts)");
    }
}
