//! What a local server needs before it starts: the engine's binaries (installed on request) and
//! the cache of initialized data directories, made once per engine, version and init command
//! and copied (or a spare copy renamed) into each new environment.

use std::fs;
use std::path::{Path, PathBuf};

use super::identities::Identities;
use super::{holds, spare, Workspace};
use crate::backend::Spare;
use crate::engine::{self, Binaries, Engine};
use crate::error::{Error, IoContext, Result};
use crate::sys::files::{chown_tree, copy_tree, remove_tree};
use crate::sys::hash::fnv1a;
use crate::sys::lock::Lock;
use crate::sys::process::ServiceUser;

impl Workspace {
    /// The engine's binaries, installing them first when asked to.
    pub(super) fn find_binaries(
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
            detail: detail.to_string(),
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
    pub(super) fn cached_template(
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
            read_only_to_servers(&dir)
                .context(|| format!("cannot hand {} to root", dir.display()))?;
            return Ok(Some(data));
        }
        fs::create_dir_all(&self.cache)
            .context(|| format!("cannot create {}", self.cache.display()))?;
        let _lock = Lock::wait(self.cache.join(format!(".{key}.lock")))
            .map_err(|_| Error::Busy { name: key.clone() })?;
        if data.is_dir() {
            read_only_to_servers(&dir)
                .context(|| format!("cannot hand {} to root", dir.display()))?;
            return Ok(Some(data));
        }
        progress(&format!(
            "initializing a {} {} data directory (once; cached in {})",
            engine.kind(),
            bins.version,
            self.cache.display()
        ));
        let user = self.service_user()?;
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
                // Initializers rarely say so themselves (PostgreSQL: "PANIC: cannot abort
                // transaction"), so a full disk is named here.
                message: match free_space(&self.cache) {
                    Some(free) if free < LOW_SPACE => format!(
                        "the disk holding {} is full ({} KiB free): free some space, or set ISOENV_CACHE_DIR to a directory on another disk\n{message}",
                        self.cache.display(),
                        free >> 10
                    ),
                    _ => message,
                },
            })?;
            read_only_to_servers(&tmp)
                .context(|| format!("cannot hand {} to root", tmp.display()))?;
            fs::rename(&tmp, &dir).context(|| format!("cannot move {} into place", tmp.display()))
        })();
        if made.is_err() {
            let _ = remove_tree(&tmp);
        }
        made.map(|()| Some(data))
    }

    /// The spare copy of the template taken into place, else a copy made now; a new spare is
    /// made once the environment is complete.
    pub(super) fn copy_cached(
        &self,
        template: &Path,
        data: &Path,
        user: &ServiceUser,
        spare: Option<&Spare>,
    ) -> std::io::Result<()> {
        match spare {
            // Made for this identity ahead of time.
            Some(s) if s.owner == user.uid => {}
            // A copy of the cache, which is root's, or made for an identity that is someone
            // else's now.
            Some(_) => chown_tree(data, user)?,
            None => copy_tree(template, data, user)?,
        }
        // A thousand files just changed owner (or were made): left alone, the filesystem's
        // journal would commit them at the server's first durable commit, the password's, which
        // then takes 30 ms instead of 3. Committed now, while the server starts.
        let dir = data.to_owned();
        std::thread::spawn(move || fs::File::open(dir).and_then(|d| d.sync_all()));
        *self.spare_due.lock().unwrap_or_else(|e| e.into_inner()) = Some(template.to_owned());
        Ok(())
    }

    /// As root, an identity of isoenv's range for a spare, which the create that takes it
    /// takes over: its files are then that identity's already.
    fn claim_for_spare(&self, spare: &Path) -> Option<(u32, u32)> {
        if !matches!(self.identities, Identities::Own) {
            return None;
        }
        let id = self.identities.registry()?.claim(spare, holds).ok()?;
        let user = self.identities.user(id).ok()?;
        Some((user.uid, user.gid))
    }

    /// Starts the copy that the next `create` will rename into place.
    pub(super) fn refill_spare(&self) {
        let due = self
            .spare_due
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        if let Some(template) = due {
            spare::refill(&template, &self.root, |spare| self.claim_for_spare(spare));
        }
    }
}

/// Less free space than this after a failed initialization means the disk was full.
const LOW_SPACE: u64 = 16 << 20;

/// Bytes free for unprivileged writers on the filesystem holding `path`.
fn free_space(path: &Path) -> Option<u64> {
    let stat = nix::sys::statvfs::statvfs(path).ok()?;
    Some(stat.blocks_available() as u64 * stat.fragment_size() as u64)
}

/// As root, the cache of initialized data directories is root's: servers (whatever user they
/// run as) can change nothing in it, and every environment gets its own copy. An entry an older
/// isoenv left to the service user is taken back on first use.
fn read_only_to_servers(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::MetadataExt;
    if !nix::unistd::geteuid().is_root() || fs::metadata(dir)?.uid() == 0 {
        return Ok(());
    }
    let root = ServiceUser {
        name: "root".into(),
        uid: 0,
        gid: 0,
        switch: crate::sys::process::Switch::Setuid,
    };
    chown_tree(dir, &root)
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

    #[test]
    fn cache_keys_are_stable() {
        assert_eq!(fnv1a(""), 0xcbf29ce484222325);
        assert_eq!(fnv1a("a"), 0xaf63dc4c8601ec8c);
        assert_eq!(sanitize("10.11.19-MariaDB"), "10.11.19_MariaDB");
    }
}
