//! `doctor`: what this machine has for each engine and backend, and how to get what is missing.
//! It only looks; it changes nothing.

use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};

use nix::sched::CloneFlags;
use serde::Serialize;

use super::policy::{plan_up, UpPlan};
use crate::backend::docker::client::{Docker, DockerError};
use crate::backend::sandbox::cgroup::{CgroupLayout, Version};
use crate::backend::BackendKind;
use crate::config::EnvironmentConfig;
use crate::engine::{install_command, EngineKind};
use crate::envfile::Vars;

#[derive(Debug, Clone, Serialize)]
pub struct Check {
    pub name: String,
    pub ok: bool,
    pub detail: String,
    /// What to run or change when not ok.
    pub fix: Option<String>,
}

/// The name of the check of whether environments' servers run as users of their own.
pub const IDENTITIES: &str = "identities";

/// The name of [`env_file`]'s check.
pub const ENV_FILE: &str = "env file";

/// Whether the `.env` at `path` keeps its passwords to its owner.
pub fn env_file(path: &Path) -> Check {
    let name = ENV_FILE.to_owned();
    let read = std::fs::read_to_string(path).and_then(|text| {
        let mode = std::fs::metadata(path)?.permissions().mode();
        Ok(crate::envfile::exposure(&text, mode, path))
    });
    match read {
        Ok(None) => Check {
            name,
            ok: true,
            detail: format!(
                "{}: passwords, if any, readable by its owner only",
                path.display()
            ),
            fix: None,
        },
        Ok(Some(warning)) => Check {
            name,
            ok: false,
            detail: warning,
            fix: Some(format!("chmod 600 {}", path.display())),
        },
        Err(e) => Check {
            name,
            ok: true,
            detail: format!("{}: {e}", path.display()),
            fix: None,
        },
    }
}

/// What this profile's `db up` needs of the machine, by check name: the rest is optional.
pub fn needed(config: &EnvironmentConfig) -> Vec<&'static str> {
    match plan_up(config) {
        UpPlan::Env { backend, .. } => match backend {
            BackendKind::Lightweight => vec!["postgres"],
            BackendKind::Sandbox => vec!["postgres", "namespaces"],
            BackendKind::SshTunnel => vec!["ssh"],
            BackendKind::Docker => vec!["docker"],
        },
        UpPlan::VerifyProduction => Vec::new(),
    }
}

pub fn run(vars: &Vars) -> Vec<Check> {
    let mut checks: Vec<Check> = EngineKind::ALL
        .into_iter()
        .map(|kind| {
            let engine = kind.engine();
            match engine.locate(vars) {
                Ok(b) => Check {
                    name: kind.to_string(),
                    ok: true,
                    detail: format!("{} {}", b.server.display(), b.version),
                    fix: None,
                },
                Err(detail) => Check {
                    name: kind.to_string(),
                    ok: false,
                    detail: detail.to_string(),
                    fix: Some(
                        install_command(engine)
                            .unwrap_or_else(|| format!("install {kind} with your package manager")),
                    ),
                },
            }
        })
        .collect();
    checks.push(docker(vars));
    checks.push(namespaces());
    checks.push(cgroups());
    checks.push(ssh());
    checks
}

/// The Docker engine isoenv would use (`DOCKER_HOST`), through the same client as the docker
/// backend, and the local images it has.
fn docker(vars: &Vars) -> Check {
    let name = "docker".to_owned();
    let engine = match Docker::connect(vars.get("DOCKER_HOST")) {
        Ok(d) => d,
        Err(e) => {
            let (detail, fix) = match e {
                DockerError::Unreachable {
                    host,
                    cause,
                    advice,
                } => (format!("no daemon at {host}: {cause}"), advice),
                other => (other.to_string(), "see the error".into()),
            };
            return Check {
                name,
                ok: false,
                detail,
                fix: Some(fix),
            };
        }
    };
    let local = engine
        .images_labelled(crate::backend::docker::image::ENGINE_LABEL)
        .unwrap_or_default();
    Check {
        name,
        ok: true,
        detail: match local.is_empty() {
            true => format!(
                "daemon answers at {}; no local isoenv images (`cargo xtask image build` makes them for engines that reach no registry)",
                engine.host
            ),
            false => format!(
                "daemon answers at {}; local images: {}",
                engine.host,
                local.join(", ")
            ),
        },
        fix: None,
    }
}

/// Really creates the namespaces the sandbox uses, in a throwaway child.
pub fn namespaces() -> Check {
    let root = nix::unistd::geteuid().is_root();
    let mut flags = CloneFlags::CLONE_NEWNS
        | CloneFlags::CLONE_NEWPID
        | CloneFlags::CLONE_NEWNET
        | CloneFlags::CLONE_NEWIPC
        | CloneFlags::CLONE_NEWUTS
        | CloneFlags::CLONE_NEWCGROUP;
    if !root {
        flags |= CloneFlags::CLONE_NEWUSER;
    }
    let mut cmd = Command::new("true");
    cmd.stdout(Stdio::null()).stderr(Stdio::null());
    // SAFETY: unshare is a plain syscall; the child execs right after.
    unsafe {
        cmd.pre_exec(move || nix::sched::unshare(flags).map_err(std::io::Error::from));
    }
    let result = cmd.status();
    let ok = matches!(result, Ok(s) if s.success());
    Check {
        name: "namespaces".into(),
        ok,
        detail: match (&result, ok) {
            (_, true) if root => "mount, pid, net, ipc, uts and cgroup namespaces can be created (root)".into(),
            (_, true) => "namespaces can be created through a user namespace (rootless)".into(),
            (Err(e), _) => format!("cannot test: {e}"),
            (Ok(_), false) => "unshare was refused".into(),
        },
        fix: (!ok).then(|| {
            if root {
                "run on a kernel with namespaces enabled (in a container: --privileged or a seccomp profile allowing unshare)".into()
            } else {
                "allow unprivileged user namespaces (sysctl kernel.unprivileged_userns_clone=1 or user.max_user_namespaces>0), or run as root".into()
            }
        }),
    }
}

fn cgroups() -> Check {
    match CgroupLayout::detect() {
        Ok(layout) => {
            let version = match layout.version {
                Version::V1 => "v1",
                Version::Hybrid => "hybrid (v1 controllers + cgroup2)",
                Version::V2 => "v2",
                Version::None => "none",
            };
            let controllers = layout.controllers().join(",");
            let ok = layout.version != Version::None;
            Check {
                name: "cgroups".into(),
                ok,
                detail: if controllers.is_empty() {
                    version.to_string()
                } else {
                    format!("{version}; v1 controllers: {controllers}")
                },
                fix: (!ok)
                    .then(|| "mount cgroups (memory, cpu, pids) to enforce sandbox limits".into()),
            }
        }
        Err(e) => Check {
            name: "cgroups".into(),
            ok: false,
            detail: format!("cannot read /proc/self/mountinfo: {e}"),
            fix: Some("run on Linux with /proc mounted".into()),
        },
    }
}

fn ssh() -> Check {
    match which::which("ssh") {
        Ok(path) => {
            let version = Command::new(&path)
                .arg("-V")
                .output()
                .map(|o| String::from_utf8_lossy(&o.stderr).trim().to_owned())
                .unwrap_or_default();
            Check {
                name: "ssh".into(),
                ok: true,
                detail: format!("{} {version}", path.display()),
                fix: None,
            }
        }
        Err(_) => Check {
            name: "ssh".into(),
            ok: false,
            detail: "ssh client not found (needed for the development VM tunnel)".into(),
            fix: Some(crate::engine::PackageManager::detect().map_or_else(
                || "install an OpenSSH client".into(),
                |pm| pm.install_command("openssh-client"),
            )),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_profile_needs_what_its_up_runs() {
        let config = |pairs: &[(&str, &str)]| {
            EnvironmentConfig::from_vars(
                &Vars::from_pairs(pairs.iter().copied()),
                std::path::Path::new("/p"),
            )
            .unwrap()
        };
        assert_eq!(needed(&config(&[])), ["postgres"]);
        assert_eq!(
            needed(&config(&[("WASI_USE_NAMESPACES", "true")])),
            ["postgres", "namespaces"]
        );
        assert_eq!(needed(&config(&[("ENVIRONMENT", "staging")])), ["docker"]);
        assert_eq!(needed(&config(&[("DB_VM_SSH_ENABLED", "true")])), ["ssh"]);
    }
}
