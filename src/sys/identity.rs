//! A user id of its own for each environment's servers, so that no environment can read, write
//! or signal another's files, sockets or processes. As root the ids come from a range no account
//! uses (uid = gid, no passwd entry: the engines need none); without root, from the invoker's
//! subordinate ids ([`super::userns`]). They are claimed in a registry, machine-wide (or the
//! invoker's), one file per id naming the environment directory that holds it. A claim whose
//! environment no longer records it (destroyed, deleted by hand, a create killed half-way) is
//! taken over by the next claim, and given back by `db gc`.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use super::hash::fnv1a;
use super::lock::Lock;
use super::userns::Range;

/// The first id of root's range.
pub const FIRST: u32 = 1_800_000_000;
/// How many ids root's range holds.
pub const COUNT: u32 = 1 << 24;
/// Root's range.
pub const ROOTS: Range = Range {
    first: FIRST,
    count: COUNT,
};

/// A registry of claimed ids of one range.
pub struct Registry {
    dir: PathBuf,
    range: Range,
}

impl Registry {
    pub fn new(dir: PathBuf, range: Range) -> Self {
        Registry { dir, range }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Claims an id for the environment in `owner`. `in_use(id, holder)` says whether the
    /// environment directory `holder` still records `id` as its own.
    pub fn claim(&self, owner: &Path, in_use: impl Fn(u32, &Path) -> bool) -> io::Result<u32> {
        fs::create_dir_all(&self.dir)?;
        let _lock = self.lock()?;
        for id in candidates(owner, self.range) {
            let file = self.dir.join(id.to_string());
            let free = match fs::read_to_string(&file) {
                Ok(holder) if holder == owner.to_string_lossy() => return Ok(id),
                Ok(holder) => !in_use(id, Path::new(&holder)),
                Err(e) if e.kind() == io::ErrorKind::NotFound => true,
                Err(e) => return Err(e),
            };
            if free {
                super::files::write_atomic(&file, owner.to_string_lossy().as_bytes())?;
                return Ok(id);
            }
        }
        Err(io::Error::other(format!(
            "all {} environment identities in {} are claimed",
            self.range.count,
            self.dir.display()
        )))
    }

    /// Gives back every claim whose environment no longer records it (`in_use(id, holder)`
    /// false): what destroyed-by-hand environments and killed creates left. The ids given back.
    pub fn sweep(&self, in_use: impl Fn(u32, &Path) -> bool) -> io::Result<Vec<u32>> {
        let entries = match fs::read_dir(&self.dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(e),
        };
        let _lock = self.lock()?;
        let mut freed = Vec::new();
        for entry in entries.flatten() {
            let Some(id) = entry
                .file_name()
                .to_str()
                .and_then(|n| n.parse::<u32>().ok())
            else {
                continue;
            };
            let holder = fs::read_to_string(entry.path())?;
            if !in_use(id, Path::new(&holder)) {
                fs::remove_file(entry.path())?;
                freed.push(id);
            }
        }
        Ok(freed)
    }

    /// The registry's own lock: one claim or sweep at a time, machine-wide.
    fn lock(&self) -> io::Result<Lock> {
        Lock::wait(self.dir.join(".lock")).map_err(|e| match e {
            super::lock::LockError::Io(e) => e,
            super::lock::LockError::Busy => io::Error::other("the identity registry is busy"),
        })
    }

    /// Hands `id` from `from` to `to`, if `from` still holds it (else false: `id` may be
    /// someone else's now).
    pub fn transfer(&self, id: u32, from: &Path, to: &Path) -> io::Result<bool> {
        let file = self.dir.join(id.to_string());
        let _lock = self.lock()?;
        match fs::read_to_string(&file) {
            Ok(holder) if holder == from.to_string_lossy() => {
                super::files::write_atomic(&file, to.to_string_lossy().as_bytes())?;
                Ok(true)
            }
            Ok(_) => Ok(false),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Gives `id` back, if `owner` still holds it.
    pub fn release(&self, id: u32, owner: &Path) -> io::Result<()> {
        let file = self.dir.join(id.to_string());
        match fs::read_to_string(&file) {
            Ok(holder) if holder == owner.to_string_lossy() => fs::remove_file(&file),
            Ok(_) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(e),
        }
    }
}

/// The ids to try for `owner`, in order: from a place its path decides (so that concurrent
/// claims rarely meet), around the range once.
fn candidates(owner: &Path, range: Range) -> impl Iterator<Item = u32> {
    let start = (fnv1a(&owner.to_string_lossy()) % u64::from(range.count)) as u32;
    (0..range.count).map(move |i| range.first + (start + i) % range.count)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_stay_in_their_range_and_start_apart() {
        let a: Vec<u32> = candidates(Path::new("/r/.isoenv/a"), ROOTS)
            .take(3)
            .collect();
        let b: Vec<u32> = candidates(Path::new("/r/.isoenv/b"), ROOTS)
            .take(3)
            .collect();
        assert_ne!(a[0], b[0]);
        for id in a.iter().chain(&b) {
            assert!((FIRST..FIRST + COUNT).contains(id));
        }
        assert_eq!(
            a[1],
            if a[0] + 1 == FIRST + COUNT {
                FIRST
            } else {
                a[0] + 1
            }
        );
    }

    #[test]
    fn a_claim_is_exclusive_until_its_environment_lets_it_go() {
        let dir = tempfile::tempdir().unwrap();
        let registry = Registry::new(dir.path().join("ids"), ROOTS);
        let (a, b) = (Path::new("/r/a"), Path::new("/r/b"));
        let still = |_: u32, _: &Path| true;
        let first = registry.claim(a, still).unwrap();
        // The same environment asking again gets its own id back.
        assert_eq!(registry.claim(a, still).unwrap(), first);
        // Another environment starting at the same place moves on.
        let file = dir.path().join("ids").join(first.to_string());
        let other = candidates(b, ROOTS).next().unwrap();
        fs::rename(&file, dir.path().join("ids").join(other.to_string())).unwrap();
        let second = registry.claim(b, still).unwrap();
        assert_ne!(second, other, "a held id was handed out twice");
        // A holder that no longer records its id gives it up.
        let gone = |_: u32, _: &Path| false;
        assert_eq!(registry.claim(b, gone).unwrap(), other);
        // A sweep frees only what no environment records.
        assert_eq!(registry.sweep(still).unwrap(), Vec::<u32>::new());
        // Releasing only removes one's own claim.
        registry.release(other, a).unwrap();
        assert!(dir.path().join("ids").join(other.to_string()).exists());
        registry.release(other, b).unwrap();
        assert!(!dir.path().join("ids").join(other.to_string()).exists());
        assert_eq!(registry.sweep(gone).unwrap(), vec![second]);
        assert_eq!(fs::read_dir(dir.path().join("ids")).unwrap().count(), 0);
    }

    #[test]
    fn a_claim_is_handed_over_only_by_its_holder() {
        let dir = tempfile::tempdir().unwrap();
        let registry = Registry::new(dir.path().join("ids"), ROOTS);
        let (spare, env, other) = (
            Path::new("/c/spares/1"),
            Path::new("/r/a"),
            Path::new("/r/b"),
        );
        let still = |_: u32, _: &Path| true;
        let id = registry.claim(spare, still).unwrap();
        assert!(!registry.transfer(id, other, env).unwrap());
        assert!(!registry.transfer(id + 1, spare, env).unwrap());
        assert!(registry.transfer(id, spare, env).unwrap());
        // Now the environment's: the spare cannot hand it over again.
        assert!(!registry.transfer(id, spare, other).unwrap());
        let file = dir.path().join("ids").join(id.to_string());
        registry.release(id, spare).unwrap();
        assert!(file.exists(), "the spare released what is no longer its");
        registry.release(id, env).unwrap();
        assert!(!file.exists());
    }
}
