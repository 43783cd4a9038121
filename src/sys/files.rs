//! File-tree helpers: copying an initialized data directory and handing trees to the service
//! user.

use std::fs;
use std::io;
use std::os::unix::fs::{symlink, MetadataExt, PermissionsExt};
use std::path::Path;

use crate::sys::process::{ServiceUser, Switch};

/// Copies `src` to `dst` (which must not exist) keeping modes and symlinks, owned by `owner`.
pub fn copy_tree(src: &Path, dst: &Path, owner: &ServiceUser) -> io::Result<()> {
    match owner.switch {
        // One `chown -R` in a user namespace, not one per file.
        Switch::Subordinate(_) => {
            copy_tree(src, dst, &ServiceUser::invoker())?;
            chown_tree(dst, owner)
        }
        _ => copy_entry(src, dst, owner),
    }
}

fn copy_entry(src: &Path, dst: &Path, owner: &ServiceUser) -> io::Result<()> {
    let meta = fs::symlink_metadata(src)?;
    if meta.file_type().is_symlink() {
        symlink(fs::read_link(src)?, dst)?;
    } else if meta.is_dir() {
        fs::create_dir(dst)?;
        for entry in fs::read_dir(src)? {
            let entry = entry?;
            copy_entry(&entry.path(), &dst.join(entry.file_name()), owner)?;
        }
        fs::set_permissions(dst, fs::Permissions::from_mode(meta.permissions().mode()))?;
    } else {
        fs::copy(src, dst)?;
    }
    owner.chown(dst)
}

/// Changes the owner of every entry under `path` (symlinks themselves, not their targets).
pub fn chown_tree(path: &Path, owner: &ServiceUser) -> io::Result<()> {
    match &owner.switch {
        Switch::No => return Ok(()),
        Switch::Subordinate(ids) => return ids.chown(path, owner.uid, owner.gid, true),
        Switch::Setuid => {}
    }
    owner.chown(path)?;
    if fs::symlink_metadata(path)?.is_dir() {
        for entry in fs::read_dir(path)? {
            chown_tree(&entry?.path(), owner)?;
        }
    }
    Ok(())
}

pub fn set_mode(path: &Path, mode: u32) -> io::Result<()> {
    fs::set_permissions(path, fs::Permissions::from_mode(mode))
}

/// Removes a tree if present. Without root, a tree holding files of servers that ran as the
/// invoker's subordinate ids is removed from a user namespace that maps them.
pub fn remove_tree(path: &Path) -> io::Result<()> {
    match fs::remove_dir_all(path) {
        Err(e) if e.kind() == io::ErrorKind::PermissionDenied => {
            match crate::sys::userns::SubIds::of_invoker() {
                Ok(ids) if !nix::unistd::geteuid().is_root() => ids.remove_tree(path),
                _ => Err(e),
            }
        }
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

/// Replaces `path` with `contents` in one step (write a sibling, then rename), so that readers
/// never see a half-written file.
pub fn write_atomic(path: &Path, contents: &[u8]) -> io::Result<()> {
    let name = path.file_name().unwrap_or_default().to_string_lossy();
    let tmp = path.with_file_name(format!(".{name}.tmp"));
    fs::write(&tmp, contents)?;
    fs::rename(tmp, path)
}

/// The service user must be able to traverse every directory down to the state root.
pub fn reachable(path: &Path, user: &ServiceUser) -> std::result::Result<(), String> {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copy_keeps_modes_and_symlinks() {
        let tmp = tempfile::tempdir().unwrap();
        let src = tmp.path().join("src");
        fs::create_dir_all(src.join("sub")).unwrap();
        fs::write(src.join("sub/f"), "data").unwrap();
        set_mode(&src.join("sub"), 0o700).unwrap();
        symlink("sub/f", src.join("link")).unwrap();
        let me = ServiceUser {
            name: "me".into(),
            uid: 0,
            gid: 0,
            switch: Switch::No,
        };
        copy_tree(&src, &tmp.path().join("dst"), &me).unwrap();
        let dst = tmp.path().join("dst");
        assert_eq!(fs::read_to_string(dst.join("link")).unwrap(), "data");
        assert!(fs::symlink_metadata(dst.join("link"))
            .unwrap()
            .file_type()
            .is_symlink());
        assert_eq!(
            fs::metadata(dst.join("sub")).unwrap().permissions().mode() & 0o777,
            0o700
        );
    }
}
