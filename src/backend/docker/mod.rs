//! The docker backend: the real server in a container made through the Docker API, its data in a
//! named volume, published on loopback, labelled so that isoenv finds everything it made. The
//! decisions are pure, in [`spec`]; [`client`] makes the calls; this module composes them into
//! the [`Backend`] lifecycle and records the container like any other server (so `list`, `url`,
//! the exports and the activate script work the same).

pub mod client;
pub mod image;
pub mod spec;
pub mod ssh;

use std::collections::HashMap;
use std::fs;
use std::path::Path;
use std::thread::sleep;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::manifest::{self, Bytes, Manifest};
use super::{
    Backend, BackendKind, CreateOptions, Enforcement, EnvState, Host, Isolation, Started, Status,
    READY_TIMEOUT, STOP_GRACE,
};
use crate::engine::{wait_ready, Credentials, Endpoint, Engine, CONTAINER_UID};
use crate::error::{Error, IoContext, Result};
use crate::layout::Layout;
use crate::sys::process::{ProcessId, ServiceUser};
use crate::sys::secret::Secret;
use crate::sys::{files, net};
use client::{Docker as Client, Observed};
use image::SOURCE_LABEL;
use spec::{Handover, Plan, Project};

/// How long Docker may still be making a container whose creator was killed.
const MAKING_TIMEOUT: Duration = Duration::from_secs(30);
/// How often a starting container is asked whether it still runs (between protocol probes).
const LIVENESS_EVERY: Duration = Duration::from_millis(100);

/// The docker backend's own part of an environment's record.
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
    /// On an `ssh://` engine: the port published on the engine's host that the environment's
    /// own port here is forwarded to, while it runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub forwarded: Option<u16>,
}

pub struct Docker;

impl Backend for Docker {
    fn kind(&self) -> BackendKind {
        BackendKind::Docker
    }

    fn noun(&self) -> &'static str {
        "container"
    }

    fn create(
        &self,
        host: &dyn Host,
        opts: &CreateOptions,
        layout: &Layout,
        progress: &dyn Fn(&str),
    ) -> Result<EnvState> {
        let docker = host.docker()?;
        let engine = opts.engine.engine();
        let creds = engine.credentials(Secret::generate());
        let (image, version) = image_for(
            host,
            docker,
            engine,
            &creds,
            opts.image.as_deref(),
            progress,
        )?;
        let project = project(host);
        let container = ContainerRecord {
            name: project.container(&opts.name),
            volume: project.volume(&opts.name),
            image,
            docker_host: host.docker_host().map(str::to_owned),
            started: false,
            forwarded: None,
        };
        // A port of its own for good, so that an activated shell stays right across starts
        // (through SSH: the local end of the forward); an engine elsewhere picks one at each
        // start (0).
        let tunnelled = docker.link.is_some();
        let port = match opts.port {
            Some(port) => port,
            None if tunnelled || spec::publishes_here(host.docker_host()) => {
                net::free_port().context(|| "cannot find a free port on 127.0.0.1".into())?
            }
            None => 0,
        };
        let mut state = EnvState::new(opts, reach(host).client_host, port);
        state.engine_version = version;
        state.container = Some(container);
        layout
            .make()
            .and_then(|()| {
                let published = if tunnelled { 0 } else { state.port };
                let manifest = spec::default_manifest(published, host.memory_limit());
                fs::write(layout.dir.join(manifest::FILE), manifest.to_json())
            })
            .context(|| format!("cannot set up {}", layout.dir.display()))?;
        // Recorded before anything exists in Docker: a killed create is found and removed.
        state.store(layout)?;
        host.write_client_files(&state, layout, &creds, &ServiceUser::invoker())
            .context(|| format!("cannot write the client files in {}", layout.dir.display()))?;
        progress(&format!(
            "creating container {} from {}",
            record(&state).name,
            record(&state).image
        ));
        make_container(host, docker, &state, layout, &creds, true)?;
        run_container(host, &mut state, layout, &creds, progress)?;
        Ok(state)
    }

    /// Starts a stopped, crashed or missing container. A container removed behind isoenv's
    /// back is made again, on its volume when that is still there.
    fn start(
        &self,
        host: &dyn Host,
        state: &mut EnvState,
        layout: &Layout,
        progress: &dyn Fn(&str),
    ) -> Result<Started> {
        let docker = docker_for(host, state)?;
        let creds = host.credentials(layout)?;
        let record = record(state).clone();
        match docker.inspect(&record.name)? {
            Some(o) if o.running => {
                // A new SSH connection (the old one dropped) carries no forward yet.
                if let (Some(link), Some(remote)) = (&docker.link, record.forwarded) {
                    let _ = link.forward(state.port, remote);
                }
                return Ok(Started::Already);
            }
            Some(_) => {}
            None => {
                if docker.image(&record.image)?.is_none() {
                    return Err(Error::Env {
                        name: state.name.clone(),
                        message: format!(
                            "its container {} was removed outside isoenv, and its image {} is gone too; get the image back (`docker pull {}`, or `cargo xtask image build {}` for isoenv's local image) and start again, or destroy the environment",
                            record.name, record.image, record.image, state.engine
                        ),
                    });
                }
                let kept = docker.volume_exists(&record.volume)?;
                progress(&if kept {
                    format!("container {} was removed outside isoenv; making it again on volume {} (data kept)", record.name, record.volume)
                } else {
                    format!("container {} and its volume {} were removed outside isoenv; making both again (the data is lost)", record.name, record.volume)
                });
                make_container(host, docker, state, layout, &creds, !kept)?;
            }
        }
        run_container(host, state, layout, &creds, progress)?;
        Ok(Started::Now)
    }

    fn stop(&self, host: &dyn Host, state: &mut EnvState, layout: &Layout) -> Result<()> {
        let docker = docker_for(host, state)?;
        docker.stop(&record(state).name, STOP_GRACE)?;
        unforward(docker, state);
        record_mut(state).started = false;
        record_mut(state).forwarded = None;
        state.store(layout)
    }

    fn status(&self, host: &dyn Host, state: &EnvState) -> Status {
        observe(host, state).0
    }

    /// Removes the container and its volume (the environment's data). A container that a
    /// killed `create` left is unknown to Docker by name until Docker finishes making it (it
    /// fills the new volume first), while its volume is already in use: that is waited out.
    fn teardown(&self, host: &dyn Host, state: &EnvState, _layout: &Layout) -> Result<()> {
        let docker = docker_for(host, state)?;
        let record = record(state);
        unforward(docker, state);
        let deadline = Instant::now() + MAKING_TIMEOUT;
        loop {
            docker.remove_container(&record.name)?;
            match docker.remove_volume(&record.volume) {
                Err(e) if e.is_conflict() && Instant::now() < deadline => {
                    sleep(Duration::from_millis(50))
                }
                other => {
                    other?;
                    close_link_if_unused(host, docker, &state.name);
                    return Ok(());
                }
            }
        }
    }

    fn handle(&self, state: &EnvState) -> Option<String> {
        Some(record(state).name.clone())
    }

    /// A container's socket is out of the host's reach.
    fn endpoint(&self, state: &EnvState, _layout: &Layout) -> Endpoint {
        super::tcp_only(state)
    }

    /// The container's last output.
    fn logs(
        &self,
        host: &dyn Host,
        state: &EnvState,
        _layout: &Layout,
        lines: usize,
    ) -> Result<String> {
        Ok(docker_for(host, state)?.logs(&record(state).name, lines)?)
    }

    /// The manifest and, per limit, what Docker applied to the container.
    fn isolation(&self, host: &dyn Host, state: &EnvState, layout: &Layout) -> Option<Isolation> {
        let file = layout.dir.join(manifest::FILE);
        let manifest = Manifest::load(&file);
        let (status, observed) = observe(host, state);
        let limits = match (&manifest, &observed) {
            (Ok(m), Some(o)) => vec![
                applied(
                    "memory",
                    Bytes(m.limits.memory.0).to_string(),
                    "docker HostConfig.Memory",
                    m.limits.memory.0 as i64,
                    o.memory,
                ),
                applied(
                    "cpu",
                    m.limits.cpu.to_string(),
                    "docker HostConfig.NanoCpus",
                    (m.limits.cpu * 1e9) as i64,
                    o.nano_cpus,
                ),
                applied(
                    "pids",
                    m.limits.pids.to_string(),
                    "docker HostConfig.PidsLimit",
                    m.limits.pids.into(),
                    o.pids_limit,
                ),
            ],
            _ => Vec::new(),
        };
        Some(Isolation {
            manifest_file: file,
            manifest: manifest.map_err(|e| e.to_string()),
            running: status == Status::Running,
            init_pid: None,
            exposed: Some({
                let published = observed.as_ref().and_then(|o| o.host_port);
                let tunnelled = host.docker().is_ok_and(|d| d.link.is_some());
                match (tunnelled, published) {
                    (true, Some(p)) => format!("127.0.0.1:{p} of the Docker engine's host, forwarded over SSH to 127.0.0.1:{} here only", state.port),
                    (_, p) => reach(host).exposure(p.unwrap_or(state.port)),
                }
            }),
            limits,
        })
    }

    /// This project's containers and volumes that no environment accounts for any more.
    fn leftovers(&self, host: &dyn Host) -> Result<Vec<String>> {
        let docker = host.docker()?;
        let filter = project(host).filter();
        let claimed = |env: &str| {
            let dir = host.root().join(env);
            if !dir.is_dir() {
                return spec::Claimed::Gone;
            }
            match EnvState::load(&Layout::new(dir)) {
                Ok(Some(state)) if state.owner.is_none() => spec::Claimed::Kept,
                _ => spec::Claimed::Owned,
            }
        };
        let leftover = |labels: &HashMap<String, String>| {
            spec::is_leftover(labels, ProcessId::is_alive, claimed)
        };
        let mut removed = Vec::new();
        for c in docker.containers_labelled(&filter)? {
            if leftover(&c.labels) {
                docker.remove_container(&c.name)?;
                removed.push(format!("container {}", c.name));
            }
        }
        for v in docker.volumes_labelled(&filter)? {
            if leftover(&v.labels) {
                docker.remove_volume(&v.name)?;
                removed.push(format!("volume {}", v.name));
            }
        }
        Ok(removed)
    }
}

/// What Docker says of the environment (`unknown` when the engine cannot be reached).
fn observe(host: &dyn Host, state: &EnvState) -> (Status, Option<Observed>) {
    let Ok(docker) = docker_for(host, state) else {
        return (Status::Unknown, None);
    };
    let record = record(state);
    match docker.inspect(&record.name) {
        Ok(o) => (spec::status(record.started, o.as_ref()), o),
        Err(_) => (Status::Unknown, None),
    }
}

/// The engine an environment's container lives on, which must be the one configured now
/// (otherwise its container would look missing and `start` would make a second one).
fn docker_for<'h>(host: &'h dyn Host, state: &EnvState) -> Result<&'h Client> {
    let recorded = &record(state).docker_host;
    if recorded.as_deref() != host.docker_host() {
        let on = |h: &Option<String>| match h {
            Some(h) => format!("DOCKER_HOST={h}"),
            None => "the local engine (DOCKER_HOST unset)".to_owned(),
        };
        return Err(Error::Env {
            name: state.name.clone(),
            message: format!(
                "its container lives on {}, but this command talks to {}; set DOCKER_HOST accordingly",
                on(recorded),
                on(&host.docker_host().map(str::to_owned))
            ),
        });
    }
    host.docker()
}

/// Where this engine's containers publish their port, and where clients reach it.
fn reach(host: &dyn Host) -> spec::Reach {
    spec::Reach::of(host.docker_host(), host.vars().get(spec::PUBLISH_VAR))
}

/// This state root on this machine, which owns the containers and volumes.
fn project(host: &dyn Host) -> Project {
    let root = fs::canonicalize(host.root()).unwrap_or_else(|_| host.root().to_owned());
    let machine = nix::unistd::gethostname()
        .map(|h| h.to_string_lossy().into_owned())
        .unwrap_or_default();
    Project::new(&machine, &root)
}

/// The image for a new environment: the one asked for (`--image`, else
/// `ISOENV_<ENGINE>_IMAGE`), else the official default; pulled when missing; the default
/// falls back to isoenv's local image of the engine when it cannot be pulled. Returns the
/// reference and the engine version it holds, as far as it is known.
fn image_for(
    host: &dyn Host,
    docker: &Client,
    engine: &dyn Engine,
    creds: &Credentials,
    asked: Option<&str>,
    progress: &dyn Fn(&str),
) -> Result<(String, String)> {
    let kind = engine.kind();
    let var = format!("ISOENV_{}_IMAGE", kind.as_str().to_ascii_uppercase());
    let asked = asked.or_else(|| host.vars().get(&var));
    let wanted = asked.unwrap_or(engine.container(creds, false).image);
    let chosen = if docker.image(wanted)?.is_some() {
        wanted.to_owned()
    } else {
        progress(&format!("pulling {wanted}"));
        match docker.pull(wanted) {
            Ok(()) => wanted.to_owned(),
            Err(e) => {
                let cause = match &e {
                    crate::backend::docker::client::DockerError::Api { message, .. } => {
                        message.clone()
                    }
                    other => other.to_string(),
                };
                let local = docker.images_labelled(&format!("{}={kind}", image::ENGINE_LABEL))?;
                let fallback = spec::fallback(kind, wanted, asked.is_some(), &cause, &local)
                    .map_err(|message| Error::Image {
                        reference: wanted.to_owned(),
                        message,
                    })?;
                progress(&format!(
                    "{wanted} cannot be pulled; using the local image {fallback}"
                ));
                fallback
            }
        }
    };
    let labels = docker.image(&chosen)?.map(|i| i.labels).unwrap_or_default();
    let version = match labels.get(SOURCE_LABEL) {
        Some(source) => source
            .split_whitespace()
            .next()
            .unwrap_or_default()
            .to_owned(),
        None => chosen
            .rsplit_once(':')
            .map_or("latest", |(_, tag)| tag)
            .to_owned(),
    };
    Ok((chosen, version))
}

/// Makes the environment's container (and, when `new_volume`, its volume) from its
/// manifest, and hands it the engine's files.
fn make_container(
    host: &dyn Host,
    docker: &Client,
    state: &EnvState,
    layout: &Layout,
    creds: &Credentials,
    new_volume: bool,
) -> Result<()> {
    let record = record(state);
    let engine = state.engine.engine();
    let container = engine.container(creds, state.owner.is_some());
    let manifest = Manifest::load(&layout.dir.join(manifest::FILE)).map_err(|e| Error::Env {
        name: state.name.clone(),
        message: e.to_string(),
    })?;
    let labels = project(host).labels(&state.name, state.engine, state.owner);
    if new_volume {
        docker.create_volume(&record.volume, labels.clone())?;
    }
    let publish_ip = reach(host).publish_ip;
    let handover = Handover::for_engine(
        record.docker_host.as_deref(),
        nix::unistd::geteuid().is_root(),
        &layout.dir.join(FILES_DIR),
    );
    if let Handover::Bind(dir) = &handover {
        write_bound_files(dir, &container.files)
            .context(|| format!("cannot write the container's files in {}", dir.display()))?;
    }
    let body = spec::create_body(&Plan {
        image: &record.image,
        container: &container,
        manifest: &manifest,
        labels,
        volume: &record.volume,
        hostname: format!("isoenv-{}", state.name),
        publish_ip: &publish_ip,
        stop_signal: engine.stop_signal(),
        handover: &handover,
    });
    docker.create_container(&record.name, body).map_err(|e| {
        if e.is_conflict() {
            Error::Env {
                name: state.name.clone(),
                message: format!("a container named {} exists already but is not this environment's; remove it (`docker rm -f {}`) or pick another name", record.name, record.name),
            }
        } else {
            e.into()
        }
    })?;
    if handover == Handover::Upload {
        let files = spec::files_archive(&container.files)
            .context(|| "cannot pack the container's files".into())?;
        docker.upload(&record.name, files)?;
    }
    Ok(())
}

/// Where in the environment's directory the files bound into its container are.
const FILES_DIR: &str = "container";

/// Writes the files a container binds, as the container's service uid's with mode 0400 (as the
/// copied ones are), in a directory only root enters: the container sees only the files.
fn write_bound_files(dir: &Path, files: &[(&str, String)]) -> std::io::Result<()> {
    fs::create_dir_all(dir)?;
    files::set_mode(dir, 0o700)?;
    let owner = Some(CONTAINER_UID);
    for (path, contents) in files {
        let file = spec::bound_file(dir, path);
        crate::sys::secret::write_private(&file, contents.as_bytes())?;
        std::os::unix::fs::lchown(&file, owner, owner)?;
        files::set_mode(&file, 0o400)?;
    }
    Ok(())
}

/// Starts the container, reads back its port, rewrites the client files for it, and waits
/// until the engine answers its own protocol from the host. On failure the container is
/// stopped, the record says so, and the error carries the container's last output.
fn run_container(
    host: &dyn Host,
    state: &mut EnvState,
    layout: &Layout,
    creds: &Credentials,
    progress: &dyn Fn(&str),
) -> Result<()> {
    let docker = docker_for(host, state)?;
    let engine = state.engine.engine();
    let name = record(state).name.clone();
    let failed = |state: &mut EnvState, failure: String| -> Result<()> {
        let _ = docker.stop(&name, Duration::from_secs(5));
        record_mut(state).started = false;
        let _ = state.store(layout);
        let logs = docker.logs(&name, 15).unwrap_or_default();
        Err(Error::Env {
            name: state.name.clone(),
            message: format!(
                "{failure}\n--- last lines of container {name} ---\n{}",
                logs.trim_end()
            ),
        })
    };
    if let Err(e) = docker.start(&name) {
        let message = e.to_string();
        let advice = if message.contains("port is already allocated")
            || message.contains("address already in use")
        {
            "; its port is taken: free it, or edit network.expose in the manifest (port 0 lets Docker pick one)"
        } else {
            ""
        };
        return failed(state, format!("{message}{advice}"));
    }
    record_mut(state).started = true;
    state.store(layout)?;
    let published = docker.inspect(&name)?.and_then(|o| o.host_port);
    let Some(published) = published else {
        return failed(state, "Docker published no host port".into());
    };
    let port = match &docker.link {
        // Through SSH: the environment's own port here, forwarded to the one published there.
        Some(link) => {
            unforward(docker, state);
            if let Err(e) = link.forward(state.port, published) {
                return failed(
                    state,
                    format!("cannot forward 127.0.0.1:{} over SSH: {e}", state.port),
                );
            }
            record_mut(state).forwarded = Some(published);
            state.store(layout)?;
            state.port
        }
        None => published,
    };
    if port != state.port {
        state.port = port;
        host.write_client_files(state, layout, creds, &ServiceUser::invoker())
            .context(|| format!("cannot write the client files in {}", layout.dir.display()))?;
        state.store(layout)?;
    }
    progress(&format!(
        "waiting for {} in {name} on {}:{port}",
        engine.kind(),
        state.host
    ));
    let mut checked = Instant::now();
    let failure = wait_ready(engine, &super::tcp_only(state), creds, READY_TIMEOUT, |m| {
        if checked.elapsed() < LIVENESS_EVERY {
            return Ok::<_, Error>(None);
        }
        checked = Instant::now();
        Ok(match docker.inspect(&name)? {
            Some(o) if o.running => None,
            Some(o) => Some(exited(engine, &o, m)),
            None => Some(format!("container {name} vanished during start-up")),
        })
    })?;
    let Some(failure) = failure else {
        return Ok(());
    };
    failed(state, failure)
}

/// Cancels the environment's SSH forward, if it has one.
fn unforward(docker: &Client, state: &EnvState) {
    if let (Some(link), Some(remote)) = (&docker.link, record(state).forwarded) {
        link.cancel(state.port, remote);
    }
}

/// Closes the SSH connection this command opened to the engine if no environment of this
/// state root lives on it (a command that only looked, e.g. `db list`).
pub fn close_link_opened_here(host: &dyn Host, docker: &Client) {
    if docker.opened_link {
        close_link_if_unused(host, docker, "");
    }
}

/// Closes the SSH connection to the engine once no environment of this state root but
/// `except` lives on it.
fn close_link_if_unused(host: &dyn Host, docker: &Client, except: &str) {
    let Some(link) = &docker.link else {
        return;
    };
    let entries = fs::read_dir(host.root()).into_iter().flatten().flatten();
    let in_use = entries
        .filter(|e| e.file_name().to_str() != Some(except))
        .filter_map(|e| EnvState::load(&Layout::new(e.path())).ok().flatten())
        .any(|s| {
            s.container
                .is_some_and(|c| c.docker_host.as_deref() == host.docker_host())
        });
    if !in_use {
        link.close();
    }
}

fn record(state: &EnvState) -> &ContainerRecord {
    state
        .container
        .as_ref()
        .expect("a docker environment records its container")
}

fn record_mut(state: &mut EnvState) -> &mut ContainerRecord {
    state
        .container
        .as_mut()
        .expect("a docker environment records its container")
}

fn exited(engine: &dyn Engine, o: &Observed, probe: &str) -> String {
    let why = if o.oom_killed {
        " (killed for exceeding its memory limit: raise limits.memory in the manifest)".to_owned()
    } else {
        String::new()
    };
    format!(
        "{} exited during start-up with code {}{why} ({probe})",
        engine.kind(),
        o.exit_code
    )
}

fn applied(limit: &str, value: String, via: &str, wanted: i64, got: i64) -> Enforcement {
    Enforcement {
        limit: limit.into(),
        value,
        via: format!("{via} = {got}"),
        enforced: got == wanted,
    }
}
