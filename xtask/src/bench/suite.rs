//! `bench --only suite`: a whole test suite (`benches/suite`, a 15-table schema) timed under
//! `cargo test` and nextest, N = 50 and 200, per engine against one server: the floor (a shared
//! database, each test rolls back; Redis: shared keys, prefixed and deleted), isoenv's per-test
//! databases (the run's server exported, as `test --isolated` does, and under nextest also
//! plain, the run's processes sharing a server: a first run, which makes it and its pool, then
//! one that takes the first run's on; the user's kept test servers are removed for the first),
//! and what `#[sqlx::test]` does
//! (CREATE DATABASE and the migrations per test; not for Redis). Rounds interleave the
//! variants; compile time is excluded (built first).

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use anyhow::{bail, Context as _, Result};
use isoenv::backend::BackendKind;
use isoenv::bench::{Measurement, Report};
use isoenv::engine::EngineKind;
use isoenv::testing::PoolKeeper;
use isoenv::workspace::test_run::url_var;
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
    /// Nothing exported: the run's test processes share one server, a previous run's taken on.
    IsoenvPlain,
    /// The same with no previous run's server to take on (the first run after a reboot, or
    /// after `db gc --test-servers`): the run makes its server and pool.
    IsoenvPlainFirst,
    PerCreate,
}

impl Variant {
    /// The suite's module holding this variant for `engine` (a filter `MODULE::`).
    fn module(self, engine: EngineKind) -> String {
        let v = match self {
            Variant::Floor => "floor",
            Variant::Isoenv | Variant::IsoenvPlain | Variant::IsoenvPlainFirst => "isoenv",
            Variant::PerCreate => "percreate",
        };
        format!("{engine}_{v}")
    }

    fn label(self) -> &'static str {
        match self {
            Variant::Floor => "floor (shared database, rollback)",
            Variant::Isoenv => "isoenv (run's server exported)",
            Variant::IsoenvPlain => "isoenv (plain, previous run's server taken on)",
            Variant::IsoenvPlainFirst => "isoenv (plain, first run: server and pool made)",
            Variant::PerCreate => "CREATE DATABASE + migrations per test (#[sqlx::test])",
        }
    }
}

/// One configuration: engine, runner, N, variant.
type Config = (EngineKind, Runner, usize, Variant);

fn configurations(sizes: &[usize]) -> Vec<Config> {
    let mut all = Vec::new();
    for engine in EngineKind::ALL {
        for runner in [Runner::Cargo, Runner::Nextest] {
            for &n in sizes {
                // A first run leaves the server the next plain run takes on.
                for v in [
                    Variant::Floor,
                    Variant::Isoenv,
                    Variant::IsoenvPlainFirst,
                    Variant::IsoenvPlain,
                    Variant::PerCreate,
                ] {
                    let plain = matches!(v, Variant::IsoenvPlain | Variant::IsoenvPlainFirst);
                    let skipped = (plain && runner == Runner::Cargo)
                        || (v == Variant::PerCreate && engine == EngineKind::Redis);
                    if !skipped {
                        all.push((engine, runner, n, v));
                    }
                }
            }
        }
    }
    all
}

fn name((engine, runner, n, v): Config) -> String {
    let runner = match runner {
        Runner::Cargo => "cargo test",
        Runner::Nextest => "nextest",
    };
    format!("suite, {engine}, {runner}, N={n}, {}", v.label())
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
    let servers = Servers::make(ws, &crate_dir)?;

    let configs = configurations(sizes);
    let mut seconds: Vec<Vec<f64>> = vec![Vec::new(); configs.len()];
    let handouts = scratch.join("handouts");
    let mut handout_ms = Vec::new();
    for round in 0..rounds {
        for (i, &config) in configs.iter().enumerate() {
            let (engine, runner, n, v) = config;
            progress(&format!(
                "suite round {}/{rounds}: {}",
                round + 1,
                name(config)
            ));
            let _ = std::fs::remove_file(&handouts);
            if v == Variant::IsoenvPlainFirst {
                isoenv::testing::remove_kept_servers()?;
            }
            let mut cmd = cargo(&crate_dir, &target);
            let filter = format!("{}::{}", v.module(engine), if n == 50 { "a" } else { "" });
            match runner {
                Runner::Cargo => cmd.args(["test", "-q", "--test", "suite", "--", &filter]),
                Runner::Nextest => cmd.args([
                    "nextest",
                    "run",
                    "--test",
                    "suite",
                    "--no-fail-fast",
                    // A failing test's output at the end, where the error below shows it.
                    "--failure-output=final",
                    &filter,
                ]),
            };
            cmd.envs(servers.suite_env())
                .env("SUITE_HANDOUTS", &handouts);
            if v == Variant::Isoenv {
                cmd.env(url_var(engine), servers.url(engine));
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
                    name(config),
                    isoenv::sys::process::tail(&text, 60)
                );
            }
            seconds[i].push(elapsed);
            if v == Variant::Isoenv && n == 50 {
                let samples = read_samples(&handouts).into_iter();
                handout_ms.extend(samples.map(|s| (engine, runner, s)));
            }
        }
    }
    let find = |c: Config| configs.iter().position(|&x| x == c);
    for (i, &config) in configs.iter().enumerate() {
        let (engine, runner, n, v) = config;
        report
            .measurements
            .extend(Measurement::of(name(config), "s", &seconds[i]));
        if v == Variant::Floor {
            continue;
        }
        let floor = find((engine, runner, n, Variant::Floor)).context("no floor")?;
        report.measurements.extend(Measurement::ratio_of(
            format!("{} / floor", name(config)),
            &seconds[i],
            &seconds[floor],
        ));
        let per_create = (engine, runner, n, Variant::PerCreate);
        if let (Variant::Isoenv, Some(per)) = (v, find(per_create)) {
            report.measurements.extend(Measurement::ratio_of(
                format!("{} / isoenv (speed-up)", name(per_create)),
                &seconds[per],
                &seconds[i],
            ));
        }
    }
    for engine in EngineKind::ALL {
        for (runner, label) in [
            (Runner::Cargo, "cargo test (threads of one process)"),
            (Runner::Nextest, "nextest (a process per test)"),
        ] {
            let samples: Vec<f64> = handout_ms
                .iter()
                .filter(|(e, r, _)| (*e, *r) == (engine, runner))
                .map(|(_, _, s)| *s)
                .collect();
            report.measurements.extend(Measurement::of(
                format!("suite handout, {engine}, N=50, {label}"),
                "ms",
                &samples,
            ));
        }
    }
    servers.destroy(ws)
}

/// One server per engine for the whole comparison, owned by this process as `test --isolated`
/// makes them (disposable: no fsync), with the floors' databases migrated.
struct Servers {
    urls: Vec<(EngineKind, String)>,
    /// The stand-in for `test --isolated`'s test command, while which the pools are kept.
    runner: std::process::Child,
}

impl Servers {
    fn make(ws: &Workspace, crate_dir: &Path) -> Result<Servers> {
        let me = isoenv::sys::process::ProcessId::of(std::process::id() as i32)?;
        let mut urls = Vec::new();
        for engine in EngineKind::ALL {
            let name = format!("suite-{engine}");
            ws.create(
                &CreateOptions {
                    owner: Some(me),
                    ..CreateOptions::server(&name, engine, BackendKind::Lightweight)
                },
                &|_| {},
            )?;
            urls.push((engine, ws.url(&name)?));
        }
        let mut runner = Command::new("sleep");
        runner.arg("infinity");
        // Gone with the bench however it ends, even killed (dropped, it is killed already).
        // SAFETY: prctl is async-signal-safe and touches no state of the parent.
        unsafe {
            runner.pre_exec(|| {
                nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL)
                    .map_err(Into::into)
            });
        }
        let runner = runner.spawn()?;
        let servers = Servers { urls, runner };
        let migration = |engine: &str| crate_dir.join(format!("migrations/{engine}/001_shop.sql"));
        let url = servers.url(EngineKind::Postgres);
        run_quietly(
            Command::new("psql")
                .args([url, "-qAt", "-v", "ON_ERROR_STOP=1", "-c"])
                .arg("CREATE DATABASE isoenv_suite_floor"),
        )?;
        let path = url
            .rfind("/postgres")
            .context("a URL of the postgres database")?;
        let floor = format!(
            "{}/isoenv_suite_floor{}",
            &url[..path],
            &url[path + "/postgres".len()..]
        );
        run_quietly(
            Command::new("psql")
                .args([&floor, "-qAt", "-v", "ON_ERROR_STOP=1", "-f"])
                .arg(migration("postgres")),
        )?;
        // The client reads its login from the environment's option file (MYSQL_HOME).
        let exports = ws.exports("suite-mysql")?;
        let mariadb = || {
            let mut c = Command::new("mariadb");
            c.envs(exports.iter().map(|(k, v)| (k, v)));
            c
        };
        run_quietly(mariadb().args(["-e", "CREATE DATABASE isoenv_suite_floor"]))?;
        run_quietly(
            mariadb()
                .arg("isoenv_suite_floor")
                .stdin(std::fs::File::open(migration("mysql"))?),
        )?;
        // What `test --isolated` does while cargo compiles the tests (compile time is left out
        // here too): the pools' templates and first databases made, and kept, ahead.
        let runner = isoenv::sys::process::ProcessId::of(servers.runner.id() as i32)?;
        for engine in [EngineKind::Postgres, EngineKind::Mysql] {
            let migrations = crate_dir.join("migrations");
            if let Some(keeper) = PoolKeeper::open(engine, servers.url(engine), &migrations)? {
                keeper.keep(runner);
            }
        }
        Ok(servers)
    }

    fn url(&self, engine: EngineKind) -> &str {
        self.urls
            .iter()
            .find(|(e, _)| *e == engine)
            .map(|(_, u)| u.as_str())
            .unwrap_or_default()
    }

    /// Where the suite's floor and per-create variants find each server.
    fn suite_env(&self) -> Vec<(&'static str, &str)> {
        vec![
            ("SUITE_SERVER_URL", self.url(EngineKind::Postgres)),
            ("SUITE_MYSQL_URL", self.url(EngineKind::Mysql)),
            ("SUITE_REDIS_URL", self.url(EngineKind::Redis)),
        ]
    }

    fn destroy(mut self, ws: &Workspace) -> Result<()> {
        // The keepers end within a second of their runner, quietly, before their servers go.
        self.runner.kill()?;
        self.runner.wait()?;
        std::thread::sleep(std::time::Duration::from_millis(1200));
        for (engine, _) in std::mem::take(&mut self.urls) {
            ws.destroy(&format!("suite-{engine}"))?;
        }
        Ok(())
    }
}

impl Drop for Servers {
    /// The runner never outlives the bench, even one that failed half-way.
    fn drop(&mut self) {
        let _ = self.runner.kill();
        let _ = self.runner.wait();
    }
}

fn run_quietly(cmd: &mut Command) -> Result<()> {
    let out = cmd.output()?;
    if !out.status.success() {
        bail!(
            "{:?} failed: {}",
            cmd.get_program(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
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
