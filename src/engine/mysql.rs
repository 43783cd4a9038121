//! MySQL protocol servers: MariaDB (`mariadbd` + `mariadb-install-db`) or Oracle MySQL
//! (`mysqld --initialize-insecure`), whichever is installed. The login is (re)set by an init file
//! on every start, so the cached data directory holds no secret.

use std::io::{self, Read};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::{
    container_cmd, existing, find_together, image_path, version_of, Binaries, Container,
    Credentials, Endpoint, Engine, EngineError, EngineKind, ImageRecipe, PackageManager, Probe,
};
use crate::envfile::Vars;
use crate::layout::Layout;
use crate::sys::process::{Launch, ServiceUser};
use crate::sys::secret::{write_private, Secret};

pub struct Mysql;

const USER: &str = "isoenv";
/// Small redo log, buffer pool and temporary tablespace: a development server starts faster
/// and its data directory is ~15 MB instead of ~115 MB (the temporary tablespace was 12 MB
/// written out at every start). A small MyISAM key cache: its default 128 MB is set up at
/// every start, 15-25 ms of a 100-115 ms launch here, and no table of isoenv's or MariaDB's
/// own uses it (they are InnoDB and Aria). Passed to init and launch alike.
const SIZES: [&str; 4] = [
    "--innodb-log-file-size=8M",
    "--innodb-buffer-pool-size=32M",
    "--innodb-temp-data-file-path=ibtmp1:1M:autoextend",
    "--key-buffer-size=1M",
];
const DIRS: &[&str] = &[
    "/usr/sbin",
    "/usr/libexec",
    "/usr/local/mysql/bin",
    "/opt/homebrew/bin",
    "/usr/local/bin",
];

impl Engine for Mysql {
    fn kind(&self) -> EngineKind {
        EngineKind::Mysql
    }

    fn names(&self) -> &'static [&'static str] {
        &["mysql", "mariadb"]
    }

    fn default_port(&self) -> u16 {
        3306
    }

    fn locate(&self, vars: &Vars) -> Result<Binaries, EngineError> {
        let var = "ISOENV_MYSQL_BIN_DIR";
        if let Ok(dir) = find_together(var, vars, &["mariadbd"], DIRS) {
            let server = dir.join("mariadbd");
            // mariadb-install-db lives in bin/, mariadbd in sbin/.
            let init = find_together(
                var,
                vars,
                &["mariadb-install-db"],
                &["/usr/bin", "/usr/local/bin", "/opt/homebrew/bin"],
            )
            .map(|d| d.join("mariadb-install-db"))?;
            return Ok(Binaries {
                version: version_of(&server, pick_version)?,
                server,
                init: Some(init),
            });
        }
        let dir = find_together(var, vars, &["mysqld"], DIRS)?;
        let server = dir.join("mysqld");
        Ok(Binaries {
            version: version_of(&server, pick_version)?,
            init: None,
            server,
        })
    }

    fn credentials(&self, password: Secret) -> Credentials {
        Credentials {
            user: USER.into(),
            password,
            database: USER.into(),
        }
    }

    fn init(&self, bins: &Binaries, data: &Path) -> Option<Launch> {
        let launch = match &bins.init {
            Some(install_db) => Launch::new(install_db)
                .arg("--no-defaults")
                .arg(format!("--datadir={}", data.display()))
                .arg("--skip-test-db")
                .arg("--auth-root-authentication-method=socket"),
            None => Launch::new(&bins.server)
                .arg("--no-defaults")
                .arg("--initialize-insecure")
                .arg(format!("--datadir={}", data.display())),
        };
        Some(SIZES.iter().fold(launch, |l, a| l.arg(a)))
    }

    fn configure(
        &self,
        layout: &Layout,
        endpoint: &Endpoint,
        creds: &Credentials,
        user: &ServiceUser,
    ) -> io::Result<()> {
        let path = init_file(layout);
        write_private(&path, login_sql(creds).as_bytes())?;
        user.chown(&path)?;
        // What `mariadb` reads through MYSQL_HOME, after (so over) the system's option files,
        // which may name another socket. `database` is the interactive client's option only.
        let dir = client_home(layout);
        std::fs::create_dir_all(&dir)?;
        std::fs::set_permissions(&dir, std::os::unix::fs::PermissionsExt::from_mode(0o700))?;
        let socket = match &endpoint.socket_dir {
            Some(_) => format!("socket={}\n", socket(layout).display()),
            None => String::new(),
        };
        let options = format!(
            "[client]\nuser={}\npassword={}\nhost={}\nport={}\n{socket}\n[mysql]\ndatabase={}\n",
            creds.user,
            creds.password.expose(),
            endpoint.host,
            endpoint.port,
            creds.database
        );
        write_private(&dir.join("my.cnf"), options.as_bytes())
    }

    /// Besides durability: no persistent InnoDB statistics. With them, every table opened
    /// anew reads, and every `ALTER TABLE` writes, the statistics tables, and each test pool
    /// reset runs an `ALTER TABLE ... AUTO_INCREMENT` per written table, after which the next
    /// test opens the table anew: a third of a reset's server time. A test's tables are small
    /// and short-lived, and transient statistics (sampled when a table is opened) serve them.
    /// And the system and temporary tablespaces grow by 1 MB, not 64: a test run's data is in
    /// memory, where the temporary tablespace took 65 MB at the first start and the system
    /// one 64 MB more for the undo logs of a suite's first resets.
    fn disposable_args(&self) -> &'static [&'static str] {
        &[
            "--innodb-flush-log-at-trx-commit=0",
            "--innodb-doublewrite=0",
            "--sync-binlog=0",
            "--innodb-stats-persistent=OFF",
            "--innodb-autoextend-increment=1",
        ]
    }

    fn data_in_memory(&self) -> bool {
        true
    }

    fn launch(&self, bins: &Binaries, layout: &Layout, port: u16) -> Launch {
        let l = Launch::new(&bins.server)
            .arg("--no-defaults")
            .arg(format!("--datadir={}", layout.data.display()))
            .arg(format!("--port={port}"))
            .arg("--bind-address=127.0.0.1")
            .arg(format!("--socket={}", socket(layout).display()))
            .arg(format!(
                "--pid-file={}",
                layout.run.join("mysqld.pid").display()
            ))
            .arg("--skip-name-resolve")
            // `INTO OUTFILE`, `INTO DUMPFILE` and `LOAD DATA INFILE` only inside the
            // environment's private run directory, never elsewhere on the host.
            .arg(format!("--secure-file-priv={}", layout.run.display()))
            .arg(format!("--init-file={}", init_file(layout).display()));
        SIZES.iter().fold(l, |l, a| l.arg(a))
    }

    /// A ready server greets every connection with a protocol-10 handshake packet.
    fn probe(&self, endpoint: &Endpoint, _creds: &Credentials) -> Probe {
        let addr = (endpoint.host.as_str(), endpoint.port);
        let mut stream = match TcpStream::connect(addr) {
            Ok(s) => s,
            Err(e) => return Probe::NotYet(e.to_string()),
        };
        let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
        let mut head = [0u8; 4];
        if let Err(e) = stream.read_exact(&mut head) {
            return Probe::NotYet(e.to_string());
        }
        let len = usize::from(head[0]) | usize::from(head[1]) << 8 | usize::from(head[2]) << 16;
        let mut payload = vec![0u8; len.min(512)];
        if let Err(e) = stream.read_exact(&mut payload) {
            return Probe::NotYet(e.to_string());
        }
        greeting(&payload)
    }

    /// The official image initializes the data directory, sets root's password from the file
    /// and then runs the login script once; isoenv's local image runs it at every start.
    fn container(&self, creds: &Credentials, disposable: bool) -> Container {
        let confined: Vec<&str> = SIZES
            .iter()
            .copied()
            .chain(["--secure-file-priv=/run/mysqld"])
            .collect();
        let cmd = container_cmd(&confined, self, disposable);
        Container {
            image: "mariadb:10.11",
            port: 3306,
            data: "/var/lib/mysql",
            env: vec![("MARIADB_ROOT_PASSWORD_FILE", PASSWORD_FILE.into())],
            cmd,
            files: vec![
                (PASSWORD_FILE, creds.password.expose().to_owned()),
                ("/docker-entrypoint-initdb.d/isoenv.sql", login_sql(creds)),
            ],
        }
    }

    fn image_recipe(&self, bins: &Binaries) -> ImageRecipe {
        let mut paths = vec![bins.server.clone()];
        paths.extend(self.sandbox_paths(bins));
        ImageRecipe {
            paths,
            executables: vec![bins.server.clone()],
            command: "mariadbd",
            account: "mysql",
            entrypoint: Some(include_str!("entrypoint/mysql.sh")),
            env: vec![image_path(bins)],
            writable: vec!["/run/mysqld"],
            data_patches: Vec::new(),
        }
    }

    fn sandbox_paths(&self, _bins: &Binaries) -> Vec<PathBuf> {
        existing(
            [
                "/usr/share/mariadb",
                "/usr/share/mysql",
                "/usr/lib/mysql/plugin",
            ]
            .map(PathBuf::from),
        )
    }

    fn server_files(&self, layout: &Layout) -> Vec<PathBuf> {
        vec![init_file(layout)]
    }

    fn native_exports(
        &self,
        endpoint: &Endpoint,
        _creds: &Credentials,
        layout: &Layout,
    ) -> Vec<(&'static str, String)> {
        vec![
            ("MYSQL_HOST", endpoint.host.clone()),
            ("MYSQL_TCP_PORT", endpoint.port.to_string()),
            ("MYSQL_HOME", client_home(layout).display().to_string()),
        ]
        .into_iter()
        .chain(
            endpoint
                .socket_dir
                .as_ref()
                .map(|_| ("MYSQL_UNIX_PORT", socket(layout).display().to_string())),
        )
        .collect()
    }

    /// A killed server's socket file: MariaDB checks one it finds by connecting to it, which
    /// the sandbox refuses (no `connect`), and then aborts.
    fn stale_files(&self, layout: &Layout, _port: u16) -> Vec<PathBuf> {
        vec![socket(layout), layout.run.join("mysqld.pid")]
    }

    fn packages(&self) -> &'static [(PackageManager, &'static str)] {
        &[
            (PackageManager::Apt, "mariadb-server"),
            (PackageManager::Dnf, "mariadb-server"),
            (PackageManager::Apk, "mariadb"),
            (PackageManager::Pacman, "mariadb"),
            (PackageManager::Brew, "mariadb"),
        ]
    }
}

/// What the server's first packet says: a protocol-10 handshake (ready), or an error packet
/// (`0xff`, code, message), which is final when the server refuses this client's host.
fn greeting(payload: &[u8]) -> Probe {
    match payload {
        [10, ..] => Probe::Ready,
        [0xff, lo, hi, message @ ..] => {
            let code = u16::from_le_bytes([*lo, *hi]);
            let message = String::from_utf8_lossy(message);
            let text = format!("error {code}: {}", message.trim_start_matches('#'));
            // 1129: host blocked, 1130: host not allowed; retrying cannot help.
            match code {
                1129 | 1130 => Probe::Failed(text),
                _ => Probe::NotYet(text),
            }
        }
        [other, ..] => Probe::Failed(format!("unexpected handshake byte {other:#x}")),
        [] => Probe::NotYet("empty packet".into()),
    }
}

/// "mariadbd  Ver 10.11.19-MariaDB-0+deb12u1 for debian-linux-gnu" -> "10.11.19-MariaDB".
fn pick_version(text: &str) -> Option<String> {
    let v = text.split_whitespace().skip_while(|w| *w != "Ver").nth(1)?;
    Some(match v.find("-MariaDB") {
        Some(i) => v[..i + "-MariaDB".len()].to_owned(),
        None => v.to_owned(),
    })
}

/// Where the secret goes in a container: the official image reads `MARIADB_ROOT_PASSWORD_FILE`.
const PASSWORD_FILE: &str = "/isoenv/password";

/// The directory of the client option file (`MYSQL_HOME`).
fn client_home(layout: &Layout) -> PathBuf {
    layout.dir.join("mysql")
}

/// Creates (or re-keys) the environment's login with every privilege, and its database, and
/// gives `root@localhost` the same password: the data directory's initialization let the
/// host's root in through the socket without one. Idempotent, one statement per line (as
/// `--init-file` wants). Generated passwords are alphanumeric, so the literals need no
/// escaping.
fn login_sql(creds: &Credentials) -> String {
    let (u, pw, db) = (&creds.user, creds.password.expose(), &creds.database);
    format!(
        "CREATE USER IF NOT EXISTS '{u}'@'%' IDENTIFIED BY '{pw}';\n\
         ALTER USER '{u}'@'%' IDENTIFIED BY '{pw}';\n\
         GRANT ALL PRIVILEGES ON *.* TO '{u}'@'%' WITH GRANT OPTION;\n\
         ALTER USER 'root'@'localhost' IDENTIFIED BY '{pw}';\n\
         CREATE DATABASE IF NOT EXISTS `{db}`;\n"
    )
}

fn init_file(layout: &Layout) -> PathBuf {
    layout.dir.join("init.sql")
}

fn socket(layout: &Layout) -> PathBuf {
    layout.run.join("mysqld.sock")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greetings() {
        assert_eq!(greeting(&[10, b'1', b'0']), Probe::Ready);
        let refused = [&[0xff, 0x6a, 0x04][..], b"Host '172.17.0.1' is not allowed"].concat();
        assert!(
            matches!(greeting(&refused), Probe::Failed(m) if m.contains("1130") && m.contains("not allowed"))
        );
        let busy = [&[0xff, 0x10, 0x04][..], b"Too many connections"].concat();
        assert!(matches!(greeting(&busy), Probe::NotYet(m) if m.contains("1040")));
    }

    #[test]
    fn versions() {
        let maria =
            "mariadbd  Ver 10.11.19-MariaDB-0+deb12u1 for debian-linux-gnu on x86_64 (Debian 12)";
        assert_eq!(pick_version(maria).as_deref(), Some("10.11.19-MariaDB"));
        let mysql =
            "/usr/sbin/mysqld  Ver 8.0.36 for Linux on x86_64 (MySQL Community Server - GPL)";
        assert_eq!(pick_version(mysql).as_deref(), Some("8.0.36"));
    }
}
