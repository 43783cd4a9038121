//! Environment state on disk: the state root, one directory per environment, its machine-readable
//! record, its status, and the per-environment lock.
//!
//! ```text
//! <root>/<name>/state.json     record (no secrets)        <root>/.locks/<name>.lock
//!              /credentials    password (0600)            <root>/.cache/<engine>-<version>-<hash>/
//!              /bin/activate   venv-style script (0600)
//!              /data/ run/ log/server.log
//! ```

use std::fs::{self, File};
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;

use nix::fcntl::{Flock, FlockArg};
use serde::{Deserialize, Serialize};

use crate::backend::BackendKind;
use crate::engine::EngineKind;
use crate::process::ProcessId;
use crate::tunnel::TunnelSpec;

pub const SCHEMA: u32 = 1;
const MAX_NAME: usize = 48;
/// `sun_path` is 108 bytes including the terminating NUL.
const MAX_SOCKET_PATH: usize = 107;

/// The paths of one environment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layout {
    pub dir: PathBuf,
    pub data: PathBuf,
    pub run: PathBuf,
    pub bin: PathBuf,
    pub log: PathBuf,
}

impl Layout {
    pub fn new(dir: PathBuf) -> Self {
        Layout {
            data: dir.join("data"),
            run: dir.join("run"),
            bin: dir.join("bin"),
            log: dir.join("log").join("server.log"),
            dir,
        }
    }
    pub fn state_file(&self) -> PathBuf {
        self.dir.join("state.json")
    }
    pub fn credentials_file(&self) -> PathBuf {
        self.dir.join("credentials")
    }
    pub fn activate(&self) -> PathBuf {
        self.bin.join("activate")
    }

    /// Present while `create` builds the environment: if it is there and nobody holds the
    /// lock, the creator died half-way and the directory is garbage.
    pub fn creating_marker(&self) -> PathBuf {
        self.dir.join(".creating")
    }

    /// Makes the environment's directory, marked as being created.
    pub fn make_dir(&self) -> io::Result<()> {
        fs::create_dir(&self.dir)?;
        File::create(self.creating_marker()).map(drop)
    }

    /// The environment is complete: removes the marker.
    pub fn finish(&self) -> io::Result<()> {
        fs::remove_file(self.creating_marker())
    }

    /// The longest socket path an engine creates in `run/` (PostgreSQL's `.s.PGSQL.NNNNN.lock`).
    pub fn check_socket_room(&self) -> Result<(), String> {
        let longest = self.run.join(".s.PGSQL.65535.lock");
        let len = longest.as_os_str().len();
        if len > MAX_SOCKET_PATH {
            return Err(format!(
                "{} is {len} bytes, longer than a Unix socket path may be ({MAX_SOCKET_PATH}); set WASI_SANDBOX_DIR to a shorter path",
                longest.display()
            ));
        }
        Ok(())
    }
}

/// Environment names become directory names, container names and URL parts: `[A-Za-z0-9]`
/// first, then `[A-Za-z0-9._-]`, at most 48 characters.
pub fn validate_name(name: &str) -> Result<(), String> {
    let reason = if name.is_empty() {
        "it is empty".to_owned()
    } else if name.len() > MAX_NAME {
        format!("it is longer than {MAX_NAME} characters")
    } else if !name.starts_with(|c: char| c.is_ascii_alphanumeric()) {
        "it must start with a letter or digit".to_owned()
    } else if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
    {
        format!("it contains `{c}`; use letters, digits, `.`, `_` and `-`")
    } else if name.contains("..") {
        "it contains `..`".to_owned()
    } else {
        return Ok(());
    };
    Err(reason)
}

/// What isoenv records about an environment. Secrets live in `credentials`, not here.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EnvState {
    pub schema: u32,
    pub name: String,
    pub engine: EngineKind,
    pub backend: BackendKind,
    /// Empty for env-only environments.
    pub engine_version: String,
    pub host: String,
    pub port: u16,
    /// Whether isoenv runs a server (false: env-only, variables and activate only).
    pub service: bool,
    /// The server while it runs (or until isoenv notices it died).
    pub process: Option<ProcessId>,
    pub created_at: u64,
    /// The process this environment lives for (e.g. a `test --isolated` run): once it is gone,
    /// the environment is garbage that `db gc` (and the next isoenv command) removes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner: Option<ProcessId>,
    /// For the ssh-tunnel backend: the route the tunnel was opened with.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tunnel: Option<TunnelSpec>,
    /// For the docker backend: the container and its volume. Recorded before either is made,
    /// so that whatever a killed `create` made is found again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub container: Option<ContainerRecord>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ContainerRecord {
    pub name: String,
    pub volume: String,
    pub image: String,
    /// The Docker engine it lives on (`DOCKER_HOST` at create; none: the local default).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub docker_host: Option<String>,
    /// Whether isoenv started it and has not stopped it since: a container that is not running
    /// then has crashed.
    pub started: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Status {
    Running,
    Stopped,
    Crashed,
    EnvOnly,
    /// Its container was removed behind isoenv's back (`start` makes it again).
    Missing,
    /// Its Docker engine cannot be reached.
    Unknown,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Running => "running",
            Status::Stopped => "stopped",
            Status::Crashed => "crashed",
            Status::EnvOnly => "env-only",
            Status::Missing => "missing",
            Status::Unknown => "unknown",
        }
    }
}

impl EnvState {
    /// The status given whether the recorded process is alive: a pure decision.
    pub fn status(&self, alive: impl Fn(&ProcessId) -> bool) -> Status {
        match (&self.process, self.service) {
            (_, false) => Status::EnvOnly,
            (None, true) => Status::Stopped,
            (Some(p), true) if alive(p) => Status::Running,
            (Some(_), true) => Status::Crashed,
        }
    }

    /// Whether this is an ephemeral environment whose owner has gone: a pure decision.
    pub fn orphaned(&self, alive: impl Fn(&ProcessId) -> bool) -> bool {
        self.owner.as_ref().is_some_and(|o| !alive(o))
    }

    pub fn load(layout: &Layout) -> io::Result<Option<Self>> {
        match fs::read(layout.state_file()) {
            Ok(bytes) => serde_json::from_slice(&bytes).map(Some).map_err(|e| {
                io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("{}: {e}", layout.state_file().display()),
                )
            }),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Writes atomically (temp file + rename): a reader never sees half a record.
    pub fn save(&self, layout: &Layout) -> io::Result<()> {
        crate::files::write_atomic(&layout.state_file(), &serde_json::to_vec_pretty(self)?)
    }
}

/// An exclusive, non-blocking lock on one name, held until dropped. The lock file is removed on
/// release; the inode check on acquire makes that safe against a racing holder.
pub struct Lock {
    path: PathBuf,
    _flock: Flock<File>,
}

#[derive(Debug)]
pub enum LockError {
    Busy,
    Io(io::Error),
}

impl Lock {
    pub fn try_acquire(path: PathBuf) -> Result<Self, LockError> {
        Self::acquire(path, FlockArg::LockExclusiveNonblock)
    }

    pub fn wait(path: PathBuf) -> Result<Self, LockError> {
        Self::acquire(path, FlockArg::LockExclusive)
    }

    fn acquire(path: PathBuf, arg: FlockArg) -> Result<Self, LockError> {
        if let Some(parent) = path.parent() {
            fs::create_dir_all(parent).map_err(LockError::Io)?;
        }
        loop {
            let file = File::options()
                .create(true)
                .truncate(false)
                .write(true)
                .open(&path)
                .map_err(LockError::Io)?;
            let flock = match Flock::lock(file, arg) {
                Ok(f) => f,
                Err((_, nix::errno::Errno::EWOULDBLOCK)) => return Err(LockError::Busy),
                Err((_, e)) => return Err(LockError::Io(e.into())),
            };
            let held = flock.metadata().map_err(LockError::Io)?.ino();
            // The previous holder may have unlinked the file between our open and our lock.
            if fs::metadata(&path).is_ok_and(|m| m.ino() == held) {
                return Ok(Lock {
                    path,
                    _flock: flock,
                });
            }
        }
    }
}

impl Drop for Lock {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.path);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        for ok in ["dev", "a", "pg-15_test.1", &"x".repeat(48)] {
            assert_eq!(validate_name(ok), Ok(()), "{ok}");
        }
        for bad in [
            "",
            "..",
            "a/b",
            "a b",
            "-x",
            ".hidden",
            "a..b",
            &"x".repeat(49),
            "é",
        ] {
            assert!(validate_name(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn status_is_decided_from_the_record_and_liveness() {
        let p = ProcessId {
            pid: 1,
            start_time: 1,
        };
        let mut s = EnvState {
            schema: SCHEMA,
            name: "x".into(),
            engine: EngineKind::Postgres,
            backend: BackendKind::Lightweight,
            engine_version: "15".into(),
            host: "127.0.0.1".into(),
            port: 1,
            service: true,
            process: Some(p),
            created_at: 0,
            owner: None,
            tunnel: None,
            container: None,
        };
        assert_eq!(s.status(|_| true), Status::Running);
        assert_eq!(s.status(|_| false), Status::Crashed);
        s.process = None;
        assert_eq!(s.status(|_| true), Status::Stopped);
        s.service = false;
        assert_eq!(s.status(|_| true), Status::EnvOnly);
        assert!(
            !s.orphaned(|_| false),
            "an environment without owner is kept"
        );
        s.owner = Some(p);
        assert!(!s.orphaned(|_| true));
        assert!(s.orphaned(|_| false));
    }

    #[test]
    fn lock_is_exclusive_and_removed_on_release() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("locks/x.lock");
        let held = Lock::try_acquire(path.clone()).unwrap();
        assert!(matches!(
            Lock::try_acquire(path.clone()),
            Err(LockError::Busy)
        ));
        drop(held);
        assert!(!path.exists());
        assert!(Lock::try_acquire(path).is_ok());
    }

    #[test]
    fn socket_room() {
        assert!(Layout::new("/tmp/x/dev".into()).check_socket_room().is_ok());
        let deep = PathBuf::from(format!("/{}", "d".repeat(100)));
        assert!(Layout::new(deep)
            .check_socket_room()
            .unwrap_err()
            .contains("WASI_SANDBOX_DIR"));
    }
}
