//! `cargo xtask test --isolated` with real servers: the test command sees them, its exit code is
//! ours, and nothing is left after success, failure, SIGINT or SIGKILL (then one more command).
//! The test command is a stand-in runner script (through `$CARGO`, which the xtask honours), so
//! that it can be interrupted at a known point.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ExitStatus};
use std::thread::sleep;
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

mod support;
use support::Project;

/// Writes its pid and the exported URLs, then runs until stopped (or exits with $RUNNER_EXIT).
fn runner(dir: &Path) -> PathBuf {
    let script = dir.join("runner.sh");
    fs::write(
        &script,
        format!(
            "#!/bin/sh\necho \"$ISOENV_POSTGRES_URL $ISOENV_REDIS_URL\" > {d}/urls.tmp\n\
             echo $$ > {d}/runner.pid\nmv {d}/urls.tmp {d}/urls\n\
             [ -n \"$RUNNER_EXIT\" ] && exit \"$RUNNER_EXIT\"\nexec sleep 300\n",
            d = dir.display()
        ),
    )
    .unwrap();
    fs::set_permissions(&script, fs::Permissions::from_mode(0o755)).unwrap();
    script
}

struct Run {
    project: Project,
    child: Child,
}

impl Run {
    fn start(exit: Option<&str>) -> Self {
        let project = Project::new("");
        let script = runner(project.dir.path());
        let mut cmd = project.cmd(&[
            "test",
            "--isolated",
            "--engine",
            "postgres",
            "--engine",
            "redis",
            "--",
            "ARG",
        ]);
        cmd.env("CARGO", script);
        if let Some(code) = exit {
            cmd.env("RUNNER_EXIT", code);
        }
        let child = cmd.spawn().unwrap();
        Run { project, child }
    }

    /// The URLs the runner received, once it has started.
    fn urls(&mut self) -> Vec<String> {
        let path = self.project.dir.path().join("urls");
        let deadline = Instant::now() + Duration::from_secs(60);
        while !path.exists() {
            if let Some(status) = self.child.try_wait().unwrap() {
                panic!("test --isolated exited early: {status}");
            }
            assert!(Instant::now() < deadline, "the runner never started");
            sleep(Duration::from_millis(20));
        }
        fs::read_to_string(path)
            .unwrap()
            .split_whitespace()
            .map(str::to_owned)
            .collect()
    }

    fn runner_pid(&self) -> Pid {
        let text = fs::read_to_string(self.project.dir.path().join("runner.pid")).unwrap();
        Pid::from_raw(text.trim().parse().unwrap())
    }

    fn wait(&mut self) -> ExitStatus {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(Instant::now() < deadline, "test --isolated did not exit");
            sleep(Duration::from_millis(20));
        }
    }

    /// No environment directory, no server answering on the URLs' ports, no runner.
    fn assert_nothing_left(&self, urls: &[String]) {
        let deadline = Instant::now() + Duration::from_secs(30);
        for url in urls {
            let port: u16 = url
                .rsplit(':')
                .next()
                .unwrap()
                .split('/')
                .next()
                .unwrap()
                .parse()
                .unwrap();
            while std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                assert!(
                    Instant::now() < deadline,
                    "a server still answers on port {port}"
                );
                sleep(Duration::from_millis(20));
            }
        }
        while alive(self.runner_pid()) {
            assert!(
                Instant::now() < deadline,
                "the test command is still running"
            );
            sleep(Duration::from_millis(20));
        }
        let left = self.project.run_envs();
        assert!(left.is_empty(), "left behind: {left:?}");
    }
}

fn alive(pid: Pid) -> bool {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    !stat.is_empty()
        && !stat
            .rsplit(')')
            .next()
            .unwrap_or("")
            .trim_start()
            .starts_with('Z')
}

fn query(url: &str) -> i32 {
    let mut c = postgres::Client::connect(url, postgres::NoTls).unwrap();
    c.query_one("SELECT 41 + 1", &[]).unwrap().get(0)
}

#[test]
fn the_exit_code_is_the_test_commands_and_everything_is_torn_down() {
    let mut run = Run::start(Some("3"));
    let urls = run.urls();
    assert_eq!(urls.len(), 2, "{urls:?}");
    assert!(
        urls[0].starts_with("postgres://") && urls[1].starts_with("redis://"),
        "{urls:?}"
    );
    assert_eq!(run.wait().code(), Some(3));
    run.assert_nothing_left(&urls);
}

#[test]
fn production_runs_only_against_an_explicit_shared_database() {
    let prod = "ENVIRONMENT=production\nDB_PROD_HOST=db.internal\nDB_PROD_NAME=app\nDB_PROD_USER=app\nDB_PROD_PASSWORD=Pr0d-pw-123\n";
    let project = Project::new(prod);
    let script = runner(project.dir.path());
    let run = || {
        project
            .cmd(&["test", "--isolated"])
            .env("CARGO", &script)
            .env("RUNNER_EXIT", "0")
            .output()
            .unwrap()
    };
    let out = run();
    assert!(!out.status.success());
    assert!(
        support::text(&out).contains("ISOENV_TEST_DATABASE_URL"),
        "{}",
        support::text(&out)
    );

    let shared = "postgres://tester:pw@127.0.0.1:1/shared_tests";
    project.write_env(&format!("{prod}ISOENV_TEST_DATABASE_URL={shared}\n"));
    let out = run();
    assert!(out.status.success(), "{}", support::text(&out));
    let urls = fs::read_to_string(project.dir.path().join("urls")).unwrap();
    assert_eq!(urls.trim(), shared, "the runner got the shared database");
    assert!(!project.state().exists(), "nothing was provisioned");
}

#[test]
fn sigint_tears_down_and_reports_the_interruption() {
    let mut run = Run::start(None);
    let urls = run.urls();
    assert_eq!(query(&urls[0]), 42, "the runner's database answers");
    kill(Pid::from_raw(run.child.id() as i32), Signal::SIGINT).unwrap();
    assert_eq!(run.wait().code(), Some(130));
    run.assert_nothing_left(&urls);
}

#[test]
fn sigkill_leaves_nothing_once_another_command_runs() {
    let mut run = Run::start(None);
    let urls = run.urls();
    assert_eq!(query(&urls[0]), 42);
    run.child.kill().unwrap();
    run.wait();
    // The next isoenv command collects what the dead run owned.
    let out = run.project.ok(&["db", "list"]);
    assert!(!out.contains("test-"), "{out}");
    run.assert_nothing_left(&urls);
}

/// `run` does for any command what `test` does for cargo: the databases exported, its exit
/// code passed through, everything torn down.
#[test]
fn run_gives_any_command_its_databases_and_passes_its_exit_code() {
    let project = Project::new("");
    let out_file = project.dir.path().join("answers");
    let script = format!(
        "psql \"$DATABASE_URL\" -tAc 'select 6*7' > {out} && \
         redis-cli --no-auth-warning -u \"$ISOENV_REDIS_URL\" ping >> {out} && exit 3",
        out = out_file.display()
    );
    let out = project
        .cmd(&[
            "run",
            "--isolated",
            "--engine",
            "postgres",
            "--engine",
            "redis",
            "--",
            "sh",
            "-c",
            &script,
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(3), "{}", support::text(&out));
    assert_eq!(
        fs::read_to_string(&out_file)
            .unwrap()
            .split_whitespace()
            .collect::<Vec<_>>(),
        ["42", "PONG"]
    );
    let left = project.run_envs();
    assert!(left.is_empty(), "left behind: {left:?}");
}

/// SIGTERM while the databases are still being made: everything made is removed, and the exit
/// code says which signal (143), as a shell would.
#[test]
fn sigterm_during_provisioning_exits_143_and_leaves_nothing() {
    let project = Project::new("");
    let script = runner(project.dir.path());
    let mut child = project
        .cmd(&[
            "test",
            "--isolated",
            "--engine",
            "mysql",
            "--engine",
            "postgres",
        ])
        .env("CARGO", &script)
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while project.run_envs().is_empty() {
        assert!(Instant::now() < deadline, "nothing was provisioned");
        sleep(Duration::from_millis(5));
    }
    kill(Pid::from_raw(child.id() as i32), Signal::SIGTERM).unwrap();
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(143));
    assert!(
        project.run_envs().is_empty(),
        "an environment outlived the run"
    );
}

/// A Python with pytest and psycopg (from PyPI, made once per target directory).
fn pytest_python() -> PathBuf {
    let venv = Path::new(env!("CARGO_TARGET_TMPDIR")).join("pytest-venv");
    let python = venv.join("bin/python");
    let ready = |python: &Path| {
        std::process::Command::new(python)
            .args(["-c", "import psycopg, pytest"])
            .status()
            .is_ok_and(|s| s.success())
    };
    if !ready(&python) {
        let made = std::process::Command::new("python3")
            .args(["-m", "venv", "--clear"])
            .arg(&venv)
            .status()
            .expect("python3 is needed for the pytest example");
        assert!(made.success(), "python3 -m venv failed (python3-venv)");
        let pip = std::process::Command::new(venv.join("bin/pip"))
            .args(["install", "-q", "pytest>=8", "psycopg[binary]>=3.1"])
            .status()
            .unwrap();
        assert!(pip.success(), "pip install pytest psycopg failed");
        assert!(ready(&python));
    }
    python
}

/// Runs `examples/pytest` (or a copy of it in `dir`) under `run --isolated --pool`.
fn pytest_example(dir: &Path) -> std::process::Output {
    let project = Project::new("");
    let mut cmd = project.cmd(&["run", "--isolated", "--pool", "--engine", "postgres", "--"]);
    cmd.arg(pytest_python())
        .args(["-m", "pytest", "-q", "-p", "no:cacheprovider"])
        .arg(dir)
        .env("ISOENV_MIGRATIONS_DIR", dir.join("migrations"))
        .current_dir(dir);
    cmd.output().unwrap()
}

/// The README's any-language protocol, as the shipped pytest example uses it: every test gets
/// a clean database of its own through psycopg, and a release that skips the reset (the
/// example's conftest with `dirty = false`) fails that same suite, so it does tell.
#[test]
fn pytest_gets_a_clean_database_per_test_through_the_sql_protocol() {
    let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/pytest");
    let out = pytest_example(&example);
    let said = support::text(&out);
    assert_eq!(out.status.code(), Some(0), "{said}");
    assert!(said.contains("26 passed"), "{said}");

    let broken = tempfile::tempdir().unwrap();
    for file in [
        "conftest.py",
        "test_shop.py",
        "migrations/postgres/001_shop.sql",
    ] {
        let to = broken.path().join(file);
        fs::create_dir_all(to.parent().unwrap()).unwrap();
        fs::copy(example.join(file), &to).unwrap();
    }
    let conftest = broken.path().join("conftest.py");
    let text = fs::read_to_string(&conftest).unwrap();
    assert!(text.contains("dirty = true"));
    fs::write(&conftest, text.replace("dirty = true", "dirty = false")).unwrap();
    let out = pytest_example(broken.path());
    let said = support::text(&out);
    assert_eq!(out.status.code(), Some(1), "{said}");
    assert!(said.contains("assert 2 == 1"), "{said}");
}

/// How many system-call filters the kernel applies to the server an environment's record
/// names (for the sandbox, its supervisor, which hands its filters down to the server).
fn seccomp_filters_of(state: &Path) -> usize {
    let record: serde_json::Value =
        serde_json::from_slice(&fs::read(state.join("state.json")).unwrap()).unwrap();
    let pid = record["process"]["pid"].as_i64().expect("a running server");
    let status = fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("Seccomp_filters:"))
        .and_then(|n| n.trim().parse().ok())
        .expect("the kernel reports seccomp filters")
}

/// A run's throwaway server does not wait for the disk (a filter answers its syncs, stacked on
/// the sandbox's own), and `--keep` starts it again as a permanent server, which does.
#[test]
fn a_runs_servers_skip_disk_syncs_and_kept_ones_do_not() {
    for backend in ["lightweight", "sandbox"] {
        let project = Project::new("");
        let seen = project.dir.path().join("seen");
        let linked = project.dir.path().join("linked");
        // The command reports the filters of the run's server while the run is on, and where
        // its data is.
        let script = format!(
            "for s in {state}/test-*; do \
               pid=$(sed -n 's/.*\"pid\": *\\([0-9]*\\).*/\\1/p' $s/state.json | head -1); \
               sed -n 's/^Seccomp_filters:[[:space:]]*//p' /proc/$pid/status; \
               readlink $s/data > {linked}; \
             done > {seen}",
            state = project.state().display(),
            seen = seen.display(),
            linked = linked.display()
        );
        let out = project
            .cmd(&[
                "run",
                "--isolated",
                "--keep",
                "--backend",
                backend,
                "--engine",
                "mysql",
                "--",
                "sh",
                "-c",
                &script,
            ])
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", support::text(&out));
        let during: usize = fs::read_to_string(&seen).unwrap().trim().parse().unwrap();
        let kept = project.run_envs();
        assert_eq!(kept.len(), 1, "{kept:?}");
        let after = seccomp_filters_of(&project.state().join(&kept[0]));
        assert_eq!(
            during,
            after + 1,
            "{backend}: {during} filters during the run, {after} once kept"
        );
        // A run's MariaDB keeps its data in memory (a sandboxed one sees it at the same path),
        // and a kept server on the disk, all of it: it answers its login (stored in the data).
        let linked = fs::read_to_string(&linked).unwrap();
        let linked = linked.trim();
        assert!(
            linked.starts_with("/dev/shm/isoenv-"),
            "{backend}: data linked to `{linked}`"
        );
        let data = project.state().join(&kept[0]).join("data");
        assert!(
            fs::symlink_metadata(&data).unwrap().is_dir(),
            "{backend}: kept data on disk"
        );
        assert!(!Path::new(linked).exists(), "{backend}: {linked} released");
        let info = project.json(&["db", "inspect", &kept[0], "--json"]);
        assert_eq!(info["status"], "running", "{backend}: {info}");
        let out = project.cmd(&["db", "destroy", &kept[0]]).output().unwrap();
        assert!(out.status.success(), "{}", support::text(&out));
    }
}
