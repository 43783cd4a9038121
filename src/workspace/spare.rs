//! Spare data directories: a ready copy of a cached initialized data directory, made in the
//! background after each `create`, so that the next `create` renames it into place (one system
//! call) instead of copying ~1,000 files on its critical path. One spare per cache entry; a
//! `create` that finds none (two in a row, or a cache on another filesystem) copies as before.

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, SystemTime};

use crate::backend::Spare;

/// A copy still being made after this long was abandoned (its copier was killed).
const ABANDONED: Duration = Duration::from_secs(600);

/// Where the spares of the cached data directory `template` (`CACHE/KEY/data`) live.
fn spares(template: &Path) -> PathBuf {
    template.with_file_name("spares")
}

/// Moves a spare into place as `dst` (which must not exist): where it was, and the owner its
/// files were given. None when there is none, or it cannot be renamed there (another
/// filesystem).
pub(super) fn take(template: &Path, dst: &Path) -> Option<Spare> {
    fs::read_dir(spares(template))
        .ok()?
        .flatten()
        .filter(|e| !e.file_name().to_string_lossy().starts_with('.'))
        .find(|e| fs::rename(e.path(), dst).is_ok())
        .map(|e| Spare {
            holder: e.path(),
            owner: fs::symlink_metadata(dst).map_or(0, |m| m.uid()),
        })
}

/// Whether `path` is a spare, made or being made: what an identity claimed for it names.
pub(super) fn is_spare(path: &Path) -> bool {
    let (Some(dir), Some(name)) = (path.parent(), path.file_name()) else {
        return false;
    };
    dir.file_name() == Some("spares".as_ref())
        && (path.exists()
            || dir
                .join(format!(".tmp-{}", name.to_string_lossy()))
                .exists())
}

/// Starts making a spare of `template` in the background, unless one is there or on its way,
/// or a spare could not be renamed into `state_root` (another filesystem). The copier is `cp`
/// (ownership, modes and links as in the cache) in its own session; a copy it leaves half-made is
/// removed by [`collect`]. `owner` may claim an identity for the spare (given its path): the
/// copy is then handed to it too, so that the create that takes it changes no owner (a
/// thousand files: 12 ms).
pub(super) fn refill(
    template: &Path,
    state_root: &Path,
    owner: impl FnOnce(&Path) -> Option<(u32, u32)>,
) {
    let dir = spares(template);
    let same_fs = |a: &Path, b: &Path| matches!((fs::metadata(a), fs::metadata(b)), (Ok(a), Ok(b)) if a.dev() == b.dev());
    if fs::create_dir_all(&dir).is_err() || !same_fs(&dir, state_root) {
        return;
    }
    let busy = fs::read_dir(&dir)
        .map(|entries| {
            entries.flatten().any(|e| {
                let name = e.file_name().to_string_lossy().into_owned();
                !name.starts_with('.') || !abandoned(&e.path())
            })
        })
        .unwrap_or(true);
    if busy {
        return;
    }
    let id = format!("{}-{:x}", std::process::id(), rand::random::<u32>());
    let tmp = dir.join(format!(".tmp-{id}"));
    let done = dir.join(id);
    // Claimed before the copy exists, which `is_spare` allows for.
    let chown = owner(&done).map_or(String::new(), |(uid, gid)| format!("{uid}:{gid}"));
    let mut cp = Command::new("sh");
    // At the lowest priority: whatever the new environment's user does next comes first.
    // Timestamps are not kept: the copy's own mtime is what tells [`collect`] it is still
    // being made (with `-a` it took the template's old one before the rename, and a collection
    // in that moment gutted a finished spare).
    cp.args([
        "-c",
        "{ nice -n 19 cp -dR --preserve=mode,ownership \"$1\" \"$2\" && { [ -z \"$4\" ] || nice -n 19 chown -hR \"$4\" \"$2\"; } && mv \"$2\" \"$3\"; } || rm -rf \"$2\"",
        "sh",
    ])
    .arg(template)
    .arg(&tmp)
    .arg(&done)
    .arg(&chown)
    .stdin(Stdio::null())
    .stdout(Stdio::null())
    .stderr(Stdio::null());
    // SAFETY: setsid is async-signal-safe and touches no state of the parent.
    unsafe {
        cp.pre_exec(|| nix::unistd::setsid().map(drop).map_err(Into::into));
    }
    // A spare is an optimisation: if it cannot be started, the next create copies.
    let _ = cp.spawn();
}

fn abandoned(path: &Path) -> bool {
    fs::metadata(path)
        .and_then(|m| m.modified())
        .map(|t| SystemTime::now().duration_since(t).unwrap_or_default() > ABANDONED)
        .unwrap_or(true)
}

/// Removes half-made spares whose copier was killed, in every cache entry under `cache`; the
/// names of what it removed.
pub(super) fn collect(cache: &Path) -> Vec<PathBuf> {
    let mut removed = Vec::new();
    for entry in fs::read_dir(cache).into_iter().flatten().flatten() {
        let dir = entry.path().join("spares");
        for spare in fs::read_dir(&dir).into_iter().flatten().flatten() {
            let path = spare.path();
            let half_made = spare.file_name().to_string_lossy().starts_with(".tmp-");
            if half_made && abandoned(&path) && crate::sys::files::remove_tree(&path).is_ok() {
                removed.push(path);
            }
        }
    }
    removed
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_spare_is_taken_once_and_half_made_ones_are_not() {
        let root = tempfile::tempdir().unwrap();
        let template = root.path().join("cache/pg-15-x/data");
        fs::create_dir_all(&template).unwrap();
        let dir = spares(&template);
        fs::create_dir_all(dir.join(".tmp-1-a")).unwrap();
        assert!(take(&template, &root.path().join("env1")).is_none());
        assert!(is_spare(&dir.join("1-a")), "a spare being made");
        fs::create_dir_all(dir.join("1-b")).unwrap();
        fs::write(dir.join("1-b/PG_VERSION"), "15").unwrap();
        assert!(is_spare(&dir.join("1-b")));
        let taken = take(&template, &root.path().join("env1")).unwrap();
        assert_eq!(taken.holder, dir.join("1-b"));
        assert_eq!(taken.owner, nix::unistd::geteuid().as_raw());
        assert!(!is_spare(&dir.join("1-b")), "taken");
        assert!(!is_spare(&root.path().join("env1")));
        assert!(root.path().join("env1/PG_VERSION").exists());
        assert!(take(&template, &root.path().join("env2")).is_none());
        // A recent half-made copy is someone's work in progress.
        assert!(collect(&root.path().join("cache")).is_empty());
    }
}
