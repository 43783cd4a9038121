//! `cargo xtask test --isolated`: what a test run provisions and what its test command sees.
//! Pure decisions; the xtask spawns, waits and tears down.

use crate::backend::BackendKind;
use crate::config::Profile;
use crate::engine::EngineKind;

/// What one isolated test run provisions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TestPlan {
    pub backend: BackendKind,
    /// One environment per engine, named uniquely for this run.
    pub envs: Vec<(EngineKind, String)>,
}

/// Chooses the backend and names the environments. `run_id` makes names unique per run, so
/// parallel runs never collide.
pub fn plan(
    profile: Profile,
    backend: Option<BackendKind>,
    local: BackendKind,
    engines: &[EngineKind],
    run_id: &str,
) -> Result<TestPlan, String> {
    let backend = match (profile, backend) {
        (Profile::Production, _) => return Err(format!(
            "refusing to provision test databases with ENVIRONMENT=production: run the tests in development or staging, or set {SHARED_VAR} to a shared test database"
        )),
        (_, Some(BackendKind::SshTunnel)) => {
            return Err("tests need their own databases; the ssh-tunnel backend only reaches the VM's".into())
        }
        (_, Some(b)) => b,
        // Development's local backend, as `db up` uses it (WASI_USE_NAMESPACES picks sandbox).
        (Profile::Development, None) => local,
        // Staging runs every test run in containers of its own.
        (Profile::Staging, None) => BackendKind::Docker,
    };
    let mut engines = engines.to_vec();
    if engines.is_empty() {
        engines.push(EngineKind::Postgres);
    }
    engines.dedup();
    Ok(TestPlan {
        backend,
        envs: engines
            .into_iter()
            .map(|e| (e, format!("test-{run_id}-{e}")))
            .collect(),
    })
}

/// The variable that names a shared test database: the only way to run `test --isolated` in
/// production, where isoenv provisions nothing.
pub const SHARED_VAR: &str = "ISOENV_TEST_DATABASE_URL";

/// The test command's variables for an explicitly configured shared test database.
pub fn shared_env(url: &str) -> Result<Vec<(String, String)>, String> {
    let scheme = url.split_once("://").map(|(s, _)| s).unwrap_or_default();
    let engine: EngineKind = scheme
        .parse()
        .map_err(|e| format!("{SHARED_VAR}: the URL's scheme: {e}"))?;
    Ok(vec![
        (engine.engine().url_var().to_owned(), url.to_owned()),
        (url_var(engine), url.to_owned()),
    ])
}

/// The variable through which `isoenv::testing` finds a test run's server for `engine`.
pub fn url_var(engine: EngineKind) -> String {
    format!("ISOENV_{}_URL", engine.as_str().to_ascii_uppercase())
}

/// The variable that names `run --pool`'s pool for `engine` (its key, which claims name).
pub fn pool_var(engine: EngineKind) -> String {
    format!("ISOENV_{}_POOL", engine.as_str().to_ascii_uppercase())
}

/// The test command's variables: the first environment's exports (what its activate script
/// sets: `DATABASE_URL`, `DB_*`, ...) plus every environment's URL under [`url_var`].
pub fn child_env(envs: &[(EngineKind, Vec<(String, String)>)]) -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = envs.first().map(|(_, e)| e.clone()).unwrap_or_default();
    out.extend(urls(envs).map(|(engine, url)| (url_var(engine), url)));
    out
}

/// Each environment's URL, from its exports.
pub fn urls(
    envs: &[(EngineKind, Vec<(String, String)>)],
) -> impl Iterator<Item = (EngineKind, String)> + '_ {
    envs.iter().filter_map(|(engine, exports)| {
        exports
            .iter()
            .find(|(k, _)| k == "DATABASE_URL" || k == "REDIS_URL")
            .map(|(_, v)| (*engine, v.clone()))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_backend_follows_the_environment() {
        let p = plan(
            Profile::Development,
            None,
            BackendKind::Lightweight,
            &[],
            "r1",
        )
        .unwrap();
        assert_eq!(p.backend, BackendKind::Lightweight);
        assert_eq!(
            p.envs,
            vec![(EngineKind::Postgres, "test-r1-postgres".to_owned())]
        );
        assert!(plan(
            Profile::Production,
            None,
            BackendKind::Lightweight,
            &[],
            "r"
        )
        .is_err());
        assert!(plan(
            Profile::Production,
            Some(BackendKind::Lightweight),
            BackendKind::Lightweight,
            &[],
            "r"
        )
        .is_err());
        let staging = plan(Profile::Staging, None, BackendKind::Lightweight, &[], "r");
        assert_eq!(staging.unwrap().backend, BackendKind::Docker);
        let s = plan(
            Profile::Staging,
            Some(BackendKind::Lightweight),
            BackendKind::Lightweight,
            &[],
            "r",
        )
        .unwrap();
        assert_eq!(s.backend, BackendKind::Lightweight);
        assert!(plan(
            Profile::Development,
            Some(BackendKind::SshTunnel),
            BackendKind::Lightweight,
            &[],
            "r"
        )
        .is_err());
    }

    #[test]
    fn a_shared_database_is_exported_by_its_engine() {
        let env = shared_env("postgresql://u:p@db/test").unwrap();
        assert_eq!(env[0].0, "DATABASE_URL");
        assert_eq!(env[1].0, "ISOENV_POSTGRES_URL");
        assert_eq!(shared_env("redis://h/1").unwrap()[1].0, "ISOENV_REDIS_URL");
        assert!(shared_env("db.example.com")
            .unwrap_err()
            .contains(SHARED_VAR));
    }

    #[test]
    fn names_are_unique_per_run_and_engine() {
        let engines = [EngineKind::Postgres, EngineKind::Redis];
        let a = plan(
            Profile::Development,
            None,
            BackendKind::Lightweight,
            &engines,
            "a",
        )
        .unwrap();
        let b = plan(
            Profile::Development,
            None,
            BackendKind::Lightweight,
            &engines,
            "b",
        )
        .unwrap();
        let names: Vec<_> = a.envs.iter().chain(&b.envs).map(|(_, n)| n).collect();
        let mut unique = names.clone();
        unique.sort();
        unique.dedup();
        assert_eq!(names.len(), unique.len());
    }

    #[test]
    fn the_child_sees_the_first_environment_and_every_url() {
        let pg = vec![
            ("DATABASE_URL".to_owned(), "postgres://a".to_owned()),
            ("DB_PORT".to_owned(), "1".to_owned()),
        ];
        let redis = vec![("REDIS_URL".to_owned(), "redis://b".to_owned())];
        let env = child_env(&[(EngineKind::Postgres, pg), (EngineKind::Redis, redis)]);
        let get = |k: &str| env.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str());
        assert_eq!(get("DATABASE_URL"), Some("postgres://a"));
        assert_eq!(get("DB_PORT"), Some("1"));
        assert_eq!(get("ISOENV_POSTGRES_URL"), Some("postgres://a"));
        assert_eq!(get("ISOENV_REDIS_URL"), Some("redis://b"));
        assert_eq!(
            get("REDIS_URL"),
            None,
            "only the first environment's own exports"
        );
    }
}
