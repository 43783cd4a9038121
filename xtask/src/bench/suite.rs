//! `bench --only suite`: a whole test suite (`benches/suite`, a 15-table schema) timed under
//! `cargo test` and nextest, N = 50 and 200, against one server: the floor (a shared database,
//! each test rolls back), isoenv's per-test databases (the run's server exported, as `test
//! --isolated` does, and under nextest also plain, the run's processes sharing a server they
//! provision), and what `#[sqlx::test]` does (CREATE DATABASE and the migrations per test).
//! Rounds interleave the variants; compile time is excluded (built first).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use anyhow::{bail, Context as _, Result};
use isoenv::backend::BackendKind;
use isoenv::bench::{Measurement, Report};
use isoenv::engine::EngineKind;
use isoenv::workspace::{CreateOptions, Workspace};

use super::progress;
use crate::project_root;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Runner {
    Cargo,
    Nextest,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Variant {
    Floor,
    /// The server exported to the tests (`test --isolated`).
    Isoenv,
    /// Nothing exported: the run's test processes provision and share one server.
    IsoenvPlain,
    PerCreate,
}

impl Variant {
    fn module(self) -> &'static str {
        match self {
            Variant::Floor => "floor",
            Variant::Isoenv | Variant::IsoenvPlain => "isoenv",
            Variant::PerCreate => "percreate",
        }
    }

    fn label(self) -> &'static str {
        match self {
            Variant::Floor => "floor (shared database, rollback)",
            Variant::Isoenv => "isoenv (run's server exported)",
            Variant::IsoenvPlain => "isoenv (plain, server per run)",
            Variant::PerCreate => "CREATE DATABASE + migrations per test (#[sqlx::test])",
        }
    }
}

/// What one configuration is: runner, N, variant.
fn configurations(sizes: &[usize]) -> Vec<(Runner, usize, Variant)> {
    let mut all = Vec::new();
    for runner in [Runner::Cargo, Runner::Nextest] {
        for &n in sizes {
            for v in [
                Variant::Floor,
                Variant::Isoenv,
                Variant::IsoenvPlain,
                Variant::PerCreate,
            ] {
                if v == Variant::IsoenvPlain && runner == Runner::Cargo {
                    continue;
                }
                all.push((runner, n, v));
            }
        }
    }
    all
}

fn name(runner: Runner, n: usize, v: Variant) -> String {
    let runner = match runner {
        Runner::Cargo => "cargo test",
        Runner::Nextest => "nextest",
    };
    format!("suite, {runner}, N={n}, {}", v.label())
}

pub(super) fn run(
    ws: &Workspace,
    scratch: &Path,
    rounds: usize,
    sizes: &[usize],
    report: &mut Report,
) -> Result<()> {
    let crate_dir = prepare(scratch)?;
    let target = project_root().join("target").join("isoenv-bench-suite");
    progress("suite: building the suite (cargo test and nextest)");
    for args in [
        &["test", "--no-run", "-q"][..],
        &["nextest", "run", "--no-run"][..],
    ] {
        let status = cargo(&crate_dir, &target)
            .args(args)
            .stdout(Stdio::null())
            .status()?;
        if !status.success() {
            bail!("building the suite failed (cargo {})", args.join(" "));
        }
    }
    // Owned by this process, as `test --isolated` makes it: disposable (no fsync).
    let me = isoenv::sys::process::ProcessId::of(std::process::id() as i32)?;
    ws.create(
        &CreateOptions {
            owner: Some(me),
            ..CreateOptions::server("suite", EngineKind::Postgres, BackendKind::Lightweight)
        },
        &|_| {},
    )?;
    let url = ws.url("suite")?;
    let psql = |sql: &str| -> Result<()> {
        let status = Command::new("psql")
            .args([&url, "-qAt", "-v", "ON_ERROR_STOP=1", "-c", sql])
            .stdout(Stdio::null())
            .status()?;
        if !status.success() {
            bail!("psql failed: {sql}");
        }
        Ok(())
    };
    psql("CREATE DATABASE isoenv_suite_floor")?;
    let path = url
        .rfind("/postgres")
        .context("a URL of the postgres database")?;
    let floor_url = format!(
        "{}/isoenv_suite_floor{}",
        &url[..path],
        &url[path + "/postgres".len()..]
    );
    let migration = crate_dir.join("migrations/postgres/001_shop.sql");
    let status = Command::new("psql")
        .args([&floor_url, "-qAt", "-v", "ON_ERROR_STOP=1", "-f"])
        .arg(&migration)
        .stdout(Stdio::null())
        .status()?;
    if !status.success() {
        bail!("cannot migrate the floor's database");
    }

    let configs = configurations(sizes);
    let mut seconds: Vec<Vec<f64>> = vec![Vec::new(); configs.len()];
    let handouts = scratch.join("handouts");
    let mut handout_ms = Vec::new();
    for round in 0..rounds {
        for (i, &(runner, n, v)) in configs.iter().enumerate() {
            progress(&format!(
                "suite round {}/{rounds}: {}",
                round + 1,
                name(runner, n, v)
            ));
            let _ = std::fs::remove_file(&handouts);
            let mut cmd = cargo(&crate_dir, &target);
            let filter = format!("{}::{}", v.module(), if n == 50 { "a" } else { "" });
            match runner {
                Runner::Cargo => cmd.args(["test", "-q", "--test", "suite", "--", &filter]),
                Runner::Nextest => cmd.args([
                    "nextest",
                    "run",
                    "--test",
                    "suite",
                    "--no-fail-fast",
                    &filter,
                ]),
            };
            cmd.env("SUITE_SERVER_URL", &url)
                .env("SUITE_HANDOUTS", &handouts);
            if v == Variant::Isoenv {
                cmd.env("ISOENV_POSTGRES_URL", &url);
            }
            let t = Instant::now();
            // Output goes to a file (a pipe nobody reads could fill and stall the run).
            let log = scratch.join("suite.log");
            let out = std::fs::File::create(&log)?;
            let status = cmd.stdout(out.try_clone()?).stderr(out).status()?;
            let elapsed = t.elapsed().as_secs_f64();
            if !status.success() {
                let text = std::fs::read_to_string(&log).unwrap_or_default();
                bail!(
                    "the suite failed: {}\n{}",
                    name(runner, n, v),
                    isoenv::sys::process::tail(&text, 40)
                );
            }
            seconds[i].push(elapsed);
            if v == Variant::Isoenv && n == 50 {
                handout_ms.extend(read_samples(&handouts).into_iter().map(|s| (runner, s)));
            }
        }
    }
    for (i, &(runner, n, v)) in configs.iter().enumerate() {
        report
            .measurements
            .extend(Measurement::of(name(runner, n, v), "s", &seconds[i]));
        if v == Variant::Floor {
            continue;
        }
        let floor = configs
            .iter()
            .position(|&c| c == (runner, n, Variant::Floor))
            .context("no floor")?;
        report.measurements.extend(Measurement::ratio_of(
            format!("{} / floor", name(runner, n, v)),
            &seconds[i],
            &seconds[floor],
        ));
        if v == Variant::Isoenv {
            let per = configs
                .iter()
                .position(|&c| c == (runner, n, Variant::PerCreate))
                .context("no per-create")?;
            report.measurements.extend(Measurement::ratio_of(
                format!(
                    "{} / isoenv (speed-up)",
                    name(runner, n, Variant::PerCreate)
                ),
                &seconds[per],
                &seconds[i],
            ));
        }
    }
    for (runner, label) in [
        (
            Runner::Cargo,
            "cargo test (threads share the process's pool)",
        ),
        (Runner::Nextest, "nextest (each process connects first)"),
    ] {
        let samples: Vec<f64> = handout_ms
            .iter()
            .filter(|(r, _)| *r == runner)
            .map(|(_, s)| *s)
            .collect();
        report.measurements.extend(Measurement::of(
            format!("suite handout, N=50, {label}"),
            "ms",
            &samples,
        ));
    }
    ws.destroy("suite")?;
    Ok(())
}

fn read_samples(path: &Path) -> Vec<f64> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect()
}

/// `cargo` in the suite's directory with its own target directory (kept between benches), and
/// without the variables of any test run around us.
fn cargo(dir: &Path, target: &Path) -> Command {
    let mut cmd = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    cmd.current_dir(dir).env("CARGO_TARGET_DIR", target);
    for var in [
        "DATABASE_URL",
        "ISOENV_POSTGRES_URL",
        "ISOENV_MYSQL_URL",
        "ISOENV_REDIS_URL",
        "ISOENV_MIGRATIONS_DIR",
        "RUSTFLAGS",
    ] {
        cmd.env_remove(var);
    }
    cmd
}

/// Copies `benches/suite` into the scratch directory with the path to this isoenv filled in
/// and this workspace's lock file, so it builds with the same versions and no download.
fn prepare(scratch: &Path) -> Result<PathBuf> {
    let root = project_root();
    let src = root.join("benches/suite");
    let dst = scratch.join("suite");
    copy_dir(&src, &dst)?;
    let manifest = std::fs::read_to_string(src.join("Cargo.toml"))?
        .replace("@ISOENV@", &root.display().to_string());
    std::fs::write(dst.join("Cargo.toml"), manifest)?;
    std::fs::copy(root.join("Cargo.lock"), dst.join("Cargo.lock"))?;
    Ok(dst)
}

fn copy_dir(src: &Path, dst: &Path) -> Result<()> {
    std::fs::create_dir_all(dst)?;
    for entry in std::fs::read_dir(src)? {
        let entry = entry?;
        let to = dst.join(entry.file_name());
        if entry.file_type()?.is_dir() {
            copy_dir(&entry.path(), &to)?;
        } else {
            std::fs::copy(entry.path(), &to)?;
        }
    }
    Ok(())
}
