//! isoenv: isolated, real databases (PostgreSQL, MariaDB/MySQL, Redis) on demand for a
//! repository, driven by one `.env`.
//!
//! - [`config`]: the environment configuration (development, staging, production).
//! - [`engine`]: what each database needs to be initialized, started, probed and stopped.
//! - [`backend`]: how a server is isolated.
//! - [`state`]: what is recorded about each environment.
//! - [`workflow`]: create/start/stop/destroy/list and `up`/`down`, composed from the above.

pub mod activate;
pub mod backend;
pub mod bench;
pub mod cgroup;
#[cfg(feature = "cli")]
pub mod cli;
pub mod config;
pub mod docker;
pub mod doctor;
pub mod engine;
pub mod envfile;
pub mod error;
pub mod files;
pub mod hooks;
pub mod libs;
pub mod manifest;
pub mod net;
pub mod process;
pub mod remote;
pub mod sandbox;
pub mod secret;
pub mod shell;
pub mod state;
#[cfg(feature = "testing")]
pub mod testing;
pub mod testrun;
pub mod tunnel;
pub mod workflow;

pub use config::{DatabaseConfig, Environment, EnvironmentConfig, Problem};
pub use envfile::{EnvFile, Vars};
pub use error::{Error, Result};
