//! A server as a local process, for the lightweight and sandbox backends: the data directory a
//! copy of the cached template, the server spawned through the backend's [`Confinement`],
//! recorded at once, and waited for until it answers its own protocol.

use std::fs;
use std::io;
use std::path::Path;
use std::time::Duration;

use nix::sys::signal::Signal;

use super::memory;
use super::{
    Backend, BackendKind, CreateOptions, EnvState, Host, Isolation, Started, Status, READY_TIMEOUT,
    STOP_GRACE,
};
use crate::engine::{wait_ready, Binaries, Credentials, Engine};
use crate::error::{Error, IoContext, Result};
use crate::layout::Layout;
use crate::sys::files::{copy_tree, reachable, set_mode};
use crate::sys::net;
use crate::sys::process::{self, tail, Launch, ProcessId, ServiceUser, Switch};
use crate::sys::secret::Secret;

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

/// How a local server is confined: what differs between the lightweight and sandbox backends.
pub trait Confinement: Sync {
    fn kind(&self) -> BackendKind;

    /// Writes what the confinement needs into a new environment (e.g. its manifest).
    fn prepare(&self, _p: &Prepare) -> Result<()> {
        Ok(())
    }

    /// Starts the server and returns the process that owns its lifetime.
    fn spawn(&self, s: &Spawn) -> io::Result<ProcessId>;

    /// The signal for a graceful, fast stop of what [`Confinement::spawn`] started.
    fn stop_signal(&self, engine: &dyn Engine) -> Signal {
        engine.stop_signal()
    }

    /// The servers running for the environment in `dir`, recorded or not: by default the
    /// processes working there (or in its data in memory, where servers move) that run the
    /// engine's `server` program.
    fn servers_in(&self, dir: &Path, server: &Path) -> Vec<ProcessId> {
        let servers = [server.to_owned()];
        let mut found = process::running_in(dir, &servers);
        if let Some(data) = memory::linked(&dir.join("data")) {
            found.extend(process::running_in(&data, &servers));
        }
        found
    }

    /// Whether, without root, servers may run as the invoker's subordinate ids.
    fn subordinate_ids(&self) -> bool {
        true
    }

    /// Removes what a dead server left outside the environment directory.
    fn release(&self, _dir: &Path) -> io::Result<()> {
        Ok(())
    }

    fn isolation(&self, _dir: &Path) -> Option<Isolation> {
        None
    }

    /// What the confinement made outside any environment directory that nothing accounts for
    /// any more; removed, and named.
    fn leftovers(&self) -> io::Result<Vec<String>> {
        Ok(Vec::new())
    }
}

/// A local server under a [`Confinement`].
pub struct Local<C>(pub C);

impl<C: Confinement> Backend for Local<C> {
    fn kind(&self) -> BackendKind {
        self.0.kind()
    }

    fn noun(&self) -> &'static str {
        "server"
    }

    fn create(
        &self,
        host: &dyn Host,
        opts: &CreateOptions,
        layout: &Layout,
        progress: &dyn Fn(&str),
    ) -> Result<EnvState> {
        let env_err = |message: String| Error::Env {
            name: opts.name.clone(),
            message,
        };
        layout.check_socket_room().map_err(env_err)?;
        let engine = opts.engine.engine();
        let port = match opts.port {
            Some(p) if net::is_taken(p) => return Err(Error::PortTaken { port: p }),
            Some(p) => p,
            None => net::free_port().context(|| "cannot find a free port on 127.0.0.1".into())?,
        };
        let bins = match opts.service {
            true => Some(host.binaries(engine, opts.install, progress)?),
            false => None,
        };
        let template = match &bins {
            Some(b) => host.template(engine, b, progress)?,
            None => None,
        };
        let mut state = EnvState::new(opts, net::LOOPBACK.to_string(), port);
        state.engine_version = bins.as_ref().map(|b| b.version.clone()).unwrap_or_default();
        let creds = engine.credentials(Secret::generate());
        layout
            .make()
            .context(|| format!("cannot create {}", layout.dir.display()))?;
        let memory = match state.owner.is_some() && engine.data_in_memory() {
            true => memory::place(host.vars()).map_err(env_err)?,
            false => None,
        };
        // A spare is on disk: memory gets a copy.
        let spare = template
            .as_deref()
            .filter(|_| memory.is_none())
            .and_then(|t| host.take_spare(t, &layout.data));
        let (identity, user) = host.claim_user(layout, self.0.subordinate_ids(), spare.as_ref())?;
        state.identity = identity;
        if user.switch != Switch::No {
            reachable(host.root(), &user).map_err(Error::Unsupported)?;
        }
        let user = &user;
        let made = || -> io::Result<()> {
            match (&template, &memory) {
                (Some(t), Some(m)) => {
                    copy_tree(t, &memory::link(m, &layout.dir, &layout.data)?, user)?
                }
                (Some(t), None) => host.copy_template(t, &layout.data, user, spare.as_ref())?,
                (None, _) => {
                    fs::create_dir(&layout.data)?;
                    set_mode(&layout.data, 0o700)?;
                    user.chown(&layout.data)?;
                }
            }
            fs::create_dir(&layout.run)?;
            user.share_dir(&layout.run)?;
            host.write_client_files(&state, layout, &creds, user)
        };
        made().context(|| {
            format!(
                "cannot set up environment `{}` in {}",
                opts.name,
                layout.dir.display()
            )
        })?;
        if let Some(bins) = &bins {
            self.0.prepare(&Prepare {
                layout,
                engine,
                bins,
                port,
                memory: host.memory_limit(),
            })?;
            progress(&format!(
                "starting {} {} on 127.0.0.1:{port}",
                engine.kind(),
                bins.version
            ));
            self.run(host, &mut state, bins, layout, &creds)?;
            engine
                .after_create(&self.endpoint(&state, layout), &creds)
                .map_err(|e| env_err(e.to_string()))?;
        }
        state.store(layout)?;
        Ok(state)
    }

    fn start(
        &self,
        host: &dyn Host,
        state: &mut EnvState,
        layout: &Layout,
        progress: &dyn Fn(&str),
    ) -> Result<Started> {
        let name = &state.name;
        // A server killed a moment ago may still be exiting: wait for it, then start anew.
        if let Some(pid) = state.process.filter(|p| p.is_exiting()) {
            pid.wait_exit(STOP_GRACE);
        }
        match self.status(host, state) {
            Status::Running => return Ok(Started::Already),
            Status::EnvOnly => {
                return Err(Error::Env {
                    name: name.clone(),
                    message: "it is env-only (created with --no-service): there is no server to start; destroy and create it without --no-service".into(),
                })
            }
            Status::Stopped | Status::Crashed | Status::Missing | Status::Unknown => {}
        }
        let engine = state.engine.engine();
        let bins = host.binaries(engine, false, progress)?;
        self.stop_strays(state, layout, &bins.server);
        if net::is_taken(state.port) {
            return Err(Error::Env {
                name: name.clone(),
                message: format!("its port {} on 127.0.0.1 is now used by another program; stop that program, or destroy and recreate the environment", state.port),
            });
        }
        // The recorded server is dead, so what it left behind is stale.
        for stale in engine.stale_files(layout, state.port) {
            let _ = fs::remove_file(stale);
        }
        progress(&format!(
            "starting {} {} on 127.0.0.1:{}",
            engine.kind(),
            bins.version,
            state.port
        ));
        let creds = host.credentials(layout)?;
        self.run(host, state, &bins, layout, &creds)?;
        Ok(Started::Now)
    }

    fn stop(&self, host: &dyn Host, state: &mut EnvState, layout: &Layout) -> Result<()> {
        if let Some(pid) = state.process.take() {
            pid.stop(self.stop_signal(state), STOP_GRACE);
            state.store(layout)?;
        }
        self.stop_unrecorded(host, state, layout);
        self.release(host, state, layout)
    }

    fn status(&self, _host: &dyn Host, state: &EnvState) -> Status {
        state.status(ProcessId::is_alive)
    }

    fn teardown(&self, host: &dyn Host, state: &EnvState, layout: &Layout) -> Result<()> {
        if let Some(pid) = state.process {
            pid.stop(self.stop_signal(state), STOP_GRACE);
        }
        self.stop_unrecorded(host, state, layout);
        self.release(host, state, layout)?;
        host.release_user(state, layout)
    }

    fn leftovers(&self, _host: &dyn Host) -> Result<Vec<String>> {
        self.0
            .leftovers()
            .context(|| format!("cannot collect what {} servers left", self.0.kind()))
    }

    fn abandon(&self, _host: &dyn Host, layout: &Layout) -> Result<()> {
        self.0
            .release(&layout.dir)
            .context(|| format!("cannot clean up after {}", layout.dir.display()))
    }

    fn isolation(&self, _host: &dyn Host, _state: &EnvState, layout: &Layout) -> Option<Isolation> {
        self.0.isolation(&layout.dir)
    }
}

impl<C: Confinement> Local<C> {
    fn stop_signal(&self, state: &EnvState) -> Signal {
        self.0.stop_signal(state.engine.engine())
    }

    /// Stops the environment's servers that its record does not name: what a `create` or
    /// `start` killed between spawning a server and recording it left running, which would
    /// hold the port and the data directory. Gracefully, as any stop.
    fn stop_strays(&self, state: &EnvState, layout: &Layout, server: &Path) {
        for pid in self.0.servers_in(&layout.dir, server) {
            if Some(pid) != state.process {
                pid.stop(self.stop_signal(state), STOP_GRACE);
            }
        }
    }

    /// [`Self::stop_strays`] where the engine's binaries may be gone (a stop or a destroy
    /// must not fail for that).
    fn stop_unrecorded(&self, host: &dyn Host, state: &EnvState, layout: &Layout) {
        if let Ok(bins) = host.binaries(state.engine.engine(), false, &|_| {}) {
            self.stop_strays(state, layout, &bins.server);
        }
    }

    /// What the confinement left outside the directory once the server is gone.
    fn release(&self, _host: &dyn Host, state: &EnvState, layout: &Layout) -> Result<()> {
        self.0
            .release(&layout.dir)
            .context(|| format!("cannot clean up after environment `{}`", state.name))
    }

    /// Spawns the server through the confinement, records it at once (so that even if isoenv
    /// is killed while waiting, `list` and `destroy` still find the process), and waits until
    /// it answers. On failure the process is gone, the record says so, and the error carries
    /// the log's tail.
    fn run(
        &self,
        host: &dyn Host,
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
                .fold(launch, |l, a| l.arg(a))
                .without_disk_sync();
        }
        // An environment owned by this process (a test run) must not outlive it.
        if state.owner.is_some() && state.owner == ProcessId::of(std::process::id() as i32).ok() {
            launch = launch.die_with_parent(self.stop_signal(state));
        }
        let pid = self
            .0
            .spawn(&Spawn {
                launch: &launch,
                layout,
                user: &host.user_of(state)?,
                engine,
                port: state.port,
            })
            .context(|| format!("cannot start {}", launch.program.display()))?;
        state.process = Some(pid);
        if let Err(e) = state.store(layout) {
            pid.stop(Signal::SIGKILL, Duration::from_secs(5));
            return Err(e);
        }
        let failure = wait_ready(
            engine,
            &self.endpoint(state, layout),
            creds,
            READY_TIMEOUT,
            |m| {
                Ok::<_, Error>(
                    (!pid.is_alive())
                        .then(|| format!("{} exited during start-up ({m})", engine.kind())),
                )
            },
        )?;
        let Some(failure) = failure else {
            return Ok(());
        };
        pid.stop(Signal::SIGKILL, Duration::from_secs(5));
        let _ = self.0.release(&layout.dir);
        state.process = None;
        let _ = state.store(layout);
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
}
