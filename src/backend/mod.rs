//! Isolation backends: how a server runs. Engines say *what* to run; a backend decides *where*
//! (a plain local process, a namespace sandbox, a container). Adding a backend means one module
//! here and one arm in [`BackendKind::backend`].

mod lightweight;
mod ssh;

use std::fmt;
use std::io;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use nix::sys::signal::Signal;

use crate::engine::Engine;
use crate::process::{Launch, ProcessId, ServiceUser};
use crate::state::Layout;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum BackendKind {
    Lightweight,
    /// The development VM's database, reached through `ssh -L` (made by `db up`, not `create`).
    SshTunnel,
}

impl BackendKind {
    pub fn as_str(self) -> &'static str {
        match self {
            BackendKind::Lightweight => "lightweight",
            BackendKind::SshTunnel => "ssh-tunnel",
        }
    }

    pub fn backend(self) -> &'static dyn Backend {
        match self {
            BackendKind::Lightweight => &lightweight::Lightweight,
            BackendKind::SshTunnel => &ssh::SshTunnel,
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
            "ssh-tunnel" => Err("ssh tunnels are opened by `cargo xtask db up` in development with DB_VM_SSH_ENABLED=true, not created by name".into()),
            "sandbox" | "docker" => Err(format!(
                "the `{s}` backend is not available in this version; use --backend lightweight"
            )),
            _ => Err(format!(
                "unknown backend `{s}`; valid backends: lightweight"
            )),
        }
    }
}

pub trait Backend: Sync {
    fn kind(&self) -> BackendKind;

    /// Starts `launch` for the environment at `layout`, running as `user`, and returns the
    /// process that owns the server's lifetime.
    fn spawn(&self, launch: &Launch, layout: &Layout, user: &ServiceUser) -> io::Result<ProcessId>;

    /// The signal for a graceful, fast stop of what [`Backend::spawn`] started.
    fn stop_signal(&self, engine: &dyn Engine) -> Signal {
        engine.stop_signal()
    }
}
