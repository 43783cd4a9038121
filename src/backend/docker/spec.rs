//! The docker backend's decisions, all pure: names, labels, the container's configuration, which
//! image, what a container's state means.

use std::collections::HashMap;
use std::io;
use std::path::{Path, PathBuf};

use bollard::models::{
    ContainerCreateBody, HostConfig, Mount, MountType, PortBinding, RestartPolicy,
    RestartPolicyNameEnum,
};
use nix::sys::signal::Signal;

use super::client::Observed;
use crate::backend::manifest::{Defaults, Manifest, Mode};
use crate::backend::Status;
use crate::engine::{Container, EngineKind, CONTAINER_UID};
use crate::sys::process::ProcessId;

/// The default manifest of a container: no host paths (the data is in the volume), the port
/// (0: Docker picks a free one at each start), the limits; the image's own environment is kept.
pub fn default_manifest(port: u16, memory: u64) -> Manifest {
    let mut manifest = Manifest::defaults(&Defaults {
        read_only: &[],
        read_write: &[],
        port,
        memory,
    });
    manifest.env.clear();
    manifest
}

/// How the engine's files (see [`Container::files`]) reach a container.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Handover {
    /// Bound read-only from files in this host directory (the engine runs on this machine, and
    /// isoenv as root): nothing is copied into the container, which would cost Docker a
    /// chrooted untar (40-60 ms, the whole gap between a create and a plain `docker run`).
    Bind(PathBuf),
    /// Copied into the container before it first starts: the engine is elsewhere, or isoenv
    /// is not root.
    Upload,
}

impl Handover {
    /// Binding needs the engine to see this machine's files (its socket is this machine's;
    /// TCP, even to loopback, may be a tunnel to another machine, and `ssh://` is one), and the
    /// files to be the container's service uid's, mode 0400, which only `root` can make.
    pub fn for_engine(docker_host: Option<&str>, root: bool, dir: &Path) -> Handover {
        match docker_host.and_then(|h| h.split_once("://")) {
            None | Some(("unix", _)) if root => Handover::Bind(dir.to_owned()),
            _ => Handover::Upload,
        }
    }
}

/// The host file in `dir` that holds the container's file `path`: the path, flattened.
pub fn bound_file(dir: &Path, path: &str) -> PathBuf {
    dir.join(path.trim_start_matches('/').replace('/', "_"))
}

/// The engine's files for a container (see [`Container::files`]) as a tar archive to extract at
/// `/`. Only files: Docker makes missing parent directories, and existing ones stay as the
/// image has them.
pub fn files_archive(files: &[(&str, String)]) -> io::Result<Vec<u8>> {
    let mut tar = tar::Builder::new(Vec::new());
    for (path, contents) in files {
        let mut h = tar::Header::new_gnu();
        h.set_mode(0o400);
        h.set_uid(CONTAINER_UID.into());
        h.set_gid(CONTAINER_UID.into());
        h.set_size(contents.len() as u64);
        tar.append_data(&mut h, path.trim_start_matches('/'), contents.as_bytes())?;
    }
    tar.into_inner()
}

pub const PROJECT_LABEL: &str = "isoenv.project";
pub const ENV_LABEL: &str = "isoenv.env";
pub const OWNER_LABEL: &str = "isoenv.owner";
const ROOT_LABEL: &str = "isoenv.root";
const ENGINE_LABEL: &str = "isoenv.engine";

/// One state root on one machine: what owns containers and volumes. Two checkouts (or two
/// machines sharing a remote engine) never share names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Project {
    pub id: String,
    root: String,
}

impl Project {
    pub fn new(machine: &str, root: &Path) -> Self {
        let root = root.display().to_string();
        let hash = crate::sys::hash::fnv1a(&format!("{machine}\0{root}"));
        Project {
            id: format!("{:08x}", hash as u32),
            root: format!("{machine}:{root}"),
        }
    }

    /// The label filter that finds everything of this project.
    pub fn filter(&self) -> String {
        format!("{PROJECT_LABEL}={}", self.id)
    }

    pub fn container(&self, env: &str) -> String {
        format!("isoenv-{}-{env}", self.id)
    }

    pub fn volume(&self, env: &str) -> String {
        format!("isoenv-{}-{env}-data", self.id)
    }

    pub fn labels(
        &self,
        env: &str,
        engine: EngineKind,
        owner: Option<ProcessId>,
    ) -> HashMap<String, String> {
        let mut labels = HashMap::from([
            (PROJECT_LABEL.to_owned(), self.id.clone()),
            (ROOT_LABEL.to_owned(), self.root.clone()),
            (ENV_LABEL.to_owned(), env.to_owned()),
            (ENGINE_LABEL.to_owned(), engine.to_string()),
        ]);
        if let Some(o) = owner {
            labels.insert(
                OWNER_LABEL.to_owned(),
                format!("{}:{}", o.pid, o.start_time),
            );
        }
        labels
    }
}

/// The variable naming the address on a remote engine's host that containers publish on.
pub const PUBLISH_VAR: &str = "ISOENV_DOCKER_PUBLISH_IP";

/// Where a container's port is published on the engine's host, and where clients reach it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reach {
    pub publish_ip: String,
    pub client_host: String,
}

impl Reach {
    /// Loopback for a local engine. For a remote one (`DOCKER_HOST=tcp://HOST:PORT`), where
    /// a loopback binding is out of reach: the address `publish` names (`ISOENV_DOCKER_PUBLISH_IP`,
    /// one of the engine host's own), else HOST when it is an address, else every address of
    /// the engine's host; clients connect to the published address, or HOST when that is
    /// every address.
    pub fn of(docker_host: Option<&str>, publish: Option<&str>) -> Reach {
        let remote = docker_host
            .and_then(|h| h.split_once("://"))
            .filter(|(scheme, _)| matches!(*scheme, "tcp" | "http" | "https"))
            .map(|(_, rest)| rest.split(['/', '?']).next().unwrap_or_default())
            .map(|authority| match authority.rsplit_once(':') {
                Some((host, _)) => host.trim_matches(['[', ']']).to_owned(),
                None => authority.to_owned(),
            })
            .filter(|h| !h.is_empty() && !is_loopback(h));
        let Some(host) = remote else {
            return Reach {
                publish_ip: "127.0.0.1".into(),
                client_host: "127.0.0.1".into(),
            };
        };
        let address = |a: &str| a.parse::<std::net::IpAddr>().ok();
        let publish_ip = match publish {
            Some(ip) => ip.to_owned(),
            None if address(&host).is_some() => host.clone(),
            None => "0.0.0.0".into(),
        };
        let client_host = match address(&publish_ip) {
            Some(ip) if !ip.is_unspecified() => publish_ip.clone(),
            _ => host,
        };
        Reach {
            publish_ip,
            client_host,
        }
    }

    /// What publishing there exposes, in words for `inspect`.
    pub fn exposure(&self, port: u16) -> String {
        if self.publish_ip == "127.0.0.1" {
            return format!("127.0.0.1:{port} of this machine only");
        }
        format!(
            "{}:{port} of the Docker engine's host: anyone who can reach that address can try to log in (the password is always required; set {PUBLISH_VAR} to narrow it)",
            self.publish_ip
        )
    }
}

/// Whether the engine publishes ports on this machine (its socket, or TCP to loopback), so that
/// a port found free here can be given to a container for good.
pub fn publishes_here(docker_host: Option<&str>) -> bool {
    match docker_host.and_then(|h| h.split_once("://")) {
        None => true,
        Some(("unix", _)) => true,
        Some(("tcp" | "http" | "https", _)) => {
            Reach::of(docker_host, None).client_host == "127.0.0.1"
        }
        Some(_) => false,
    }
}

fn is_loopback(host: &str) -> bool {
    host == "localhost"
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// Everything a container is made from.
pub struct Plan<'a> {
    pub image: &'a str,
    pub container: &'a Container,
    pub manifest: &'a Manifest,
    pub labels: HashMap<String, String>,
    pub volume: &'a str,
    pub hostname: String,
    pub publish_ip: &'a str,
    pub stop_signal: Signal,
    pub handover: &'a Handover,
}

/// The server's port inside, as Docker names it.
fn port_key(container: &Container) -> String {
    format!("{}/tcp", container.port)
}

/// The container's configuration: the engine's interface, the manifest's port, binds, limits
/// and variables, the volume at the data path.
pub fn create_body(plan: &Plan) -> ContainerCreateBody {
    let c = plan.container;
    let m = plan.manifest;
    let port = port_key(c);
    let host_port = match m.network.expose.port() {
        0 => String::new(),
        p => p.to_string(),
    };
    let mut mounts = vec![Mount {
        target: Some(c.data.to_owned()),
        source: Some(plan.volume.to_owned()),
        typ: Some(MountType::VOLUME),
        ..Default::default()
    }];
    mounts.extend(m.fs.iter().map(|b| Mount {
        target: Some(b.guest().display().to_string()),
        source: Some(b.host.display().to_string()),
        typ: Some(MountType::BIND),
        read_only: Some(b.mode == Mode::Ro),
        ..Default::default()
    }));
    if let Handover::Bind(dir) = plan.handover {
        mounts.extend(c.files.iter().map(|(path, _)| Mount {
            target: Some((*path).to_owned()),
            source: Some(bound_file(dir, path).display().to_string()),
            typ: Some(MountType::BIND),
            read_only: Some(true),
            ..Default::default()
        }));
    }
    let env = c
        .env
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .chain(m.env.iter().map(|(k, v)| format!("{k}={v}")))
        .collect();
    let memory = i64::try_from(m.limits.memory.0).unwrap_or(i64::MAX);
    ContainerCreateBody {
        image: Some(plan.image.to_owned()),
        cmd: Some(c.cmd.clone()),
        env: Some(env),
        labels: Some(plan.labels.clone()),
        hostname: Some(plan.hostname.clone()),
        exposed_ports: Some(vec![port.clone()]),
        stop_signal: Some(plan.stop_signal.as_str().to_owned()),
        host_config: Some(HostConfig {
            port_bindings: Some(HashMap::from([(
                port,
                Some(vec![PortBinding {
                    host_ip: Some(plan.publish_ip.to_owned()),
                    host_port: Some(host_port),
                }]),
            )])),
            mounts: Some(mounts),
            // Nothing in the container gains privileges through exec (setuid files, file
            // capabilities); isoenv's own images run as their service user from the start and
            // need no capability at all. Other images' entrypoints may switch users as root.
            security_opt: Some(vec!["no-new-privileges".into()]),
            cap_drop: plan
                .image
                .starts_with(super::image::LOCAL_PREFIX)
                .then(|| vec!["ALL".into()]),
            memory: Some(memory),
            // No swap beyond the memory limit, as in the sandbox.
            memory_swap: Some(memory),
            nano_cpus: Some((m.limits.cpu * 1e9) as i64),
            pids_limit: Some(m.limits.pids.into()),
            // isoenv decides when a server runs; Docker never restarts one behind its back.
            restart_policy: Some(RestartPolicy {
                name: Some(RestartPolicyNameEnum::NO),
                maximum_retry_count: None,
            }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// What the environment's status is, from whether isoenv left it started and what Docker
/// reports (`None`: the container is gone).
pub fn status(started: bool, observed: Option<&Observed>) -> Status {
    match observed {
        None => Status::Missing,
        Some(o) if o.running => Status::Running,
        Some(_) if started => Status::Crashed,
        Some(_) => Status::Stopped,
    }
}

/// The image to use when the wanted one is neither here nor pullable: a local isoenv image of
/// the engine, but only in place of the default (an image asked for by name is never swapped).
pub fn fallback(
    engine: EngineKind,
    wanted: &str,
    asked_by_name: bool,
    pull_error: &str,
    local: &[String],
) -> Result<String, String> {
    if !asked_by_name {
        if let Some(best) = local.iter().max() {
            return Ok(best.clone());
        }
    }
    let hint = if asked_by_name {
        format!("build it with `cargo xtask image build {engine}` if it is isoenv's local image, or check the reference")
    } else {
        format!("build a local image from this machine's {engine} with `cargo xtask image build {engine}`, or name one with --image or ISOENV_{}_IMAGE", engine.as_str().to_ascii_uppercase())
    };
    Err(format!(
        "image {wanted} is not on the Docker engine and cannot be pulled ({pull_error}); {hint}"
    ))
}

/// What the environment a container or volume is labelled with says of it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Claimed {
    /// No directory: isoenv makes it first and removes it last, so the environment is gone.
    Gone,
    /// A record that names an owner, or none readable: the labels' owner decides.
    Owned,
    /// A record with no owner: an environment kept after its run (`--keep`), whose resources
    /// still carry the run's owner label (Docker's labels cannot change).
    Kept,
}

/// Whether a labelled container or volume is garbage: the environment it belongs to is gone,
/// or its owner is and the environment was not kept.
pub fn is_leftover(
    labels: &HashMap<String, String>,
    alive: impl Fn(&ProcessId) -> bool,
    env: impl Fn(&str) -> Claimed,
) -> bool {
    let owner_gone = labels.get(OWNER_LABEL).is_some_and(|o| {
        let parsed = o
            .split_once(':')
            .and_then(|(pid, start)| Some((pid.parse().ok()?, start.parse().ok()?)));
        match parsed {
            Some((pid, start_time)) => !alive(&ProcessId { pid, start_time }),
            None => false,
        }
    });
    match labels.get(ENV_LABEL).map(|e| env(e)) {
        Some(Claimed::Gone) => true,
        Some(Claimed::Kept) => false,
        Some(Claimed::Owned) | None => owner_gone,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::manifest::Bind;

    fn container() -> Container {
        Container {
            image: "postgres:15",
            port: 5432,
            data: "/var/lib/postgresql/data",
            env: vec![("POSTGRES_USER", "postgres".into())],
            cmd: vec!["postgres".into()],
            files: vec![],
        }
    }

    fn manifest(port: u16) -> Manifest {
        default_manifest(port, 256 << 20)
    }

    #[test]
    fn files_are_the_service_accounts_and_private() {
        let tar = files_archive(&[("/isoenv/password", "pw".into())]).unwrap();
        let mut archive = tar::Archive::new(tar.as_slice());
        let entries: Vec<_> = archive
            .entries()
            .unwrap()
            .map(|e| {
                let e = e.unwrap();
                let h = e.header();
                (
                    e.path().unwrap().display().to_string(),
                    h.mode().unwrap(),
                    h.uid().unwrap(),
                    h.size().unwrap(),
                )
            })
            .collect();
        assert_eq!(entries, [("isoenv/password".to_owned(), 0o400, 999, 2)]);
    }

    #[test]
    fn projects_name_and_label_per_machine_and_root() {
        let a = Project::new("host1", Path::new("/repo/.isoenv"));
        assert_eq!(a, Project::new("host1", Path::new("/repo/.isoenv")));
        assert_ne!(a.id, Project::new("host2", Path::new("/repo/.isoenv")).id);
        assert_ne!(a.id, Project::new("host1", Path::new("/other/.isoenv")).id);
        assert_eq!(a.container("dev"), format!("isoenv-{}-dev", a.id));
        assert_eq!(a.volume("dev"), format!("isoenv-{}-dev-data", a.id));
        let owner = ProcessId {
            pid: 42,
            start_time: 7,
        };
        let labels = a.labels("dev", EngineKind::Redis, Some(owner));
        assert_eq!(labels[PROJECT_LABEL], a.id);
        assert_eq!(labels[ENV_LABEL], "dev");
        assert_eq!(labels[ENGINE_LABEL], "redis");
        assert_eq!(labels[OWNER_LABEL], "42:7");
        assert_eq!(labels[ROOT_LABEL], "host1:/repo/.isoenv");
        assert!(!a
            .labels("dev", EngineKind::Redis, None)
            .contains_key(OWNER_LABEL));
    }

    #[test]
    fn ports_stay_on_loopback_unless_the_engine_is_remote() {
        let reach = |h: Option<&str>, p: Option<&str>| {
            let r = Reach::of(h, p);
            (r.publish_ip, r.client_host)
        };
        let local = ("127.0.0.1".to_owned(), "127.0.0.1".to_owned());
        assert_eq!(reach(None, None), local);
        assert_eq!(reach(Some("unix:///var/run/docker.sock"), None), local);
        assert_eq!(reach(Some("tcp://127.0.0.1:2375"), Some("10.0.0.1")), local);
        assert_eq!(reach(Some("tcp://localhost:2375"), None), local);
        let pair = |a: &str, b: &str| (a.to_owned(), b.to_owned());
        // A name: every address of the engine's host, reached by that name.
        assert_eq!(
            reach(Some("tcp://build-box:2376"), None),
            pair("0.0.0.0", "build-box")
        );
        // An address: that one only.
        assert_eq!(
            reach(Some("tcp://10.1.2.3:2376"), None),
            pair("10.1.2.3", "10.1.2.3")
        );
        // The address asked for, reached there.
        assert_eq!(
            reach(Some("tcp://build-box:2376"), Some("10.9.9.9")),
            pair("10.9.9.9", "10.9.9.9")
        );
        assert_eq!(
            reach(Some("https://[2001:db8::1]:2376/"), None).1,
            "2001:db8::1"
        );
        assert!(Reach::of(Some("tcp://10.1.2.3:2376"), None)
            .exposure(5432)
            .contains("password is always required"));
    }

    #[test]
    fn the_body_publishes_on_loopback_with_limits_volume_and_binds() {
        let mut m = manifest(0);
        m.fs.push(Bind {
            host: "/srv/init".into(),
            guest: Some("/docker-entrypoint-initdb.d".into()),
            mode: Mode::Ro,
        });
        m.env.insert("TZ".into(), "UTC".into());
        m.limits.cpu = 0.5;
        let c = container();
        let body = create_body(&Plan {
            image: "isoenv/postgres:15-local",
            container: &c,
            manifest: &m,
            labels: HashMap::from([("k".into(), "v".into())]),
            volume: "vol",
            hostname: "isoenv-dev".into(),
            publish_ip: "127.0.0.1",
            stop_signal: Signal::SIGINT,
            handover: &Handover::Upload,
        });
        assert_eq!(body.image.as_deref(), Some("isoenv/postgres:15-local"));
        assert_eq!(body.stop_signal.as_deref(), Some("SIGINT"));
        assert_eq!(body.env.unwrap(), ["POSTGRES_USER=postgres", "TZ=UTC"]);
        assert_eq!(body.exposed_ports.unwrap(), ["5432/tcp"]);
        let host = body.host_config.unwrap();
        let binding = &host.port_bindings.unwrap()["5432/tcp"].clone().unwrap()[0];
        assert_eq!(binding.host_ip.as_deref(), Some("127.0.0.1"));
        assert_eq!(
            binding.host_port.as_deref(),
            Some(""),
            "0 asks Docker for a free port"
        );
        assert_eq!(host.memory, Some(256 << 20));
        assert_eq!(host.memory_swap, Some(256 << 20));
        assert_eq!(host.nano_cpus, Some(500_000_000));
        assert_eq!(host.pids_limit, Some(256));
        let mounts = host.mounts.unwrap();
        assert_eq!(mounts[0].source.as_deref(), Some("vol"));
        assert_eq!(
            mounts[0].target.as_deref(),
            Some("/var/lib/postgresql/data")
        );
        assert_eq!(mounts[0].typ, Some(MountType::VOLUME));
        assert_eq!(mounts[1].typ, Some(MountType::BIND));
        assert_eq!(mounts[1].read_only, Some(true));
        assert_eq!(mounts.len(), 2, "uploaded files are not mounts");

        let fixed = create_body(&Plan {
            manifest: &manifest(6000),
            image: "x",
            container: &c,
            labels: HashMap::new(),
            volume: "v",
            hostname: "h".into(),
            publish_ip: "127.0.0.1",
            stop_signal: Signal::SIGTERM,
            handover: &Handover::Upload,
        });
        let bindings = fixed.host_config.unwrap().port_bindings.unwrap();
        assert_eq!(
            bindings["5432/tcp"].as_ref().unwrap()[0]
                .host_port
                .as_deref(),
            Some("6000")
        );
    }

    #[test]
    fn a_local_engine_gets_the_files_bound_read_only_a_remote_one_uploaded() {
        let dir = Path::new("/p/.isoenv/dev/secrets");
        let bind = Handover::Bind(dir.to_owned());
        assert_eq!(Handover::for_engine(None, true, dir), bind);
        assert_eq!(
            Handover::for_engine(Some("unix:///run/user/1000/docker.sock"), true, dir),
            bind
        );
        assert_eq!(Handover::for_engine(None, false, dir), Handover::Upload);
        for remote in ["tcp://127.0.0.1:2375", "tcp://box:2376", "ssh://me@box"] {
            assert_eq!(
                Handover::for_engine(Some(remote), true, dir),
                Handover::Upload
            );
        }
        let mut c = container();
        c.files = vec![
            ("/isoenv/password", "pw".into()),
            ("/docker-entrypoint-initdb.d/isoenv.sql", "sql".into()),
        ];
        let body = create_body(&Plan {
            image: "x",
            container: &c,
            manifest: &manifest(0),
            labels: HashMap::new(),
            volume: "v",
            hostname: "h".into(),
            publish_ip: "127.0.0.1",
            stop_signal: Signal::SIGTERM,
            handover: &bind,
        });
        let mounts = body.host_config.unwrap().mounts.unwrap();
        let bound: Vec<_> = mounts[1..]
            .iter()
            .map(|m| {
                assert_eq!((m.typ, m.read_only), (Some(MountType::BIND), Some(true)));
                (m.source.clone().unwrap(), m.target.clone().unwrap())
            })
            .collect();
        assert_eq!(
            bound,
            [
                (
                    "/p/.isoenv/dev/secrets/isoenv_password".to_owned(),
                    "/isoenv/password".to_owned()
                ),
                (
                    "/p/.isoenv/dev/secrets/docker-entrypoint-initdb.d_isoenv.sql".to_owned(),
                    "/docker-entrypoint-initdb.d/isoenv.sql".to_owned()
                )
            ]
        );
    }

    #[test]
    fn status_from_record_and_observation() {
        let seen = |running| Observed {
            running,
            exit_code: 0,
            oom_killed: false,
            host_port: None,
            memory: 0,
            nano_cpus: 0,
            pids_limit: 0,
        };
        assert_eq!(status(true, None), Status::Missing);
        assert_eq!(status(false, None), Status::Missing);
        assert_eq!(status(true, Some(&seen(true))), Status::Running);
        assert_eq!(status(true, Some(&seen(false))), Status::Crashed);
        assert_eq!(status(false, Some(&seen(false))), Status::Stopped);
    }

    #[test]
    fn only_the_default_image_falls_back_to_a_local_one() {
        let local = [
            "isoenv/postgres:14-local".to_owned(),
            "isoenv/postgres:15-local".to_owned(),
        ];
        let pg = EngineKind::Postgres;
        assert_eq!(
            fallback(pg, "postgres:15", false, "no registry", &local),
            Ok("isoenv/postgres:15-local".to_owned())
        );
        let named = fallback(pg, "postgres:16", true, "no registry", &local).unwrap_err();
        assert!(
            named.contains("postgres:16") && named.contains("no registry"),
            "{named}"
        );
        let none = fallback(pg, "postgres:15", false, "no registry", &[]).unwrap_err();
        assert!(none.contains("cargo xtask image build postgres"), "{none}");
        assert!(none.contains("ISOENV_POSTGRES_IMAGE"), "{none}");
    }

    #[test]
    fn leftovers_are_owned_by_the_dead_and_not_kept_or_have_no_directory() {
        let mut labels = HashMap::from([(ENV_LABEL.to_owned(), "dev".to_owned())]);
        let live = ProcessId {
            pid: 42,
            start_time: 7,
        };
        let alive = |p: &ProcessId| *p == live;
        assert!(!is_leftover(&labels, alive, |_| Claimed::Owned));
        assert!(is_leftover(&labels, alive, |_| Claimed::Gone));
        labels.insert(OWNER_LABEL.into(), "42:7".into());
        assert!(!is_leftover(&labels, alive, |_| Claimed::Owned));
        labels.insert(OWNER_LABEL.into(), "42:8".into());
        assert!(
            is_leftover(&labels, alive, |_| Claimed::Owned),
            "a recycled pid"
        );
        assert!(
            !is_leftover(&labels, alive, |_| Claimed::Kept),
            "kept after its run"
        );
        assert!(is_leftover(&labels, alive, |_| Claimed::Gone));
    }

    #[test]
    fn only_an_engine_on_this_machine_gets_a_fixed_port() {
        assert!(publishes_here(None));
        assert!(publishes_here(Some("unix:///var/run/docker.sock")));
        assert!(publishes_here(Some("tcp://127.0.0.1:2375")));
        assert!(!publishes_here(Some("tcp://build-box:2376")));
        assert!(!publishes_here(Some("ssh://me@build-box")));
    }
}
