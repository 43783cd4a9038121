//! The Docker Engine API, through bollard: the few calls the docker backend and the local image
//! builder make, as blocking functions with errors that say what to do. This is the only module
//! that talks to Docker; the decisions are in [`crate::backend::docker`].

use std::collections::HashMap;
use std::time::Duration;

use bollard::errors::Error as ApiError;
use bollard::models::{ContainerCreateBody, VolumeCreateRequest};
use bollard::query_parameters::{
    CreateContainerOptions, CreateImageOptions, ListContainersOptions, ListImagesOptions,
    ListVolumesOptions, LogsOptions, RemoveContainerOptions, RemoveImageOptions,
    RemoveVolumeOptions, StopContainerOptions, UploadToContainerOptions,
};
use futures_util::TryStreamExt;

use super::ssh::SshLink;

/// Where Docker listens when `DOCKER_HOST` is not set.
pub const DEFAULT_HOST: &str = "unix:///var/run/docker.sock";

/// A Docker problem: what isoenv was doing, what Docker said, and (where known) the fix.
#[derive(Debug, Clone, thiserror::Error)]
pub enum DockerError {
    #[error("cannot reach the Docker daemon at {host}: {cause}\n  fix: {advice}")]
    Unreachable {
        host: String,
        cause: String,
        advice: String,
    },
    #[error("{context}: {message}")]
    Api {
        context: String,
        message: String,
        /// The HTTP status Docker answered with, if it answered.
        status: Option<u16>,
    },
}

impl DockerError {
    pub fn is_not_found(&self) -> bool {
        matches!(
            self,
            DockerError::Api {
                status: Some(404),
                ..
            }
        )
    }

    pub fn is_conflict(&self) -> bool {
        matches!(
            self,
            DockerError::Api {
                status: Some(409),
                ..
            }
        )
    }
}

type Result<T> = std::result::Result<T, DockerError>;

/// A container as Docker reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Observed {
    pub running: bool,
    pub exit_code: i64,
    pub oom_killed: bool,
    /// The host port published for the container's (one) port, once running.
    pub host_port: Option<u16>,
    pub memory: i64,
    pub nano_cpus: i64,
    pub pids_limit: i64,
}

/// An image as the engine has it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Image {
    pub id: String,
    pub labels: HashMap<String, String>,
}

/// One container or volume carrying isoenv's labels.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Labelled {
    pub name: String,
    pub labels: HashMap<String, String>,
}

/// A connection to one Docker engine. Calls block on a private single-threaded runtime.
pub struct Docker {
    rt: tokio::runtime::Runtime,
    api: bollard::Docker,
    /// The engine's address, for messages.
    pub host: String,
    /// The SSH connection the API goes through, for an `ssh://` engine.
    pub link: Option<SshLink>,
    /// Whether this process opened that connection (it was not up yet).
    pub opened_link: bool,
}

impl Docker {
    /// Connects to `DOCKER_HOST` (or the default socket), agrees on an API version and pings.
    pub fn connect(docker_host: Option<&str>) -> Result<Self> {
        Self::connect_at(docker_host.unwrap_or(DEFAULT_HOST), None)
    }

    /// Connects to the `ssh://` engine `docker_host` through `link`, opened first.
    pub fn through(docker_host: &str, link: SshLink) -> Result<Self> {
        let opened = link.open().map_err(|cause| DockerError::Unreachable {
            host: docker_host.to_owned(),
            advice: format!("check that `ssh` reaches it with your key and a known host key, without asking (or name an ssh configuration in {})", super::ssh::CONFIG_VAR),
            cause,
        })?;
        let api = format!("unix://{}", link.api_socket().display());
        let mut docker = Self::connect_at(&api, Some(link))?;
        docker.host = docker_host.to_owned();
        docker.opened_link = opened;
        Ok(docker)
    }

    fn connect_at(address: &str, link: Option<SshLink>) -> Result<Self> {
        let host = address.to_owned();
        let unreachable = |cause: String| DockerError::Unreachable {
            advice: advice(&host, &cause),
            host: host.clone(),
            cause,
        };
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| unreachable(format!("cannot start an I/O runtime: {e}")))?;
        let api = bollard::Docker::connect_with_host(&host).map_err(|e| unreachable(text(&e)))?;
        let api = rt
            .block_on(async {
                let api = api.negotiate_version().await?;
                api.ping().await?;
                Ok::<_, ApiError>(api)
            })
            .map_err(|e| unreachable(text(&e)))?;
        Ok(Docker {
            rt,
            api,
            host,
            link,
            opened_link: false,
        })
    }

    fn call<T>(
        &self,
        context: impl FnOnce() -> String,
        fut: impl std::future::Future<Output = std::result::Result<T, ApiError>>,
    ) -> Result<T> {
        self.rt.block_on(fut).map_err(|e| api_error(context(), &e))
    }

    /// The image, or `None` when the engine does not have it.
    pub fn image(&self, reference: &str) -> Result<Option<Image>> {
        match self.call(
            || format!("cannot inspect image {reference}"),
            self.api.inspect_image(reference),
        ) {
            Ok(image) => Ok(Some(Image {
                id: image.id.unwrap_or_default(),
                labels: image.config.and_then(|c| c.labels).unwrap_or_default(),
            })),
            Err(e) if e.is_not_found() => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Removes an image no container uses (an image in use is kept: that is not an error).
    pub fn remove_unused_image(&self, id: &str) -> Result<()> {
        match self.call(
            || format!("cannot remove image {id}"),
            self.api.remove_image(id, None::<RemoveImageOptions>, None),
        ) {
            Err(e) if e.is_not_found() || e.is_conflict() => Ok(()),
            other => other.map(drop),
        }
    }

    /// The tags of the images carrying `label` (`key=value`).
    pub fn images_labelled(&self, label: &str) -> Result<Vec<String>> {
        let options = ListImagesOptions {
            filters: label_filter(label),
            ..Default::default()
        };
        let images = self.call(
            || format!("cannot list images labelled {label}"),
            self.api.list_images(Some(options)),
        )?;
        Ok(images
            .into_iter()
            .flat_map(|i| i.repo_tags)
            .filter(|t| t != "<none>:<none>")
            .collect())
    }

    /// Pulls `reference` from its registry.
    pub fn pull(&self, reference: &str) -> Result<()> {
        let options = CreateImageOptions {
            from_image: Some(reference.to_owned()),
            ..Default::default()
        };
        self.call(
            || format!("cannot pull {reference}"),
            self.api
                .create_image(Some(options), None, None)
                .try_for_each(|_| async { Ok(()) }),
        )
    }

    /// Makes an image from a root filesystem tar (`docker import`), with Dockerfile-style
    /// `changes` (ENTRYPOINT, ENV, USER, LABEL, ...) for its configuration.
    pub fn import(&self, rootfs: Vec<u8>, reference: &str, changes: Vec<String>) -> Result<()> {
        let (repo, tag) = reference.rsplit_once(':').unwrap_or((reference, "latest"));
        let options = CreateImageOptions {
            from_src: Some("-".into()),
            repo: Some(repo.to_owned()),
            tag: Some(tag.to_owned()),
            changes,
            ..Default::default()
        };
        self.call(
            || format!("cannot import image {reference}"),
            self.api
                .create_image(Some(options), Some(bollard::body_full(rootfs.into())), None)
                .try_for_each(|_| async { Ok(()) }),
        )
    }

    pub fn create_volume(&self, name: &str, labels: HashMap<String, String>) -> Result<()> {
        let request = VolumeCreateRequest {
            name: Some(name.to_owned()),
            labels: Some(labels),
            ..Default::default()
        };
        self.call(
            || format!("cannot create volume {name}"),
            self.api.create_volume(request),
        )
        .map(drop)
    }

    pub fn create_container(&self, name: &str, body: ContainerCreateBody) -> Result<()> {
        let options = CreateContainerOptions {
            name: Some(name.to_owned()),
            ..Default::default()
        };
        self.call(
            || format!("cannot create container {name}"),
            self.api.create_container(Some(options), body),
        )
        .map(drop)
    }

    /// Extracts a tar archive at `/` in the container (which may be stopped).
    pub fn upload(&self, name: &str, tar: Vec<u8>) -> Result<()> {
        let options = UploadToContainerOptions {
            path: "/".into(),
            ..Default::default()
        };
        self.call(
            || format!("cannot copy files into container {name}"),
            self.api
                .upload_to_container(name, Some(options), bollard::body_full(tar.into())),
        )
    }

    pub fn start(&self, name: &str) -> Result<()> {
        self.call(
            || format!("cannot start container {name}"),
            self.api.start_container(name, None),
        )
    }

    /// Stops with the container's stop signal, then SIGKILL after `grace`. A container that is
    /// not there counts as stopped.
    pub fn stop(&self, name: &str, grace: Duration) -> Result<()> {
        let options = StopContainerOptions {
            t: Some(i32::try_from(grace.as_secs()).unwrap_or(i32::MAX)),
            ..Default::default()
        };
        already_gone(self.call(
            || format!("cannot stop container {name}"),
            self.api.stop_container(name, Some(options)),
        ))
    }

    /// Removes the container (running or not) if it exists.
    pub fn remove_container(&self, name: &str) -> Result<()> {
        let options = RemoveContainerOptions {
            force: true,
            ..Default::default()
        };
        already_gone(self.call(
            || format!("cannot remove container {name}"),
            self.api.remove_container(name, Some(options)),
        ))
    }

    /// Removes the volume if it exists.
    pub fn remove_volume(&self, name: &str) -> Result<()> {
        already_gone(
            self.call(
                || format!("cannot remove volume {name}"),
                self.api
                    .remove_volume(name, Some(RemoveVolumeOptions { force: true })),
            ),
        )
    }

    pub fn volume_exists(&self, name: &str) -> Result<bool> {
        match self.call(
            || format!("cannot inspect volume {name}"),
            self.api.inspect_volume(name),
        ) {
            Ok(_) => Ok(true),
            Err(e) if e.is_not_found() => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// The container's state, or `None` when it does not exist.
    pub fn inspect(&self, name: &str) -> Result<Option<Observed>> {
        let c = match self.call(
            || format!("cannot inspect container {name}"),
            self.api.inspect_container(name, None),
        ) {
            Ok(c) => c,
            Err(e) if e.is_not_found() => return Ok(None),
            Err(e) => return Err(e),
        };
        let state = c.state.unwrap_or_default();
        let host = c.host_config.unwrap_or_default();
        let host_port = c
            .network_settings
            .and_then(|n| n.ports)
            .into_iter()
            .flat_map(|ports| ports.into_values().flatten().flatten())
            .find_map(|b| b.host_port.and_then(|p| p.parse().ok()));
        Ok(Some(Observed {
            running: state.running.unwrap_or(false),
            exit_code: state.exit_code.unwrap_or(0),
            oom_killed: state.oom_killed.unwrap_or(false),
            host_port,
            memory: host.memory.unwrap_or(0),
            nano_cpus: host.nano_cpus.unwrap_or(0),
            pids_limit: host.pids_limit.unwrap_or(0),
        }))
    }

    /// Every container (running or not) carrying `label` (`key=value`).
    pub fn containers_labelled(&self, label: &str) -> Result<Vec<Labelled>> {
        let options = ListContainersOptions {
            all: true,
            filters: label_filter(label),
            ..Default::default()
        };
        let list = self.call(
            || format!("cannot list containers labelled {label}"),
            self.api.list_containers(Some(options)),
        )?;
        Ok(list
            .into_iter()
            .map(|c| Labelled {
                name: c
                    .names
                    .and_then(|n| n.into_iter().next())
                    .unwrap_or_default()
                    .trim_start_matches('/')
                    .to_owned(),
                labels: c.labels.unwrap_or_default(),
            })
            .collect())
    }

    pub fn volumes_labelled(&self, label: &str) -> Result<Vec<Labelled>> {
        let options = ListVolumesOptions {
            filters: label_filter(label),
        };
        let list = self.call(
            || format!("cannot list volumes labelled {label}"),
            self.api.list_volumes(Some(options)),
        )?;
        Ok(list
            .volumes
            .unwrap_or_default()
            .into_iter()
            .map(|v| Labelled {
                name: v.name,
                labels: v.labels,
            })
            .collect())
    }

    /// The last `lines` lines of the container's output.
    pub fn logs(&self, name: &str, lines: usize) -> Result<String> {
        let options = LogsOptions {
            stdout: true,
            stderr: true,
            tail: lines.to_string(),
            ..Default::default()
        };
        let chunks: Vec<_> = self.call(
            || format!("cannot read the logs of container {name}"),
            self.api.logs(name, Some(options)).try_collect(),
        )?;
        Ok(chunks
            .iter()
            .map(|c| String::from_utf8_lossy(&c.clone().into_bytes()).into_owned())
            .collect())
    }
}

/// The list filter for objects carrying `label` (`key` or `key=value`).
fn label_filter(label: &str) -> Option<HashMap<String, Vec<String>>> {
    Some(HashMap::from([("label".into(), vec![label.to_owned()])]))
}

/// For calls that make something be gone: "not found" means done.
fn already_gone(result: Result<()>) -> Result<()> {
    match result {
        Err(e) if e.is_not_found() => Ok(()),
        other => other,
    }
}

/// How to make an unreachable engine reachable, from where it was looked for and what failed.
fn advice(host: &str, cause: &str) -> String {
    let lower = cause.to_ascii_lowercase();
    if lower.contains("permission denied") {
        "your user may not use the Docker socket: run as root, or add the user to the `docker` group (`sudo usermod -aG docker $USER`, then log in again)".into()
    } else if host.starts_with("unix://") {
        format!(
            "start the Docker daemon (`sudo systemctl start docker`, or `sudo dockerd &` where there is no systemd), or set DOCKER_HOST to a running engine (now {})",
            if host == DEFAULT_HOST { "unset: the default socket" } else { host }
        )
    } else {
        format!("check that the engine at DOCKER_HOST={host} runs and accepts connections (for TLS engines set DOCKER_TLS_VERIFY=1 and DOCKER_CERT_PATH)")
    }
}

fn api_error(context: String, e: &ApiError) -> DockerError {
    let status = match e {
        ApiError::DockerResponseServerError { status_code, .. } => Some(*status_code),
        _ => None,
    };
    DockerError::Api {
        context,
        message: text(e),
        status,
    }
}

/// Docker's own message where it sent one; otherwise the error with its causes (the
/// connection's own error says more than bollard's wrapping).
fn text(e: &ApiError) -> String {
    match e {
        ApiError::DockerResponseServerError { message, .. } => message.trim().to_owned(),
        ApiError::DockerStreamError { error } => error.trim().to_owned(),
        other => {
            let mut text = other.to_string();
            let mut cause = std::error::Error::source(other);
            while let Some(c) = cause {
                let c_text = c.to_string();
                if !text.ends_with(&c_text) {
                    text = format!("{text}: {c_text}");
                }
                cause = c.source();
            }
            text
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn advice_fits_the_failure() {
        assert!(
            advice(DEFAULT_HOST, "No such file or directory").contains("systemctl start docker")
        );
        assert!(advice(DEFAULT_HOST, "Permission denied (os error 13)").contains("docker` group"));
        assert!(advice("tcp://10.0.0.5:2376", "connection refused").contains("DOCKER_HOST=tcp://"));
    }
}
