//! Isolation tried as an attacker would: the database superuser runs native code (a small C
//! extension, `probe/isoenv_probe.c`, built here against the installed server's headers) or
//! file-writing SQL, and each probe must fail to get through. Needs root, like the sandbox.

mod support;

use std::ffi::CString;
use std::fs;
use std::net::TcpListener;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::thread::sleep;
use std::time::Duration;

use serde_json::{json, Value};
use support::{text, Project};
use tempfile::TempDir;

/// The probe extension, built in a directory every server user can read.
fn probe_library() -> (TempDir, PathBuf) {
    let dir = tempfile::Builder::new()
        .prefix("isoenv-probe-")
        .tempdir()
        .unwrap();
    fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755)).unwrap();
    let include = Command::new("pg_config")
        .arg("--includedir-server")
        .output()
        .expect("pg_config (postgresql-server-dev) builds the probe extension");
    assert!(include.status.success(), "{}", text(&include));
    let source = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/probe/isoenv_probe.c");
    let library = dir.path().join("isoenv_probe.so");
    let out = Command::new("gcc")
        .args(["-shared", "-fPIC", "-O1", "-o"])
        .arg(&library)
        .arg(format!(
            "-I{}",
            String::from_utf8_lossy(&include.stdout).trim()
        ))
        .arg(&source)
        .output()
        .unwrap();
    assert!(out.status.success(), "building the probe: {}", text(&out));
    fs::set_permissions(&library, fs::Permissions::from_mode(0o755)).unwrap();
    (dir, library)
}

/// A PostgreSQL environment whose superuser has loaded the probe.
struct Target<'a> {
    project: &'a Project,
    name: String,
}

impl<'a> Target<'a> {
    /// Creates it with `cmd` (so the test decides what the creating process holds), grants the
    /// sandbox read access to the probe, and loads it.
    fn create(project: &'a Project, name: &str, backend: &str, library: &Path) -> Self {
        assert!(
            nix::unistd::geteuid().is_root(),
            "the isolation probes need root (as CI runs them; rootless ones run as nobody)"
        );
        let t = Target {
            project,
            name: name.into(),
        };
        if backend == "sandbox" {
            project.ok(&["db", "stop", name]);
            let file = project.state().join(name).join("manifest.json");
            let mut m: Value = serde_json::from_slice(&fs::read(&file).unwrap()).unwrap();
            m["fs"].as_array_mut().unwrap().push(json!({
                "host": library.parent().unwrap(), "mode": "ro"
            }));
            fs::write(&file, serde_json::to_string_pretty(&m).unwrap()).unwrap();
            project.ok(&["db", "start", name]);
        }
        let mut c = t.client();
        for (function, args) in [
            ("isoenv_probe_reconnect", "int"),
            ("isoenv_probe_userns", ""),
            ("isoenv_probe_key", "text"),
            ("isoenv_probe_fds", ""),
        ] {
            c.batch_execute(&format!(
                "CREATE FUNCTION {function}({args}) RETURNS text AS '{}' LANGUAGE C STRICT",
                library.display()
            ))
            .unwrap();
        }
        t
    }

    fn client(&self) -> postgres::Client {
        let url = self.project.ok(&["db", "url", &self.name]);
        postgres::Client::connect(url.trim(), postgres::NoTls).unwrap()
    }

    fn ask(&self, sql: &str) -> String {
        self.client().query_one(sql, &[]).unwrap().get(0)
    }
}

fn create_cmd(project: &Project, name: &str, backend: &str) -> Command {
    let mut cmd = project.bare_cmd(&[
        "db",
        "create",
        name,
        "--engine",
        "postgres",
        "--backend",
        backend,
    ]);
    cmd.env_remove("ISOENV_ACTIVE");
    cmd
}

/// The finding: a sandboxed server's accepted connections are sockets of the host's network,
/// so native code could disconnect one and connect it to any port on the host's loopback. Tried
/// rootful and rootless (the sandbox in a user namespace of its own).
#[test]
fn a_sandboxed_server_cannot_point_a_host_socket_elsewhere_nor_unshare_nor_read_keys() {
    let (_dir, library) = probe_library();
    for project in [Project::new(""), Project::unprivileged("")] {
        project.create("escape", "postgres", "sandbox");
        let t = Target::create(&project, "escape", "sandbox", &library);
        // Something on the host's loopback that the server must never reach.
        let bait = TcpListener::bind("127.0.0.1:0").unwrap();
        bait.set_nonblocking(true).unwrap();
        let port = bait.local_addr().unwrap().port();

        let reply: Result<String, _> = t
            .client()
            .query_one(&format!("SELECT isoenv_probe_reconnect({port})"), &[])
            .map(|r| r.get(0));
        sleep(Duration::from_millis(300));
        assert!(
            bait.accept().is_err(),
            "the server connected to the host's 127.0.0.1:{port} (probe said {reply:?})"
        );
        let reply = reply.expect("a refused probe leaves the session intact");
        assert_eq!(reply, "disconnect refused: Operation not permitted");

        assert_eq!(
            t.ask("SELECT isoenv_probe_userns()"),
            "refused: Operation not permitted",
            "a new user namespace inside the sandbox"
        );
        assert_eq!(
            t.ask("SELECT isoenv_probe_key('anything')"),
            "not found: Operation not permitted",
            "the kernel's keyrings from inside the sandbox"
        );
        project.ok(&["db", "destroy", "escape"]);
    }
}

/// The finding: servers inherited the invoker's open descriptors (a directory one reaches the
/// whole filesystem through `/proc/self/fd`) and its session keyring.
#[test]
fn servers_start_with_nothing_of_the_invoker() {
    let (_dir, library) = probe_library();
    servers_start_with_nothing_of(&Project::new(""), &library);
    servers_start_with_nothing_of(&Project::unprivileged(""), &library);
}

/// Rootful, then as nobody (which its command becomes before it opens the directory and adds
/// the key, so that they are nobody's own).
fn servers_start_with_nothing_of(project: &Project, library: &Path) {
    let marker = tempfile::Builder::new()
        .prefix("isoenv-inherited-")
        .tempdir()
        .unwrap();
    let key = format!("isoenv-probe-{}", std::process::id());
    for backend in ["lightweight", "sandbox"] {
        let name = format!("clean-{backend}");
        let mut cmd = create_cmd(project, &name, backend);
        let user = project.user().map(|u| (u.uid.as_raw(), u.gid.as_raw()));
        if let Some((uid, gid)) = user {
            nix::unistd::chown(marker.path(), Some(uid.into()), Some(gid.into())).unwrap();
        }
        let dir = CString::new(marker.path().as_os_str().as_encoded_bytes()).unwrap();
        let (ty, desc, payload) = (c"user", CString::new(key.clone()).unwrap(), b"secret");
        // SAFETY: open, keyctl and add_key are async-signal-safe; the strings were made before.
        unsafe {
            cmd.pre_exec(move || {
                if let Some((uid, gid)) = user {
                    if libc::setgroups(0, std::ptr::null()) != 0
                        || libc::setresgid(gid, gid, gid) != 0
                        || libc::setresuid(uid, uid, uid) != 0
                    {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                // A descriptor without close-on-exec, as a shell's `exec 7</dir` leaves one.
                if libc::open(dir.as_ptr(), libc::O_RDONLY | libc::O_DIRECTORY) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                // A session keyring of this command's own, holding a key.
                libc::syscall(libc::SYS_keyctl, 1, 0usize);
                let id = libc::syscall(
                    libc::SYS_add_key,
                    ty.as_ptr(),
                    desc.as_ptr(),
                    payload.as_ptr(),
                    payload.len(),
                    -3i32, // KEY_SPEC_SESSION_KEYRING
                );
                if id < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let out = cmd.output().unwrap();
        assert!(out.status.success(), "{}", text(&out));
        let t = Target::create(project, &name, backend, library);

        let fds = t.ask("SELECT isoenv_probe_fds()");
        assert!(
            !fds.contains(&marker.path().display().to_string()),
            "{backend}: the server holds the invoker's directory descriptor:\n{fds}"
        );
        let found = t.ask(&format!("SELECT isoenv_probe_key('{key}')"));
        assert!(
            found.starts_with("not found"),
            "{backend}: the server reads the invoker's session keyring: {found}"
        );
        project.ok(&["db", "destroy", &name]);
    }
}

/// Logs hold statements as written, passwords included: the invoker's alone.
#[test]
fn server_logs_are_private() {
    for project in [Project::new(""), Project::unprivileged("")] {
        project.ok(&["db", "create", "logs", "--engine", "postgres"]);
        let log_dir = project.state().join("logs/log");
        let meta = |p: &Path| fs::metadata(p).unwrap();
        let invoker = meta(&project.env_file()).uid();
        for (path, mode) in [
            (log_dir.clone(), 0o700),
            (log_dir.join("server.log"), 0o600),
        ] {
            assert_eq!(meta(&path).permissions().mode() & 0o777, mode, "{path:?}");
            assert_eq!(meta(&path).uid(), invoker, "{path:?}");
        }
        project.ok(&["db", "destroy", "logs"]);
    }
}

/// No Unix socket lets a client in without the password, not even the invoker's own root:
/// PostgreSQL's socket was trusted, and MariaDB's `root@localhost` let the host's root in by
/// its uid. Each socket is tried by root (which can enter `run/`) with no password, then with
/// it, so a socket that works at all is known to refuse only for want of the password.
#[test]
fn no_unix_socket_lets_anyone_in_without_the_password() {
    no_unix_socket_lets_anyone_in(&Project::new(""));
    no_unix_socket_lets_anyone_in(&Project::unprivileged(""));
}

fn no_unix_socket_lets_anyone_in(project: &Project) {
    let tries: [(&str, &str, &str); 4] = [
        ("pg", "postgres", "lightweight"),
        ("pgbox", "postgres", "sandbox"),
        ("maria", "mysql", "lightweight"),
        ("keys", "redis", "lightweight"),
    ];
    for (name, engine, backend) in tries {
        project.create(name, engine, backend);
        let run = project.state().join(name).join("run");
        let url = project.ok(&["db", "url", name]).trim().to_owned();
        let password = url
            .rsplit_once('@')
            .and_then(|(left, _)| left.rsplit_once(':'))
            .map(|(_, pw)| pw.to_owned())
            .unwrap();
        let port = project.json(&["db", "inspect", name, "--json"])["port"].to_string();
        let attempt = |password: Option<&str>, user: &str| -> String {
            let mut c = match engine {
                "postgres" => {
                    let mut c = Command::new("psql");
                    c.args(["-w", "-tAc", "select 42", "-d", "postgres", "-U", user])
                        .arg("-h")
                        .arg(&run)
                        .args(["-p", &port])
                        .env("PGPASSFILE", "/dev/null");
                    if let Some(pw) = password {
                        c.env("PGPASSWORD", pw);
                    }
                    c
                }
                "mysql" => {
                    let mut c = Command::new("mariadb");
                    c.args(["--no-defaults", "-N", "-e", "select 42", "-u", user])
                        .arg(format!("--socket={}", run.join("mysqld.sock").display()));
                    if let Some(pw) = password {
                        c.arg(format!("--password={pw}"));
                    }
                    c
                }
                _ => {
                    let mut c = Command::new("redis-cli");
                    c.arg("-s").arg(run.join("redis.sock"));
                    if let Some(pw) = password {
                        c.args(["--no-auth-warning", "-a", pw]);
                    }
                    c.args(["eval", "return 42", "0"]);
                    c
                }
            };
            text(&c.env_remove("REDISCLI_AUTH").output().unwrap())
        };
        let users: &[&str] = match engine {
            "postgres" => &["postgres"],
            "mysql" => &["root", "isoenv"],
            _ => &["default"],
        };
        for user in users {
            let without = attempt(None, user);
            assert!(
                !without.lines().any(|l| l.trim() == "42"),
                "{name} ({backend}): `{user}` got in through the socket without the password: {without}"
            );
        }
        let with = attempt(Some(&password), users[users.len() - 1]);
        assert!(
            with.lines().any(|l| l.trim() == "42"),
            "{name}: the socket refused the password too: {with}"
        );
        project.ok(&["db", "destroy", name]);
    }
}

/// The finding: MariaDB wrote files wherever its service user could (`INTO OUTFILE`).
#[test]
fn mariadb_writes_files_only_inside_its_environment() {
    for project in [Project::new(""), Project::unprivileged("")] {
        mariadb_writes_files_only_inside(&project);
    }
}

fn mariadb_writes_files_only_inside(project: &Project) {
    project.ok(&["db", "create", "files", "--engine", "mysql"]);
    let outside = std::env::temp_dir().join(format!("isoenv-outfile-{}", std::process::id()));
    let inside = project.state().join("files/run/allowed.txt");
    let mariadb = |sql: &str| {
        let activate = project.state().join("files/bin/activate");
        Command::new("bash")
            .arg("-c")
            .arg(format!(
                "source {}; mariadb -N -e \"$Q\"",
                activate.display()
            ))
            .env("Q", sql)
            .output()
            .unwrap()
    };
    // The superuser may write files: inside the environment's run directory.
    let ok = mariadb(&format!("SELECT 42 INTO OUTFILE '{}'", inside.display()));
    assert!(ok.status.success(), "{}", text(&ok));
    assert_eq!(fs::read_to_string(&inside).unwrap().trim(), "42");
    // Anywhere else is refused, and nothing is written.
    let refused = mariadb(&format!("SELECT 42 INTO OUTFILE '{}'", outside.display()));
    assert!(!refused.status.success());
    assert!(
        text(&refused).contains("secure-file-priv"),
        "{}",
        text(&refused)
    );
    assert!(!outside.exists(), "{} was written", outside.display());
    project.ok(&["db", "destroy", "files"]);
}

/// As ssh refuses a key others can read, `env check` and `doctor` say when `.env` shows a
/// password to other users.
#[test]
fn a_readable_env_file_with_a_password_is_flagged() {
    let env = "DB_VM_PASSWORD=hunter2\n";
    for project in [Project::new(env), Project::unprivileged(env)] {
        readable_env_file_is_flagged(&project);
    }
}

fn readable_env_file_is_flagged(project: &Project) {
    let env = project.env_file();
    fs::set_permissions(&env, fs::Permissions::from_mode(0o644)).unwrap();
    let check = project.ok(&["env", "check"]);
    assert!(check.contains("chmod 600"), "{check}");
    assert!(!check.contains("hunter2"), "the warning shows the password");
    let doctor = project.ok(&["doctor"]);
    assert!(doctor.contains("WARNING env file"), "{doctor}");
    fs::set_permissions(&env, fs::Permissions::from_mode(0o600)).unwrap();
    assert!(!project.ok(&["env", "check"]).contains("chmod 600"));
}

/// The findings: every server ran as one user, so one environment's superuser could read
/// another's passwords and data, signal its server, log in through its trusted Unix socket,
/// and change the shared cache of initialized data directories for every later environment.
/// Tried as root (ids of isoenv's own range) and as nobody (ids of its subordinate range).
#[test]
fn one_environments_superuser_cannot_reach_another_environment() {
    superuser_cannot_reach_another_environment(Project::new(""));
    let rootless = Project::unprivileged("");
    let identities = rootless.json(&["doctor", "--json"]);
    let identities = identities
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "identities")
        .unwrap();
    assert_eq!(
        identities["ok"], true,
        "nobody needs subordinate ids for this test (cargo xtask ci gives it some): {identities}"
    );
    superuser_cannot_reach_another_environment(rootless);
}

fn superuser_cannot_reach_another_environment(project: Project) {
    for (name, engine) in [
        ("attacker", "postgres"),
        ("victim", "postgres"),
        ("keys", "redis"),
    ] {
        project.ok(&["db", "create", name, "--engine", engine]);
    }
    let state = project.state();
    let victim_pid = project.json(&["db", "inspect", "victim", "--json"])["pid"]
        .as_i64()
        .unwrap();
    // The cache entry the environments were copied from.
    let version = project.json(&["db", "inspect", "victim", "--json"])["version"]
        .as_str()
        .unwrap()
        .to_owned();
    let cache = match project.is_unprivileged() {
        true => project.dir.path().join("cache"),
        false => Path::new(env!("CARGO_TARGET_TMPDIR")).join("isoenv-cache"),
    };
    let hba = fs::read_dir(cache)
        .unwrap()
        .flatten()
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .starts_with(&format!("postgres-{version}-"))
        })
        .map(|e| e.path().join("data/pg_hba.conf"))
        .find(|p| p.exists())
        .expect("the cached PostgreSQL data directory");
    let before = fs::read_to_string(&hba).unwrap();
    let url = project.ok(&["db", "url", "attacker"]);
    let mut attacker = postgres::Client::connect(url.trim(), postgres::NoTls).unwrap();
    attacker
        .batch_execute("CREATE TEMP TABLE out (line text)")
        .unwrap();
    // What a shell run by the attacker's server sees; the command always succeeds and says why.
    let mut shell = |command: &str| -> String {
        let sql = format!(
            "TRUNCATE out; COPY out FROM PROGRAM '( {} ) 2>&1 | tr \"\\t\" \" \"; true'",
            command.replace('\'', "''")
        );
        attacker.batch_execute(&sql).unwrap();
        let rows = attacker.query("SELECT line FROM out", &[]).unwrap();
        rows.iter()
            .map(|r| r.get::<_, String>(0))
            .collect::<Vec<_>>()
            .join("\n")
    };
    let redis_conf = fs::read_dir(state.join("keys"))
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .find(|p| p.to_string_lossy().ends_with(".conf"))
        .expect("redis's configuration, which holds its password");
    let password = project
        .ok(&["db", "url", "keys"])
        .trim()
        .rsplit_once('@')
        .and_then(|(left, _)| left.rsplit_once(':'))
        .map(|(_, pw)| pw.to_owned())
        .unwrap();

    let read = shell(&format!("cat {}", redis_conf.display()));
    assert!(read.contains("Permission denied"), "{read}");
    assert!(
        !read.contains(&password),
        "another environment's password was read"
    );
    // Its servers run as a user of their own: not the invoker, not another environment's.
    let uid = |name: &str| {
        let pid = project.json(&["db", "inspect", name, "--json"])["pid"]
            .as_i64()
            .unwrap();
        let status = fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
        let field = |key: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(key))
                .unwrap()
                .split_whitespace()
                .map(str::to_owned)
                .collect::<Vec<_>>()
        };
        assert_eq!(field("CapEff:"), ["0000000000000000"], "{name}");
        assert_eq!(field("NoNewPrivs:"), ["1"], "{name}");
        assert!(field("Groups:").is_empty(), "{name}: {status}");
        field("Uid:")[0].parse::<u32>().unwrap()
    };
    let invoker = fs::metadata(project.env_file()).unwrap().uid();
    let uids = [uid("attacker"), uid("victim"), uid("keys")];
    assert!(
        !uids.contains(&invoker) && uids[0] != uids[1] && uids[1] != uids[2] && uids[0] != uids[2],
        "{uids:?}, invoker {invoker}"
    );
    // Nor the invoker's files: its own copy of the attacker's password.
    let own = shell(&format!(
        "cat {}",
        state.join("attacker/credentials").display()
    ));
    assert!(own.contains("Permission denied"), "{own}");
    let listed = shell(&format!("ls {}", state.join("victim/data").display()));
    assert!(listed.contains("Permission denied"), "{listed}");
    let signalled = shell(&format!("kill -0 {victim_pid}"));
    assert!(signalled.contains("Operation not permitted"), "{signalled}");
    let login = shell(&format!(
        "psql -h {} -U postgres -d postgres -w -tAc \"select 42\"",
        state.join("victim/run").display()
    ));
    assert!(
        !login.lines().any(|l| l.trim() == "42"),
        "logged in to another environment through its socket: {login}"
    );
    let edited = shell(&format!(
        "echo \"local all all trust\" >> {}",
        hba.display()
    ));
    assert!(edited.contains("Permission denied"), "{edited}");
    assert_eq!(
        fs::read_to_string(&hba).unwrap(),
        before,
        "the cache was changed"
    );

    for name in ["attacker", "victim", "keys"] {
        project.ok(&["db", "destroy", name]);
    }
}

/// Redis's superuser (anyone with the password) cannot move where Redis writes its files, nor
/// load native code: Redis 7 refuses both unless configured otherwise, and isoenv does not.
#[test]
fn redis_cannot_be_told_to_write_elsewhere_or_load_modules() {
    for project in [Project::new(""), Project::unprivileged("")] {
        redis_stays_in_place(&project);
    }
}

fn redis_stays_in_place(project: &Project) {
    project.ok(&["db", "create", "cache", "--engine", "redis"]);
    let redis = |args: &str| {
        let activate = project.state().join("cache/bin/activate");
        let out = Command::new("bash")
            .arg("-c")
            .arg(format!(
                "source {}; redis-cli --no-auth-warning -h \"$DB_HOST\" -p \"$DB_PORT\" {args}",
                activate.display()
            ))
            .output()
            .unwrap();
        text(&out)
    };
    assert_eq!(redis("PING").trim(), "PONG", "the probe reaches the server");
    let moved = redis("CONFIG SET dir /tmp");
    assert!(moved.contains("protected config"), "{moved}");
    let loaded = redis("MODULE LOAD /tmp/nothing.so");
    assert!(loaded.contains("not allowed"), "{loaded}");
    project.ok(&["db", "destroy", "cache"]);
}

/// Without root the sandbox's servers run as the invoker, so what keeps one environment's
/// superuser from another's files is the sandbox's mount namespace: tried rootful and rootless,
/// with the superuser's own file functions, against another environment's password file and
/// data.
#[test]
fn a_sandboxed_superuser_sees_no_other_environment_rootful_or_rootless() {
    for project in [Project::new(""), Project::unprivileged("")] {
        project.ok(&["db", "create", "other", "--engine", "redis"]);
        project.create("boxed", "postgres", "sandbox");
        let url = project.ok(&["db", "url", "boxed"]);
        let mut c = postgres::Client::connect(url.trim(), postgres::NoTls).unwrap();
        let other = project.state().join("other");
        let conf = fs::read_dir(&other)
            .unwrap()
            .flatten()
            .map(|e| e.path())
            .find(|p| p.to_string_lossy().ends_with(".conf"))
            .expect("redis's configuration, which holds its password");
        for sql in [
            format!("SELECT pg_read_file('{}')", conf.display()),
            format!(
                "SELECT count(*)::text FROM pg_ls_dir('{}')",
                other.display()
            ),
        ] {
            let got = c.query_one(&sql, &[]).map(|r| r.get::<_, String>(0));
            let err = got.expect_err(&sql);
            let err = err
                .as_db_error()
                .map_or_else(|| err.to_string(), |d| d.message().to_owned());
            assert!(err.contains("No such file or directory"), "{sql}: {err}");
        }
        // The state root shows only its own environment (the path to it exists inside), so the
        // refusals above are not the functions'.
        let listed: String = c
            .query_one(
                &format!(
                    "SELECT string_agg(f, ',') FROM pg_ls_dir('{}') f",
                    project.state().display()
                ),
                &[],
            )
            .unwrap()
            .get(0);
        assert_eq!(listed, "boxed");
        for name in ["boxed", "other"] {
            project.ok(&["db", "destroy", name]);
        }
    }
}
