//! Where the state root lives. The configured one; or, when servers could not reach the default
//! `.isoenv` (a repository under a 0700 directory, as root's home is in most CI containers), a
//! directory of its own under `/var/lib/isoenv/roots`, linked from `.isoenv` so that the
//! repository's paths keep working. Only the default moves: `WASI_SANDBOX_DIR` is taken as given.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use crate::config::SandboxSettings;
use crate::sys::files::reachable;
use crate::sys::hash::fnv1a;
use crate::sys::process::ServiceUser;

/// Where relocated state roots live.
const RELOCATED: &str = "/var/lib/isoenv/roots";

/// The state root to use, and the project's `.isoenv` to link to it when it moved.
pub(super) struct StateRoot {
    pub path: PathBuf,
    pub link: Option<PathBuf>,
}

/// `servers`: who must reach the root (a switching service user; `None` without root).
pub(super) fn locate(settings: &SandboxSettings, servers: Option<&ServiceUser>) -> StateRoot {
    let dir = &settings.dir;
    let stay = StateRoot {
        path: dir.clone(),
        link: None,
    };
    // A root linked by an earlier command is used where it points.
    if fs::symlink_metadata(dir).is_ok_and(|m| m.file_type().is_symlink()) {
        return match fs::canonicalize(dir) {
            Ok(path) => StateRoot { path, link: None },
            Err(_) => stay,
        };
    }
    let Some(user) = servers.filter(|_| settings.dir_is_default && !dir.exists()) else {
        return stay;
    };
    let Some(project) = dir.parent() else {
        return stay;
    };
    if reachable(project, user).is_ok() {
        return stay;
    }
    StateRoot {
        path: relocated(project),
        link: Some(dir.clone()),
    }
}

/// A name that says which project it is and cannot collide with another's.
fn relocated(project: &Path) -> PathBuf {
    let absolute = fs::canonicalize(project).unwrap_or_else(|_| project.to_owned());
    let name = absolute
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tag = format!(
        "{}-{:08x}",
        name.replace(|c: char| !c.is_ascii_alphanumeric(), "_"),
        fnv1a(&absolute.to_string_lossy()) as u32
    );
    Path::new(RELOCATED).join(tag)
}

/// Makes the root at `path` and, when it moved, `link` to it, with the directories isoenv made
/// for it traversable by servers.
pub(super) fn make(path: &Path, link: Option<&Path>) -> io::Result<()> {
    fs::create_dir_all(path)?;
    if let Some(link) = link {
        let ours = Path::new(RELOCATED)
            .parent()
            .unwrap_or(Path::new(RELOCATED));
        let parents = path.parent().into_iter().flat_map(Path::ancestors);
        for dir in parents.take_while(|d| d.starts_with(ours)) {
            use std::os::unix::fs::PermissionsExt;
            fs::set_permissions(dir, fs::Permissions::from_mode(0o755))?;
        }
        match std::os::unix::fs::symlink(path, link) {
            Err(e) if e.kind() != io::ErrorKind::AlreadyExists => return Err(e),
            _ => {}
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(dir: PathBuf, dir_is_default: bool) -> SandboxSettings {
        SandboxSettings {
            dir,
            dir_is_default,
            use_namespaces: false,
            memory_limit_bytes: 1 << 20,
        }
    }

    #[test]
    fn only_an_unreachable_default_root_moves() {
        use std::os::unix::fs::PermissionsExt;
        let top = tempfile::tempdir().unwrap();
        let private = top.path().join("private");
        let repo = private.join("repo");
        fs::create_dir_all(&repo).unwrap();
        fs::set_permissions(&private, fs::Permissions::from_mode(0o700)).unwrap();
        fs::set_permissions(top.path(), fs::Permissions::from_mode(0o755)).unwrap();
        let servers = ServiceUser::own(crate::sys::identity::FIRST);
        let default = settings(repo.join(".isoenv"), true);

        let moved = locate(&default, Some(&servers));
        assert!(moved.path.starts_with(RELOCATED), "{:?}", moved.path);
        assert!(moved.path.to_string_lossy().contains("repo-"));
        assert_eq!(moved.link, Some(repo.join(".isoenv")));
        // Without root nobody else runs the servers; a chosen root is used as given.
        assert_eq!(locate(&default, None).path, repo.join(".isoenv"));
        let chosen = settings(repo.join("state"), false);
        assert_eq!(locate(&chosen, Some(&servers)).path, repo.join("state"));
        // A reachable project keeps its root.
        fs::set_permissions(&private, fs::Permissions::from_mode(0o755)).unwrap();
        assert_eq!(locate(&default, Some(&servers)).path, repo.join(".isoenv"));
    }
}
