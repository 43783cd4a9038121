//! `DOCKER_HOST=ssh://[USER@]HOST[:PORT]`: one OpenSSH connection per engine and state root (a
//! control master) carries the Docker API (the engine's socket forwarded to a local one) and
//! every running environment's database port (forwarded on demand from 127.0.0.1 here to
//! 127.0.0.1 of the engine's host, where the containers publish). ssh runs as the invoker with
//! its keys, agent and configuration (`ISOENV_DOCKER_SSH_CONFIG` names another file); host keys
//! are checked and nothing is asked. The master lives while an environment on that engine
//! exists, and is closed with the last one (or at the end of a command that
//! opened it and made none).

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// The variable naming an ssh configuration file to use instead of the invoker's.
pub const CONFIG_VAR: &str = "ISOENV_DOCKER_SSH_CONFIG";

/// Where the engine's API listens on its host.
const REMOTE_SOCKET: &str = "/var/run/docker.sock";

/// The connection to one engine over SSH.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SshLink {
    /// `[USER@]HOST`, as ssh takes it.
    target: String,
    port: Option<u16>,
    config: Option<PathBuf>,
    /// Where the control socket, the API socket and ssh's log live (short names: a Unix
    /// socket's path is limited to 108 bytes).
    dir: PathBuf,
    id: String,
}

impl SshLink {
    /// The link for `docker_host` when it is an `ssh://` address; its files under
    /// `state_root`.
    pub fn of(docker_host: &str, state_root: &Path, config: Option<&str>) -> Option<SshLink> {
        let rest = docker_host.strip_prefix("ssh://")?;
        let authority = rest.split(['/', '?']).next().unwrap_or_default();
        let (target, port) = match authority.rsplit_once(':') {
            Some((target, port)) if !authority.ends_with(']') => {
                (target.to_owned(), Some(port.parse().ok()?))
            }
            _ => (authority.to_owned(), None),
        };
        if target.is_empty() || target.starts_with('-') {
            return None;
        }
        Some(SshLink {
            target,
            port,
            config: config.map(PathBuf::from),
            dir: state_root.join(".docker-ssh"),
            id: format!("{:08x}", crate::sys::hash::fnv1a(docker_host) as u32),
        })
    }

    /// The local socket that reaches the engine's API.
    pub fn api_socket(&self) -> PathBuf {
        self.dir.join(format!("{}.sock", self.id))
    }

    fn control(&self) -> PathBuf {
        self.dir.join(format!("{}.ctl", self.id))
    }

    fn log(&self) -> PathBuf {
        self.dir.join(format!("{}.log", self.id))
    }

    /// ssh with the link's configuration, port and control socket; never interactive.
    fn ssh(&self) -> Command {
        let mut cmd = Command::new("ssh");
        if let Some(config) = &self.config {
            cmd.arg("-F").arg(config);
        }
        if let Some(port) = self.port {
            cmd.args(["-p", &port.to_string()]);
        }
        cmd.args(["-o", "BatchMode=yes", "-S"])
            .arg(self.control())
            .stdin(Stdio::null());
        cmd
    }

    /// A command to the running master (`check`, `exit`, `forward`, `cancel`).
    fn control_command(&self, op: &str, forward: Option<String>) -> Result<(), String> {
        let mut cmd = self.ssh();
        cmd.args(["-O", op]);
        if let Some(spec) = forward {
            cmd.args(["-L", &spec]);
        }
        let out = cmd
            .arg(&self.target)
            .output()
            .map_err(|e| format!("cannot run ssh: {e}"))?;
        match out.status.success() {
            true => Ok(()),
            false => Err(String::from_utf8_lossy(&out.stderr).trim().to_owned()),
        }
    }

    /// Opens the connection unless it is up: ssh authenticates, forwards the API socket and
    /// goes to the background (`-f`) only once all that worked. Whether it opened one.
    pub fn open(&self) -> Result<bool, String> {
        if self.control_command("check", None).is_ok() {
            return Ok(false);
        }
        fs::create_dir_all(&self.dir)
            .and_then(|()| crate::sys::files::set_mode(&self.dir, 0o700))
            .map_err(|e| format!("cannot create {}: {e}", self.dir.display()))?;
        for stale in [self.api_socket(), self.control()] {
            let _ = fs::remove_file(stale);
        }
        let log = fs::File::create(self.log())
            .map_err(|e| format!("cannot create {}: {e}", self.log().display()))?;
        let forward = format!("{}:{REMOTE_SOCKET}", self.api_socket().display());
        let status = self
            .ssh()
            .args(["-M", "-f", "-N"])
            .args(["-o", "ExitOnForwardFailure=yes", "-o", "ControlPersist=no"])
            .args([
                "-o",
                "ServerAliveInterval=15",
                "-o",
                "ServerAliveCountMax=3",
            ])
            .args(["-o", "StreamLocalBindUnlink=yes", "-o", "ConnectTimeout=15"])
            .args(["-L", &forward])
            .arg(&self.target)
            .stdout(Stdio::null())
            .stderr(log)
            .status()
            .map_err(|e| format!("cannot run ssh (install the OpenSSH client): {e}"))?;
        if status.success() && self.control_command("check", None).is_ok() {
            return Ok(true);
        }
        let said = fs::read_to_string(self.log()).unwrap_or_default();
        Err(format!(
            "ssh to {} failed: {}",
            self.target,
            crate::sys::process::tail(&said, 5).trim()
        ))
    }

    /// Forwards 127.0.0.1:`local` here to 127.0.0.1:`remote` on the engine's host.
    pub fn forward(&self, local: u16, remote: u16) -> Result<(), String> {
        self.control_command("forward", Some(spec(local, remote)))
    }

    pub fn cancel(&self, local: u16, remote: u16) {
        let _ = self.control_command("cancel", Some(spec(local, remote)));
    }

    /// Ends the connection, with every forward it carries.
    pub fn close(&self) {
        if self.control_command("exit", None).is_ok() {
            let _ = fs::remove_file(self.api_socket());
        }
    }
}

fn spec(local: u16, remote: u16) -> String {
    format!("127.0.0.1:{local}:127.0.0.1:{remote}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ssh_addresses_are_read_like_docker_does() {
        let root = Path::new("/r");
        let link = SshLink::of("ssh://me@box:2222", root, None).unwrap();
        assert_eq!((link.target.as_str(), link.port), ("me@box", Some(2222)));
        let link = SshLink::of("ssh://box", root, Some("/cfg")).unwrap();
        assert_eq!((link.target.as_str(), link.port), ("box", None));
        assert_eq!(link.config.as_deref(), Some(Path::new("/cfg")));
        assert!(link.api_socket().starts_with("/r/.docker-ssh"));
        assert_eq!(SshLink::of("tcp://box:2375", root, None), None);
        assert_eq!(SshLink::of("ssh://-oProxyCommand=x", root, None), None);
        assert_eq!(SshLink::of("ssh://box:port", root, None), None);
        assert_ne!(
            SshLink::of("ssh://a", root, None).unwrap().id,
            SshLink::of("ssh://b", root, None).unwrap().id
        );
    }
}
