//! `env`, `env check` and `doctor`.

use std::process::ExitCode;

use crate::config::{EnvironmentConfig, SshTunnel};
use crate::envfile;
use crate::sys::shell;
use crate::workspace::doctor;
use anyhow::Result;
use clap::{Args, Subcommand};
use serde_json::json;

use super::Context;

#[derive(Args)]
pub struct EnvArgs {
    #[command(subcommand)]
    action: Option<EnvAction>,
    /// Print JSON on stdout.
    #[arg(long, conflicts_with = "shell")]
    json: bool,
    /// Print `export` lines that bash can eval.
    #[arg(long)]
    shell: bool,
    /// With --shell: include DB_PASSWORD.
    #[arg(long, requires = "shell")]
    with_password: bool,
}

#[derive(Subcommand)]
enum EnvAction {
    /// Validate the configuration and lint .env for constructs dotenvy and bash read differently.
    Check,
}

pub fn run(ctx: &Context, args: EnvArgs) -> Result<ExitCode> {
    if let Some(EnvAction::Check) = args.action {
        return check(ctx);
    }
    let vars = ctx.vars()?;
    let config = ctx.config(&vars)?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&to_json(&config))?);
    } else if args.shell {
        print!("{}", shell_exports(&config, args.with_password));
    } else {
        print!("{}", human(&config));
    }
    Ok(ExitCode::SUCCESS)
}

fn to_json(c: &EnvironmentConfig) -> serde_json::Value {
    let db = c.database_config();
    json!({
        "environment": c.profile(),
        "database": {
            "engine": db.engine,
            "host": db.host,
            "port": db.port,
            "name": db.name,
            "user": db.user,
            "password_set": !db.password.is_empty(),
            "use_vm": db.use_vm,
            "ssl_mode": db.ssl_mode,
            "ssl_root_cert": db.ssl_root_cert,
            "ssh_tunnel": db.ssh_tunnel,
            "source": db.source,
            "url": db.redacted_url(),
        },
        "sandbox": {
            "dir": c.sandbox().dir,
            "use_namespaces": c.sandbox().use_namespaces,
            "memory_limit_bytes": c.sandbox().memory_limit_bytes,
        },
    })
}

fn human(c: &EnvironmentConfig) -> String {
    let db = c.database_config();
    let tunnel = db.ssh_tunnel.as_ref().map_or_else(
        || "none".to_owned(),
        |SshTunnel {
             host,
             port,
             user,
             key,
             strict_host_keys,
             ..
         }| {
            let key = key
                .as_ref()
                .map_or_else(|| "default".into(), |k| k.display().to_string());
            let keys = if *strict_host_keys {
                "strict"
            } else {
                "accept-new"
            };
            format!("{user}@{host}:{port} (key: {key}, host keys: {keys})")
        },
    );
    format!(
        "environment:  {}\n\
         database:     {} (from {})\n\
         \x20 password:   {}\n\
         \x20 use_vm:     {}\n\
         \x20 ssl_mode:   {}\n\
         \x20 ssh_tunnel: {tunnel}\n\
         sandbox dir:  {}\n\
         \x20 namespaces: {}\n\
         \x20 memory:     {} MiB\n",
        c.profile(),
        db.redacted_url(),
        db.source,
        if db.password.is_empty() {
            "(empty)"
        } else {
            "(set, hidden)"
        },
        db.use_vm,
        db.ssl_mode,
        c.sandbox().dir.display(),
        c.sandbox().use_namespaces,
        c.sandbox().memory_limit_bytes >> 20,
    )
}

fn shell_exports(c: &EnvironmentConfig, with_password: bool) -> String {
    let db = c.database_config();
    let mut pairs: Vec<(&str, String)> = vec![
        ("ENVIRONMENT", c.profile().to_string()),
        ("DB_ENGINE", db.engine.to_string()),
        ("DB_HOST", db.host.clone()),
        ("DB_PORT", db.port.to_string()),
        ("DB_NAME", db.name.clone()),
        ("DB_USER", db.user.clone()),
        ("DB_SSL_MODE", db.ssl_mode.to_string()),
        ("DB_USE_VM", db.use_vm.to_string()),
        ("WASI_SANDBOX_DIR", c.sandbox().dir.display().to_string()),
        (
            "WASI_USE_NAMESPACES",
            c.sandbox().use_namespaces.to_string(),
        ),
        (
            "WASI_MEMORY_LIMIT_BYTES",
            c.sandbox().memory_limit_bytes.to_string(),
        ),
    ];
    if with_password {
        pairs.push(("DB_PASSWORD", db.password.expose().to_owned()));
    }
    shell::export_lines(pairs.iter().map(|(k, v)| (*k, v.as_str())))
}

pub fn check(ctx: &Context) -> Result<ExitCode> {
    let path = ctx.env_file.path();
    let mut errors = 0;
    match std::fs::read_to_string(path) {
        Ok(text) => {
            let mode = std::fs::metadata(path)
                .map(|m| std::os::unix::fs::PermissionsExt::mode(&m.permissions()))
                .unwrap_or(0);
            if let Some(warning) = envfile::exposure(&text, mode, path) {
                println!("warning: {warning}");
            }
            for f in envfile::lint(&text) {
                println!(
                    "{}:{}: error: {}\n  fix: {}",
                    path.display(),
                    f.line,
                    f.message,
                    f.fix
                );
                errors += 1;
            }
        }
        Err(e)
            if e.kind() == std::io::ErrorKind::NotFound
                && matches!(ctx.env_file, crate::EnvFile::Default(_)) =>
        {
            println!(
                "{}: not present; checking the process environment only",
                path.display()
            );
        }
        Err(e) => anyhow::bail!("cannot read {}: {e}", path.display()),
    }
    match ctx.vars().and_then(|vars| ctx.config(&vars)) {
        Ok(config) => {
            for p in config.validate() {
                println!("warning: {p}");
            }
        }
        Err(e) => {
            println!("error: {e:#}");
            errors += 1;
        }
    }
    if errors == 0 {
        println!("{}: ok", path.display());
        Ok(ExitCode::SUCCESS)
    } else {
        Ok(ExitCode::FAILURE)
    }
}

pub fn doctor(ctx: &Context, json: bool) -> Result<ExitCode> {
    let vars = ctx.vars()?;
    let mut checks = doctor::run(&vars);
    checks.push(doctor::env_file(ctx.env_file.path()));
    let config = ctx.config(&vars);
    if let Ok(config) = &config {
        checks.push(crate::workspace::Workspace::new(config, vars.clone()).identities());
    }
    // What this profile's `db up` needs decides the exit code; an unreadable configuration
    // needs nothing here (`env check` reports it).
    let needed = config
        .map(|config| doctor::needed(&config))
        .unwrap_or_default();
    let missing: Vec<&str> = checks
        .iter()
        .filter(|c| !c.ok && needed.contains(&c.name.as_str()))
        .map(|c| c.name.as_str())
        .collect();
    if json {
        println!("{}", serde_json::to_string_pretty(&checks)?);
    } else {
        for c in &checks {
            let mark = match (c.ok, needed.contains(&c.name.as_str())) {
                (true, _) => "ok     ",
                (false, true) => "MISSING",
                (false, false)
                    if [doctor::ENV_FILE, doctor::IDENTITIES].contains(&c.name.as_str()) =>
                {
                    "WARNING"
                }
                (false, false) => "absent ",
            };
            println!("{mark} {:<11} {}", c.name, c.detail);
            if let Some(fix) = &c.fix {
                println!("    fix: {fix}");
            }
        }
        if !missing.is_empty() {
            println!("this profile needs: {}", missing.join(", "));
        }
    }
    Ok(if missing.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
