//! Workflows: create, start, stop, destroy, list and `up`/`down`, composed from engines
//! (what runs), backends (where it runs) and state (what is recorded). The decisions (which plan,
//! what is allowed where, what a status means) are pure functions tested on their own.

mod activate;
mod containers;
pub mod doctor;
mod spare;
pub mod test_run;

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::thread::sleep;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use nix::sys::signal::Signal;
use serde::{Deserialize, Serialize};

use crate::backend::docker::client::{Docker, DockerError};
use crate::backend::ssh_tunnel::{self, TunnelSpec};
use crate::backend::Status;
use crate::backend::{BackendKind, Isolation, Prepare, Spawn};
use crate::config::{
    ConfigSource, DatabaseConfig, Environment, EnvironmentConfig, SslMode, ACTIVE_ENGINE,
    ACTIVE_MARKER,
};
use crate::engine::{self, Binaries, Credentials, Endpoint, Engine, EngineKind, Probe};
use crate::envfile::Vars;
use crate::error::{Error, IoContext, Result};
use crate::layout::{validate_name, Layout};
use crate::remote::{self, ServerReport};
use crate::state::{ContainerRecord, EnvState, SCHEMA};
use crate::sys::files::{chown_tree, copy_tree, remove_tree, set_mode};
use crate::sys::hash::fnv1a;
use crate::sys::lock::{Lock, LockError};
use crate::sys::net;
use crate::sys::process::{tail, ProcessId, ServiceUser};
use crate::sys::secret::{write_private, Secret};

pub use containers::BuiltImage;

/// How long a server may take to accept connections before `create`/`start` give up.
const READY_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a graceful stop may take before SIGKILL.
const STOP_GRACE: Duration = Duration::from_secs(30);
/// The environment `cargo xtask db up` brings up in development.
pub const DEFAULT_ENV: &str = "dev";
/// The environment that records the development VM tunnel.
pub const TUNNEL_ENV: &str = "vm";
/// The environment `cargo xtask db up` brings up in staging, in a container.
pub const STAGING_ENV: &str = "staging";

/// What a command does to environments, for the production guard.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Read,
    Create,
    Start,
    Stop,
    Destroy,
}

/// Production is guarded: isoenv only ever reads there.
pub fn allowed(environment: Environment, action: Action) -> bool {
    environment != Environment::Production || action == Action::Read
}

/// What `db up` does in each environment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UpPlan {
    /// The embedded default: a local server in the default environment.
    Local {
        name: &'static str,
        engine: EngineKind,
        backend: BackendKind,
    },
    /// Development with `DB_VM_SSH_ENABLED=true`: a tunnel to the VM's database.
    Tunnel,
    /// Staging: a container (the docker backend), removed by `down`.
    Containers {
        name: &'static str,
        engine: EngineKind,
    },
    /// Production: verify the configured database, change nothing.
    VerifyProduction,
}

/// Development's local backend: the namespace sandbox with `WASI_USE_NAMESPACES=true`.
pub fn local_backend(config: &EnvironmentConfig) -> BackendKind {
    if config.sandbox().use_namespaces {
        BackendKind::Sandbox
    } else {
        BackendKind::Lightweight
    }
}

pub fn plan_up(config: &EnvironmentConfig) -> UpPlan {
    match config.environment() {
        Environment::Development if config.database_config().ssh_tunnel.is_some() => UpPlan::Tunnel,
        Environment::Development => UpPlan::Local {
            name: DEFAULT_ENV,
            engine: EngineKind::Postgres,
            backend: local_backend(config),
        },
        Environment::Staging => UpPlan::Containers {
            name: STAGING_ENV,
            engine: EngineKind::Postgres,
        },
        Environment::Production => UpPlan::VerifyProduction,
    }
}

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
    /// What confines the server (`inspect` only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub isolation: Option<Isolation>,
}

/// What `db down` did.
#[derive(Debug, Clone)]
pub enum Down {
    /// The environment of that name is stopped; its data is kept.
    Stopped(String),
    /// Staging: the container, its volume and the environment are gone.
    Removed(&'static str),
    /// `up` had made nothing.
    Nothing,
}

#[derive(Debug, Clone, Serialize)]
#[serde(tag = "outcome", rename_all = "kebab-case")]
pub enum UpOutcome {
    Created(EnvInfo),
    Started(EnvInfo),
    AlreadyUp(EnvInfo),
    /// Production: the configured database answered; nothing was created or changed.
    Verified {
        /// The database, as a URL without the password.
        target: String,
        report: ServerReport,
    },
}

/// What `db status` found: one line per thing that must work.
#[derive(Debug, Clone, Serialize)]
pub struct StatusReport {
    pub environment: Environment,
    /// The environment `up` manages, if it exists (none in production).
    pub env: Option<EnvInfo>,
    pub checks: Vec<Check>,
}

impl StatusReport {
    pub fn healthy(&self) -> bool {
        !self.checks.is_empty() && self.checks.iter().all(|c| c.ok)
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Check {
    pub what: String,
    pub ok: bool,
    pub detail: String,
}

/// The stored login of an environment (0600).
#[derive(Serialize, Deserialize)]
struct StoredCredentials {
    user: String,
    password: String,
    database: String,
}

/// A state root and what is needed to act on it.
pub struct Workspace {
    root: PathBuf,
    cache: PathBuf,
    environment: Environment,
    /// The configured database (`DB_VM_*`, `DB_STAGING_*`, `DB_PROD_*` or the active one).
    database: DatabaseConfig,
    vars: Vars,
    user: std::result::Result<ServiceUser, String>,
    /// The sandbox's default memory limit (`WASI_MEMORY_LIMIT`).
    memory_limit: u64,
    /// `DOCKER_HOST`, from the process environment or `.env`.
    docker_host: Option<String>,
    /// The Docker engine, connected on first use (most commands never need it).
    docker: OnceLock<std::result::Result<Docker, DockerError>>,
}

impl Workspace {
    pub fn new(config: &EnvironmentConfig, vars: Vars) -> Self {
        let root = config.sandbox().dir.clone();
        let cache = vars
            .get("ISOENV_CACHE_DIR")
            .map_or_else(|| root.join(".cache"), PathBuf::from);
        let user = ServiceUser::resolve(vars.get("ISOENV_SERVICE_USER"));
        Workspace {
            root,
            cache,
            environment: config.environment(),
            database: config.database_config().clone(),
            user,
            memory_limit: config.sandbox().memory_limit_bytes,
            docker_host: vars.get("DOCKER_HOST").map(str::to_owned),
            docker: OnceLock::new(),
            vars,
        }
    }

    pub fn layout(&self, name: &str) -> Layout {
        Layout::new(self.root.join(name))
    }

    fn user(&self) -> Result<&ServiceUser> {
        self.user
            .as_ref()
            .map_err(|e| Error::Unsupported(e.clone()))
    }

    fn guard(&self, action: Action, what: &str) -> Result<()> {
        if allowed(self.environment, action) {
            Ok(())
        } else {
            Err(Error::Production {
                action: what.into(),
                environment: self.environment,
            })
        }
    }

    fn lock(&self, name: &str) -> Result<Lock> {
        Lock::try_acquire(self.root.join(".locks").join(format!("{name}.lock"))).map_err(
            |e| match e {
                LockError::Busy => Error::Busy { name: name.into() },
                LockError::Io(source) => Error::Io {
                    context: format!(
                        "cannot lock environment `{name}` in {}",
                        self.root.display()
                    ),
                    cause: source,
                },
            },
        )
    }

    /// Validates the name, takes the lock and loads the record of an existing environment.
    fn open_locked(&self, name: &str) -> Result<(Layout, Lock, EnvState)> {
        check_name(name)?;
        let layout = self.layout(name);
        let lock = self.lock(name)?;
        let state = self.load(name, &layout)?;
        Ok((layout, lock, state))
    }

    fn load(&self, name: &str, layout: &Layout) -> Result<EnvState> {
        EnvState::load(layout)
            .context(|| format!("cannot read the state of environment `{name}`"))?
            .ok_or_else(|| Error::NotFound {
                name: name.into(),
                root: self.root.clone(),
            })
    }

    /// Takes the lock of a name that must not exist yet.
    fn claim(&self, name: &str) -> Result<(Layout, Lock)> {
        let layout = self.layout(name);
        let lock = self.lock(name)?;
        if fs::symlink_metadata(&layout.dir).is_ok() {
            return Err(Error::Exists {
                name: name.into(),
                dir: layout.dir.clone(),
            });
        }
        Ok((layout, lock))
    }

    pub fn create(&self, opts: &CreateOptions, progress: &dyn Fn(&str)) -> Result<EnvInfo> {
        self.guard(Action::Create, "create an environment")?;
        check_name(&opts.name)?;
        if opts.backend == BackendKind::Docker {
            return self.create_container_env(opts, progress);
        }
        let env_err = |message: String| Error::Env {
            name: opts.name.clone(),
            message,
        };
        self.layout(&opts.name)
            .check_socket_room()
            .map_err(env_err)?;
        let user = self.user()?;
        self.make_root(user)?;
        let (layout, _lock) = self.claim(&opts.name)?;
        let engine = opts.engine.engine();
        let port = match opts.port {
            Some(p) if net::is_taken(p) => return Err(Error::PortTaken { port: p }),
            Some(p) => p,
            None => net::free_port().context(|| "cannot find a free port on 127.0.0.1".into())?,
        };
        let bins = match opts.service {
            true => Some(self.binaries(engine, opts.install, progress)?),
            false => None,
        };
        let template = match &bins {
            Some(b) => self.template(engine, b, progress)?,
            None => None,
        };

        // From here on, anything that fails removes what was made.
        let mut cleanup = Cleanup {
            dir: Some(layout.dir.clone()),
            process: None,
            backend: opts.backend,
            container: None,
        };
        let mut state = EnvState {
            schema: SCHEMA,
            name: opts.name.clone(),
            engine: opts.engine,
            backend: opts.backend,
            engine_version: bins.as_ref().map(|b| b.version.clone()).unwrap_or_default(),
            host: net::LOOPBACK.to_string(),
            port,
            service: opts.service,
            process: None,
            created_at: now(),
            owner: opts.owner,
            tunnel: None,
            container: None,
        };
        let creds = engine.credentials(Secret::generate());
        self.build(&state, &layout, template.as_deref(), &creds, user)
            .context(|| {
                format!(
                    "cannot set up environment `{}` in {}",
                    opts.name,
                    layout.dir.display()
                )
            })?;
        if let Some(bins) = &bins {
            opts.backend
                .backend()
                .prepare(&Prepare {
                    layout: &layout,
                    engine,
                    bins,
                    port,
                    memory: self.memory_limit,
                })
                .map_err(env_err)?;
            progress(&format!(
                "starting {} {} on 127.0.0.1:{port}",
                engine.kind(),
                bins.version
            ));
            self.run_server(&mut state, bins, &layout, &creds)?;
            cleanup.process = state.process.map(|pid| (pid, stop_signal(&state)));
            engine
                .after_create(&endpoint(&state, &layout), &creds)
                .map_err(env_err)?;
        }
        save(&state, &layout)?;
        finish(&layout)?;
        cleanup.disarm();
        if let Some(t) = &template {
            spare::refill(t, &self.root);
        }
        Ok(self.info(&state, &layout))
    }

    /// Makes the environment's files: data (a spare copy of the cached template, else a copy
    /// made now), run, log, config, credentials and the activate script.
    fn build(
        &self,
        state: &EnvState,
        layout: &Layout,
        template: Option<&Path>,
        creds: &Credentials,
        user: &ServiceUser,
    ) -> std::io::Result<()> {
        layout.make_dir()?;
        for dir in [&layout.bin, layout.log.parent().unwrap_or(&layout.dir)] {
            fs::create_dir_all(dir)?;
        }
        match template {
            Some(t) if spare::take(t, &layout.data) => {}
            Some(t) => copy_tree(t, &layout.data, user)?,
            None => {
                fs::create_dir(&layout.data)?;
                set_mode(&layout.data, 0o700)?;
                user.chown(&layout.data)?;
            }
        }
        fs::create_dir(&layout.run)?;
        set_mode(&layout.run, 0o700)?;
        user.chown(&layout.run)?;
        write_client_files(state, layout, creds, user)
    }

    pub fn start(&self, name: &str, progress: &dyn Fn(&str)) -> Result<EnvInfo> {
        self.guard(Action::Start, "start an environment")?;
        check_name(name)?;
        match self.load(name, &self.layout(name))?.backend {
            BackendKind::SshTunnel => return self.tunnel_up(progress).map(UpOutcome::into_info),
            BackendKind::Docker => return self.start_container_env(name, progress),
            BackendKind::Lightweight | BackendKind::Sandbox => {}
        }
        let (layout, _lock, mut state) = self.open_locked(name)?;
        match state.status(ProcessId::is_alive) {
            Status::Running => return Ok(self.info(&state, &layout)),
            Status::EnvOnly => {
                return Err(Error::Env {
                    name: name.into(),
                    message: "it is env-only (created with --no-service): there is no server to start; destroy and create it without --no-service".into(),
                })
            }
            Status::Stopped | Status::Crashed | Status::Missing | Status::Unknown => {}
        }
        if net::is_taken(state.port) {
            return Err(Error::Env {
                name: name.into(),
                message: format!("its port {} on 127.0.0.1 is now used by another program; stop that program, or destroy and recreate the environment", state.port),
            });
        }
        let engine = state.engine.engine();
        let bins = self.binaries(engine, false, progress)?;
        // The recorded server is dead, so what it left behind is stale.
        for stale in engine.stale_files(&layout, state.port) {
            let _ = fs::remove_file(stale);
        }
        progress(&format!(
            "starting {} {} on 127.0.0.1:{}",
            engine.kind(),
            bins.version,
            state.port
        ));
        let creds = read_credentials(&layout)?;
        self.run_server(&mut state, &bins, &layout, &creds)?;
        Ok(self.info(&state, &layout))
    }

    /// Spawns the server through the environment's backend, records it at once (so that even
    /// if isoenv is killed while waiting, `list` and `destroy` still find the process), and
    /// waits until it answers. On failure the process is gone, the record says so, and the
    /// error carries the log's tail.
    fn run_server(
        &self,
        state: &mut EnvState,
        bins: &Binaries,
        layout: &Layout,
        creds: &Credentials,
    ) -> Result<()> {
        let engine = state.engine.engine();
        let mut launch = engine.launch(bins, layout, state.port);
        if state.owner.is_some() {
            launch = engine
                .disposable_args()
                .iter()
                .fold(launch, |l, a| l.arg(a));
        }
        // An environment owned by this process (a test run) must not outlive it.
        if state.owner.is_some() && state.owner == ProcessId::of(std::process::id() as i32).ok() {
            launch = launch.die_with_parent(stop_signal(state));
        }
        let pid = state
            .backend
            .backend()
            .spawn(&Spawn {
                launch: &launch,
                layout,
                user: self.user()?,
                engine,
                port: state.port,
            })
            .context(|| format!("cannot start {}", launch.program.display()))?;
        state.process = Some(pid);
        if let Err(e) = save(state, layout) {
            pid.stop(Signal::SIGKILL, Duration::from_secs(5));
            return Err(e);
        }
        let failure =
            wait_ready(engine, &endpoint(state, layout), creds, |m| {
                Ok((!pid.is_alive())
                    .then(|| format!("{} exited during start-up ({m})", engine.kind())))
            })?;
        let Some(failure) = failure else {
            return Ok(());
        };
        pid.stop(Signal::SIGKILL, Duration::from_secs(5));
        let _ = state.backend.backend().release(&layout.dir);
        state.process = None;
        let _ = save(state, layout);
        let log = fs::read_to_string(&layout.log).unwrap_or_default();
        Err(Error::Env {
            name: state.name.clone(),
            message: format!(
                "{failure}\n--- last lines of {} ---\n{}",
                layout.log.display(),
                tail(&log, 15)
            ),
        })
    }

    pub fn stop(&self, name: &str) -> Result<EnvInfo> {
        self.guard(Action::Stop, "stop an environment")?;
        let (layout, _lock, mut state) = self.open_locked(name)?;
        if state.container.is_some() {
            self.stop_container(&mut state, &layout)?;
        }
        if let Some(pid) = state.process.take() {
            pid.stop(stop_signal(&state), STOP_GRACE);
            save(&state, &layout)?;
        }
        release(&state, &layout)?;
        Ok(self.info(&state, &layout))
    }

    /// Stops the server and removes the environment's directory. Only a directory isoenv made
    /// (a real directory holding a readable `state.json`) is ever removed.
    pub fn destroy(&self, name: &str) -> Result<()> {
        self.guard(Action::Destroy, "destroy an environment")?;
        check_name(name)?;
        let layout = self.layout(name);
        if fs::symlink_metadata(&layout.dir).is_ok_and(|m| m.file_type().is_symlink()) {
            return Err(Error::Env {
                name: name.into(),
                message: format!(
                    "{} is a symbolic link; isoenv removes only directories it made",
                    layout.dir.display()
                ),
            });
        }
        let (layout, _lock, state) = self.open_locked(name)?;
        self.teardown(&state, &layout)?;
        remove_tree(&layout.dir).context(|| format!("cannot remove {}", layout.dir.display()))
    }

    /// Stops what runs the environment and removes what it has outside its directory (a
    /// sandbox's cgroups, a container and its volume).
    fn teardown(&self, state: &EnvState, layout: &Layout) -> Result<()> {
        if state.container.is_some() {
            self.remove_container(state)?;
        }
        if let Some(pid) = state.process {
            pid.stop(stop_signal(state), STOP_GRACE);
        }
        release(state, layout)
    }

    /// Removes what dead owners left: environments whose owner process is gone (a `test
    /// --isolated` run killed with SIGKILL), and directories a killed `create` left without a
    /// record (and spare data directories whose copier was killed). Returns the names removed.
    /// Live and unowned environments are never touched.
    pub fn gc(&self) -> Result<Vec<String>> {
        self.guard(Action::Destroy, "collect environments")?;
        spare::collect(&self.cache);
        let mut removed = Vec::new();
        for name in self.names()? {
            let layout = self.layout(&name);
            // Decided without the lock first, so that a clean state root costs only reads.
            if !self.is_garbage(&layout) {
                continue;
            }
            // A create or destroy in progress holds the lock: leave it alone.
            let Ok(_lock) = self.lock(&name) else {
                continue;
            };
            if !self.is_garbage(&layout) {
                continue;
            }
            if let Ok(Some(state)) = EnvState::load(&layout) {
                // What cannot be torn down now (an unreachable Docker engine) waits for the
                // next collection; nothing else is held up by it.
                if self.teardown(&state, &layout).is_err() {
                    continue;
                }
            }
            remove_tree(&layout.dir)
                .context(|| format!("cannot remove {}", layout.dir.display()))?;
            removed.push(name);
        }
        Ok(removed)
    }

    /// Whether `gc` removes this directory: its owner is dead, or it still carries the marker
    /// of a create that did not finish (only trusted while nobody holds the lock).
    fn is_garbage(&self, layout: &Layout) -> bool {
        let half_made = layout.creating_marker().exists();
        match EnvState::load(layout) {
            Ok(Some(state)) => half_made || state.orphaned(ProcessId::is_alive),
            Ok(None) => half_made,
            Err(_) => false,
        }
    }

    /// The names of the directories in the state root that can be environments, sorted.
    fn names(&self) -> Result<Vec<String>> {
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

    pub fn inspect(&self, name: &str) -> Result<EnvInfo> {
        check_name(name)?;
        let layout = self.layout(name);
        let state = self.load(name, &layout)?;
        let mut info = self.info(&state, &layout);
        info.isolation = match state.container {
            Some(_) => Some(self.container_isolation(&state, &layout)),
            None => state.backend.backend().isolation(&layout.dir),
        };
        Ok(info)
    }

    /// The full connection URL, password included: only for callers that asked for it.
    pub fn url(&self, name: &str) -> Result<String> {
        check_name(name)?;
        let layout = self.layout(name);
        let state = self.load(name, &layout)?;
        Ok(database(&state, &read_credentials(&layout)?).url())
    }

    /// What the environment's activate script exports, password included.
    pub fn exports(&self, name: &str) -> Result<Vec<(String, String)>> {
        check_name(name)?;
        let layout = self.layout(name);
        let state = self.load(name, &layout)?;
        Ok(exports(&state, &read_credentials(&layout)?, &layout))
    }

    /// Makes an owned (ephemeral) environment permanent: `gc` will leave it alone.
    pub fn disown(&self, name: &str) -> Result<()> {
        let (layout, _lock, mut state) = self.open_locked(name)?;
        state.owner = None;
        save(&state, &layout)
    }

    /// The last `lines` lines of the server's output (the log file, or the container's).
    pub fn logs(&self, name: &str, lines: usize) -> Result<String> {
        check_name(name)?;
        let layout = self.layout(name);
        let state = self.load(name, &layout)?;
        if state.container.is_some() {
            return self.container_logs(&state, lines);
        }
        let text = fs::read_to_string(&layout.log)
            .context(|| format!("cannot read {}", layout.log.display()))?;
        Ok(tail(&text, lines))
    }

    /// Brings up what this ENVIRONMENT uses: the local default, the VM tunnel, or (production)
    /// a read-only check of the configured database.
    pub fn up(
        &self,
        config: &EnvironmentConfig,
        install: bool,
        progress: &dyn Fn(&str),
    ) -> Result<UpOutcome> {
        match plan_up(config) {
            UpPlan::Local {
                name,
                engine,
                backend,
            } => self.local_up(name, engine, backend, install, progress),
            UpPlan::Tunnel => self.tunnel_up(progress),
            UpPlan::Containers { name, engine } => {
                self.local_up(name, engine, BackendKind::Docker, install, progress)
            }
            UpPlan::VerifyProduction => {
                let db = &self.database;
                let report = self.check_remote(db, &db.host, db.port)?;
                Ok(UpOutcome::Verified {
                    target: db.redacted_url(),
                    report,
                })
            }
        }
    }

    fn local_up(
        &self,
        name: &str,
        engine: EngineKind,
        backend: BackendKind,
        install: bool,
        progress: &dyn Fn(&str),
    ) -> Result<UpOutcome> {
        let layout = self.layout(name);
        match EnvState::load(&layout) {
            Ok(Some(state)) => match self.status_of(&state) {
                Status::Running | Status::EnvOnly => {
                    Ok(UpOutcome::AlreadyUp(self.info(&state, &layout)))
                }
                Status::Stopped | Status::Crashed | Status::Missing | Status::Unknown => {
                    self.start(name, progress).map(UpOutcome::Started)
                }
            },
            _ => {
                let opts = CreateOptions {
                    install,
                    ..CreateOptions::server(name, engine, backend)
                };
                self.create(&opts, progress).map(UpOutcome::Created)
            }
        }
    }

    /// Undoes what `up` did: stops the local server or the tunnel (data kept); in staging
    /// removes the container with its volume, as per-run containers are.
    pub fn down(&self, config: &EnvironmentConfig) -> Result<Down> {
        self.guard(Action::Stop, "bring anything down")?;
        let result = match plan_up(config) {
            UpPlan::Local { name, .. } => self.stop(name).map(|i| Down::Stopped(i.name)),
            UpPlan::Tunnel => self.stop(TUNNEL_ENV).map(|i| Down::Stopped(i.name)),
            UpPlan::Containers { name, .. } => self.destroy(name).map(|()| Down::Removed(name)),
            UpPlan::VerifyProduction => unreachable!("guarded above"),
        };
        match result {
            Err(Error::NotFound { .. }) => Ok(Down::Nothing),
            other => other,
        }
    }

    /// Whether what `up` manages is running and its database answers. Never changes anything.
    pub fn status(&self, config: &EnvironmentConfig) -> Result<StatusReport> {
        let db = &self.database;
        let mut checks = Vec::new();
        let name = match plan_up(config) {
            UpPlan::Local { name, .. } | UpPlan::Containers { name, .. } => name,
            UpPlan::Tunnel => TUNNEL_ENV,
            UpPlan::VerifyProduction => {
                checks.push(remote_check(
                    "production database",
                    db,
                    self.check_remote(db, &db.host, db.port),
                ));
                return Ok(StatusReport {
                    environment: self.environment,
                    env: None,
                    checks,
                });
            }
        };
        let layout = self.layout(name);
        let Some(state) = EnvState::load(&layout)
            .context(|| format!("cannot read the state of environment `{name}`"))?
        else {
            checks.push(Check {
                what: format!("environment `{name}`"),
                ok: false,
                detail: "does not exist; `cargo xtask db up` creates it".into(),
            });
            return Ok(StatusReport {
                environment: self.environment,
                env: None,
                checks,
            });
        };
        let info = self.info(&state, &layout);
        let process = match state.backend {
            BackendKind::SshTunnel => "ssh tunnel",
            BackendKind::Docker => "container",
            _ => "server",
        };
        checks.push(Check {
            what: process.into(),
            ok: info.status == Status::Running,
            detail: match (info.pid, &state.container) {
                (Some(pid), _) => format!("{} (pid {pid})", info.status.as_str()),
                (None, Some(c)) if info.status == Status::Running => {
                    format!("running ({})", c.name)
                }
                (None, _) => format!("{}; `cargo xtask db up` starts it", info.status.as_str()),
            },
        });
        if info.status == Status::Running {
            let what = format!("database at {}:{}", state.host, state.port);
            checks.push(match &state.tunnel {
                Some(_) => remote_check(&what, db, self.check_remote(db, &state.host, state.port)),
                None => {
                    let creds = read_credentials(&layout)?;
                    let probe = state
                        .engine
                        .engine()
                        .probe(&endpoint(&state, &layout), &creds);
                    Check {
                        what,
                        ok: probe == Probe::Ready,
                        detail: match probe {
                            Probe::Ready => {
                                format!("answers ({} {})", state.engine, state.engine_version)
                            }
                            Probe::NotYet(m) | Probe::Failed(m) => m,
                        },
                    }
                }
            });
        }
        Ok(StatusReport {
            environment: self.environment,
            env: Some(info),
            checks,
        })
    }

    /// Connects to a database isoenv does not run; the error says what to fix.
    fn check_remote(&self, db: &DatabaseConfig, host: &str, port: u16) -> Result<ServerReport> {
        remote::check(db, host, port).map_err(|source| Error::Database {
            target: db.redacted_url(),
            advice: source.advice(match &db.source {
                ConfigSource::Variables { prefix } => prefix,
                ConfigSource::Active { .. } => "DB_",
            }),
            cause: source,
        })
    }

    /// Opens (or repairs) the development tunnel and records it as the `vm` environment, so
    /// that `list`, `url`, `env` and the activate script work as for any other.
    fn tunnel_up(&self, progress: &dyn Fn(&str)) -> Result<UpOutcome> {
        self.guard(Action::Start, "open a tunnel")?;
        let db = &self.database;
        let Some(ssh_config) = &db.ssh_tunnel else {
            return Err(Error::Unsupported(format!(
                "environment `{TUNNEL_ENV}` is an SSH tunnel, but DB_VM_SSH_ENABLED is not true in this configuration; enable it, or `cargo xtask db destroy {TUNNEL_ENV}`"
            )));
        };
        let ssh = which::which("ssh").map_err(|e| Error::EngineMissing {
            engine: "ssh (the OpenSSH client)".into(),
            detail: e.to_string(),
            install: "apt-get install openssh-client (or your system's OpenSSH client package)"
                .into(),
        })?;
        fs::create_dir_all(&self.root)
            .context(|| format!("cannot create {}", self.root.display()))?;
        let name = TUNNEL_ENV;
        let layout = self.layout(name);
        let _lock = self.lock(name)?;
        let spec = TunnelSpec::new(db, ssh_config, &self.root);
        let creds = Credentials {
            user: db.user.clone(),
            password: db.password.clone(),
            database: db.name.clone(),
        };
        let mut cleanup = Cleanup {
            dir: None,
            process: None,
            backend: BackendKind::SshTunnel,
            container: None,
        };
        let existing = EnvState::load(&layout)
            .context(|| format!("cannot read the state of environment `{name}`"))?;
        let (mut state, fresh) = match existing {
            Some(state) if state.backend != BackendKind::SshTunnel => {
                return Err(Error::Env {
                    name: name.into(),
                    message: format!("it is a {} environment, not the VM tunnel; destroy it first (`cargo xtask db destroy {name}`)", state.backend),
                })
            }
            Some(mut state) => {
                if let Some(pid) = state.process.filter(ProcessId::is_alive) {
                    let same = state.tunnel.as_ref() == Some(&spec);
                    if same && remote::check(db, &state.host, state.port).is_ok() {
                        return Ok(UpOutcome::AlreadyUp(self.info(&state, &layout)));
                    }
                    progress(if same {
                        "the tunnel no longer answers; reopening it"
                    } else {
                        "the tunnel settings changed; reopening it"
                    });
                    pid.stop(Signal::SIGTERM, STOP_GRACE);
                }
                state.process = None;
                if net::is_taken(state.port) {
                    state.port = net::free_port()
                        .context(|| "cannot find a free port on 127.0.0.1".into())?;
                }
                (state, false)
            }
            None => {
                let port =
                    net::free_port().context(|| "cannot find a free port on 127.0.0.1".into())?;
                layout
                    .make_dir()
                    .and_then(|()| fs::create_dir_all(&layout.bin))
                    .and_then(|()| fs::create_dir_all(layout.log.parent().unwrap_or(&layout.dir)))
                    .context(|| format!("cannot create {}", layout.dir.display()))?;
                cleanup.dir = Some(layout.dir.clone());
                let state = EnvState {
                    schema: SCHEMA,
                    name: name.into(),
                    engine: EngineKind::Postgres,
                    backend: BackendKind::SshTunnel,
                    engine_version: String::new(),
                    host: net::LOOPBACK.to_string(),
                    port,
                    service: true,
                    process: None,
                    created_at: now(),
                    owner: None,
                    tunnel: None,
                    container: None,
                };
                (state, true)
            }
        };
        progress(&format!(
            "opening an ssh tunnel 127.0.0.1:{} -> {}",
            state.port,
            spec.route()
        ));
        let starting = ssh_tunnel::spawn(&ssh, &spec, state.port, &layout)?;
        state.process = Some(starting.process);
        state.tunnel = Some(spec.clone());
        cleanup.process = Some((starting.process, Signal::SIGTERM));
        save(&state, &layout)?;
        let report = match starting.wait(db) {
            Ok(report) => report,
            Err(e) => {
                state.process = None;
                if !fresh {
                    save(&state, &layout)?;
                }
                return Err(e.into());
            }
        };
        state.engine_version = report.version.clone();
        write_client_files(&state, &layout, &creds, &ServiceUser::invoker())
            .context(|| format!("cannot write the client files in {}", layout.dir.display()))?;
        save(&state, &layout)?;
        if fresh {
            finish(&layout)?;
        }
        cleanup.disarm();
        let info = self.info(&state, &layout);
        Ok(if fresh {
            UpOutcome::Created(info)
        } else {
            UpOutcome::Started(info)
        })
    }

    /// Whether the environment's server runs, as its backend tells.
    fn status_of(&self, state: &EnvState) -> Status {
        match state.container {
            Some(_) => self.container_status(state).0,
            None => state.status(ProcessId::is_alive),
        }
    }

    fn info(&self, state: &EnvState, layout: &Layout) -> EnvInfo {
        let status = self.status_of(state);
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
            url: database(state, &creds).redacted_url(),
            activate: layout.activate(),
            socket_dir: endpoint(state, layout)
                .socket_dir
                .filter(|_| state.service && state.tunnel.is_none()),
            container: state.container.clone(),
            isolation: None,
        }
    }

    fn make_root(&self, user: &ServiceUser) -> Result<()> {
        for dir in [&self.root, &self.cache] {
            fs::create_dir_all(dir).context(|| format!("cannot create {}", dir.display()))?;
        }
        if user.switch {
            reachable(&self.root, user).map_err(Error::Unsupported)?;
        }
        Ok(())
    }

    /// The engine's binaries, installing them first when asked to.
    fn binaries(
        &self,
        engine: &dyn Engine,
        install: bool,
        progress: &dyn Fn(&str),
    ) -> Result<Binaries> {
        let detail = match engine.locate(&self.vars) {
            Ok(b) => return Ok(b),
            Err(detail) => detail,
        };
        let command = engine::install_command(engine);
        let auto = install || self.vars.get("ISOENV_AUTO_INSTALL") == Some("1");
        if let (true, Some(cmd)) = (auto, &command) {
            progress(&format!("installing {}: {cmd}", engine.kind()));
            // The installer's chatter goes to stderr: stdout is for data.
            let stderr = std::os::fd::AsFd::as_fd(&std::io::stderr()).try_clone_to_owned();
            let status = stderr.and_then(|fd| {
                std::process::Command::new("sh")
                    .args(["-c", cmd])
                    .stdout(fd)
                    .status()
            });
            if matches!(status, Ok(s) if s.success()) {
                if let Ok(b) = engine.locate(&self.vars) {
                    return Ok(b);
                }
            }
        }
        Err(Error::EngineMissing {
            engine: engine.kind().to_string(),
            detail,
            install: command.unwrap_or_else(|| {
                format!(
                    "install {} with your system's package manager",
                    engine.kind()
                )
            }),
        })
    }

    /// The cached, initialized data directory for this engine, version and init command,
    /// made once (under a lock, so concurrent creates share one initialization).
    fn template(
        &self,
        engine: &dyn Engine,
        bins: &Binaries,
        progress: &dyn Fn(&str),
    ) -> Result<Option<PathBuf>> {
        let Some(probe) = engine.init(bins, Path::new("data")) else {
            return Ok(None);
        };
        let key = format!(
            "{}-{}-{:016x}",
            engine.kind(),
            sanitize(&bins.version),
            fnv1a(&format!("{probe:?}"))
        );
        let dir = self.cache.join(&key);
        let data = dir.join("data");
        if data.is_dir() {
            return Ok(Some(data));
        }
        let _lock = Lock::wait(self.cache.join(format!(".{key}.lock")))
            .map_err(|_| Error::Busy { name: key.clone() })?;
        if data.is_dir() {
            return Ok(Some(data));
        }
        progress(&format!(
            "initializing a {} {} data directory (once; cached in {})",
            engine.kind(),
            bins.version,
            self.cache.display()
        ));
        let user = self.user()?;
        let tmp = self
            .cache
            .join(format!(".tmp-{key}-{}", std::process::id()));
        let made = (|| -> Result<()> {
            remove_tree(&tmp).context(|| format!("cannot clear {}", tmp.display()))?;
            fs::create_dir_all(&tmp).context(|| format!("cannot create {}", tmp.display()))?;
            chown_tree(&tmp, user)
                .context(|| format!("cannot hand {} to {}", tmp.display(), user.name))?;
            let init = engine
                .init(bins, &tmp.join("data"))
                .expect("init is Some for this engine");
            init.run(user, &tmp).map_err(|message| Error::Env {
                name: format!("(cache {key})"),
                message,
            })?;
            fs::rename(&tmp, &dir).context(|| format!("cannot move {} into place", tmp.display()))
        })();
        if made.is_err() {
            let _ = remove_tree(&tmp);
        }
        made.map(|()| Some(data))
    }
}

impl UpOutcome {
    fn into_info(self) -> EnvInfo {
        match self {
            UpOutcome::Created(i) | UpOutcome::Started(i) | UpOutcome::AlreadyUp(i) => i,
            UpOutcome::Verified { .. } => unreachable!("production has no environments"),
        }
    }
}

fn remote_check(what: &str, db: &DatabaseConfig, result: Result<ServerReport>) -> Check {
    match result {
        Ok(report) => Check {
            what: what.into(),
            ok: true,
            detail: format!("{} answers: {report}", db.redacted_url()),
        },
        Err(e) => Check {
            what: what.into(),
            ok: false,
            detail: e.to_string(),
        },
    }
}

/// Probes until the engine answers its own protocol, or says why it never will: it answered
/// wrongly, `gone` (asked between probes, with the last probe's message) reports the server
/// gone, or the time is up. `None` means ready.
fn wait_ready(
    engine: &dyn Engine,
    endpoint: &Endpoint,
    creds: &Credentials,
    mut gone: impl FnMut(&str) -> Result<Option<String>>,
) -> Result<Option<String>> {
    let deadline = Instant::now() + READY_TIMEOUT;
    loop {
        let message = match engine.probe(endpoint, creds) {
            Probe::Ready => return Ok(None),
            Probe::Failed(m) => {
                return Ok(Some(format!(
                    "{} answered but is not usable: {m}",
                    engine.kind()
                )))
            }
            Probe::NotYet(m) => m,
        };
        if let Some(failure) = gone(&message)? {
            return Ok(Some(failure));
        }
        if Instant::now() > deadline {
            return Ok(Some(format!(
                "{} did not accept connections within {}s ({message})",
                engine.kind(),
                READY_TIMEOUT.as_secs()
            )));
        }
        sleep(Duration::from_millis(3));
    }
}

/// The service user must be able to traverse every directory down to the state root.
fn reachable(path: &Path, user: &ServiceUser) -> std::result::Result<(), String> {
    let abs =
        fs::canonicalize(path).map_err(|e| format!("cannot resolve {}: {e}", path.display()))?;
    for dir in abs.ancestors() {
        let Ok(meta) = fs::metadata(dir) else {
            continue;
        };
        let bit = if meta.uid() == user.uid {
            0o100
        } else if meta.gid() == user.gid {
            0o010
        } else {
            0o001
        };
        if meta.mode() & bit == 0 {
            return Err(format!(
                "servers run as `{}`, which cannot enter {} (mode {:o}), so it cannot reach {}; set WASI_SANDBOX_DIR to a directory it can reach, or ISOENV_SERVICE_USER to a user that can",
                user.name,
                dir.display(),
                meta.mode() & 0o777,
                abs.display()
            ));
        }
    }
    Ok(())
}

fn save(state: &EnvState, layout: &Layout) -> Result<()> {
    state
        .save(layout)
        .context(|| format!("cannot write {}", layout.state_file().display()))
}

/// What clients use: the engine's client files, the stored login (0600) and the activate
/// script.
fn write_client_files(
    state: &EnvState,
    layout: &Layout,
    creds: &Credentials,
    user: &ServiceUser,
) -> std::io::Result<()> {
    state
        .engine
        .engine()
        .configure(layout, state.port, creds, user)?;
    let stored = StoredCredentials {
        user: creds.user.clone(),
        password: creds.password.expose().to_owned(),
        database: creds.database.clone(),
    };
    write_private(&layout.credentials_file(), &serde_json::to_vec(&stored)?)?;
    let exports = exports(state, creds, layout);
    write_private(
        &layout.activate(),
        activate::script(&state.name, &exports).as_bytes(),
    )
}

/// What the backend left outside the directory once the server is gone (a sandbox's cgroups).
fn release(state: &EnvState, layout: &Layout) -> Result<()> {
    state
        .backend
        .backend()
        .release(&layout.dir)
        .context(|| format!("cannot clean up after environment `{}`", state.name))
}

fn stop_signal(state: &EnvState) -> Signal {
    state.backend.backend().stop_signal(state.engine.engine())
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn finish(layout: &Layout) -> Result<()> {
    layout
        .finish()
        .context(|| format!("cannot complete {}", layout.dir.display()))
}

fn check_name(name: &str) -> Result<()> {
    validate_name(name).map_err(|reason| Error::InvalidName {
        name: name.into(),
        reason,
    })
}

fn read_credentials(layout: &Layout) -> Result<Credentials> {
    let path = layout.credentials_file();
    let bytes = fs::read(&path).context(|| format!("cannot read {}", path.display()))?;
    let c: StoredCredentials = serde_json::from_slice(&bytes).map_err(|e| Error::Io {
        context: format!("cannot parse {}", path.display()),
        cause: e.into(),
    })?;
    Ok(Credentials {
        user: c.user,
        password: Secret::new(c.password),
        database: c.database,
    })
}

/// Where the server answers; a container's socket is out of the host's reach.
fn endpoint(state: &EnvState, layout: &Layout) -> Endpoint {
    Endpoint {
        host: state.host.clone(),
        port: state.port,
        socket_dir: (state.backend != BackendKind::Docker).then(|| layout.run.clone()),
    }
}

/// The environment as the configuration layer sees an active environment.
fn database(state: &EnvState, creds: &Credentials) -> DatabaseConfig {
    DatabaseConfig {
        engine: state.engine,
        host: state.host.clone(),
        port: state.port,
        name: creds.database.clone(),
        user: creds.user.clone(),
        password: creds.password.clone(),
        use_vm: false,
        // Through a tunnel clients use TLS if the VM's server offers it.
        ssl_mode: match state.tunnel {
            Some(_) => SslMode::Prefer,
            None => SslMode::Disable,
        },
        ssl_root_cert: None,
        ssh_tunnel: None,
        source: ConfigSource::Active {
            name: state.name.clone(),
        },
    }
}

/// What the activate script exports: the URL, `DB_*` (read back by the environment config as an
/// active environment), the marker, and the engine's native variables.
fn exports(state: &EnvState, creds: &Credentials, layout: &Layout) -> Vec<(String, String)> {
    let engine = state.engine.engine();
    let db = database(state, creds);
    let url_var = if engine.kind() == EngineKind::Redis {
        "REDIS_URL"
    } else {
        "DATABASE_URL"
    };
    let mut out: Vec<(String, String)> = vec![
        (url_var.into(), db.url()),
        ("DB_HOST".into(), db.host.clone()),
        ("DB_PORT".into(), db.port.to_string()),
        ("DB_NAME".into(), db.name.clone()),
        ("DB_USER".into(), db.user.clone()),
        ("DB_PASSWORD".into(), creds.password.expose().to_owned()),
        (ACTIVE_MARKER.into(), state.name.clone()),
        (ACTIVE_ENGINE.into(), engine.kind().to_string()),
    ];
    out.extend(
        engine
            .native_exports(&endpoint(state, layout), creds, layout)
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v)),
    );
    out
}

/// Removes a half-made environment (and stops its server, or removes its container and
/// volume) unless disarmed.
struct Cleanup<'a> {
    dir: Option<PathBuf>,
    process: Option<(ProcessId, Signal)>,
    backend: BackendKind,
    /// The Docker engine, the container and the volume.
    container: Option<(&'a Docker, String, String)>,
}

impl Cleanup<'_> {
    fn disarm(&mut self) {
        self.dir = None;
        self.process = None;
        self.container = None;
    }
}

impl Drop for Cleanup<'_> {
    fn drop(&mut self) {
        if let Some((pid, signal)) = self.process.take() {
            pid.stop(signal, Duration::from_secs(10));
        }
        if let Some((docker, container, volume)) = self.container.take() {
            let _ = docker.remove_container(&container);
            let _ = docker.remove_volume(&volume);
        }
        if let Some(dir) = self.dir.take() {
            let _ = self.backend.backend().release(&dir);
            let _ = remove_tree(&dir);
        }
    }
}

fn sanitize(s: &str) -> String {
    s.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '.' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(pairs: &[(&str, &str)]) -> EnvironmentConfig {
        EnvironmentConfig::from_vars(&Vars::from_pairs(pairs.iter().copied()), Path::new("/p"))
            .unwrap()
    }

    #[test]
    fn production_only_reads() {
        for action in [Action::Create, Action::Start, Action::Stop, Action::Destroy] {
            assert!(!allowed(Environment::Production, action));
            assert!(allowed(Environment::Development, action));
            assert!(allowed(Environment::Staging, action));
        }
        assert!(allowed(Environment::Production, Action::Read));
    }

    #[test]
    fn up_plans() {
        assert_eq!(
            plan_up(&config(&[])),
            UpPlan::Local {
                name: "dev",
                engine: EngineKind::Postgres,
                backend: BackendKind::Lightweight
            }
        );
        assert_eq!(
            plan_up(&config(&[("DB_VM_SSH_ENABLED", "true")])),
            UpPlan::Tunnel
        );
        assert_eq!(
            plan_up(&config(&[("ENVIRONMENT", "staging")])),
            UpPlan::Containers {
                name: "staging",
                engine: EngineKind::Postgres
            }
        );
        let prod = [
            ("ENVIRONMENT", "production"),
            ("DB_PROD_HOST", "h"),
            ("DB_PROD_NAME", "n"),
            ("DB_PROD_USER", "u"),
            ("DB_PROD_PASSWORD", "p"),
        ];
        assert_eq!(plan_up(&config(&prod)), UpPlan::VerifyProduction);
    }

    #[test]
    fn cache_keys_are_stable() {
        assert_eq!(fnv1a(""), 0xcbf29ce484222325);
        assert_eq!(fnv1a("a"), 0xaf63dc4c8601ec8c);
        assert_eq!(sanitize("10.11.19-MariaDB"), "10.11.19_MariaDB");
    }
}
