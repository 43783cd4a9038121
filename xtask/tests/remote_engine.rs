//! A Docker engine on another host, for real: isoenv's CLI runs in a network namespace of its
//! own (the test's veth pair, with only the test's own two addresses), and reaches the engine
//! only through its API on the other end of the pair, as `DOCKER_HOST=tcp://ADDRESS:PORT`.
//! The engine's loopback is out of the client's reach, so every database answer below went to
//! where the container was published for remote clients.

mod support;

use std::io;
use std::net::TcpListener;
use std::os::unix::net::UnixStream;
use std::process::{Command, Output};
use std::thread::sleep;
use std::time::Duration;

use support::{text, Project};

/// A network namespace joined to this one by a veth pair: `host` is this end's address (where
/// the engine's API and published ports are), `client` the namespace's.
struct Net {
    name: String,
    link: String,
    host: String,
    client: String,
}

impl Net {
    fn new() -> Net {
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let id = (std::process::id() * 4 + n) % 200 + 20;
        let net = Net {
            name: format!("isoenv-client-{id}"),
            link: format!("isoenv-re{id}"),
            host: format!("10.231.{id}.1"),
            client: format!("10.231.{id}.2"),
        };
        let peer = format!("{}p", net.link);
        for args in [
            vec!["netns", "add", &net.name],
            vec![
                "link", "add", &net.link, "type", "veth", "peer", "name", &peer,
            ],
            vec!["link", "set", &peer, "netns", &net.name],
            vec!["addr", "add", &format!("{}/30", net.host), "dev", &net.link],
            vec!["link", "set", &net.link, "up"],
            vec![
                "-n",
                &net.name,
                "addr",
                "add",
                &format!("{}/30", net.client),
                "dev",
                &peer,
            ],
            vec!["-n", &net.name, "link", "set", &peer, "up"],
            vec!["-n", &net.name, "link", "set", "lo", "up"],
        ] {
            let out = Command::new("ip").args(&args).output().unwrap();
            assert!(out.status.success(), "ip {args:?}: {}", text(&out));
        }
        net
    }

    /// A shell command in the client's namespace.
    fn sh(&self, script: &str) -> Output {
        Command::new("ip")
            .args(["netns", "exec", &self.name, "bash", "-c", script])
            .output()
            .unwrap()
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        // Deleting the namespace deletes the pair with it; the link goes by name too, in case
        // the namespace was never made.
        for args in [["netns", "del", &self.name], ["link", "del", &self.link]] {
            let _ = Command::new("ip").args(args).output();
        }
    }
}

/// The local engine's API on `address`: a relay to its socket, the engine's TCP listener as far
/// as the client can tell.
fn engine_api_on(address: &str) -> u16 {
    let listener = TcpListener::bind((address, 0)).unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for conn in listener.incoming().flatten() {
            let Ok(unix) = UnixStream::connect("/var/run/docker.sock") else {
                continue;
            };
            let (mut a, mut b) = (conn.try_clone().unwrap(), unix.try_clone().unwrap());
            std::thread::spawn(move || io::copy(&mut a, &mut b));
            let (mut c, mut d) = (unix, conn);
            std::thread::spawn(move || io::copy(&mut c, &mut d));
        }
    });
    port
}

/// A client project in the namespace, talking to the engine over TCP.
fn client(net: &Net, api: u16) -> Project {
    Project::new(&format!("DOCKER_HOST=tcp://{}:{api}\n", net.host)).in_netns(&net.name)
}

/// `SELECT 42` (or Redis's equivalent) through the environment's activate script, in the
/// client's namespace: its own client, no arguments.
fn answers_42(net: &Net, p: &Project, env: &str, engine: &str) -> bool {
    let query = match engine {
        "postgres" => "psql -w -tAc 'select 42'",
        "mysql" => "mariadb -N -e 'select 42'",
        _ => "redis-cli --no-auth-warning eval 'return 42' 0",
    };
    let activate = p.state().join(env).join("bin/activate");
    let out = net.sh(&format!("source {}; {query}", activate.display()));
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .any(|l| l.trim() == "42")
}

fn containers_of(p: &Project) -> Vec<String> {
    let root = std::fs::canonicalize(p.state()).unwrap();
    let out = Command::new("docker")
        .args([
            "ps",
            "-a",
            "--format",
            "{{.Names}} {{.Label \"isoenv.root\"}}",
        ])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        // The label is MACHINE:ROOT.
        .filter(|l| l.ends_with(&format!(":{}", root.display())))
        .map(str::to_owned)
        .collect()
}

/// One environment of `engine` from the client: created (its record naming `host`), a real
/// client's answer, `inspect`'s exposure as `exposed` expects, stop and start keeping it
/// reachable, and destroyed.
fn round_trip(net: &Net, p: &Project, engine: &str, host: &str, exposed: &dyn Fn(&str) -> bool) {
    let env = format!("far-{engine}");
    let info = p.create(&env, engine, "docker");
    assert_eq!(info["host"], host, "{info}");
    assert!(
        answers_42(net, p, &env, engine),
        "{engine}: no answer from afar"
    );
    let inspect = p.json(&["db", "inspect", &env, "--json"]);
    let said = inspect["isolation"]["exposed"].as_str().unwrap_or_default();
    assert!(exposed(said), "{inspect}");
    p.ok(&["db", "stop", &env]);
    p.ok(&["db", "start", &env]);
    assert!(
        answers_42(net, p, &env, engine),
        "{engine}: no answer after a restart"
    );
    p.ok(&["db", "destroy", &env]);
}

fn local_images() {
    let p = Project::new("");
    p.ok(&["image", "build", "postgres", "mysql", "redis"]);
}

/// Every engine from the other host: create, a real client through the published address,
/// stop/start keeping the data and the port, `inspect` saying what the address exposes, and
/// destroy leaving nothing on the engine.
#[test]
fn a_client_on_another_host_uses_every_engine_over_tcp() {
    local_images();
    let net = Net::new();
    let api = engine_api_on(&net.host);
    let p = client(&net, api);
    p.create("probe", "redis", "docker");
    assert_eq!(containers_of(&p).len(), 1, "the containers' listing works");
    p.ok(&["db", "destroy", "probe"]);
    // The client really is elsewhere: it reaches the engine's API, not the engine host's
    // loopback.
    let loopback = TcpListener::bind("127.0.0.1:0").unwrap();
    let reach = |host: &str, port: u16| {
        let out = net.sh(&format!("exec 3<>/dev/tcp/{host}/{port} && echo reached"));
        text(&out).contains("reached")
    };
    assert!(reach(&net.host, api));
    assert!(!reach("127.0.0.1", loopback.local_addr().unwrap().port()));
    for engine in ["postgres", "mysql", "redis"] {
        round_trip(&net, &p, engine, &net.host, &|exposed| {
            exposed.starts_with(&format!("{}:", net.host))
                && exposed.contains("password is always required")
        });
    }
    assert_eq!(containers_of(&p), Vec::<String>::new());
}

/// `test --isolated` (through `run`, with the per-test pool that `isoenv::testing` keeps) from
/// the other host; then a run killed with SIGKILL leaves nothing on the engine once the next
/// command runs; and a second client sharing the engine never sees or removes the first's.
#[test]
fn test_runs_from_another_host_clean_up_and_clients_keep_apart() {
    local_images();
    let net = Net::new();
    let api = engine_api_on(&net.host);
    let p = client(&net, api);
    let other = client(&net, api);
    other.create("mine", "redis", "docker");

    let migrations = p.dir.path().join("migrations/postgres");
    std::fs::create_dir_all(&migrations).unwrap();
    std::fs::write(migrations.join("001.sql"), "CREATE TABLE t (x int);").unwrap();
    // The password stays in the exported files: nothing on a command line carries it.
    let script = "psql -w -tAc \"select count(*) from isoenv_clone where template = '$ISOENV_POSTGRES_POOL'\"";
    let out = p
        .cmd(&[
            "run",
            "--isolated",
            "--pool",
            "--backend",
            "docker",
            "--engine",
            "postgres",
            "--",
            "sh",
            "-c",
            script,
        ])
        .env("ISOENV_MIGRATIONS_DIR", p.dir.path().join("migrations"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let clones: u32 = String::from_utf8_lossy(&out.stdout).trim().parse().unwrap();
    assert!(clones >= 1, "{}", text(&out));
    assert_eq!(
        containers_of(&p),
        Vec::<String>::new(),
        "the run's container stayed"
    );

    let mut run = p
        .cmd(&[
            "run",
            "--isolated",
            "--backend",
            "docker",
            "--engine",
            "redis",
            "--",
            "sleep",
            "60",
        ])
        .spawn()
        .unwrap();
    let mut made = false;
    for _ in 0..300 {
        if !containers_of(&p).is_empty() {
            made = true;
            break;
        }
        sleep(Duration::from_millis(100));
    }
    assert!(made, "the run made no container");
    sleep(Duration::from_millis(500));
    run.kill().unwrap();
    run.wait().unwrap();
    p.ok(&["db", "gc"]);
    assert_eq!(
        containers_of(&p),
        Vec::<String>::new(),
        "a killed run's container stayed"
    );

    // The other client's environment is untouched by all of that, and only its own list has it.
    assert_eq!(containers_of(&other).len(), 1);
    assert!(!p.ok(&["db", "list"]).contains("mine"));
    assert!(answers_42(&net, &other, "mine", "redis"));
    other.ok(&["db", "destroy", "mine"]);
    assert_eq!(containers_of(&other), Vec::<String>::new());
}

/// A client project in the namespace, talking to the engine through `sshd`.
fn ssh_client(net: &Net, sshd: &support::sshd::Sshd) -> Project {
    Project::new(&format!(
        "DOCKER_HOST=ssh://root@{}:{}\nISOENV_DOCKER_SSH_CONFIG={}\n",
        net.host,
        sshd.port,
        sshd.client_config().display()
    ))
    .in_netns(&net.name)
}

/// ssh processes whose command line names this project's SSH links.
fn ssh_links_of(p: &Project) -> Vec<String> {
    let needle = p.state().join(".docker-ssh").display().to_string();
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| {
            let pid: i32 = e.file_name().to_str()?.parse().ok()?;
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
            let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
            let zombie = stat.rsplit(')').next()?.trim_start().starts_with('Z');
            (cmdline.starts_with("ssh ") && cmdline.contains(&needle) && !zombie)
                .then(|| format!("{pid}: {cmdline}"))
        })
        .collect()
}

/// `DOCKER_HOST=ssh://root@ADDRESS:PORT` through a real sshd on the engine's side: the API and
/// every environment's port go through one SSH connection, whose forward is the only way the
/// client reaches a container published on the engine host's loopback. The connection goes
/// with the last environment, and a command that only looks leaves none.
#[test]
fn a_client_on_another_host_uses_every_engine_over_ssh() {
    local_images();
    let net = Net::new();
    let sshd = support::sshd::Sshd::start_on(&net.host);
    let p = ssh_client(&net, &sshd);
    p.ok(&["db", "list"]);
    assert_eq!(
        ssh_links_of(&p),
        Vec::<String>::new(),
        "`db list` left ssh running"
    );
    for engine in ["postgres", "mysql", "redis"] {
        round_trip(&net, &p, engine, "127.0.0.1", &|exposed| {
            exposed.contains("forwarded over SSH") && ssh_links_of(&p).len() == 1
        });
        assert_eq!(
            ssh_links_of(&p),
            Vec::<String>::new(),
            "ssh outlived the last environment"
        );
    }
    assert_eq!(containers_of(&p), Vec::<String>::new());
}

/// A test run over SSH with every engine at once: three containers, three forwards over one
/// connection, the pools set up through them (`ISOENV_<ENGINE>_POOL` exported only once a
/// pool's template and first databases exist), and nothing left after it, ssh included.
#[test]
fn a_test_run_over_ssh_gets_every_engine_and_leaves_nothing() {
    local_images();
    let net = Net::new();
    let sshd = support::sshd::Sshd::start_on(&net.host);
    let p = ssh_client(&net, &sshd);
    for engine in ["postgres", "mysql"] {
        let dir = p.dir.path().join("migrations").join(engine);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("001.sql"), "CREATE TABLE t (x int);").unwrap();
    }
    let script = "test -n \"$ISOENV_MYSQL_POOL\" && test -n \"$ISOENV_REDIS_URL\" && \
                  psql -w -tAc \"select count(*) > 0 from isoenv_clone where template = '$ISOENV_POSTGRES_POOL'\"";
    let mut run = p.cmd(&["run", "--isolated", "--pool", "--backend", "docker"]);
    for engine in ["postgres", "mysql", "redis"] {
        run.args(["--engine", engine]);
    }
    let out = run
        .args(["--", "sh", "-c", script])
        .env("ISOENV_MIGRATIONS_DIR", p.dir.path().join("migrations"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}\n{}", text(&out), sshd.log());
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "t",
        "{}",
        text(&out)
    );
    assert_eq!(containers_of(&p), Vec::<String>::new());
    assert_eq!(ssh_links_of(&p), Vec::<String>::new());
}
