//! One environment's life: create, start, stop, destroy, disown. The environment's backend does
//! the work; the workspace guards production, validates the name, holds the lock, and removes
//! what a failed create made.

use std::fs;

use super::cleanup::Cleanup;
use super::policy::Action;
use super::root;
use super::{check_name, EnvInfo, Workspace};
use crate::backend::Host;
use crate::backend::{memory, CreateOptions};
use crate::error::{Error, IoContext, Result};
use crate::sys::process::ProcessId;

impl Workspace {
    pub fn create(&self, opts: &CreateOptions, progress: &dyn Fn(&str)) -> Result<EnvInfo> {
        self.guard(Action::Create, "create an environment")?;
        check_name(&opts.name)?;
        if let Some(port) = opts.port {
            check_port(port)?;
        }
        self.make_root(progress)?;
        let (layout, _lock) = self.claim(&opts.name)?;
        // From here on, anything that fails removes what was made.
        let mut cleanup = Cleanup {
            host: self,
            dir: Some(layout.dir.clone()),
        };
        let state = opts
            .backend
            .backend()
            .create(self, opts, &layout, progress)?;
        layout
            .finish()
            .context(|| format!("cannot complete {}", layout.dir.display()))?;
        cleanup.disarm();
        self.refill_spare();
        Ok(self.info(&state, &layout))
    }

    /// Makes the state root; says where it is when servers could not have reached the default.
    fn make_root(&self, progress: &dyn Fn(&str)) -> Result<()> {
        let moved = self.root_link.as_ref().filter(|link| !link.exists());
        root::make(&self.root, self.root_link.as_deref())
            .context(|| format!("cannot create {}", self.root.display()))?;
        if let Some(link) = moved {
            progress(&format!(
                "servers could not reach {} (a directory above it is private), so environments live in {} (linked from there)",
                link.display(),
                self.root.display()
            ));
        }
        Ok(())
    }

    pub fn start(&self, name: &str, progress: &dyn Fn(&str)) -> Result<EnvInfo> {
        self.guard(Action::Start, "start an environment")?;
        let (layout, _lock, mut state) = self.open_locked(name)?;
        state
            .backend
            .backend()
            .start(self, &mut state, &layout, progress)?;
        Ok(self.info(&state, &layout))
    }

    pub fn stop(&self, name: &str) -> Result<EnvInfo> {
        self.guard(Action::Stop, "stop an environment")?;
        let (layout, _lock, mut state) = self.open_locked(name)?;
        state.backend.backend().stop(self, &mut state, &layout)?;
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
        let _lock = self.lock(name)?;
        match self.load(name, &layout) {
            Ok(state) => state.backend.backend().teardown(self, &state, &layout)?,
            // An unreadable record names nothing: what runs in the directory is its server.
            Err(Error::Broken { .. }) => self.abandon(&layout),
            Err(e) => return Err(e),
        }
        super::gc::retire(&layout.dir).context(|| format!("cannot remove {}", layout.dir.display()))
    }

    /// Makes an owned (ephemeral) environment permanent: `gc` will leave it alone. A local
    /// server was started to die with its owner and to skip what only a throwaway server may
    /// (the disk syncs, the disk itself), so it is started again as a permanent one, its data
    /// moved from memory to the disk.
    pub fn disown(&self, name: &str, progress: &dyn Fn(&str)) -> Result<EnvInfo> {
        let (local, user) = {
            let (layout, _lock, mut state) = self.open_locked(name)?;
            state.owner = None;
            state.store(&layout)?;
            (state.backend.runs_locally(), self.user_of(&state))
        };
        if local {
            self.stop(name)?;
            let data = self.layout(name).data;
            memory::to_disk(&data, &user?)
                .context(|| format!("cannot move {} from memory to the disk", data.display()))?;
            self.start(name, progress)?;
        }
        self.inspect(name)
    }

    /// Hands an ephemeral environment whose owner has exited to `owner`, so that it lives for
    /// `owner` now rather than being collected: how a test run takes on a previous run's
    /// server with its data (templates, pools) kept. False, and nothing changed, when the
    /// environment is permanent or its owner lives.
    pub fn adopt(&self, name: &str, owner: ProcessId) -> Result<bool> {
        let (layout, _lock, mut state) = self.open_locked(name)?;
        if !adoptable(state.owner, owner, ProcessId::is_alive) {
            return Ok(false);
        }
        state.owner = Some(owner);
        state.store(&layout)?;
        Ok(true)
    }
}

/// Whether an environment owned by `current` may pass to `new`: only one whose owner has exited
/// (a permanent environment, or one whose owner lives, is not up for grabs).
fn adoptable(
    current: Option<ProcessId>,
    new: ProcessId,
    alive: impl Fn(&ProcessId) -> bool,
) -> bool {
    current.is_some_and(|c| c != new && !alive(&c))
}

/// A port an environment may be given: not 0 (which means "any", and none is then known) and
/// not a privileged one (servers run unprivileged, and a root sandbox supervisor must not bind
/// one on their behalf).
fn check_port(port: u16) -> Result<()> {
    let problem = match port {
        0 => "0 is not a port; omit --port for a free one",
        1..=1023 => "ports below 1024 are privileged and servers run unprivileged; pick one from 1024 up, or omit --port for a free one",
        _ => return Ok(()),
    };
    Err(Error::InvalidPort {
        port,
        reason: problem.into(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_environments_whose_owner_exited_are_adopted() {
        let p = |pid| ProcessId { pid, start_time: 7 };
        let alive = |q: &ProcessId| q.pid == 1;
        assert!(adoptable(Some(p(2)), p(3), alive), "its owner exited");
        assert!(!adoptable(Some(p(1)), p(3), alive), "its owner lives");
        assert!(
            !adoptable(Some(p(3)), p(3), alive),
            "already the new owner's"
        );
        assert!(!adoptable(None, p(3), alive), "a permanent environment");
    }

    #[test]
    fn only_unprivileged_ports_can_be_asked_for() {
        assert!(check_port(0).is_err());
        assert!(check_port(22).is_err());
        assert!(check_port(1023).is_err());
        assert!(check_port(1024).is_ok());
        assert!(check_port(65535).is_ok());
    }
}
