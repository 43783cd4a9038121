//! What commands show of environments: `list`, `inspect`, `url`, the exports and the logs.
//! Reading only, without the lock.

use std::fs;
use std::path::PathBuf;

use serde::Serialize;

use super::client_files::{self, read_credentials};
use super::{check_name, Workspace};
use crate::backend::docker::ContainerRecord;
use crate::backend::{memory, BackendKind, EnvState, Isolation, Status};
use crate::engine::EngineKind;
use crate::error::{Error, Result};
use crate::layout::{validate_name, Layout};
use crate::sys::process::ProcessId;
use crate::sys::secret::Secret;

/// One environment as commands show it. No secrets.
#[derive(Debug, Clone, Serialize)]
pub struct EnvInfo {
    pub name: String,
    pub engine: EngineKind,
    pub backend: BackendKind,
    pub status: Status,
    pub host: String,
    pub port: u16,
    pub pid: Option<i32>,
    pub dir: PathBuf,
    pub version: String,
    /// The connection URL without the password.
    pub url: String,
    pub activate: PathBuf,
    /// The directory of the server's Unix socket, for clients that can use it (fastest path).
    pub socket_dir: Option<PathBuf>,
    /// The docker backend's container and volume.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub container: Option<ContainerRecord>,
    /// The process the environment lives for, when it is ephemeral (see
    /// [`crate::backend::CreateOptions::owner`]).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub owner: Option<ProcessId>,
    /// What confines the server (`inspect` only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub isolation: Option<Isolation>,
    /// Where the data is when a test run's server keeps it in memory
    /// ([`crate::backend::memory`]), not in `dir`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub data_in_memory: Option<PathBuf>,
}

impl Workspace {
    pub(super) fn info(&self, state: &EnvState, layout: &Layout) -> EnvInfo {
        let backend = state.backend.backend();
        let status = backend.status(self, state);
        let creds = state.engine.engine().credentials(Secret::default());
        EnvInfo {
            name: state.name.clone(),
            engine: state.engine,
            backend: state.backend,
            status,
            host: state.host.clone(),
            port: state.port,
            pid: state
                .process
                .filter(|_| status == Status::Running)
                .map(|p| p.pid),
            dir: layout.dir.clone(),
            version: state.engine_version.clone(),
            url: client_files::database(state, &creds).redacted_url(),
            activate: layout.activate(),
            socket_dir: backend
                .endpoint(state, layout)
                .socket_dir
                .filter(|_| state.service),
            container: state.container.clone(),
            owner: state.owner,
            isolation: None,
            data_in_memory: memory::linked(&layout.data),
        }
    }

    /// The names of the directories in the state root that can be environments, sorted.
    pub(super) fn names(&self) -> Result<Vec<String>> {
        let entries = match fs::read_dir(&self.root) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(source) => {
                return Err(Error::Io {
                    context: format!("cannot read {}", self.root.display()),
                    cause: source,
                })
            }
        };
        let mut names: Vec<String> = entries
            .flatten()
            .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| !n.starts_with('.') && validate_name(n).is_ok())
            .collect();
        names.sort();
        Ok(names)
    }

    pub fn list(&self) -> Result<Vec<EnvInfo>> {
        let mut out = Vec::new();
        for name in self.names()? {
            let layout = self.layout(&name);
            // A directory without a record is not (or not yet) an environment.
            if let Ok(Some(state)) = EnvState::load(&layout) {
                out.push(self.info(&state, &layout));
            }
        }
        Ok(out)
    }

    /// The environments whose record cannot be used, with why (`list` shows them as broken;
    /// `destroy` removes them).
    pub fn broken(&self) -> Result<Vec<(String, String)>> {
        Ok(self
            .names()?
            .into_iter()
            .filter_map(|name| {
                let why = EnvState::load(&self.layout(&name)).err()?;
                Some((name, why.to_string()))
            })
            .collect())
    }

    pub fn inspect(&self, name: &str) -> Result<EnvInfo> {
        let (layout, state) = self.open(name)?;
        let mut info = self.info(&state, &layout);
        info.isolation = state.backend.backend().isolation(self, &state, &layout);
        Ok(info)
    }

    /// The full connection URL, password included: only for callers that asked for it.
    pub fn url(&self, name: &str) -> Result<String> {
        let (layout, state) = self.open(name)?;
        Ok(client_files::database(&state, &read_credentials(&layout)?).url())
    }

    /// What the environment's activate script exports, password included.
    pub fn exports(&self, name: &str) -> Result<Vec<(String, String)>> {
        let (layout, state) = self.open(name)?;
        Ok(client_files::exports(
            &state,
            &read_credentials(&layout)?,
            &layout,
        ))
    }

    /// The last `lines` lines of the server's output (its log file, or its container's).
    pub fn logs(&self, name: &str, lines: usize) -> Result<String> {
        let (layout, state) = self.open(name)?;
        state.backend.backend().logs(self, &state, &layout, lines)
    }

    /// The record of an existing environment, read without the lock.
    fn open(&self, name: &str) -> Result<(Layout, EnvState)> {
        check_name(name)?;
        let layout = self.layout(name);
        let state = self.load(name, &layout)?;
        Ok((layout, state))
    }
}
