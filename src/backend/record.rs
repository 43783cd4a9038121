//! An environment's machine-readable record on disk: what every backend records, and each
//! backend's own part (a process, a container, a tunnel). Its paths are [`crate::layout`]'s.

use std::fs;
use std::io;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use super::docker::ContainerRecord;
use super::ssh_tunnel::TunnelSpec;
use super::{BackendKind, CreateOptions, Status};
use crate::engine::EngineKind;
use crate::layout::Layout;
use crate::sys::process::ProcessId;

pub const SCHEMA: u32 = 1;

/// What isoenv records about an environment. Secrets live in `credentials`, not here.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EnvState {
    pub schema: u32,
    pub name: String,
    pub engine: EngineKind,
    pub backend: BackendKind,
    /// Empty for env-only environments.
    pub engine_version: String,
    pub host: String,
    pub port: u16,
    /// Whether isoenv runs a server (false: env-only, variables and activate only).
    pub service: bool,
    /// The uid (= gid) of its own that the environment's servers run as, when it has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub identity: Option<u32>,
    /// The server while it runs (or until isoenv notices it died).
    pub process: Option<ProcessId>,
    pub created_at: u64,
    /// The process this environment lives for (e.g. a `test --isolated` run): once it is gone,
    /// the environment is garbage that `db gc` (and the next isoenv command) removes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner: Option<ProcessId>,
    /// For the ssh-tunnel backend: the route the tunnel was opened with.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tunnel: Option<TunnelSpec>,
    /// For the docker backend: the container and its volume. Recorded before either is made,
    /// so that whatever a killed `create` made is found again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub container: Option<ContainerRecord>,
}

impl EnvState {
    /// The record of a new environment: nothing runs yet, nothing of the backend's is made.
    pub fn new(opts: &CreateOptions, host: String, port: u16) -> Self {
        EnvState {
            schema: SCHEMA,
            name: opts.name.clone(),
            engine: opts.engine,
            backend: opts.backend,
            engine_version: String::new(),
            host,
            port,
            service: opts.service,
            identity: None,
            process: None,
            created_at: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
            owner: opts.owner,
            tunnel: None,
            container: None,
        }
    }

    /// The status given whether the recorded process is alive: a pure decision.
    pub fn status(&self, alive: impl Fn(&ProcessId) -> bool) -> Status {
        match (&self.process, self.service) {
            (_, false) => Status::EnvOnly,
            (None, true) => Status::Stopped,
            (Some(p), true) if alive(p) => Status::Running,
            (Some(_), true) => Status::Crashed,
        }
    }

    /// Whether this is an ephemeral environment whose owner has gone: a pure decision.
    pub fn orphaned(&self, alive: impl Fn(&ProcessId) -> bool) -> bool {
        self.owner.as_ref().is_some_and(|o| !alive(o))
    }

    /// The record, `None` when there is none; a record that cannot be used (truncated,
    /// garbage, wrong types, unknown fields, another schema) is `InvalidData` saying why.
    pub fn load(layout: &Layout) -> io::Result<Option<Self>> {
        let bytes = match fs::read(layout.state_file()) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e),
        };
        let invalid = |why: String| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("{}: {why}", layout.state_file().display()),
            )
        };
        let state: Self = serde_json::from_slice(&bytes).map_err(|e| invalid(e.to_string()))?;
        if state.schema != SCHEMA {
            return Err(invalid(format!(
                "schema {} is not this isoenv's ({SCHEMA}); it was written by another version",
                state.schema
            )));
        }
        Ok(Some(state))
    }

    /// [`EnvState::save`], the error saying which file.
    pub fn store(&self, layout: &Layout) -> crate::Result<()> {
        self.save(layout).map_err(|cause| crate::Error::Io {
            context: format!("cannot write {}", layout.state_file().display()),
            cause,
        })
    }

    /// Writes atomically (temp file + rename): a reader never sees half a record.
    pub fn save(&self, layout: &Layout) -> io::Result<()> {
        crate::sys::files::write_atomic(&layout.state_file(), &serde_json::to_vec_pretty(self)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_is_decided_from_the_record_and_liveness() {
        let p = ProcessId {
            pid: 1,
            start_time: 1,
        };
        let mut s = EnvState {
            schema: SCHEMA,
            name: "x".into(),
            engine: EngineKind::Postgres,
            backend: BackendKind::Lightweight,
            engine_version: "15".into(),
            host: "127.0.0.1".into(),
            port: 1,
            service: true,
            identity: None,
            process: Some(p),
            created_at: 0,
            owner: None,
            tunnel: None,
            container: None,
        };
        assert_eq!(s.status(|_| true), Status::Running);
        assert_eq!(s.status(|_| false), Status::Crashed);
        s.process = None;
        assert_eq!(s.status(|_| true), Status::Stopped);
        s.service = false;
        assert_eq!(s.status(|_| true), Status::EnvOnly);
        assert!(
            !s.orphaned(|_| false),
            "an environment without owner is kept"
        );
        s.owner = Some(p);
        assert!(!s.orphaned(|_| true));
        assert!(s.orphaned(|_| false));
    }
}
