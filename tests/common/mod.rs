//! Shared setup for integration tests: a private state root per test, a shared cache of
//! initialized data directories (so only the first test pays for initdb), and real clients.
#![allow(dead_code)]

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use isoenv::engine::EngineKind;
use isoenv::workspace::Workspace;
use isoenv::{EnvironmentConfig, Vars};
use tempfile::TempDir;

pub struct Sandbox {
    pub dir: TempDir,
    pub ws: Workspace,
}

impl Sandbox {
    pub fn root(&self) -> PathBuf {
        self.dir.path().join("state")
    }
}

pub fn cache_dir() -> PathBuf {
    Path::new(env!("CARGO_TARGET_TMPDIR")).join("isoenv-cache")
}

/// A temp dir the unprivileged service user can traverse (tempfile makes them 0700).
pub fn reachable_tempdir() -> TempDir {
    let dir = tempfile::Builder::new()
        .prefix("isoenv-")
        .tempdir()
        .unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    dir
}

pub fn sandbox(extra: &[(&str, &str)]) -> Sandbox {
    let dir = reachable_tempdir();
    let state = dir.path().join("state");
    let cache = cache_dir();
    let mut pairs = vec![
        ("WASI_SANDBOX_DIR".to_owned(), state.display().to_string()),
        ("ISOENV_CACHE_DIR".to_owned(), cache.display().to_string()),
    ];
    pairs.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
    let vars = Vars::from_pairs(pairs);
    let config = EnvironmentConfig::from_vars(&vars, dir.path()).unwrap();
    Sandbox {
        ws: Workspace::new(&config, vars),
        dir,
    }
}

/// Writes a row through the engine's real client.
pub fn write(engine: EngineKind, url: &str, value: &str) {
    match engine {
        EngineKind::Postgres => {
            let mut c = postgres::Client::connect(url, postgres::NoTls).unwrap();
            c.batch_execute("CREATE TABLE IF NOT EXISTS t (v text)")
                .unwrap();
            c.execute("INSERT INTO t VALUES ($1)", &[&value]).unwrap();
        }
        EngineKind::Mysql => {
            use mysql::prelude::Queryable;
            let mut c = mysql::Conn::new(mysql::Opts::from_url(url).unwrap()).unwrap();
            c.query_drop("CREATE TABLE IF NOT EXISTS t (v text)")
                .unwrap();
            c.exec_drop("INSERT INTO t VALUES (?)", (value,)).unwrap();
        }
        EngineKind::Redis => {
            let mut c = redis::Client::open(url).unwrap().get_connection().unwrap();
            redis::cmd("RPUSH")
                .arg("t")
                .arg(value)
                .exec(&mut c)
                .unwrap();
        }
    }
}

/// Reads the rows back through the engine's real client.
pub fn read(engine: EngineKind, url: &str) -> Vec<String> {
    match engine {
        EngineKind::Postgres => {
            let mut c = postgres::Client::connect(url, postgres::NoTls).unwrap();
            c.query("SELECT v FROM t", &[])
                .unwrap()
                .iter()
                .map(|r| r.get(0))
                .collect()
        }
        EngineKind::Mysql => {
            use mysql::prelude::Queryable;
            let mut c = mysql::Conn::new(mysql::Opts::from_url(url).unwrap()).unwrap();
            c.query("SELECT v FROM t").unwrap()
        }
        EngineKind::Redis => {
            let mut c = redis::Client::open(url).unwrap().get_connection().unwrap();
            redis::cmd("LRANGE")
                .arg("t")
                .arg(0)
                .arg(-1)
                .query(&mut c)
                .unwrap()
        }
    }
}

/// Whether a login with a wrong password is refused (authentication is really on).
pub fn wrong_password_refused(engine: EngineKind, url: &str, password: &str) -> bool {
    let bad = url.replacen(password, "wrong-password", 1);
    match engine {
        EngineKind::Postgres => postgres::Client::connect(&bad, postgres::NoTls).is_err(),
        EngineKind::Mysql => mysql::Conn::new(mysql::Opts::from_url(&bad).unwrap()).is_err(),
        EngineKind::Redis => redis::Client::open(bad.as_str())
            .unwrap()
            .get_connection()
            .is_err(),
    }
}

pub fn pid_alive(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| {
            s.rsplit(')')
                .next()
                .and_then(|r| r.split_whitespace().next())
                != Some("Z")
        })
        .unwrap_or(false)
}

pub fn port_open(port: u16) -> bool {
    std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
}

pub fn no_progress(_: &str) {}
