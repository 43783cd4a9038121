//! Database engines. An engine knows, and only it knows, how to find its binaries, initialize a
//! data directory, launch its server, probe readiness with its own protocol, stop, and what to
//! export. Adding an engine means one module here and one arm in [`EngineKind::engine`].

mod mysql;
mod postgres;
mod redis;

use std::fmt;
use std::io;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::thread::sleep;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use serde::{Deserialize, Serialize};

use crate::envfile::Vars;
use crate::layout::Layout;
use crate::sys::process::{Launch, ServiceUser};
use crate::sys::secret::Secret;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EngineKind {
    Postgres,
    Mysql,
    Redis,
}

impl EngineKind {
    pub const ALL: [EngineKind; 3] = [EngineKind::Postgres, EngineKind::Mysql, EngineKind::Redis];

    pub fn as_str(self) -> &'static str {
        self.engine().names()[0]
    }

    pub fn url_scheme(self) -> &'static str {
        self.as_str()
    }

    pub fn default_port(self) -> u16 {
        self.engine().default_port()
    }

    /// The registry: adding an engine is a variant, its place in [`EngineKind::ALL`], and an
    /// arm here.
    pub fn engine(self) -> &'static dyn Engine {
        match self {
            EngineKind::Postgres => &postgres::Postgres,
            EngineKind::Mysql => &mysql::Mysql,
            EngineKind::Redis => &redis::Redis,
        }
    }
}

impl fmt::Display for EngineKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for EngineKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let name = s.to_ascii_lowercase();
        EngineKind::ALL
            .into_iter()
            .find(|k| k.engine().names().contains(&name.as_str()))
            .ok_or_else(|| {
                let valid: Vec<&str> = EngineKind::ALL.iter().map(|k| k.as_str()).collect();
                format!("unknown engine `{s}`; valid engines: {}", valid.join(", "))
            })
    }
}

/// What an engine could not do.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EngineError {
    /// Its binaries are not on this machine: what was looked for, and where.
    #[error("{0}")]
    Missing(String),
    /// A new server refused to be set up.
    #[error("{0}")]
    Setup(String),
}

/// The binaries an engine runs, found on this machine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Binaries {
    pub server: PathBuf,
    /// The data-directory initializer (initdb, mariadb-install-db), where the engine has one.
    pub init: Option<PathBuf>,
    /// As the server reports it, e.g. `15.18`, `10.11.19-MariaDB`, `7.0.15`.
    pub version: String,
}

/// Where a running server answers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    pub host: String,
    pub port: u16,
    /// The directory holding the server's Unix socket; `None` when the server runs where the
    /// host cannot reach its socket (a container): then only TCP, with the password.
    pub socket_dir: Option<PathBuf>,
}

/// Who the environment's clients log in as.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Credentials {
    pub user: String,
    pub password: Secret,
    pub database: String,
}

/// The uid and gid the official images run their servers as (`postgres`, `mysql`, `redis` in
/// the Debian-based images); isoenv's local images use the same, so files handed to a container
/// are owned by it whichever image runs.
pub const CONTAINER_UID: u32 = 999;

/// How an engine runs in a container. The interface is the official images' (Docker Hub's
/// `postgres`, `mariadb`, `redis`): their data path, port and variables. isoenv's local images
/// (`cargo xtask image build`) implement the same interface, so one description serves both.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Container {
    /// The official image a registry serves, e.g. `postgres:15`.
    pub image: &'static str,
    /// The port the server listens on inside the container.
    pub port: u16,
    /// Where the environment's data volume is mounted.
    pub data: &'static str,
    pub env: Vec<(&'static str, String)>,
    pub cmd: Vec<String>,
    /// Files the container reads at these paths: the secrets, which would show in `docker
    /// inspect` as variables or arguments (bound from the host, or copied in, see
    /// `backend::docker::spec::Handover`).
    pub files: Vec<(&'static str, String)>,
}

/// What a local image of an engine holds, taken from this machine's installation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageRecipe {
    /// Host paths copied in at the same paths; the shared libraries of `executables` and of
    /// `/bin/sh` are added by the image builder.
    pub paths: Vec<PathBuf>,
    pub executables: Vec<PathBuf>,
    /// The service account's name in the image's `/etc/passwd` (uid [`CONTAINER_UID`]).
    pub account: &'static str,
    /// The default command (what `docker run IMAGE` runs).
    pub command: &'static str,
    /// A POSIX `sh` script implementing the official image's interface, or `None` when the
    /// command runs as given.
    pub entrypoint: Option<&'static str>,
    pub env: Vec<(&'static str, String)>,
    /// Directories the server writes besides its data (sockets), owned by the service account.
    pub writable: Vec<&'static str>,
    /// Lines appended to files of the baked data directory (relative paths), e.g. to accept
    /// connections from outside the container.
    pub data_patches: Vec<(&'static str, &'static str)>,
}

/// The outcome of one readiness probe.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Probe {
    Ready,
    /// Not accepting work yet (refused, starting up, loading): try again.
    NotYet(String),
    /// Answering, but wrongly (e.g. authentication): retrying will not help.
    Failed(String),
}

pub trait Engine: Sync {
    fn kind(&self) -> EngineKind;

    /// Its name (first: in commands, URLs and records) and the other names it answers to.
    fn names(&self) -> &'static [&'static str];

    /// The port its servers listen on by convention.
    fn default_port(&self) -> u16;

    /// Finds the binaries: `ISOENV_<ENGINE>_BIN_DIR`, then `PATH`, then well-known directories.
    fn locate(&self, vars: &Vars) -> Result<Binaries, EngineError>;

    /// The login a new environment gets.
    fn credentials(&self, password: Secret) -> Credentials;

    /// The command that initializes a pristine data directory at `data`, or `None` when the
    /// engine needs none. Its output is cached per engine, version and arguments.
    fn init(&self, bins: &Binaries, data: &Path) -> Option<Launch>;

    /// Writes the environment's own configuration into `layout`: what the server reads (owned by
    /// `user`), and what makes the engine's own clients connect with no arguments to
    /// `endpoint` (the invoker's, 0600).
    fn configure(
        &self,
        layout: &Layout,
        endpoint: &Endpoint,
        creds: &Credentials,
        user: &ServiceUser,
    ) -> io::Result<()>;

    /// The server command line: the binary itself, never a wrapper that polls.
    fn launch(&self, bins: &Binaries, layout: &Layout, port: u16) -> Launch;

    /// Extra server options for a disposable environment (one owned by a test run): its data
    /// dies with its owner, so durability (fsync and friends) is only a cost.
    fn disposable_args(&self) -> &'static [&'static str] {
        &[]
    }

    /// Whether a disposable server's data goes to memory (`backend::memory`), where there is
    /// room: only where the disk costs the test pool's resets more than the memory is worth
    /// (MariaDB's `ALTER TABLE`s rename files; PostgreSQL's resets do not touch the disk much,
    /// and in memory its suites were no faster).
    fn data_in_memory(&self) -> bool {
        false
    }

    /// One readiness check with the engine's real protocol.
    fn probe(&self, endpoint: &Endpoint, creds: &Credentials) -> Probe;

    /// Runs once after the first successful start of a new environment.
    fn after_create(&self, _endpoint: &Endpoint, _creds: &Credentials) -> Result<(), EngineError> {
        Ok(())
    }

    /// Host paths the server reads besides its binary and libraries (install and share
    /// directories): what a sandbox binds read-only.
    fn sandbox_paths(&self, _bins: &Binaries) -> Vec<PathBuf> {
        Vec::new()
    }

    /// The environment's files the server reads (configuration, init scripts).
    fn server_files(&self, _layout: &Layout) -> Vec<PathBuf> {
        Vec::new()
    }

    /// Files a crashed server leaves behind that would stop the next start.
    fn stale_files(&self, _layout: &Layout, _port: u16) -> Vec<PathBuf> {
        Vec::new()
    }

    /// How this engine runs in a container, for a login `creds`; `disposable` as for
    /// [`Engine::disposable_args`].
    fn container(&self, creds: &Credentials, disposable: bool) -> Container;

    /// What a local image of this engine holds. Its data volume starts from the cached
    /// initialized data directory, so the image needs no initializer.
    fn image_recipe(&self, bins: &Binaries) -> ImageRecipe;

    /// The signal for a graceful, fast shutdown.
    fn stop_signal(&self) -> Signal {
        Signal::SIGTERM
    }

    /// The variable applications read the URL from, by convention.
    fn url_var(&self) -> &'static str {
        "DATABASE_URL"
    }

    /// The engine's native client variables (beyond the URL and `DB_*`).
    fn native_exports(
        &self,
        endpoint: &Endpoint,
        creds: &Credentials,
        layout: &Layout,
    ) -> Vec<(&'static str, String)>;

    /// Distribution packages that provide the server: (package manager, package).
    fn packages(&self) -> &'static [(PackageManager, &'static str)];
}

/// Finds `names` together in one directory: the override directory, then `PATH`, then `dirs`
/// (glob patterns with a trailing `*` component are expanded, newest version first).
pub(crate) fn find_together(
    override_var: &str,
    vars: &Vars,
    names: &[&str],
    dirs: &[&str],
) -> Result<PathBuf, EngineError> {
    let has_all = |dir: &Path| names.iter().all(|n| is_executable(&dir.join(n)));
    if let Some(dir) = vars.get(override_var) {
        let dir = PathBuf::from(dir);
        return if has_all(&dir) {
            Ok(dir)
        } else {
            Err(EngineError::Missing(format!(
                "{override_var}={} does not contain {}",
                dir.display(),
                names.join(", ")
            )))
        };
    }
    let from_path = which::which(names[0])
        .ok()
        .and_then(|p| std::fs::canonicalize(p).ok())
        .and_then(|p| p.parent().map(Path::to_owned));
    from_path
        .into_iter()
        .chain(dirs.iter().flat_map(|d| expand(d)))
        .find(|d| has_all(d))
        .ok_or_else(|| {
            EngineError::Missing(format!(
                "{} not found on PATH or in {}",
                names.join(" and "),
                dirs.join(", ")
            ))
        })
}

/// Expands one `*` in a directory pattern, highest version first.
fn expand(pattern: &str) -> Vec<PathBuf> {
    let Some((prefix, suffix)) = pattern.split_once('*') else {
        return vec![PathBuf::from(pattern)];
    };
    let (parent, stem) = prefix.rsplit_once('/').unwrap_or(("", prefix));
    let mut found: Vec<(Vec<u64>, PathBuf)> =
        std::fs::read_dir(if parent.is_empty() { "/" } else { parent })
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| {
                let name = e.file_name().into_string().ok()?;
                let version = name.strip_prefix(stem)?;
                let key = version
                    .split(['.', '-'])
                    .filter_map(|p| p.parse().ok())
                    .collect();
                Some((key, PathBuf::from(format!("{parent}/{name}{suffix}"))))
            })
            .collect();
    found.sort();
    found.into_iter().rev().map(|(_, p)| p).collect()
}

/// A container's command: `base`, then the engine's disposable options when asked for.
pub(crate) fn container_cmd(base: &[&str], engine: &dyn Engine, disposable: bool) -> Vec<String> {
    let extra = if disposable {
        engine.disposable_args()
    } else {
        &[]
    };
    base.iter().chain(extra).map(|a| (*a).to_owned()).collect()
}

/// An image's `PATH`: the server's directory, then the usual ones.
pub(crate) fn image_path(bins: &Binaries) -> (&'static str, String) {
    let dir = bins.server.parent().unwrap_or(Path::new("/"));
    ("PATH", format!("{}:/usr/bin:/bin", dir.display()))
}

/// The paths of `candidates` that exist.
pub(crate) fn existing(candidates: impl IntoIterator<Item = PathBuf>) -> Vec<PathBuf> {
    candidates.into_iter().filter(|p| p.exists()).collect()
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// Runs `binary --version` and extracts the version with `pick`, once for a binary that has
/// not changed since (a start or create locates the engine, and each run costs 10-20 ms, as much
/// as Redis takes to start; see [`crate::sys::memo`]).
pub(crate) fn version_of(
    binary: &Path,
    pick: fn(&str) -> Option<String>,
) -> Result<String, EngineError> {
    crate::sys::memo::remembered(binary, "version", || run_version(binary, pick))
}

fn run_version(binary: &Path, pick: fn(&str) -> Option<String>) -> Result<String, EngineError> {
    let out = std::process::Command::new(binary)
        .arg("--version")
        .output()
        .map_err(|e| {
            EngineError::Missing(format!("cannot run {} --version: {e}", binary.display()))
        })?;
    let text = String::from_utf8_lossy(&out.stdout);
    pick(&text).ok_or_else(|| {
        EngineError::Missing(format!("cannot read a version from `{}`", text.trim()))
    })
}

/// A system package manager, for "how to install" hints.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PackageManager {
    Apt,
    Dnf,
    Apk,
    Pacman,
    Brew,
}

impl PackageManager {
    /// This machine's package manager, from `/etc/os-release` (or macOS).
    pub fn detect() -> Option<Self> {
        if cfg!(target_os = "macos") {
            return Some(PackageManager::Brew);
        }
        let text = std::fs::read_to_string("/etc/os-release").ok()?;
        Self::from_os_release(&text)
    }

    pub fn from_os_release(text: &str) -> Option<Self> {
        let ids: Vec<String> = text
            .lines()
            .filter_map(|l| l.strip_prefix("ID=").or_else(|| l.strip_prefix("ID_LIKE=")))
            .flat_map(|v| {
                v.trim_matches('"')
                    .split_whitespace()
                    .map(str::to_owned)
                    .collect::<Vec<_>>()
            })
            .collect();
        let has = |names: &[&str]| ids.iter().any(|i| names.contains(&i.as_str()));
        if has(&["debian", "ubuntu"]) {
            Some(PackageManager::Apt)
        } else if has(&["fedora", "rhel", "centos"]) {
            Some(PackageManager::Dnf)
        } else if has(&["alpine"]) {
            Some(PackageManager::Apk)
        } else if has(&["arch"]) {
            Some(PackageManager::Pacman)
        } else {
            None
        }
    }

    /// The shell command that installs `package`, with `sudo` unless we are root.
    pub fn install_command(self, package: &str) -> String {
        let sudo = if nix::unistd::geteuid().is_root() || self == PackageManager::Brew {
            ""
        } else {
            "sudo "
        };
        match self {
            PackageManager::Apt => format!(
                "{sudo}apt-get update && {sudo}env DEBIAN_FRONTEND=noninteractive apt-get install -y {package}"
            ),
            PackageManager::Dnf => format!("{sudo}dnf install -y {package}"),
            PackageManager::Apk => format!("{sudo}apk add {package}"),
            PackageManager::Pacman => format!("{sudo}pacman -S --noconfirm {package}"),
            PackageManager::Brew => format!("brew install {package}"),
        }
    }
}

/// How to install `engine` here, as a command to run, if this OS is known.
pub fn install_command(engine: &dyn Engine) -> Option<String> {
    let pm = PackageManager::detect()?;
    let (_, package) = engine.packages().iter().find(|(m, _)| *m == pm)?;
    Some(pm.install_command(package))
}

/// Probes until the engine answers its own protocol, or says why it never will: it answered
/// wrongly, `gone` (asked between probes, with the last probe's message) reports the server
/// gone, or the time is up. `None` means ready.
pub fn wait_ready<E>(
    engine: &dyn Engine,
    endpoint: &Endpoint,
    creds: &Credentials,
    timeout: Duration,
    mut gone: impl FnMut(&str) -> Result<Option<String>, E>,
) -> Result<Option<String>, E> {
    let deadline = Instant::now() + timeout;
    loop {
        let message = match engine.probe(endpoint, creds) {
            Probe::Ready => return Ok(None),
            Probe::Failed(m) => {
                return Ok(Some(format!(
                    "{} answered but is not usable: {m}",
                    engine.kind()
                )))
            }
            Probe::NotYet(m) => m,
        };
        if let Some(failure) = gone(&message)? {
            return Ok(Some(failure));
        }
        if Instant::now() > deadline {
            return Ok(Some(format!(
                "{} did not accept connections within {}s ({message})",
                engine.kind(),
                timeout.as_secs()
            )));
        }
        sleep(Duration::from_millis(1));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn engine_names_and_aliases() {
        assert_eq!("postgresql".parse(), Ok(EngineKind::Postgres));
        assert_eq!("MariaDB".parse(), Ok(EngineKind::Mysql));
        assert!("oracle"
            .parse::<EngineKind>()
            .unwrap_err()
            .contains("postgres, mysql, redis"));
        for k in EngineKind::ALL {
            assert_eq!(k.engine().kind(), k);
            assert_eq!(k.as_str().parse(), Ok(k));
        }
    }

    #[test]
    fn package_manager_from_os_release() {
        let debian = "PRETTY_NAME=\"Debian GNU/Linux 12\"\nID=debian\n";
        assert_eq!(
            PackageManager::from_os_release(debian),
            Some(PackageManager::Apt)
        );
        let mint = "ID=linuxmint\nID_LIKE=\"ubuntu debian\"\n";
        assert_eq!(
            PackageManager::from_os_release(mint),
            Some(PackageManager::Apt)
        );
        let rocky = "ID=\"rocky\"\nID_LIKE=\"rhel centos fedora\"\n";
        assert_eq!(
            PackageManager::from_os_release(rocky),
            Some(PackageManager::Dnf)
        );
        assert_eq!(PackageManager::from_os_release("ID=plan9\n"), None);
    }

    #[test]
    fn version_dirs_expand_newest_first() {
        let tmp = tempfile::tempdir().unwrap();
        for v in ["9.6", "15", "12"] {
            std::fs::create_dir_all(tmp.path().join(format!("pg/{v}/bin"))).unwrap();
        }
        let pattern = format!("{}/pg/*/bin", tmp.path().display());
        let got: Vec<String> = expand(&pattern)
            .iter()
            .map(|p| {
                p.parent()
                    .unwrap()
                    .file_name()
                    .unwrap()
                    .to_string_lossy()
                    .into_owned()
            })
            .collect();
        assert_eq!(got, ["15", "12", "9.6"]);
    }
}
