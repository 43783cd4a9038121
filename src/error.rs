//! The crate's error: one enum joining each layer's own error (`#[from]`), every variant saying
//! what went wrong, where, and how to fix it.

use std::path::PathBuf;

use crate::backend::docker::client::DockerError;
use crate::backend::ssh_tunnel::TunnelError;
use crate::config::{ConfigError, Profile};
use crate::envfile::EnvFileError;
use crate::remote::CheckError;

/// Library errors. Each says what went wrong, where, and how to fix it; none holds a password.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    EnvFile(#[from] EnvFileError),
    #[error("invalid environment name `{name}`: {reason}")]
    InvalidName { name: String, reason: String },
    #[error("environment `{name}` already exists at {}; use it, or `cargo xtask db destroy {name}` first", dir.display())]
    Exists { name: String, dir: PathBuf },
    #[error("no environment `{name}` in {}; `cargo xtask db list` shows the existing ones", root.display())]
    NotFound { name: String, root: PathBuf },
    #[error("environment `{name}`: its record cannot be used: {cause}\n  fix: `cargo xtask db destroy {name}` stops what runs in it and removes it")]
    Broken { name: String, cause: std::io::Error },
    #[error("environment `{name}` is being changed by another isoenv command; try again when it finishes")]
    Busy { name: String },
    #[error("port {port}: {reason}")]
    InvalidPort { port: u16, reason: String },
    #[error("port {port} on 127.0.0.1 is already in use; pick another with --port, or omit --port for a free one")]
    PortTaken { port: u16 },
    #[error("{engine} is not installed: {detail}\n  install it with: {install}\n  (or rerun with --install / ISOENV_AUTO_INSTALL=1 to let isoenv run that)")]
    EngineMissing {
        engine: String,
        detail: String,
        install: String,
    },
    #[error("refusing to {action} with ENVIRONMENT={environment}: production databases are never created, changed or removed by isoenv")]
    Production {
        action: String,
        environment: Profile,
    },
    #[error("environment `{name}`: {message}")]
    Env { name: String, message: String },
    /// The cause is part of the message (and so not also a `source()`, which would print it
    /// twice in a report chain).
    #[error("{context}: {cause}")]
    Io {
        context: String,
        cause: std::io::Error,
    },
    #[error(transparent)]
    Tunnel(#[from] TunnelError),
    #[error("{target}: {cause}\n  fix: {advice}")]
    Database {
        /// The database, as a URL without the password.
        target: String,
        cause: CheckError,
        advice: String,
    },
    #[error(transparent)]
    Docker(#[from] DockerError),
    #[error("image {reference}: {message}")]
    Image { reference: String, message: String },
    #[error("{0}")]
    Unsupported(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Adds "what we were doing" to an I/O error.
pub(crate) trait IoContext<T> {
    fn context(self, what: impl FnOnce() -> String) -> Result<T>;
}

impl<T> IoContext<T> for std::io::Result<T> {
    fn context(self, what: impl FnOnce() -> String) -> Result<T> {
        self.map_err(|cause| Error::Io {
            context: what(),
            cause,
        })
    }
}
