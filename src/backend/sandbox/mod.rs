//! The sandbox backend: the real server inside Linux namespaces, confined by the environment's
//! `manifest.json` (see [`crate::backend::manifest`]) and run by a supervisor ([`crate::backend::sandbox::supervisor`]).

use std::io;
use std::path::{Path, PathBuf};
use std::thread::sleep;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;

pub mod cgroup;
pub mod supervisor;

use super::local::{Confinement, Prepare, Spawn};
use super::{BackendKind, Isolation};
use crate::backend::manifest::{self, Defaults, Manifest};
use crate::backend::Enforcement;
use crate::engine::existing;
use crate::sys::process::{tail, Launch, ProcessId};
use cgroup::CgroupLayout;
use supervisor::{Account, Record, Request, SUPERVISOR_COMMAND, SUPERVISOR_VAR};

pub struct Sandbox;

/// How long the supervisor may take to build the sandbox (mounts, cgroups) before giving up.
const SETUP_TIMEOUT: Duration = Duration::from_secs(20);

impl Confinement for Sandbox {
    fn kind(&self) -> BackendKind {
        BackendKind::Sandbox
    }

    /// Writes the default manifest: the server binary, its libraries and data files read-only,
    /// the data and socket directories read-write, the engine's config files read-only.
    fn prepare(&self, p: &Prepare) -> crate::Result<()> {
        let mut read_only = vec![p.bins.server.clone()];
        read_only.extend(
            library_dirs(&p.bins.server).map_err(|message| crate::Error::Env {
                name: p.layout.name(),
                message,
            })?,
        );
        read_only.extend(p.engine.sandbox_paths(p.bins));
        read_only.extend(existing([PathBuf::from("/usr/lib/locale")]));
        read_only.extend(p.engine.server_files(p.layout));
        let manifest = Manifest::defaults(&Defaults {
            read_only: &read_only,
            read_write: &[p.layout.data.clone(), p.layout.run.clone()],
            port: p.port,
            memory: p.memory,
        });
        let path = manifest_file(&p.layout.dir);
        std::fs::write(&path, manifest.to_json()).map_err(|cause| crate::Error::Io {
            context: format!("cannot write {}", path.display()),
            cause,
        })
    }

    fn spawn(&self, s: &Spawn) -> io::Result<ProcessId> {
        let file = manifest_file(&s.layout.dir);
        let manifest = Manifest::load(&file).map_err(io::Error::other)?;
        if manifest.network.expose.port() != s.port {
            return Err(io::Error::other(format!(
                "{}: network.expose: port {} differs from the environment's port {}; the port is fixed when the environment is created",
                file.display(),
                manifest.network.expose.port(),
                s.port
            )));
        }
        // A previous supervisor killed with SIGKILL may have left its cgroups.
        Record::release(&s.layout.dir)?;
        let request = Request {
            dir: s.layout.dir.clone(),
            hostname: hostname(&s.layout.dir),
            user: Account {
                name: s.user.name.clone(),
                uid: s.user.uid,
                gid: s.user.gid,
            },
            program: s.launch.program.clone(),
            args: s
                .launch
                .args
                .iter()
                .map(|a| a.to_string_lossy().into_owned())
                .collect(),
            stop_signal: s.engine.stop_signal() as i32,
            manifest,
            user_namespace: !nix::unistd::geteuid().is_root(),
        };
        let exe = match std::env::var_os(SUPERVISOR_VAR) {
            Some(p) => PathBuf::from(p),
            None => std::env::current_exe()?,
        };
        let mut supervisor = Launch::new(&exe)
            .arg(SUPERVISOR_COMMAND)
            .arg(serde_json::to_string(&request)?);
        supervisor.parent_death = s.launch.parent_death;
        // Inherited by the server, beneath its own filter.
        supervisor.disk_sync = s.launch.disk_sync;
        // The supervisor runs as the invoker (root, or rootless); what runs inside is the
        // service user.
        let invoker = crate::sys::process::ServiceUser::invoker();
        let pid = supervisor.spawn_detached(&invoker, &s.layout.dir, &s.layout.log)?;
        wait_ready(pid, &s.layout.dir, &s.layout.log, &exe)?;
        Ok(pid)
    }

    /// Its init maps the service user to itself, which without root only the invoker's own ids
    /// can be; rootless environments are kept apart by the mount namespace instead.
    fn subordinate_ids(&self) -> bool {
        false
    }

    /// The supervisor turns SIGTERM into the engine's own stop signal.
    fn stop_signal(&self, _engine: &dyn crate::engine::Engine) -> Signal {
        Signal::SIGTERM
    }

    fn release(&self, dir: &Path) -> io::Result<()> {
        Record::release(dir)
    }

    /// The supervisors working in the environment's directory (found by their command, since
    /// one binds the port a moment before it writes its record), and the one its record names;
    /// stopping a supervisor stops the server inside.
    fn servers_in(&self, dir: &Path, _server: &Path) -> Vec<ProcessId> {
        let mut found: Vec<ProcessId> = crate::sys::process::working_in(dir)
            .into_iter()
            .filter(|p| {
                crate::sys::process::argument(p.pid, 1).as_deref() == Some(SUPERVISOR_COMMAND)
            })
            .collect();
        let recorded = Record::load(dir).map(|r| r.supervisor);
        found.extend(recorded.filter(|r| r.is_alive() && !found.contains(r)));
        found
    }

    /// Cgroups of supervisors that died with nobody left to remove them (their environment
    /// directory, and its record of them, deleted by hand): `isoenv-NAME-PID` beside the ones
    /// a sandbox started from here would get, whose PID is gone or now names a process that
    /// started after the group was made. Only empty ones go (the kernel refuses the others).
    fn leftovers(&self) -> io::Result<Vec<String>> {
        let Ok(layout) = CgroupLayout::detect() else {
            return Ok(Vec::new());
        };
        let own = std::fs::read_to_string("/proc/self/cgroup")?;
        let limits = manifest::Limits {
            memory: manifest::Bytes(1 << 20),
            cpu: 1.0,
            pids: 1,
        };
        let mut removed = Vec::new();
        for group in layout.plan(&own, "isoenv-probe", &limits).groups {
            let Some(Ok(entries)) = group.parent().map(std::fs::read_dir) else {
                continue;
            };
            for entry in entries.flatten() {
                let name = entry.file_name().to_string_lossy().into_owned();
                let Some((_, pid)) = crate::sys::process::named_by(&name, "isoenv-") else {
                    continue;
                };
                let made = entry.metadata().and_then(|m| m.modified()).ok();
                let gone = match crate::sys::process::ProcessId::of(pid) {
                    Err(_) => true,
                    // A zombie (its parent has not reaped it yet), or a reused pid: that
                    // process started after the group existed.
                    Ok(p) => {
                        !p.is_alive()
                            || matches!((p.started(), made), (Some(s), Some(m)) if s > m + Duration::from_secs(2))
                    }
                };
                // Its sandbox's processes may still be exiting: the removal waits for them.
                if gone && cgroup::remove(&[entry.path()]).is_ok() {
                    removed.push(format!("cgroup {}", entry.path().display()));
                }
            }
        }
        Ok(removed)
    }

    fn isolation(&self, dir: &Path) -> Option<Isolation> {
        let file = manifest_file(dir);
        let manifest = Manifest::load(&file);
        let record = Record::load(dir).filter(|r| r.supervisor.is_alive());
        let limits = match (&record, &manifest) {
            (Some(r), _) => r.limits(),
            (None, Ok(m)) => planned(&m.limits),
            (None, Err(_)) => Vec::new(),
        };
        Some(Isolation {
            manifest_file: file,
            manifest: manifest.map_err(|e| e.to_string()),
            running: record.is_some(),
            exposed: None,
            init_pid: record.and_then(|r| r.init),
            limits,
        })
    }
}

/// What a stopped sandbox would get at its next start, on this machine.
fn planned(limits: &manifest::Limits) -> Vec<Enforcement> {
    let Ok(layout) = CgroupLayout::detect() else {
        return Vec::new();
    };
    let own = std::fs::read_to_string("/proc/self/cgroup").unwrap_or_default();
    layout.plan(&own, "isoenv-plan", limits).preview()
}

pub fn manifest_file(dir: &Path) -> PathBuf {
    dir.join(manifest::FILE)
}

fn hostname(dir: &Path) -> String {
    let name = dir.file_name().unwrap_or_default().to_string_lossy();
    let mut host: String = format!("isoenv-{name}")
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .collect();
    host.truncate(63);
    host
}

/// Waits until the supervisor reports a ready sandbox, or explains why it did not start.
fn wait_ready(pid: ProcessId, dir: &Path, log: &Path, exe: &Path) -> io::Result<()> {
    let deadline = Instant::now() + SETUP_TIMEOUT;
    loop {
        if Record::load(dir).is_some_and(|r| r.supervisor == pid && r.init.is_some()) {
            return Ok(());
        }
        if !pid.is_alive() {
            let text = std::fs::read_to_string(log).unwrap_or_default();
            let lines: Vec<&str> = text
                .lines()
                .filter(|l| l.starts_with("isoenv sandbox"))
                .collect();
            let reason = match lines.last() {
                Some(l) => (*l).to_owned(),
                None => format!(
                    "{} did not act as the sandbox supervisor (set {SUPERVISOR_VAR} to the `xtask` executable); log: {}",
                    exe.display(),
                    tail(&text, 5)
                ),
            };
            return Err(io::Error::other(format!(
                "the sandbox did not start: {reason}"
            )));
        }
        if Instant::now() > deadline {
            pid.stop(Signal::SIGKILL, Duration::from_secs(5));
            let _ = Record::release(dir);
            return Err(io::Error::other(format!(
                "the sandbox was not ready within {}s",
                SETUP_TIMEOUT.as_secs()
            )));
        }
        sleep(Duration::from_micros(200));
    }
}

/// The directories holding `binary`'s shared libraries and its ELF interpreter, resolved to
/// real directories (merged-/usr links are recreated inside).
fn library_dirs(binary: &Path) -> Result<Vec<PathBuf>, String> {
    Ok(crate::sys::ldd::shared_libraries(binary)?
        .into_iter()
        .filter_map(|lib| std::fs::canonicalize(lib.parent()?).ok())
        .fold(Vec::new(), |mut dirs, d| {
            if !dirs.contains(&d) {
                dirs.push(d);
            }
            dirs
        }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hostnames_are_valid() {
        assert_eq!(hostname(Path::new("/x/test_1.a")), "isoenv-test-1-a");
        assert_eq!(hostname(&Path::new("/x").join("a".repeat(80))).len(), 63);
    }
}
