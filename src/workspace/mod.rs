//! The workspace: a state root and the verbs on it, composed from engines (what runs), backends
//! (where it runs) and the record. One file per concept:
//!
//! - [`policy`]: what may be done where, and what `up` brings up (pure).
//! - `lifecycle`: create, start, stop, destroy, disown; `cleanup` undoes a failed create.
//! - `up`: `up`, `down`, `status`.
//! - `queries`: `list`, `inspect`, `url`, exports, logs.
//! - `gc`: what dead owners and killed commands left.
//! - `provision`: engine binaries and the cache of initialized data directories (`spare`).
//! - `client_files`: credentials, the activate script (`activate`), the URL and variables.
//! - `image`: isoenv's local Docker images.
//! - [`doctor`], [`test_run`]: what this machine can do; the plan of a `test --isolated` run.

mod activate;
mod cleanup;
mod client_files;
pub mod doctor;
mod gc;
mod identities;
mod image;
mod lifecycle;
pub mod policy;
mod provision;
mod queries;
mod root;
mod spare;
pub mod test_run;
mod up;

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};

use crate::backend::docker::client::{Docker, DockerError};
use crate::backend::docker::ssh::{self, SshLink};
use crate::backend::{EnvState, Host, Spare};
use crate::config::{DatabaseConfig, EnvironmentConfig, Profile};
use crate::engine::{Binaries, Credentials, Engine};
use crate::envfile::Vars;
use crate::error::{Error, IoContext, Result};
use crate::layout::{validate_name, Layout};
use crate::sys::lock::{Lock, LockError};
use crate::sys::process::{ServiceUser, Switch};
use identities::Identities;

pub use crate::backend::CreateOptions;

pub use image::BuiltImage;
pub use policy::{
    allowed, local_backend, plan_up, Action, UpPlan, DEFAULT_ENV, STAGING_ENV, TUNNEL_ENV,
};
pub use queries::EnvInfo;
pub use up::{Check, Down, StatusReport, UpOutcome};

/// A state root and what is needed to act on it.
pub struct Workspace {
    root: PathBuf,
    cache: PathBuf,
    profile: Profile,
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
    /// The project's `.isoenv`, linked to `root` when servers could not reach it.
    root_link: Option<PathBuf>,
    /// Where each environment's servers get their identity.
    identities: Identities,
    /// The template a `create` copied, for the spare copy made once it is complete.
    spare_due: Mutex<Option<PathBuf>>,
}

impl Workspace {
    pub fn new(config: &EnvironmentConfig, vars: Vars) -> Self {
        let user = ServiceUser::resolve(vars.get("ISOENV_SERVICE_USER"));
        let own_identities = ServiceUser::per_environment(vars.get("ISOENV_SERVICE_USER"));
        // Who must reach the state root: an identity of each environment's own is no owner or
        // group of anything, so any of them stands for all.
        let servers = match (&user, own_identities) {
            (_, true) => Some(ServiceUser::own(crate::sys::identity::FIRST)),
            (Ok(u), false) if u.switch == Switch::Setuid => Some(u.clone()),
            _ => None,
        };
        let state_root = root::locate(config.sandbox(), servers.as_ref());
        let root = state_root.path.clone();
        let identities = Identities::decide(own_identities, &user, &root);
        let cache = vars
            .get("ISOENV_CACHE_DIR")
            .map_or_else(|| root.join(".cache"), PathBuf::from);
        Workspace {
            root,
            root_link: state_root.link,
            cache,
            profile: config.profile(),
            database: config.database_config().clone(),
            user,
            memory_limit: config.sandbox().memory_limit_bytes,
            docker_host: vars.get("DOCKER_HOST").map(str::to_owned),
            docker: OnceLock::new(),
            identities,
            spare_due: Mutex::new(None),
            vars,
        }
    }

    /// `doctor`'s word on whether environments' servers run as users of their own.
    pub fn identities(&self) -> doctor::Check {
        doctor::Check {
            name: doctor::IDENTITIES.into(),
            ok: self.identities.apart(),
            detail: self.identities.describe(),
            fix: None,
        }
    }

    pub fn layout(&self, name: &str) -> Layout {
        Layout::new(self.root.join(name))
    }

    fn service_user(&self) -> Result<&ServiceUser> {
        self.user
            .as_ref()
            .map_err(|e| Error::Unsupported(e.clone()))
    }

    fn guard(&self, action: Action, what: &str) -> Result<()> {
        if allowed(self.profile, action) {
            Ok(())
        } else {
            Err(Error::Production {
                action: what.into(),
                environment: self.profile,
            })
        }
    }

    /// The name's lock. Another command's collection takes free locks for an instant (to remove
    /// a killed command's files), and a command killed just after it started a process leaves
    /// the lock with that process until it execs (a moment, longer on a loaded machine), so a
    /// lock found busy is asked again for up to a second before the name counts as busy.
    fn lock(&self, name: &str) -> Result<Lock> {
        let path = self.root.join(".locks").join(format!("{name}.lock"));
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(1);
        let mut taken = Lock::try_acquire(path.clone());
        while matches!(taken, Err(LockError::Busy)) && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(5));
            taken = Lock::try_acquire(path.clone());
        }
        taken.map_err(|e| match e {
            LockError::Busy => Error::Busy { name: name.into() },
            LockError::Io(source) => Error::Io {
                context: format!(
                    "cannot lock environment `{name}` in {}",
                    self.root.display()
                ),
                cause: source,
            },
        })
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
            .map_err(|cause| Error::Broken {
                name: name.into(),
                cause,
            })?
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
}

/// Whether the environment directory `holder` still records `id` as its identity, or `holder`
/// is a spare made for it.
fn holds(id: u32, holder: &Path) -> bool {
    if spare::is_spare(holder) {
        return true;
    }
    let holder = Layout::new(holder.to_owned());
    match EnvState::load(&holder) {
        Ok(Some(state)) => state.identity == Some(id),
        // A create in progress has claimed before it recorded.
        _ => holder.creating_marker().exists(),
    }
}

impl Host for Workspace {
    fn root(&self) -> &Path {
        &self.root
    }

    fn claim_user(
        &self,
        layout: &Layout,
        subordinate: bool,
        spare: Option<&Spare>,
    ) -> Result<(Option<u32>, ServiceUser)> {
        let registry = match &self.identities {
            Identities::Subordinate { .. } if !subordinate => None,
            identities => identities.registry(),
        };
        let Some(registry) = registry else {
            return Ok((None, self.service_user()?.clone()));
        };
        let context = || format!("cannot claim an identity in {}", registry.dir().display());
        let handed = match spare {
            Some(s) => registry
                .transfer(s.owner, &s.holder, &layout.dir)
                .context(context)?
                .then_some(s.owner),
            None => None,
        };
        let id = match handed {
            Some(id) => id,
            None => registry.claim(&layout.dir, holds).context(context)?,
        };
        let user = self.identities.user(id).map_err(Error::Unsupported)?;
        Ok((Some(id), user))
    }

    fn user_of(&self, state: &EnvState) -> Result<ServiceUser> {
        match state.identity {
            Some(id) => self.identities.user(id).map_err(Error::Unsupported),
            None => self.service_user().cloned(),
        }
    }

    fn release_user(&self, state: &EnvState, layout: &Layout) -> Result<()> {
        let Some(id) = state.identity else {
            return Ok(());
        };
        let registry = self.identities.registry_of(id);
        registry.release(id, &layout.dir).context(|| {
            format!(
                "cannot release identity {id} in {}",
                registry.dir().display()
            )
        })
    }

    fn vars(&self) -> &Vars {
        &self.vars
    }

    fn memory_limit(&self) -> u64 {
        self.memory_limit
    }

    fn database(&self) -> &DatabaseConfig {
        &self.database
    }

    fn docker_host(&self) -> Option<&str> {
        self.docker_host.as_deref()
    }

    fn docker(&self) -> Result<&Docker> {
        self.docker
            .get_or_init(|| {
                let config = self.vars.get(ssh::CONFIG_VAR);
                match self.docker_host.as_deref() {
                    Some(h) => match SshLink::of(h, &self.root, config) {
                        Some(link) => Docker::through(h, link),
                        None => Docker::connect(Some(h)),
                    },
                    None => Docker::connect(None),
                }
            })
            .as_ref()
            .map_err(|e| Error::Docker(e.clone()))
    }

    fn binaries(
        &self,
        engine: &dyn Engine,
        install: bool,
        progress: &dyn Fn(&str),
    ) -> Result<Binaries> {
        self.find_binaries(engine, install, progress)
    }

    fn template(
        &self,
        engine: &dyn Engine,
        bins: &Binaries,
        progress: &dyn Fn(&str),
    ) -> Result<Option<PathBuf>> {
        self.cached_template(engine, bins, progress)
    }

    fn take_spare(&self, template: &Path, data: &Path) -> Option<Spare> {
        spare::take(template, data)
    }

    fn copy_template(
        &self,
        template: &Path,
        data: &Path,
        user: &ServiceUser,
        spare: Option<&Spare>,
    ) -> std::io::Result<()> {
        self.copy_cached(template, data, user, spare)
    }

    fn write_client_files(
        &self,
        state: &EnvState,
        layout: &Layout,
        creds: &Credentials,
        user: &ServiceUser,
    ) -> std::io::Result<()> {
        client_files::write(state, layout, creds, user)
    }

    fn credentials(&self, layout: &Layout) -> Result<Credentials> {
        client_files::read_credentials(layout)
    }
}

impl Drop for Workspace {
    /// An SSH connection to a Docker engine that this command opened and left without an
    /// environment to carry is closed, so that no ssh process outlives a command for nothing.
    fn drop(&mut self) {
        if let Some(Ok(docker)) = self.docker.get() {
            crate::backend::docker::close_link_opened_here(self, docker);
        }
    }
}

fn check_name(name: &str) -> Result<()> {
    validate_name(name).map_err(|reason| Error::InvalidName {
        name: name.into(),
        reason,
    })
}
