//! The docker backend's lifecycle: a container and a volume per environment, made, started,
//! stopped and removed through the Docker API, and recorded in the environment's state like any
//! other server (so `list`, `url`, the exports and the activate script work the same).

use std::collections::HashMap;
use std::fs;
use std::thread::sleep;
use std::time::{Duration, Instant};

use super::{
    endpoint, finish, now, read_credentials, save, wait_ready, write_client_files, Cleanup,
    CreateOptions, EnvInfo, Workspace, STOP_GRACE,
};
use crate::backend::docker::client::{Docker, Observed};
use crate::backend::docker::image::{self, SOURCE_LABEL};
use crate::backend::docker::{self as spec, addresses, Plan, Project};
use crate::backend::manifest::{self, Bytes, Manifest};
use crate::backend::Enforcement;
use crate::backend::Status;
use crate::backend::{BackendKind, Isolation};
use crate::engine::{Credentials, Engine};
use crate::error::{Error, IoContext, Result};
use crate::layout::Layout;
use crate::state::{ContainerRecord, EnvState, SCHEMA};
use crate::sys::hash::fnv1a;
use crate::sys::process::{ProcessId, ServiceUser};
use crate::sys::secret::Secret;

/// How long Docker may still be making a container whose creator was killed.
const MAKING_TIMEOUT: Duration = Duration::from_secs(30);
/// How often a starting container is asked whether it still runs (between protocol probes).
const LIVENESS_EVERY: Duration = Duration::from_millis(100);

/// A local image `image build` made or found.
#[derive(Debug, Clone, serde::Serialize)]
pub struct BuiltImage {
    pub reference: String,
    /// The engine's version, as installed on this machine.
    pub version: String,
    /// Whether an image built from the same installation was there already.
    pub reused: bool,
}

impl Workspace {
    /// The Docker engine (`DOCKER_HOST`, else the local socket), connected on first use.
    pub(super) fn docker(&self) -> Result<&Docker> {
        self.docker
            .get_or_init(|| Docker::connect(self.docker_host.as_deref()))
            .as_ref()
            .map_err(|e| Error::Docker(e.clone()))
    }

    /// The engine an environment's container lives on, which must be the one configured now
    /// (otherwise its container would look missing and `start` would make a second one).
    fn docker_for(&self, state: &EnvState) -> Result<&Docker> {
        let recorded = &record(state).docker_host;
        if recorded != &self.docker_host {
            let on = |h: &Option<String>| match h {
                Some(h) => format!("DOCKER_HOST={h}"),
                None => "the local engine (DOCKER_HOST unset)".to_owned(),
            };
            return Err(Error::Env {
                name: state.name.clone(),
                message: format!(
                    "its container lives on {}, but this command talks to {}; set DOCKER_HOST accordingly",
                    on(recorded),
                    on(&self.docker_host)
                ),
            });
        }
        self.docker()
    }

    /// This state root on this machine, which owns the containers and volumes.
    pub(super) fn project(&self) -> Project {
        let root = fs::canonicalize(&self.root).unwrap_or_else(|_| self.root.clone());
        let machine = nix::unistd::gethostname()
            .map(|h| h.to_string_lossy().into_owned())
            .unwrap_or_default();
        Project::new(&machine, &root)
    }

    pub(super) fn create_container_env(
        &self,
        opts: &CreateOptions,
        progress: &dyn Fn(&str),
    ) -> Result<EnvInfo> {
        fs::create_dir_all(&self.root)
            .context(|| format!("cannot create {}", self.root.display()))?;
        let (layout, _lock) = self.claim(&opts.name)?;
        let docker = self.docker()?;
        let engine = opts.engine.engine();
        let creds = engine.credentials(Secret::generate());
        let (image, version) =
            self.image_for(docker, engine, &creds, opts.image.as_deref(), progress)?;
        let project = self.project();
        let record = ContainerRecord {
            name: project.container(&opts.name),
            volume: project.volume(&opts.name),
            image,
            docker_host: self.docker_host.clone(),
            started: false,
        };
        let mut cleanup = Cleanup {
            dir: Some(layout.dir.clone()),
            process: None,
            backend: BackendKind::Docker,
            container: Some((docker, record.name.clone(), record.volume.clone())),
        };
        let mut state = EnvState {
            schema: SCHEMA,
            name: opts.name.clone(),
            engine: opts.engine,
            backend: BackendKind::Docker,
            engine_version: version,
            host: addresses(self.docker_host.as_deref()).1,
            port: opts.port.unwrap_or(0),
            service: true,
            process: None,
            created_at: now(),
            owner: opts.owner,
            tunnel: None,
            container: Some(record),
        };
        layout
            .make_dir()
            .and_then(|()| fs::create_dir_all(&layout.bin))
            .and_then(|()| fs::create_dir_all(layout.log.parent().unwrap_or(&layout.dir)))
            .and_then(|()| {
                let manifest = spec::default_manifest(state.port, self.memory_limit);
                fs::write(layout.dir.join(manifest::FILE), manifest.to_json())
            })
            .context(|| format!("cannot set up {}", layout.dir.display()))?;
        // Recorded before anything exists in Docker: a killed create is found and removed.
        save(&state, &layout)?;
        write_client_files(&state, &layout, &creds, &ServiceUser::invoker())
            .context(|| format!("cannot write the client files in {}", layout.dir.display()))?;
        progress(&format!(
            "creating container {} from {}",
            container_name(&state),
            image_of(&state)
        ));
        self.make_container(docker, &state, &layout, &creds, true)?;
        self.run_container(&mut state, &layout, &creds, progress)?;
        finish(&layout)?;
        cleanup.disarm();
        Ok(self.info(&state, &layout))
    }

    /// The image for a new environment: the one asked for (`--image`, else
    /// `ISOENV_<ENGINE>_IMAGE`), else the official default; pulled when missing; the default
    /// falls back to isoenv's local image of the engine when it cannot be pulled. Returns the
    /// reference and the engine version it holds, as far as it is known.
    fn image_for(
        &self,
        docker: &Docker,
        engine: &dyn Engine,
        creds: &Credentials,
        asked: Option<&str>,
        progress: &dyn Fn(&str),
    ) -> Result<(String, String)> {
        let kind = engine.kind();
        let var = format!("ISOENV_{}_IMAGE", kind.as_str().to_ascii_uppercase());
        let asked = asked.or_else(|| self.vars.get(&var));
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
                    let local =
                        docker.images_labelled(&format!("{}={kind}", image::ENGINE_LABEL))?;
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
        &self,
        docker: &Docker,
        state: &EnvState,
        layout: &Layout,
        creds: &Credentials,
        new_volume: bool,
    ) -> Result<()> {
        let record = record(state);
        let engine = state.engine.engine();
        let container = engine.container(creds, state.owner.is_some());
        let manifest =
            Manifest::load(&layout.dir.join(manifest::FILE)).map_err(|e| Error::Env {
                name: state.name.clone(),
                message: e.to_string(),
            })?;
        let labels = self
            .project()
            .labels(&state.name, state.engine, state.owner);
        if new_volume {
            docker.create_volume(&record.volume, labels.clone())?;
        }
        let (publish_ip, _) = addresses(self.docker_host.as_deref());
        let body = spec::create_body(&Plan {
            image: &record.image,
            container: &container,
            manifest: &manifest,
            labels,
            volume: &record.volume,
            hostname: format!("isoenv-{}", state.name),
            publish_ip: &publish_ip,
            stop_signal: engine.stop_signal(),
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
        let files = spec::files_archive(&container.files)
            .context(|| "cannot pack the container's files".into())?;
        docker.upload(&record.name, files)?;
        Ok(())
    }

    /// Starts the container, reads back its port, rewrites the client files for it, and waits
    /// until the engine answers its own protocol from the host. On failure the container is
    /// stopped, the record says so, and the error carries the container's last output.
    fn run_container(
        &self,
        state: &mut EnvState,
        layout: &Layout,
        creds: &Credentials,
        progress: &dyn Fn(&str),
    ) -> Result<()> {
        let docker = self.docker_for(state)?;
        let engine = state.engine.engine();
        let name = container_name(state).to_owned();
        let failed = |state: &mut EnvState, failure: String| -> Result<()> {
            let _ = docker.stop(&name, Duration::from_secs(5));
            record_mut(state).started = false;
            let _ = save(state, layout);
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
        save(state, layout)?;
        let port = docker.inspect(&name)?.and_then(|o| o.host_port);
        let Some(port) = port else {
            return failed(state, "Docker published no host port".into());
        };
        if port != state.port {
            state.port = port;
            write_client_files(state, layout, creds, &ServiceUser::invoker())
                .context(|| format!("cannot write the client files in {}", layout.dir.display()))?;
            save(state, layout)?;
        }
        progress(&format!(
            "waiting for {} in {name} on {}:{port}",
            engine.kind(),
            state.host
        ));
        let mut checked = Instant::now();
        let failure = wait_ready(engine, &endpoint(state, layout), creds, |m| {
            if checked.elapsed() < LIVENESS_EVERY {
                return Ok(None);
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

    /// Starts a stopped, crashed or missing container environment. A container removed behind
    /// isoenv's back is made again, on its volume when that is still there.
    pub(super) fn start_container_env(
        &self,
        name: &str,
        progress: &dyn Fn(&str),
    ) -> Result<EnvInfo> {
        let (layout, _lock, mut state) = self.open_locked(name)?;
        let docker = self.docker_for(&state)?;
        let creds = read_credentials(&layout)?;
        let record = record(&state).clone();
        match docker.inspect(&record.name)? {
            Some(o) if o.running => return Ok(self.info(&state, &layout)),
            Some(_) => {}
            None => {
                if docker.image(&record.image)?.is_none() {
                    return Err(Error::Env {
                        name: name.into(),
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
                self.make_container(docker, &state, &layout, &creds, !kept)?;
            }
        }
        self.run_container(&mut state, &layout, &creds, progress)?;
        Ok(self.info(&state, &layout))
    }

    pub(super) fn stop_container(&self, state: &mut EnvState, layout: &Layout) -> Result<()> {
        self.docker_for(state)?
            .stop(container_name(state), STOP_GRACE)?;
        record_mut(state).started = false;
        save(state, layout)
    }

    /// Removes the container and its volume (the environment's data). A container that a
    /// killed `create` left is unknown to Docker by name until Docker finishes making it (it
    /// fills the new volume first), while its volume is already in use: that is waited out.
    pub(super) fn remove_container(&self, state: &EnvState) -> Result<()> {
        let docker = self.docker_for(state)?;
        let record = record(state);
        let deadline = Instant::now() + MAKING_TIMEOUT;
        loop {
            docker.remove_container(&record.name)?;
            match docker.remove_volume(&record.volume) {
                Err(e) if e.is_conflict() && Instant::now() < deadline => {
                    sleep(Duration::from_millis(50))
                }
                other => return Ok(other?),
            }
        }
    }

    /// What Docker says of the environment (`unknown` when the engine cannot be reached).
    pub(super) fn container_status(&self, state: &EnvState) -> (Status, Option<Observed>) {
        let Ok(docker) = self.docker_for(state) else {
            return (Status::Unknown, None);
        };
        let record = record(state);
        match docker.inspect(&record.name) {
            Ok(o) => (spec::status(record.started, o.as_ref()), o),
            Err(_) => (Status::Unknown, None),
        }
    }

    /// The manifest and, per limit, what Docker applied to the container.
    pub(super) fn container_isolation(&self, state: &EnvState, layout: &Layout) -> Isolation {
        let file = layout.dir.join(manifest::FILE);
        let manifest = Manifest::load(&file);
        let (status, observed) = self.container_status(state);
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
        Isolation {
            manifest_file: file,
            manifest: manifest.map_err(|e| e.to_string()),
            running: status == Status::Running,
            init_pid: None,
            limits,
        }
    }

    /// The container's last output.
    pub(super) fn container_logs(&self, state: &EnvState, lines: usize) -> Result<String> {
        Ok(self.docker_for(state)?.logs(container_name(state), lines)?)
    }

    /// Removes this project's containers and volumes that no environment accounts for any more
    /// (their directory is gone, or their owner is), e.g. after the state root was deleted by
    /// hand. Returns what was removed.
    pub fn gc_containers(&self) -> Result<Vec<String>> {
        self.guard(super::Action::Destroy, "collect containers")?;
        let docker = self.docker()?;
        let filter = self.project().filter();
        let dir_exists = |env: &str| self.layout(env).dir.is_dir();
        let leftover = |labels: &HashMap<String, String>| {
            spec::is_leftover(labels, ProcessId::is_alive, dir_exists)
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

    /// Builds isoenv's local image of `engine` from this machine's installation, unless an
    /// image built from the same installation is there already (or `force`).
    pub fn build_image(
        &self,
        kind: crate::engine::EngineKind,
        force: bool,
        progress: &dyn Fn(&str),
    ) -> Result<BuiltImage> {
        let engine = kind.engine();
        let bins = self.binaries(engine, false, progress)?;
        let docker = self.docker()?;
        let container = engine.container(&engine.credentials(Secret::default()), false);
        let reference = image::local_reference(kind, container.image, &bins.version);
        let recipe = engine.image_recipe(&bins);
        let template = self.template(engine, &bins, progress)?;
        // The cached directory's key (engine, version, init command), wherever the cache is.
        let cache_key = template
            .as_deref()
            .and_then(|t| t.parent()?.file_name())
            .map(|k| k.to_string_lossy().into_owned());
        let source = format!(
            "{} {:016x}",
            bins.version,
            fnv1a(&format!("{}{recipe:?}{cache_key:?}", image::FORMAT))
        );
        let existing = docker.image(&reference)?;
        if !force
            && existing
                .as_ref()
                .is_some_and(|i| i.labels.get(SOURCE_LABEL) == Some(&source))
        {
            return Ok(BuiltImage {
                reference,
                version: bins.version,
                reused: true,
            });
        }
        progress(&format!(
            "building {reference} from {} {}",
            kind, bins.version
        ));
        let image_err = |message: String| Error::Image {
            reference: reference.clone(),
            message,
        };
        let rootfs = image::rootfs(&recipe, &container, template.as_deref()).map_err(image_err)?;
        let changes = image::changes(kind, &recipe, &container, &source);
        docker.import(rootfs, &reference, changes)?;
        // The tag moved to the new image; the old one is garbage unless a container uses it.
        if let Some(old) = existing {
            docker.remove_unused_image(&old.id)?;
        }
        Ok(BuiltImage {
            reference,
            version: bins.version,
            reused: false,
        })
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

fn container_name(state: &EnvState) -> &str {
    &record(state).name
}

fn image_of(state: &EnvState) -> &str {
    &record(state).image
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
