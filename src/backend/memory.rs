//! Data directories in memory, for disposable local servers (a test run's) of the engines that
//! gain from it ([`crate::engine::Engine::data_in_memory`]): their data dies with the run, so
//! the disk is only a cost. On an ext4 disk a MariaDB pool reset's
//! `ALTER TABLE ... AUTO_INCREMENT`s spend half their time renaming `.frm` files.
//!
//! The environment's `data` is a link to `/dev/shm/isoenv-UID/KEY/data`, made before its
//! target, and `KEY/env` names the environment's directory: whatever removes the environment
//! removes the target first ([`release`]), and a target whose environment no longer links to it
//! (the state root deleted by hand) is a stray ([`strays`]). A reboot empties `/dev/shm`, and no
//! test run takes on a server from before one.

use std::fs;
use std::io;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use nix::fcntl::{renameat2, RenameFlags};

use crate::envfile::Vars;
use crate::sys::files::{copy_tree, remove_tree};
use crate::sys::hash::fnv1a;
use crate::sys::process::{named_by, stop_working_in, ProcessId, ServiceUser};

/// `memory` (the default, where possible) or `disk`.
pub const VAR: &str = "ISOENV_TEST_DATA";
/// Where memory is a filesystem on Linux.
const SHM: &str = "/dev/shm";
/// Less free memory than this in `/dev/shm` and test servers keep their data on disk.
const MIN_FREE: u64 = 1 << 30;
/// The file in a target's directory that names its environment's directory.
const ENV_FILE: &str = "env";
/// How a target's directory is named while [`link`] makes it: `.new-KEY-PID`.
const NEW: &str = ".new-";

/// What `/dev/shm` offers.
#[derive(Debug, Clone, Copy)]
pub struct Shm {
    pub tmpfs: bool,
    pub free: u64,
}

/// Whether a disposable server's data goes to memory, for the setting of [`VAR`] and what
/// `/dev/shm` offers. Asked for explicitly, memory that cannot be had is an error; by default
/// the disk is the fallback.
pub fn wanted(setting: Option<&str>, shm: Option<Shm>) -> Result<bool, String> {
    let possible = match shm {
        None => Err(format!("{SHM} does not exist")),
        Some(s) if !s.tmpfs => Err(format!("{SHM} is not a tmpfs")),
        Some(s) if s.free < MIN_FREE => Err(format!(
            "{SHM} has {} MiB free, less than {} MiB",
            s.free >> 20,
            MIN_FREE >> 20
        )),
        Some(_) => Ok(()),
    };
    match setting {
        None => Ok(possible.is_ok()),
        Some("disk") => Ok(false),
        Some("memory") => possible
            .map(|()| true)
            .map_err(|why| format!("{VAR}=memory, but {why}: free some memory, or set {VAR}=disk")),
        Some(other) => Err(format!("{VAR}={other}: use `memory` or `disk`")),
    }
}

/// Where this user's data directories in memory go, when a disposable server's data goes to
/// memory here; the reason when it was asked for and cannot.
pub fn place(vars: &Vars) -> Result<Option<PathBuf>, String> {
    if !wanted(vars.get(VAR), shm())? {
        return Ok(None);
    }
    let root = root();
    match own_dir(&root) {
        Ok(()) => Ok(Some(root)),
        Err(e) if vars.get(VAR).is_some() => Err(format!("{VAR}=memory: {}: {e}", root.display())),
        Err(_) => Ok(None),
    }
}

fn shm() -> Option<Shm> {
    let fs = nix::sys::statfs::statfs(SHM).ok()?;
    let vfs = nix::sys::statvfs::statvfs(SHM).ok()?;
    Some(Shm {
        tmpfs: fs.filesystem_type() == nix::sys::statfs::TMPFS_MAGIC,
        free: vfs.blocks_available() as u64 * vfs.fragment_size() as u64,
    })
}

/// `/dev/shm/isoenv-UID`: this user's, so that no other user can put a link where a data
/// directory goes.
fn root() -> PathBuf {
    Path::new(SHM).join(format!("isoenv-{}", nix::unistd::geteuid()))
}

/// Makes `dir` (in a world-writable, sticky directory) or checks that the one there is a real
/// directory of this user's that nobody else can write to. Servers (other users) may pass
/// through it, not list it.
fn own_dir(dir: &Path) -> io::Result<()> {
    match fs::DirBuilder::new().mode(0o711).create(dir) {
        Err(e) if e.kind() != io::ErrorKind::AlreadyExists => return Err(e),
        _ => {}
    }
    let meta = fs::symlink_metadata(dir)?;
    if !meta.is_dir() || meta.uid() != nix::unistd::geteuid().as_raw() || meta.mode() & 0o022 != 0 {
        return Err(io::Error::other(format!(
            "{} is not a directory of this user's that only it can write to; remove it",
            dir.display()
        )));
    }
    fs::set_permissions(dir, fs::Permissions::from_mode(0o711))
}

/// Links `data` (in the environment's directory `env`, just made) to a new directory in `root`
/// and returns where the data goes (not made yet: the caller copies it there). What is there
/// already was an earlier environment's of the same path, whose directory went without it (a
/// state root deleted by hand, a temporary directory cleaned): stopped and removed.
pub fn link(root: &Path, env: &Path, data: &Path) -> io::Result<PathBuf> {
    let name = env.file_name().unwrap_or_default().to_string_lossy();
    let key = format!("{name}-{:016x}", fnv1a(&env.to_string_lossy()));
    let dir = root.join(key);
    let target = dir.join("data");
    if fs::symlink_metadata(&dir).is_ok() {
        discard(&dir)?;
    }
    // The link first: a target exists only where a link already points to it. The directory
    // appears with the file naming its environment in it (made aside, then renamed), so that
    // no `db gc` takes it for a stray meanwhile.
    std::os::unix::fs::symlink(&target, data)?;
    let new = root.join(format!(
        "{NEW}{}-{}",
        dir.file_name().unwrap_or_default().to_string_lossy(),
        std::process::id()
    ));
    fs::DirBuilder::new().mode(0o711).create(&new)?;
    fs::write(new.join(ENV_FILE), env.as_os_str().as_encoded_bytes())?;
    fs::rename(&new, &dir)?;
    Ok(target)
}

/// Where `data` keeps its files in memory: the target of its link, when it is one of ours.
pub fn linked(data: &Path) -> Option<PathBuf> {
    let target = fs::read_link(data).ok()?;
    let dir = target.parent()?;
    // `file_name` is None for `..`: the link names a directory right in ours, never ours itself.
    dir.file_name()?;
    (dir.parent()? == root() && target.file_name()? == "data").then_some(target)
}

/// Removes the directory in memory that `data` links to, if any. The link stays (what removes
/// the environment's directory removes it).
pub fn release(data: &Path) -> io::Result<()> {
    match linked(data).as_deref().and_then(Path::parent) {
        Some(dir) => remove_tree(dir),
        None => Ok(()),
    }
}

/// Moves the data `data` links to in memory onto the disk, owned by `user` (the server stopped):
/// for an environment that is made permanent. The copy and the link swap places in one step.
pub fn to_disk(data: &Path, user: &ServiceUser) -> io::Result<()> {
    let Some(target) = linked(data) else {
        return Ok(());
    };
    let copy = data.with_file_name(".data-to-disk");
    remove_tree(&copy)?;
    copy_tree(&target, &copy, user)?;
    renameat2(None, &copy, None, data, RenameFlags::RENAME_EXCHANGE)?;
    release(&copy)?;
    fs::remove_file(&copy)
}

/// Stops what works in a directory in memory that nothing accounts for (servers move into
/// their data) and removes it.
pub fn discard(dir: &Path) -> io::Result<()> {
    stop_working_in(dir);
    remove_tree(dir)
}

/// This user's directories in memory whose environment no longer links to them, and those a
/// killed [`link`] left half-made.
pub fn strays() -> Vec<PathBuf> {
    let Ok(entries) = fs::read_dir(root()) else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            named_by(&name, NEW).map_or(true, |(_, pid)| {
                ProcessId::of(pid).map_or(true, |p| !p.is_alive())
            })
        })
        .map(|e| e.path())
        .filter(|dir| {
            let env = fs::read(dir.join(ENV_FILE)).ok();
            let env = env.map(|e| PathBuf::from(String::from_utf8_lossy(&e).into_owned()));
            env.and_then(|e| linked(&e.join("data"))).as_deref() != Some(&dir.join("data"))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const ROOMY: Shm = Shm {
        tmpfs: true,
        free: 8 << 30,
    };

    #[test]
    fn memory_is_the_default_where_there_is_room() {
        assert_eq!(wanted(None, Some(ROOMY)), Ok(true));
        assert_eq!(wanted(Some("memory"), Some(ROOMY)), Ok(true));
        assert_eq!(wanted(Some("disk"), Some(ROOMY)), Ok(false));
        let small = Shm {
            free: 64 << 20,
            ..ROOMY
        };
        let disk = Shm {
            tmpfs: false,
            ..ROOMY
        };
        for shm in [Some(small), Some(disk), None] {
            assert_eq!(wanted(None, shm), Ok(false), "{shm:?}");
            let e = wanted(Some("memory"), shm).unwrap_err();
            assert!(e.contains("set ISOENV_TEST_DATA=disk"), "{e}");
        }
        assert!(wanted(Some("ram"), Some(ROOMY))
            .unwrap_err()
            .contains("`memory` or `disk`"));
    }

    #[test]
    fn an_environment_made_again_at_the_same_path_gets_fresh_memory() {
        let tmp = tempfile::tempdir().unwrap();
        let root = root();
        own_dir(&root).unwrap();
        let env = tmp.path().join("run-mysql-0");
        fs::create_dir(&env).unwrap();
        let first = link(&root, &env, &env.join("data")).unwrap();
        fs::create_dir(&first).unwrap();
        fs::write(first.join("left"), "").unwrap();
        // The state root deleted by hand, then the environment made again.
        fs::remove_dir_all(&env).unwrap();
        assert_eq!(
            strays().iter().filter(|d| d.join("data") == first).count(),
            1
        );
        fs::create_dir(&env).unwrap();
        let second = link(&root, &env, &env.join("data")).unwrap();
        assert_eq!(second, first);
        assert!(!first.join("left").exists(), "the old data is gone");
        assert!(!strays().iter().any(|d| d.join("data") == first));
        release(&env.join("data")).unwrap();
        assert!(!first.parent().unwrap().exists());
    }

    #[test]
    fn only_links_into_our_directory_count() {
        let tmp = tempfile::tempdir().unwrap();
        let data = tmp.path().join("data");
        std::os::unix::fs::symlink("/etc", &data).unwrap();
        assert_eq!(linked(&data), None, "not in /dev/shm/isoenv-UID");
        assert_eq!(release(&data).ok(), Some(()));
        assert!(Path::new("/etc").exists());
        let ours = root().join("x").join("data");
        let other = tmp.path().join("other");
        std::os::unix::fs::symlink(&ours, &other).unwrap();
        assert_eq!(linked(&other), Some(ours));
        let up = tmp.path().join("up");
        std::os::unix::fs::symlink(root().join("..").join("data"), &up).unwrap();
        assert_eq!(linked(&up), None, "not our directory itself");
    }
}
