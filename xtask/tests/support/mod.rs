//! Shared by the CLI test files: a project directory with its own `.env` and state root, driven
//! through the real `cargo xtask` binary.

#![allow(dead_code)] // Each test file uses its own part of this module.

pub mod sshd;

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;
use tempfile::TempDir;

/// A project directory with its own `.env` and state root.
pub struct Project {
    pub dir: TempDir,
    /// Commands run as this user (`setpriv`), not as the test's own.
    user: Option<nix::unistd::User>,
    /// Commands run in this network namespace (`ip netns exec`): another host, as far as the
    /// network goes.
    netns: Option<String>,
}

impl Project {
    pub fn new(env: &str) -> Self {
        let dir = tempfile::Builder::new()
            .prefix("isoenv-cli-")
            .tempdir()
            .unwrap();
        // Servers run as an unprivileged user, which must be able to reach the state root.
        fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755)).unwrap();
        let p = Project {
            dir,
            user: None,
            netns: None,
        };
        p.write_env(env);
        p
    }

    /// A project whose commands run as `nobody` (the test itself runs as root). Its files and
    /// its cache are nobody's own.
    pub fn unprivileged(env: &str) -> Self {
        let mut p = Self::new(env);
        let nobody = nix::unistd::User::from_name("nobody").unwrap().unwrap();
        p.user = Some(nobody.clone());
        p.write_env(env);
        let chown = Command::new("chown")
            .arg("-R")
            .arg(format!("{}:{}", nobody.uid, nobody.gid))
            .arg(p.dir.path())
            .arg(nobody_state())
            .status()
            .unwrap();
        assert!(chown.success());
        p
    }

    /// The same project, its commands run in the network namespace `name`.
    pub fn in_netns(mut self, name: &str) -> Self {
        self.netns = Some(name.to_owned());
        self
    }

    /// Whether commands run as another user than the test's.
    pub fn is_unprivileged(&self) -> bool {
        self.user.is_some()
    }

    pub fn env_file(&self) -> PathBuf {
        self.dir.path().join(".env")
    }

    pub fn state(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    /// The test-run environments (`test-*`) in the state root (none when it is not there).
    pub fn run_envs(&self) -> Vec<String> {
        fs::read_dir(self.state())
            .map(|d| {
                d.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .filter(|n| n.starts_with("test-"))
                    .collect()
            })
            .unwrap_or_default()
    }

    pub fn write_env(&self, env: &str) {
        // The shared cache is the test's own user's; another user gets one of its own.
        let cache = match self.user {
            None => Path::new(env!("CARGO_TARGET_TMPDIR")).join("isoenv-cache"),
            Some(_) => self.dir.path().join("cache"),
        };
        let text = format!(
            "WASI_SANDBOX_DIR={}\nISOENV_CACHE_DIR={}\n{env}",
            self.state().display(),
            cache.display()
        );
        fs::write(self.env_file(), text).unwrap();
    }

    pub fn cmd(&self, args: &[&str]) -> Command {
        self.command(args, true)
    }

    /// [`Self::cmd`] for a caller that switches to [`Self::user`] itself, in a `pre_exec` of
    /// its own (to hand the command something as that user).
    pub fn bare_cmd(&self, args: &[&str]) -> Command {
        self.command(args, false)
    }

    pub fn user(&self) -> Option<&nix::unistd::User> {
        self.user.as_ref()
    }

    fn command(&self, args: &[&str], switch: bool) -> Command {
        let mut cmd = match (&self.user, &self.netns) {
            (Some(user), _) if switch => {
                let mut c = Command::new("setpriv");
                c.arg(format!("--reuid={}", user.uid))
                    .arg(format!("--regid={}", user.gid))
                    .args(["--clear-groups", "--", env!("CARGO_BIN_EXE_xtask")]);
                c
            }
            (None, Some(ns)) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns, env!("CARGO_BIN_EXE_xtask")]);
                c
            }
            _ => Command::new(env!("CARGO_BIN_EXE_xtask")),
        };
        if self.user.is_some() {
            cmd.env("HOME", "/nonexistent")
                .env("XDG_STATE_HOME", nobody_state());
        }
        cmd.arg("--env-file").arg(self.env_file()).args(args);
        for var in [
            "ENVIRONMENT",
            "ISOENV_ACTIVE",
            "ISOENV_ENGINE",
            "DB_HOST",
            "DB_PORT",
            "DB_PASSWORD",
            "WASI_SANDBOX_DIR",
            // What an enclosing `test --isolated` run exports.
            "DATABASE_URL",
            "REDIS_URL",
            "ISOENV_POSTGRES_URL",
            "ISOENV_MYSQL_URL",
            "ISOENV_REDIS_URL",
        ] {
            cmd.env_remove(var);
        }
        cmd
    }

    /// Creates environment `name` of `engine` in `backend` (and asserts it worked); its JSON.
    pub fn create(&self, name: &str, engine: &str, backend: &str) -> Value {
        let mut args = create_args(name, engine, backend).to_vec();
        args.push("--json");
        self.json(&args)
    }

    pub fn run(&self, args: &[&str]) -> Output {
        self.cmd(args).output().unwrap()
    }

    /// Runs, asserts success, returns stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(out.status.success(), "{args:?} failed:\n{}", text(&out));
        String::from_utf8(out.stdout).unwrap()
    }

    pub fn json(&self, args: &[&str]) -> Value {
        serde_json::from_str(&self.ok(args)).unwrap()
    }

    pub fn fails(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(!out.status.success(), "{args:?} succeeded:\n{}", text(&out));
        text(&out)
    }
}

/// `db create NAME --engine ENGINE --backend BACKEND`.
pub fn create_args<'a>(name: &'a str, engine: &'a str, backend: &'a str) -> [&'a str; 7] {
    [
        "db",
        "create",
        name,
        "--engine",
        engine,
        "--backend",
        backend,
    ]
}

impl Drop for Project {
    fn drop(&mut self) {
        // Never leave a server behind, whatever the test did.
        if let Ok(entries) = fs::read_dir(self.state()) {
            for e in entries.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                if !name.starts_with('.') {
                    let _ = self.run(&["db", "destroy", &name]);
                }
            }
        }
    }
}

pub fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// `nobody`'s state directory, shared by every test that runs as it (so that its environments'
/// identities are claimed in one registry, as a user's are).
pub fn nobody_state() -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("nobody-state");
    fs::create_dir_all(&dir).unwrap();
    dir
}
