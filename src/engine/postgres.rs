//! PostgreSQL: `initdb` once per version (cached), the `postgres` binary launched directly,
//! readiness by a real login over the private Unix socket.

use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;

use nix::sys::signal::Signal;

use super::{
    container_cmd, existing, find_together, image_path, version_of, Binaries, Container,
    Credentials, Endpoint, Engine, EngineError, EngineKind, ImageRecipe, PackageManager, Probe,
};
use crate::envfile::Vars;
use crate::layout::Layout;
use crate::sys::process::{Launch, ServiceUser};
use crate::sys::secret::{write_private, Secret};

pub struct Postgres;

const SUPERUSER: &str = "postgres";
/// Where the secret goes in a container: the official image reads `POSTGRES_PASSWORD_FILE`.
const PASSWORD_FILE: &str = "/isoenv/password";

impl Engine for Postgres {
    fn kind(&self) -> EngineKind {
        EngineKind::Postgres
    }

    fn names(&self) -> &'static [&'static str] {
        &["postgres", "postgresql", "pg"]
    }

    fn default_port(&self) -> u16 {
        5432
    }

    fn locate(&self, vars: &Vars) -> Result<Binaries, EngineError> {
        let dir = find_together(
            "ISOENV_POSTGRES_BIN_DIR",
            vars,
            &["postgres", "initdb"],
            &[
                "/usr/lib/postgresql/*/bin",
                "/usr/pgsql-*/bin",
                "/usr/local/pgsql/bin",
                "/opt/homebrew/opt/postgresql@*/bin",
                "/usr/local/opt/postgresql@*/bin",
            ],
        )?;
        let server = dir.join("postgres");
        // "postgres (PostgreSQL) 15.18 (Debian 15.18-0+deb12u1)"
        let version = version_of(&server, |t| t.split_whitespace().nth(2).map(str::to_owned))?;
        Ok(Binaries {
            server,
            init: Some(dir.join("initdb")),
            version,
        })
    }

    fn credentials(&self, password: Secret) -> Credentials {
        Credentials {
            user: SUPERUSER.into(),
            password,
            database: "postgres".into(),
        }
    }

    /// The cached cluster holds no secret, so it trusts its Unix socket (in the environment's
    /// private `run/`, 0700) until [`Postgres::after_create`] has set the environment's password
    /// and made the socket demand it too. TCP demands it from the start.
    fn init(&self, bins: &Binaries, data: &Path) -> Option<Launch> {
        let initdb = bins.init.as_ref()?;
        Some(
            Launch::new(initdb)
                .arg("-D")
                .arg(data)
                .arg(format!("--username={SUPERUSER}"))
                .arg("--auth-local=trust")
                .arg("--auth-host=scram-sha-256")
                .arg("--encoding=UTF8")
                .arg("--locale=C.UTF-8")
                .arg("--no-sync")
                .arg("--no-instructions"),
        )
    }

    fn configure(
        &self,
        layout: &Layout,
        endpoint: &Endpoint,
        creds: &Credentials,
        _user: &ServiceUser,
    ) -> io::Result<()> {
        let (pw, port, host) = (creds.password.expose(), endpoint.port, &endpoint.host);
        // libpq matches a socket in the default directory as `localhost`, and one elsewhere
        // (the environment's `run/`) by the directory itself.
        let mut lines = format!(
            "{host}:{port}:*:{}:{pw}\nlocalhost:{port}:*:{}:{pw}\n",
            creds.user, creds.user
        );
        if let Some(dir) = &endpoint.socket_dir {
            let dir = dir.display().to_string();
            let dir = dir.replace('\\', "\\\\").replace(':', "\\:");
            lines.push_str(&format!("{dir}:{port}:*:{}:{pw}\n", creds.user));
        }
        write_private(&pgpass(layout), lines.as_bytes())
    }

    /// Besides durability: dynamic shared memory in files of the data directory
    /// (`pg_dynshmem`), not in `/dev/shm`, where a server killed with SIGKILL leaves its
    /// segments (about 1 MB each time) until the same data directory starts again, which a
    /// test run's never does.
    fn disposable_args(&self) -> &'static [&'static str] {
        &[
            "-c",
            "fsync=off",
            "-c",
            "synchronous_commit=off",
            "-c",
            "full_page_writes=off",
            "-c",
            "dynamic_shared_memory_type=mmap",
        ]
    }

    fn launch(&self, bins: &Binaries, layout: &Layout, port: u16) -> Launch {
        Launch::new(&bins.server)
            .arg("-D")
            .arg(&layout.data)
            .arg("-p")
            .arg(port.to_string())
            .arg("-c")
            .arg("listen_addresses=127.0.0.1")
            .arg("-c")
            .arg(format!("unix_socket_directories={}", layout.run.display()))
    }

    fn probe(&self, endpoint: &Endpoint, creds: &Credentials) -> Probe {
        match connect(endpoint, creds) {
            Ok(mut client) => match client.simple_query("SELECT 1") {
                Ok(_) => Probe::Ready,
                Err(e) => Probe::NotYet(e.to_string()),
            },
            Err(e) => match e.code() {
                Some(code) if *code == postgres::error::SqlState::CANNOT_CONNECT_NOW => {
                    Probe::NotYet(e.to_string())
                }
                Some(_) => Probe::Failed(e.to_string()),
                None => Probe::NotYet(e.to_string()),
            },
        }
    }

    /// Sets the environment's password, then has the server rewrite its `pg_hba.conf` (at the
    /// path it uses, inside a sandbox too) so that the socket demands the password as TCP does,
    /// and reload it: no path in is left without the password.
    fn after_create(&self, endpoint: &Endpoint, creds: &Credentials) -> Result<(), EngineError> {
        let mut client = connect(endpoint, creds).map_err(|e| EngineError::Setup(e.to_string()))?;
        let salt: [u8; 16] = rand::random();
        let verifier = scram_verifier(creds.password.expose(), &salt, SCRAM_ITERATIONS);
        // The verifier is base64 and `$:`, so the literal needs no escaping.
        client
            .batch_execute(&format!("ALTER ROLE {} PASSWORD '{verifier}'", creds.user))
            .map_err(|e| EngineError::Setup(format!("cannot set the password: {e}")))?;
        client
            .batch_execute(PASSWORD_EVERYWHERE)
            .map_err(|e| EngineError::Setup(format!("cannot make the socket demand it: {e}")))
    }

    /// Debian keeps share files under `/usr/share/postgresql/MAJOR` and uses the system's time
    /// zone data; a source build keeps both under its prefix.
    fn sandbox_paths(&self, bins: &Binaries) -> Vec<PathBuf> {
        let prefix = bins.server.parent().and_then(Path::parent);
        let major = bins.version.split('.').next().unwrap_or_default();
        existing(prefix.map(Path::to_owned).into_iter().chain([
            PathBuf::from(format!("/usr/share/postgresql/{major}")),
            PathBuf::from("/usr/share/zoneinfo"),
        ]))
    }

    fn container(&self, creds: &Credentials, disposable: bool) -> Container {
        let cmd = container_cmd(&["postgres"], self, disposable);
        Container {
            image: "postgres:15",
            port: 5432,
            data: "/var/lib/postgresql/data",
            env: vec![
                ("POSTGRES_USER", creds.user.clone()),
                ("POSTGRES_DB", creds.database.clone()),
                ("POSTGRES_PASSWORD_FILE", PASSWORD_FILE.into()),
            ],
            cmd,
            files: vec![(PASSWORD_FILE, creds.password.expose().to_owned())],
        }
    }

    /// The server with its modules and share files. The built-in cluster trusts only its own
    /// socket; TCP from outside the container (Docker's port forwarding) needs the password.
    fn image_recipe(&self, bins: &Binaries) -> ImageRecipe {
        let bin_dir = bins.server.parent().unwrap_or(Path::new("/"));
        let mut paths = vec![bins.server.clone()];
        paths.extend(existing(bin_dir.parent().map(|prefix| prefix.join("lib"))));
        paths.extend(
            self.sandbox_paths(bins)
                .into_iter()
                .filter(|p| !bin_dir.starts_with(p)),
        );
        ImageRecipe {
            paths,
            executables: vec![bins.server.clone()],
            command: "postgres",
            account: "postgres",
            entrypoint: Some(include_str!("entrypoint/postgres.sh")),
            env: vec![
                ("PGDATA", "/var/lib/postgresql/data".into()),
                image_path(bins),
            ],
            writable: vec!["/run/postgresql"],
            data_patches: vec![
                ("pg_hba.conf", "host all all all scram-sha-256"),
                ("postgresql.conf", "listen_addresses = '*'"),
            ],
        }
    }

    fn stale_files(&self, layout: &Layout, port: u16) -> Vec<PathBuf> {
        vec![
            layout.data.join("postmaster.pid"),
            layout.run.join(format!(".s.PGSQL.{port}.lock")),
        ]
    }

    /// SIGINT is PostgreSQL's "fast" shutdown: roll back open transactions, checkpoint, exit.
    fn stop_signal(&self) -> Signal {
        Signal::SIGINT
    }

    fn native_exports(
        &self,
        endpoint: &Endpoint,
        creds: &Credentials,
        layout: &Layout,
    ) -> Vec<(&'static str, String)> {
        vec![
            ("PGHOST", endpoint.host.clone()),
            ("PGPORT", endpoint.port.to_string()),
            ("PGUSER", creds.user.clone()),
            ("PGDATABASE", creds.database.clone()),
            ("PGPASSFILE", pgpass(layout).display().to_string()),
        ]
    }

    fn packages(&self) -> &'static [(PackageManager, &'static str)] {
        &[
            (PackageManager::Apt, "postgresql"),
            (PackageManager::Dnf, "postgresql-server"),
            (PackageManager::Apk, "postgresql"),
            (PackageManager::Pacman, "postgresql"),
            (PackageManager::Brew, "postgresql@16"),
        ]
    }
}

/// PBKDF2 rounds of the stored SCRAM verifier. The environments' passwords are random, 32
/// letters and digits (190 bits): no number of rounds makes one guessable or not. PostgreSQL's
/// 4096 cost 7 ms of CPU on each side of every login, and as many again when the password is
/// set (the server checks that it is not the empty one): a tenth of a create, a sixth of a
/// start's ready probe, and the whole of a short test's budget for its connection.
const SCRAM_ITERATIONS: u32 = 64;

/// The `SCRAM-SHA-256$ITERATIONS:SALT$STOREDKEY:SERVERKEY` that PostgreSQL stores for
/// `password` (RFC 5802 and 7677), which `ALTER ROLE ... PASSWORD` takes as it is.
fn scram_verifier(password: &str, salt: &[u8], iterations: u32) -> String {
    use base64::engine::general_purpose::STANDARD;
    use base64::Engine as _;
    use hmac::{KeyInit, Mac};
    use sha2::{Digest, Sha256};
    type Hmac = hmac::Hmac<Sha256>;
    let mac = |key: &[u8], parts: &[&[u8]]| -> [u8; 32] {
        let mut m = Hmac::new_from_slice(key).expect("HMAC takes any key length");
        for part in parts {
            m.update(part);
        }
        m.finalize().into_bytes().into()
    };
    // Hi(): PBKDF2-HMAC-SHA-256 of one block.
    let mut u = mac(password.as_bytes(), &[salt, &1u32.to_be_bytes()]);
    let mut salted = u;
    for _ in 1..iterations {
        u = mac(password.as_bytes(), &[&u]);
        salted.iter_mut().zip(u).for_each(|(s, x)| *s ^= x);
    }
    let stored_key = Sha256::digest(mac(&salted, &[b"Client Key"]));
    let server_key = mac(&salted, &[b"Server Key"]);
    format!(
        "SCRAM-SHA-256${iterations}:{}${}:{}",
        STANDARD.encode(salt),
        STANDARD.encode(stored_key),
        STANDARD.encode(server_key)
    )
}

/// Every login, socket and TCP, with the password (SCRAM); then the server reloads it.
const PASSWORD_EVERYWHERE: &str = "DO $$ BEGIN EXECUTE format(
        'COPY (VALUES (%L), (%L)) TO %L',
        'local all all scram-sha-256', 'host all all all scram-sha-256',
        current_setting('hba_file'));
    END $$; SELECT pg_reload_conf()";

fn pgpass(layout: &Layout) -> PathBuf {
    layout.dir.join("pgpass")
}

/// A superuser session with the password: over the environment's Unix socket where the host
/// has it, else over TCP.
fn connect(endpoint: &Endpoint, creds: &Credentials) -> Result<postgres::Client, postgres::Error> {
    let mut config = postgres::Config::new();
    match &endpoint.socket_dir {
        Some(dir) => config.host_path(dir),
        None => config.host(&endpoint.host),
    };
    config
        .password(creds.password.expose())
        .port(endpoint.port)
        .user(SUPERUSER)
        .dbname("postgres")
        .connect_timeout(Duration::from_secs(2))
        .connect(postgres::NoTls)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_scram_verifier_is_what_pbkdf2_gives() {
        // Computed independently (Python's hashlib.pbkdf2_hmac and hmac).
        let salt = b"isoenv-test-salt";
        assert_eq!(
            scram_verifier("pencil", salt, 4096),
            "SCRAM-SHA-256$4096:aXNvZW52LXRlc3Qtc2FsdA==$mb8CD36AdtyxYJgYtl7AMWimNH14+Mv6CW1hJhf3EwU=:C1f2iNazRFTdvpPvHM37AuKFxvINvTsUcLeNhbXfotg="
        );
        assert_eq!(
            scram_verifier("pencil", salt, 64),
            "SCRAM-SHA-256$64:aXNvZW52LXRlc3Qtc2FsdA==$bGJTkZhcnzET919l+ytzGgfhQyULUJnAMu8luww0bd8=:iIVhyFI1AafVj/nMyFhhL927oF02pYl0l/KvGNROnuA="
        );
    }
}
