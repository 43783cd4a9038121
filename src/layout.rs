//! Where an environment lives: the state root, one directory per environment and the paths in
//! it, and the rules for environment names. Paths only (the record is the state module's).
//!
//! ```text
//! <root>/<name>/state.json     record (no secrets)        <root>/.locks/<name>.lock
//!              /credentials    password (0600)            <root>/.cache/<engine>-<version>-<hash>/
//!              /bin/activate   venv-style script (0600)
//!              /data/ run/ log/server.log
//! ```

use std::fs::{self, File};
use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;

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
    /// The environment's name: its directory's.
    pub fn name(&self) -> String {
        self.dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default()
    }
    pub fn state_file(&self) -> PathBuf {
        self.dir.join("state.json")
    }
    pub fn credentials_file(&self) -> PathBuf {
        self.dir.join("credentials")
    }
    /// The connection as a dotenv file (0600).
    pub fn dotenv(&self) -> PathBuf {
        self.dir.join("dotenv")
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

    /// Makes the environment's directory (marked as being created) with `bin/` and `log/`. The
    /// log holds statements as the server saw them, passwords included: it is the invoker's
    /// alone (the server writes to a descriptor it is handed, never to the path).
    pub fn make(&self) -> io::Result<()> {
        self.make_dir()?;
        fs::create_dir_all(&self.bin)?;
        let log = self.log.parent().unwrap_or(&self.dir);
        fs::create_dir_all(log)?;
        fs::set_permissions(log, fs::Permissions::from_mode(0o700))
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
    fn socket_room() {
        assert!(Layout::new("/tmp/x/dev".into()).check_socket_room().is_ok());
        let deep = PathBuf::from(format!("/{}", "d".repeat(100)));
        assert!(Layout::new(deep)
            .check_socket_room()
            .unwrap_err()
            .contains("WASI_SANDBOX_DIR"));
    }
}
