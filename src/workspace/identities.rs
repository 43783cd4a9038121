//! Where each environment's servers get the identity they run as, and the registry each
//! identity is claimed in.

use std::path::{Path, PathBuf};

use crate::sys::files::reachable;
use crate::sys::identity::{self, Registry};
use crate::sys::process::ServiceUser;
use crate::sys::userns::SubIds;

/// The machine-wide registry of identities of root's range (see [`crate::sys::identity`]).
pub(super) const MACHINE_REGISTRY: &str = "/var/lib/isoenv/identities";

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
    /// `own` as root with no service user chosen; with another one chosen, that `user`.
    /// Without root: subordinate ids when the invoker has them, the helpers that map them are
    /// installed, there is a place for the registry, and servers running as them can reach the
    /// state root `root`.
    pub(super) fn decide(own: bool, user: &Result<ServiceUser, String>, root: &Path) -> Self {
        if own {
            return Identities::Own;
        }
        if nix::unistd::geteuid().is_root() {
            return Identities::Shared(match user {
                Ok(u) => format!("servers run as the configured service user `{}`", u.name),
                Err(e) => e.clone(),
            });
        }
        match subordinate(root) {
            Ok((ids, registry)) => Identities::Subordinate { ids, registry },
            Err(why) => Identities::Shared(format!(
                "without root, servers run as the invoker and are not kept apart from each other: {why}"
            )),
        }
    }

    /// Where new environments claim their identities, if they get their own.
    pub(super) fn registry(&self) -> Option<Registry> {
        match self {
            Identities::Own => Some(machine_registry()),
            Identities::Subordinate { ids, registry } => {
                Some(Registry::new(registry.clone(), ids.uids_for_environments()))
            }
            Identities::Shared(_) => None,
        }
    }

    /// Where the recorded identity `id` is claimed: the invoker's registry for one of its
    /// subordinate ids, else the machine's.
    pub(super) fn registry_of(&self, id: u32) -> Registry {
        match self {
            Identities::Subordinate { ids, .. } if ids.uids.contains(id) => self
                .registry()
                .expect("subordinate identities have a registry"),
            _ => machine_registry(),
        }
    }

    /// The user that runs as the recorded identity `id`; else why this user cannot become it.
    pub(super) fn user(&self, id: u32) -> Result<ServiceUser, String> {
        match self {
            Identities::Subordinate { ids, .. } if ids.uids.contains(id) => {
                Ok(ServiceUser::subordinate(id, *ids))
            }
            // Root can become any id, whatever identities new environments get now.
            _ if nix::unistd::geteuid().is_root() => Ok(ServiceUser::own(id)),
            other => Err(format!(
                "this environment's servers run as uid {id}, which this user cannot become now: {}; run as the user that created it, or destroy and create it again",
                match other {
                    Identities::Subordinate { ids, .. } => format!(
                        "its subordinate ids are {}-{} now",
                        ids.uids.first,
                        ids.uids.first + ids.uids.count - 1
                    ),
                    _ => other.describe(),
                }
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

fn machine_registry() -> Registry {
    Registry::new(PathBuf::from(MACHINE_REGISTRY), identity::ROOTS)
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
