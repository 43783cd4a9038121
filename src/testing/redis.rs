//! Redis: a logical database of each test's own, leased with `SET NX` on database 0 (so every
//! test process shares the leases) and flushed on release.

use std::sync::{Arc, Mutex};

use super::{redact, shared, unique, with_database, Result, TestDb, TestingError};
use crate::engine::EngineKind;

/// A lease outlives any sane test; it only matters if a test process dies holding it.
const LEASE_SECONDS: u64 = 6 * 3600;

pub(super) struct Pool {
    url: String,
    databases: u32,
    conn: Mutex<redis::Connection>,
}

impl Pool {
    pub(super) fn get() -> Result<Arc<Pool>> {
        static POOL: Mutex<Option<Arc<Pool>>> = Mutex::new(None);
        shared(&POOL, Pool::new)
    }

    fn new() -> Result<Pool> {
        let url = with_database(&super::server::url(EngineKind::Redis)?, "0");
        let err = |e: redis::RedisError| server_error(&url, e);
        let mut conn = redis::Client::open(url.as_str())
            .and_then(|c| c.get_connection())
            .map_err(err)?;
        let (_, databases): (String, u32) = redis::cmd("CONFIG")
            .arg("GET")
            .arg("databases")
            .query(&mut conn)
            .map_err(err)?;
        Ok(Pool {
            url,
            databases,
            conn: Mutex::new(conn),
        })
    }

    pub(super) fn handout(self: Arc<Self>) -> Result<TestDb> {
        let token = unique();
        // Database 0 holds the leases; start at a random one to spread contention.
        let usable = self.databases.saturating_sub(1).max(1);
        let start = u32::from_str_radix(&token[..8], 16).unwrap_or(0) % usable;
        let mut conn = self.conn.lock().unwrap_or_else(|e| e.into_inner());
        for i in 0..usable {
            let db = 1 + (start + i) % usable;
            let leased: Option<String> = redis::cmd("SET")
                .arg(lease_key(db))
                .arg(&token)
                .arg("NX")
                .arg("EX")
                .arg(LEASE_SECONDS)
                .query(&mut *conn)
                .map_err(|e| server_error(&self.url, e))?;
            if leased.is_some() {
                drop(conn);
                return Ok(TestDb {
                    engine: EngineKind::Redis,
                    url: with_database(&self.url, &db.to_string()),
                    name: db.to_string(),
                    release: Some(Box::new(move || self.release(db))),
                });
            }
        }
        Err(TestingError::Server {
            engine: EngineKind::Redis,
            server: redact(&self.url),
            message: format!(
                "all {usable} logical databases are leased by running tests; raise `databases` in the server's configuration"
            ),
        })
    }

    fn release(&self, db: u32) {
        let mut conn = self.conn.lock().unwrap_or_else(|e| e.into_inner());
        let result = redis::pipe()
            .cmd("SELECT")
            .arg(db)
            .cmd("FLUSHDB")
            .cmd("SELECT")
            .arg(0)
            .cmd("DEL")
            .arg(lease_key(db))
            .exec(&mut *conn);
        if let Err(e) = result {
            eprintln!("isoenv::testing: {}", server_error(&self.url, e));
        }
    }
}

fn lease_key(db: u32) -> String {
    format!("isoenv:lease:{db}")
}

fn server_error(url: &str, e: redis::RedisError) -> TestingError {
    TestingError::Server {
        engine: EngineKind::Redis,
        server: redact(url),
        message: e.to_string(),
    }
}
