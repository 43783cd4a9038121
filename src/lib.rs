//! isoenv: isolated, real databases (PostgreSQL, MariaDB/MySQL, Redis) on demand for a
//! repository, driven by one `.env`. Imports run one way, top to bottom:
//!
//! - [`cli`]: the command line any repository's xtask (or the `isoenv` binary) can be.
//! - [`testing`]: per-test databases from a pool of template clones.
//! - [`workspace`]: the verbs (create, start, stop, destroy, list, `up`/`down`, gc) composed
//!   from what follows.
//! - [`backend`]: *where* a server runs (a local process, a namespace sandbox, a container, an
//!   SSH tunnel to one elsewhere), one contract for all of them, and what each records.
//! - [`config`] and [`remote`]: the profile (development, staging, production) from `.env`, and
//!   read-only checks of databases isoenv does not run.
//! - [`engine`]: *what* runs: how each database is initialized, started, probed and stopped.
//! - [`layout`], [`envfile`]: an environment's paths; `.env` as variables.
//! - [`sys`]: the operating system's side (processes, files, secrets, ports, locks).

pub mod backend;
pub mod bench;
#[cfg(feature = "cli")]
pub mod cli;
pub mod config;
pub mod engine;
pub mod envfile;
pub mod error;
pub mod layout;
pub mod remote;
pub mod sys;
#[cfg(feature = "testing")]
pub mod testing;
pub mod workspace;

pub use config::{DatabaseConfig, EnvironmentConfig, Problem, Profile};
pub use envfile::{EnvFile, Vars};
pub use error::{Error, Result};
