//! The system `ssh` forwarding a local port on 127.0.0.1 to the VM's database. Non-interactive,
//! fails fast when the forward cannot be made, keeps itself alive, and checks host keys against
//! a project-local `known_hosts`. Readiness is the database's own answer through the tunnel; a
//! failure is traced to the hop that failed. ssh runs as the invoking user, whose SSH key and
//! agent it uses.

use std::fmt;
use std::fs;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::thread::sleep;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use serde::{Deserialize, Serialize};

use crate::config::{DatabaseConfig, SshTunnel as SshSettings};
use crate::layout::Layout;
use crate::remote::{self, FailureKind, ServerReport};
use crate::sys::process::{tail, Launch, ProcessId, ServiceUser};

/// Why a tunnel could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum TunnelError {
    #[error("ssh tunnel {route} failed at the {hop} hop: {detail}\n  fix: {advice}")]
    Failed {
        route: String,
        hop: Hop,
        detail: String,
        advice: String,
    },
    #[error("cannot run {}: {cause}", ssh.display())]
    Spawn { ssh: PathBuf, cause: std::io::Error },
}

type Result<T> = std::result::Result<T, TunnelError>;

/// How long ssh may take to connect, authenticate and forward before `db up` gives up.
const OPEN_TIMEOUT: Duration = Duration::from_secs(30);

/// Everything that determines a tunnel; recorded in the environment's state so that a change
/// in `.env` is noticed and the tunnel reopened.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TunnelSpec {
    pub ssh_user: String,
    pub ssh_host: String,
    pub ssh_port: u16,
    pub key: Option<PathBuf>,
    pub known_hosts: PathBuf,
    pub strict_host_keys: bool,
    /// The database as the VM sees it (`DB_VM_HOST:DB_VM_PORT`).
    pub remote_host: String,
    pub remote_port: u16,
}

impl TunnelSpec {
    pub fn new(db: &DatabaseConfig, ssh: &SshSettings, state_root: &Path) -> Self {
        TunnelSpec {
            ssh_user: ssh.user.clone(),
            ssh_host: ssh.host.clone(),
            ssh_port: ssh.port,
            key: ssh.key.clone(),
            known_hosts: ssh
                .known_hosts
                .clone()
                .unwrap_or_else(|| state_root.join("known_hosts")),
            strict_host_keys: ssh.strict_host_keys,
            remote_host: db.host.clone(),
            remote_port: db.port,
        }
    }

    /// The ssh command line. Options on the command line win over `~/.ssh/config`, so a user's
    /// own settings (ProxyJump, ...) still apply where these do not speak.
    pub fn launch(&self, ssh: &Path, local_port: u16) -> Launch {
        let checking = if self.strict_host_keys {
            "yes"
        } else {
            "accept-new"
        };
        let mut launch = Launch::new(ssh).arg("-N").arg("-L").arg(format!(
            "127.0.0.1:{local_port}:{}:{}",
            self.remote_host, self.remote_port
        ));
        for option in [
            "BatchMode=yes".to_owned(),
            "ExitOnForwardFailure=yes".into(),
            "ServerAliveInterval=10".into(),
            "ServerAliveCountMax=3".into(),
            "ConnectTimeout=10".into(),
            format!("StrictHostKeyChecking={checking}"),
            format!("UserKnownHostsFile={}", self.known_hosts.display()),
        ] {
            launch = launch.arg("-o").arg(option);
        }
        if let Some(key) = &self.key {
            launch = launch
                .arg("-i")
                .arg(key)
                .arg("-o")
                .arg("IdentitiesOnly=yes");
        }
        launch
            .arg("-p")
            .arg(self.ssh_port.to_string())
            .arg(format!("{}@{}", self.ssh_user, self.ssh_host))
    }

    /// `user@host:port -> remote_host:remote_port`, for messages.
    pub fn route(&self) -> String {
        format!(
            "{}@{}:{} -> {}:{}",
            self.ssh_user, self.ssh_host, self.ssh_port, self.remote_host, self.remote_port
        )
    }
}

/// The hop at which a tunnel failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Hop {
    /// The SSH server could not be reached.
    SshConnect,
    /// Strict checking, and the host's key is not in the known_hosts file.
    HostKeyUnknown,
    /// The host presented a different key than the one recorded.
    HostKeyChanged,
    /// The SSH server refused the key.
    SshAuth,
    /// The local end could not listen.
    LocalPort,
    /// Through SSH, the VM could not connect to the database's host and port.
    RemotePort,
    /// The database answered through the tunnel but refused or failed the login.
    Database,
    /// ssh failed in another way (its message is in the detail).
    Ssh,
}

impl fmt::Display for Hop {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Hop::SshConnect => "ssh connection",
            Hop::HostKeyUnknown => "host key verification (unknown host key)",
            Hop::HostKeyChanged => "host key verification (host key changed)",
            Hop::SshAuth => "ssh authentication",
            Hop::LocalPort => "local port",
            Hop::RemotePort => "remote database port",
            Hop::Database => "database",
            Hop::Ssh => "ssh",
        })
    }
}

impl Hop {
    pub fn advice(self, spec: &TunnelSpec) -> String {
        let kh = spec.known_hosts.display();
        match self {
            Hop::SshConnect => format!("check DB_VM_SSH_HOST={} and DB_VM_SSH_PORT={}, and that the VM and its sshd are running", spec.ssh_host, spec.ssh_port),
            Hop::HostKeyUnknown => format!("DB_VM_SSH_STRICT_HOST_KEYS=true and {kh} has no key for this host; add it (ssh-keyscan -p {} {} >> {kh}) after checking its fingerprint, or set DB_VM_SSH_STRICT_HOST_KEYS=false to learn it on first use", spec.ssh_port, spec.ssh_host),
            Hop::HostKeyChanged => format!("the VM's host key differs from the one recorded in {kh}; if the VM was rebuilt, remove the old entry (ssh-keygen -R '[{}]:{}' -f {kh}), otherwise do not connect", spec.ssh_host, spec.ssh_port),
            Hop::SshAuth => format!("the VM refused the key{} for user {}; add its public key to ~{}/.ssh/authorized_keys on the VM, or set DB_VM_SSH_USER/DB_VM_SSH_KEY", spec.key.as_ref().map(|k| format!(" {}", k.display())).unwrap_or_default(), spec.ssh_user, spec.ssh_user),
            Hop::LocalPort => "the local port is taken; run `cargo xtask db up` again to pick another".into(),
            Hop::RemotePort => format!("nothing accepts connections at {}:{} as seen from the VM; check DB_VM_HOST/DB_VM_PORT and that the database runs on the VM", spec.remote_host, spec.remote_port),
            Hop::Database => "check DB_VM_USER, DB_VM_PASSWORD, DB_VM_NAME and DB_VM_SSL_MODE".into(),
            Hop::Ssh => "see the ssh messages above".into(),
        }
    }
}

/// The failing hop, from what ssh wrote. A pure function of the log text.
pub fn diagnose(log: &str) -> Option<(Hop, String)> {
    const SIGNS: &[(&str, Hop)] = &[
        (
            "REMOTE HOST IDENTIFICATION HAS CHANGED",
            Hop::HostKeyChanged,
        ),
        ("Host key verification failed", Hop::HostKeyUnknown),
        ("Permission denied", Hop::SshAuth),
        ("open failed: connect failed", Hop::RemotePort),
        ("open failed: administratively prohibited", Hop::RemotePort),
        ("cannot listen to port", Hop::LocalPort),
        ("Could not request local forwarding", Hop::LocalPort),
        ("ssh: connect to host", Hop::SshConnect),
        ("ssh: Could not resolve hostname", Hop::SshConnect),
        ("Connection closed by", Hop::SshConnect),
        (
            "Connection timed out during banner exchange",
            Hop::SshConnect,
        ),
    ];
    SIGNS.iter().find_map(|(sign, hop)| {
        let line = log.lines().find(|l| l.contains(sign))?;
        Some((*hop, line.trim().to_owned()))
    })
}

/// A tunnel's ssh process, just started; [`Starting::wait`] says whether it works.
pub struct Starting<'a> {
    pub process: ProcessId,
    spec: &'a TunnelSpec,
    local_port: u16,
    log: PathBuf,
    /// Where this run's messages start in the log.
    from: u64,
}

/// Starts ssh (detached, as the invoking user, whose key it is), with its messages appended to
/// the environment's log.
pub fn spawn<'a>(
    ssh: &Path,
    spec: &'a TunnelSpec,
    local_port: u16,
    layout: &Layout,
) -> Result<Starting<'a>> {
    let from = fs::metadata(&layout.log).map_or(0, |m| m.len());
    let process = spec
        .launch(ssh, local_port)
        .spawn_detached(&ServiceUser::invoker(), &layout.dir, &layout.log)
        .map_err(|cause| TunnelError::Spawn {
            ssh: ssh.to_owned(),
            cause,
        })?;
    Ok(Starting {
        process,
        spec,
        local_port,
        log: layout.log.clone(),
        from,
    })
}

impl Starting<'_> {
    /// Waits until the database answers through the tunnel. On failure ssh is stopped and the
    /// error names the hop that failed.
    pub fn wait(self, db: &DatabaseConfig) -> Result<ServerReport> {
        let deadline = Instant::now() + OPEN_TIMEOUT;
        loop {
            if !self.process.is_alive() {
                let text = self.messages();
                let (hop, line) = diagnose(&text).unwrap_or((Hop::Ssh, tail(&text, 5)));
                return self.fail(hop, line);
            }
            match remote::check(db, "127.0.0.1", self.local_port) {
                Ok(report) => return Ok(report),
                // ssh is still connecting: nothing listens locally yet.
                Err(e) if e.kind == FailureKind::Unreachable && Instant::now() < deadline => {
                    sleep(Duration::from_millis(10))
                }
                Err(e) if e.kind == FailureKind::Unreachable => {
                    let detail = format!(
                        "no answer through the tunnel within {}s: {}",
                        OPEN_TIMEOUT.as_secs(),
                        tail(&self.messages(), 5)
                    );
                    return self.fail(Hop::Ssh, detail);
                }
                Err(e) if e.kind == FailureKind::Closed => {
                    // ssh closed the connection; it says why in its log, a moment later.
                    let seen = Instant::now();
                    let found = loop {
                        if let Some(found) = diagnose(&self.messages()) {
                            break Some(found);
                        }
                        if seen.elapsed() > Duration::from_secs(1) {
                            break None;
                        }
                        sleep(Duration::from_millis(10));
                    };
                    let (hop, line) = found.unwrap_or((Hop::RemotePort, e.detail));
                    return self.fail(hop, line);
                }
                Err(e) => {
                    self.process.stop(Signal::SIGTERM, Duration::from_secs(5));
                    return Err(TunnelError::Failed {
                        route: self.spec.route(),
                        hop: Hop::Database,
                        detail: e.detail.clone(),
                        advice: e.advice("DB_VM_"),
                    });
                }
            }
        }
    }

    fn fail<T>(&self, hop: Hop, detail: String) -> Result<T> {
        self.process.stop(Signal::SIGTERM, Duration::from_secs(5));
        Err(TunnelError::Failed {
            route: self.spec.route(),
            hop,
            detail,
            advice: hop.advice(self.spec),
        })
    }

    fn messages(&self) -> String {
        read_from(&self.log, self.from)
    }
}

/// What was appended to `log` since byte `from`.
fn read_from(log: &Path, from: u64) -> String {
    let mut text = String::new();
    if let Ok(mut f) = fs::File::open(log) {
        if f.seek(SeekFrom::Start(from)).is_ok() {
            let _ = f.read_to_string(&mut text);
        }
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> TunnelSpec {
        TunnelSpec {
            ssh_user: "vagrant".into(),
            ssh_host: "vm.local".into(),
            ssh_port: 2222,
            key: Some("/keys/id".into()),
            known_hosts: "/p/.isoenv/known_hosts".into(),
            strict_host_keys: false,
            remote_host: "localhost".into(),
            remote_port: 5432,
        }
    }

    #[test]
    fn the_command_line_is_non_interactive_and_fails_fast() {
        let args: Vec<String> = spec()
            .launch(Path::new("/usr/bin/ssh"), 40000)
            .args
            .iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        let joined = args.join(" ");
        for expected in [
            "-N -L 127.0.0.1:40000:localhost:5432",
            "BatchMode=yes",
            "ExitOnForwardFailure=yes",
            "ServerAliveInterval=10",
            "StrictHostKeyChecking=accept-new",
            "UserKnownHostsFile=/p/.isoenv/known_hosts",
            "-i /keys/id -o IdentitiesOnly=yes",
            "-p 2222 vagrant@vm.local",
        ] {
            assert!(
                joined.contains(expected),
                "{expected} missing from {joined}"
            );
        }
        assert_eq!(args.last().unwrap(), "vagrant@vm.local");
    }

    #[test]
    fn strict_checking_and_default_identities() {
        let s = TunnelSpec {
            strict_host_keys: true,
            key: None,
            ..spec()
        };
        let joined: Vec<String> = s
            .launch(Path::new("ssh"), 1)
            .args
            .iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        assert!(joined.contains(&"StrictHostKeyChecking=yes".to_owned()));
        assert!(!joined.contains(&"-i".to_owned()));
    }

    #[test]
    fn each_failure_is_traced_to_its_hop() {
        let cases = [
            ("root@127.0.0.1: Permission denied (publickey).", Hop::SshAuth),
            ("No ED25519 host key is known for [127.0.0.1]:42222 and you have requested strict checking.\nHost key verification failed.", Hop::HostKeyUnknown),
            ("@@@\n@    WARNING: REMOTE HOST IDENTIFICATION HAS CHANGED!     @\n...\nHost key verification failed.", Hop::HostKeyChanged),
            ("Warning: Permanently added '[127.0.0.1]:42222' (ED25519) to the list of known hosts.\nchannel 1: open failed: connect failed: Connection refused", Hop::RemotePort),
            ("ssh: connect to host 127.0.0.1 port 42223: Connection refused", Hop::SshConnect),
            ("bind [127.0.0.1]:5000: Address already in use\nchannel_setup_fwd_listener_tcpip: cannot listen to port: 5000\nCould not request local forwarding.", Hop::LocalPort),
        ];
        for (log, hop) in cases {
            assert_eq!(diagnose(log).map(|d| d.0), Some(hop), "{log}");
        }
        assert_eq!(
            diagnose("Warning: Permanently added 'x' to the list of known hosts."),
            None
        );
    }
}
