//! Databases isoenv does not run, for real: the development VM reached through a real `sshd` on
//! 127.0.0.1 (the "VM database" is a local PostgreSQL), and a production PostgreSQL that accepts
//! only TLS, with a CA and server certificate generated here.

use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::thread::sleep;
use std::time::{Duration, Instant};

use tempfile::TempDir;

mod support;
use support::sshd::Sshd;
use support::{text, Project};

/// `.env` lines for a development tunnel through `sshd` to the database at
/// 127.0.0.1:`db.0` (as the server sees it) with password `db.1`.
fn tunnel_env(sshd: &Sshd, db: (u16, &str), key: &str, extra: &str) -> String {
    format!(
        "DB_VM_HOST=127.0.0.1\nDB_VM_PORT={}\nDB_VM_NAME=postgres\nDB_VM_USER=postgres\n\
         DB_VM_PASSWORD={}\nDB_VM_SSH_ENABLED=true\nDB_VM_SSH_HOST=127.0.0.1\n\
         DB_VM_SSH_PORT={}\nDB_VM_SSH_USER={}\nDB_VM_SSH_KEY={}\n{extra}",
        db.0,
        db.1,
        sshd.port,
        whoami(),
        sshd.key(key).display()
    )
}

/// A PostgreSQL made by isoenv in its own project: the "VM" or "production" database.
struct Target {
    project: Project,
    port: u16,
    password: String,
}

impl Target {
    fn postgres() -> Self {
        let project = Project::new("");
        project.ok(&["db", "create", "target", "--engine", "postgres"]);
        let url = project.ok(&["db", "url", "target"]);
        // postgres://postgres:PASSWORD@127.0.0.1:PORT/postgres?sslmode=disable
        let (userinfo, rest) = url.trim().split_once('@').unwrap();
        let password = userinfo.rsplit(':').next().unwrap().to_owned();
        let port = rest.split(['/', ':']).nth(1).unwrap().parse().unwrap();
        Target {
            project,
            port,
            password,
        }
    }

    fn addr(&self) -> (u16, &str) {
        (self.port, &self.password)
    }

    fn client(&self) -> postgres::Client {
        postgres::Config::new()
            .host("127.0.0.1")
            .port(self.port)
            .user("postgres")
            .password(&self.password)
            .dbname("postgres")
            .connect(postgres::NoTls)
            .unwrap()
    }

    /// Restarts the server with TLS on and only `hostssl` TCP logins, using `cert`/`key`.
    fn require_tls(&self, cert: &str, key: &str) {
        let data = self.project.state().join("target/data");
        let owner = fs::metadata(&data).unwrap();
        self.project.ok(&["db", "stop", "target"]);
        for (name, body, mode) in [("server.crt", cert, 0o644), ("server.key", key, 0o600)] {
            let path = data.join(name);
            fs::write(&path, body).unwrap();
            fs::set_permissions(&path, fs::Permissions::from_mode(mode)).unwrap();
            std::os::unix::fs::chown(&path, Some(owner.uid()), Some(owner.gid())).unwrap();
        }
        let conf = data.join("postgresql.conf");
        let mut text = fs::read_to_string(&conf).unwrap();
        text.push_str("\nssl = on\nssl_cert_file = 'server.crt'\nssl_key_file = 'server.key'\n");
        fs::write(&conf, text).unwrap();
        fs::write(
            data.join("pg_hba.conf"),
            "local all all trust\nhostssl all all 127.0.0.1/32 scram-sha-256\n",
        )
        .unwrap();
        self.project.ok(&["db", "start", "target"]);
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn whoami() -> String {
    let uid = nix::unistd::geteuid();
    nix::unistd::User::from_uid(uid).unwrap().unwrap().name
}

/// Processes whose command line mentions `needle` (a path unique to one test), not zombies.
fn processes_mentioning(needle: &str) -> Vec<i32> {
    let mut out = Vec::new();
    for entry in fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let cmdline = fs::read(entry.path().join("cmdline")).unwrap_or_default();
        let stat = fs::read_to_string(entry.path().join("stat")).unwrap_or_default();
        let zombie = stat
            .rsplit(')')
            .next()
            .is_some_and(|s| s.trim_start().starts_with('Z'));
        if !zombie && String::from_utf8_lossy(&cmdline).contains(needle) {
            out.push(pid);
        }
    }
    out
}

fn query_count(url: &str) -> i64 {
    let mut c = postgres::Client::connect(url, postgres::NoTls).unwrap();
    c.query_one("SELECT count(*) FROM tunnelled", &[])
        .unwrap()
        .get(0)
}

#[test]
fn tunnel_up_query_detect_repair_and_down() {
    let sshd = Sshd::start_on("127.0.0.1");
    let vm = Target::postgres();
    vm.client()
        .batch_execute("CREATE TABLE tunnelled (id int); INSERT INTO tunnelled VALUES (1), (2)")
        .unwrap();
    let dev = Project::new(&tunnel_env(&sshd, vm.addr(), "user_key", ""));
    let up = dev.json(&["db", "up", "--json"]);
    assert_eq!(up["outcome"], "created", "{up}");
    assert_eq!(up["backend"], "ssh-tunnel");
    let local_port = up["port"].as_u64().unwrap();
    assert_ne!(local_port, u64::from(vm.port));

    // A real client through the tunnel sees the VM's rows.
    let url = dev.ok(&["db", "url", "vm"]).trim().to_owned();
    assert!(url.contains(&format!("127.0.0.1:{local_port}")), "{url}");
    assert_eq!(query_count(&url), 2);
    // And so does psql in a shell that sourced the activate script.
    let activate = dev.state().join("vm/bin/activate");
    let out = Command::new("bash")
        .arg("-c")
        .arg(format!(
            "source {} && psql -tAc 'SELECT count(*) FROM tunnelled'",
            activate.display()
        ))
        .env_remove("PGPASSWORD")
        .output()
        .unwrap();
    assert_eq!(text(&out).trim(), "2", "{}", text(&out));
    assert!(dev.run(&["db", "status"]).status.success());

    // Killing ssh is detected by status, and `up` repairs it on the same port. SIGKILL is
    // asynchronous: status may only be asked once ssh is really gone (or a zombie), or it could
    // still see the tunnel running and then find the forwarded port closed.
    let pid = up["pid"].as_i64().unwrap() as i32;
    let state_root = dev.state().display().to_string();
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::SIGKILL).unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while processes_mentioning(&state_root).contains(&pid) {
        assert!(Instant::now() < deadline, "ssh {pid} survived SIGKILL");
        sleep(Duration::from_millis(5));
    }
    let status = dev.run(&["db", "status"]);
    assert!(!status.status.success(), "{}", text(&status));
    assert!(
        text(&status).contains("ssh tunnel: crashed"),
        "{}",
        text(&status)
    );
    let again = dev.json(&["db", "up", "--json"]);
    assert_eq!(again["outcome"], "started", "{again}");
    assert_eq!(again["port"].as_u64(), Some(local_port));
    assert_eq!(query_count(&url), 2);
    assert_eq!(dev.json(&["db", "up", "--json"])["outcome"], "already-up");

    // `down` closes it: no ssh process of this project is left.
    dev.ok(&["db", "down"]);
    assert_eq!(processes_mentioning(&state_root), Vec::<i32>::new());
    let status = dev.run(&["db", "status"]);
    assert!(!status.status.success());
    assert!(text(&status).contains("stopped"), "{}", text(&status));
    // Nothing printed the VM's password.
    for args in [
        &["db", "up"][..],
        &["db", "status"],
        &["db", "list"],
        &["env"],
    ] {
        assert!(!text(&dev.run(args)).contains(&vm.password), "{args:?}");
    }
}

#[test]
fn each_failing_hop_has_its_own_error_and_leaves_nothing() {
    let sshd = Sshd::start_on("127.0.0.1");
    let vm = Target::postgres();
    let cases: Vec<(&str, String, &str)> = vec![
        (
            "a key the server does not accept",
            tunnel_env(&sshd, vm.addr(), "other_key", ""),
            "failed at the ssh authentication hop",
        ),
        (
            "an unknown host key under strict checking",
            tunnel_env(
                &sshd,
                vm.addr(),
                "user_key",
                "DB_VM_SSH_STRICT_HOST_KEYS=true\n",
            ),
            "failed at the host key verification (unknown host key) hop",
        ),
        (
            "a closed remote port",
            tunnel_env(&sshd, (free_port(), &vm.password), "user_key", ""),
            "failed at the remote database port hop",
        ),
        (
            "a wrong database password",
            tunnel_env(&sshd, (vm.port, "not-the-password"), "user_key", ""),
            "failed at the database hop",
        ),
        (
            "no sshd at that port",
            tunnel_env(&sshd, vm.addr(), "user_key", "").replace(
                &format!("DB_VM_SSH_PORT={}", sshd.port),
                &format!("DB_VM_SSH_PORT={}", free_port()),
            ),
            "failed at the ssh connection hop",
        ),
    ];
    for (what, env, expected) in cases {
        let dev = Project::new(&env);
        let err = dev.fails(&["db", "up"]);
        assert!(err.contains(expected), "{what}: {err}");
        assert!(err.contains("fix:"), "{what}: {err}");
        assert!(
            !dev.state().join("vm").exists(),
            "{what} left the environment behind"
        );
        let root = dev.state().display().to_string();
        assert_eq!(
            processes_mentioning(&root),
            Vec::<i32>::new(),
            "{what} left ssh running"
        );
    }

    // A host key that changed is refused even without strict checking.
    let dev = Project::new(&tunnel_env(&sshd, vm.addr(), "user_key", ""));
    fs::create_dir_all(dev.state()).unwrap();
    let other = fs::read_to_string(sshd.key("other_key.pub")).unwrap();
    let fake: Vec<&str> = other.split_whitespace().take(2).collect();
    fs::write(
        dev.state().join("known_hosts"),
        format!("[127.0.0.1]:{} {}\n", sshd.port, fake.join(" ")),
    )
    .unwrap();
    let err = dev.fails(&["db", "up"]);
    assert!(
        err.contains("host key verification (host key changed)"),
        "{err}"
    );
}

struct Pki {
    dir: TempDir,
}

impl Pki {
    /// A CA, a server certificate for 127.0.0.1 signed by it, and an unrelated second CA.
    fn new() -> (Self, String, String) {
        use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};
        let dir = tempfile::tempdir().unwrap();
        let ca = |name: &str| {
            let key = KeyPair::generate().unwrap();
            let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
            params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
            params.distinguished_name.push(DnType::CommonName, name);
            let cert = params.self_signed(&key).unwrap();
            (cert, key)
        };
        let (ca_cert, ca_key) = ca("isoenv test CA");
        let (other_ca, _) = ca("some other CA");
        let server_key = KeyPair::generate().unwrap();
        let server = CertificateParams::new(vec!["127.0.0.1".to_owned()])
            .unwrap()
            .signed_by(&server_key, &ca_cert, &ca_key)
            .unwrap();
        fs::write(dir.path().join("ca.pem"), ca_cert.pem()).unwrap();
        fs::write(dir.path().join("other-ca.pem"), other_ca.pem()).unwrap();
        (Pki { dir }, server.pem(), server_key.serialize_pem())
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
}

#[test]
fn production_is_verified_over_tls_and_never_changed() {
    let db = Target::postgres();
    let (pki, cert, key) = Pki::new();
    db.require_tls(&cert, &key);
    let prod = |extra: &str| {
        Project::new(&format!(
            "ENVIRONMENT=production\nDB_PROD_HOST=127.0.0.1\nDB_PROD_PORT={}\nDB_PROD_NAME=postgres\n\
             DB_PROD_USER=postgres\nDB_PROD_PASSWORD={}\n{extra}",
            db.port, db.password
        ))
    };

    let require = prod("DB_PROD_SSL_MODE=require\n");
    let out = require.ok(&["db", "up"]);
    assert!(out.contains("verified"), "{out}");
    assert!(out.contains("TLS TLSv1."), "{out}");
    assert!(out.contains("not verified"), "{out}");
    let j = require.json(&["db", "up", "--json"]);
    assert_eq!(j["outcome"], "verified");
    assert!(j["report"]["tls"]["protocol"]
        .as_str()
        .unwrap()
        .starts_with("TLSv1."));
    assert!(require.run(&["db", "status"]).status.success());
    assert!(
        !require.state().exists(),
        "production `up` must create nothing"
    );

    let full = prod(&format!(
        "DB_PROD_SSL_MODE=verify-full\nDB_PROD_SSL_ROOT_CERT={}\n",
        pki.path("ca.pem").display()
    ));
    let out = full.ok(&["db", "up"]);
    assert!(out.contains("host name checked"), "{out}");

    let wrong_ca = prod(&format!(
        "DB_PROD_SSL_MODE=verify-full\nDB_PROD_SSL_ROOT_CERT={}\n",
        pki.path("other-ca.pem").display()
    ));
    let err = wrong_ca.fails(&["db", "up"]);
    assert!(err.contains("certificate"), "{err}");
    assert!(err.contains("DB_PROD_SSL_ROOT_CERT"), "{err}");
    assert!(!wrong_ca.run(&["db", "status"]).status.success());

    // Without TLS: isoenv's configuration refuses it in production...
    let plain = prod("DB_PROD_SSL_MODE=disable\n");
    let err = plain.fails(&["db", "up"]);
    assert!(err.contains("DB_PROD_SSL_MODE"), "{err}");
    // ...and the server itself refuses a plaintext login, which is reported as such.
    let vars = isoenv::Vars::from_pairs([
        ("ENVIRONMENT", "staging".to_owned()),
        ("DB_STAGING_HOST", "127.0.0.1".to_owned()),
        ("DB_STAGING_PORT", db.port.to_string()),
        ("DB_STAGING_PASSWORD", db.password.clone()),
        ("DB_STAGING_SSL_MODE", "disable".to_owned()),
    ]);
    let config = isoenv::EnvironmentConfig::from_vars(&vars, Path::new("/")).unwrap();
    let c = config.database_config();
    let err = isoenv::remote::check(c, &c.host, c.port).unwrap_err();
    assert_eq!(
        err.kind,
        isoenv::remote::FailureKind::TlsRequiredByServer,
        "{err}"
    );
    assert!(err.advice("DB_STAGING_").contains("only TLS"));

    // Nothing destructive or provisioning runs in production.
    for args in [
        &["db", "create", "x", "--engine", "postgres"][..],
        &["db", "start", "x"],
        &["db", "stop", "x"],
        &["db", "destroy", "x"],
        &["db", "down"],
    ] {
        let err = require.fails(args);
        assert!(err.contains("refusing to"), "{args:?}: {err}");
    }
    for args in [&["db", "up"][..], &["db", "status"], &["env"]] {
        assert!(!text(&require.run(args)).contains(&db.password), "{args:?}");
    }
}
