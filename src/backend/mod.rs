//! Isolation backends: how a server runs. Engines say *what* to run; a backend decides *where*
//! (a plain local process, a namespace sandbox, a container). Adding a backend means one module
//! here and one arm in [`BackendKind::backend`].

mod lightweight;

use std::fmt;
use std::io;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::process::{Launch, ProcessId, ServiceUser};
use crate::state::Layout;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BackendKind {
    Lightweight,
}

impl BackendKind {
    pub fn as_str(self) -> &'static str {
        match self {
            BackendKind::Lightweight => "lightweight",
        }
    }

    pub fn backend(self) -> &'static dyn Backend {
        match self {
            BackendKind::Lightweight => &lightweight::Lightweight,
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
}
