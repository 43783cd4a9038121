//! PostgreSQL: clones of a migrated template database, some made ahead of time. The pool is a
//! table in the server's `postgres` database, claimed with `FOR UPDATE SKIP LOCKED`, so every
//! test process shares it.

use std::sync::Mutex;

use super::{
    migrations, pool_size, redact, shared, unique, with_database, Result, TestDb, TestingError,
    Work, Worker,
};
use crate::engine::EngineKind;

/// Serializes schema setup and template builds across processes.
const SETUP_LOCK: i64 = 0x6973_6f65_6e76; // "isoenv"

const CLAIM: &str = "DELETE FROM isoenv_pool WHERE name = \
    (SELECT name FROM isoenv_pool WHERE template = $1 LIMIT 1 FOR UPDATE SKIP LOCKED) \
    RETURNING name";

pub(super) struct Pool {
    url: String,
    template: String,
    /// Idle admin connections: a handout takes one, so handouts do not queue behind each other.
    idle: Mutex<Vec<postgres::Client>>,
    worker: Worker,
}

impl Pool {
    pub(super) fn get() -> Result<&'static Pool> {
        static POOL: Mutex<Option<&'static Pool>> = Mutex::new(None);
        shared(&POOL, Pool::new)
    }

    fn new() -> Result<Pool> {
        let url = super::server_url(EngineKind::Postgres)?;
        let err = |e: postgres::Error| server_error(&url, e);
        let mut admin = connect(&url)?;
        let (files, hash) = migrations(EngineKind::Postgres)?;
        let template = format!("isoenv_tpl_{hash}");
        admin
            .batch_execute(&format!(
                "SELECT pg_advisory_lock({SETUP_LOCK});
                 CREATE TABLE IF NOT EXISTS isoenv_pool (name text PRIMARY KEY, template text NOT NULL);
                 CREATE TABLE IF NOT EXISTS isoenv_templates (name text PRIMARY KEY);"
            ))
            .map_err(err)?;
        let built = admin
            .query_opt(
                "SELECT 1 FROM isoenv_templates WHERE name = $1",
                &[&template],
            )
            .map_err(err)?
            .is_some();
        if !built {
            // A build that died half-way left an unmarked database: start again.
            for sql in [
                format!("DROP DATABASE IF EXISTS {template} WITH (FORCE)"),
                format!("CREATE DATABASE {template}"),
            ] {
                admin.batch_execute(&sql).map_err(err)?;
            }
            let mut tpl = connect(&with_database(&url, &template))?;
            for (file, sql) in &files {
                tpl.batch_execute(sql)
                    .map_err(|e| TestingError::Migration {
                        file: file.clone(),
                        message: e
                            .as_db_error()
                            .map_or_else(|| e.to_string(), |d| d.message().to_owned()),
                    })?;
            }
            drop(tpl);
            admin
                .batch_execute(&format!(
                    "ALTER DATABASE {template} WITH IS_TEMPLATE true ALLOW_CONNECTIONS false"
                ))
                .map_err(err)?;
            admin
                .execute("INSERT INTO isoenv_templates VALUES ($1)", &[&template])
                .map_err(err)?;
        }
        admin
            .batch_execute(&format!("SELECT pg_advisory_unlock({SETUP_LOCK})"))
            .map_err(err)?;

        let mut client = connect(&url)?;
        let (wurl, wtpl) = (url.clone(), template.clone());
        let worker = Worker::spawn(EngineKind::Postgres, &url, move |w| {
            match w {
                Work::Drop(name) => {
                    client.batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                }
                Work::Refill => refill(&mut client, &wtpl),
            }
            .map_err(|e| server_error(&wurl, e))
        })?;
        Ok(Pool {
            url,
            template,
            idle: Mutex::new(vec![admin]),
            worker,
        })
    }

    pub(super) fn handout(&'static self) -> Result<TestDb> {
        let idle = self.idle.lock().unwrap_or_else(|e| e.into_inner()).pop();
        let mut client = match idle {
            Some(c) if !c.is_closed() => c,
            _ => connect(&self.url)?,
        };
        let err = |e: postgres::Error| server_error(&self.url, e);
        let claimed = client.query_opt(CLAIM, &[&self.template]).map_err(err)?;
        let name = match claimed {
            Some(row) => row.get::<_, String>(0),
            // The pool ran dry (many tests at once): make one now.
            None => {
                let name = format!("isoenv_t_{}", unique());
                client
                    .batch_execute(&format!(
                        "CREATE DATABASE {name} TEMPLATE {}",
                        self.template
                    ))
                    .map_err(err)?;
                name
            }
        };
        self.idle
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(client);
        self.worker.send(Work::Refill);
        let dropped = name.clone();
        Ok(TestDb {
            engine: EngineKind::Postgres,
            url: with_database(&self.url, &name),
            name,
            release: Some(Box::new(move || self.worker.send(Work::Drop(dropped)))),
        })
    }
}

fn refill(client: &mut postgres::Client, template: &str) -> Result<(), postgres::Error> {
    let have: i64 = client
        .query_one(
            "SELECT count(*) FROM isoenv_pool WHERE template = $1",
            &[&template],
        )?
        .get(0);
    for _ in have..pool_size() as i64 {
        let name = format!("isoenv_p_{}", unique());
        client.batch_execute(&format!("CREATE DATABASE {name} TEMPLATE {template}"))?;
        client.execute(
            "INSERT INTO isoenv_pool VALUES ($1, $2)",
            &[&name, &template],
        )?;
    }
    Ok(())
}

fn connect(url: &str) -> Result<postgres::Client> {
    postgres::Client::connect(url, postgres::NoTls).map_err(|e| server_error(url, e))
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
