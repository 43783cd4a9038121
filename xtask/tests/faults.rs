//! Faults injected on purpose: `db create` killed with SIGKILL at spread-out moments (each
//! engine, lightweight and sandbox, warm and cold cache), then one more command. Nothing may be
//! left: no process working in the project, no environment directory, no lock, no temporary
//! directory of a cache initialization, no cgroup. Bounded: a few dozen kills.

mod support;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::thread::sleep;
use std::time::{Duration, Instant};

use support::Project;

/// Processes whose working directory is under one of `dirs` (or was, and was deleted): servers
/// and initializers start in their environment's directory, and servers move into their data.
fn working_in(dirs: &[PathBuf]) -> Vec<String> {
    fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| {
            let pid: i32 = e.file_name().to_str()?.parse().ok()?;
            let cwd = fs::read_link(format!("/proc/{pid}/cwd")).ok()?;
            let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
            let zombie = stat.rsplit(')').next()?.trim_start().starts_with('Z');
            let cwd = PathBuf::from(cwd.to_string_lossy().trim_end_matches(" (deleted)"));
            let inside = dirs.iter().any(|d| cwd.starts_with(d));
            (inside && !zombie).then(|| format!("{pid} in {}", cwd.display()))
        })
        .collect()
}

/// The project's data directories in memory (a test run's servers keep their data in
/// `/dev/shm/isoenv-UID/KEY`, whose `env` names the environment), and any whose maker was
/// killed before it said whose it is.
fn in_memory(project: &Project) -> Vec<PathBuf> {
    let state = project.state();
    fs::read_dir(format!("/dev/shm/isoenv-{}", nix::unistd::geteuid()))
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .filter(|d| {
            fs::read_to_string(d.join("env"))
                .map_or(true, |env| Path::new(&env).starts_with(&state))
        })
        .collect()
}

fn cgroups_named(prefix: &str) -> Vec<String> {
    let out = Command::new("find")
        .args(["/sys/fs/cgroup", "-maxdepth", "6", "-type", "d", "-name"])
        .arg(format!("{prefix}*"))
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_owned)
        .collect()
}

/// A command of the project, with a cache of its own (so that a cold initialization can be
/// killed too; the process environment wins over `.env`).
fn cmd(project: &Project, args: &[&str]) -> Command {
    let mut c = project.cmd(args);
    c.env("ISOENV_CACHE_DIR", project.dir.path().join("cache"));
    c
}

/// Nothing answers on 127.0.0.1:`port` any more, within 10 s (`what` says whose it was).
fn assert_port_closes(port: u16, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
        assert!(
            Instant::now() < deadline,
            "a server still answers on {port}: {what}"
        );
        sleep(Duration::from_millis(20));
    }
}

/// Kills environment `name`'s recorded server with SIGKILL, as a crash would; its pid.
fn kill_9_server(project: &Project, name: &str) -> i32 {
    let pid = project.json(&["db", "inspect", name, "--json"])["pid"]
        .as_i64()
        .unwrap() as i32;
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    pid
}

/// Runs `cmd` (its output discarded) and kills it with SIGKILL after `delay_ms`.
fn kill_9_after(cmd: &mut Command, delay_ms: u64) {
    let mut child = cmd
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    sleep(Duration::from_millis(delay_ms));
    let _ = child.kill();
    let _ = child.wait();
}

/// `db create NAME` of `engine` in `backend`.
fn create(project: &Project, name: &str, engine: &str, backend: &str) -> Command {
    cmd(project, &support::create_args(name, engine, backend))
}

/// Everything the project's commands made is gone, once `db gc` has run. `names` is how its
/// environments' names begin (their cgroups are named after them; the tests of this file run
/// at once, each with names of its own).
fn assert_nothing_left(project: &Project, names: &str, what: &str) {
    let mut dirs = in_memory(project);
    dirs.push(fs::canonicalize(project.dir.path()).unwrap());
    let gc = cmd(project, &["db", "gc"]).output().unwrap();
    assert!(gc.status.success(), "{}", support::text(&gc));
    let memory = in_memory(project);
    assert!(memory.is_empty(), "{what}: data left in memory: {memory:?}");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let running = working_in(&dirs);
        if running.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: still running: {running:?}"
        );
        sleep(Duration::from_millis(50));
    }
    let state = project.state();
    let envs: Vec<String> = fs::read_dir(&state)
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| !n.starts_with('.'))
                .collect()
        })
        .unwrap_or_default();
    assert!(envs.is_empty(), "{what}: environments left: {envs:?}");
    let locks: Vec<_> = fs::read_dir(state.join(".locks"))
        .map(|d| d.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    assert!(locks.is_empty(), "{what}: locks left: {locks:?}");
    let temporary: Vec<_> = fs::read_dir(project.dir.path().join("cache"))
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with(".tmp-"))
                .collect()
        })
        .unwrap_or_default();
    assert!(
        temporary.is_empty(),
        "{what}: initializations left: {temporary:?}"
    );
    let cgroups = cgroups_named(&format!("isoenv-{names}"));
    assert!(cgroups.is_empty(), "{what}: cgroups left: {cgroups:?}");
    // The machine's registry of identities (as root) holds no claim of this project's.
    let claims: Vec<String> = fs::read_dir("/var/lib/isoenv/identities")
        .map(|d| {
            d.flatten()
                .filter_map(|e| fs::read_to_string(e.path()).ok())
                .filter(|holder| Path::new(holder).starts_with(&state))
                .collect()
        })
        .unwrap_or_default();
    assert!(claims.is_empty(), "{what}: identities left: {claims:?}");
}

#[test]
fn kill_9_at_any_moment_of_create_leaves_nothing_once_another_command_runs() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "the fault tests need root (the sandbox), as CI runs them"
    );
    let project = Project::new("");
    let mut kills = 0;
    for engine in ["postgres", "mysql", "redis"] {
        for backend in ["lightweight", "sandbox"] {
            // Cold first (the cache is empty until a create completes), then warm: the delays
            // spread over the whole create, from before anything exists to after the record.
            for (round, delay_ms) in [5u64, 40, 120, 300, 700].into_iter().enumerate() {
                let name = format!("fault-{engine}-{backend}-{round}");
                kill_9_after(&mut create(&project, &name, engine, backend), delay_ms);
                kills += 1;
                // The sandbox's servers have IPC of their own, gone with it.
                let segments = match backend {
                    "lightweight" => postgres_segments(project.dir.path()),
                    _ => Vec::new(),
                };
                // Whatever the moment, the next command leaves nothing of it behind; a create
                // that finished before the kill is removed by hand, as a user would.
                let _ = cmd(&project, &["db", "destroy", &name]).output();
                assert_nothing_left(
                    &project,
                    "fault-",
                    &format!("{name} killed after {delay_ms} ms"),
                );
                let left: Vec<i32> = segments
                    .into_iter()
                    .filter(|&id| segment_exists(id))
                    .collect();
                assert!(
                    left.is_empty(),
                    "{name} killed after {delay_ms} ms: the server's shared memory is left (System V ids {left:?})"
                );
            }
        }
    }
    assert_eq!(kills, 30);
}

/// The System V shared memory ids of the PostgreSQL servers whose data directories are under
/// `dir` (their `postmaster.pid`'s seventh line: key, id). A server that shuts down removes its
/// segment, and with it what it kept in `/dev/shm`; one killed with SIGKILL leaves both.
fn postgres_segments(dir: &Path) -> Vec<i32> {
    let mut ids = Vec::new();
    let mut dirs = vec![dir.to_owned()];
    while let Some(d) = dirs.pop() {
        for entry in fs::read_dir(&d).into_iter().flatten().flatten() {
            let path = entry.path();
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                dirs.push(path);
            } else if entry.file_name() == "postmaster.pid" {
                let text = fs::read_to_string(&path).unwrap_or_default();
                let id = text
                    .lines()
                    .nth(6)
                    .and_then(|l| l.split_whitespace().nth(1));
                ids.extend(id.and_then(|id| id.parse::<i32>().ok()));
            }
        }
    }
    ids
}

fn segment_exists(id: i32) -> bool {
    // SAFETY: IPC_STAT only writes the zeroed descriptor it is given.
    unsafe {
        let mut ds: libc::shmid_ds = std::mem::zeroed();
        libc::shmctl(id, libc::IPC_STAT, &mut ds) == 0
    }
}

/// A record that cannot be used (truncated, garbage, wrong types, an unknown field, another
/// schema) shows as broken with the reason; other verbs say how to fix it; `destroy` still
/// stops the server running in it and removes it.
#[test]
fn a_corrupted_record_is_shown_broken_and_destroy_still_cleans_up() {
    let project = Project::new("");
    type Corruption = fn(&str) -> String;
    let cases: [(&str, Corruption); 5] = [
        ("truncated", |s| s[..s.len() / 2].to_owned()),
        ("garbage", |_| "\u{1}\u{2}not json".to_owned()),
        ("types", |s| {
            s.replace("\"port\": ", "\"port\": \"x\", \"_p\": ")
        }),
        ("unknown", |s| s.replacen('{', "{\"surprise\": 1,", 1)),
        ("schema", |s| s.replace("\"schema\": 1", "\"schema\": 99")),
    ];
    for (name, corrupt) in cases {
        project.ok(&["db", "create", name, "--engine", "redis"]);
        let info = project.json(&["db", "inspect", name, "--json"]);
        let port = info["port"].as_u64().unwrap() as u16;
        let file = project.state().join(name).join("state.json");
        fs::write(&file, corrupt(&fs::read_to_string(&file).unwrap())).unwrap();

        let list = project.ok(&["db", "list"]);
        let row = list
            .lines()
            .find(|l| l.starts_with(name))
            .unwrap_or_default();
        assert!(
            row.contains("broken") && row.contains("state.json"),
            "{name}: {list}"
        );
        let listed = project.json(&["db", "list", "--json"]);
        assert!(
            listed
                .as_array()
                .unwrap()
                .iter()
                .any(|e| e["name"] == name && e["status"] == "broken"),
            "{name}: {listed}"
        );
        let refused = project.fails(&["db", "start", name]);
        assert!(
            refused.contains("record cannot be used"),
            "{name}: {refused}"
        );
        assert!(refused.contains("db destroy"), "{name}: {refused}");

        project.ok(&["db", "destroy", name]);
        assert!(!project.state().join(name).exists(), "{name}: still there");
        assert_port_closes(port, name);
    }
}

/// The state root deleted by hand while servers run: the next `db gc` finds them (they work in
/// a directory that no longer exists, or in data in memory that no environment links to),
/// stops them, removes what they left (cgroups, the data in memory), and says what it stopped.
#[test]
fn servers_of_a_deleted_state_root_are_found_and_stopped() {
    let project = Project::new("");
    let mut ports = Vec::new();
    for (name, backend) in [("orphan-a", "lightweight"), ("orphan-b", "sandbox")] {
        project.create(name, "redis", backend);
        let info = project.json(&["db", "inspect", name, "--json"]);
        ports.push(info["port"].as_u64().unwrap() as u16);
    }
    // A test run's server, its data in memory, outside the state root. Its command runs once
    // the server answers.
    let ready = project.dir.path().join("ready");
    let mut run = cmd(
        &project,
        &["run", "--isolated", "--engine", "mysql", "--", "sh", "-c"],
    )
    .arg(format!("touch {}; sleep 60", ready.display()))
    .current_dir(project.dir.path())
    .stdout(std::process::Stdio::null())
    .stderr(fs::File::create(project.dir.path().join("run.log")).unwrap())
    .spawn()
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while !ready.exists() {
        assert!(
            Instant::now() < deadline,
            "the test run did not start its command: {}",
            fs::read_to_string(project.dir.path().join("run.log")).unwrap_or_default()
        );
        sleep(Duration::from_millis(50));
    }
    let [memory] = &in_memory(&project)[..] else {
        panic!(
            "not one data directory in memory: {:?}",
            in_memory(&project)
        );
    };
    let memory = memory.clone();
    let name = memory.file_name().unwrap().to_string_lossy().into_owned();
    let record = project
        .state()
        .join(name.rsplit_once('-').unwrap().0)
        .join("state.json");
    let record: serde_json::Value =
        serde_json::from_str(&fs::read_to_string(record).unwrap()).unwrap();
    ports.push(record["port"].as_u64().unwrap() as u16);
    fs::remove_dir_all(project.state()).unwrap();
    let said = project.ok(&["db", "gc"]);
    assert!(said.contains("orphan-a was deleted"), "{said}");
    assert!(said.contains("orphan-b was deleted"), "{said}");
    // Any `db gc` of this user removes data in memory that no environment links to: another
    // test's (they run at once) may have come first.
    assert!(
        said.contains(&*memory.to_string_lossy()) || !memory.exists(),
        "{said}"
    );
    for port in ports {
        assert_port_closes(port, &said);
    }
    assert!(!memory.exists(), "{said}");
    let _ = run.kill();
    let _ = run.wait();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !cgroups_named("isoenv-orphan").is_empty() {
        assert!(
            Instant::now() < deadline,
            "cgroups left: {:?}",
            cgroups_named("isoenv-orphan")
        );
        project.ok(&["db", "gc"]);
        sleep(Duration::from_millis(100));
    }
}

/// `--port 0` used to make Redis wait a minute before failing, and a privileged port passed
/// through the root sandbox supervisor where lightweight refused it: both are refused up front,
/// for every backend, and nothing is made.
#[test]
fn ports_that_cannot_work_are_refused_up_front() {
    let project = Project::new("");
    for (port, backend, says) in [
        ("0", "lightweight", "0 is not a port"),
        ("0", "sandbox", "0 is not a port"),
        ("22", "sandbox", "privileged"),
        ("80", "lightweight", "privileged"),
    ] {
        let started = Instant::now();
        let err = project.fails(&[
            "db",
            "create",
            "p",
            "--engine",
            "redis",
            "--backend",
            backend,
            "--port",
            port,
        ]);
        assert!(err.contains(says), "{port} {backend}: {err}");
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "{port}: slow refusal"
        );
        assert!(!project.state().join("p").exists());
    }
}

/// A development Redis keeps what it acknowledged through a kill -9 of its server (an
/// append-only file), in the lightweight and sandbox backends; a sandboxed one used to lose
/// every key written since its last snapshot.
#[test]
fn a_development_redis_survives_kill_9_of_its_server() {
    let project = Project::new("");
    for (name, backend) in [("aof-l", "lightweight"), ("aof-s", "sandbox")] {
        project.create(name, "redis", backend);
        let activate = project.state().join(name).join("bin/activate");
        let redis = |script: &str| {
            let out = Command::new("bash")
                .arg("-c")
                .arg(format!(
                    "unset ISOENV_ACTIVE; . {}; {script}",
                    activate.display()
                ))
                .output()
                .unwrap();
            assert!(out.status.success(), "{}", support::text(&out));
            String::from_utf8_lossy(&out.stdout).trim().to_owned()
        };
        redis("for i in $(seq 1 1000); do echo \"SET k$i v$i\"; done | redis-cli > /dev/null");
        assert_eq!(redis("redis-cli dbsize"), "1000");
        // The server itself killed, as a crash would: the sandbox's whole pid namespace.
        kill_9_server(&project, name);
        let deadline = Instant::now() + Duration::from_secs(10);
        while project.json(&["db", "inspect", name, "--json"])["status"] == "running" {
            assert!(
                Instant::now() < deadline,
                "{name}: still running after kill -9"
            );
            sleep(Duration::from_millis(50));
        }
        project.ok(&["db", "start", name]);
        assert_eq!(redis("redis-cli dbsize"), "1000", "{name} lost writes");
        project.ok(&["db", "destroy", name]);
    }
}

/// `db start` issued while a killed server is still exiting used to say "running" and start
/// nothing (MariaDB, most often): it waits for the old one to go, then starts a new one.
#[test]
fn start_right_after_a_crash_starts_a_server() {
    let project = Project::new("");
    project.ok(&["db", "create", "crash", "--engine", "mysql"]);
    let activate = project.state().join("crash/bin/activate");
    for round in 0..5 {
        let pid = kill_9_server(&project, "crash");
        let said = project.ok(&["db", "start", "crash"]);
        assert!(said.starts_with("started"), "round {round}: {said}");
        let info = project.json(&["db", "inspect", "crash", "--json"]);
        assert_eq!(info["status"], "running", "round {round}");
        assert_ne!(info["pid"].as_i64(), Some(i64::from(pid)), "round {round}");
        let out = Command::new("bash")
            .arg("-c")
            .arg(format!(
                "unset ISOENV_ACTIVE; . {}; mariadb -N -e 'select 42'",
                activate.display()
            ))
            .output()
            .unwrap();
        assert_eq!(
            String::from_utf8_lossy(&out.stdout).trim(),
            "42",
            "round {round}: {}",
            support::text(&out)
        );
    }
    project.ok(&["db", "destroy", "crash"]);
}

/// A full disk during the first initialization used to show only the engine's own last words
/// ("PANIC: cannot abort transaction"): it is named, with the path and the fix, and nothing is
/// left half-made. The small disk is a tmpfs in a mount namespace of the command's own, so it
/// goes with it whatever happens.
#[test]
fn a_full_disk_during_the_first_initialization_says_so_and_leaves_nothing() {
    let project = Project::new("");
    let cache = project.dir.path().join("tiny");
    fs::create_dir(&cache).unwrap();
    let create = project.cmd(&["db", "create", "full", "--engine", "postgres"]);
    let mut unshare = Command::new("unshare");
    unshare
        .args(["--mount", "--propagation", "private", "sh", "-c"])
        .arg(
            "mount -t tmpfs -o size=6m,mode=0755 tmpfs \"$0\" || exit 99\n\
             ISOENV_CACHE_DIR=\"$0\" \"$@\"; code=$?\n\
             echo \"left: $(ls -A \"$0\" | grep '^.tmp-')\"; exit $code",
        )
        .arg(&cache)
        .arg(create.get_program())
        .args(create.get_args());
    for (key, value) in create.get_envs() {
        match value {
            Some(value) => unshare.env(key, value),
            None => unshare.env_remove(key),
        };
    }
    let out = unshare.output().unwrap();
    let said = support::text(&out);
    assert_ne!(
        out.status.code(),
        Some(99),
        "mounting a small tmpfs (needs root): {said}"
    );
    assert!(!out.status.success(), "{said}");
    assert!(said.contains("is full"), "{said}");
    assert!(said.contains("ISOENV_CACHE_DIR"), "{said}");
    assert!(
        said.contains("left: \n"),
        "a half-made initialization was left: {said}"
    );
    assert!(!project.state().join("full").exists());
}

/// SIGKILL at spread-out moments of `db start` (each engine, lightweight and sandbox): the next
/// `db start` brings the environment up, whatever the killed one had spawned, and `destroy`
/// then leaves nothing.
#[test]
fn kill_9_at_any_moment_of_start_then_start_works_and_destroy_leaves_nothing() {
    let project = Project::new("");
    for engine in ["postgres", "mysql", "redis"] {
        for backend in ["lightweight", "sandbox"] {
            let name = format!("kstart-{engine}-{backend}");
            let made = create(&project, &name, engine, backend).output().unwrap();
            assert!(made.status.success(), "{}", support::text(&made));
            for delay_ms in [5u64, 30, 80, 200] {
                let what = format!("{name}: start killed after {delay_ms} ms");
                let stop = cmd(&project, &["db", "stop", &name]).output().unwrap();
                assert!(stop.status.success(), "{what}: {}", support::text(&stop));
                kill_9_after(&mut cmd(&project, &["db", "start", &name]), delay_ms);
                let start = cmd(&project, &["db", "start", &name]).output().unwrap();
                assert!(start.status.success(), "{what}: {}", support::text(&start));
                let url = cmd(&project, &["db", "url", &name]).output().unwrap();
                let status = cmd(&project, &["db", "inspect", &name, "--json"])
                    .output()
                    .unwrap();
                let status: serde_json::Value = serde_json::from_slice(&status.stdout).unwrap();
                assert_eq!(status["status"], "running", "{what}: {status}");
                assert!(url.status.success(), "{what}");
            }
            // The moment that matters, made on purpose: a server running that the record
            // does not name (spawned, then the command killed before it wrote the pid).
            let record = project.state().join(&name).join("state.json");
            let mut state: serde_json::Value =
                serde_json::from_slice(&fs::read(&record).unwrap()).unwrap();
            let stray = state["process"]["pid"].as_i64().unwrap();
            state["process"] = serde_json::Value::Null;
            fs::write(&record, serde_json::to_vec(&state).unwrap()).unwrap();
            let start = cmd(&project, &["db", "start", &name]).output().unwrap();
            assert!(start.status.success(), "{name}: {}", support::text(&start));
            let now = cmd(&project, &["db", "inspect", &name, "--json"])
                .output()
                .unwrap();
            let now: serde_json::Value = serde_json::from_slice(&now.stdout).unwrap();
            assert_eq!(now["status"], "running", "{name}: {now}");
            assert_ne!(now["pid"].as_i64(), Some(stray), "{name}: {now}");
            let stray_alive = fs::read_to_string(format!("/proc/{stray}/stat")).is_ok_and(|s| {
                !s.rsplit(')')
                    .next()
                    .unwrap_or("")
                    .trim_start()
                    .starts_with('Z')
            });
            assert!(
                !stray_alive,
                "{name}: the unrecorded server {stray} still runs"
            );
            // And destroy finds one too.
            fs::write(&record, serde_json::to_vec(&state).unwrap()).unwrap();
            let gone = cmd(&project, &["db", "destroy", &name]).output().unwrap();
            assert!(gone.status.success(), "{}", support::text(&gone));
            assert_nothing_left(&project, "kstart-", &name);
        }
    }
}

/// SIGKILL at spread-out moments of `run --isolated` (each engine, lightweight and sandbox):
/// while it provisions, while the command runs, while it tears down. The next isoenv command
/// removes what the dead run owned, and its command dies with it.
#[test]
fn kill_9_at_any_moment_of_a_test_run_leaves_nothing_once_another_command_runs() {
    let project = Project::new("");
    for engine in ["postgres", "mysql", "redis"] {
        for backend in ["lightweight", "sandbox"] {
            for delay_ms in [20u64, 150, 400, 1200] {
                let what =
                    format!("run --isolated ({engine}, {backend}) killed after {delay_ms} ms");
                kill_9_after(
                    cmd(
                        &project,
                        &[
                            "run",
                            "--isolated",
                            "--engine",
                            engine,
                            "--backend",
                            backend,
                            "--",
                            "sh",
                            "-c",
                            "sleep 0.3",
                        ],
                    )
                    .current_dir(project.dir.path()),
                    delay_ms,
                );
                assert_nothing_left(&project, "test-", &what);
            }
        }
    }
}

/// A sandboxed server the kernel's OOM killer ends used to leave only "Killed" (or PostgreSQL's
/// "terminated by signal 9"): the server's log says the OOM killer did it, the limit, and where
/// to raise it.
#[test]
fn an_out_of_memory_kill_in_the_sandbox_names_the_limit() {
    let project = Project::new("");
    project.create("hungry", "redis", "sandbox");
    project.ok(&["db", "stop", "hungry"]);
    let manifest = project.state().join("hungry/manifest.json");
    let mut m: serde_json::Value = serde_json::from_slice(&fs::read(&manifest).unwrap()).unwrap();
    m["limits"]["memory"] = "32M".into();
    fs::write(&manifest, serde_json::to_vec(&m).unwrap()).unwrap();
    project.ok(&["db", "start", "hungry"]);
    let url = project.ok(&["db", "url", "hungry"]);
    // 300 MiB of values, far past the limit.
    let fill = Command::new("redis-cli")
        .args(["--no-auth-warning", "-u", url.trim(), "eval"])
        .arg("for i = 1, 300 do redis.call('SET', 'k' .. i, string.rep('x', 1048576)) end")
        .arg("0")
        .output()
        .unwrap();
    assert!(
        !String::from_utf8_lossy(&fill.stdout).contains("OK"),
        "{}",
        support::text(&fill)
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    let logs = loop {
        let logs = project.ok(&["db", "logs", "hungry"]);
        if logs.contains("OOM killer") || Instant::now() > deadline {
            break logs;
        }
        sleep(Duration::from_millis(100));
    };
    assert!(
        logs.contains("OOM killer") && logs.contains("memory limit of 32M"),
        "{logs}"
    );
    assert!(logs.contains(&manifest.display().to_string()), "{logs}");
    project.ok(&["db", "destroy", "hungry"]);
    assert!(cgroups_named("isoenv-hungry").is_empty());
}
