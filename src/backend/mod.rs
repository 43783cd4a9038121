//! Isolation backends: *where* a server runs (a plain local process, a namespace sandbox, a
//! container, or elsewhere through an SSH tunnel). Engines say *what* runs. Every backend keeps
//! one contract, [`Backend`], for an environment's whole life; the workspace drives it and never
//! asks which backend it holds. Adding a backend means one module here and one arm in
//! [`BackendKind::backend`].

pub mod docker;
mod lightweight;
mod local;
pub mod manifest;
pub mod memory;
mod record;
pub mod sandbox;
pub mod ssh_tunnel;

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::config::{DatabaseConfig, SslMode};
use crate::engine::{Binaries, Credentials, Endpoint, Engine, EngineKind, Probe};
use crate::envfile::Vars;
use crate::error::Result;
use crate::layout::Layout;
use crate::sys::process::{tail, ProcessId, ServiceUser};
use docker::client::Docker;
use manifest::Manifest;

pub use local::{Prepare, Spawn};
pub use record::{EnvState, SCHEMA};
pub use sandbox::manifest_file;

/// How long a server may take to accept connections before `create`/`start` give up.
pub const READY_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a graceful stop may take before SIGKILL.
pub const STOP_GRACE: Duration = Duration::from_secs(30);

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

    /// Whether its servers run from this machine's installed engines.
    pub fn runs_locally(self) -> bool {
        matches!(self, BackendKind::Lightweight | BackendKind::Sandbox)
    }

    pub fn backend(self) -> &'static dyn Backend {
        match self {
            BackendKind::Lightweight => &local::Local(lightweight::Lightweight),
            BackendKind::Sandbox => &local::Local(sandbox::Sandbox),
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

/// What a limit's enforcement achieved: one line per limit, true only when the kernel took the value.
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
    /// The manifest, or why it cannot be used (as JSON: the manifest, or `{"error": "..."}`).
    #[serde(serialize_with = "manifest_or_error")]
    pub manifest: Result<Manifest, String>,
    pub running: bool,
    /// The sandbox's pid 1 as the host sees it (for `nsenter --target`).
    pub init_pid: Option<i32>,
    /// Where the server's port can be reached from, and what that means, when that is more
    /// than this machine's loopback (a container on a remote engine).
    pub exposed: Option<String>,
    /// Each limit and whether the kernel enforces it right now.
    pub limits: Vec<Enforcement>,
}

fn manifest_or_error<S: serde::Serializer>(
    manifest: &Result<Manifest, String>,
    to: S,
) -> std::result::Result<S::Ok, S::Error> {
    #[derive(Serialize)]
    struct Unusable<'a> {
        error: &'a str,
    }
    match manifest {
        Ok(m) => m.serialize(to),
        Err(error) => Unusable { error }.serialize(to),
    }
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

/// What `create` is asked for.
#[derive(Debug, Clone)]
pub struct CreateOptions {
    pub name: String,
    pub engine: EngineKind,
    pub backend: BackendKind,
    pub port: Option<u16>,
    /// Run the real server (false: env-only, variables and activate script only).
    pub service: bool,
    /// Install a missing engine with the system package manager.
    pub install: bool,
    /// The process the environment lives for; when it is gone, `gc` removes it.
    pub owner: Option<ProcessId>,
    /// The docker backend's image (default: `ISOENV_<ENGINE>_IMAGE`, else the official one).
    pub image: Option<String>,
}

impl CreateOptions {
    /// A real server on a free port, installing nothing, owned by nobody: what most callers
    /// want, adjusted with struct update syntax.
    pub fn server(name: impl Into<String>, engine: EngineKind, backend: BackendKind) -> Self {
        CreateOptions {
            name: name.into(),
            engine,
            backend,
            port: None,
            service: true,
            install: false,
            owner: None,
            image: None,
        }
    }
}

/// A spare copy of a cached data directory, taken into an environment: where it was, and the
/// owner its files were given ahead of time (see [`Host::take_spare`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Spare {
    pub holder: PathBuf,
    pub owner: u32,
}

/// What a backend may use of the workspace that drives it. The workspace implements it, so that
/// backends never import the workspace.
pub trait Host {
    /// The state root: one directory per environment.
    fn root(&self) -> &Path;
    /// The user a new environment's servers run as, with the identity to record: one of its
    /// own when isoenv runs as root and no service user is configured, or (when the backend
    /// takes them, `subordinate`) without root from the invoker's subordinate ids, claimed for
    /// the environment in `layout` (already made); else the configured user. The identity a
    /// `spare` was made for is taken over when it is still the spare's.
    fn claim_user(
        &self,
        layout: &Layout,
        subordinate: bool,
        spare: Option<&Spare>,
    ) -> Result<(Option<u32>, ServiceUser)>;
    /// The user an environment's servers run as.
    fn user_of(&self, state: &EnvState) -> Result<ServiceUser>;
    /// Gives an environment's own identity back, once nothing of it runs.
    fn release_user(&self, state: &EnvState, layout: &Layout) -> Result<()>;
    fn vars(&self) -> &Vars;
    /// The sandbox's default memory limit (`WASI_MEMORY_LIMIT`).
    fn memory_limit(&self) -> u64;
    /// The configured database (`DB_VM_*` for the development tunnel).
    fn database(&self) -> &DatabaseConfig;
    /// `DOCKER_HOST`, from the process environment or `.env`.
    fn docker_host(&self) -> Option<&str>;
    /// The Docker engine, connected on first use.
    fn docker(&self) -> Result<&Docker>;
    /// The engine's binaries, installed first when `install` (or `ISOENV_AUTO_INSTALL=1`).
    fn binaries(
        &self,
        engine: &dyn Engine,
        install: bool,
        progress: &dyn Fn(&str),
    ) -> Result<Binaries>;
    /// The cached, initialized data directory for this engine and version (none for engines
    /// that need no initialization).
    fn template(
        &self,
        engine: &dyn Engine,
        bins: &Binaries,
        progress: &dyn Fn(&str),
    ) -> Result<Option<PathBuf>>;
    /// Moves a spare copy of `template` into place as `data`, when one is ready.
    fn take_spare(&self, template: &Path, data: &Path) -> Option<Spare>;
    /// Makes `data` a fresh copy of `template` owned by `user`: the `spare` taken into place,
    /// else a copy made now.
    fn copy_template(
        &self,
        template: &Path,
        data: &Path,
        user: &ServiceUser,
        spare: Option<&Spare>,
    ) -> std::io::Result<()>;
    /// Writes what clients use: the engine's files, the stored login and the activate script.
    fn write_client_files(
        &self,
        state: &EnvState,
        layout: &Layout,
        creds: &Credentials,
        user: &ServiceUser,
    ) -> std::io::Result<()>;
    /// The stored login of an environment.
    fn credentials(&self, layout: &Layout) -> Result<Credentials>;
}

/// Whether a database answers, in words for people.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    pub ok: bool,
    pub detail: String,
}

impl Answer {
    pub fn no(detail: String) -> Self {
        Answer { ok: false, detail }
    }

    /// A database isoenv does not run (the VM's, production's), checked read-only.
    pub fn of_remote(db: &DatabaseConfig, host: &str, port: u16) -> Self {
        match crate::remote::verify(db, host, port) {
            Ok(report) => Answer {
                ok: true,
                detail: format!("{} answers: {report}", db.redacted_url()),
            },
            Err(e) => Answer::no(e.to_string()),
        }
    }
}

/// Whether `start` found the server running or started it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Started {
    Already,
    Now,
}

/// The lifecycle of an environment's server, the same for every backend. Each backend keeps
/// its own part of the record ([`EnvState`]'s process, container or tunnel) and is the only one
/// to read it. Every method that makes something outside the environment's directory records
/// it first, so that a killed command leaves nothing [`Backend::teardown`] cannot find.
pub trait Backend: Sync {
    fn kind(&self) -> BackendKind;

    /// What runs an environment of this backend, for people ("server", "container").
    fn noun(&self) -> &'static str;

    /// Makes a new environment in `layout.dir`, claimed and locked but not yet made, and starts
    /// its server. Returns the saved record.
    fn create(
        &self,
        host: &dyn Host,
        opts: &CreateOptions,
        layout: &Layout,
        progress: &dyn Fn(&str),
    ) -> Result<EnvState>;

    /// Makes the server run again; a running (and, for a tunnel, answering) one is left alone.
    fn start(
        &self,
        host: &dyn Host,
        state: &mut EnvState,
        layout: &Layout,
        progress: &dyn Fn(&str),
    ) -> Result<Started>;

    /// Stops the server; the data is kept.
    fn stop(&self, host: &dyn Host, state: &mut EnvState, layout: &Layout) -> Result<()>;

    /// Whether the server runs. Cheap: `list` asks it of every environment.
    fn status(&self, host: &dyn Host, state: &EnvState) -> Status;

    /// Stops the server and removes what it has outside its directory (cgroups, a container
    /// and its volume). The directory itself is the workspace's to remove.
    fn teardown(&self, host: &dyn Host, state: &EnvState, layout: &Layout) -> Result<()>;

    /// What runs the server, for people: a process or a container.
    fn handle(&self, state: &EnvState) -> Option<String> {
        state.process.map(|p| format!("pid {}", p.pid))
    }

    /// Where clients reach the server.
    fn endpoint(&self, state: &EnvState, layout: &Layout) -> Endpoint {
        Endpoint {
            socket_dir: Some(layout.run.clone()),
            ..tcp_only(state)
        }
    }

    /// Whether clients use TLS to reach the server.
    fn client_tls(&self) -> SslMode {
        SslMode::Disable
    }

    /// Whether the database answers: what answered, or why it does not.
    fn answers(&self, host: &dyn Host, state: &EnvState, layout: &Layout) -> Answer {
        let creds = match host.credentials(layout) {
            Ok(creds) => creds,
            Err(e) => return Answer::no(e.to_string()),
        };
        match state
            .engine
            .engine()
            .probe(&self.endpoint(state, layout), &creds)
        {
            Probe::Ready => Answer {
                ok: true,
                detail: format!("answers ({} {})", state.engine, state.engine_version),
            },
            Probe::NotYet(m) | Probe::Failed(m) => Answer::no(m),
        }
    }

    /// The last `lines` lines of the server's output.
    fn logs(
        &self,
        _host: &dyn Host,
        _state: &EnvState,
        layout: &Layout,
        lines: usize,
    ) -> Result<String> {
        let text = std::fs::read_to_string(&layout.log).map_err(|cause| crate::Error::Io {
            context: format!("cannot read {}", layout.log.display()),
            cause,
        })?;
        Ok(tail(&text, lines))
    }

    /// What confines the server, as `inspect` shows it.
    fn isolation(
        &self,
        _host: &dyn Host,
        _state: &EnvState,
        _layout: &Layout,
    ) -> Option<Isolation> {
        None
    }

    /// Removes what a `create` killed before it recorded its server left outside the
    /// environment's directory (a sandbox's cgroups), once nothing runs in it any more.
    fn abandon(&self, _host: &dyn Host, _layout: &Layout) -> Result<()> {
        Ok(())
    }

    /// Removes what this backend made for environments that no longer account for it (their
    /// directory or their owner is gone), e.g. after the state root was deleted by hand.
    /// Returns what was removed.
    fn leftovers(&self, _host: &dyn Host) -> Result<Vec<String>> {
        Ok(Vec::new())
    }
}

/// The recorded address, without a socket (a container's, or a tunnel's local end).
pub fn tcp_only(state: &EnvState) -> Endpoint {
    Endpoint {
        host: state.host.clone(),
        port: state.port,
        socket_dir: None,
    }
}

/// Every backend, for what concerns them all (collecting leftovers).
pub const ALL: [BackendKind; 4] = [
    BackendKind::Lightweight,
    BackendKind::Sandbox,
    BackendKind::SshTunnel,
    BackendKind::Docker,
];
