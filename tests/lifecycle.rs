//! The lightweight backend end to end, for every engine, through the library API and real
//! clients: create, write, stop, start, read, crash, recover, destroy, and what must never happen.

mod common;

use std::fs;
use std::time::Duration;

use common::*;
use isoenv::backend::BackendKind;
use isoenv::backend::Status;
use isoenv::engine::EngineKind;
use isoenv::workspace::CreateOptions;
use isoenv::Error;

fn opts(name: &str, engine: EngineKind) -> CreateOptions {
    CreateOptions::server(name, engine, BackendKind::Lightweight)
}

fn password_of(sb: &Sandbox, name: &str) -> String {
    let creds: serde_json::Value =
        serde_json::from_slice(&fs::read(sb.ws.layout(name).credentials_file()).unwrap()).unwrap();
    creds["password"].as_str().unwrap().to_owned()
}

fn lifecycle(engine: EngineKind) {
    let sb = sandbox(&[]);
    let info = sb.ws.create(&opts("life", engine), &no_progress).unwrap();
    assert_eq!(info.status, Status::Running);
    let pid = info.pid.unwrap();
    let url = sb.ws.url("life").unwrap();
    let password = password_of(&sb, "life");
    assert!(
        wrong_password_refused(engine, &url, &password),
        "{engine}: a wrong password was accepted"
    );

    write(engine, &url, "kept");
    let stopped = sb.ws.stop("life").unwrap();
    assert_eq!(stopped.status, Status::Stopped);
    assert!(!pid_alive(pid), "{engine}: server still alive after stop");
    assert!(
        !port_open(info.port),
        "{engine}: port still open after stop"
    );

    let started = sb.ws.start("life", &no_progress).unwrap();
    assert_eq!(started.status, Status::Running);
    assert_eq!(started.port, info.port);
    assert_eq!(
        read(engine, &url),
        ["kept"],
        "{engine}: data lost across stop/start"
    );

    let pid = started.pid.unwrap();
    sb.ws.destroy("life").unwrap();
    assert!(!pid_alive(pid), "{engine}: server alive after destroy");
    assert!(!port_open(info.port), "{engine}: port open after destroy");
    assert!(!info.dir.exists(), "{engine}: directory left after destroy");
    assert_eq!(
        fs::read_dir(sb.root().join(".locks")).unwrap().count(),
        0,
        "lock left behind"
    );
}

/// One `#[test]` per engine for a scenario, so a failure names the engine.
macro_rules! per_engine {
    ($scenario:ident: $($test:ident => $engine:ident),+) => {
        $(#[test]
        fn $test() {
            $scenario(EngineKind::$engine);
        })+
    };
}

per_engine!(lifecycle: postgres_lifecycle => Postgres, mysql_lifecycle => Mysql, redis_lifecycle => Redis);

fn crash_and_recover(engine: EngineKind) {
    let sb = sandbox(&[]);
    let info = sb.ws.create(&opts("crashy", engine), &no_progress).unwrap();
    let url = sb.ws.url("crashy").unwrap();
    write(engine, &url, "before");
    // SIGKILL: no chance to clean up pid files, sockets or shared memory.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(info.pid.unwrap()),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while sb.ws.inspect("crashy").unwrap().status != Status::Crashed {
        assert!(
            std::time::Instant::now() < deadline,
            "{engine}: kill -9 never showed as crashed"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(sb.ws.list().unwrap()[0].status, Status::Crashed);
    let recovered = sb.ws.start("crashy", &no_progress).unwrap();
    assert_eq!(recovered.status, Status::Running);
    if engine != EngineKind::Redis {
        // Redis persists on shutdown or on its save schedule, not per write: a SIGKILL may lose
        // the last writes by design. The SQL engines must not.
        assert_eq!(read(engine, &url), ["before"]);
    }
    write(engine, &url, "after");
    sb.ws.destroy("crashy").unwrap();
}

per_engine!(crash_and_recover: postgres_crash_recovery => Postgres, mysql_crash_recovery => Mysql, redis_crash_recovery => Redis);

#[test]
fn ten_concurrent_creates_of_one_name_exactly_one_wins() {
    let sb = sandbox(&[]);
    let results: Vec<Result<_, Error>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..10)
            .map(|_| s.spawn(|| sb.ws.create(&opts("race", EngineKind::Redis), &no_progress)))
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let wins = results.iter().filter(|r| r.is_ok()).count();
    assert_eq!(wins, 1, "{results:?}");
    for r in &results {
        if let Err(e) = r {
            assert!(
                matches!(e, Error::Busy { .. } | Error::Exists { .. }),
                "unexpected: {e}"
            );
        }
    }
    assert_eq!(sb.ws.list().unwrap().len(), 1);
    sb.ws.destroy("race").unwrap();
}

#[test]
fn bad_names_are_rejected_and_create_nothing() {
    let sb = sandbox(&[]);
    for bad in [
        "",
        "..",
        "../escape",
        "a/b",
        "with space",
        &"x".repeat(49),
        ".hidden",
    ] {
        let err = sb
            .ws
            .create(&opts(bad, EngineKind::Redis), &no_progress)
            .unwrap_err();
        assert!(matches!(err, Error::InvalidName { .. }), "{bad:?}: {err}");
    }
    assert!(!sb.root().exists() || fs::read_dir(sb.root()).unwrap().count() == 0);
    assert!(!sb.dir.path().join("escape").exists());
}

#[test]
fn existing_name_and_taken_port_are_clear_errors_that_change_nothing() {
    let sb = sandbox(&[]);
    let first = sb
        .ws
        .create(&opts("one", EngineKind::Redis), &no_progress)
        .unwrap();
    let err = sb
        .ws
        .create(&opts("one", EngineKind::Postgres), &no_progress)
        .unwrap_err();
    assert!(matches!(err, Error::Exists { .. }), "{err}");
    assert_eq!(sb.ws.inspect("one").unwrap().engine, EngineKind::Redis);

    let taken = CreateOptions {
        port: Some(first.port),
        ..opts("two", EngineKind::Redis)
    };
    let err = sb.ws.create(&taken, &no_progress).unwrap_err();
    assert!(
        matches!(err, Error::PortTaken { port } if port == first.port),
        "{err}"
    );
    assert!(err.to_string().contains("--port"));
    assert!(!sb.root().join("two").exists());
    sb.ws.destroy("one").unwrap();
}

#[test]
fn a_missing_engine_names_the_install_command_and_leaves_nothing() {
    let sb = sandbox(&[("ISOENV_REDIS_BIN_DIR", "/nonexistent")]);
    let err = sb
        .ws
        .create(&opts("nobin", EngineKind::Redis), &no_progress)
        .unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, Error::EngineMissing { .. }), "{msg}");
    assert!(msg.contains("apt-get install -y redis-server"), "{msg}");
    assert!(!sb.root().join("nobin").exists());
}

#[test]
fn a_server_that_dies_on_start_leaves_no_directory_or_process() {
    // A real binary that reports a version and then fails as a server would.
    let bin = reachable_tempdir();
    let fake = bin.path().join("redis-server");
    fs::write(&fake, "#!/bin/sh\n[ \"$1\" = --version ] && { echo 'Redis server v=7.0.0'; exit 0; }\necho 'fatal: cannot start' >&2\nexit 1\n").unwrap();
    fs::set_permissions(&fake, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let sb = sandbox(&[("ISOENV_REDIS_BIN_DIR", bin.path().to_str().unwrap())]);
    let err = sb
        .ws
        .create(&opts("dies", EngineKind::Redis), &no_progress)
        .unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.contains("exited during start-up") && msg.contains("fatal: cannot start"),
        "{msg}"
    );
    assert!(!sb.root().join("dies").exists());
    assert_eq!(fs::read_dir(sb.root().join(".locks")).unwrap().count(), 0);
}

#[test]
fn env_only_environments_have_variables_and_no_server() {
    let sb = sandbox(&[]);
    let info = sb
        .ws
        .create(
            &CreateOptions {
                service: false,
                ..opts("vars", EngineKind::Postgres)
            },
            &no_progress,
        )
        .unwrap();
    assert_eq!((info.status, info.pid), (Status::EnvOnly, None));
    assert!(info.activate.exists());
    assert!(!port_open(info.port));
    let err = sb.ws.start("vars", &no_progress).unwrap_err();
    assert!(err.to_string().contains("env-only"), "{err}");
    sb.ws.destroy("vars").unwrap();
}

#[test]
fn secret_files_are_private() {
    use std::os::unix::fs::PermissionsExt;
    let sb = sandbox(&[]);
    sb.ws
        .create(&opts("priv", EngineKind::Postgres), &no_progress)
        .unwrap();
    let layout = sb.ws.layout("priv");
    for f in [
        layout.credentials_file(),
        layout.activate(),
        layout.dir.join("pgpass"),
    ] {
        let mode = fs::metadata(&f).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "{}", f.display());
    }
    let state = fs::read_to_string(layout.state_file()).unwrap();
    assert!(
        !state.contains(&password_of(&sb, "priv")),
        "state.json holds the password"
    );
    sb.ws.destroy("priv").unwrap();
}

#[test]
fn destroy_only_removes_what_isoenv_made() {
    let sb = sandbox(&[]);
    fs::create_dir_all(sb.root().join("mine/data")).unwrap();
    let err = sb.ws.destroy("mine").unwrap_err();
    assert!(matches!(err, Error::NotFound { .. }), "{err}");
    assert!(sb.root().join("mine/data").exists());

    let outside = reachable_tempdir();
    fs::write(outside.path().join("precious"), "x").unwrap();
    std::os::unix::fs::symlink(outside.path(), sb.root().join("link")).unwrap();
    assert!(sb.ws.destroy("link").is_err());
    assert!(outside.path().join("precious").exists());
}

#[test]
fn production_refuses_every_change() {
    let sb = sandbox(&[
        ("ENVIRONMENT", "production"),
        ("DB_PROD_HOST", "db.example"),
        ("DB_PROD_NAME", "app"),
        ("DB_PROD_USER", "app"),
        ("DB_PROD_PASSWORD", "pw"),
    ]);
    let results = [
        sb.ws
            .create(&opts("p", EngineKind::Postgres), &no_progress)
            .map(drop),
        sb.ws.start("p", &no_progress).map(drop),
        sb.ws.stop("p").map(drop),
        sb.ws.destroy("p"),
    ];
    for r in results {
        assert!(matches!(r, Err(Error::Production { .. })), "{r:?}");
    }
    assert!(!sb.root().exists());
}

/// `gc` removes environments whose owner died (and their servers) and what a killed create
/// left; it never touches unowned environments or directories isoenv did not make.
#[test]
fn gc_collects_only_what_dead_owners_left() {
    let sb = sandbox(&[]);
    let mut owner = std::process::Command::new("sleep")
        .arg("30")
        .spawn()
        .unwrap();
    let owner_id = isoenv::sys::process::ProcessId::of(owner.id() as i32).unwrap();
    let owned = sb
        .ws
        .create(
            &CreateOptions {
                owner: Some(owner_id),
                ..opts("owned", EngineKind::Redis)
            },
            &|_| {},
        )
        .unwrap();
    let kept = sb
        .ws
        .create(&opts("kept", EngineKind::Redis), &|_| {})
        .unwrap();
    assert_eq!(
        sb.ws.gc().unwrap(),
        Vec::<String>::new(),
        "the owner is alive"
    );

    let half = sb.root().join("half");
    fs::create_dir(&half).unwrap();
    fs::write(half.join(".creating"), "").unwrap();
    let foreign = sb.root().join("foreign");
    fs::create_dir(&foreign).unwrap();
    fs::write(foreign.join("precious"), "data").unwrap();

    owner.kill().unwrap();
    owner.wait().unwrap();
    assert_eq!(sb.ws.gc().unwrap(), ["half", "owned"]);
    assert!(
        !pid_alive(owned.pid.unwrap()),
        "the orphan's server was stopped"
    );
    assert!(pid_alive(kept.pid.unwrap()));
    assert!(
        foreign.join("precious").exists(),
        "a directory isoenv did not make is kept"
    );
    sb.ws.destroy("kept").unwrap();
}

/// A create leaves a spare copy of the cached data directory (made in the background); the
/// next create renames it into place instead of copying, and the environment works like any
/// other. A spare left half-made is not taken.
#[test]
fn the_next_create_takes_the_spare_data_directory() {
    use std::os::unix::fs::MetadataExt;
    let cache = reachable_tempdir();
    let sb = sandbox(&[("ISOENV_CACHE_DIR", cache.path().to_str().unwrap())]);
    sb.ws
        .create(&opts("first", EngineKind::Postgres), &no_progress)
        .unwrap();
    let spare = || -> Option<std::path::PathBuf> {
        fs::read_dir(cache.path())
            .ok()?
            .flatten()
            .filter_map(|key| fs::read_dir(key.path().join("spares")).ok())
            .flatten()
            .flatten()
            .find(|s| !s.file_name().to_string_lossy().starts_with('.'))
            .map(|s| s.path())
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let made = loop {
        if let Some(s) = spare() {
            break s;
        }
        assert!(std::time::Instant::now() < deadline, "no spare was made");
        std::thread::sleep(Duration::from_millis(20));
    };
    let (inode, owner) = fs::metadata(&made).map(|m| (m.ino(), m.uid())).unwrap();
    sb.ws
        .create(&opts("second", EngineKind::Postgres), &no_progress)
        .unwrap();
    let data = sb.root().join("second/data");
    assert_eq!(
        fs::metadata(&data).unwrap().ino(),
        inode,
        "the spare was not taken"
    );
    // With identities of their own (root), the spare was made for one, which the environment
    // that took it took over: the registry names the environment now.
    let state: serde_json::Value =
        serde_json::from_slice(&fs::read(sb.root().join("second/state.json")).unwrap()).unwrap();
    if nix::unistd::geteuid().is_root() {
        let id = state["identity"]
            .as_u64()
            .expect("as root, an identity of its own");
        assert_eq!(
            id,
            u64::from(owner),
            "the spare was made for another identity"
        );
        let holder = fs::read_to_string(format!("/var/lib/isoenv/identities/{id}")).unwrap();
        assert_eq!(holder, sb.root().join("second").display().to_string());
    }
    let url = sb.ws.url("second").unwrap();
    write(EngineKind::Postgres, &url, "from-a-spare");
    assert_eq!(read(EngineKind::Postgres, &url), ["from-a-spare"]);
    // The refill after the second create: wait for it, so nothing is copying when we leave.
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while spare().is_none() {
        assert!(
            std::time::Instant::now() < deadline,
            "no spare after the second create"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    for name in ["first", "second"] {
        sb.ws.destroy(name).unwrap();
    }
}

/// A destroy killed while it removed an environment's directory leaves it renamed aside
/// (never an environment without its record, which nothing would collect); `gc` finishes the
/// removal, but not one whose remover still runs.
#[test]
fn gc_finishes_removals_a_kill_interrupted() {
    let sb = sandbox(&[]);
    sb.ws
        .create(&opts("gone", EngineKind::Redis), &no_progress)
        .unwrap();
    sb.ws.destroy("gone").unwrap();
    let mut dead = std::process::Command::new("true").spawn().unwrap();
    dead.wait().unwrap();
    let killed = sb.root().join(format!(".removing-a-{}", dead.id()));
    let running = sb
        .root()
        .join(format!(".removing-b-{}", std::process::id()));
    for dir in [&killed, &running] {
        fs::create_dir_all(dir.join("data")).unwrap();
        fs::write(dir.join("data/file"), "x").unwrap();
    }
    sb.ws.gc().unwrap();
    assert!(!killed.exists(), "a killed removal was not finished");
    assert!(running.exists(), "a running removal was taken over");
    fs::remove_dir_all(&running).unwrap();
}
