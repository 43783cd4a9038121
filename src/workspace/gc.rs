//! Collecting what dead owners and killed commands left: environments whose owner process is
//! gone, directories a killed `create` left half-made, spare copies whose copier died, and what
//! backends made for environments that no longer account for it.

use std::fs;
use std::path::Path;

use super::policy::Action;
use super::{spare, Workspace};
use crate::backend::STOP_GRACE;
use crate::backend::{self, memory, EnvState};
use crate::error::{Error, IoContext, Result};
use crate::layout::Layout;
use crate::sys::files::remove_tree;
use crate::sys::lock::Lock;
use crate::sys::process::{named_by, orphans_under, stop_working_in, ProcessId};

impl Workspace {
    /// Removes environments whose owner process is gone (a `test --isolated` run killed with
    /// SIGKILL) and directories a killed `create` left without a record (and spare data
    /// directories whose copier was killed). Returns the names removed. Live and unowned
    /// environments are never touched.
    pub fn gc(&self) -> Result<Vec<String>> {
        self.gc_except(&|_| false)
    }

    /// [`Workspace::gc`], leaving alone the environments whose name `kept` picks (their owner
    /// decides their fate: a test run's servers that the next run takes on).
    pub fn gc_except(&self, kept: &dyn Fn(&str) -> bool) -> Result<Vec<String>> {
        self.guard(Action::Destroy, "collect environments")?;
        spare::collect(&self.cache);
        self.collect_initializations();
        self.collect_retired();
        self.collect_locks();
        let mut removed = Vec::new();
        for name in self.names()?.into_iter().filter(|n| !kept(n)) {
            let layout = self.layout(&name);
            // Decided without the lock first, so that a clean state root costs only reads.
            if !is_garbage(&layout) {
                continue;
            }
            // A create or destroy in progress holds the lock: leave it alone.
            let Ok(_lock) = self.lock(&name) else {
                continue;
            };
            if !is_garbage(&layout) {
                continue;
            }
            if let Ok(Some(state)) = EnvState::load(&layout) {
                // What cannot be torn down now (an unreachable Docker engine) waits for the
                // next collection; nothing else is held up by it.
                if state
                    .backend
                    .backend()
                    .teardown(self, &state, &layout)
                    .is_err()
                {
                    continue;
                }
            }
            // A create killed before its record named what it started.
            if layout.creating_marker().exists() {
                self.abandon(&layout);
            }
            retire(&layout.dir).context(|| format!("cannot remove {}", layout.dir.display()))?;
            removed.push(name);
        }
        self.collect_identities();
        Ok(removed)
    }

    /// Stops what runs in an environment's directory (servers start there) and removes what
    /// any backend left outside it: for a directory whose record names nothing.
    pub(super) fn abandon(&self, layout: &Layout) {
        stop_working_in(&layout.dir);
        // Servers move into their data directory, which may be in memory.
        if let Some(data) = memory::linked(&layout.data) {
            stop_working_in(&data);
        }
        for kind in backend::ALL {
            let _ = kind.backend().abandon(self, layout);
        }
    }

    /// Removes the temporary directories of cache initializations whose command was killed
    /// (its lock is free again), stopping what still runs in them.
    fn collect_initializations(&self) {
        let Ok(entries) = fs::read_dir(&self.cache) else {
            return;
        };
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let Some((key, _)) = named_by(&name, ".tmp-") else {
                continue;
            };
            let Ok(_lock) = Lock::try_acquire(self.cache.join(format!(".{key}.lock"))) else {
                continue;
            };
            stop_working_in(&entry.path());
            let _ = remove_tree(&entry.path());
        }
    }

    /// Gives back the identities of environments that no longer record them (destroyed by
    /// hand, or a create killed before it recorded); best effort, as a claim takes them over
    /// anyway.
    fn collect_identities(&self) {
        if let Some(registry) = self.identities.registry() {
            let _ = registry.sweep(super::holds);
        }
    }

    /// Finishes the removals ([`retire`]) of killed commands.
    fn collect_retired(&self) {
        let Ok(entries) = fs::read_dir(&self.root) else {
            return;
        };
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let pid = named_by(&name, ".removing-").map(|(_, pid)| pid);
            if pid.is_some_and(|pid| ProcessId::of(pid).map_or(true, |p| !p.is_alive())) {
                let _ = remove_env_dir(&entry.path());
            }
        }
    }

    /// Removes lock files that nobody holds (a killed command's).
    fn collect_locks(&self) {
        let Ok(entries) = fs::read_dir(self.root.join(".locks")) else {
            return;
        };
        for entry in entries.flatten() {
            // Taken and dropped: the file goes with the lock.
            drop(Lock::try_acquire(entry.path()));
        }
    }

    /// Removes what backends made (containers, volumes) for environments that no longer
    /// account for it (their directory is gone, or their owner is), e.g. after the state root
    /// was deleted by hand. Returns what was removed.
    /// What could not be checked (an unreachable Docker engine) is the second list; it holds
    /// nothing else up.
    pub fn gc_leftovers(&self) -> Result<(Vec<String>, Vec<Error>)> {
        self.guard(Action::Destroy, "collect leftovers")?;
        // Servers whose environment directory was deleted under them.
        let mut removed: Vec<String> = orphans_under(&self.root)
            .into_iter()
            .map(|(pid, dir)| {
                pid.stop(nix::sys::signal::Signal::SIGTERM, STOP_GRACE);
                format!(
                    "process {} (its environment {} was deleted)",
                    pid.pid,
                    dir.display()
                )
            })
            .collect();
        // Data in memory of environments that are gone, whatever the project (this user's).
        removed.extend(memory::strays().into_iter().filter_map(|dir| {
            memory::discard(&dir).ok()?;
            Some(format!(
                "{} (data in memory of an environment that is gone)",
                dir.display()
            ))
        }));
        let mut unchecked = Vec::new();
        for kind in backend::ALL {
            match kind.backend().leftovers(self) {
                Ok(found) => removed.extend(found),
                Err(e) => unchecked.push(e),
            }
        }
        Ok((removed, unchecked))
    }
}

/// Whether `gc` removes this directory: its owner is dead, or it still carries the marker of a
/// create that did not finish, or it is empty (a create killed between making the directory
/// and its marker); only trusted while nobody holds the lock.
fn is_garbage(layout: &Layout) -> bool {
    let half_made = layout.creating_marker().exists();
    match EnvState::load(layout) {
        Ok(Some(state)) => half_made || state.orphaned(ProcessId::is_alive),
        Ok(None) => half_made || fs::read_dir(&layout.dir).is_ok_and(|mut d| d.next().is_none()),
        Err(_) => false,
    }
}

/// Removes an environment's directory, renamed aside first (`.removing-NAME-PID`) in one
/// step: a kill -9 during the removal then leaves either the whole environment, record
/// included, or a directory [`Workspace::collect_retired`] finishes; never an environment
/// without its record, which nothing would collect (a record-less directory may be
/// someone else's).
pub(super) fn retire(dir: &Path) -> std::io::Result<()> {
    let name = dir.file_name().unwrap_or_default().to_string_lossy();
    let aside = dir.with_file_name(format!(".removing-{name}-{}", std::process::id()));
    match fs::rename(dir, &aside) {
        Ok(()) => remove_env_dir(&aside),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(_) => remove_env_dir(dir),
    }
}

/// Removes an environment's directory and its data in memory, that first: a kill -9 between
/// the two leaves the directory, which links to nothing then.
fn remove_env_dir(dir: &Path) -> std::io::Result<()> {
    memory::release(&Layout::new(dir.to_owned()).data)?;
    remove_tree(dir)
}
