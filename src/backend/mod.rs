//! Isolation backends: how a server runs. Engines say *what* to run; a backend decides *where*
//! (a plain local process, a namespace sandbox, a container). Adding a backend means one module
//! here and one arm in [`BackendKind::backend`].

pub mod docker;
mod lightweight;
pub mod manifest;
pub mod sandbox;
pub mod ssh_tunnel;

use std::fmt;
use std::io;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use nix::sys::signal::Signal;

use crate::engine::{Binaries, Engine};
use crate::layout::Layout;
use crate::sys::process::{Launch, ProcessId, ServiceUser};
use manifest::Manifest;

pub use sandbox::manifest_file;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum BackendKind {
    Lightweight,
    /// Linux namespaces confined by a capability manifest.
    Sandbox,
    /// The development VM's database, reached through `ssh -L` (made by `db up`, not `create`).
    SshTunnel,
    /// A container through the Docker API.
    Docker,
}

impl BackendKind {
    pub fn as_str(self) -> &'static str {
        match self {
            BackendKind::Lightweight => "lightweight",
            BackendKind::Sandbox => "sandbox",
            BackendKind::SshTunnel => "ssh-tunnel",
            BackendKind::Docker => "docker",
        }
    }

    pub fn backend(self) -> &'static dyn Backend {
        match self {
            BackendKind::Lightweight => &lightweight::Lightweight,
            BackendKind::Sandbox => &sandbox::Sandbox,
            BackendKind::SshTunnel => &ssh_tunnel::SshTunnel,
            BackendKind::Docker => &docker::Docker,
        }
    }
}

impl fmt::Display for BackendKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for BackendKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "lightweight" => Ok(BackendKind::Lightweight),
            "sandbox" => Ok(BackendKind::Sandbox),
            "ssh-tunnel" => Err("ssh tunnels are opened by `cargo xtask db up` in development with DB_VM_SSH_ENABLED=true, not created by name".into()),
            "docker" => Ok(BackendKind::Docker),
            _ => Err(format!(
                "unknown backend `{s}`; valid backends: lightweight, sandbox, docker"
            )),
        }
    }
}

/// What a new environment's backend may prepare (once, at create).
pub struct Prepare<'a> {
    pub layout: &'a Layout,
    pub engine: &'a dyn Engine,
    pub bins: &'a Binaries,
    pub port: u16,
    /// The default memory limit (`WASI_MEMORY_LIMIT`).
    pub memory: u64,
}

/// One server start.
pub struct Spawn<'a> {
    pub launch: &'a Launch,
    pub layout: &'a Layout,
    pub user: &'a ServiceUser,
    pub engine: &'a dyn Engine,
    pub port: u16,
}

/// What [`Plan::apply`] achieved: one line per limit, true only when the kernel took the value.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Enforcement {
    pub limit: String,
    pub value: String,
    pub via: String,
    pub enforced: bool,
}

/// What confines an environment, as `inspect` shows it.
#[derive(Debug, Clone, Serialize)]
pub struct Isolation {
    pub manifest_file: PathBuf,
    /// The manifest, or why it cannot be used.
    pub manifest: Result<Manifest, String>,
    pub running: bool,
    /// The sandbox's pid 1 as the host sees it (for `nsenter --target`).
    pub init_pid: Option<i32>,
    /// Each limit and whether the kernel enforces it right now.
    pub limits: Vec<Enforcement>,
}

/// Whether an environment's server runs, as its backend tells.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Status {
    Running,
    Stopped,
    Crashed,
    EnvOnly,
    /// Its container was removed behind isoenv's back (`start` makes it again).
    Missing,
    /// Its Docker engine cannot be reached.
    Unknown,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Running => "running",
            Status::Stopped => "stopped",
            Status::Crashed => "crashed",
            Status::EnvOnly => "env-only",
            Status::Missing => "missing",
            Status::Unknown => "unknown",
        }
    }
}

pub trait Backend: Sync {
    fn kind(&self) -> BackendKind;

    /// Writes what the backend needs into a new environment (e.g. its manifest).
    fn prepare(&self, _p: &Prepare) -> Result<(), String> {
        Ok(())
    }

    /// Starts the server and returns the process that owns its lifetime.
    fn spawn(&self, s: &Spawn) -> io::Result<ProcessId>;

    /// The signal for a graceful, fast stop of what [`Backend::spawn`] started.
    fn stop_signal(&self, engine: &dyn Engine) -> Signal {
        engine.stop_signal()
    }

    /// Removes what a dead server's backend left outside the environment directory.
    fn release(&self, _dir: &Path) -> io::Result<()> {
        Ok(())
    }

    fn isolation(&self, _dir: &Path) -> Option<Isolation> {
        None
    }
}
