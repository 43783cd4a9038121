//! `cargo xtask bench [--quick] [--json]`: the product's speed on this machine, as medians and
//! p95 over several runs, with baselines from the same run so that figures read as ratios. It
//! works in its own state root under `target/` and removes everything it made.

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::time::Instant;

use anyhow::{bail, Context as _, Result};
use clap::Args;
use isoenv::backend::BackendKind;
use isoenv::bench::{Measurement, Report};
use isoenv::engine::EngineKind;
use isoenv::sys::process::{ProcessId, ServiceUser};
use isoenv::workspace::{CreateOptions, Workspace};
use isoenv::{EnvironmentConfig, Vars};

use isoenv::cli::Context;

use crate::project_root;

mod suite;

#[derive(Args)]
pub struct BenchArgs {
    /// Fewer runs (a quick look, not for publishing).
    #[arg(long)]
    quick: bool,
    /// One JSON object per measurement on stdout instead of a Markdown table.
    #[arg(long)]
    json: bool,
    /// Only these sections (repeatable): create, start, pgbench, baselines, handouts, suite,
    /// xtask, docker.
    #[arg(long, value_parser = SECTIONS)]
    only: Vec<String>,
}

const SECTIONS: [&str; 8] = [
    "create",
    "start",
    "pgbench",
    "baselines",
    "handouts",
    "suite",
    "xtask",
    "docker",
];

/// A bench's variables: its own state root and cache in `scratch`.
fn scratch_vars(vars: &Vars, scratch: &Path) -> Vars {
    vars.clone()
        .with("ENVIRONMENT", "development")
        .with(
            "WASI_SANDBOX_DIR",
            scratch.join("state").display().to_string(),
        )
        .with(
            "ISOENV_CACHE_DIR",
            scratch.join("cache").display().to_string(),
        )
}

/// The workspace of `vars`.
fn workspace_of(vars: Vars) -> Result<Workspace> {
    let config = EnvironmentConfig::from_vars(&vars, &project_root())?;
    Ok(Workspace::new(&config, vars))
}

/// Removes the scratch directory of a bench run with `vars`, its environments destroyed first:
/// a test run's data lives in memory, outside it.
fn remove_scratch(vars: &Vars, scratch: &Path) {
    if let Ok(ws) = workspace_of(scratch_vars(vars, scratch)) {
        for env in ws.list().unwrap_or_default() {
            let _ = ws.destroy(&env.name);
        }
    }
    let _ = std::fs::remove_dir_all(scratch);
}

/// Removes what benches that were killed left (`target/isoenv-bench-PID`, PID gone).
fn remove_dead_scratches(target: &Path, vars: &Vars) {
    let Ok(entries) = std::fs::read_dir(target) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(pid) = name
            .strip_prefix("isoenv-bench-")
            .and_then(|p| p.parse().ok())
        else {
            continue;
        };
        if ProcessId::of(pid).is_ok_and(|p| p.is_alive()) {
            continue;
        }
        remove_scratch(vars, &entry.path());
    }
}

struct Plan {
    warm: usize,
    cold: usize,
    pgbench_secs: u32,
    handouts: usize,
    /// Interleaved rounds of the test-suite comparison, and its suite sizes.
    suite_rounds: usize,
    suite_sizes: &'static [usize],
}

pub fn run(ctx: &Context, args: BenchArgs) -> Result<ExitCode> {
    let plan = if args.quick {
        Plan {
            warm: 3,
            cold: 1,
            pgbench_secs: 2,
            handouts: 20,
            suite_rounds: 1,
            suite_sizes: &[50],
        }
    } else {
        Plan {
            warm: 7,
            cold: 3,
            pgbench_secs: 5,
            handouts: 100,
            suite_rounds: 3,
            suite_sizes: &[50, 200],
        }
    };
    let target = project_root().join("target");
    let vars = ctx.vars()?;
    remove_dead_scratches(&target, &vars);
    let scratch = target.join(format!("isoenv-bench-{}", std::process::id()));
    std::fs::create_dir_all(&scratch)?;
    // Servers run as an unprivileged user, which must reach the state root.
    isoenv::sys::files::set_mode(&scratch, 0o755)?;
    let bench = Bench {
        vars: scratch_vars(&vars, &scratch),
        scratch: scratch.clone(),
        plan,
        only: args.only,
    };
    let result = bench.all();
    remove_scratch(&vars, &scratch);
    let report = result?;
    std::fs::write(target.join("isoenv-bench.md"), report.markdown())?;
    std::fs::write(
        target.join("isoenv-bench.json"),
        serde_json::to_string_pretty(&report)?,
    )?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report.measurements)?);
        for s in &report.skipped {
            eprintln!("not measured: {s}");
        }
    } else {
        print!("{}", report.markdown());
    }
    eprintln!("isoenv: report kept in target/isoenv-bench.md and target/isoenv-bench.json");
    Ok(ExitCode::SUCCESS)
}

struct Bench {
    vars: Vars,
    scratch: PathBuf,
    plan: Plan,
    /// The sections to run (all when empty).
    only: Vec<String>,
}

fn progress(what: &str) {
    eprintln!("bench: {what}");
}

fn ms(t: Instant) -> f64 {
    t.elapsed().as_secs_f64() * 1e3
}

impl Bench {
    fn workspace(&self, cache: Option<&Path>) -> Result<Workspace> {
        let mut vars = self.vars.clone();
        if let Some(cache) = cache {
            vars = vars.with("ISOENV_CACHE_DIR", cache.display().to_string());
        }
        workspace_of(vars)
    }

    fn create(ws: &Workspace, name: &str, engine: EngineKind, backend: BackendKind) -> Result<f64> {
        let t = Instant::now();
        ws.create(&CreateOptions::server(name, engine, backend), &|_| {})?;
        Ok(ms(t))
    }

    fn all(&self) -> Result<Report> {
        let mut report = Report {
            machine: machine(),
            ..Report::default()
        };
        // As root the sandbox is measured with its limits enforced; otherwise rootless, in a
        // user namespace (the machine line says which).
        let namespaces = isoenv::workspace::doctor::namespaces();
        let sandbox = namespaces.ok;
        let backends: &[BackendKind] = if sandbox {
            &[BackendKind::Lightweight, BackendKind::Sandbox]
        } else {
            report.skipped.push(format!(
                "sandbox: {} ({})",
                namespaces.detail,
                namespaces.fix.unwrap_or_default()
            ));
            &[BackendKind::Lightweight]
        };
        let wants = |section: &str| self.only.is_empty() || self.only.iter().any(|s| s == section);
        if wants("create") {
            self.create_to_ready(backends, &mut report)?;
        }
        if sandbox && wants("start") {
            self.sandbox_start(&mut report)?;
        }
        if wants("pgbench") {
            self.pgbench(sandbox, &mut report)?;
        }
        if wants("baselines") {
            self.baselines(&mut report)?;
        }
        if wants("handouts") {
            self.handouts(&mut report)?;
        }
        if wants("suite") {
            let ws = self.workspace(None)?;
            suite::run(
                &ws,
                &self.scratch,
                self.plan.suite_rounds,
                self.plan.suite_sizes,
                &mut report,
            )?;
        }
        if wants("xtask") {
            self.xtask_start(&mut report)?;
        }
        if wants("docker") {
            match isoenv::backend::docker::client::Docker::connect(self.vars.get("DOCKER_HOST")) {
                Ok(_) => self.containers(&mut report)?,
                Err(e) => report.skipped.push(format!("docker: {e}")),
            }
        }
        Ok(report)
    }

    /// Create → ready (the engine's own probe: PostgreSQL `SELECT 1`, the MySQL handshake,
    /// Redis `AUTH` + `PING`), warm (cached data directory) and cold (empty cache).
    fn create_to_ready(&self, backends: &[BackendKind], report: &mut Report) -> Result<()> {
        for engine in EngineKind::ALL {
            progress(&format!("create → ready, {engine}"));
            let ws = self.workspace(None)?;
            let (mut warm, mut cold) = (vec![Vec::new(); 2], vec![Vec::new(); 2]);
            let (mut spare, mut launch) = (vec![Vec::new(); 2], vec![Vec::new(); 2]);
            // Backends alternate run by run, so that both see the same disk state (deleting a
            // data directory slows file creation on ext4 for a while). The first round fills
            // the cache and is not counted. Each round creates once with the spare data
            // directory ready (waited for, untimed) and once without any (the copy). The
            // environment made with the spare is then stopped and started again: the engine's
            // own launch → ready, the floor of a create. Dirty data is written out (untimed)
            // before each: the spare was just made, and the filesystem's journal would make
            // the create's first durable commit write its 40 MB, which a spare made ahead of time
            // (as in use) has long had written.
            for i in 0..=self.plan.warm {
                for (b, &backend) in backends.iter().enumerate() {
                    for (with_spare, samples) in [(true, &mut spare[b]), (false, &mut warm[b])] {
                        let spares = self.wait_for_spare(engine)?;
                        if !with_spare {
                            for s in &spares {
                                std::fs::remove_dir_all(s)?;
                            }
                        }
                        let name = format!("w{i}-{backend}-{with_spare}");
                        nix::unistd::sync();
                        let t = Self::create(&ws, &name, engine, backend)?;
                        if with_spare && i > 0 {
                            ws.stop(&name)?;
                            nix::unistd::sync();
                            let started = Instant::now();
                            ws.start(&name, &|_| {})?;
                            launch[b].push(ms(started));
                        }
                        ws.destroy(&name)?;
                        if i > 0 {
                            samples.push(t);
                        }
                    }
                }
            }
            for i in 0..self.plan.cold {
                for (b, &backend) in backends.iter().enumerate() {
                    let cache = self.scratch.join(format!("cold-{engine}-{backend}-{i}"));
                    let ws = self.workspace(Some(&cache))?;
                    let name = format!("c{i}");
                    cold[b].push(Self::create(&ws, &name, engine, backend)?);
                    ws.destroy(&name)?;
                    let _ = std::fs::remove_dir_all(&cache);
                }
            }
            for (b, backend) in backends.iter().enumerate() {
                for (kind, samples) in [
                    ("warm, spare ready", &spare[b]),
                    ("warm", &warm[b]),
                    ("cold", &cold[b]),
                ] {
                    report.measurements.extend(Measurement::of(
                        format!("create → ready, {engine}, {backend}, {kind}"),
                        "ms",
                        samples,
                    ));
                }
                report.measurements.extend(Measurement::of(
                    format!("launch → ready (start), {engine}, {backend}"),
                    "ms",
                    &launch[b],
                ));
                report.measurements.extend(Measurement::ratio_of(
                    format!("create → ready, {engine}, {backend}, spare ready / launch → ready"),
                    &spare[b],
                    &launch[b],
                ));
            }
            if backends.len() == 2 {
                report.measurements.extend(Measurement::ratio_of(
                    format!("create → ready, {engine}, warm, sandbox / lightweight"),
                    &warm[1],
                    &warm[0],
                ));
            }
        }
        Ok(())
    }

    /// `start` of a stopped environment: sandbox minus lightweight, paired run by run.
    /// Waits (30 s at most) until the cache holds a spare data directory for `engine` (made in
    /// the background after a create), and returns the spares there.
    fn wait_for_spare(&self, engine: EngineKind) -> Result<Vec<PathBuf>> {
        let entries: Vec<PathBuf> = std::fs::read_dir(self.scratch.join("cache"))
            .into_iter()
            .flatten()
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().starts_with(engine.as_str()))
            .map(|e| e.path().join("spares"))
            .collect();
        let spares = || -> Vec<PathBuf> {
            entries
                .iter()
                .flat_map(|dir| std::fs::read_dir(dir).into_iter().flatten())
                .flatten()
                .filter(|s| !s.file_name().to_string_lossy().starts_with('.'))
                .map(|s| s.path())
                .collect()
        };
        let deadline = Instant::now() + std::time::Duration::from_secs(30);
        loop {
            let found = spares();
            // Engines without a cached data directory (Redis) have no spare to wait for.
            if !found.is_empty() || entries.is_empty() || Instant::now() > deadline {
                return Ok(found);
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
    }

    fn sandbox_start(&self, report: &mut Report) -> Result<()> {
        let ws = self.workspace(None)?;
        for engine in EngineKind::ALL {
            progress(&format!("start overhead, {engine}"));
            let mut times = [Vec::new(), Vec::new()];
            for (i, backend) in [BackendKind::Lightweight, BackendKind::Sandbox]
                .into_iter()
                .enumerate()
            {
                let name = format!("s-{backend}");
                Self::create(&ws, &name, engine, backend)?;
                for _ in 0..self.plan.warm {
                    ws.stop(&name)?;
                    let t = Instant::now();
                    ws.start(&name, &|_| {})?;
                    times[i].push(ms(t));
                }
                ws.destroy(&name)?;
            }
            let [light, sandbox] = times;
            let diff: Vec<f64> = sandbox.iter().zip(&light).map(|(s, l)| s - l).collect();
            report.measurements.extend(Measurement::of(
                format!("start, {engine}, lightweight"),
                "ms",
                &light,
            ));
            report.measurements.extend(Measurement::of(
                format!("start, {engine}, sandbox"),
                "ms",
                &sandbox,
            ));
            report.measurements.extend(Measurement::of(
                format!("start, {engine}, sandbox − lightweight"),
                "ms",
                &diff,
            ));
        }
        Ok(())
    }

    /// pgbench select-only (2 clients, 2 threads). The sandbox's CPU limit is raised to all
    /// cores so that it has the same CPU as the direct server.
    fn pgbench(&self, sandboxed: bool, report: &mut Report) -> Result<()> {
        let Ok(pgbench) = which_pgbench() else {
            report.skipped.push(
                "pgbench: not installed (apt-get install postgresql-contrib or postgresql-client)"
                    .into(),
            );
            return Ok(());
        };
        let ws = self.workspace(None)?;
        Self::create(
            &ws,
            "pg-direct",
            EngineKind::Postgres,
            BackendKind::Lightweight,
        )?;
        let direct = ws.layout("pg-direct");
        let mut runs: Vec<(String, Vec<f64>)> = Vec::new();
        let sandbox = if sandboxed {
            Self::create(
                &ws,
                "pg-sandbox",
                EngineKind::Postgres,
                BackendKind::Sandbox,
            )?;
            ws.stop("pg-sandbox")?;
            let file = isoenv::backend::manifest_file(&ws.layout("pg-sandbox").dir);
            let mut m = isoenv::backend::manifest::Manifest::load(&file)?;
            m.limits.cpu = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
            std::fs::write(&file, m.to_json())?;
            ws.start("pg-sandbox", &|_| {})?;
            Some(ws.layout("pg-sandbox"))
        } else {
            None
        };
        let info = |name: &str| ws.inspect(name);
        let targets: Vec<(&str, String, u16, PathBuf)> = {
            let d = info("pg-direct")?;
            let mut t = vec![
                (
                    "direct TCP",
                    "127.0.0.1".to_owned(),
                    d.port,
                    direct.dir.clone(),
                ),
                (
                    "direct Unix socket",
                    direct.run.display().to_string(),
                    d.port,
                    direct.dir.clone(),
                ),
            ];
            if let Some(s) = &sandbox {
                let i = info("pg-sandbox")?;
                t.push((
                    "sandbox TCP (exposed port)",
                    "127.0.0.1".into(),
                    i.port,
                    s.dir.clone(),
                ));
                t.push((
                    "sandbox Unix socket",
                    s.run.display().to_string(),
                    i.port,
                    s.dir.clone(),
                ));
            }
            t
        };
        for (label, host, port, dir) in &targets {
            progress(&format!("pgbench, {label}"));
            let base = |args: &[String]| {
                Command::new(&pgbench)
                    .args(["-h", host, "-p", &port.to_string(), "-U", "postgres"])
                    .args(args)
                    .arg("postgres")
                    .env("PGPASSFILE", dir.join("pgpass"))
                    .stdin(Stdio::null())
                    .output()
            };
            let init = base(&["-i".into(), "-q".into(), "-s".into(), "1".into()])?;
            if !init.status.success() {
                bail!(
                    "pgbench -i failed: {}",
                    String::from_utf8_lossy(&init.stderr)
                );
            }
            let mut tps = Vec::new();
            for _ in 0..3 {
                let secs = self.plan.pgbench_secs.to_string();
                let out = base(&["-S", "-n", "-c", "2", "-j", "2", "-T", &secs].map(String::from))?;
                let text = String::from_utf8_lossy(&out.stdout);
                let value = text
                    .lines()
                    .find_map(|l| l.strip_prefix("tps = "))
                    .and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok())
                    .with_context(|| format!("no tps in pgbench's output: {text}"))?;
                tps.push(value);
            }
            runs.push((label.to_string(), tps));
        }
        let get = |label: &str| {
            runs.iter()
                .find(|(l, _)| l == label)
                .map(|(_, v)| v.clone())
        };
        for (label, tps) in &runs {
            report
                .measurements
                .extend(Measurement::of(format!("pgbench -S, {label}"), "tps", tps));
        }
        for (ours, base) in [
            ("sandbox TCP (exposed port)", "direct TCP"),
            ("sandbox Unix socket", "direct Unix socket"),
        ] {
            if let (Some(o), Some(b)) = (get(ours), get(base)) {
                report.measurements.extend(Measurement::ratio_of(
                    format!("pgbench -S, {ours} / {base}"),
                    &o,
                    &b,
                ));
            }
        }
        ws.destroy("pg-direct")?;
        if sandbox.is_some() {
            ws.destroy("pg-sandbox")?;
        }
        Ok(())
    }

    /// What pgtemp does (initdb + `pg_ctl start -w` + connect) and a copied data directory +
    /// `pg_ctl start -w` + connect, against isoenv's cold and warm create.
    fn baselines(&self, report: &mut Report) -> Result<()> {
        progress("baselines: naive initdb and copy with pg_ctl start -w");
        let bins = EngineKind::Postgres
            .engine()
            .locate(&self.vars)
            .map_err(anyhow::Error::msg)?;
        let bin = bins.server.parent().context("postgres has a directory")?;
        let user = ServiceUser::resolve(self.vars.get("ISOENV_SERVICE_USER"))
            .map_err(anyhow::Error::msg)?;
        let psql = which_in(bin, "psql")?;
        let base = self.scratch.join("naive");
        std::fs::create_dir_all(&base)?;
        isoenv::sys::files::chown_tree(&base, &user)?;
        let template = base.join("template");
        let mut initdb_times = Vec::new();
        let mut copy_times = Vec::new();
        for i in 0..self.plan.cold.max(3) {
            let dir = base.join(i.to_string());
            std::fs::create_dir_all(&dir)?;
            isoenv::sys::files::chown_tree(&dir, &user)?;
            let data = dir.join("data");
            let run = |cmd: &mut Command| -> Result<()> {
                let applied = user.apply(cmd)?;
                cmd.stdin(Stdio::null())
                    .stdout(Stdio::piped())
                    .stderr(Stdio::piped());
                let out = applied.spawned(cmd.spawn())?.wait_with_output()?;
                if !out.status.success() {
                    bail!("{cmd:?} failed: {}", String::from_utf8_lossy(&out.stderr));
                }
                Ok(())
            };
            let port = isoenv::sys::net::free_port()?.to_string();
            let start_and_connect = |data: &Path| -> Result<()> {
                run(Command::new(bin.join("pg_ctl"))
                    .args(["-D"])
                    .arg(data)
                    .args(["-w", "-l"])
                    .arg(dir.join("log"))
                    .arg("-o")
                    .arg(format!(
                        "-p {port} -k {} -c listen_addresses=''",
                        dir.display()
                    ))
                    .arg("start"))?;
                run(Command::new(&psql).arg("-h").arg(&dir).args([
                    "-p", &port, "-U", "postgres", "-Atc", "SELECT 1", "postgres",
                ]))
            };
            let stop = |data: &Path| {
                run(Command::new(bin.join("pg_ctl")).arg("-D").arg(data).args([
                    "-m",
                    "immediate",
                    "stop",
                ]))
            };
            let t = Instant::now();
            run(Command::new(bin.join("initdb"))
                .arg("-D")
                .arg(&data)
                .args(["-U", "postgres", "--auth=trust", "--no-sync", "-E", "UTF8"])
                .arg("--locale=C.UTF-8"))?;
            start_and_connect(&data)?;
            initdb_times.push(ms(t));
            stop(&data)?;
            if !template.exists() {
                run(Command::new("cp").arg("-a").arg(&data).arg(&template))?;
            }
            let copy = dir.join("copy");
            let t = Instant::now();
            run(Command::new("cp").arg("-a").arg(&template).arg(&copy))?;
            start_and_connect(&copy)?;
            copy_times.push(ms(t));
            stop(&copy)?;
            std::fs::remove_dir_all(&dir)?;
        }
        let existing = report.measurements.clone();
        let named = |n: &str| existing.iter().find(|m| m.name == n).cloned();
        let naive_init = Measurement::of(
            "baseline: initdb + pg_ctl start -w + connect (pgtemp)",
            "ms",
            &initdb_times,
        );
        let naive_copy = Measurement::of(
            "baseline: copy + pg_ctl start -w + connect",
            "ms",
            &copy_times,
        );
        for (ours, base) in [
            ("create → ready, postgres, lightweight, cold", &naive_init),
            ("create → ready, postgres, lightweight, warm", &naive_copy),
            (
                "create → ready, postgres, lightweight, warm, spare ready",
                &naive_init,
            ),
        ] {
            if let (Some(o), Some(b)) = (named(ours), base) {
                report.measurements.push(Measurement {
                    name: format!("{ours} / {}", b.name.trim_start_matches("baseline: ")),
                    unit: "x".into(),
                    median: o.median / b.median,
                    p95: o.p95 / b.p95,
                    runs: o.runs.min(b.runs),
                });
            }
        }
        report.measurements.extend(naive_init);
        report.measurements.extend(naive_copy);
        Ok(())
    }

    /// The handout bench (`benches/handout.rs`): tests that hold their database 150 ms, and
    /// tests of 10 ms, shorter than any clone (50-500 ms), where only recycling keeps the pool
    /// from running dry.
    fn handouts(&self, report: &mut Report) -> Result<()> {
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        for hold in ["150", "10"] {
            progress(&format!(
                "per-test handouts, tests held {hold} ms; builds the bench once"
            ));
            let mut cmd = Command::new(&cargo);
            cmd.args(["bench", "-q", "--bench", "handout"])
                .current_dir(project_root())
                .env("ISOENV_BENCH_JSON", "1")
                .env("ISOENV_BENCH_RUNS", self.plan.handouts.to_string())
                .env("ISOENV_BENCH_HOLD_MS", hold)
                .stderr(Stdio::inherit());
            for var in [
                "DATABASE_URL",
                "REDIS_URL",
                "ISOENV_POSTGRES_URL",
                "ISOENV_MYSQL_URL",
                "ISOENV_REDIS_URL",
            ] {
                cmd.env_remove(var);
            }
            let out = cmd.output()?;
            if !out.status.success() {
                bail!("cargo bench --bench handout failed");
            }
            for line in String::from_utf8_lossy(&out.stdout).lines() {
                if line.starts_with('{') {
                    report.measurements.push(serde_json::from_str(line)?);
                }
            }
        }
        Ok(())
    }

    /// Docker: `create` → ready with the docker backend, next to a plain `docker run` of the
    /// same image (isoenv's local one, built or reused first) with the same readiness probe from
    /// the host. Both include Docker copying the image's data directory into a new volume.
    fn containers(&self, report: &mut Report) -> Result<()> {
        let ws = self.workspace(None)?;
        for engine in EngineKind::ALL {
            progress(&format!("docker create → ready, {engine}"));
            let image = ws.build_image(engine, false, &|_| {})?.reference;
            let e = engine.engine();
            let creds = e.credentials(isoenv::sys::secret::Secret::new("bench"));
            let (mut ours, mut plain) = (Vec::new(), Vec::new());
            for i in 0..self.plan.warm {
                let name = format!("d{i}");
                let t = Instant::now();
                let opts = CreateOptions {
                    image: Some(image.clone()),
                    ..CreateOptions::server(&name, engine, BackendKind::Docker)
                };
                ws.create(&opts, &|_| {})?;
                ours.push(ms(t));
                ws.destroy(&name)?;

                let t = Instant::now();
                let spec = e.container(&creds, false);
                let mut run = Command::new("docker");
                run.args(["run", "-d", "-p"])
                    .arg(format!("127.0.0.1::{}", spec.port));
                match engine {
                    EngineKind::Postgres => run.args(["-e", "POSTGRES_PASSWORD=bench", &image]),
                    EngineKind::Mysql => run.args(["-e", "MARIADB_ROOT_PASSWORD=bench", &image]),
                    EngineKind::Redis => {
                        run.args([&image, "redis-server", "--requirepass", "bench"])
                    }
                };
                let out = run.stderr(Stdio::inherit()).output()?;
                if !out.status.success() {
                    bail!("docker run {image} failed");
                }
                let id = String::from_utf8_lossy(&out.stdout).trim().to_owned();
                let port = Command::new("docker")
                    .args(["port", &id, &spec.port.to_string()])
                    .output()?;
                let port: u16 = String::from_utf8_lossy(&port.stdout)
                    .lines()
                    .next()
                    .and_then(|l| l.rsplit(':').next())
                    .and_then(|p| p.trim().parse().ok())
                    .context("docker published no port")?;
                let endpoint = isoenv::engine::Endpoint {
                    host: "127.0.0.1".into(),
                    port,
                    socket_dir: None,
                };
                let deadline = Instant::now() + std::time::Duration::from_secs(60);
                while e.probe(&endpoint, &creds) != isoenv::engine::Probe::Ready {
                    if Instant::now() > deadline {
                        bail!("the plain container of {image} never answered");
                    }
                    std::thread::sleep(std::time::Duration::from_millis(3));
                }
                plain.push(ms(t));
                Command::new("docker")
                    .args(["rm", "-f", "-v", &id])
                    .stdout(Stdio::null())
                    .status()?;
            }
            report.measurements.extend(Measurement::of(
                format!("create → ready, {engine}, docker ({image})"),
                "ms",
                &ours,
            ));
            report.measurements.extend(Measurement::of(
                format!("baseline: docker run {image} + the same probe"),
                "ms",
                &plain,
            ));
            report.measurements.extend(Measurement::ratio_of(
                format!("create → ready, {engine}, docker / plain docker run"),
                &ours,
                &plain,
            ));
        }
        Ok(())
    }

    /// `cargo xtask --version` when already built (cargo's freshness check included), and the
    /// binary alone.
    fn xtask_start(&self, report: &mut Report) -> Result<()> {
        progress("cargo xtask start latency");
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        let exe = std::env::current_exe()?;
        let time = |cmd: &mut Command| -> Result<f64> {
            let t = Instant::now();
            let ok = cmd
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()?
                .success();
            if !ok {
                bail!("{cmd:?} failed");
            }
            Ok(ms(t))
        };
        let mut via_cargo = Vec::new();
        let mut binary = Vec::new();
        for _ in 0..self.plan.warm {
            via_cargo.push(time(
                Command::new(&cargo)
                    .args(["xtask", "--version"])
                    .current_dir(project_root()),
            )?);
            binary.push(time(Command::new(&exe).arg("--version"))?);
        }
        report.measurements.extend(Measurement::of(
            "cargo xtask --version (built)",
            "ms",
            &via_cargo,
        ));
        report
            .measurements
            .extend(Measurement::of("xtask binary --version", "ms", &binary));
        Ok(())
    }
}

fn which_pgbench() -> Result<PathBuf> {
    let bins = EngineKind::Postgres
        .engine()
        .locate(&Vars::default())
        .map_err(anyhow::Error::msg)?;
    which_in(bins.server.parent().unwrap_or(Path::new("/")), "pgbench")
}

/// `name` next to the server binaries, else on PATH.
fn which_in(dir: &Path, name: &str) -> Result<PathBuf> {
    let local = dir.join(name);
    if local.exists() {
        return Ok(local);
    }
    std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default())
        .map(|d| d.join(name))
        .find(|p| p.exists())
        .with_context(|| format!("{name} not found next to {} or on PATH", dir.display()))
}

fn machine() -> String {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let os = std::fs::read_to_string("/etc/os-release")
        .ok()
        .and_then(|t| {
            t.lines()
                .find_map(|l| l.strip_prefix("PRETTY_NAME="))
                .map(|v| v.trim_matches('"').to_owned())
        })
        .unwrap_or_default();
    let user = if nix::unistd::geteuid().is_root() {
        "as root"
    } else {
        "not root (rootless sandbox, limits as `db inspect` reports them)"
    };
    format!(
        "{cores} cores, {os}, Linux {}, debug build of xtask, {user}",
        kernel.trim()
    )
}
