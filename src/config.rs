//! Environment configuration: the Rust counterpart of the seed's `environment_config.py`.
//!
//! Resolution is a pure function of a [`Vars`] map (process environment > `.env` > defaults), so
//! every rule here is unit-tested without touching the process environment.

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::engine::EngineKind;
use crate::envfile::Vars;
use crate::sys::bytes::parse_memory;
use crate::sys::secret::Secret;

/// Set by an activate script, with `DB_HOST`, `DB_PORT`, ...: that environment takes precedence.
pub const ACTIVE_MARKER: &str = "ISOENV_ACTIVE";
/// Set by [`with_default_environment`]: development's default environment, read from its
/// dotenv file.
pub const DEFAULT_MARKER: &str = "ISOENV_DEFAULT";

/// The environment `db up` makes in development.
pub const DEFAULT_ENV: &str = "dev";

/// The variables of an environment's dotenv file that make up its connection.
const CONNECTION: [&str; 6] = [
    "DB_HOST",
    "DB_PORT",
    "DB_NAME",
    "DB_USER",
    "DB_PASSWORD",
    ACTIVE_ENGINE,
];

/// `vars` with development's default environment (`dev`, which `db up` makes) added, when it
/// exists and nothing else decides: development, no activated environment, no SSH tunnel. Its
/// connection comes from its dotenv file (`STATE_ROOT/dev/dotenv`), so that an application
/// reading its configuration without an activated shell gets the database `db up` made. `root`
/// is the project root (the state root defaults to `.isoenv` there). Variables already set win.
pub fn with_default_environment(vars: Vars, root: &Path) -> Vars {
    let development = matches!(vars.get("ENVIRONMENT"), None | Some("development"));
    let tunnel = vars.get("DB_VM_SSH_ENABLED").is_some_and(|v| v == "true");
    if !development || tunnel || vars.get(ACTIVE_MARKER).is_some() {
        return vars;
    }
    let state = vars
        .get("WASI_SANDBOX_DIR")
        .map_or_else(|| root.join(".isoenv"), |d| root.join(d));
    let file = crate::envfile::EnvFile::Explicit(state.join(DEFAULT_ENV).join("dotenv"));
    let Ok(default) = Vars::load(&file, std::iter::empty()) else {
        return vars;
    };
    let missing: Vec<(&str, String)> = CONNECTION
        .iter()
        .filter(|key| vars.get(key).is_none())
        .filter_map(|key| Some((*key, default.get(key)?.to_owned())))
        .collect();
    missing
        .into_iter()
        .fold(vars.with(DEFAULT_MARKER, DEFAULT_ENV), |v, (k, value)| {
            v.with(k, value)
        })
}

/// Set by an activate script: the active environment's engine.
pub const ACTIVE_ENGINE: &str = "ISOENV_ENGINE";

/// What `ENVIRONMENT` selects. Called a profile in isoenv's code and documentation, so that
/// "environment" always means one isolated database that isoenv made.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Profile {
    Development,
    Staging,
    Production,
}

impl Profile {
    pub const ALL: [Profile; 3] = [Profile::Development, Profile::Staging, Profile::Production];

    pub fn as_str(self) -> &'static str {
        match self {
            Profile::Development => "development",
            Profile::Staging => "staging",
            Profile::Production => "production",
        }
    }
}

impl fmt::Display for Profile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Profile {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Profile::ALL
            .into_iter()
            .find(|e| e.as_str() == s)
            .ok_or_else(|| {
                format!("unknown environment `{s}`; valid values: development, staging, production")
            })
    }
}

/// libpq's `sslmode` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SslMode {
    Disable,
    Allow,
    Prefer,
    Require,
    VerifyCa,
    VerifyFull,
}

impl SslMode {
    const ALL: [SslMode; 6] = [
        SslMode::Disable,
        SslMode::Allow,
        SslMode::Prefer,
        SslMode::Require,
        SslMode::VerifyCa,
        SslMode::VerifyFull,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            SslMode::Disable => "disable",
            SslMode::Allow => "allow",
            SslMode::Prefer => "prefer",
            SslMode::Require => "require",
            SslMode::VerifyCa => "verify-ca",
            SslMode::VerifyFull => "verify-full",
        }
    }

    /// Whether the connection is refused when TLS cannot be negotiated.
    pub fn requires_tls(self) -> bool {
        matches!(
            self,
            SslMode::Require | SslMode::VerifyCa | SslMode::VerifyFull
        )
    }
}

impl fmt::Display for SslMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The SSH hop to the development VM's database.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SshTunnel {
    pub host: String,
    pub port: u16,
    pub user: String,
    pub key: Option<PathBuf>,
    /// Where host keys are checked and learnt (default: `known_hosts` in the state root).
    pub known_hosts: Option<PathBuf>,
    /// Refuse a host whose key is not already known (default: learn it on first use).
    pub strict_host_keys: bool,
}

/// Where a [`DatabaseConfig`] came from, for messages.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum ConfigSource {
    /// `DB_VM_*`, `DB_STAGING_*` or `DB_PROD_*`.
    Variables { prefix: &'static str },
    /// An environment exported by an isoenv activate script.
    Active { name: String },
    /// Development's default environment (`db up` made it), read from its dotenv file because
    /// no shell was activated.
    Default { name: String },
}

impl fmt::Display for ConfigSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ConfigSource::Variables { prefix } => write!(f, "{prefix}* variables"),
            ConfigSource::Active { name } => write!(f, "active isoenv environment `{name}`"),
            ConfigSource::Default { name } => {
                write!(f, "isoenv environment `{name}`, development's default")
            }
        }
    }
}

/// A database connection. `Debug` shows no password (see [`Secret`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DatabaseConfig {
    pub engine: EngineKind,
    pub host: String,
    pub port: u16,
    pub name: String,
    pub user: String,
    pub password: Secret,
    pub use_vm: bool,
    pub ssl_mode: SslMode,
    pub ssl_root_cert: Option<PathBuf>,
    pub ssh_tunnel: Option<SshTunnel>,
    pub source: ConfigSource,
}

impl DatabaseConfig {
    /// The connection URL with the password, percent-encoded. Print it only when asked.
    pub fn url(&self) -> String {
        self.url_with(Some(self.password.expose()))
    }

    /// The connection URL without the password: safe to print.
    pub fn redacted_url(&self) -> String {
        self.url_with(None)
    }

    fn url_with(&self, password: Option<&str>) -> String {
        use percent_encoding::{utf8_percent_encode, NON_ALPHANUMERIC};
        let enc = |s: &str| utf8_percent_encode(s, NON_ALPHANUMERIC).to_string();
        let userinfo = match (self.user.as_str(), password.filter(|p| !p.is_empty())) {
            ("", None) => String::new(),
            (user, None) => format!("{}@", enc(user)),
            (user, Some(pw)) => format!("{}:{}@", enc(user), enc(pw)),
        };
        let host = if self.host.contains(':') {
            format!("[{}]", self.host)
        } else {
            self.host.clone()
        };
        let mut url = format!(
            "{}://{userinfo}{host}:{}/{}",
            self.engine.url_scheme(),
            self.port,
            enc(&self.name)
        );
        if self.engine == EngineKind::Postgres && self.ssl_mode != SslMode::Prefer {
            url.push_str(&format!("?sslmode={}", self.ssl_mode));
        }
        url
    }
}

impl fmt::Display for DatabaseConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.redacted_url())
    }
}

/// Settings of the isolation backends.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SandboxSettings {
    /// The state root (`WASI_SANDBOX_DIR`, default `.isoenv` under the project root).
    pub dir: PathBuf,
    /// Whether `dir` is the default (no `WASI_SANDBOX_DIR`), which isoenv may relocate.
    pub dir_is_default: bool,
    pub use_namespaces: bool,
    pub memory_limit_bytes: u64,
}

pub const DEFAULT_MEMORY_LIMIT: u64 = 512 * 1024 * 1024;

/// One configuration problem: which variable, what is wrong, how to fix it. Never a value that
/// could be a password.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Problem {
    pub variable: String,
    pub message: String,
    pub fix: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {} (fix: {})", self.variable, self.message, self.fix)
    }
}

#[derive(Debug, thiserror::Error)]
pub struct ConfigError {
    pub problems: Vec<Problem>,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "invalid configuration ({} problem", self.problems.len())?;
        f.write_str(if self.problems.len() == 1 { ")" } else { "s)" })?;
        for p in &self.problems {
            write!(f, "\n  - {p}")?;
        }
        Ok(())
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EnvironmentConfig {
    environment: Profile,
    database: DatabaseConfig,
    sandbox: SandboxSettings,
}

impl EnvironmentConfig {
    /// What an application uses: `.env` at the project `root` (optional), the process
    /// environment over it, and in development the default environment `db up` made
    /// ([`with_default_environment`]).
    pub fn load(root: &Path) -> crate::Result<Self> {
        let process = std::env::vars_os()
            .filter_map(|(k, v)| Some((k.into_string().ok()?, v.into_string().ok()?)));
        let vars = Vars::load(&crate::EnvFile::Default(root.join(".env")), process)?;
        let vars = with_default_environment(vars, root);
        Ok(Self::from_vars(&vars, root)?)
    }

    /// Resolves the configuration. `root` anchors relative paths (the project root). Every
    /// problem is reported at once.
    pub fn from_vars(vars: &Vars, root: &Path) -> Result<Self, ConfigError> {
        let mut r = Reader {
            vars,
            root,
            problems: Vec::new(),
        };
        let environment = match vars.get("ENVIRONMENT").map(str::parse::<Profile>) {
            None => Some(Profile::Development),
            Some(Ok(env)) => Some(env),
            Some(Err(message)) => {
                r.problem(
                    "ENVIRONMENT",
                    message,
                    "set ENVIRONMENT to development, staging or production",
                );
                None
            }
        };
        let chosen = r.path("WASI_SANDBOX_DIR");
        let sandbox = SandboxSettings {
            dir_is_default: chosen.is_none(),
            dir: chosen.unwrap_or_else(|| root.join(".isoenv")),
            use_namespaces: r.bool("WASI_USE_NAMESPACES", false),
            memory_limit_bytes: r.memory("WASI_MEMORY_LIMIT"),
        };
        let database = environment.map(|env| r.database(env));
        match (environment, database) {
            (Some(environment), Some(database)) if r.problems.is_empty() => Ok(EnvironmentConfig {
                environment,
                database,
                sandbox,
            }),
            _ => Err(ConfigError {
                problems: r.problems,
            }),
        }
    }

    pub fn profile(&self) -> Profile {
        self.environment
    }
    pub fn is_dev(&self) -> bool {
        self.environment == Profile::Development
    }
    pub fn is_staging(&self) -> bool {
        self.environment == Profile::Staging
    }
    pub fn is_prod(&self) -> bool {
        self.environment == Profile::Production
    }
    pub fn database_config(&self) -> &DatabaseConfig {
        &self.database
    }
    pub fn sandbox(&self) -> &SandboxSettings {
        &self.sandbox
    }

    /// Problems that do not stop resolution but will stop a workflow later (files that do not
    /// exist, credentials that are empty). Reported all at once, like resolution errors.
    pub fn validate(&self) -> Vec<Problem> {
        let mut out = Vec::new();
        let db = &self.database;
        let mut warn = |variable: &str, message: String, fix: &str| {
            out.push(Problem {
                variable: variable.into(),
                message,
                fix: fix.into(),
            })
        };
        if let Some(key) = db.ssh_tunnel.as_ref().and_then(|t| t.key.as_ref()) {
            if !key.exists() {
                warn(
                    "DB_VM_SSH_KEY",
                    format!("key file {} does not exist", key.display()),
                    "point DB_VM_SSH_KEY at the private key for the VM",
                );
            }
        }
        if let Some(cert) = &db.ssl_root_cert {
            if !cert.exists() {
                warn(
                    "DB_PROD_SSL_ROOT_CERT",
                    format!("CA file {} does not exist", cert.display()),
                    "point DB_PROD_SSL_ROOT_CERT at the CA certificate that signed the server's",
                );
            }
        }
        if let ConfigSource::Variables { prefix } = db.source {
            if db.password.is_empty() && self.environment != Profile::Production {
                warn(
                    &format!("{prefix}PASSWORD"),
                    "empty: the database must allow password-less logins".into(),
                    &format!("set {prefix}PASSWORD in .env"),
                );
            }
        }
        out
    }
}

/// Reads typed values from [`Vars`], collecting every problem instead of stopping at the first.
struct Reader<'a> {
    vars: &'a Vars,
    root: &'a Path,
    problems: Vec<Problem>,
}

impl Reader<'_> {
    fn problem(&mut self, variable: &str, message: impl Into<String>, fix: impl Into<String>) {
        self.problems.push(Problem {
            variable: variable.into(),
            message: message.into(),
            fix: fix.into(),
        });
    }

    fn string(&self, key: &str, default: &str) -> String {
        self.vars.get(key).unwrap_or(default).to_owned()
    }

    fn required(&mut self, key: &str, env: Profile) -> String {
        match self.vars.get(key) {
            Some(v) => v.to_owned(),
            None => {
                self.problem(
                    key,
                    format!("required in {env} (no default is used there)"),
                    format!("set {key} in .env or the environment"),
                );
                String::new()
            }
        }
    }

    fn port(&mut self, key: &str, default: u16) -> u16 {
        match self.vars.get(key) {
            None => default,
            Some(v) => match v.parse::<u16>() {
                Ok(p) if p > 0 => p,
                _ => {
                    self.problem(
                        key,
                        format!("`{v}` is not a port"),
                        "use a number from 1 to 65535",
                    );
                    default
                }
            },
        }
    }

    fn bool(&mut self, key: &str, default: bool) -> bool {
        match self.vars.get(key).map(str::to_ascii_lowercase).as_deref() {
            None => default,
            Some("1" | "true" | "yes" | "on") => true,
            Some("0" | "false" | "no" | "off") => false,
            Some(v) => {
                let v = v.to_owned();
                self.problem(key, format!("`{v}` is not a boolean"), "use true or false");
                default
            }
        }
    }

    fn path(&self, key: &str) -> Option<PathBuf> {
        self.vars.get(key).map(|p| self.root.join(p))
    }

    fn memory(&mut self, key: &str) -> u64 {
        match self.vars.get(key) {
            None => DEFAULT_MEMORY_LIMIT,
            Some(v) => parse_memory(v).unwrap_or_else(|message| {
                self.problem(
                    key,
                    message,
                    "use bytes or a number with K, M or G, e.g. 512M or 1G",
                );
                DEFAULT_MEMORY_LIMIT
            }),
        }
    }

    fn ssl_mode(&mut self, key: &str, default: SslMode) -> SslMode {
        match self.vars.get(key) {
            None => default,
            Some(v) => SslMode::ALL
                .into_iter()
                .find(|m| m.as_str() == v)
                .unwrap_or_else(|| {
                    self.problem(
                        key,
                        format!("unknown ssl mode `{v}`"),
                        "use disable, allow, prefer, require, verify-ca or verify-full",
                    );
                    default
                }),
        }
    }

    fn database(&mut self, env: Profile) -> DatabaseConfig {
        if let Some(name) = self.vars.get(ACTIVE_MARKER).map(str::to_owned) {
            if env == Profile::Production {
                self.problem(
                    ACTIVE_MARKER,
                    format!("isoenv environment `{name}` is active while ENVIRONMENT=production"),
                    "run `deactivate` first: production never uses a sandbox",
                );
            } else {
                return self.active(name);
            }
        }
        let default = self.vars.get(DEFAULT_MARKER).map(str::to_owned);
        match env {
            Profile::Development if default.is_some() && !self.bool("DB_VM_SSH_ENABLED", false) => {
                let name = default.unwrap_or_default();
                DatabaseConfig {
                    source: ConfigSource::Default { name: name.clone() },
                    ..self.active(name)
                }
            }
            Profile::Development => {
                let ssh_enabled = self.bool("DB_VM_SSH_ENABLED", false);
                let ssh_tunnel = ssh_enabled.then(|| SshTunnel {
                    host: self.string("DB_VM_SSH_HOST", "localhost"),
                    port: self.port("DB_VM_SSH_PORT", 22),
                    user: self.string("DB_VM_SSH_USER", "vagrant"),
                    key: self.path("DB_VM_SSH_KEY"),
                    known_hosts: self.path("DB_VM_SSH_KNOWN_HOSTS"),
                    strict_host_keys: self.bool("DB_VM_SSH_STRICT_HOST_KEYS", false),
                });
                DatabaseConfig {
                    use_vm: true,
                    ssh_tunnel,
                    ..self.plain("DB_VM_", SslMode::Prefer)
                }
            }
            Profile::Staging => self.plain("DB_STAGING_", SslMode::Prefer),
            Profile::Production => {
                let prefix = "DB_PROD_";
                let mut db = self.plain(prefix, SslMode::Require);
                for (key, field) in [
                    ("HOST", &mut db.host),
                    ("NAME", &mut db.name),
                    ("USER", &mut db.user),
                ] {
                    *field = self.required(&format!("{prefix}{key}"), env);
                }
                db.password = Secret::new(self.required("DB_PROD_PASSWORD", env));
                if !db.ssl_mode.requires_tls() {
                    self.problem(
                        "DB_PROD_SSL_MODE",
                        format!(
                            "`{}` allows unencrypted connections to production",
                            db.ssl_mode
                        ),
                        "use require, verify-ca or verify-full",
                    );
                }
                if matches!(db.ssl_mode, SslMode::VerifyCa | SslMode::VerifyFull)
                    && db.ssl_root_cert.is_none()
                {
                    self.problem(
                        "DB_PROD_SSL_ROOT_CERT",
                        format!("required with DB_PROD_SSL_MODE={}", db.ssl_mode),
                        "set it to the CA certificate that signed the server's",
                    );
                }
                db
            }
        }
    }

    /// `{prefix}HOST`, `PORT`, `NAME`, `USER`, `PASSWORD`, `SSL_MODE`, `SSL_ROOT_CERT`.
    fn plain(&mut self, prefix: &'static str, ssl_default: SslMode) -> DatabaseConfig {
        DatabaseConfig {
            engine: EngineKind::Postgres,
            host: self.string(&format!("{prefix}HOST"), "localhost"),
            port: self.port(&format!("{prefix}PORT"), 5432),
            name: self.string(&format!("{prefix}NAME"), "postgres"),
            user: self.string(&format!("{prefix}USER"), "postgres"),
            password: Secret::new(self.string(&format!("{prefix}PASSWORD"), "")),
            use_vm: false,
            ssl_mode: self.ssl_mode(&format!("{prefix}SSL_MODE"), ssl_default),
            ssl_root_cert: self.path(&format!("{prefix}SSL_ROOT_CERT")),
            ssh_tunnel: None,
            source: ConfigSource::Variables { prefix },
        }
    }

    fn active(&mut self, name: String) -> DatabaseConfig {
        let engine = match self.vars.get(ACTIVE_ENGINE) {
            None => EngineKind::Postgres,
            Some(e) => e.parse().unwrap_or_else(|message: String| {
                self.problem(
                    ACTIVE_ENGINE,
                    message,
                    "re-source the environment's bin/activate",
                );
                EngineKind::Postgres
            }),
        };
        if self.vars.get("DB_PORT").is_none() {
            self.problem(
                "DB_PORT",
                format!("{ACTIVE_MARKER}={name} is set but DB_PORT is not"),
                "re-source the environment's bin/activate, or run `deactivate`",
            );
        }
        DatabaseConfig {
            engine,
            host: self.string("DB_HOST", "127.0.0.1"),
            port: self.port("DB_PORT", engine.default_port()),
            name: self.string("DB_NAME", ""),
            user: self.string("DB_USER", ""),
            password: Secret::new(self.string("DB_PASSWORD", "")),
            use_vm: false,
            ssl_mode: self.ssl_mode("DB_SSL_MODE", SslMode::Disable),
            ssl_root_cert: None,
            ssh_tunnel: None,
            source: ConfigSource::Active { name },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn resolve(pairs: &[(&str, &str)]) -> Result<EnvironmentConfig, ConfigError> {
        EnvironmentConfig::from_vars(&Vars::from_pairs(pairs.iter().copied()), Path::new("/proj"))
    }

    fn problems(pairs: &[(&str, &str)]) -> Vec<String> {
        resolve(pairs)
            .unwrap_err()
            .problems
            .into_iter()
            .map(|p| p.variable)
            .collect()
    }

    const PROD: &[(&str, &str)] = &[
        ("ENVIRONMENT", "production"),
        ("DB_PROD_HOST", "db.internal"),
        ("DB_PROD_NAME", "app"),
        ("DB_PROD_USER", "app"),
        ("DB_PROD_PASSWORD", "s3cret!"),
    ];

    #[test]
    fn defaults_to_development_over_the_vm_variables() {
        let c = resolve(&[]).unwrap();
        assert!(c.is_dev() && !c.is_staging() && !c.is_prod());
        let db = c.database_config();
        assert!(db.use_vm);
        assert_eq!((db.host.as_str(), db.port), ("localhost", 5432));
        assert_eq!(db.ssh_tunnel, None);
        assert_eq!(c.sandbox().dir, Path::new("/proj/.isoenv"));
        assert_eq!(c.sandbox().memory_limit_bytes, 512 << 20);
        assert!(!c.sandbox().use_namespaces);
    }

    #[test]
    fn each_environment_reads_its_own_variables() {
        type Row<'a> = (&'a [(&'a str, &'a str)], &'a str, u16, bool, SslMode);
        let table: &[Row] = &[
            (
                &[
                    ("DB_VM_HOST", "vm"),
                    ("DB_VM_PORT", "6543"),
                    ("DB_STAGING_HOST", "x"),
                ],
                "vm",
                6543,
                true,
                SslMode::Prefer,
            ),
            (
                &[
                    ("ENVIRONMENT", "staging"),
                    ("DB_STAGING_HOST", "st"),
                    ("DB_VM_HOST", "x"),
                ],
                "st",
                5432,
                false,
                SslMode::Prefer,
            ),
            (PROD, "db.internal", 5432, false, SslMode::Require),
        ];
        for (vars, host, port, use_vm, ssl) in table {
            let c = resolve(vars).unwrap();
            let db = c.database_config();
            assert_eq!(
                (db.host.as_str(), db.port, db.use_vm, db.ssl_mode),
                (*host, *port, *use_vm, *ssl),
                "{vars:?}"
            );
        }
    }

    #[test]
    fn ssh_tunnel_is_filled_when_enabled() {
        let c = resolve(&[
            ("DB_VM_SSH_ENABLED", "true"),
            ("DB_VM_SSH_HOST", "bastion"),
            ("DB_VM_SSH_PORT", "2222"),
            ("DB_VM_SSH_USER", "dev"),
            ("DB_VM_SSH_KEY", "keys/id"),
        ])
        .unwrap();
        let t = c.database_config().ssh_tunnel.clone().unwrap();
        assert_eq!(
            (t.host.as_str(), t.port, t.user.as_str()),
            ("bastion", 2222, "dev")
        );
        assert_eq!(t.key.unwrap(), Path::new("/proj/keys/id"));
    }

    #[test]
    fn unknown_environment_lists_valid_values() {
        let err = resolve(&[("ENVIRONMENT", "prod")]).unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("development, staging, production"), "{msg}");
    }

    #[test]
    fn production_never_defaults_credentials_and_reports_all_at_once() {
        let got = problems(&[("ENVIRONMENT", "production")]);
        assert_eq!(
            got,
            [
                "DB_PROD_HOST",
                "DB_PROD_NAME",
                "DB_PROD_USER",
                "DB_PROD_PASSWORD"
            ]
        );
    }

    #[test]
    fn production_demands_tls_and_a_ca_for_verification() {
        let mut v = PROD.to_vec();
        v.push(("DB_PROD_SSL_MODE", "disable"));
        assert_eq!(problems(&v), ["DB_PROD_SSL_MODE"]);
        v.pop();
        v.push(("DB_PROD_SSL_MODE", "verify-full"));
        assert_eq!(problems(&v), ["DB_PROD_SSL_ROOT_CERT"]);
        v.push(("DB_PROD_SSL_ROOT_CERT", "/etc/ca.pem"));
        let c = resolve(&v).unwrap();
        assert_eq!(c.database_config().ssl_mode, SslMode::VerifyFull);
        assert!(!c.database_config().use_vm);
    }

    #[test]
    fn bad_values_are_all_reported() {
        let got = problems(&[
            ("ENVIRONMENT", "development"),
            ("DB_VM_PORT", "http"),
            ("DB_VM_SSH_ENABLED", "maybe"),
            ("WASI_MEMORY_LIMIT", "512Q"),
            ("WASI_USE_NAMESPACES", "2"),
        ]);
        assert_eq!(got.len(), 4, "{got:?}");
        assert_eq!(problems(&[("DB_VM_PORT", "70000")]), ["DB_VM_PORT"]);
        assert_eq!(problems(&[("DB_VM_PORT", "0")]), ["DB_VM_PORT"]);
    }

    #[test]
    fn an_active_environment_takes_precedence_outside_production() {
        let active = [
            (ACTIVE_MARKER, "dev"),
            (ACTIVE_ENGINE, "mysql"),
            ("DB_HOST", "127.0.0.1"),
            ("DB_PORT", "40001"),
            ("DB_NAME", "isoenv"),
            ("DB_USER", "isoenv"),
            ("DB_PASSWORD", "pw"),
            ("DB_VM_HOST", "vm"),
        ];
        let c = resolve(&active).unwrap();
        let db = c.database_config();
        assert_eq!(
            (db.engine, db.port, db.use_vm),
            (EngineKind::Mysql, 40001, false)
        );
        assert_eq!(db.source, ConfigSource::Active { name: "dev".into() });

        let mut staging = active.to_vec();
        staging.push(("ENVIRONMENT", "staging"));
        assert_eq!(resolve(&staging).unwrap().database_config().port, 40001);

        let mut prod = PROD.to_vec();
        prod.extend_from_slice(&active);
        assert_eq!(problems(&prod), [ACTIVE_MARKER]);
    }

    #[test]
    fn urls_percent_encode_and_redact() {
        let c = resolve(&[
            ("ENVIRONMENT", "production"),
            ("DB_PROD_HOST", "db"),
            ("DB_PROD_NAME", "app"),
            ("DB_PROD_USER", "a@b"),
            ("DB_PROD_PASSWORD", "p:w/d@#"),
        ])
        .unwrap();
        let db = c.database_config();
        assert_eq!(
            db.url(),
            "postgres://a%40b:p%3Aw%2Fd%40%23@db:5432/app?sslmode=require"
        );
        assert_eq!(
            db.redacted_url(),
            "postgres://a%40b@db:5432/app?sslmode=require"
        );
        let shown = format!("{db} {db:?} {c:?}");
        assert!(
            !shown.contains("p:w/d@#") && !shown.contains("p%3Aw"),
            "{shown}"
        );
    }

    #[test]
    fn development_uses_the_default_environment_when_nothing_else_decides() {
        let root = tempfile::tempdir().unwrap();
        let dev = root.path().join(".isoenv").join(DEFAULT_ENV);
        std::fs::create_dir_all(&dev).unwrap();
        std::fs::write(
            dev.join("dotenv"),
            "DB_HOST=127.0.0.1\nDB_PORT=40001\nDB_NAME=postgres\nDB_USER=postgres\nDB_PASSWORD=pw\nISOENV_ENGINE=postgres\n",
        )
        .unwrap();
        let resolve = |pairs: &[(&str, &str)]| {
            let vars =
                with_default_environment(Vars::from_pairs(pairs.iter().copied()), root.path());
            EnvironmentConfig::from_vars(&vars, root.path()).unwrap()
        };
        let db = resolve(&[]).database_config().clone();
        assert_eq!(db.port, 40001);
        assert_eq!(db.source, ConfigSource::Default { name: "dev".into() });
        // The tunnel, staging, or an activated shell decide instead.
        let tunnel = resolve(&[("DB_VM_SSH_ENABLED", "true")]);
        assert_eq!(tunnel.database_config().port, 5432);
        let staging = resolve(&[("ENVIRONMENT", "staging")]);
        assert_eq!(staging.database_config().port, 5432);
        let active = resolve(&[
            (ACTIVE_MARKER, "other"),
            ("DB_PORT", "40002"),
            ("DB_HOST", "127.0.0.1"),
        ]);
        assert_eq!(active.database_config().port, 40002);
    }
}
