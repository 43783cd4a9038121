//! A real OpenSSH server for the tests that go through SSH: a free port on an address of the
//! test's choosing, one generated host key, key logins only (`user_key` is authorized,
//! `other_key` is not), local TCP and Unix socket forwarding allowed.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread::sleep;
use std::time::{Duration, Instant};

use tempfile::TempDir;

pub struct Sshd {
    pub dir: TempDir,
    pub address: String,
    pub port: u16,
    child: Child,
}

impl Sshd {
    pub fn start_on(address: &str) -> Self {
        let sshd = ["/usr/sbin/sshd", "/usr/bin/sshd"]
            .into_iter()
            .find(|p| Path::new(p).exists())
            .expect("sshd is missing: install openssh-server (cargo xtask ci does)");
        let dir = tempfile::Builder::new()
            .prefix("isoenv-sshd-")
            .tempdir()
            .unwrap();
        for key in ["host_key", "user_key", "other_key"] {
            let ok = Command::new("ssh-keygen")
                .args(["-q", "-t", "ed25519", "-N", "", "-f"])
                .arg(dir.path().join(key))
                .status()
                .expect("ssh-keygen is missing: install openssh-client");
            assert!(ok.success());
        }
        fs::copy(
            dir.path().join("user_key.pub"),
            dir.path().join("authorized_keys"),
        )
        .unwrap();
        // OpenSSH's privilege separation needs this directory (Debian creates it at boot).
        fs::create_dir_all("/run/sshd").unwrap();
        let port = std::net::TcpListener::bind((address, 0))
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let d = dir.path().display();
        let config = format!(
            "ListenAddress {address}\nPort {port}\nHostKey {d}/host_key\n\
             AuthorizedKeysFile {d}/authorized_keys\nPasswordAuthentication no\n\
             KbdInteractiveAuthentication no\nPermitRootLogin prohibit-password\nUsePAM no\n\
             StrictModes no\nPidFile none\nAllowTcpForwarding local\n\
             AllowStreamLocalForwarding local\n"
        );
        fs::write(dir.path().join("sshd_config"), config).unwrap();
        let child = Command::new(sshd)
            .args(["-D", "-e", "-f"])
            .arg(dir.path().join("sshd_config"))
            .stdin(Stdio::null())
            .stderr(fs::File::create(dir.path().join("sshd.log")).unwrap())
            .spawn()
            .unwrap();
        let s = Sshd {
            dir,
            address: address.to_owned(),
            port,
            child,
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect((address, port)).is_err() {
            assert!(Instant::now() < deadline, "sshd did not start: {}", s.log());
            sleep(Duration::from_millis(10));
        }
        s
    }

    pub fn key(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    pub fn log(&self) -> String {
        fs::read_to_string(self.dir.path().join("sshd.log")).unwrap_or_default()
    }

    /// An ssh client configuration for this server: `user_key`, its host key known, nothing
    /// asked.
    pub fn client_config(&self) -> PathBuf {
        let host_key = fs::read_to_string(self.key("host_key.pub")).unwrap();
        let known = self.dir.path().join("known_hosts");
        let host_key: Vec<&str> = host_key.split_whitespace().take(2).collect();
        fs::write(
            &known,
            format!("[{}]:{} {}\n", self.address, self.port, host_key.join(" ")),
        )
        .unwrap();
        let config = self.dir.path().join("ssh_config");
        fs::write(
            &config,
            format!(
                "Host *\n  IdentityFile {}\n  IdentitiesOnly yes\n  UserKnownHostsFile {}\n  StrictHostKeyChecking yes\n",
                self.key("user_key").display(),
                known.display()
            ),
        )
        .unwrap();
        config
    }
}

impl Drop for Sshd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
