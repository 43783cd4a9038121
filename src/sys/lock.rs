//! An exclusive lock on a name (a file under `flock`), held until dropped.

use std::fs::{self, File};
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;

use nix::fcntl::{Flock, FlockArg};

/// An exclusive, non-blocking lock on one name, held until dropped. The lock file is removed on
/// release; the inode check on acquire makes that safe against a racing holder.
pub struct Lock {
    path: PathBuf,
    _flock: Flock<File>,
}

#[derive(Debug)]
pub enum LockError {
    Busy,
    Io(io::Error),
}

impl Lock {
    pub fn try_acquire(path: PathBuf) -> Result<Self, LockError> {
        Self::acquire(path, FlockArg::LockExclusiveNonblock)
    }

    pub fn wait(path: PathBuf) -> Result<Self, LockError> {
        Self::acquire(path, FlockArg::LockExclusive)
    }

    fn acquire(path: PathBuf, arg: FlockArg) -> Result<Self, LockError> {
        if let Some(parent) = path.parent() {
            fs::create_dir_all(parent).map_err(LockError::Io)?;
        }
        loop {
            let file = File::options()
                .create(true)
                .truncate(false)
                .write(true)
                .open(&path)
                .map_err(LockError::Io)?;
            let flock = match Flock::lock(file, arg) {
                Ok(f) => f,
                Err((_, nix::errno::Errno::EWOULDBLOCK)) => return Err(LockError::Busy),
                Err((_, e)) => return Err(LockError::Io(e.into())),
            };
            let held = flock.metadata().map_err(LockError::Io)?.ino();
            // The previous holder may have unlinked the file between our open and our lock.
            if fs::metadata(&path).is_ok_and(|m| m.ino() == held) {
                return Ok(Lock {
                    path,
                    _flock: flock,
                });
            }
        }
    }
}

impl Drop for Lock {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.path);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lock_is_exclusive_and_removed_on_release() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("locks/x.lock");
        let held = Lock::try_acquire(path.clone()).unwrap();
        assert!(matches!(
            Lock::try_acquire(path.clone()),
            Err(LockError::Busy)
        ));
        drop(held);
        assert!(!path.exists());
        assert!(Lock::try_acquire(path).is_ok());
    }
}
