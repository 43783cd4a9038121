//! PostgreSQL: clones of a migrated template database, recycled. A released clone is given back
//! clean (its rows deleted, its sequences reset) and proven clean by a check that also notices
//! any schema change; only a clone a test changed beyond its rows is made again from the
//! template. The pool is a table in the server's `postgres` database, so every test process
//! shares it; a lease names the admin connection that holds it, so a crashed test process's
//! clones are recognised and reset by the next claimer.

use postgres::fallible_iterator::FallibleIterator;
use std::sync::{Arc, Mutex};

use super::lease::{self, Lender};
use super::{
    keeper, pool_size, redact, server, shared, unique, with_database, Idle, Inside, Resets, Result,
    Source, TestDb, TestingError,
};
use crate::engine::EngineKind;
use crate::sys::process::ProcessId;

/// Serializes schema setup and template builds across processes.
const SETUP_LOCK: i64 = 0x6973_6f65_6e76; // "isoenv"

const SCHEMA: &str = "CREATE TABLE IF NOT EXISTS isoenv_template (
        name text PRIMARY KEY, reset text, quick text NOT NULL, quick_expected text NOT NULL,
        full_check text NOT NULL, expected text NOT NULL);
    CREATE TABLE IF NOT EXISTS isoenv_clone (
        name text PRIMARY KEY, template text NOT NULL, holder int, since timestamptz,
        dirty bool NOT NULL DEFAULT false, catalog_writes bigint NOT NULL DEFAULT 0);";

/// Takes a free clean clone of the template `{}`, with the catalog writes counted at its last
/// reset: the usual claim, one round trip. The lease is the claiming connection's backend: it
/// lives as long as the test process.
fn claim_free(template: &str) -> String {
    format!(
        "UPDATE isoenv_clone SET holder = pg_backend_pid(), since = clock_timestamp()
         WHERE name = (SELECT name FROM isoenv_clone WHERE template = '{template}'
                       AND holder IS NULL AND NOT dirty LIMIT 1 FOR UPDATE SKIP LOCKED)
           AND EXISTS (SELECT 1 FROM isoenv_template WHERE name = '{template}')
         RETURNING name, false, catalog_writes"
    )
}

/// Whether a keeper holds its lock on this server.
const KEEPER_HELD: &str = "SELECT EXISTS (SELECT 1 FROM pg_locks WHERE locktype = 'advisory'
    AND classid::bigint = (KEEPER >> 32) AND objid::bigint = (KEEPER & 4294967295)
    AND objsubid = 1 AND granted)";

/// Which clones need a reset: released ones the keeper has not reset yet, and those whose
/// holder's connection is gone (a test process that died).
const NEEDS_RESET: &str = "(dirty AND holder IS NULL) OR (holder IS NOT NULL AND STALE)";

/// The lease's holder has gone. `pg_stat_activity` is read once per transaction, after it
/// began: a lease taken since (`since >= now()`) may belong to a backend that read missed, so
/// only older leases are judged.
const STALE: &str = "since < now() AND NOT EXISTS (
    SELECT 1 FROM pg_stat_activity a WHERE a.pid = holder AND a.backend_start <= since)";

/// Sets the released clone `NAME` aside for the keeper and wakes it: one round trip.
const RELEASE_DIRTY: &str = "WITH r AS (UPDATE isoenv_clone SET holder = NULL, since = NULL,
    dirty = true WHERE name = 'NAME' RETURNING 1) SELECT pg_notify('isoenv_dirty', '') FROM r";

/// Signals every other session in the clone to end (a test's leftover connections must not
/// write after the reset) and says how many there were. `pg_terminate_backend`'s own wait polls
/// every 100 ms, so [`OTHERS`] is asked instead until none is left.
/// The pools' own idle connections (named [`POOL_CONNECTION`]) are left alone: they write
/// nothing while idle, and ending them would make the next reset of this clone in that process
/// pay a new connection.
const TERMINATE: &str = "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_get_activity(NULL) \
    WHERE datid = (SELECT oid FROM pg_database WHERE datname = current_database()) \
    AND pid <> pg_backend_pid() AND application_name <> 'isoenv-pool'";

/// The other sessions still in the clone. A session leaves this list only after its statistics
/// are flushed, which [`CATALOG_WRITES`] relies on.
const OTHERS: &str = "SELECT count(*) FROM pg_stat_get_activity(NULL) \
    WHERE datid = (SELECT oid FROM pg_database WHERE datname = current_database()) \
    AND pid <> pg_backend_pid() AND application_name <> 'isoenv-pool'";

/// The `application_name` of the pools' own connections.
const POOL_CONNECTION: &str = "isoenv-pool";

/// Rows written to this database's own catalogs, as the statistics count them: zero in a new
/// clone, and unchanged by a reset. A session's counts are flushed when it exits, and every
/// other session has exited before this is asked.
const CATALOG_WRITES: &str = "(SELECT coalesce(sum(pg_stat_get_tuples_inserted(oid)
        + pg_stat_get_tuples_updated(oid) + pg_stat_get_tuples_deleted(oid)), 0)
    FROM pg_class WHERE relnamespace = 'pg_catalog'::regnamespace AND relkind = 'r'
      AND NOT relisshared AND relname NOT IN ('pg_statistic', 'pg_statistic_ext_data'))";

/// The per-database catalogs: any DDL adds, updates or deletes rows in one of them, so their
/// row counts and newest row versions (`xmin`) fingerprint the schema. In-place updates
/// (VACUUM's statistics) keep `xmin`; planner statistics are left out on purpose.
const CATALOGS: &[&str] = &[
    "pg_class",
    "pg_attribute",
    "pg_attrdef",
    "pg_constraint",
    "pg_index",
    "pg_inherits",
    "pg_partitioned_table",
    "pg_type",
    "pg_enum",
    "pg_range",
    "pg_proc",
    "pg_aggregate",
    "pg_trigger",
    "pg_event_trigger",
    "pg_rewrite",
    "pg_policy",
    "pg_sequence",
    "pg_depend",
    "pg_description",
    "pg_seclabel",
    "pg_init_privs",
    "pg_default_acl",
    "pg_largeobject_metadata",
    "pg_extension",
    "pg_language",
    "pg_cast",
    "pg_transform",
    "pg_operator",
    "pg_opclass",
    "pg_opfamily",
    "pg_amop",
    "pg_amproc",
    "pg_collation",
    "pg_conversion",
    "pg_statistic_ext",
    "pg_ts_config",
    "pg_ts_config_map",
    "pg_ts_dict",
    "pg_ts_parser",
    "pg_ts_template",
    "pg_foreign_data_wrapper",
    "pg_foreign_server",
    "pg_foreign_table",
    "pg_user_mapping",
    "pg_publication",
    "pg_publication_namespace",
    "pg_publication_rel",
];

/// The template's user relations: name, kind, and whether a plain `DELETE` could be diverted
/// (rules, triggers that fire even in replica mode) or reach outside (foreign tables).
const RELATIONS: &str = "SELECT format('%I.%I', n.nspname, c.relname), c.relkind::text,
        c.relkind = 'f'
        OR EXISTS (SELECT 1 FROM pg_rewrite r WHERE r.ev_class = c.oid)
        OR EXISTS (SELECT 1 FROM pg_trigger t WHERE t.tgrelid = c.oid AND t.tgenabled = 'A')
    FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
    WHERE c.relkind IN ('r', 'm', 'f') AND c.relpersistence <> 't'
      AND n.nspname NOT IN ('pg_catalog', 'information_schema') AND n.nspname !~ '^pg_toast'
    ORDER BY 1";

const SEQUENCES: &str = "SELECT format('PERFORM setval(%L, %s, %s);',
        format('%I.%I', schemaname, sequencename), coalesce(last_value, start_value),
        CASE WHEN last_value IS NULL THEN 'false' ELSE 'true' END)
    FROM pg_sequences WHERE schemaname NOT IN ('pg_catalog', 'information_schema')
    ORDER BY 1";

/// How a clone of one template is made clean again and proven clean.
struct Template {
    name: String,
    /// The statements that give a clone back clean; `None` when only a new clone will do.
    reset: Option<String>,
    /// A query for the catalog writes and a value that is `quick_expected` when the clone is
    /// clean, as far as the statistics and `pg_class` tell: the usual path, a few
    /// milliseconds.
    quick: String,
    quick_expected: String,
    /// A query whose one value is `expected` exactly when the clone's schema and seeded rows are
    /// as the template's (every catalog's fingerprint): asked when the quick one disagrees, e.g.
    /// after a test used a temporary table.
    full_check: String,
    expected: String,
}

pub(super) struct Pool {
    url: String,
    template: Template,
    idle: Idle<postgres::Client>,
    /// A connection into each clone this process has reset, kept for its next reset.
    inside: Inside<postgres::Client>,
    /// Whether a keeper resets released clones (else each release resets its own).
    kept: bool,
    /// A clone claimed while the pool was set up, for the first handout.
    first: Mutex<Option<Claim>>,
    resets: Resets,
    /// Clean clones this process holds for its next handouts, with their catalog writes: those
    /// its own tests gave back and it reset. They stay leased to it, so a handout takes one
    /// without a query.
    stock: Mutex<Vec<(String, i64)>>,
}

/// The pool of the migrations whose hash is `hash`: its template's name.
pub(super) fn key(hash: &str) -> String {
    format!("isoenv_tpl_{hash}")
}

/// A claimed clone.
struct Claim {
    name: String,
    /// It must be reset before it is handed out.
    dirty: bool,
    /// The catalog writes counted at its last reset.
    writes: i64,
}

impl Claim {
    fn of(row: &postgres::SimpleQueryRow) -> Option<Claim> {
        Some(Claim {
            name: row.get(0)?.to_owned(),
            dirty: row.get(1)? == "t",
            writes: row.get(2)?.parse().ok()?,
        })
    }
}

impl Pool {
    pub(super) fn get() -> Result<Arc<Pool>> {
        static POOL: Mutex<Option<Arc<Pool>>> = Mutex::new(None);
        shared(&POOL, || {
            Pool::open(Source::of_test(EngineKind::Postgres)?, server::runner())
        })
    }

    /// Connects, and in one round trip reads the template's record, whether a keeper serves,
    /// and claims a clone for the first handout (a test process under nextest makes exactly one
    /// handout). Sets the pool up first if the template is not there yet. Under a test
    /// `runner`, a keeper is started unless one serves already.
    pub(super) fn open(source: Source, runner: Option<ProcessId>) -> Result<Pool> {
        let Source { url, files, hash } = source;
        let err = |e: postgres::Error| server_error(&url, e);
        let mut admin = connect(&url)?;
        let name = key(&hash);
        let keeper_held = KEEPER_HELD.replace("KEEPER", &keeper::LOCK.to_string());
        let fast = format!("{}; {keeper_held}; {}", load_sql(&name), claim_free(&name));
        // Before the first setup the tables do not exist: the slow path makes them.
        let answers = admin.simple_query(&fast);
        let (template, held, first) = match answers.as_deref().map(statements) {
            Ok([template, held, first]) => (
                template.first().and_then(|r| template_of(&name, r)),
                held.first().and_then(|r| r.get(0)) == Some("t"),
                first.first().and_then(|r| Claim::of(r)),
            ),
            _ => (None, false, None),
        };
        let template = match template {
            Some(t) => t,
            None => {
                admin
                    .batch_execute(&format!("SELECT pg_advisory_lock({SETUP_LOCK}); {SCHEMA}"))
                    .map_err(err)?;
                let built = match load(&mut admin, &name).map_err(err)? {
                    Some(t) => Ok(t),
                    None => build(&mut admin, &url, &name, &files),
                };
                admin
                    .batch_execute(&format!("SELECT pg_advisory_unlock({SETUP_LOCK})"))
                    .map_err(err)?;
                built?
            }
        };
        // A keeper that fails to start only means releases reset their clones themselves.
        let kept = match runner {
            Some(runner) => held || keeper::spawn(EngineKind::Postgres, &url, runner).is_ok(),
            None => false,
        };
        Ok(Pool {
            url,
            template,
            idle: Idle::new(admin),
            inside: Inside::new(),
            kept,
            first: Mutex::new(first),
            resets: Resets::default(),
            stock: Mutex::new(Vec::new()),
        })
    }

    fn admin(&self) -> Result<postgres::Client> {
        self.idle.take(|c| !c.is_closed(), || connect(&self.url))
    }

    fn put_back(&self, admin: postgres::Client) {
        self.idle.put(admin);
    }

    /// A clone from the stock, if there is one.
    fn restocked(&self) -> Option<(String, i64)> {
        self.stock.lock().unwrap_or_else(|e| e.into_inner()).pop()
    }

    /// The test's guard for a claimed clone (`writes`: its catalog writes when it was clean).
    fn guard(self: Arc<Self>, name: String, writes: i64) -> TestDb {
        let released = name.clone();
        TestDb {
            engine: EngineKind::Postgres,
            url: with_database(&self.url, &name),
            name,
            release: Some(Box::new(move || self.release(&released, writes))),
        }
    }

    /// Gives a clone back: clean, or made again when its test changed more than rows. Without
    /// a keeper, or in the keeper itself, the releasing thread resets it.
    fn release(&self, name: &str, writes: i64) {
        let outcome = self.admin().and_then(|mut admin| {
            if self.kept {
                admin
                    .simple_query(&RELEASE_DIRTY.replace("NAME", name))
                    .map_err(|e| server_error(&self.url, e))?;
                self.put_back(admin);
                return Ok(());
            }
            let done = self.resets.during(|| {
                let now = self.renew(&mut admin, name, writes)?;
                let mut stock = self.stock.lock().unwrap_or_else(|e| e.into_inner());
                stock.push((name.to_owned(), now));
                Ok::<_, TestingError>(())
            });
            if done.is_err() {
                // It could not be made again: out of the pool.
                admin
                    .execute("DELETE FROM isoenv_clone WHERE name = $1", &[&name])
                    .map_err(|e| server_error(&self.url, e))?;
            }
            self.put_back(admin);
            done.map(drop)
        });
        if let Err(e) = outcome {
            eprintln!("isoenv::testing: {e}");
        }
    }

    /// Deletes the clone's rows and resets its sequences, then checks that it is exactly as the
    /// template was: the catalog writes counted at its last reset (`writes`) unchanged and the
    /// quick check as expected, else every catalog's fingerprint. The clone's catalog writes
    /// now, or `None` when it is not clean (the test ran DDL, changed seeded rows) or cannot be
    /// made so.
    fn reset(&self, name: &str, writes: i64) -> Option<i64> {
        let reset = self.template.reset.as_ref()?;
        let sql = format!("{reset}{};", self.template.quick);
        let url = with_database(&self.url, name);
        let cached = self.inside.take(name);
        let mut client = cached.or_else(|| connect(&url).ok())?;
        // A kept connection may have been ended by another process's reset: reconnect once.
        let alone = match end_others(&mut client) {
            Ok(alone) => alone,
            Err(_) if client.is_closed() => {
                client = connect(&url).ok()?;
                end_others(&mut client).ok()?
            }
            Err(_) => return None,
        };
        if !alone {
            return None;
        }
        let result = client.simple_query(&sql);
        let messages = result.ok()?;
        let (now, quick) = last_row(&messages)?;
        let now: i64 = now.parse().ok()?;
        let clean = (now == writes && quick == self.template.quick_expected)
            || last_value(
                &client
                    .simple_query(&format!("{};", self.template.full_check))
                    .ok()?,
            ) == Some(self.template.expected.as_str());
        if clean {
            self.inside.keep(name, client);
        }
        clean.then_some(now)
    }

    /// Resets the clones that need it, one at a time, until none is left.
    fn reset_pending(&self, admin: &mut postgres::Client) -> Result<()> {
        let err = |e: postgres::Error| server_error(&self.url, e);
        while let Some(Claim { name, writes, .. }) =
            claim(admin, &claim_needing_reset(&self.template.name)).map_err(err)?
        {
            self.make_clean(admin, &name, writes, true)?;
        }
        Ok(())
    }

    /// Resets a claimed clone (`writes`: its catalog writes at the last reset), or makes it
    /// again, and records it clean; freed too (the lease ended) when `free`. Its catalog writes
    /// now.
    fn make_clean(
        &self,
        admin: &mut postgres::Client,
        name: &str,
        writes: i64,
        free: bool,
    ) -> Result<i64> {
        let now = self.renew(admin, name, writes)?;
        let sql = match free {
            true => {
                "UPDATE isoenv_clone SET holder = NULL, since = NULL, dirty = false,
                     catalog_writes = $2 WHERE name = $1"
            }
            false => "UPDATE isoenv_clone SET dirty = false, catalog_writes = $2 WHERE name = $1",
        };
        admin
            .execute(sql, &[&name, &now])
            .map_err(|e| server_error(&self.url, e))?;
        Ok(now)
    }

    /// Resets a claimed clone (`writes`: its catalog writes at the last reset), or makes it
    /// again; its catalog writes now.
    fn renew(&self, admin: &mut postgres::Client, name: &str, writes: i64) -> Result<i64> {
        // A reset that fails on a loaded server (a connection refused or ended mid-way) is
        // tried once more: a remake costs a CREATE DATABASE, a second look a few queries.
        match self
            .reset(name, writes)
            .or_else(|| self.reset(name, writes))
        {
            Some(now) => Ok(now),
            None => self.remake(admin, name).map(|()| 0),
        }
    }

    /// Gives the stock back to the pool's table, free for any claimer.
    fn free_stock(&self, admin: &mut postgres::Client) -> Result<()> {
        let stock = std::mem::take(&mut *self.stock.lock().unwrap_or_else(|e| e.into_inner()));
        for (name, writes) in stock {
            admin
                .execute(
                    "UPDATE isoenv_clone SET holder = NULL, since = NULL, dirty = false,
                         catalog_writes = $2 WHERE name = $1",
                    &[&name, &writes],
                )
                .map_err(|e| server_error(&self.url, e))?;
        }
        Ok(())
    }

    /// Makes one more clone, held by `admin`'s connection. It is recorded as held first: if
    /// this process dies half-way, the claimer that finds the stale lease makes it again.
    fn new_clone(&self, admin: &mut postgres::Client) -> Result<String> {
        let name = format!("isoenv_c_{}", unique());
        admin
            .execute(
                "INSERT INTO isoenv_clone VALUES ($1, $2, pg_backend_pid(), clock_timestamp())",
                &[&name, &self.template.name],
            )
            .map_err(|e| server_error(&self.url, e))?;
        self.remake(admin, &name)?;
        Ok(name)
    }

    /// Makes one more clone if the pool holds fewer than [`pool_size`]; whether it did.
    fn top_up(&self, admin: &mut postgres::Client) -> Result<bool> {
        let err = |e: postgres::Error| server_error(&self.url, e);
        let have: i64 = admin
            .query_one(
                "SELECT count(*) FROM isoenv_clone WHERE template = $1",
                &[&self.template.name],
            )
            .map_err(err)?
            .get(0);
        if have >= pool_size() as i64 {
            return Ok(false);
        }
        let name = self.new_clone(admin)?;
        admin
            .execute(
                "UPDATE isoenv_clone SET holder = NULL, since = NULL WHERE name = $1",
                &[&name],
            )
            .map_err(err)?;
        Ok(true)
    }

    /// Makes the clone `name` again from the template.
    fn remake(&self, admin: &mut postgres::Client, name: &str) -> Result<()> {
        self.inside.take(name);
        for sql in [
            format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"),
            format!("CREATE DATABASE {name} TEMPLATE {}", self.template.name),
        ] {
            admin
                .batch_execute(&sql)
                .map_err(|e| server_error(&self.url, e))?;
        }
        Ok(())
    }
}

/// The keeper's loop (see [`super::keeper`]): while the runner lives, reset what needs it,
/// then wait for the next release (or a second, to notice stale leases and the runner's exit).
pub(super) fn keep(source: Source, runner: ProcessId) -> Result<()> {
    serve(Pool::open(source, None)?, runner)
}

/// The keeper's loop on an open pool.
pub(super) fn serve(pool: Pool, runner: ProcessId) -> Result<()> {
    let pool = Arc::new(pool);
    let mut admin = pool.admin()?;
    let err = |e: postgres::Error| server_error(&pool.url, e);
    let locked: bool = admin
        .query_one("SELECT pg_try_advisory_lock($1)", &[&keeper::LOCK])
        .map_err(err)?
        .get(0);
    if !locked {
        return Ok(()); // another keeper serves this server
    }
    admin.batch_execute("LISTEN isoenv_dirty").map_err(err)?;
    // Tests that find the socket borrow from it; the others claim with SQL, as before.
    pool.idle.fill(|| connect(&pool.url));
    let service = lease::Service::open(&pool.url, pool.clone());
    // Setting the pool up claimed a clone for a first handout that will not come.
    if let Some(first) = pool.first.lock().unwrap_or_else(|e| e.into_inner()).take() {
        admin
            .execute(
                "UPDATE isoenv_clone SET holder = NULL, since = NULL WHERE name = $1",
                &[&first.name],
            )
            .map_err(err)?;
    }
    while runner.is_running() {
        pool.reset_pending(&mut admin)?;
        if pool.top_up(&mut admin)? {
            continue;
        }
        let mut wake = admin.notifications();
        let second = std::time::Duration::from_secs(1);
        if wake.timeout_iter(second).next().map_err(err)?.is_some() {
            // Several releases may have woken us: one pass resets them all.
            while wake.iter().next().map_err(err)?.is_some() {}
        }
    }
    drop(service);
    pool.free_stock(&mut admin)
}

impl Lender for Pool {
    /// The template's name, which claims name.
    fn key(&self) -> &str {
        &self.template.name
    }

    /// A clone for one test: a free clean one, else one released but not reset yet (or one a
    /// dead test held), made clean first, else a new one.
    fn lend(self: Arc<Self>) -> Result<TestDb> {
        if let Some((name, writes)) = self.restocked() {
            return Ok(self.guard(name, writes));
        }
        let mut admin = self.admin()?;
        let err = |e: postgres::Error| server_error(&self.url, e);
        let first = self.first.lock().unwrap_or_else(|e| e.into_inner()).take();
        let claimed = match first {
            Some(claim) => Some(claim),
            None => loop {
                let seen = self.resets.ended();
                if let Some((name, writes)) = self.restocked() {
                    self.put_back(admin);
                    return Ok(self.guard(name, writes));
                }
                if let Some(c) = claim(&mut admin, &claim_free(&self.template.name)).map_err(err)? {
                    break Some(c);
                }
                if !self.resets.wait(seen) {
                    break claim(&mut admin, &claim_needing_reset(&self.template.name))
                        .map_err(err)?;
                }
            },
        };
        let (name, writes) = match claimed {
            Some(Claim {
                name,
                dirty,
                writes,
            }) => {
                if !dirty {
                    (name, writes)
                } else {
                    // Released but not reset yet, or its holder died with it: make it clean
                    // before handing it out.
                    let now = self.make_clean(&mut admin, &name, writes, false)?;
                    (name, now)
                }
            }
            // More tests at once than clones so far: one more, which stays in the pool.
            None => (self.new_clone(&mut admin)?, 0),
        };
        self.put_back(admin);
        Ok(self.guard(name, writes))
    }
}

/// Claims a clone with a claim statement; `None` when none was free.
fn claim(admin: &mut postgres::Client, sql: &str) -> Result<Option<Claim>, postgres::Error> {
    let messages = admin.simple_query(sql)?;
    Ok(messages.iter().find_map(|m| match m {
        postgres::SimpleQueryMessage::Row(row) => Claim::of(row),
        _ => None,
    }))
}

/// Takes a clone of the template `template` that needs a reset.
fn claim_needing_reset(template: &str) -> String {
    format!(
        "UPDATE isoenv_clone SET holder = pg_backend_pid(), since = clock_timestamp()
         WHERE name = (SELECT name FROM isoenv_clone WHERE template = '{template}'
                       AND ({}) LIMIT 1 FOR UPDATE SKIP LOCKED)
         RETURNING name, true, catalog_writes",
        NEEDS_RESET.replace("STALE", STALE)
    )
}

/// A simple query's rows, statement by statement.
fn statements<const N: usize>(
    messages: &[postgres::SimpleQueryMessage],
) -> [Vec<&postgres::SimpleQueryRow>; N] {
    let mut out: [Vec<&postgres::SimpleQueryRow>; N] = std::array::from_fn(|_| Vec::new());
    let mut i = 0;
    for m in messages {
        match m {
            postgres::SimpleQueryMessage::Row(row) if i < N => out[i].push(row),
            postgres::SimpleQueryMessage::CommandComplete(_) => i += 1,
            _ => {}
        }
    }
    out
}

fn load_sql(name: &str) -> String {
    format!(
        "SELECT reset, quick, quick_expected, full_check, expected FROM isoenv_template
         WHERE name = '{name}'"
    )
}

fn template_of(name: &str, row: &postgres::SimpleQueryRow) -> Option<Template> {
    Some(Template {
        name: name.to_owned(),
        reset: row.get(0).map(str::to_owned),
        quick: row.get(1)?.to_owned(),
        quick_expected: row.get(2)?.to_owned(),
        full_check: row.get(3)?.to_owned(),
        expected: row.get(4)?.to_owned(),
    })
}

/// The template's record (the tables exist: called during setup).
fn load(admin: &mut postgres::Client, name: &str) -> Result<Option<Template>, postgres::Error> {
    let messages = admin.simple_query(&load_sql(name))?;
    let [rows] = statements(&messages);
    Ok(rows.first().and_then(|r| template_of(name, r)))
}

/// Builds the template (a build that died half-way left an unmarked database: start again),
/// records how its clones are reset and checked, removes older templates no test holds, and
/// makes the first clones.
fn build(
    admin: &mut postgres::Client,
    url: &str,
    name: &str,
    files: &[(std::path::PathBuf, String)],
) -> Result<Template> {
    let err = |e: postgres::Error| server_error(url, e);
    let left = admin
        .query_opt("SELECT 1 FROM pg_database WHERE datname = $1", &[&name])
        .map_err(err)?;
    if left.is_some() {
        // A build that died after marking it a template: a template cannot be dropped.
        admin
            .batch_execute(&format!("ALTER DATABASE {name} WITH IS_TEMPLATE false"))
            .map_err(err)?;
    }
    for sql in [
        format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"),
        format!("CREATE DATABASE {name}"),
    ] {
        admin.batch_execute(&sql).map_err(err)?;
    }
    let mut tpl = connect(&with_database(url, name))?;
    for (file, sql) in files {
        tpl.batch_execute(sql)
            .map_err(|e| TestingError::Migration {
                file: file.clone(),
                message: e
                    .as_db_error()
                    .map_or_else(|| e.to_string(), |d| d.message().to_owned()),
            })?;
    }
    let template = plan(&mut tpl, name).map_err(err)?;
    drop(tpl);
    admin
        .batch_execute(&format!(
            "ALTER DATABASE {name} WITH IS_TEMPLATE true ALLOW_CONNECTIONS false"
        ))
        .map_err(err)?;
    admin
        .execute(
            "INSERT INTO isoenv_template VALUES ($1, $2, $3, $4, $5, $6)",
            &[
                &name,
                &template.reset,
                &template.quick,
                &template.quick_expected,
                &template.full_check,
                &template.expected,
            ],
        )
        .map_err(err)?;
    collect_old(admin, name).map_err(err)?;
    // One for the first handout; the keeper makes the rest in the background.
    for _ in 0..pool_size().min(1) {
        let clone = format!("isoenv_c_{}", unique());
        admin
            .batch_execute(&format!("CREATE DATABASE {clone} TEMPLATE {name}"))
            .map_err(err)?;
        admin
            .execute(
                "INSERT INTO isoenv_clone VALUES ($1, $2, NULL, NULL)",
                &[&clone, &name],
            )
            .map_err(err)?;
    }
    Ok(template)
}

/// Reads, in the freshly migrated template, what resetting a clone takes.
fn plan(tpl: &mut postgres::Client, name: &str) -> Result<Template, postgres::Error> {
    let mut relations = Vec::new();
    let mut recyclable = true;
    for row in tpl.query(RELATIONS, &[])? {
        let (name, kind, blocks): (String, String, bool) = (row.get(0), row.get(1), row.get(2));
        recyclable &= !blocks;
        let seed = match kind.as_str() {
            "r" => {
                let sql = format!(
                    "SELECT json_agg(x)::text, (SELECT string_agg(quote_ident(attname), ', ' ORDER BY attnum)
                         FROM pg_attribute WHERE attrelid = '{name}'::regclass AND attnum > 0
                           AND NOT attisdropped AND attgenerated = ''), {}
                     FROM ONLY {name} x",
                    relation_hash(&format!("ONLY {name}"))
                );
                let row = tpl.query_one(&sql, &[])?;
                row.get::<_, Option<String>>(0).map(|rows| Seed {
                    rows,
                    columns: row.get(1),
                    hash: row.get(2),
                })
            }
            _ => None,
        };
        relations.push(Relation {
            table: kind == "r",
            name,
            seed,
        });
    }
    let sequences: Vec<String> = tpl
        .query(SEQUENCES, &[])?
        .iter()
        .map(|r| r.get(0))
        .collect();
    let plan = reset_plan(&relations, &sequences, recyclable);
    let quick_expected = last_row(&tpl.simple_query(&format!("{};", plan.quick))?)
        .map(|(_, v)| v.to_owned())
        .unwrap_or_default();
    let expected = last_value(&tpl.simple_query(&format!("{};", plan.full_check))?)
        .unwrap_or_default()
        .to_owned();
    Ok(Template {
        name: name.to_owned(),
        reset: plan.reset,
        quick: plan.quick,
        quick_expected,
        full_check: plan.full_check,
        expected,
    })
}

/// A user relation of the template.
struct Relation {
    /// `schema.name`, quoted.
    name: String,
    /// A table (else a materialized view, whose rows are checked, never rewritten).
    table: bool,
    /// The rows it holds in the template, if any.
    seed: Option<Seed>,
}

/// A table's rows in the template, as JSON, with the columns they are inserted into (all but
/// generated ones), and their hash.
struct Seed {
    rows: String,
    columns: String,
    hash: String,
}

/// Ends every other session in the connection's database and waits (10 s at most) until they
/// are gone; false if one is still there.
fn end_others(client: &mut postgres::Client) -> Result<bool, postgres::Error> {
    let count = |c: &mut postgres::Client, sql: &str| -> Result<i64, postgres::Error> {
        Ok(c.query_one(sql, &[])?.get(0))
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let mut left = count(client, TERMINATE)?;
    while left > 0 && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(1));
        left = count(client, OTHERS)?;
    }
    Ok(left == 0)
}

/// A hash of a relation's rows (`ONLY name` for a table).
fn relation_hash(relation: &str) -> String {
    format!(
        "(SELECT md5(coalesce(string_agg(x::text, '|' ORDER BY x::text), '')) FROM {relation} x)"
    )
}

/// A catalog's row count and newest row version.
fn catalog_fingerprint(catalog: &str) -> String {
    // A session's temporary schema stays once made; it is not the test's schema.
    let filter = if catalog == "pg_namespace" {
        " WHERE nspname !~ '^pg_(toast_)?temp_'"
    } else {
        ""
    };
    format!("(SELECT count(*) || '/' || coalesce(max(xmin::text::bigint), 0) FROM pg_catalog.{catalog}{filter})")
}

/// What giving a clone back clean takes, from the template's relations and its sequences'
/// `setval` statements: tables empty in the template are emptied, seeded tables whose rows
/// differ from the seed get the seed back (in replica mode, so foreign keys impose no order),
/// sequences are set back, and the check is the catalog fingerprint plus a hash of every
/// relation that has rows. Without a usable reset (rules, `ALWAYS` triggers, foreign tables, a
/// seed that cannot be quoted) every released clone is made again.
fn reset_plan(relations: &[Relation], sequences: &[String], recyclable: bool) -> Plan {
    const QUOTE: &str = "$isoenv_seed$";
    let mut recyclable = recyclable;
    // One PL/pgSQL block: statements are planned once, and only tables with rows are touched.
    let mut block = String::new();
    let mut seeds = Vec::new();
    for r in relations {
        let only = if r.table { "ONLY " } else { "" };
        let hash = relation_hash(&format!("{only}{}", r.name));
        match (&r.seed, r.table) {
            (None, true) => block.push_str(&format!(
                "IF EXISTS (SELECT 1 FROM ONLY {0}) THEN DELETE FROM ONLY {0}; END IF;",
                r.name
            )),
            (None, false) => seeds.push(hash),
            (Some(seed), _) => {
                recyclable &= !seed.rows.contains(QUOTE) && !seed.rows.contains("$isoenv$");
                block.push_str(&format!(
                    "IF {hash} <> '{expected}' THEN DELETE FROM ONLY {name}; \
                     INSERT INTO {name} ({columns}) OVERRIDING SYSTEM VALUE SELECT {columns} \
                     FROM json_populate_recordset(NULL::{name}, {QUOTE}{rows}{QUOTE}); END IF;",
                    expected = seed.hash,
                    name = r.name,
                    rows = seed.rows,
                    columns = seed.columns,
                ));
                seeds.push(hash);
            }
        }
    }
    for setval in sequences {
        block.push_str(setval);
    }
    let reset = format!(
        "SET LOCAL session_replication_role = replica; DO $isoenv$ BEGIN {block} END $isoenv$;"
    );
    let all = CATALOGS.iter().chain(["pg_namespace"].iter());
    let full: Vec<String> = all
        .map(|c| catalog_fingerprint(c))
        .chain(seeds.clone())
        .collect();
    let quick: Vec<String> = std::iter::once(catalog_fingerprint("pg_class"))
        .chain(seeds)
        .collect();
    Plan {
        reset: recyclable.then_some(reset),
        quick: format!("SELECT {CATALOG_WRITES}, {}", quick.join(" || ' ' || ")),
        full_check: format!("SELECT {}", full.join(" || ' ' || ")),
    }
}

struct Plan {
    reset: Option<String>,
    quick: String,
    full_check: String,
}

/// Drops clones of other templates that no live test holds, and those templates once no clone
/// of theirs is left.
fn collect_old(admin: &mut postgres::Client, current: &str) -> Result<(), postgres::Error> {
    let stale = admin.query(
        &format!(
            "DELETE FROM isoenv_clone c WHERE template <> $1 AND (holder IS NULL OR ({STALE}))
             RETURNING name"
        ),
        &[&current],
    )?;
    for row in stale {
        let clone: String = row.get(0);
        admin.batch_execute(&format!("DROP DATABASE IF EXISTS {clone} WITH (FORCE)"))?;
    }
    let old = admin.query(
        "DELETE FROM isoenv_template t WHERE name <> $1
             AND NOT EXISTS (SELECT 1 FROM isoenv_clone c WHERE c.template = t.name)
         RETURNING name",
        &[&current],
    )?;
    for row in old {
        let template: String = row.get(0);
        // Two queries: in one, the two would run as one transaction, which DROP DATABASE
        // refuses.
        admin.batch_execute(&format!("ALTER DATABASE {template} WITH IS_TEMPLATE false"))?;
        admin.batch_execute(&format!("DROP DATABASE IF EXISTS {template}"))?;
    }
    Ok(())
}

/// The first two values of the last row of a simple query's results.
fn last_row(messages: &[postgres::SimpleQueryMessage]) -> Option<(&str, &str)> {
    messages.iter().rev().find_map(|m| match m {
        postgres::SimpleQueryMessage::Row(row) => Some((row.get(0)?, row.get(1)?)),
        _ => None,
    })
}

/// The first value of the last row of a simple query's results.
fn last_value(messages: &[postgres::SimpleQueryMessage]) -> Option<&str> {
    messages.iter().rev().find_map(|m| match m {
        postgres::SimpleQueryMessage::Row(row) => row.get(0),
        _ => None,
    })
}

/// A connection of the pool's own (named [`POOL_CONNECTION`]).
fn connect(url: &str) -> Result<postgres::Client> {
    url.parse::<postgres::Config>()
        .and_then(|mut config| {
            config
                .application_name(POOL_CONNECTION)
                .connect(postgres::NoTls)
        })
        .map_err(|e| server_error(url, e))
}

fn server_error(url: &str, e: postgres::Error) -> TestingError {
    TestingError::Server {
        engine: EngineKind::Postgres,
        server: redact(url),
        message: e
            .as_db_error()
            .map_or_else(|| e.to_string(), |d| d.message().to_owned()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn relation(name: &str, table: bool, seed: Option<&str>) -> Relation {
        Relation {
            name: name.into(),
            table,
            seed: seed.map(|rows| Seed {
                rows: rows.into(),
                columns: "id, name".into(),
                hash: "h0".into(),
            }),
        }
    }

    #[test]
    fn empty_tables_are_emptied_seeds_put_back_and_sequences_set() {
        let plan = reset_plan(
            &[
                relation("public.orders", true, None),
                relation("public.kinds", true, Some(r#"[{"id":1,"name":"a"}]"#)),
                relation("public.totals", false, None),
            ],
            &["PERFORM setval('public.orders_id_seq', 1, false);".into()],
            true,
        );
        let reset = plan.reset.expect("recyclable");
        assert!(reset.starts_with("SET LOCAL session_replication_role = replica; DO $isoenv$"));
        assert!(reset.contains(
            "IF EXISTS (SELECT 1 FROM ONLY public.orders) THEN DELETE FROM ONLY public.orders; END IF;"
        ));
        assert!(
            reset.contains("FROM ONLY public.kinds x) <> 'h0' THEN DELETE FROM ONLY public.kinds;")
        );
        assert!(reset.contains(
            r#"INSERT INTO public.kinds (id, name) OVERRIDING SYSTEM VALUE SELECT id, name FROM json_populate_recordset(NULL::public.kinds, $isoenv_seed$[{"id":1,"name":"a"}]$isoenv_seed$)"#
        ));
        assert!(reset.contains("PERFORM setval('public.orders_id_seq', 1, false);"));
        assert!(
            !reset.contains("public.totals"),
            "a materialized view is only checked"
        );
        // The quick check: catalog writes, pg_class, then the seeded relations' hashes.
        assert!(plan
            .quick
            .starts_with(&format!("SELECT {CATALOG_WRITES}, ")));
        assert!(plan.quick.contains("FROM pg_catalog.pg_class)"));
        assert!(plan.quick.contains("FROM ONLY public.kinds x)"));
        assert!(plan.quick.contains("FROM public.totals x)"));
        for catalog in CATALOGS {
            assert!(plan
                .full_check
                .contains(&format!("FROM pg_catalog.{catalog})")));
        }
        assert!(plan.full_check.contains("nspname !~ '^pg_(toast_)?temp_'"));
    }

    #[test]
    fn a_schema_that_cannot_be_reset_makes_every_release_a_new_clone() {
        let table = [relation("public.t", true, None)];
        assert!(reset_plan(&table, &[], false).reset.is_none());
        let quoted = [relation("public.t", true, Some("[\"$isoenv_seed$\"]"))];
        assert!(reset_plan(&quoted, &[], true).reset.is_none());
    }

    #[test]
    fn statements_are_split_per_command() {
        assert_eq!(statements::<2>(&[]).map(|s| s.len()), [0, 0]);
    }
}
