//! Redis: no initialization, a private config file with `requirepass`, readiness by
//! `AUTH` + `PING`.

use std::io::{self, BufRead, BufReader, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::{
    container_cmd, find_together, image_path, version_of, Binaries, Container, Credentials,
    Endpoint, Engine, EngineError, EngineKind, ImageRecipe, PackageManager, Probe,
};
use crate::envfile::Vars;
use crate::layout::Layout;
use crate::sys::process::{Launch, ServiceUser};
use crate::sys::secret::{write_private, Secret};

pub struct Redis;

impl Engine for Redis {
    fn kind(&self) -> EngineKind {
        EngineKind::Redis
    }

    fn names(&self) -> &'static [&'static str] {
        &["redis"]
    }

    fn default_port(&self) -> u16 {
        6379
    }

    fn locate(&self, vars: &Vars) -> Result<Binaries, EngineError> {
        let dir = find_together(
            "ISOENV_REDIS_BIN_DIR",
            vars,
            &["redis-server"],
            &["/usr/sbin", "/usr/local/bin", "/opt/homebrew/bin"],
        )?;
        let server = dir.join("redis-server");
        // "Redis server v=7.0.15 sha=..."
        let version = version_of(&server, |t| {
            t.split_whitespace()
                .find_map(|w| w.strip_prefix("v="))
                .map(str::to_owned)
        })?;
        Ok(Binaries {
            server,
            init: None,
            version,
        })
    }

    fn credentials(&self, password: Secret) -> Credentials {
        Credentials {
            user: "default".into(),
            password,
            database: "0".into(),
        }
    }

    fn init(&self, _bins: &Binaries, _data: &Path) -> Option<Launch> {
        None
    }

    /// Clients of a sandbox's or container's exposed port all come from loopback, which
    /// protected mode trusts, so a password is always set.
    fn configure(
        &self,
        layout: &Layout,
        endpoint: &Endpoint,
        creds: &Credentials,
        user: &ServiceUser,
    ) -> io::Result<()> {
        // `appendfsync no`: every acknowledged write is in the append-only file (the kernel's)
        // before the reply. `everysec` postpones that write while a slow background fsync
        // runs, for up to two seconds, and a kill -9 then lost acknowledged writes. The socket
        // is open to all: the run directory decides who reaches it (the invoker, the server).
        let conf = format!(
            "bind 127.0.0.1\nport {}\nprotected-mode yes\nrequirepass {}\n\
             dir {}\ndbfilename dump.rdb\nsave 3600 1 300 100 60 10000\n\
             appendonly yes\nappendfsync no\n\
             databases 256\n\
             unixsocket {}\nunixsocketperm 777\ndaemonize no\nlogfile \"\"\n",
            endpoint.port,
            creds.password.expose(),
            layout.data.display(),
            socket(layout).display(),
        );
        let path = config(layout);
        write_private(&path, conf.as_bytes())?;
        user.chown(&path)?;
        cli_wrapper(layout, endpoint)
    }

    /// A test run's server keeps nothing: no snapshots, no append-only file.
    fn disposable_args(&self) -> &'static [&'static str] {
        &["--save", "", "--appendonly", "no"]
    }

    fn launch(&self, bins: &Binaries, layout: &Layout, port: u16) -> Launch {
        Launch::new(&bins.server)
            .arg(config(layout))
            .arg("--port")
            .arg(port.to_string())
    }

    /// The configuration (with the password) is a file, never an argument `docker inspect` or
    /// `ps` would show.
    fn container(&self, creds: &Credentials, disposable: bool) -> Container {
        const CONFIG: &str = "/isoenv/redis.conf";
        let cmd = container_cmd(&["redis-server", CONFIG], self, disposable);
        let conf = format!(
            "port 6379\nprotected-mode yes\nrequirepass {}\ndir /data\n\
             appendonly yes\nappendfsync no\n\
             databases 256\n",
            creds.password.expose()
        );
        Container {
            image: "redis:7.0",
            port: 6379,
            data: "/data",
            env: Vec::new(),
            cmd,
            files: vec![(CONFIG, conf)],
        }
    }

    fn image_recipe(&self, bins: &Binaries) -> ImageRecipe {
        ImageRecipe {
            paths: vec![bins.server.clone()],
            executables: vec![bins.server.clone()],
            command: "redis-server",
            account: "redis",
            entrypoint: None,
            env: vec![image_path(bins)],
            writable: Vec::new(),
            data_patches: Vec::new(),
        }
    }

    fn server_files(&self, layout: &Layout) -> Vec<PathBuf> {
        vec![config(layout)]
    }

    fn probe(&self, endpoint: &Endpoint, creds: &Credentials) -> Probe {
        let stream = match TcpStream::connect((endpoint.host.as_str(), endpoint.port)) {
            Ok(s) => s,
            Err(e) => return Probe::NotYet(e.to_string()),
        };
        let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
        let mut writer = &stream;
        let request = format!("AUTH {}\r\nPING\r\n", creds.password.expose());
        if let Err(e) = writer.write_all(request.as_bytes()) {
            return Probe::NotYet(e.to_string());
        }
        let mut lines = BufReader::new(&stream).lines();
        let mut next = || lines.next().and_then(Result::ok).unwrap_or_default();
        match (next().as_str(), next().as_str()) {
            ("+OK", "+PONG") => Probe::Ready,
            (auth, _) if auth.starts_with("-LOADING") => Probe::NotYet(auth.to_owned()),
            ("+OK", ping) if ping.starts_with("-LOADING") => Probe::NotYet(ping.to_owned()),
            (auth, _) if auth.starts_with('-') => Probe::Failed(auth.to_owned()),
            (auth, ping) => Probe::NotYet(format!("unexpected reply `{auth}` `{ping}`")),
        }
    }

    fn url_var(&self) -> &'static str {
        "REDIS_URL"
    }

    fn native_exports(
        &self,
        _endpoint: &Endpoint,
        creds: &Credentials,
        _layout: &Layout,
    ) -> Vec<(&'static str, String)> {
        vec![("REDISCLI_AUTH", creds.password.expose().to_owned())]
    }

    fn packages(&self) -> &'static [(PackageManager, &'static str)] {
        &[
            (PackageManager::Apt, "redis-server"),
            (PackageManager::Dnf, "redis"),
            (PackageManager::Apk, "redis"),
            (PackageManager::Pacman, "redis"),
            (PackageManager::Brew, "redis"),
        ]
    }
}

fn config(layout: &Layout) -> PathBuf {
    layout.dir.join("redis.conf")
}

fn socket(layout: &Layout) -> PathBuf {
    layout.run.join("redis.sock")
}

/// `bin/redis-cli`, first on `PATH` while the environment is active: redis-cli reads its
/// password from `REDISCLI_AUTH` but no address from anywhere, so the wrapper adds the
/// environment's unless the command line names one.
fn cli_wrapper(layout: &Layout, endpoint: &Endpoint) -> io::Result<()> {
    let script = format!(
        r#"#!/bin/sh
# isoenv: redis-cli for this environment, at {host}:{port} unless the command line says otherwise.
own={bin}
real=
IFS=:
for dir in $PATH; do
    [ "$dir" = "$own" ] && continue
    if [ -x "$dir/redis-cli" ]; then real="$dir/redis-cli"; break; fi
done
unset IFS
[ -n "$real" ] || {{ echo "isoenv: redis-cli is not installed" >&2; exit 127; }}
for arg in "$@"; do
    case "$arg" in -h|-p|-s|-u|--host|--port|--socket|--uri) exec "$real" "$@" ;; esac
done
exec "$real" -h {host} -p {port} "$@"
"#,
        bin = crate::sys::shell::quote(&layout.bin.display().to_string()),
        host = crate::sys::shell::quote(&endpoint.host),
        port = endpoint.port,
    );
    let path = layout.bin.join("redis-cli");
    write_private(&path, script.as_bytes())?;
    std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o700))
}
