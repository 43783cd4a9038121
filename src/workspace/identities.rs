//! Where each environment's servers get the identity they run as.

use std::path::{Path, PathBuf};

use crate::envfile::Vars;
use crate::sys::files::reachable;
use crate::sys::process::ServiceUser;
use crate::sys::userns::SubIds;

pub(super) enum Identities {
    /// As root: ids of isoenv's own range, claimed in the machine's registry.
    Own,
    /// Without root: the invoker's subordinate ids, claimed in the invoker's registry.
    Subordinate { ids: SubIds, registry: PathBuf },
    /// All servers run as the service user (as root, when one is configured) or as the
    /// invoker, and why that is.
    Shared(String),
}

impl Identities {
    /// Without root: subordinate ids when the invoker has them, the helpers that map them are
    /// installed, there is a place for the registry, and servers running as them can reach the
    /// state root `root`.
    pub(super) fn without_root(root: &Path, vars: &Vars) -> Self {
        if nix::unistd::geteuid().is_root() {
            return Identities::Shared(format!(
                "servers run as the configured service user `{}`",
                vars.get("ISOENV_SERVICE_USER")
                    .map(str::to_owned)
                    .or_else(|| std::env::var("SUDO_USER").ok())
                    .unwrap_or_default()
            ));
        }
        match subordinate(root) {
            Ok((ids, registry)) => Identities::Subordinate { ids, registry },
            Err(why) => Identities::Shared(format!(
                "without root, servers run as the invoker and are not kept apart from each other: {why}"
            )),
        }
    }

    /// One line for `doctor`.
    pub(super) fn describe(&self) -> String {
        match self {
            Identities::Own => format!(
                "each environment's servers run as a uid of their own ({}..)",
                crate::sys::identity::FIRST
            ),
            Identities::Subordinate { ids, .. } => format!(
                "each environment's servers run as a uid of their own, from your subordinate ids {}-{} (lightweight; the sandbox keeps environments apart by its mount namespace)",
                ids.uids.first,
                ids.uids.first + ids.uids_for_environments().count - 1
            ),
            Identities::Shared(why) => why.clone(),
        }
    }

    /// Whether servers of different environments run as different users.
    pub(super) fn apart(&self) -> bool {
        !matches!(self, Identities::Shared(_))
    }
}

fn subordinate(root: &Path) -> Result<(SubIds, PathBuf), String> {
    let ids = SubIds::of_invoker()?;
    let state = std::env::var_os("XDG_STATE_HOME")
        .map(PathBuf::from)
        .filter(|p| p.is_absolute())
        .or_else(|| {
            std::env::var_os("HOME")
                .map(|h| PathBuf::from(h).join(".local/state"))
                .filter(|p| {
                    p.is_absolute() && p.parent().and_then(Path::parent).is_some_and(Path::is_dir)
                })
        })
        .ok_or(
            "neither XDG_STATE_HOME nor HOME names a directory for the registry of claimed ids",
        )?;
    let existing = root
        .ancestors()
        .find(|p| p.exists())
        .unwrap_or(Path::new("/"));
    reachable(existing, &ServiceUser::subordinate(ids.uids.first, ids))?;
    Ok((ids, state.join("isoenv/identities")))
}
