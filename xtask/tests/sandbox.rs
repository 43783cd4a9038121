//! The sandbox backend, proven from both sides: probes from inside (nsenter into the sandbox's
//! namespaces, the server's own `/proc` view, `COPY ... FROM PROGRAM` as a database superuser)
//! and checks from the host (cgroup files, the exposed port, what is left after stop, destroy and
//! SIGKILL). Needs root, like the backend; fails loudly without it.

mod support;

use std::fs;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::thread::sleep;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use support::{text, Project};

struct Sandbox<'a> {
    project: &'a Project,
    name: String,
}

impl<'a> Sandbox<'a> {
    fn create(project: &'a Project, name: &str, engine: &str) -> Self {
        assert!(
            nix::unistd::geteuid().is_root(),
            "the sandbox tests need root (as CI runs them)"
        );
        project.create(name, engine, "sandbox");
        Sandbox {
            project,
            name: name.into(),
        }
    }

    fn dir(&self) -> PathBuf {
        self.project.state().join(&self.name)
    }

    fn record(&self) -> Value {
        let path = self.dir().join("sandbox.json");
        serde_json::from_slice(&fs::read(&path).unwrap_or_else(|e| panic!("{path:?}: {e}")))
            .unwrap()
    }

    fn init(&self) -> i32 {
        self.record()["init"].as_i64().expect("a ready sandbox") as i32
    }

    fn supervisor(&self) -> i32 {
        self.record()["supervisor"]["pid"].as_i64().unwrap() as i32
    }

    fn cgroups(&self) -> Vec<PathBuf> {
        self.record()["cgroups"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| PathBuf::from(p.as_str().unwrap()))
            .collect()
    }

    fn cgroup(&self, controller: &str) -> PathBuf {
        self.cgroups()
            .into_iter()
            .find(|p| p.to_string_lossy().contains(&format!("/{controller}")))
            .unwrap_or_else(|| panic!("no {controller} cgroup in {:?}", self.cgroups()))
    }

    /// The engine's server process (init's child running `binary`).
    fn server(&self, binary: &str) -> i32 {
        let init = self.init();
        children(init)
            .into_iter()
            .find(|&p| {
                fs::read_link(format!("/proc/{p}/exe"))
                    .is_ok_and(|e| e.to_string_lossy().ends_with(binary))
            })
            .unwrap_or_else(|| panic!("no {binary} under sandbox init {init}"))
    }

    fn manifest(&self) -> Value {
        serde_json::from_slice(&fs::read(self.dir().join("manifest.json")).unwrap()).unwrap()
    }

    fn write_manifest(&self, m: &Value) {
        fs::write(
            self.dir().join("manifest.json"),
            serde_json::to_string_pretty(m).unwrap(),
        )
        .unwrap();
    }

    fn url(&self) -> String {
        self.project
            .ok(&["db", "url", &self.name])
            .trim()
            .to_owned()
    }

    /// `client` (a shell command) prints 42 through the activate script.
    fn answers(&self, client: &str) {
        let activate = self.dir().join("bin/activate");
        let script = format!("source {} && {client}", activate.display());
        let out = Command::new("bash").args(["-c", &script]).output().unwrap();
        assert!(out.status.success(), "{}: {}", self.name, text(&out));
        assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "42");
    }

    fn port(&self) -> u16 {
        self.manifest()["network"]["expose"]
            .as_str()
            .unwrap()
            .rsplit(':')
            .next()
            .unwrap()
            .parse()
            .unwrap()
    }

    /// Everything the sandbox made is gone: processes, cgroups, record, listener, mounts.
    fn assert_gone(&self, init: i32, cgroups: &[PathBuf], port: u16) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while alive(init) && Instant::now() < deadline {
            sleep(Duration::from_millis(20));
        }
        assert!(!alive(init), "sandbox init {init} survived");
        for cg in cgroups {
            assert!(!cg.exists(), "cgroup {cg:?} left behind");
        }
        assert!(
            std::net::TcpStream::connect(("127.0.0.1", port)).is_err(),
            "port {port} still answers"
        );
        let mounts = fs::read_to_string("/proc/self/mountinfo").unwrap();
        let dir = self.dir().to_string_lossy().into_owned();
        assert!(!mounts.contains(&dir), "host mounts under {dir}");
    }
}

/// The processes holding the host's listening TCP socket on 127.0.0.1:`port`.
fn listeners(port: u16) -> Vec<i32> {
    // /proc/net/tcp: "sl local_address rem_address st ... inode"; 0A is LISTEN.
    let local = format!("0100007F:{port:04X}");
    let inodes: Vec<String> = read(Path::new("/proc/net/tcp"))
        .lines()
        .skip(1)
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f[1] == local && f[3] == "0A").then(|| format!("socket:[{}]", f[9]))
        })
        .collect();
    assert!(!inodes.is_empty(), "nothing listens on 127.0.0.1:{port}");
    let mut pids: Vec<i32> = fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|p| {
            fs::read_dir(format!("/proc/{p}/fd")).is_ok_and(|fds| {
                fds.flatten().any(|fd| {
                    fs::read_link(fd.path())
                        .is_ok_and(|l| inodes.iter().any(|i| l.as_os_str() == i.as_str()))
                })
            })
        })
        .collect();
    pids.sort();
    pids
}

fn children(pid: i32) -> Vec<i32> {
    fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
        .unwrap_or_default()
        .split_whitespace()
        .map(|p| p.parse().unwrap())
        .collect()
}

/// Alive and not a zombie (this container's pid 1 does not reap).
fn alive(pid: i32) -> bool {
    fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
        !s.rsplit(')')
            .next()
            .unwrap_or("")
            .trim_start()
            .starts_with('Z')
    })
}

fn status_field(pid: i32, field: &str) -> String {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{field}:")))
        .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"))
        .split_whitespace()
        .next()
        .unwrap()
        .to_owned()
}

/// Runs `args` inside the sandbox's namespaces, as root or as `uid`.
fn inside(init: i32, uid: Option<u32>, args: &[&str]) -> Output {
    let mut cmd = Command::new("nsenter");
    cmd.arg("--target")
        .arg(init.to_string())
        .args(["--mount", "--pid", "--net", "--ipc", "--uts"]);
    if let Some(uid) = uid {
        cmd.arg(format!("--setuid={uid}"))
            .arg(format!("--setgid={uid}"));
    }
    cmd.arg("--").args(args).env_clear().output().unwrap()
}

/// The host pids in the same pid namespace as `init`.
fn pids_in_namespace(init: i32) -> Vec<i32> {
    let ns = fs::read_link(format!("/proc/{init}/ns/pid")).unwrap();
    fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|p| fs::read_link(format!("/proc/{p}/ns/pid")).is_ok_and(|l| l == ns) && alive(*p))
        .collect()
}

fn read(path: &Path) -> String {
    fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("{path:?}: {e}"))
        .trim()
        .to_owned()
}

fn tcp_query(url: &str, sql: &str) -> Result<Vec<String>, postgres::Error> {
    let mut client = postgres::Client::connect(url, postgres::NoTls)?;
    let rows = client.simple_query(sql)?;
    Ok(rows
        .into_iter()
        .filter_map(|m| match m {
            postgres::SimpleQueryMessage::Row(r) => r.get(0).map(str::to_owned),
            _ => None,
        })
        .collect())
}

#[test]
fn postgres_sandbox_is_confined_and_leaves_nothing() {
    let project = Project::new("");
    let sb = Sandbox::create(&project, "pg", "postgres");
    project.ok(&["db", "stop", "pg"]);
    // The probes need a shell and coreutils inside: granted explicitly, read-only.
    let mut m = sb.manifest();
    m["fs"]
        .as_array_mut()
        .unwrap()
        .push(json!({"host": "/usr/bin", "mode": "ro"}));
    m["limits"] = json!({"memory": "192M", "cpu": 0.5, "pids": 64});
    sb.write_manifest(&m);
    let run = sb.dir().join("run");
    std::os::unix::fs::symlink("/etc/shadow", run.join("escape")).unwrap();
    project.ok(&["db", "start", "pg"]);
    let init = sb.init();
    let server = sb.server("postgres");
    let service_uid: u32 = status_field(server, "Uid").parse().unwrap();

    // The server: unprivileged, no capabilities, cannot gain any.
    assert_ne!(service_uid, 0, "the server runs as root");
    assert_eq!(status_field(server, "CapEff"), "0000000000000000");
    assert_eq!(status_field(server, "CapBnd"), "0000000000000000");
    assert_eq!(status_field(server, "NoNewPrivs"), "1");

    // The filesystem is the manifest's and nothing else.
    let root = PathBuf::from(format!("/proc/{server}/root"));
    for absent in [
        "etc/shadow",
        "root",
        "home",
        "var",
        "usr/sbin",
        "sys/fs/cgroup",
        "sys/kernel",
        "sys/class/block",
    ] {
        assert!(!root.join(absent).exists(), "/{absent} is visible inside");
    }
    assert!(root.join("usr/lib/postgresql").is_dir());
    let out = inside(init, None, &["touch", "/usr/lib/postgresql/isoenv-probe"]);
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("Read-only file system"),
        "{}",
        text(&out)
    );
    let out = inside(init, None, &["cat", &run.join("escape").to_string_lossy()]);
    assert!(
        !out.status.success(),
        "the symlink reached the host: {}",
        text(&out)
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("No such file"));

    // Its own pids: exactly the sandbox's processes (plus the probe itself). PostgreSQL starts
    // and ends background workers at any time, so the two views are compared until they are
    // taken without one in between (host pids visible inside would never match).
    let views = (0..20).map(|_| {
        let out = inside(init, Some(service_uid), &["ls", "/proc"]);
        let seen: Vec<i32> = String::from_utf8_lossy(&out.stdout)
            .split_whitespace()
            .filter_map(|p| p.parse().ok())
            .collect();
        (seen, pids_in_namespace(init).len() + 1)
    });
    let mut last = None;
    for (seen, expected) in views {
        assert!(seen.contains(&1), "{seen:?}");
        if seen.len() == expected {
            last = None;
            break;
        }
        last = Some((seen, expected));
        sleep(Duration::from_millis(50));
    }
    assert_eq!(last, None, "/proc inside vs the sandbox's processes");

    // The network: only lo; nothing outside reachable, not even the host's loopback.
    let out = inside(init, None, &["ls", "/sys/class/net"]);
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "lo",
        "{}",
        text(&out)
    );
    let out = inside(init, None, &["cat", "/sys/class/net/lo/operstate"]);
    assert!(out.status.success(), "{}", text(&out));
    let out = inside(init, None, &["cat", "/proc/net/dev"]);
    let ifaces: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .skip(2)
        .filter_map(|l| Some(l.split(':').next()?.trim().to_owned()))
        .collect();
    assert_eq!(ifaces, ["lo"]);
    let out = inside(init, None, &["bash", "-c", "echo > /dev/tcp/192.0.2.1/80"]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("unreachable"),
        "{}",
        text(&out)
    );
    let host_listener = TcpListener::bind("127.0.0.1:0").unwrap();
    host_listener.set_nonblocking(true).unwrap();
    let host_port = host_listener.local_addr().unwrap().port();
    let probe = format!("echo > /dev/tcp/127.0.0.1/{host_port}");
    let out = inside(init, None, &["bash", "-c", &probe]);
    assert!(!out.status.success(), "reached the host's loopback");
    assert!(
        host_listener.accept().is_err(),
        "the host listener got a connection"
    );

    // The hostname is the sandbox's own.
    let host_name = nix::unistd::gethostname().unwrap();
    let out = inside(init, None, &["hostname"]);
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "isoenv-pg");
    assert!(inside(init, None, &["hostname", "changed-inside"])
        .status
        .success());
    assert_eq!(nix::unistd::gethostname().unwrap(), host_name);

    // From the host: the exposed port answers on 127.0.0.1 and demands the password. The
    // listening socket is the server's own (handed over, no forwarder), and the server's TCP
    // listener does not exist inside.
    assert_eq!(listeners(sb.port()), [server]);
    let out = inside(init, None, &["cat", "/proc/net/tcp"]);
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).lines().count(),
        1,
        "{}",
        text(&out)
    );
    let url = sb.url();
    assert_eq!(tcp_query(&url, "SELECT 1").unwrap(), ["1"]);
    let password = url.split(':').nth(2).unwrap().split('@').next().unwrap();
    let wrong = url.replace(password, "wrong-password");
    let err = tcp_query(&wrong, "SELECT 1").unwrap_err();
    assert!(
        format!("{err:?}").contains("password authentication failed"),
        "{err:?}"
    );

    // A database superuser running programs still sees only the sandbox.
    let copy = |program: &str| {
        tcp_query(
            &url,
            &format!(
                "CREATE TEMP TABLE out(line text); COPY out FROM PROGRAM '{program}'; SELECT string_agg(line, ' ') FROM out"
            ),
        )
    };
    assert_eq!(copy("id -u").unwrap(), [service_uid.to_string()]);
    let err = copy("cat /etc/shadow").unwrap_err();
    assert!(format!("{err:?}").contains("exit code 1"), "{err:?}");
    let listed = copy("ls /proc").unwrap().join(" ");
    let pids = listed
        .split_whitespace()
        .filter(|p| p.parse::<i32>().is_ok())
        .count();
    assert!(
        pids < 20,
        "COPY FROM PROGRAM sees {pids} processes: {listed}"
    );

    // The cgroup files hold the manifest's values, and the kernel enforces them.
    let memory = sb.cgroup("memory");
    assert_eq!(
        read(&memory.join("memory.limit_in_bytes")),
        (192u64 << 20).to_string()
    );
    let cpu = sb.cgroup("cpu");
    assert_eq!(read(&cpu.join("cpu.cfs_quota_us")), "50000");
    assert_eq!(read(&cpu.join("cpu.cfs_period_us")), "100000");
    let pids_cg = sb.cgroup("pids");
    assert_eq!(read(&pids_cg.join("pids.max")), "64");
    // init and the server it started are in every group (init moves itself in before it
    // starts anything).
    let server = children(init);
    assert_eq!(server.len(), 1, "init's children: {server:?}");
    for cg in sb.cgroups() {
        let procs = read(&cg.join("cgroup.procs"));
        for pid in [init, server[0]] {
            assert!(
                procs.lines().any(|l| l.trim() == pid.to_string()),
                "process {pid} is not in {}: {procs}",
                cg.display()
            );
        }
    }
    let inspect = project.ok(&["db", "inspect", "pg"]);
    assert!(
        inspect.contains("limit memory 192M (cgroup v1 memory.limit_in_bytes, enforced)")
            || inspect.contains("limit memory 192M (cgroup v2 memory.max, enforced)"),
        "{inspect}"
    );

    let join = |cg: &Path, then: &str| {
        format!(
            "echo $$ > {}/cgroup.procs && exec nsenter --target {init} --mount --pid --net -- {then}",
            cg.display()
        )
    };
    // Memory: `tail /dev/zero` buffers forever; the OOM killer ends it at the limit.
    let oom_before = oom_kills(&memory);
    let out = Command::new("sh")
        .args(["-c", &join(&memory, "tail /dev/zero")])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(oom_kills(&memory) > oom_before, "no OOM kill in {memory:?}");
    // Pids: a fork loop hits pids.max.
    let out = Command::new("sh")
        .args([
            "-c",
            &join(
                &pids_cg,
                "sh -c 'for i in $(seq 100); do sleep 1 & done; wait'",
            ),
        ])
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("fork"),
        "{}",
        text(&out)
    );
    let events = read(&pids_cg.join("pids.events"));
    assert_ne!(events, "max 0", "pids.events: {events}");

    // Stop: nothing left. Start again, then SIGKILL the supervisor: the sandbox dies with it.
    let (cgroups, port) = (sb.cgroups(), sb.port());
    project.ok(&["db", "stop", "pg"]);
    sb.assert_gone(init, &cgroups, port);
    assert!(!sb.dir().join("sandbox.json").exists());
    project.ok(&["db", "start", "pg"]);
    let (init, supervisor) = (sb.init(), sb.supervisor());
    let members = pids_in_namespace(init);
    assert!(members.len() > 2, "{members:?}");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(supervisor),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while members.iter().any(|&p| alive(p)) && Instant::now() < deadline {
        sleep(Duration::from_millis(20));
    }
    let survivors: Vec<i32> = members.into_iter().filter(|&p| alive(p)).collect();
    assert!(
        survivors.is_empty(),
        "sandbox processes survived: {survivors:?}"
    );
    assert!(project.ok(&["db", "list"]).contains("crashed"));
    // The next command cleans what the killed supervisor could not.
    let cgroups = sb.cgroups();
    project.ok(&["db", "destroy", "pg"]);
    for cg in &cgroups {
        assert!(!cg.exists(), "cgroup {cg:?} left after destroy");
    }
    assert!(!sb.dir().exists());
}

fn oom_kills(memory: &Path) -> u64 {
    let text = read(&memory.join("memory.oom_control"));
    text.lines()
        .find_map(|l| l.strip_prefix("oom_kill "))
        .map_or(0, |n| n.parse().unwrap())
}

/// The other engines: their server binary and a client query that prints 42.
const OTHER_ENGINES: [(&str, &str, &str); 2] = [
    (
        "mysql",
        "mariadbd",
        "mariadb -h 127.0.0.1 -P $DB_PORT -u $DB_USER -p$DB_PASSWORD -N -e 'SELECT 40+2'",
    ),
    (
        "redis",
        "redis-server",
        "redis-cli -p $DB_PORT EVAL 'return 40+2' 0",
    ),
];

#[test]
fn mysql_and_redis_run_confined_too() {
    let project = Project::new("");
    for (engine, binary, client) in OTHER_ENGINES {
        let sb = Sandbox::create(&project, engine, engine);
        let server = sb.server(binary);
        assert_ne!(status_field(server, "Uid"), "0");
        assert_eq!(status_field(server, "CapEff"), "0000000000000000");
        assert_eq!(status_field(server, "CapBnd"), "0000000000000000");
        assert_eq!(status_field(server, "NoNewPrivs"), "1");
        let root = PathBuf::from(format!("/proc/{server}/root"));
        assert!(!root.join("etc/shadow").exists());
        assert!(
            !root.join("usr/bin/bash").exists(),
            "bash is not in the manifest"
        );

        // A real client through the activate script and the exposed port, which the server
        // itself listens on.
        assert_eq!(listeners(sb.port()), [server], "{engine}");
        sb.answers(client);
        let bad = match engine {
            "mysql" => format!(
                "mariadb -h 127.0.0.1 -P {} -u isoenv -pwrong -e 'SELECT 1'",
                sb.port()
            ),
            _ => format!("redis-cli --no-auth-warning -p {} -a wrong PING", sb.port()),
        };
        let out = Command::new("bash").args(["-c", &bad]).output().unwrap();
        let said = text(&out);
        assert!(
            said.contains("Access denied") || said.contains("WRONGPASS"),
            "{engine} accepted a wrong password: {said}"
        );

        // Stop, then start and SIGKILL the supervisor: nothing survives either way.
        let (init, cgroups, port) = (sb.init(), sb.cgroups(), sb.port());
        project.ok(&["db", "stop", engine]);
        sb.assert_gone(init, &cgroups, port);
        let log = fs::read_to_string(sb.dir().join("log/server.log")).unwrap();
        assert!(
            !log.contains("did not stop"),
            "{engine} ignored its stop signal: {log}"
        );
        project.ok(&["db", "start", engine]);
        let members = pids_in_namespace(sb.init());
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(sb.supervisor()),
            nix::sys::signal::Signal::SIGKILL,
        )
        .unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while members.iter().any(|&p| alive(p)) && Instant::now() < deadline {
            sleep(Duration::from_millis(20));
        }
        assert!(
            members.iter().all(|&p| !alive(p)),
            "{engine}: sandbox survived"
        );
        project.ok(&["db", "destroy", engine]);
        assert!(!sb.dir().exists());
    }
}

#[test]
fn bad_manifests_are_refused_with_their_json_path_and_change_nothing() {
    let project = Project::new("");
    let sb = Sandbox::create(&project, "bad", "redis");
    project.ok(&["db", "stop", "bad"]);
    let good = sb.manifest();
    let cases: [(Value, &str); 4] = [
        (
            {
                let mut m = good.clone();
                m["limits"]["swap"] = json!("1G");
                m
            },
            "limits.swap: unknown field `swap`",
        ),
        (
            {
                let mut m = good.clone();
                m["fs"]
                    .as_array_mut()
                    .unwrap()
                    .push(json!({"host": "/no/such/dir", "mode": "ro"}));
                m
            },
            "does not exist",
        ),
        (
            {
                let mut m = good.clone();
                m["limits"]["memory"] = json!("12X");
                m
            },
            "limits.memory",
        ),
        (
            {
                let mut m = good.clone();
                m["network"]["expose"] = json!("0.0.0.0:6379");
                m
            },
            "network.expose",
        ),
    ];
    for (manifest, expected) in cases {
        sb.write_manifest(&manifest);
        let err = project.fails(&["db", "start", "bad"]);
        assert!(err.contains(expected), "expected `{expected}` in: {err}");
        assert!(
            err.contains("manifest.json"),
            "the file is not named: {err}"
        );
        assert!(!sb.dir().join("sandbox.json").exists());
        assert!(project.ok(&["db", "list"]).contains("stopped"));
    }
    sb.write_manifest(&good);
    project.ok(&["db", "start", "bad"]);
    project.ok(&["db", "destroy", "bad"]);
}

/// Without root: the same sandbox inside a user namespace that maps only the invoker, and an
/// honest report that cgroup limits cannot be set.
#[test]
fn without_root_the_sandbox_runs_in_a_user_namespace_and_says_what_it_cannot_enforce() {
    let project = Project::unprivileged("");
    let sb = Sandbox::create(&project, "pg", "postgres");
    let (init, server) = (sb.init(), sb.server("postgres"));
    let nobody = nix::unistd::User::from_name("nobody").unwrap().unwrap();

    // Its own user namespace, in which only the invoker exists: root inside is nobody outside.
    assert_ne!(
        fs::read_link(format!("/proc/{server}/ns/user")).unwrap(),
        fs::read_link("/proc/self/ns/user").unwrap()
    );
    let map = read(Path::new(&format!("/proc/{server}/uid_map")));
    assert_eq!(
        map.split_whitespace().collect::<Vec<_>>(),
        [nobody.uid.to_string(), nobody.uid.to_string(), "1".into()]
    );
    assert_eq!(status_field(server, "Uid"), nobody.uid.to_string());
    assert_eq!(status_field(server, "CapEff"), "0000000000000000");
    assert_eq!(status_field(server, "CapBnd"), "0000000000000000");
    assert_eq!(status_field(server, "NoNewPrivs"), "1");

    // The same confinement: the manifest's files, only `lo`, the port handed to the server.
    let root = PathBuf::from(format!("/proc/{server}/root"));
    assert!(!root.join("etc/shadow").exists());
    assert!(!root.join("root").exists());
    assert!(root.join("usr/lib/postgresql").is_dir());
    let nets: Vec<String> = fs::read_dir(root.join("sys/class/net"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(nets, ["lo"]);
    assert_eq!(listeners(sb.port()), [server]);
    let url = sb.url();
    assert_eq!(tcp_query(&url, "SELECT 6*7").unwrap(), ["42"]);
    let password = url.split(':').nth(2).unwrap().split('@').next().unwrap();
    let err = tcp_query(&url.replace(password, "wrong-password"), "SELECT 1").unwrap_err();
    assert!(format!("{err:?}").contains("password authentication failed"));

    // No limit is claimed that the kernel does not enforce, and each says why.
    let v1 = fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .any(|l| l.contains(" - cgroup ") && l.contains("memory"));
    let inspect = project.ok(&["db", "inspect", "pg"]);
    for limit in ["memory 512M", "cpu 1", "pids 256"] {
        let line = inspect
            .lines()
            .find(|l| l.contains(&format!("limit {limit} ")))
            .unwrap_or_else(|| panic!("no `limit {limit}` in {inspect}"));
        if v1 {
            assert!(
                line.contains("cgroup v1 limits need root") && line.ends_with("NOT enforced)"),
                "{line}"
            );
        } else {
            assert!(
                line.ends_with("NOT enforced)") || line.ends_with(", enforced)"),
                "{line}"
            );
        }
    }
    let log = fs::read_to_string(sb.dir().join("log/server.log")).unwrap();
    assert!(log.contains("is NOT enforced"), "{log}");
    assert!(sb.cgroups().is_empty() || !v1, "{:?}", sb.cgroups());

    // Stop, start, SIGKILL of the supervisor, destroy: nothing is left, as with root.
    let (cgroups, port) = (sb.cgroups(), sb.port());
    project.ok(&["db", "stop", "pg"]);
    sb.assert_gone(init, &cgroups, port);
    // Stopped, it does not promise limits for the next start either.
    let inspect = project.ok(&["db", "inspect", "pg"]);
    assert_eq!(
        inspect.matches("cgroup v1 limits need root").count(),
        if v1 { 3 } else { 0 },
        "{inspect}"
    );
    assert!(!v1 || !inspect.contains("applied at start"), "{inspect}");
    project.ok(&["db", "start", "pg"]);
    let members = pids_in_namespace(sb.init());
    assert!(members.len() > 2, "{members:?}");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(sb.supervisor()),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while members.iter().any(|&p| alive(p)) && Instant::now() < deadline {
        sleep(Duration::from_millis(20));
    }
    assert!(members.iter().all(|&p| !alive(p)), "the sandbox survived");
    project.ok(&["db", "destroy", "pg"]);
    assert!(!sb.dir().exists());

    // The other engines run rootless too.
    for (engine, binary, client) in OTHER_ENGINES {
        let sb = Sandbox::create(&project, engine, engine);
        let server = sb.server(binary);
        assert_eq!(status_field(server, "Uid"), nobody.uid.to_string());
        assert_eq!(status_field(server, "CapEff"), "0000000000000000");
        assert_eq!(listeners(sb.port()), [server], "{engine}");
        sb.answers(client);
        project.ok(&["db", "destroy", engine]);
        assert!(!sb.dir().exists());
    }
}

/// Where user namespaces are disabled, a non-root user gets a clear error and nothing is made.
/// The test disables them only inside a user namespace of its own: `max_user_namespaces` is
/// per namespace, so the machine is untouched.
#[test]
fn without_user_namespaces_the_sandbox_says_so_and_creates_nothing() {
    let project = Project::unprivileged("");
    let create = project.cmd(&[
        "db",
        "create",
        "x",
        "--engine",
        "redis",
        "--backend",
        "sandbox",
    ]);
    // Capabilities come with the exec after the map is written (root inside from then on).
    let mut child = Command::new("unshare");
    child
        .args([
            "--user",
            "--",
            "sh",
            "-c",
            "read go && exec sh -c \"$0\" sh \"$@\"",
        ])
        .arg("echo 0 > /proc/sys/user/max_user_namespaces && exec \"$@\"")
        .arg(create.get_program())
        .args(create.get_args());
    for (var, value) in create.get_envs() {
        match value {
            Some(v) => child.env(var, v),
            None => child.env_remove(var),
        };
    }
    let mut child = child
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id();
    let ours = fs::read_link("/proc/self/ns/user").unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while fs::read_link(format!("/proc/{pid}/ns/user")).is_ok_and(|ns| ns == ours) {
        assert!(Instant::now() < deadline, "unshare made no user namespace");
        sleep(Duration::from_millis(5));
    }
    // Root (the test) maps every id the run needs, so ownership looks the same inside.
    for file in ["uid_map", "gid_map"] {
        fs::write(format!("/proc/{pid}/{file}"), "0 0 65536\n").unwrap();
    }
    std::io::Write::write_all(child.stdin.as_mut().unwrap(), b"go\n").unwrap();
    let out = child.wait_with_output().unwrap();
    let said = text(&out);
    assert!(!out.status.success(), "{said}");
    assert!(said.contains("cannot create a user namespace"), "{said}");
    assert!(said.contains("--backend lightweight"), "{said}");
    assert!(
        !project.state().join("x").exists(),
        "a half-made environment is left"
    );
}
