//! The docker backend against the real Docker engine, for all three engines: isoenv's local
//! images (built once, then reused), real clients through the activate script, data kept by
//! stop/start, nothing left by destroy, a container removed behind isoenv's back, a killed
//! `create`, environments side by side, staging `up`/`down` and test runs, `DOCKER_HOST`, and
//! bad input. What isoenv made is checked with the docker CLI, independently of isoenv.

use std::io;
use std::net::{TcpListener, TcpStream};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::sync::Mutex;
use std::thread::sleep;
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde_json::Value;

mod support;
use support::{text, Project};

/// Builds the local images once per test binary (the command itself skips an image that is up
/// to date, so reruns cost a few milliseconds).
fn images() {
    static BUILT: Mutex<bool> = Mutex::new(false);
    let mut built = BUILT.lock().unwrap_or_else(|e| e.into_inner());
    if !*built {
        let p = Project::new("");
        let out = p.ok(&["image", "build", "postgres", "mysql", "redis"]);
        assert!(out.contains("isoenv/postgres:"), "{out}");
        *built = true;
    }
}

fn docker(args: &[&str]) -> String {
    let out = Command::new("docker").args(args).output().unwrap();
    assert!(out.status.success(), "docker {args:?}: {}", text(&out));
    String::from_utf8(out.stdout).unwrap()
}

/// Containers (all states) and volumes carrying isoenv's label for environment `env`.
fn made_for(env: &str) -> (Vec<String>, Vec<String>) {
    let label = format!("label=isoenv.env={env}");
    let lines = |s: String| s.lines().map(str::to_owned).collect::<Vec<_>>();
    (
        lines(docker(&["ps", "-a", "-q", "--filter", &label])),
        lines(docker(&["volume", "ls", "-q", "--filter", &label])),
    )
}

fn assert_nothing_left(p: &Project, env: &str) {
    assert_eq!(
        made_for(env),
        (vec![], vec![]),
        "containers/volumes of `{env}` left"
    );
    assert!(
        !p.state().join(env).exists(),
        "the directory of `{env}` is left"
    );
}

/// Runs `query` with the engine's own client in a shell that sourced the activate script;
/// `password` replaces the environment's.
fn client(p: &Project, env: &str, engine: &str, query: &str, password: Option<&str>) -> Output {
    // A wrong password replaces the exported one; `;` inside `${PW:+...}` would not
    // separate commands, so the override is its own statement.
    let (wrong, run) = match engine {
        "postgres" => (
            "export PGPASSFILE=/dev/null PGPASSWORD=\"$PW\"",
            "psql -w -tAc \"$Q\"",
        ),
        "mysql" => (
            "export DB_PASSWORD=\"$PW\"",
            "mariadb -h \"$MYSQL_HOST\" -P \"$MYSQL_TCP_PORT\" -u \"$DB_USER\" --password=\"$DB_PASSWORD\" -N -e \"$Q\"",
        ),
        _ => (
            "export REDISCLI_AUTH=\"$PW\"",
            "redis-cli --no-auth-warning -h \"$DB_HOST\" -p \"$DB_PORT\" $Q",
        ),
    };
    let wrong = if password.is_some() { wrong } else { ":" };
    let activate = p.state().join(env).join("bin/activate");
    Command::new("bash")
        .arg("-c")
        .arg(format!("source {}; {wrong}; {run}", activate.display()))
        .env("Q", query)
        .env("PW", password.unwrap_or(""))
        .env_remove("ISOENV_ACTIVE")
        .output()
        .unwrap()
}

fn answer(p: &Project, env: &str, engine: &str, query: &str) -> String {
    let out = client(p, env, engine, query, None);
    let reply = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    // redis-cli exits 0 on a server error; its reply says so.
    assert!(
        out.status.success() && !reply.starts_with("ERR") && !reply.contains("NOAUTH"),
        "{engine} `{query}`: {}",
        text(&out)
    );
    reply
}

fn inspect(p: &Project, env: &str) -> Value {
    p.json(&["db", "inspect", env, "--json"])
}

fn container_of(p: &Project, env: &str) -> String {
    inspect(p, env)["container"]["name"]
        .as_str()
        .unwrap()
        .to_owned()
}

/// (write, read, what the read returns) per engine.
fn queries(engine: &str) -> (&'static str, &'static str) {
    match engine {
        "postgres" => (
            "CREATE TABLE t (x int); INSERT INTO t VALUES (42)",
            "SELECT x FROM t",
        ),
        "mysql" => (
            "CREATE TABLE isoenv.t (x int); INSERT INTO isoenv.t VALUES (42)",
            "SELECT x FROM isoenv.t",
        ),
        _ => ("SET k 42", "GET k"),
    }
}

fn lifecycle(engine: &str) {
    images();
    let p = Project::new("");
    let env = format!("life-{engine}");
    let info = p.create(&env, engine, "docker");
    assert_eq!(info["backend"], "docker");
    assert_eq!(info["status"], "running");
    let name = info["container"]["name"].as_str().unwrap().to_owned();
    let volume = info["container"]["volume"].as_str().unwrap().to_owned();
    let port = info["port"].as_u64().unwrap();

    // Published on loopback only, at the port the record holds.
    let published = docker(&["port", &name]);
    let want = format!("127.0.0.1:{port}");
    assert!(published.lines().all(|l| l.ends_with(&want)), "{published}");
    let labels = docker(&["inspect", "--format", "{{json .Config.Labels}}", &name]);
    let labels: Value = serde_json::from_str(&labels).unwrap();
    assert_eq!(labels["isoenv.env"], env.as_str());
    assert_eq!(labels["isoenv.engine"], engine);

    let (write, read) = queries(engine);
    answer(&p, &env, engine, write);
    assert_eq!(answer(&p, &env, engine, read), "42");
    let wrong = client(&p, &env, engine, read, Some("wrong-password"));
    let reply = text(&wrong);
    // The client ran and the server refused it: each engine names the refusal.
    assert!(
        ["authentication failed", "Access denied", "WRONGPASS"]
            .iter()
            .any(|refusal| reply.contains(refusal)),
        "a wrong password was not refused: {reply}"
    );
    assert_ne!(
        String::from_utf8_lossy(&wrong.stdout).trim(),
        "42",
        "{reply}"
    );

    // The secrets reach the container as files bound from the environment's private
    // directory: Docker's record of the container holds none.
    let stored = std::fs::read_to_string(p.state().join(&env).join("credentials")).unwrap();
    let stored: Value = serde_json::from_str(&stored).unwrap();
    let password = stored["password"].as_str().unwrap();
    assert_eq!(password.len(), 32);
    let record = docker(&["inspect", &name]);
    assert!(
        !record.contains(password),
        "docker inspect shows the password"
    );
    let files = p.state().join(&env).join("container");
    assert!(
        record.contains(&files.display().to_string()),
        "no file bound from {}: {record}",
        files.display()
    );
    assert_eq!(
        std::fs::metadata(&files).unwrap().permissions().mode() & 0o777,
        0o700
    );
    for file in std::fs::read_dir(&files).unwrap().flatten() {
        let meta = file.metadata().unwrap();
        assert_eq!(
            (meta.uid(), meta.permissions().mode() & 0o777),
            (999, 0o400),
            "{}: not the container's service uid's alone",
            file.path().display()
        );
    }

    // The limits of the manifest, as Docker applied them.
    let limits = inspect(&p, &env)["isolation"]["limits"].clone();
    for limit in limits.as_array().unwrap() {
        assert_eq!(limit["enforced"], true, "{limit}");
    }
    let memory = docker(&["inspect", "--format", "{{.HostConfig.Memory}}", &name]);
    assert_eq!(memory.trim(), (512u64 << 20).to_string());

    p.ok(&["db", "stop", &env]);
    assert_eq!(inspect(&p, &env)["status"], "stopped");
    let running = docker(&["inspect", "--format", "{{.State.Running}}", &name]);
    assert_eq!(running.trim(), "false");
    p.ok(&["db", "start", &env]);
    assert_eq!(inspect(&p, &env)["status"], "running");
    assert_eq!(
        inspect(&p, &env)["port"].as_u64(),
        Some(port),
        "an activated shell stays right: the port is kept across starts"
    );
    assert_eq!(
        answer(&p, &env, engine, read),
        "42",
        "the data survives stop/start"
    );

    let logs = p.ok(&["db", "logs", &env, "-n", "5"]);
    assert!(!logs.trim().is_empty());

    p.ok(&["db", "destroy", &env]);
    assert_nothing_left(&p, &env);
    assert!(
        docker(&["volume", "ls", "-q"]).lines().all(|v| v != volume),
        "volume {volume} left"
    );
}

macro_rules! per_engine {
    ($($name:ident: $engine:literal),*) => {$(
        #[test]
        fn $name() {
            lifecycle($engine);
        }
    )*};
}

per_engine! {
    postgres_lifecycle: "postgres",
    mysql_lifecycle: "mysql",
    redis_lifecycle: "redis"
}

#[test]
fn a_container_removed_behind_isoenvs_back_is_reported_and_made_again() {
    images();
    let p = Project::new("");
    let env = "gone-pg";
    p.create(env, "postgres", "docker");
    let (write, read) = queries("postgres");
    answer(&p, env, "postgres", write);
    let name = container_of(&p, env);

    docker(&["rm", "-f", &name]);
    assert_eq!(inspect(&p, env)["status"], "missing");
    let list = p.ok(&["db", "list"]);
    assert!(list.contains("missing"), "{list}");
    let out = p.run(&["db", "start", env]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("data kept"), "{}", text(&out));
    assert_eq!(answer(&p, env, "postgres", read), "42");

    let volume = inspect(&p, env)["container"]["volume"]
        .as_str()
        .unwrap()
        .to_owned();
    docker(&["rm", "-f", &name]);
    docker(&["volume", "rm", &volume]);
    let out = p.run(&["db", "start", env]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("data is lost"), "{}", text(&out));
    let gone = client(&p, env, "postgres", read, None);
    assert!(text(&gone).contains("does not exist"), "{}", text(&gone));
    p.ok(&["db", "destroy", env]);
    assert_nothing_left(&p, env);
}

#[test]
fn a_killed_create_is_collected() {
    images();
    let p = Project::new("");
    let env = "killed-pg";
    let mut child = p
        .cmd(&[
            "db",
            "create",
            env,
            "--engine",
            "postgres",
            "--backend",
            "docker",
        ])
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let filter = format!("label=isoenv.env={env}");
    let deadline = Instant::now() + Duration::from_secs(60);
    while docker(&["ps", "-a", "-q", "--filter", &filter])
        .trim()
        .is_empty()
    {
        assert!(
            child.try_wait().unwrap().is_none(),
            "create finished before it was killed"
        );
        assert!(Instant::now() < deadline, "no container appeared");
        sleep(Duration::from_millis(5));
    }
    kill(Pid::from_raw(child.id() as i32), Signal::SIGKILL).unwrap();
    child.wait().unwrap();
    assert!(
        p.state().join(env).exists(),
        "the half-made environment is there to collect"
    );
    let out = p.ok(&["db", "gc"]);
    assert!(out.contains(env), "{out}");
    assert_nothing_left(&p, env);
}

#[test]
fn environments_of_one_engine_run_side_by_side() {
    images();
    let p = Project::new("");
    let names = ["side-a", "side-b"];
    let children: Vec<_> = names
        .iter()
        .map(|n| {
            p.cmd(&[
                "db",
                "create",
                n,
                "--engine",
                "redis",
                "--backend",
                "docker",
                "--json",
            ])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
        })
        .collect();
    let infos: Vec<Value> = children
        .into_iter()
        .map(|c| {
            let out = c.wait_with_output().unwrap();
            assert!(out.status.success(), "{}", text(&out));
            serde_json::from_slice(&out.stdout).unwrap()
        })
        .collect();
    assert_ne!(infos[0]["port"], infos[1]["port"]);
    assert_ne!(infos[0]["container"]["name"], infos[1]["container"]["name"]);
    assert_ne!(
        infos[0]["container"]["volume"],
        infos[1]["container"]["volume"]
    );
    answer(&p, names[0], "redis", "SET who a");
    answer(&p, names[1], "redis", "SET who b");
    assert_eq!(answer(&p, names[0], "redis", "GET who"), "a");
    assert_eq!(answer(&p, names[1], "redis", "GET who"), "b");
    for n in names {
        p.ok(&["db", "destroy", n]);
        assert_nothing_left(&p, n);
    }
}

#[test]
fn staging_up_runs_a_container_and_down_removes_it() {
    images();
    let p = Project::new("ENVIRONMENT=staging\n");
    let up = p.ok(&["db", "up"]);
    assert!(up.contains("(docker)"), "{up}");
    let status = p.ok(&["db", "status"]);
    assert!(
        status.contains("ok   container") && status.contains("answers"),
        "{status}"
    );
    let again = p.ok(&["db", "up"]);
    assert!(again.starts_with("already up"), "{again}");
    assert_eq!(answer(&p, "staging", "postgres", "SELECT 1"), "1");
    let down = p.ok(&["db", "down"]);
    assert!(down.contains("removed `staging`"), "{down}");
    assert_nothing_left(&p, "staging");
}

/// A stand-in test command: writes the environment and Redis URL it got, then exits with
/// $RUNNER_EXIT or waits.
fn runner(dir: &Path) -> std::path::PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let script = dir.join("runner.sh");
    std::fs::write(
        &script,
        format!(
            "#!/bin/sh\necho \"$ISOENV_ACTIVE $ISOENV_REDIS_URL\" > {d}/url.tmp && mv {d}/url.tmp {d}/url\n\
             [ -n \"$RUNNER_EXIT\" ] && exit \"$RUNNER_EXIT\"\nexec sleep 300\n",
            d = dir.display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
    script
}

#[test]
fn staging_test_runs_get_containers_that_go_with_the_run_even_on_sigkill() {
    images();
    let p = Project::new("ENVIRONMENT=staging\n");
    let script = runner(p.dir.path());
    let run = |exit: Option<&str>| {
        let mut cmd = p.cmd(&["test", "--isolated", "--engine", "redis", "--", "ARG"]);
        cmd.env("CARGO", &script).stderr(Stdio::null());
        if let Some(code) = exit {
            cmd.env("RUNNER_EXIT", code);
        }
        cmd.spawn().unwrap()
    };

    let status = run(Some("3")).wait().unwrap();
    assert_eq!(status.code(), Some(3), "the test command's exit code");
    let got = std::fs::read_to_string(p.dir.path().join("url")).unwrap();
    let (env, url) = got.trim().split_once(' ').unwrap();
    assert!(url.starts_with("redis://"), "{got}");
    assert!(env.starts_with("test-"), "{got}");
    assert_nothing_left(&p, env);

    std::fs::remove_file(p.dir.path().join("url")).unwrap();
    let mut child = run(None);
    let deadline = Instant::now() + Duration::from_secs(60);
    while !p.dir.path().join("url").exists() {
        assert!(child.try_wait().unwrap().is_none(), "the run ended early");
        assert!(Instant::now() < deadline, "the runner never started");
        sleep(Duration::from_millis(20));
    }
    let envs = p.run_envs();
    assert_eq!(envs.len(), 1, "{envs:?}");
    let (containers, volumes) = made_for(&envs[0]);
    assert_eq!((containers.len(), volumes.len()), (1, 1));
    kill(Pid::from_raw(child.id() as i32), Signal::SIGKILL).unwrap();
    child.wait().unwrap();
    // The container outlives the run (no sidecar); the next isoenv command reaps it.
    p.ok(&["db", "list"]);
    assert_nothing_left(&p, &envs[0]);
}

/// `--keep` in staging: the run's container and volume still carry its owner's label (Docker's
/// labels cannot change), but the kept environment's record has no owner, so `db gc` after the
/// run leaves them alone; `db destroy` removes them.
#[test]
fn a_kept_staging_environment_outlives_its_run() {
    images();
    let p = Project::new("ENVIRONMENT=staging\n");
    let script = runner(p.dir.path());
    let out = p
        .cmd(&[
            "test",
            "--isolated",
            "--keep",
            "--engine",
            "redis",
            "--",
            "ARG",
        ])
        .env("CARGO", &script)
        .env("RUNNER_EXIT", "0")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let envs = p.run_envs();
    assert_eq!(envs.len(), 1, "{envs:?}");
    let env = &envs[0];
    // The run's process is gone: `gc` collects what dead owners left.
    p.ok(&["db", "gc"]);
    let (containers, volumes) = made_for(env);
    assert_eq!(
        (containers.len(), volumes.len()),
        (1, 1),
        "the kept environment was reaped"
    );
    answer(&p, env, "redis", "SET k v");
    p.ok(&["db", "destroy", env]);
    assert_nothing_left(&p, env);
}

/// Forwards a loopback TCP port to the local Docker socket: a "remote" engine for DOCKER_HOST.
fn tcp_engine() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for conn in listener.incoming().flatten() {
            let Ok(unix) = UnixStream::connect("/var/run/docker.sock") else {
                continue;
            };
            let pipe = |mut from: Box<dyn io::Read + Send>, mut to: Box<dyn io::Write + Send>| {
                std::thread::spawn(move || io::copy(&mut from, &mut to));
            };
            pipe(
                Box::new(conn.try_clone().unwrap()),
                Box::new(unix.try_clone().unwrap()),
            );
            pipe(Box::new(unix), Box::new(conn));
        }
    });
    port
}

#[test]
fn docker_host_is_honoured_and_recorded() {
    images();
    let p = Project::new("");
    let env = "remote-redis";
    let host = format!("tcp://127.0.0.1:{}", tcp_engine());
    let with_host = |args: &[&str]| p.cmd(args).env("DOCKER_HOST", &host).output().unwrap();
    let out = with_host(&[
        "db",
        "create",
        env,
        "--engine",
        "redis",
        "--backend",
        "docker",
    ]);
    assert!(out.status.success(), "{}", text(&out));
    answer(&p, env, "redis", "SET k v");

    // Without DOCKER_HOST the environment is not silently looked for on another engine.
    let mut local = p.cmd(&["db", "stop", env]);
    local.env_remove("DOCKER_HOST");
    let out = local.output().unwrap();
    assert!(!out.status.success());
    assert!(
        text(&out).contains(&format!("DOCKER_HOST={host}")),
        "{}",
        text(&out)
    );

    let out = with_host(&["db", "destroy", env]);
    assert!(out.status.success(), "{}", text(&out));
    assert_nothing_left(&p, env);
}

#[test]
fn bad_input_is_explained_and_leaves_nothing() {
    images();
    let p = Project::new("");
    let env = "bad-input";
    let create = |extra: &[&str]| {
        let mut args = vec![
            "db",
            "create",
            env,
            "--engine",
            "postgres",
            "--backend",
            "docker",
        ];
        args.extend(extra);
        p.cmd(&args).env_remove("DOCKER_HOST").output().unwrap()
    };

    let out = create(&["--image", "isoenv/postgres:0-local"]);
    assert!(!out.status.success());
    assert!(
        text(&out).contains("cargo xtask image build postgres"),
        "{}",
        text(&out)
    );
    assert_nothing_left(&p, env);

    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port().to_string();
    let out = create(&["--port", &port]);
    assert!(!out.status.success());
    assert!(text(&out).contains("port"), "{}", text(&out));
    assert_nothing_left(&p, env);
    // The port was never answered by anything but its owner.
    drop(TcpStream::connect(taken.local_addr().unwrap()).unwrap());

    let out = p
        .cmd(&[
            "db",
            "create",
            env,
            "--engine",
            "redis",
            "--backend",
            "docker",
        ])
        .env("DOCKER_HOST", "unix:///nonexistent/docker.sock")
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        text(&out).contains("start the Docker daemon"),
        "{}",
        text(&out)
    );
    assert_nothing_left(&p, env);
}

/// The database superuser in a container, tried as in `isolation.rs`: PostgreSQL's own file
/// functions see the container's process (not root, no capabilities, no_new_privs, Docker's
/// seccomp filter) and none of the host's files; MariaDB writes files only in its own
/// directory; Redis cannot be told to write elsewhere. A wrong password is refused by every
/// engine (see `lifecycle`).
#[test]
fn a_containers_superuser_is_confined() {
    images();
    let p = Project::new("");
    for engine in ["postgres", "mysql", "redis"] {
        let env = format!("confined-{engine}");
        p.create(&env, engine, "docker");
    }
    let marker = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(marker.path(), "host secret").unwrap();
    let status = answer(
        &p,
        "confined-postgres",
        "postgres",
        "SELECT pg_read_file('/proc/self/status')",
    );
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .map(|v| v.trim().to_owned())
            .unwrap_or_else(|| panic!("{name} in {status}"))
    };
    assert!(!field("Uid:").starts_with("0\t"), "{}", field("Uid:"));
    assert_eq!(field("CapEff:"), "0000000000000000");
    assert_eq!(field("NoNewPrivs:"), "1");
    assert_eq!(field("Seccomp:"), "2");
    let host_file = client(
        &p,
        "confined-postgres",
        "postgres",
        &format!("SELECT pg_read_file('{}')", marker.path().display()),
        None,
    );
    assert!(
        text(&host_file).contains("No such file or directory"),
        "{}",
        text(&host_file)
    );

    let outfile = client(
        &p,
        "confined-mysql",
        "mysql",
        "SELECT 42 INTO OUTFILE '/tmp/isoenv-outfile'",
        None,
    );
    assert!(
        text(&outfile).contains("secure-file-priv"),
        "{}",
        text(&outfile)
    );

    for config in ["CONFIG SET dir /tmp", "CONFIG SET dbfilename x.rdb"] {
        let reply = client(&p, "confined-redis", "redis", config, None);
        let said = String::from_utf8_lossy(&reply.stdout).to_string();
        assert!(
            said.contains("protected config"),
            "{config}: {}",
            text(&reply)
        );
    }
    for engine in ["postgres", "mysql", "redis"] {
        p.ok(&["db", "destroy", &format!("confined-{engine}")]);
    }
}
