//! What isoenv may do where, and what `db up` brings up in each profile: pure decisions.

use crate::backend::BackendKind;
use crate::config::{EnvironmentConfig, Profile};
use crate::engine::EngineKind;

pub use crate::config::DEFAULT_ENV;
/// The environment that records the development VM tunnel.
pub const TUNNEL_ENV: &str = "vm";
/// The environment `cargo xtask db up` brings up in staging, in a container.
pub const STAGING_ENV: &str = "staging";

/// What a command does to environments, for the production guard.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Read,
    Create,
    Start,
    Stop,
    Destroy,
}

/// Production is guarded: isoenv only ever reads there.
pub fn allowed(profile: Profile, action: Action) -> bool {
    profile != Profile::Production || action == Action::Read
}

/// What `db up` does in each profile.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UpPlan {
    /// An environment made, or started when it exists: the local default (development), the
    /// VM's database through an SSH tunnel (development with `DB_VM_SSH_ENABLED=true`), a
    /// container (staging).
    Env {
        name: &'static str,
        engine: EngineKind,
        backend: BackendKind,
        /// `down` removes it (staging's container, like a per-run one) rather than stops it.
        removed_by_down: bool,
    },
    /// Production: verify the configured database, change nothing.
    VerifyProduction,
}

/// Development's local backend: the namespace sandbox with `WASI_USE_NAMESPACES=true`.
pub fn local_backend(config: &EnvironmentConfig) -> BackendKind {
    if config.sandbox().use_namespaces {
        BackendKind::Sandbox
    } else {
        BackendKind::Lightweight
    }
}

pub fn plan_up(config: &EnvironmentConfig) -> UpPlan {
    let env = |name, backend, removed_by_down| UpPlan::Env {
        name,
        engine: EngineKind::Postgres,
        backend,
        removed_by_down,
    };
    match config.profile() {
        Profile::Development if config.database_config().ssh_tunnel.is_some() => {
            env(TUNNEL_ENV, BackendKind::SshTunnel, false)
        }
        Profile::Development => env(DEFAULT_ENV, local_backend(config), false),
        Profile::Staging => env(STAGING_ENV, BackendKind::Docker, true),
        Profile::Production => UpPlan::VerifyProduction,
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::envfile::Vars;

    fn config(pairs: &[(&str, &str)]) -> EnvironmentConfig {
        EnvironmentConfig::from_vars(&Vars::from_pairs(pairs.iter().copied()), Path::new("/p"))
            .unwrap()
    }

    #[test]
    fn production_only_reads() {
        for action in [Action::Create, Action::Start, Action::Stop, Action::Destroy] {
            assert!(!allowed(Profile::Production, action));
            assert!(allowed(Profile::Development, action));
            assert!(allowed(Profile::Staging, action));
        }
        assert!(allowed(Profile::Production, Action::Read));
    }

    #[test]
    fn up_plans() {
        let env = |name, backend, removed_by_down| UpPlan::Env {
            name,
            engine: EngineKind::Postgres,
            backend,
            removed_by_down,
        };
        assert_eq!(
            plan_up(&config(&[])),
            env("dev", BackendKind::Lightweight, false)
        );
        assert_eq!(
            plan_up(&config(&[("WASI_USE_NAMESPACES", "true")])),
            env("dev", BackendKind::Sandbox, false)
        );
        assert_eq!(
            plan_up(&config(&[("DB_VM_SSH_ENABLED", "true")])),
            env("vm", BackendKind::SshTunnel, false)
        );
        assert_eq!(
            plan_up(&config(&[("ENVIRONMENT", "staging")])),
            env("staging", BackendKind::Docker, true)
        );
        let prod = [
            ("ENVIRONMENT", "production"),
            ("DB_PROD_HOST", "h"),
            ("DB_PROD_NAME", "n"),
            ("DB_PROD_USER", "u"),
            ("DB_PROD_PASSWORD", "p"),
        ];
        assert_eq!(plan_up(&config(&prod)), UpPlan::VerifyProduction);
    }
}
