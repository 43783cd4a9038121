//! MariaDB/MySQL: a database per test with the migrations applied, some made ahead of time.
//! The pool is a table in the server's `isoenv` database, claimed with `FOR UPDATE SKIP
//! LOCKED`, so every test process shares it.

use std::path::PathBuf;
use std::sync::Mutex;

use mysql::prelude::Queryable;

use super::{
    migrations, pool_size, redact, shared, unique, with_database, Result, TestDb, TestingError,
    Work, Worker,
};
use crate::engine::EngineKind;

pub(super) struct Pool {
    url: String,
    hash: String,
    files: Vec<(PathBuf, String)>,
    idle: Mutex<Vec<mysql::Conn>>,
    worker: Worker,
}

impl Pool {
    pub(super) fn get() -> Result<&'static Pool> {
        static POOL: Mutex<Option<&'static Pool>> = Mutex::new(None);
        shared(&POOL, Pool::new)
    }

    fn new() -> Result<Pool> {
        let url = super::server_url(EngineKind::Mysql)?;
        let (files, hash) = migrations(EngineKind::Mysql)?;
        let mut admin = connect(&url)?;
        admin
            .query_drop(
                "CREATE DATABASE IF NOT EXISTS isoenv;
                 CREATE TABLE IF NOT EXISTS isoenv.pool (name varchar(64) PRIMARY KEY, schema_hash char(16) NOT NULL) ENGINE=InnoDB",
            )
            .map_err(|e| server_error(&url, e))?;
        let mut conn = connect(&url)?;
        let (wurl, whash, wfiles) = (url.clone(), hash.clone(), files.clone());
        let worker = Worker::spawn(EngineKind::Mysql, &url, move |w| {
            match w {
                Work::Drop(name) => conn
                    .query_drop(format!("DROP DATABASE IF EXISTS `{name}`"))
                    .map_err(CreateError::Server),
                Work::Refill => refill(&mut conn, &whash, &wfiles),
            }
            .map_err(|e| create_error(&wurl, e))
        })?;
        Ok(Pool {
            url,
            hash,
            files,
            idle: Mutex::new(vec![admin]),
            worker,
        })
    }

    pub(super) fn handout(&'static self) -> Result<TestDb> {
        let idle = self.idle.lock().unwrap_or_else(|e| e.into_inner()).pop();
        let mut conn = match idle {
            Some(c) => c,
            None => connect(&self.url)?,
        };
        let claimed = claim(&mut conn, &self.hash).map_err(|e| server_error(&self.url, e))?;
        let name = match claimed {
            Some(name) => name,
            // The pool ran dry (many tests at once): make one now.
            None => {
                let name = format!("isoenv_t_{}", unique());
                create(&mut conn, &name, &self.files).map_err(|e| create_error(&self.url, e))?;
                name
            }
        };
        self.idle
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(conn);
        self.worker.send(Work::Refill);
        let dropped = name.clone();
        Ok(TestDb {
            engine: EngineKind::Mysql,
            url: with_database(&self.url, &name),
            name,
            release: Some(Box::new(move || self.worker.send(Work::Drop(dropped)))),
        })
    }
}

fn claim(conn: &mut mysql::Conn, hash: &str) -> Result<Option<String>, mysql::Error> {
    let mut tx = conn.start_transaction(mysql::TxOpts::default())?;
    let name: Option<String> = tx.exec_first(
        "SELECT name FROM isoenv.pool WHERE schema_hash = ? LIMIT 1 FOR UPDATE SKIP LOCKED",
        (hash,),
    )?;
    if let Some(name) = &name {
        tx.exec_drop("DELETE FROM isoenv.pool WHERE name = ?", (name,))?;
    }
    tx.commit()?;
    Ok(name)
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

fn refill(
    conn: &mut mysql::Conn,
    hash: &str,
    files: &[(PathBuf, String)],
) -> Result<(), CreateError> {
    let have: usize = conn
        .exec_first(
            "SELECT count(*) FROM isoenv.pool WHERE schema_hash = ?",
            (hash,),
        )
        .map_err(CreateError::Server)?
        .unwrap_or(0);
    for _ in have..pool_size() {
        let name = format!("isoenv_p_{}", unique());
        create(conn, &name, files)?;
        conn.exec_drop("INSERT INTO isoenv.pool VALUES (?, ?)", (&name, hash))
            .map_err(CreateError::Server)?;
    }
    Ok(())
}

fn connect(url: &str) -> Result<mysql::Conn> {
    let opts = mysql::Opts::from_url(url).map_err(|e| TestingError::Server {
        engine: EngineKind::Mysql,
        server: redact(url),
        message: e.to_string(),
    })?;
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
