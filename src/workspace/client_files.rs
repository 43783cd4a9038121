//! What clients use, per environment: the engine's own files, the stored login (0600), the
//! activate script, and the connection as URL and variables.

use std::fs;

use serde::{Deserialize, Serialize};

use super::activate;
use crate::backend::EnvState;
use crate::config::{ConfigSource, DatabaseConfig, ACTIVE_ENGINE, ACTIVE_MARKER};
use crate::engine::Credentials;
use crate::error::{Error, IoContext, Result};
use crate::layout::Layout;
use crate::sys::process::ServiceUser;
use crate::sys::secret::{write_private, Secret};

/// The stored login of an environment (0600).
#[derive(Serialize, Deserialize)]
struct StoredCredentials {
    user: String,
    password: String,
    database: String,
}

/// The engine's client files, the stored login and the activate script.
pub(super) fn write(
    state: &EnvState,
    layout: &Layout,
    creds: &Credentials,
    user: &ServiceUser,
) -> std::io::Result<()> {
    state.engine.engine().configure(
        layout,
        &state.backend.backend().endpoint(state, layout),
        creds,
        user,
    )?;
    let stored = StoredCredentials {
        user: creds.user.clone(),
        password: creds.password.expose().to_owned(),
        database: creds.database.clone(),
    };
    write_private(&layout.credentials_file(), &serde_json::to_vec(&stored)?)?;
    let exports = exports(state, creds, layout);
    write_private(&layout.dotenv(), dotenv(&exports).as_bytes())?;
    write_private(
        &layout.activate(),
        activate::script(&state.name, &layout.bin, &exports).as_bytes(),
    )?;
    write_private(
        &layout.bin.join("activate.fish"),
        activate::fish(&state.name, &layout.bin, &exports).as_bytes(),
    )
}

/// The exports as a dotenv file, for direnv's `dotenv`, `docker run --env-file`, Python's
/// dotenv and [`crate::config::with_default_environment`]. Plain values stay bare (Docker
/// reads quotes literally); others are double-quoted.
fn dotenv(exports: &[(String, String)]) -> String {
    exports
        .iter()
        .map(|(key, value)| {
            let plain = value
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "_./:@?=&%+-,".contains(c));
            if plain {
                format!("{key}={value}\n")
            } else {
                let escaped = value.replace('\\', "\\\\").replace('"', "\\\"");
                format!("{key}=\"{escaped}\"\n")
            }
        })
        .collect()
}

pub(super) fn read_credentials(layout: &Layout) -> Result<Credentials> {
    let path = layout.credentials_file();
    let bytes = fs::read(&path).context(|| format!("cannot read {}", path.display()))?;
    let c: StoredCredentials = serde_json::from_slice(&bytes).map_err(|e| Error::Io {
        context: format!("cannot parse {}", path.display()),
        cause: e.into(),
    })?;
    Ok(Credentials {
        user: c.user,
        password: Secret::new(c.password),
        database: c.database,
    })
}

/// The environment as the configuration layer sees an active environment.
pub(super) fn database(state: &EnvState, creds: &Credentials) -> DatabaseConfig {
    DatabaseConfig {
        engine: state.engine,
        host: state.host.clone(),
        port: state.port,
        name: creds.database.clone(),
        user: creds.user.clone(),
        password: creds.password.clone(),
        use_vm: false,
        ssl_mode: state.backend.backend().client_tls(),
        ssl_root_cert: None,
        ssh_tunnel: None,
        source: ConfigSource::Active {
            name: state.name.clone(),
        },
    }
}

/// What the activate script exports: the URL, `DB_*` (read back by the environment config as an
/// active environment), the marker, and the engine's native variables.
pub(super) fn exports(
    state: &EnvState,
    creds: &Credentials,
    layout: &Layout,
) -> Vec<(String, String)> {
    let engine = state.engine.engine();
    let db = database(state, creds);
    let mut out: Vec<(String, String)> = vec![
        (engine.url_var().into(), db.url()),
        ("DB_HOST".into(), db.host.clone()),
        ("DB_PORT".into(), db.port.to_string()),
        ("DB_NAME".into(), db.name.clone()),
        ("DB_USER".into(), db.user.clone()),
        ("DB_PASSWORD".into(), creds.password.expose().to_owned()),
        (ACTIVE_MARKER.into(), state.name.clone()),
        (ACTIVE_ENGINE.into(), engine.kind().to_string()),
    ];
    let endpoint = state.backend.backend().endpoint(state, layout);
    out.extend(
        engine
            .native_exports(&endpoint, creds, layout)
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v)),
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dotenv_values_read_back_as_written() {
        let exports = vec![
            ("DB_PORT".to_owned(), "5432".to_owned()),
            ("PGPASSFILE".to_owned(), "/r/a b/pgpass".to_owned()),
            ("ODD".to_owned(), "x\"y\\z".to_owned()),
        ];
        let text = dotenv(&exports);
        assert!(text.starts_with("DB_PORT=5432\n"), "{text}");
        let back: Vec<(String, String)> = dotenvy::from_read_iter(text.as_bytes())
            .map(Result::unwrap)
            .collect();
        assert_eq!(back, exports);
    }
}
