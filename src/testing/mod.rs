//! Per-test databases (feature `testing`): a test asks for its own database and gets one,
//! given back when its guard goes.
//!
//! ```no_run
//! # async fn demo() -> Result<(), isoenv::testing::TestingError> {
//! let db = isoenv::testing::postgres().await?; // or isoenv::testing::blocking::postgres()
//! let url = db.url(); // a database nobody else sees, with the migrations applied
//! # Ok(()) }
//! ```
//!
//! - PostgreSQL: clones of a template database that holds the migrations, rebuilt only when
//!   their hash changes, with a few clones made ahead of time and released ones reset.
//! - MariaDB/MySQL: a database per test with the schema applied, also pooled ahead of time.
//! - Redis: a logical database of its own, flushed on release.
//!
//! The server is the one `cargo xtask test --isolated` exports (`ISOENV_<ENGINE>_URL`). Without
//! it, the first request provisions a server shared by the run's test processes (or, outside a
//! runner, one for this process, which dies with it). The pool is a table in the server, so it
//! works under `cargo test` (threads) and nextest (a process per test) alike; under a runner a
//! keeper process lends its databases over a local socket and resets them.
//!
//! Migrations are the `*.sql` files in `$ISOENV_MIGRATIONS_DIR/<engine>/` (default: the
//! `migrations/` directory of the crate under test), applied in name order.

mod ddl;
mod keeper;
mod lease;
mod mysql;
mod postgres;
mod redis;
mod server;

use std::collections::HashMap;
use std::fs;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::task::{Context, Poll, Waker};

use crate::engine::EngineKind;
use crate::sys::process::ProcessId;
use lease::Lender;

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

/// Removes the stopped servers that test runs under a plain `cargo test` or `cargo nextest run`
/// left for the next run to take on (with their pools' databases), returning their names; a
/// running test run's are left alone. `db gc --test-servers` calls it.
pub fn remove_kept_servers() -> crate::Result<Vec<String>> {
    server::remove_kept()
}

/// A database of one test's own. Dropping it gives it back, to be made clean for the next test
/// (flushed, for Redis).
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
        lent(EngineKind::Postgres, postgres::key, postgres::Pool::get)
    }

    pub fn mysql() -> Result<TestDb> {
        lent(EngineKind::Mysql, mysql::key, mysql::Pool::get)
    }

    /// A database from the run's keeper if one serves, else from this process's own `pool`.
    fn lent<P: Lender>(
        engine: EngineKind,
        key: fn(&str) -> String,
        pool: fn() -> Result<Arc<P>>,
    ) -> Result<TestDb> {
        server::in_use();
        match borrowed(engine, key)? {
            Some(db) => Ok(db),
            None => pool()?.lend(),
        }
    }

    /// A database from the run's keeper, if one serves: `key` names the pool from the
    /// migrations' hash.
    fn borrowed(engine: EngineKind, key: fn(&str) -> String) -> Result<Option<TestDb>> {
        // The server and the pool's key, read once per process.
        static KNOWN: Mutex<Vec<(EngineKind, String, String)>> = Mutex::new(Vec::new());
        let mut known = KNOWN.lock().unwrap_or_else(|e| e.into_inner());
        let (url, key) = match known.iter().find(|(e, _, _)| *e == engine) {
            Some((_, url, key)) => (url.clone(), key.clone()),
            None => {
                let source = Source::of_test(engine)?;
                let found = (source.url, key(&source.hash));
                known.push((engine, found.0.clone(), found.1.clone()));
                found
            }
        };
        drop(known);
        Ok(lease::borrow(engine, &url, &key))
    }

    pub fn redis() -> Result<TestDb> {
        server::in_use();
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

/// Where a pool's databases come from: the server, and the migrations with their hash.
struct Source {
    url: String,
    files: Vec<(PathBuf, String)>,
    hash: String,
}

impl Source {
    /// A test process's: the run's server (provisioned if none was exported) and the migrations
    /// of the crate under test.
    fn of_test(engine: EngineKind) -> Result<Source> {
        let root = std::env::var_os("ISOENV_MIGRATIONS_DIR")
            .map(PathBuf::from)
            .or_else(|| {
                std::env::var_os("CARGO_MANIFEST_DIR").map(|d| Path::new(&d).join("migrations"))
            })
            .unwrap_or_else(|| PathBuf::from("migrations"));
        Source::at(engine, server::url(engine)?, &root)
    }

    fn at(engine: EngineKind, url: String, migrations_root: &Path) -> Result<Source> {
        let (files, hash) = migrations(engine, migrations_root)?;
        Ok(Source { url, files, hash })
    }
}

/// A pool set up for tests in any language: what `run --pool` keeps while its command runs.
/// The tests claim and release databases with the SQL statements of the README's protocol;
/// the keeper resets released ones and tops the pool up.
pub struct PoolKeeper(Kept);

enum Kept {
    Postgres(postgres::Pool),
    Mysql(mysql::Pool),
}

impl PoolKeeper {
    /// Sets `engine`'s pool up on the server at `url`: a template made from the migrations
    /// under `migrations_root`/ENGINE (unless it exists) and its first databases. Redis needs
    /// none (a test leases a logical database with `SET NX`).
    pub fn open(engine: EngineKind, url: &str, migrations_root: &Path) -> Result<Option<Self>> {
        let source = Source::at(engine, url.to_owned(), migrations_root)?;
        Ok(match engine {
            EngineKind::Postgres => Some(PoolKeeper(Kept::Postgres(postgres::Pool::open(
                source, None,
            )?))),
            EngineKind::Mysql => Some(PoolKeeper(Kept::Mysql(mysql::Pool::open(source, None)?))),
            EngineKind::Redis => None,
        })
    }

    /// Whether `migrations_root` holds migrations for `engine` (`ENGINE/*.sql`): a sign that the
    /// tests use the pools, which are made from them.
    pub fn has_migrations(engine: EngineKind, migrations_root: &Path) -> bool {
        migrations(engine, migrations_root).is_ok_and(|(files, _)| !files.is_empty())
    }

    /// The pool's key, which claims name: the template's name (PostgreSQL) or the schema's
    /// hash (MariaDB).
    pub fn key(&self) -> &str {
        match &self.0 {
            Kept::Postgres(p) => p.key(),
            Kept::Mysql(p) => p.key(),
        }
    }

    /// Keeps the pool on a thread of this process while `runner` lives.
    pub fn keep(self, runner: ProcessId) {
        std::thread::spawn(move || {
            let (engine, outcome) = match self.0 {
                Kept::Postgres(p) => (EngineKind::Postgres, postgres::serve(p, runner)),
                Kept::Mysql(p) => (EngineKind::Mysql, mysql::serve(p, runner)),
            };
            // After the runner, the server goes too: an error then is the teardown's.
            if let (Err(e), true) = (outcome, runner.is_running()) {
                eprintln!("isoenv: the {engine} pool's keeper stopped: {e}");
            }
        });
    }
}

/// The migrations for `engine` under `root`, in order, and a hash of their names and contents.
fn migrations(engine: EngineKind, root: &Path) -> Result<(Vec<(PathBuf, String)>, String)> {
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

/// Says why this process stops, then aborts it. Written to the standard error itself: the test
/// harness captures what `eprintln!` prints on a test's threads, and an abort loses that.
fn stop_process(why: &str) -> ! {
    use std::io::Write;
    let _ = std::io::stderr().write_all(format!("isoenv: {why}\n").as_bytes());
    std::process::abort()
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
fn shared<P>(slot: &'static Mutex<Option<Arc<P>>>, make: fn() -> Result<P>) -> Result<Arc<P>> {
    let mut slot = slot.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(p) = &*slot {
        return Ok(p.clone());
    }
    let p = Arc::new(make()?);
    *slot = Some(p.clone());
    Ok(p)
}

/// The resets under way in a pool of this process, so that a claimer finding nothing free waits
/// for one to end rather than making a new database (a reset takes milliseconds, a new
/// database a hundred or more).
#[derive(Default)]
struct Resets {
    /// How many are under way, and how many have ended.
    counts: Mutex<(usize, u64)>,
    ended: Condvar,
}

impl Resets {
    /// Runs a reset, counted.
    fn during<T>(&self, reset: impl FnOnce() -> T) -> T {
        self.counts.lock().unwrap_or_else(|e| e.into_inner()).0 += 1;
        let out = reset();
        let mut counts = self.counts.lock().unwrap_or_else(|e| e.into_inner());
        *counts = (counts.0 - 1, counts.1 + 1);
        drop(counts);
        self.ended.notify_all();
        out
    }

    /// How many resets have ended so far: what [`Resets::wait`] compares with.
    fn ended(&self) -> u64 {
        self.counts.lock().unwrap_or_else(|e| e.into_inner()).1
    }

    /// Whether a reset has ended since `seen` (then what it freed is worth looking for),
    /// waiting for one if any is under way; false at once when none is.
    fn wait(&self, seen: u64) -> bool {
        let counts = self.counts.lock().unwrap_or_else(|e| e.into_inner());
        if counts.1 != seen {
            return true;
        }
        if counts.0 == 0 {
            return false;
        }
        let timeout = std::time::Duration::from_secs(10);
        let _ = self.ended.wait_timeout(counts, timeout);
        true
    }
}

/// Connections a pool keeps open between uses. Leases name the connection that claimed them,
/// so admin connections stay here for the process's lifetime rather than being closed.
struct Idle<C>(Mutex<Vec<C>>);

impl<C> Idle<C> {
    fn new(first: C) -> Self {
        Idle(Mutex::new(vec![first]))
    }

    /// A kept connection that is still `open`, else a new one.
    fn take(&self, open: fn(&C) -> bool, connect: impl FnOnce() -> Result<C>) -> Result<C> {
        match self.0.lock().unwrap_or_else(|e| e.into_inner()).pop() {
            Some(c) if open(&c) => Ok(c),
            _ => connect(),
        }
    }

    fn put(&self, c: C) {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).push(c);
    }

    /// Opens connections until one per CPU is kept, so that a keeper's first handouts, which
    /// come at once, do not each wait for a new one.
    fn fill(&self, connect: impl Fn() -> Result<C>) {
        let cpus = std::thread::available_parallelism().map_or(2, usize::from);
        while self.0.lock().unwrap_or_else(|e| e.into_inner()).len() < cpus {
            match connect() {
                Ok(c) => self.put(c),
                Err(_) => return,
            }
        }
    }
}

/// A connection into each database a pool has reset, kept for its next reset (a new one costs a
/// login). At most two per database the pool makes ahead of time are kept, so a pool that grew
/// large does not hold the server's connections.
struct Inside<C>(Mutex<HashMap<String, C>>);

impl<C> Inside<C> {
    fn new() -> Self {
        Inside(Mutex::new(HashMap::new()))
    }

    /// The kept connection into `name`, if any (it is no longer kept).
    fn take(&self, name: &str) -> Option<C> {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(name)
    }

    fn keep(&self, name: &str, c: C) {
        let mut kept = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if kept.len() < 2 * pool_size() {
            kept.insert(name.to_owned(), c);
        }
    }
}

/// How many databases a pool makes ahead of time when its schema is first set up
/// (`ISOENV_POOL_SIZE`, default: three per CPU: for the tests running at once, those just
/// released, which are being reset, and as many again so a handout seldom waits for a reset).
/// Released databases are given back clean, so a pool grows only when more tests run at once
/// than it holds.
fn pool_size() -> usize {
    // Read once: a keeper asks at every reset, and the CPU count is read from cgroup files.
    static SIZE: OnceLock<usize> = OnceLock::new();
    *SIZE.get_or_init(|| {
        std::env::var("ISOENV_POOL_SIZE")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| 3 * std::thread::available_parallelism().map_or(2, usize::from))
    })
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
