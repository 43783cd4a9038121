//! MariaDB/MySQL: databases with the migrations applied, recycled. A released database is
//! given back clean (the tables the test wrote emptied, their `AUTO_INCREMENT` set back) and
//! proven clean by a check of its schema and seeded rows; only a database a test changed
//! beyond its rows is made again. The pool is a table in the server's `isoenv` database, so
//! every test process shares it; a lease names the connection that holds it, so a crashed test
//! process's databases are recognised and reset by the next claimer.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use mysql::prelude::Queryable;

use super::ddl::{self, Ledger, Snapshot};
use super::lease::{self, Lender};
use super::{
    keeper, pool_size, redact, server, shared, unique, with_database, Idle, Inside, Resets, Result,
    Source, TestDb, TestingError,
};
use crate::engine::EngineKind;
use crate::sys::process::ProcessId;

const SCHEMA: &str = "CREATE DATABASE IF NOT EXISTS isoenv;
    CREATE TABLE IF NOT EXISTS isoenv.template (schema_hash char(16) PRIMARY KEY,
        recyclable bool NOT NULL, tables longtext NOT NULL, expected text NOT NULL) ENGINE=InnoDB;
    CREATE TABLE IF NOT EXISTS isoenv.clone (name varchar(64) PRIMARY KEY,
        schema_hash char(16) NOT NULL, holder bigint unsigned NULL,
        dirty bool NOT NULL DEFAULT false) ENGINE=InnoDB;
    CREATE TABLE IF NOT EXISTS isoenv.life (id int PRIMARY KEY) ENGINE=MEMORY";

/// A free clean database: the usual claim.
const CLAIM_FREE: &str = "SELECT name, false FROM isoenv.clone WHERE schema_hash = ?
    AND holder IS NULL AND NOT dirty LIMIT 1 FOR UPDATE SKIP LOCKED";

/// A database that needs a reset: released and not reset yet, or its holder's connection is
/// gone (a test process that died).
const CLAIM_NEEDING_RESET: &str = "SELECT name, true FROM isoenv.clone WHERE schema_hash = ?
    AND ((holder IS NULL AND dirty) OR (STALE))
    LIMIT 1 FOR UPDATE SKIP LOCKED";

/// The holder's connection is gone. Connection ids only grow, and the process list is read
/// once: a holder newer than every listed connection connected after that read, so only
/// older ones are judged.
const STALE: &str = "holder NOT IN (SELECT ID FROM information_schema.PROCESSLIST)
    AND holder < (SELECT MAX(ID) FROM information_schema.PROCESSLIST)";

/// The lock a keeper holds while it serves (see [`super::keeper`]).
const KEEPER_LOCK: &str = "isoenv_keeper";

/// What the information schema says cheaply of a database, without its own name, so every
/// database made from the same migrations has the same: its relations by name and kind, and its
/// routines, triggers, views and events. Columns, indexes, keys, checks, options and
/// `AUTO_INCREMENT` come from each table's `SHOW CREATE TABLE` instead, eight times cheaper
/// than the information schema's own tables for them.
const OBJECTS: &str = "SELECT MD5(GROUP_CONCAT(x ORDER BY x SEPARATOR '\\n')) FROM (
    SELECT CONCAT_WS(':', 't', TABLE_NAME, TABLE_TYPE) x
        FROM information_schema.TABLES WHERE TABLE_SCHEMA = DATABASE()
    UNION ALL SELECT CONCAT_WS(':', 'r', ROUTINE_NAME, ROUTINE_TYPE, MD5(ROUTINE_DEFINITION))
        FROM information_schema.ROUTINES WHERE ROUTINE_SCHEMA = DATABASE()
    UNION ALL SELECT CONCAT_WS(':', 'g', TRIGGER_NAME, EVENT_OBJECT_TABLE, ACTION_TIMING, EVENT_MANIPULATION,
        MD5(ACTION_STATEMENT))
        FROM information_schema.TRIGGERS WHERE TRIGGER_SCHEMA = DATABASE()
    UNION ALL SELECT CONCAT_WS(':', 'v', TABLE_NAME, MD5(REPLACE(VIEW_DEFINITION, DATABASE(), '')))
        FROM information_schema.VIEWS WHERE TABLE_SCHEMA = DATABASE()
    UNION ALL SELECT CONCAT_WS(':', 'e', EVENT_NAME, MD5(EVENT_DEFINITION))
        FROM information_schema.EVENTS WHERE EVENT_SCHEMA = DATABASE()
    ) f";

/// Part of every pool's key, so that records a differently-checking isoenv made are not read
/// as this one's.
const CHECK_VERSION: char = '2';

/// How a database of one schema is made clean again and proven clean.
struct Template {
    hash: String,
    recyclable: bool,
    /// The tables that are empty in a fresh database, with the `AUTO_INCREMENT` they start at.
    tables: Vec<Table>,
    /// The check query (fingerprint and seeded rows) and its value for a fresh database.
    check: String,
    expected: String,
}

/// A base table of a fresh database.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
struct Table {
    name: String,
    auto_increment: Option<u64>,
    /// The rows it holds when fresh, if any.
    seed: Option<Seed>,
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
struct Seed {
    /// A query for a hash of the table's rows, and its value when fresh.
    hash_query: String,
    hash: String,
    /// The statement that puts the rows back.
    insert: String,
}

/// What the template record keeps.
#[derive(serde::Serialize, serde::Deserialize)]
struct Record {
    tables: Vec<Table>,
    check: String,
}

pub(super) struct Pool {
    url: String,
    files: Vec<(PathBuf, String)>,
    template: Template,
    idle: Idle<mysql::Conn>,
    /// A connection into each database this process has reset, kept for its next reset.
    inside: Inside<mysql::Conn>,
    /// This process's DDL, and the counts when each database it reset was last proven clean:
    /// its next reset skips the schema check if nobody else ran DDL since.
    ddl: Ledger,
    proven: Mutex<HashMap<String, Snapshot>>,
    /// Whether a keeper resets released databases (else each release resets its own).
    kept: bool,
    resets: Resets,
    /// Clean databases this process holds for its next handouts: those its own tests gave
    /// back and it reset. They stay leased to it, so a handout takes one without a query.
    stock: Mutex<Vec<String>>,
}

/// The pool of the migrations whose hash is `hash`: the schema's key.
pub(super) fn key(hash: &str) -> String {
    format!("{}{CHECK_VERSION}", &hash[..hash.len() - 1])
}

impl Pool {
    pub(super) fn get() -> Result<Arc<Pool>> {
        static POOL: Mutex<Option<Arc<Pool>>> = Mutex::new(None);
        shared(&POOL, || {
            Pool::open(Source::of_test(EngineKind::Mysql)?, server::runner())
        })
    }

    /// Connects, and sets the pool up if this schema has no template record yet. Under a test
    /// `runner`, a keeper is started unless one serves already.
    pub(super) fn open(source: Source, runner: Option<ProcessId>) -> Result<Pool> {
        let Source { url, files, hash } = source;
        let hash = key(&hash);
        let mut admin = connect(&url)?;
        let err = |e: mysql::Error| server_error(&url, e);
        // First: a new template collects the databases of old ones that nobody holds.
        free_earlier_life(&mut admin).map_err(err)?;
        let template = match load(&mut admin, &hash) {
            Ok(Some(t)) => t,
            _ => {
                admin.query_drop(SCHEMA).map_err(err)?;
                let _: Option<i64> = admin
                    .query_first("SELECT GET_LOCK('isoenv_setup', 600)")
                    .map_err(err)?;
                let built = match load(&mut admin, &hash).map_err(err)? {
                    Some(t) => Ok(t),
                    None => build(&mut admin, &url, &hash, &files),
                };
                admin
                    .query_drop("DO RELEASE_LOCK('isoenv_setup')")
                    .map_err(err)?;
                built?
            }
        };
        // A keeper that fails to start only means releases reset their databases themselves.
        let kept = match runner {
            Some(runner) => {
                let held: Option<bool> = admin
                    .query_first(format!("SELECT IS_USED_LOCK('{KEEPER_LOCK}') IS NOT NULL"))
                    .map_err(err)?;
                held == Some(true) || keeper::spawn(EngineKind::Mysql, &url, runner).is_ok()
            }
            None => false,
        };
        Ok(Pool {
            url,
            files,
            template,
            idle: Idle::new(admin),
            inside: Inside::new(),
            ddl: Ledger::default(),
            proven: Mutex::new(HashMap::new()),
            kept,
            resets: Resets::default(),
            stock: Mutex::new(Vec::new()),
        })
    }

    fn admin(&self) -> Result<mysql::Conn> {
        self.idle.take(|_| true, || connect(&self.url))
    }

    fn put_back(&self, admin: mysql::Conn) {
        self.idle.put(admin);
    }

    /// A database from the stock, if there is one.
    fn restocked(&self) -> Option<String> {
        self.stock.lock().unwrap_or_else(|e| e.into_inner()).pop()
    }

    /// The test's guard for a claimed database.
    fn guard(self: Arc<Self>, name: String) -> TestDb {
        let released = name.clone();
        TestDb {
            engine: EngineKind::Mysql,
            url: with_database(&self.url, &name),
            name,
            release: Some(Box::new(move || self.release(&released))),
        }
    }

    /// Gives the stock back to the pool's table, free for any claimer.
    fn free_stock(&self, admin: &mut mysql::Conn) -> Result<()> {
        let stock = std::mem::take(&mut *self.stock.lock().unwrap_or_else(|e| e.into_inner()));
        for name in stock {
            admin
                .exec_drop(
                    "UPDATE isoenv.clone SET holder = NULL, dirty = false WHERE name = ?",
                    (&name,),
                )
                .map_err(|e| self.error(e))?;
        }
        Ok(())
    }

    /// Gives a database back: clean, or made again when its test changed more than rows.
    /// Without a keeper, or in the keeper itself, the releasing thread resets it.
    fn release(&self, name: &str) {
        let outcome = self.admin().and_then(|mut admin| {
            if self.kept {
                admin
                    .exec_drop(
                        "UPDATE isoenv.clone SET holder = NULL, dirty = true WHERE name = ?",
                        (name,),
                    )
                    .map_err(|e| self.error(e))?;
                self.put_back(admin);
                return Ok(());
            }
            // Clean again, it goes to the stock, still leased to this process.
            let done = self.resets.during(|| {
                if !self.reset(name) {
                    self.remake(&mut admin, name)?;
                }
                let mut stock = self.stock.lock().unwrap_or_else(|e| e.into_inner());
                stock.push(name.to_owned());
                Ok(())
            });
            if done.is_err() {
                // It could not be made again: out of the pool.
                admin
                    .exec_drop("DELETE FROM isoenv.clone WHERE name = ?", (name,))
                    .map_err(|e| self.error(e))?;
            }
            self.put_back(admin);
            done
        });
        if let Err(e) = outcome {
            eprintln!("isoenv::testing: {e}");
        }
    }

    /// Ends the test's leftover sessions, empties the tables it wrote and sets their
    /// `AUTO_INCREMENT` back, then checks the database is exactly as a fresh one. False when it
    /// is not or cannot be.
    fn reset(&self, name: &str) -> bool {
        if !self.template.recyclable {
            return false;
        }
        let cached = self.inside.take(name);
        let url = with_database(&self.url, name);
        let Some(mut conn) = cached.or_else(|| connect(&url).ok()) else {
            return false;
        };
        let since = self
            .proven
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(name);
        let mut result = reset(&mut conn, name, &self.template, &self.ddl, since);
        // A kept connection may have been ended by another process's reset: reconnect once.
        if result.is_err() {
            let Ok(fresh) = connect(&url) else {
                return false;
            };
            conn = fresh;
            result = reset(&mut conn, name, &self.template, &self.ddl, since);
        }
        let Ok(Some(proven)) = result else {
            return false;
        };
        self.proven
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(name.to_owned(), proven);
        self.inside.keep(name, conn);
        true
    }

    /// Resets a claimed database, or makes it again, and marks it clean.
    fn make_clean(&self, admin: &mut mysql::Conn, name: &str) -> Result<()> {
        if !self.reset(name) {
            self.remake(admin, name)?;
        }
        admin
            .exec_drop(
                "UPDATE isoenv.clone SET dirty = false WHERE name = ?",
                (name,),
            )
            .map_err(|e| self.error(e))
    }

    /// Makes one more database if the pool holds fewer than [`pool_size`]; whether it did.
    fn top_up(&self, admin: &mut mysql::Conn) -> Result<bool> {
        let hash = &self.template.hash;
        let have: Option<i64> = admin
            .exec_first(
                "SELECT COUNT(*) FROM isoenv.clone WHERE schema_hash = ?",
                (hash,),
            )
            .map_err(|e| self.error(e))?;
        if have.unwrap_or(0) >= pool_size() as i64 {
            return Ok(false);
        }
        let name = self.new_database(admin)?;
        admin
            .exec_drop(
                "UPDATE isoenv.clone SET holder = NULL WHERE name = ?",
                (&name,),
            )
            .map_err(|e| self.error(e))?;
        Ok(true)
    }

    /// A new database in the pool, held by `admin`'s connection (nobody claims it half-made).
    fn new_database(&self, admin: &mut mysql::Conn) -> Result<String> {
        let name = format!("isoenv_c_{}", unique());
        admin
            .exec_drop(
                "INSERT INTO isoenv.clone (name, schema_hash, holder) VALUES (?, ?, CONNECTION_ID())",
                (&name, &self.template.hash),
            )
            .map_err(|e| self.error(e))?;
        self.remake(admin, &name)?;
        Ok(name)
    }

    /// Makes the database `name` again from the migrations.
    fn remake(&self, admin: &mut mysql::Conn, name: &str) -> Result<()> {
        self.inside.take(name);
        admin
            .query_drop(format!("DROP DATABASE IF EXISTS `{name}`"))
            .map_err(|e| self.error(e))?;
        create(admin, name, &self.files).map_err(|e| create_error(&self.url, e))
    }

    fn error(&self, e: mysql::Error) -> TestingError {
        server_error(&self.url, e)
    }
}

/// The keeper's loop (see [`super::keeper`]): while the runner lives, reset what needs it, then
/// look again (MariaDB has no notifications; the look is one indexed query).
pub(super) fn keep(source: Source, runner: ProcessId) -> Result<()> {
    serve(Pool::open(source, None)?, runner)
}

/// The keeper's loop on an open pool.
pub(super) fn serve(pool: Pool, runner: ProcessId) -> Result<()> {
    let pool = Arc::new(pool);
    let mut admin = pool.admin()?;
    let locked: Option<i64> = admin
        .query_first(format!("SELECT GET_LOCK('{KEEPER_LOCK}', 0)"))
        .map_err(|e| pool.error(e))?;
    if locked != Some(1) {
        return Ok(()); // another keeper serves this server
    }
    // Tests that find the socket borrow from it; the others claim with SQL, as before.
    pool.idle.fill(|| connect(&pool.url));
    let service = lease::Service::open(&pool.url, pool.clone());
    let hash = pool.template.hash.clone();
    let mut checked = std::time::Instant::now();
    let mut full = false;
    while runner.is_running() {
        // Released databases are looked for often, with a cheap query; dead holders (the
        // process list) once a second.
        let released: Option<i64> = admin
            .exec_first(
                "SELECT 1 FROM isoenv.clone WHERE schema_hash = ? AND dirty AND holder IS NULL LIMIT 1",
                (&hash,),
            )
            .map_err(|e| pool.error(e))?;
        let look = released.is_some() || checked.elapsed() > std::time::Duration::from_secs(1);
        let claimed = match look {
            true => claim(&mut admin, &claim_needing_reset(), &hash).map_err(|e| pool.error(e))?,
            false => None,
        };
        match claimed {
            Some((name, _)) => {
                pool.make_clean(&mut admin, &name)?;
                admin
                    .exec_drop(
                        "UPDATE isoenv.clone SET holder = NULL WHERE name = ?",
                        (&name,),
                    )
                    .map_err(|e| pool.error(e))?;
            }
            None => {
                // Filled at once after the setup, then looked at with the rest.
                if (!full || look) && pool.top_up(&mut admin)? {
                    continue;
                }
                full = true;
                if look {
                    checked = std::time::Instant::now();
                }
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
        }
    }
    drop(service);
    pool.free_stock(&mut admin)
}

impl Lender for Pool {
    /// The schema's hash, which claims name.
    fn key(&self) -> &str {
        &self.template.hash
    }

    /// A database for one test: a free clean one, else one released but not reset yet (or one
    /// a dead test held), made clean first, else a new one.
    fn lend(self: Arc<Self>) -> Result<TestDb> {
        if let Some(name) = self.restocked() {
            return Ok(self.guard(name));
        }
        let mut admin = self.admin()?;
        let hash = &self.template.hash;
        let claimed = loop {
            let seen = self.resets.ended();
            if let Some(name) = self.restocked() {
                self.put_back(admin);
                return Ok(self.guard(name));
            }
            if let Some(c) = claim(&mut admin, CLAIM_FREE, hash).map_err(|e| self.error(e))? {
                break Some(c);
            }
            if !self.resets.wait(seen) {
                break claim(&mut admin, &claim_needing_reset(), hash)
                    .map_err(|e| self.error(e))?;
            }
        };
        let name = match claimed {
            Some((name, dirty)) => {
                if dirty {
                    // Released but not reset yet, or its holder died with it: make it clean
                    // before handing it out.
                    self.make_clean(&mut admin, &name)?;
                }
                name
            }
            // More tests at once than databases so far: one more, which stays in the pool.
            None => self.new_database(&mut admin)?,
        };
        self.put_back(admin);
        Ok(self.guard(name))
    }
}

/// Frees the databases connections of an earlier life of the server held: a run's server is
/// stopped when the run ends and started again by the next, and connection ids start again
/// from 1, so [`STALE`] could take such a holder for a live connection and the database would
/// never be lent again. The first pool to open in a life frees them, under a lock, before
/// anyone claims in that life; a row in a MEMORY table, which a restart empties, says it did.
fn free_earlier_life(admin: &mut mysql::Conn) -> Result<(), mysql::Error> {
    admin.query_drop("DO GET_LOCK('isoenv_life', 600)")?;
    let freed = (|| {
        match admin.query_first::<i64, _>("SELECT id FROM isoenv.life") {
            Ok(Some(_)) => return Ok(()),
            Ok(None) => admin.query_drop(
                "UPDATE isoenv.clone SET holder = NULL, dirty = true WHERE holder IS NOT NULL",
            )?,
            // A new server, or one set up by an isoenv before this table (in this life or an
            // earlier one: holders are left to `STALE`, as then).
            Err(mysql::Error::MySqlError(e)) if e.code == 1146 => admin.query_drop(SCHEMA)?,
            Err(e) => return Err(e),
        }
        admin.query_drop("INSERT IGNORE INTO isoenv.life VALUES (1)")
    })();
    admin.query_drop("DO RELEASE_LOCK('isoenv_life')")?;
    freed
}

fn claim_needing_reset() -> String {
    CLAIM_NEEDING_RESET.replace("STALE", STALE)
}

fn claim(
    conn: &mut mysql::Conn,
    sql: &str,
    hash: &str,
) -> Result<Option<(String, bool)>, mysql::Error> {
    let mut tx = conn.start_transaction(mysql::TxOpts::default())?;
    let claimed: Option<(String, bool)> = tx.exec_first(sql, (hash,))?;
    if let Some((name, _)) = &claimed {
        tx.exec_drop(
            "UPDATE isoenv.clone SET holder = CONNECTION_ID() WHERE name = ?",
            (name,),
        )?;
    }
    tx.commit()?;
    Ok(claimed)
}

/// One reset of the database `conn` is in: the counts it is proven clean at, or `None` when it
/// is not clean afterwards. The schema check is skipped when it was proven clean at `since`
/// and the server ran no DDL but `ddl`'s since then. Four round trips in the usual case, and
/// only the two that must are under the ledger's lock (resets run side by side).
fn reset(
    conn: &mut mysql::Conn,
    name: &str,
    template: &Template,
    ddl: &Ledger,
    since: Option<Snapshot>,
) -> Result<Option<Snapshot>, mysql::Error> {
    let written_sql = written_query(&template.tables);
    let mut look = batch(conn, &format!("SHOW PROCESSLIST;{written_sql}"))?.into_iter();
    let others = sessions_in(conn.connection_id(), look.next().unwrap_or_default(), name);
    // The tables written, read again once the sessions left are ended.
    let (gone, written): (bool, Option<Option<String>>) = match others.is_empty() {
        true => (
            true,
            look.next().and_then(|set| set.into_iter().next()?.take(0)),
        ),
        false => (end(conn, name, &others)?, conn.query_first(&written_sql)?),
    };
    let written = written.flatten().unwrap_or_default();
    // With the test's sessions gone: DDL from here on shows at the next reset; before, in the
    // check below.
    let now = ddl.snapshot(|| conn.query(ddl::STATUS))?;
    let (rows, counters, own) = reset_statements(&template.tables, &written);
    if !rows.is_empty() {
        batch(conn, &rows)?;
    }
    if own > 0 {
        ddl.own(own, || batch(conn, &counters))?;
    }
    let unchanged = gone && since.is_some_and(|s| ddl::only_own_between(&s, &now));
    let clean = unchanged || fingerprint(conn, &template.check)? == template.expected;
    Ok(clean.then_some(now))
}

/// Runs statements in one round trip and reads every result set: its rows, and an error in any
/// statement (`query_drop` reports only the first statement's).
fn batch(conn: &mut mysql::Conn, sql: &str) -> Result<Vec<Vec<mysql::Row>>, mysql::Error> {
    let mut result = conn.query_iter(sql)?;
    let mut sets = Vec::new();
    while let Some(set) = result.iter() {
        sets.push(set.collect::<Result<_, _>>()?);
    }
    Ok(sets)
}

/// Ends the sessions `others` left in the database `name` and waits until they are gone:
/// whether they are (false after five seconds).
fn end(conn: &mut mysql::Conn, name: &str, others: &[u64]) -> Result<bool, mysql::Error> {
    for id in others {
        // Gone already is fine.
        let _ = conn.query_drop(format!("KILL CONNECTION {id}"));
    }
    // KILL only flags the session; wait until its transaction is rolled back and it is gone.
    // Mostly it is the test's own connection, closing already and gone within a few hundred
    // microseconds: look again soon, then less often.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    let mut pause = std::time::Duration::from_micros(200);
    loop {
        let listed = conn.query("SHOW PROCESSLIST")?;
        if sessions_in(conn.connection_id(), listed, name).is_empty() {
            return Ok(true);
        }
        if std::time::Instant::now() > deadline {
            return Ok(false);
        }
        std::thread::sleep(pause);
        pause = (pause * 2).min(std::time::Duration::from_millis(2));
    }
}

/// The sessions in the database `name` but `me`, from `SHOW PROCESSLIST` rows: it lists them
/// without the temporary table on disk that the information schema's `PROCESSLIST` is read
/// through (its `INFO` column is text), a third of a millisecond of the server's time per reset.
fn sessions_in(me: u32, listed: Vec<mysql::Row>, name: &str) -> Vec<u64> {
    listed
        .into_iter()
        .filter_map(|mut row| {
            let id: u64 = row.take(0)?;
            let db: Option<String> = row.take(3)?;
            (id != u64::from(me) && db.as_deref() == Some(name)).then_some(id)
        })
        .collect()
}

/// One query naming (comma-separated) the tables a test wrote: rows where there were none,
/// seeded rows changed, or an `AUTO_INCREMENT` moved (read from one pass over the information
/// schema's tables, not one lookup per table).
fn written_query(tables: &[Table]) -> String {
    if tables.is_empty() {
        return "SELECT ''".into();
    }
    let parts: Vec<String> = tables
        .iter()
        .map(|t| {
            let quoted = t.name.replace('`', "``");
            let literal = t.name.replace('\'', "''");
            let mut changed = match &t.seed {
                None => format!("EXISTS(SELECT 1 FROM `{quoted}`)"),
                Some(seed) => format!("({}) <> '{}'", seed.hash_query, seed.hash),
            };
            if let Some(n) = t.auto_increment {
                changed.push_str(&format!(
                    " OR MAX(IF(TABLE_NAME = '{literal}', AUTO_INCREMENT, NULL)) <> {n}"
                ));
            }
            format!("IF({changed}, '{}', NULL)", literal.replace(',', ""))
        })
        .collect();
    format!(
        "SELECT CONCAT_WS(',', {}) FROM information_schema.TABLES WHERE TABLE_SCHEMA = DATABASE()",
        parts.join(", ")
    )
}

/// What gives the `written` tables their fresh rows (one batch, foreign key checks off, so in
/// any order), then their `AUTO_INCREMENT` back (another, of DDL statements: how many is the
/// third value). A pure decision.
fn reset_statements(tables: &[Table], written: &str) -> (String, String, u64) {
    let written: Vec<&str> = written.split(',').filter(|w| !w.is_empty()).collect();
    let mut rows = String::new();
    let mut counters = Vec::new();
    for t in tables.iter().filter(|t| written.contains(&t.name.as_str())) {
        let name = t.name.replace('`', "``");
        rows.push_str(&format!("DELETE FROM `{name}`;"));
        if let Some(seed) = &t.seed {
            rows.push_str(&seed.insert);
            rows.push(';');
        }
        if let Some(n) = t.auto_increment {
            counters.push(format!("ALTER TABLE `{name}` AUTO_INCREMENT = {n}"));
        }
    }
    if !rows.is_empty() {
        rows = format!("SET FOREIGN_KEY_CHECKS = 0;{rows}SET FOREIGN_KEY_CHECKS = 1");
    }
    (rows, counters.join(";"), counters.len() as u64)
}

fn load(admin: &mut mysql::Conn, hash: &str) -> Result<Option<Template>, mysql::Error> {
    let row: Option<(bool, String, String)> = admin.exec_first(
        "SELECT recyclable, tables, expected FROM isoenv.template WHERE schema_hash = ?",
        (hash,),
    )?;
    let Some((recyclable, tables, expected)) = row else {
        return Ok(None);
    };
    let Ok(Record { tables, check }) = serde_json::from_str(&tables) else {
        return Ok(None);
    };
    Ok(Some(Template {
        hash: hash.to_owned(),
        recyclable,
        tables,
        check,
        expected,
    }))
}

/// Makes a first database from the migrations, reads from it what resetting one takes, records
/// that, drops databases of other schemas that no live test holds, and makes the first ones.
fn build(
    admin: &mut mysql::Conn,
    url: &str,
    hash: &str,
    files: &[(PathBuf, String)],
) -> Result<Template> {
    let err = |e: mysql::Error| server_error(url, e);
    let first = format!("isoenv_c_{}", unique());
    create(admin, &first, files).map_err(|e| create_error(url, e))?;
    let template = plan(admin, &first, hash).map_err(err)?;
    admin
        .exec_drop(
            "INSERT INTO isoenv.template VALUES (?, ?, ?, ?)",
            (
                hash,
                template.recyclable,
                serde_json::json!({"tables": template.tables, "check": template.check}).to_string(),
                &template.expected,
            ),
        )
        .map_err(err)?;
    admin
        .exec_drop(
            "INSERT INTO isoenv.clone (name, schema_hash, holder) VALUES (?, ?, NULL)",
            (&first, hash),
        )
        .map_err(err)?;
    let stale: Vec<String> = admin
        .exec(
            format!("SELECT name FROM isoenv.clone WHERE schema_hash <> ? AND (holder IS NULL OR ({STALE}))"),
            (hash,),
        )
        .map_err(err)?;
    for name in stale {
        admin
            .query_drop(format!("DROP DATABASE IF EXISTS `{name}`"))
            .map_err(err)?;
        admin
            .exec_drop("DELETE FROM isoenv.clone WHERE name = ?", (&name,))
            .map_err(err)?;
    }
    admin
        .exec_drop(
            "DELETE FROM isoenv.template WHERE schema_hash <> ? AND schema_hash NOT IN
                 (SELECT schema_hash FROM isoenv.clone)",
            (hash,),
        )
        .map_err(err)?;
    // One for the first handout; the keeper makes the rest in the background.
    Ok(template)
}

/// Reads, in a freshly migrated database, what resetting one takes.
fn plan(admin: &mut mysql::Conn, db: &str, hash: &str) -> Result<Template, mysql::Error> {
    admin.select_db(db)?;
    let found: Vec<(String, String, Option<u64>)> = admin.query(
        "SELECT TABLE_NAME, TABLE_TYPE, AUTO_INCREMENT FROM information_schema.TABLES
         WHERE TABLE_SCHEMA = DATABASE() ORDER BY TABLE_NAME",
    )?;
    // Sequences keep state a row reset does not restore; MyISAM-like engines without
    // transactions are reset the same way.
    let recyclable = found.iter().all(|(_, kind, _)| kind != "SEQUENCE");
    admin.query_drop("SET SESSION group_concat_max_len = 1073741824")?;
    let mut tables = Vec::new();
    let mut check = vec![OBJECTS.to_owned()];
    for (name, kind, auto_increment) in found {
        if kind != "BASE TABLE" {
            continue;
        }
        let quoted = name.replace('`', "``");
        check.push(format!("SHOW CREATE TABLE `{quoted}`"));
        let columns: Vec<String> = admin.exec(
            "SELECT COLUMN_NAME FROM information_schema.COLUMNS
             WHERE TABLE_SCHEMA = DATABASE() AND TABLE_NAME = ? AND EXTRA NOT LIKE '%GENERATED%'
             ORDER BY ORDINAL_POSITION",
            (&name,),
        )?;
        let columns: Vec<String> = columns
            .iter()
            .map(|c| format!("`{}`", c.replace('`', "``")))
            .collect();
        let quoted_row = columns
            .iter()
            .map(|c| format!("QUOTE({c})"))
            .collect::<Vec<_>>()
            .join(", ");
        let hash_query = format!(
            "SELECT IFNULL(MD5(GROUP_CONCAT(r ORDER BY r SEPARATOR '\\n')), '') FROM (SELECT CONCAT_WS(',', {quoted_row}) r FROM `{quoted}`) s"
        );
        // One row always; NULL when the table is empty.
        let values: Option<Option<String>> = admin.query_first(format!(
            "SELECT GROUP_CONCAT(CONCAT('(', CONCAT_WS(',', {quoted_row}), ')') SEPARATOR ',') FROM `{quoted}`"
        ))?;
        let values = values.flatten();
        let seed = match values {
            Some(values) => {
                let hash: Option<String> = admin.query_first(&hash_query)?;
                check.push(hash_query.clone());
                Some(Seed {
                    insert: format!(
                        "INSERT INTO `{quoted}` ({}) VALUES {values}",
                        columns.join(", ")
                    ),
                    hash: hash.unwrap_or_default(),
                    hash_query,
                })
            }
            None => None,
        };
        tables.push(Table {
            name,
            auto_increment,
            seed,
        });
    }
    let check = check.join(";\n");
    let expected = fingerprint(admin, &check)?;
    admin.select_db("isoenv")?;
    Ok(Template {
        hash: hash.to_owned(),
        recyclable,
        tables,
        check,
        expected,
    })
}

/// Runs the check's statements and hashes every value of every row they return.
fn fingerprint(conn: &mut mysql::Conn, check: &str) -> Result<String, mysql::Error> {
    let mut text = String::new();
    let mut results = conn.query_iter(check)?;
    while let Some(set) = results.iter() {
        for row in set {
            for value in row?.unwrap() {
                text.push_str(&value.as_sql(true));
                text.push('\u{1f}');
            }
            text.push('\n');
        }
    }
    Ok(format!("{:016x}", crate::sys::hash::fnv1a(&text)))
}

enum CreateError {
    Server(mysql::Error),
    Migration(PathBuf, mysql::Error),
}

/// A new database with the migrations applied; on failure it is dropped again.
fn create(
    conn: &mut mysql::Conn,
    name: &str,
    files: &[(PathBuf, String)],
) -> Result<(), CreateError> {
    conn.query_drop(format!("CREATE DATABASE `{name}`"))
        .map_err(CreateError::Server)?;
    let applied = (|| {
        conn.select_db(name).map_err(CreateError::Server)?;
        for (file, sql) in files {
            conn.query_drop(sql)
                .map_err(|e| CreateError::Migration(file.clone(), e))?;
        }
        Ok(())
    })();
    if applied.is_err() {
        let _ = conn.query_drop(format!("DROP DATABASE IF EXISTS `{name}`"));
    }
    let _ = conn.select_db("isoenv");
    applied
}

/// A connection whose `GROUP_CONCAT` is long enough to hash seeded tables whole.
fn connect(url: &str) -> Result<mysql::Conn> {
    let opts = mysql::Opts::from_url(url).map_err(|e| TestingError::Server {
        engine: EngineKind::Mysql,
        server: redact(url),
        message: e.to_string(),
    })?;
    let opts = mysql::OptsBuilder::from_opts(opts)
        .init(vec!["SET SESSION group_concat_max_len = 1073741824"]);
    mysql::Conn::new(opts).map_err(|e| server_error(url, e))
}

fn create_error(url: &str, e: CreateError) -> TestingError {
    match e {
        CreateError::Server(e) => server_error(url, e),
        CreateError::Migration(file, e) => TestingError::Migration {
            file,
            message: e.to_string(),
        },
    }
}

fn server_error(url: &str, e: mysql::Error) -> TestingError {
    TestingError::Server {
        engine: EngineKind::Mysql,
        server: redact(url),
        message: e.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(name: &str, ai: Option<u64>, seed: bool) -> Table {
        Table {
            name: name.into(),
            auto_increment: ai,
            seed: seed.then(|| Seed {
                hash_query: "SELECT 'h'".into(),
                hash: "h".into(),
                insert: format!("INSERT INTO `{name}` (`x`) VALUES ('1')"),
            }),
        }
    }

    #[test]
    fn only_written_tables_are_reset_and_seeds_put_back() {
        let tables = [
            table("a", Some(1), false),
            table("b", None, false),
            table("c", Some(5), true),
        ];
        assert_eq!(
            reset_statements(&tables, ""),
            (String::new(), String::new(), 0)
        );
        assert_eq!(
            reset_statements(&tables, "b,c"),
            (
                "SET FOREIGN_KEY_CHECKS = 0;DELETE FROM `b`;DELETE FROM `c`;\
                 INSERT INTO `c` (`x`) VALUES ('1');SET FOREIGN_KEY_CHECKS = 1"
                    .to_owned(),
                "ALTER TABLE `c` AUTO_INCREMENT = 5".to_owned(),
                1
            )
        );
        assert_eq!(
            reset_statements(&tables, "a,c").1,
            "ALTER TABLE `a` AUTO_INCREMENT = 1;ALTER TABLE `c` AUTO_INCREMENT = 5",
            "one DDL statement per counter set back, in one batch"
        );
    }

    #[test]
    fn written_tables_are_found_by_rows_seed_hash_and_auto_increment() {
        let q = written_query(&[table("a", Some(3), false), table("c", None, true)]);
        assert!(q.contains(
            "IF(EXISTS(SELECT 1 FROM `a`) OR MAX(IF(TABLE_NAME = 'a', AUTO_INCREMENT, NULL))"
        ));
        assert!(q.ends_with("FROM information_schema.TABLES WHERE TABLE_SCHEMA = DATABASE()"));
        assert!(q.contains("<> 3, 'a', NULL)"));
        assert!(q.contains("IF((SELECT 'h') <> 'h', 'c', NULL)"));
    }
}
