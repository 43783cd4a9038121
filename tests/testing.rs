//! `isoenv::testing`: 50 tests per engine, run in parallel by the harness, each with its own
//! database from the migrated schema; none sees another's rows. Under `cargo xtask test
//! --isolated` they share the run's servers; under plain `cargo test` the first request
//! provisions servers for this process.

use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Wake, Waker};

use isoenv::engine::EngineKind;
use isoenv::testing::{self, blocking, TestDb};

/// The databases tests of this process hold right now: a handout must never be one of them.
static HELD: Mutex<Vec<String>> = Mutex::new(Vec::new());

fn held() -> std::sync::MutexGuard<'static, Vec<String>> {
    HELD.lock().unwrap_or_else(|e| e.into_inner())
}

fn claim(engine: EngineKind, case: &str) -> TestDb {
    let db = match engine {
        EngineKind::Postgres => blocking::postgres(),
        EngineKind::Mysql => blocking::mysql(),
        EngineKind::Redis => blocking::redis(),
    }
    .unwrap_or_else(|e| panic!("{case}: {e}"));
    let key = format!("{engine}/{}", db.name());
    let mut held = held();
    assert!(
        !held.contains(&key),
        "{case}: {key} handed out while another test holds it"
    );
    held.push(key);
    db
}

fn give_back(db: TestDb) {
    let key = format!("{}/{}", db.engine(), db.name());
    held().retain(|k| *k != key);
    drop(db);
}

/// The case's own rows, after writing its marker: the migrated seed plus the marker, nothing
/// from any other test.
fn isolated(engine: EngineKind, case: &str) {
    let db = claim(engine, case);
    match engine {
        EngineKind::Postgres => {
            let mut c = postgres::Client::connect(db.url(), postgres::NoTls).unwrap();
            c.execute("INSERT INTO accounts (owner) VALUES ($1)", &[&case])
                .unwrap();
            let owners: Vec<String> = c
                .query("SELECT owner FROM accounts ORDER BY id", &[])
                .unwrap()
                .iter()
                .map(|r| r.get(0))
                .collect();
            assert_eq!(owners, ["seed", case]);
        }
        EngineKind::Mysql => {
            use mysql::prelude::Queryable;
            let mut c = mysql::Conn::new(mysql::Opts::from_url(db.url()).unwrap()).unwrap();
            c.exec_drop("INSERT INTO accounts (owner) VALUES (?)", (case,))
                .unwrap();
            let owners: Vec<String> = c.query("SELECT owner FROM accounts ORDER BY id").unwrap();
            assert_eq!(owners, ["seed", case]);
        }
        EngineKind::Redis => {
            let mut c = redis::Client::open(db.url())
                .unwrap()
                .get_connection()
                .unwrap();
            let before: u64 = redis::cmd("DBSIZE").query(&mut c).unwrap();
            assert_eq!(before, 0, "{case}: its database was not empty");
            redis::cmd("SET")
                .arg("owner")
                .arg(case)
                .exec(&mut c)
                .unwrap();
            let keys: Vec<String> = redis::cmd("KEYS").arg("*").query(&mut c).unwrap();
            let owner: String = redis::cmd("GET").arg("owner").query(&mut c).unwrap();
            assert_eq!((keys, owner.as_str()), (vec!["owner".to_owned()], case));
        }
    }
    give_back(db);
}

macro_rules! cases {
    ($engine:ident, $kind:expr, [$($case:ident)*]) => {
        mod $engine {
            $(
                #[test]
                fn $case() {
                    super::isolated($kind, concat!(stringify!($engine), "-", stringify!($case)));
                }
            )*
        }
    };
}

macro_rules! fifty {
    ($engine:ident, $kind:expr) => {
        cases!($engine, $kind, [
            c00 c01 c02 c03 c04 c05 c06 c07 c08 c09 c10 c11 c12 c13 c14 c15 c16 c17 c18 c19
            c20 c21 c22 c23 c24 c25 c26 c27 c28 c29 c30 c31 c32 c33 c34 c35 c36 c37 c38 c39
            c40 c41 c42 c43 c44 c45 c46 c47 c48 c49
        ]);
    };
}

fifty!(postgres_db, isoenv::engine::EngineKind::Postgres);
fifty!(mysql_db, isoenv::engine::EngineKind::Mysql);
fifty!(redis_db, isoenv::engine::EngineKind::Redis);

/// A database dropped by its guard is gone from the server.
#[test]
fn a_released_postgres_database_is_dropped() {
    let db = claim(EngineKind::Postgres, "released");
    let name = db.name().to_owned();
    let admin_url = db.url().replace(&format!("/{name}"), "/postgres");
    give_back(db);
    let mut admin = postgres::Client::connect(&admin_url, postgres::NoTls).unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while admin
        .query_opt("SELECT 1 FROM pg_database WHERE datname = $1", &[&name])
        .unwrap()
        .is_some()
    {
        assert!(
            std::time::Instant::now() < deadline,
            "{name} was never dropped"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

/// The async API, driven by a minimal executor (no runtime needed).
#[test]
fn the_async_api_hands_out_databases_too() {
    let db = block_on(testing::postgres()).unwrap();
    let mut c = postgres::Client::connect(db.url(), postgres::NoTls).unwrap();
    let n: i64 = c
        .query_one("SELECT count(*) FROM accounts", &[])
        .unwrap()
        .get(0);
    assert_eq!(n, 1);
    let r = block_on(testing::redis()).unwrap();
    assert_ne!(r.name(), "0", "database 0 holds the leases");
}

fn block_on<F: std::future::Future>(f: F) -> F::Output {
    struct Unpark(std::thread::Thread);
    impl Wake for Unpark {
        fn wake(self: Arc<Self>) {
            self.0.unpark();
        }
    }
    let waker = Waker::from(Arc::new(Unpark(std::thread::current())));
    let mut cx = Context::from_waker(&waker);
    let mut f = std::pin::pin!(f);
    loop {
        match f.as_mut().poll(&mut cx) {
            Poll::Ready(v) => return v,
            Poll::Pending => std::thread::park(),
        }
    }
}
