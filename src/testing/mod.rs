//! Per-test databases (feature `testing`): a test asks for its own database and gets one,
//! dropped when its guard goes.
//!
//! ```no_run
//! # async fn demo() -> Result<(), isoenv::testing::TestingError> {
//! let db = isoenv::testing::postgres().await?; // or isoenv::testing::blocking::postgres()
//! let url = db.url(); // a database nobody else sees, with the migrations applied
//! # Ok(()) }
//! ```
//!
//! - PostgreSQL: clones of a template database that holds the migrations, rebuilt only when
//!   their hash changes, with a few clones made ahead of time so a handout is one query.
//! - MariaDB/MySQL: a database per test with the schema applied, also pooled ahead of time.
//! - Redis: a logical database of its own, flushed on release.
//!
//! The server is the one `cargo xtask test --isolated` exports (`ISOENV_<ENGINE>_URL`). Without
//! it, the first request provisions a server for this test process, which dies with it. The
//! pool and its leases live in the server itself, so it works under `cargo test` (threads) and
//! nextest (a process per test) alike.
//!
//! Migrations are the `*.sql` files in `$ISOENV_MIGRATIONS_DIR/<engine>/` (default: the
//! `migrations/` directory of the crate under test), applied in name order.

mod mysql;
mod postgres;
mod redis;

use std::collections::HashMap;
use std::fs;
use std::future::Future;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{mpsc, Arc, Mutex, OnceLock};
use std::task::{Context, Poll, Waker};

use crate::engine::EngineKind;
use crate::envfile::Vars;
use crate::process::ProcessId;
use crate::testrun::url_var;
use crate::workflow::{CreateOptions, Workspace};
use crate::EnvironmentConfig;

#[derive(Debug, thiserror::Error)]
pub enum TestingError {
    #[error("cannot provision a {engine} server for tests: {source}")]
    Provision {
        engine: EngineKind,
        source: Box<crate::Error>,
    },
    #[error("{engine} at {server}: {message}")]
    Server {
        engine: EngineKind,
        /// The server's address (no password).
        server: String,
        message: String,
    },
    #[error("migration {}: {message}", file.display())]
    Migration { file: PathBuf, message: String },
    #[error("cannot read migrations in {}: {source}", dir.display())]
    Migrations {
        dir: PathBuf,
        source: std::io::Error,
    },
}

pub type Result<T, E = TestingError> = std::result::Result<T, E>;

/// A database of one test's own. Dropping it gives it back (dropped, or flushed for Redis).
pub struct TestDb {
    engine: EngineKind,
    url: String,
    name: String,
    release: Option<Box<dyn FnOnce() + Send>>,
}

impl TestDb {
    /// The connection URL, password included.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The database's name (for Redis, its logical database number).
    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn engine(&self) -> EngineKind {
        self.engine
    }
}

impl std::fmt::Debug for TestDb {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TestDb")
            .field("engine", &self.engine)
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        if let Some(release) = self.release.take() {
            release();
        }
    }
}

/// The blocking API, for tests without an async runtime.
pub mod blocking {
    use super::*;

    pub fn postgres() -> Result<TestDb> {
        postgres::Pool::get()?.handout()
    }

    pub fn mysql() -> Result<TestDb> {
        mysql::Pool::get()?.handout()
    }

    pub fn redis() -> Result<TestDb> {
        redis::Pool::get()?.handout()
    }
}

pub async fn postgres() -> Result<TestDb> {
    off_thread(blocking::postgres).await
}

pub async fn mysql() -> Result<TestDb> {
    off_thread(blocking::mysql).await
}

pub async fn redis() -> Result<TestDb> {
    off_thread(blocking::redis).await
}

/// Runs `f` on its own thread and awaits it, so no runtime's worker is blocked and no
/// particular runtime is required.
fn off_thread<T: Send + 'static>(f: fn() -> T) -> impl Future<Output = T> {
    struct Shared<T> {
        value: Option<T>,
        waker: Option<Waker>,
    }
    struct Handle<T>(Arc<Mutex<Shared<T>>>);
    impl<T> Future for Handle<T> {
        type Output = T;
        fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<T> {
            let mut shared = self.0.lock().unwrap_or_else(|e| e.into_inner());
            match shared.value.take() {
                Some(v) => Poll::Ready(v),
                None => {
                    shared.waker = Some(cx.waker().clone());
                    Poll::Pending
                }
            }
        }
    }
    let shared = Arc::new(Mutex::new(Shared {
        value: None,
        waker: None,
    }));
    let theirs = shared.clone();
    std::thread::spawn(move || {
        let value = f();
        let mut s = theirs.lock().unwrap_or_else(|e| e.into_inner());
        s.value = Some(value);
        if let Some(w) = s.waker.take() {
            w.wake();
        }
    });
    Handle(shared)
}

/// The admin URL of the server for `engine`: the test run's, or one provisioned for this
/// process on first use.
fn server_url(engine: EngineKind) -> Result<String> {
    if let Ok(url) = std::env::var(url_var(engine)) {
        return Ok(url);
    }
    static SERVERS: OnceLock<Mutex<HashMap<EngineKind, String>>> = OnceLock::new();
    let servers = SERVERS.get_or_init(Default::default);
    let mut servers = servers.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(url) = servers.get(&engine) {
        return Ok(url.clone());
    }
    let url = provision(engine).map_err(|source| TestingError::Provision {
        engine,
        source: Box::new(source),
    })?;
    servers.insert(engine, url.clone());
    Ok(url)
}

/// Creates a server owned by this process in a shared temporary state root. It is spawned
/// from a thread that lives as long as the process, so it gets its stop signal when the test
/// process exits; what it leaves on disk is collected by the next provisioning.
fn provision(engine: EngineKind) -> crate::Result<String> {
    let (tx, rx) = mpsc::channel();
    std::thread::Builder::new()
        .name("isoenv-keeper".into())
        .spawn(move || {
            let _ = tx.send(provision_here(engine));
            // The server's parent-death signal is tied to this thread: keep it alive.
            loop {
                std::thread::park();
            }
        })
        .map_err(|e| crate::Error::Io {
            context: "cannot start the isoenv keeper thread".into(),
            cause: e,
        })?;
    rx.recv().unwrap_or_else(|_| {
        Err(crate::Error::Unsupported(
            "the isoenv keeper thread died".into(),
        ))
    })
}

fn provision_here(engine: EngineKind) -> crate::Result<String> {
    let base = std::env::temp_dir().join(format!("isoenv-testing-{}", nix::unistd::geteuid()));
    fs::create_dir_all(&base).map_err(|e| io(&base, e))?;
    // Servers run unprivileged when we are root: they must reach the state root.
    fs::set_permissions(&base, fs::Permissions::from_mode(0o755)).map_err(|e| io(&base, e))?;
    let vars = Vars::from_pairs([
        ("WASI_SANDBOX_DIR", base.join("state").display().to_string()),
        ("ISOENV_CACHE_DIR", base.join("cache").display().to_string()),
    ]);
    let config = EnvironmentConfig::from_vars(&vars, &base)?;
    let ws = Workspace::new(&config, vars);
    ws.gc()?;
    let me = ProcessId::of(std::process::id() as i32).map_err(|e| io(Path::new("/proc"), e))?;
    let name = format!("t{}-{}", me.pid, engine);
    let opts = CreateOptions {
        owner: Some(me),
        ..CreateOptions::server(&name, engine, crate::backend::BackendKind::Lightweight)
    };
    ws.create(&opts, &|_| {})?;
    ws.url(&name)
}

fn io(path: &Path, source: std::io::Error) -> crate::Error {
    crate::Error::Io {
        context: format!("cannot prepare {}", path.display()),
        cause: source,
    }
}

/// The migrations for `engine`, in order, and a hash of their names and contents.
fn migrations(engine: EngineKind) -> Result<(Vec<(PathBuf, String)>, String)> {
    let root = std::env::var_os("ISOENV_MIGRATIONS_DIR")
        .map(PathBuf::from)
        .or_else(|| {
            std::env::var_os("CARGO_MANIFEST_DIR").map(|d| Path::new(&d).join("migrations"))
        })
        .unwrap_or_else(|| PathBuf::from("migrations"));
    let dir = root.join(engine.as_str());
    let mut files = Vec::new();
    match fs::read_dir(&dir) {
        Ok(entries) => {
            for e in entries.flatten() {
                let path = e.path();
                if path.extension().is_some_and(|x| x == "sql") {
                    let text =
                        fs::read_to_string(&path).map_err(|source| TestingError::Migrations {
                            dir: dir.clone(),
                            source,
                        })?;
                    files.push((path, text));
                }
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(source) => return Err(TestingError::Migrations { dir, source }),
    }
    files.sort();
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for (path, text) in &files {
        let name = path.file_name().map(|n| n.to_string_lossy().into_owned());
        for b in name
            .unwrap_or_default()
            .bytes()
            .chain([0])
            .chain(text.bytes())
        {
            hash = (hash ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
        }
    }
    Ok((files, format!("{hash:016x}")))
}

/// `scheme://user:pw@host:port/OLD?query` with the database replaced.
fn with_database(url: &str, db: &str) -> String {
    let authority_end = url
        .find("://")
        .map(|i| i + 3)
        .and_then(|start| url[start..].find('/').map(|i| start + i))
        .unwrap_or(url.len());
    let query = url[authority_end..]
        .find('?')
        .map(|i| &url[authority_end + i..]);
    format!("{}/{db}{}", &url[..authority_end], query.unwrap_or(""))
}

/// The address of a URL without its credentials, for messages.
fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(at)) if at > s => format!("{}{}", &url[..s + 3], &url[at + 1..]),
        _ => url.to_owned(),
    }
}

/// A short random suffix for database names.
fn unique() -> String {
    use rand::Rng;
    let n: u64 = rand::rng().random();
    format!("{n:016x}")
}

/// One pool per engine and process, made on first use; a failed attempt is tried again by the
/// next caller.
fn shared<P: Sync>(
    slot: &'static Mutex<Option<&'static P>>,
    make: fn() -> Result<P>,
) -> Result<&'static P> {
    let mut slot = slot.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(p) = *slot {
        return Ok(p);
    }
    let p: &'static P = Box::leak(Box::new(make()?));
    *slot = Some(p);
    Ok(p)
}

/// What a pool's background thread is asked to do.
enum Work {
    /// Top the pool up to [`pool_size`].
    Refill,
    /// Drop a released database.
    Drop(String),
}

/// A pool's background thread (PostgreSQL, MariaDB). Its errors cannot reach a test, so they
/// are printed; a handout that finds the pool empty makes its database itself.
struct Worker(Mutex<mpsc::Sender<Work>>);

impl Worker {
    fn spawn(
        engine: EngineKind,
        url: &str,
        mut step: impl FnMut(Work) -> Result<()> + Send + 'static,
    ) -> Result<Worker> {
        let (tx, rx) = mpsc::channel();
        std::thread::Builder::new()
            .name(format!("isoenv-{engine}-pool"))
            .spawn(move || {
                for w in rx {
                    if let Err(e) = step(w) {
                        eprintln!("isoenv::testing: {e}");
                    }
                }
            })
            .map_err(|e| TestingError::Server {
                engine,
                server: redact(url),
                message: format!("cannot start the pool thread: {e}"),
            })?;
        let worker = Worker(Mutex::new(tx));
        worker.send(Work::Refill);
        Ok(worker)
    }

    fn send(&self, w: Work) {
        let _ = self.0.lock().unwrap_or_else(|e| e.into_inner()).send(w);
    }
}

/// How many databases each pool keeps made ahead of time.
fn pool_size() -> usize {
    std::env::var("ISOENV_POOL_SIZE")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(8)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_get_another_database() {
        assert_eq!(
            with_database("postgres://u:p@127.0.0.1:5/postgres?sslmode=disable", "t_1"),
            "postgres://u:p@127.0.0.1:5/t_1?sslmode=disable"
        );
        assert_eq!(
            with_database("mysql://u:p@127.0.0.1:5/isoenv", "t_2"),
            "mysql://u:p@127.0.0.1:5/t_2"
        );
        assert_eq!(with_database("redis://:p@h:1", "3"), "redis://:p@h:1/3");
        assert_eq!(redact("postgres://u:secret@h:1/d"), "postgres://h:1/d");
    }
}
