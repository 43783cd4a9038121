//! The namespace sandbox runtime: one supervisor process per sandbox.
//!
//! ```text
//! supervisor (host namespaces, root)       makes the cgroups, listens on 127.0.0.1:PORT
//!   └─ init (pid 1 of new mount/pid/net/ipc/uts/cgroup namespaces)
//!        └─ server (unprivileged)          the engine; its bind() of PORT gets the host socket
//! ```
//!
//! The supervisor is a separate executable (`cargo xtask` re-runs itself, see
//! [`SUPERVISOR_COMMAND`]) so that it starts single-threaded and can clone safely. Killing it
//! kills init (parent-death signal), and the kernel then kills the whole pid namespace. What it
//! made is recorded in `sandbox.json` (outside the sandbox) so that a later command can remove
//! leftovers after a SIGKILL.

mod handoff;
mod init;
mod seccomp;

use std::fs;
use std::io::{self, Read, Write};
use std::net::TcpListener;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::sched::CloneFlags;
use nix::sys::signal::{kill, SigSet, Signal};
use nix::sys::wait::{waitpid, WaitStatus};
use nix::unistd::Pid;
use serde::{Deserialize, Serialize};

use crate::backend::manifest::Manifest;
use crate::backend::sandbox::cgroup::{self, CgroupLayout, Plan};
use crate::backend::Enforcement;
use crate::sys::files::write_atomic;
use crate::sys::process::ProcessId;

/// The hidden subcommand of the supervisor executable: `<exe> sandbox-supervise <request json>`.
pub const SUPERVISOR_COMMAND: &str = "sandbox-supervise";
/// Overrides the supervisor executable (default: the running executable, i.e. `cargo xtask`).
pub const SUPERVISOR_VAR: &str = "ISOENV_SANDBOX_SUPERVISOR";
/// What the supervisor records, next to `state.json`.
pub const RECORD_FILE: &str = "sandbox.json";
/// The supervisor's own stop deadline: shorter than the workflow's, so that it always gets to
/// remove its cgroups itself.
const STOP_GRACE: Duration = Duration::from_secs(20);

/// Everything the supervisor needs, passed as one JSON argument. No secrets.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Request {
    /// The environment directory (holds `sandbox.json` and the empty `root/` mount point).
    pub dir: PathBuf,
    pub hostname: String,
    pub user: Account,
    pub program: PathBuf,
    pub args: Vec<String>,
    /// The server's graceful-stop signal, sent when the supervisor is asked to stop.
    pub stop_signal: i32,
    pub manifest: Manifest,
    /// Rootless: the namespaces belong to a new user namespace in which only `user` exists,
    /// mapped to the invoker (see `id_maps`).
    pub user_namespace: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Account {
    pub name: String,
    pub uid: u32,
    pub gid: u32,
}

/// What a running (or crashed) sandbox left for others to find.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Record {
    pub supervisor: ProcessId,
    /// The sandbox's pid 1, as the host sees it; set once the sandbox is ready.
    pub init: Option<i32>,
    pub cgroups: Vec<PathBuf>,
    pub plan: Plan,
    pub enforcement: Vec<Enforcement>,
}

impl Record {
    pub fn path(dir: &Path) -> PathBuf {
        dir.join(RECORD_FILE)
    }

    pub fn load(dir: &Path) -> Option<Self> {
        serde_json::from_slice(&fs::read(Self::path(dir)).ok()?).ok()
    }

    /// The limits as they stand: what the files hold now, and for a limit that could not be
    /// set at start, why.
    pub fn limits(&self) -> Vec<Enforcement> {
        self.plan
            .verify()
            .into_iter()
            .map(|now| {
                self.enforcement
                    .iter()
                    .find(|e| e.limit == now.limit && !e.enforced)
                    .cloned()
                    .unwrap_or(now)
            })
            .collect()
    }

    fn save(&self, dir: &Path) -> io::Result<()> {
        write_atomic(&Self::path(dir), &serde_json::to_vec_pretty(self)?)
    }

    /// Removes what a supervisor that is gone left behind (its cgroups, its record). A live
    /// supervisor's sandbox is left alone.
    pub fn release(dir: &Path) -> io::Result<()> {
        let Some(record) = Self::load(dir) else {
            return Ok(());
        };
        if record.supervisor.is_alive() {
            return Ok(());
        }
        cgroup::remove(&record.cgroups)?;
        match fs::remove_file(Self::path(dir)) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }
}

/// The supervisor's main: returns the process exit code. Progress and errors go to stderr,
/// which is the environment's server log.
pub fn supervise(request: &str) -> i32 {
    let request: Request = match serde_json::from_str(request) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("isoenv sandbox: invalid request: {e}");
            return 2;
        }
    };
    match Supervisor::start(&request) {
        Ok(mut s) => s.run(&request),
        Err(e) => {
            eprintln!("isoenv sandbox: {e}");
            1
        }
    }
}

struct Supervisor {
    init: Pid,
    record: Record,
}

/// The signals the supervisor and init handle synchronously (blocked, then waited for).
fn handled_signals() -> SigSet {
    let mut set = SigSet::empty();
    for s in [
        Signal::SIGCHLD,
        Signal::SIGTERM,
        Signal::SIGINT,
        Signal::SIGHUP,
        Signal::SIGQUIT,
    ] {
        set.add(s);
    }
    set
}

impl Supervisor {
    fn start(req: &Request) -> Result<Self, String> {
        handled_signals()
            .thread_block()
            .map_err(|e| format!("cannot block signals: {e}"))?;
        let expose = req.manifest.network.expose;
        let listener = TcpListener::bind(expose).map_err(|e| {
            format!("cannot listen on {expose}: {e} (is another program using the port?)")
        })?;
        let me = ProcessId::of(std::process::id() as i32).map_err(|e| e.to_string())?;
        let layout = CgroupLayout::detect().map_err(|e| format!("cannot read mountinfo: {e}"))?;
        let own = fs::read_to_string("/proc/self/cgroup")
            .map_err(|e| format!("cannot read /proc/self/cgroup: {e}"))?;
        let plan = layout.plan(
            &own,
            &format!("{}-{}", req.hostname, me.pid),
            &req.manifest.limits,
        );
        let (made, applied) = plan.apply();
        let mut record = Record {
            supervisor: me,
            init: None,
            cgroups: made,
            plan,
            enforcement: Vec::new(),
        };
        // Recorded before anything can fail, so that whoever finds it can clean up.
        let saved = record.save(&req.dir);
        let fail = |record: &Record, message: String| {
            let _ = cgroup::remove(&record.cgroups);
            let _ = fs::remove_file(Record::path(&req.dir));
            message
        };
        if let Err(e) = saved {
            return Err(fail(&record, format!("cannot write {RECORD_FILE}: {e}")));
        }
        match applied {
            Ok(enforcement) => record.enforcement = enforcement,
            Err(e) => return Err(fail(&record, e.to_string())),
        }
        for e in record.enforcement.iter().filter(|e| !e.enforced) {
            eprintln!(
                "isoenv sandbox: warning: {} limit {} is NOT enforced ({})",
                e.limit, e.value, e.via
            );
        }
        let root = req.dir.join("root");
        if let Err(e) = fs::create_dir_all(&root) {
            return Err(fail(
                &record,
                format!("cannot create {}: {e}", root.display()),
            ));
        }
        let channel = match handoff::channel() {
            Ok(c) => c,
            Err(e) => return Err(fail(&record, format!("cannot make a socket pair: {e}"))),
        };
        match spawn_init(req, &listener, &channel, &record.cgroups) {
            Ok(init) => {
                let handing = handoff::receive(&channel.0)
                    .and_then(|notify| handoff::serve(notify, listener));
                if let Err(e) = handing {
                    let _ = kill(init, Signal::SIGKILL);
                    let _ = waitpid(init, None);
                    return Err(fail(
                        &record,
                        format!("cannot hand {expose} to the server: {e}"),
                    ));
                }
                record.init = Some(init.as_raw());
                if let Err(e) = record.save(&req.dir) {
                    let _ = kill(init, Signal::SIGKILL);
                    let _ = waitpid(init, None);
                    return Err(fail(&record, format!("cannot write {RECORD_FILE}: {e}")));
                }
                Ok(Supervisor { init, record })
            }
            Err(e) => Err(fail(&record, e)),
        }
    }

    /// Waits for the sandbox to end, turning a stop request into the server's stop signal and,
    /// past the grace period, into SIGKILL of the whole pid namespace. Then removes the cgroups.
    fn run(&mut self, req: &Request) -> i32 {
        let signals = handled_signals();
        let mut deadline: Option<Instant> = None;
        let mut oom_kills = 0;
        let code = loop {
            // Said in the server's log as it happens: PostgreSQL survives a killed backend, and
            // its own log says only "terminated by signal 9".
            let now = cgroup::oom_kills(&self.record.cgroups);
            if now > oom_kills {
                eprintln!(
                    "isoenv sandbox: the kernel's OOM killer ended {} process(es) in this sandbox: it reached its memory limit of {} (`limits.memory` in {}); raise it there and restart",
                    now - oom_kills,
                    req.manifest.limits.memory,
                    req.dir.join(crate::backend::manifest::FILE).display()
                );
                oom_kills = now;
            }
            match waitpid(self.init, Some(nix::sys::wait::WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::Exited(_, code)) => break code,
                Ok(WaitStatus::Signaled(_, sig, _)) => break 128 + sig as i32,
                Err(_) => break 1,
                Ok(_) => {}
            }
            if deadline.is_some_and(|d| Instant::now() > d) {
                eprintln!(
                    "isoenv sandbox: the server did not stop within {}s; killing the sandbox",
                    STOP_GRACE.as_secs()
                );
                let _ = kill(self.init, Signal::SIGKILL);
                deadline = None;
            }
            let timeout = deadline.map_or(OOM_LOOK, |d| {
                d.saturating_duration_since(Instant::now()).min(OOM_LOOK)
            });
            match wait_signal(&signals, timeout) {
                Some(Signal::SIGCHLD) | None => {}
                Some(_) => {
                    // Forwarded once; init passes it to the server.
                    if deadline.is_none() {
                        let sig = Signal::try_from(req.stop_signal).unwrap_or(Signal::SIGTERM);
                        let _ = kill(self.init, sig);
                        deadline = Some(Instant::now() + STOP_GRACE);
                    }
                }
            }
        };
        if let Err(e) = cgroup::remove(&self.record.cgroups) {
            eprintln!("isoenv sandbox: {e}");
        }
        let _ = fs::remove_file(Record::path(&req.dir));
        code
    }
}

/// How often the supervisor looks at the OOM killer's count while it waits.
const OOM_LOOK: Duration = Duration::from_secs(1);

/// Waits for one of `set` (which must be blocked) for at most `timeout`.
fn wait_signal(set: &SigSet, timeout: Duration) -> Option<Signal> {
    let ts = libc::timespec {
        tv_sec: timeout.as_secs() as libc::time_t,
        tv_nsec: timeout.subsec_nanos() as libc::c_long,
    };
    // SAFETY: `set` is a valid sigset; a null siginfo pointer is allowed.
    let sig = unsafe { libc::sigtimedwait(set.as_ref(), std::ptr::null_mut(), &ts) };
    Signal::try_from(sig).ok()
}

/// Clones init into new namespaces, lets it move itself into the cgroups and set up, and waits
/// for its verdict. Returns init's pid once the server has been started inside.
fn spawn_init(
    req: &Request,
    listener: &TcpListener,
    channel: &(OwnedFd, OwnedFd),
    cgroups: &[PathBuf],
) -> Result<Pid, String> {
    let (go_read, go_write) = pipe()?;
    let (ready_read, ready_write) = pipe()?;
    let mut flags = CloneFlags::CLONE_NEWNS
        | CloneFlags::CLONE_NEWPID
        | CloneFlags::CLONE_NEWNET
        | CloneFlags::CLONE_NEWIPC
        | CloneFlags::CLONE_NEWUTS;
    if req.user_namespace {
        flags |= CloneFlags::CLONE_NEWUSER;
    }
    let mut stack = vec![0u8; 1 << 20];
    let child = {
        let (go, ready) = (go_read.as_raw_fd(), ready_write.as_raw_fd());
        let (go_w, ready_r) = (go_write.as_raw_fd(), ready_read.as_raw_fd());
        let (ours, theirs) = (channel.0.as_raw_fd(), channel.1.as_raw_fd());
        let host = listener.as_raw_fd();
        // SAFETY: the supervisor is single-threaded here (it was just exec'd and has spawned no
        // thread), so the child may run ordinary Rust code, as after fork().
        unsafe {
            nix::sched::clone(
                Box::new(move || {
                    // The supervisor's ends, and the host's listener, stay with it.
                    for fd in [go_w, ready_r, ours, host] {
                        let _ = nix::unistd::close(fd);
                    }
                    init::main(req, cgroups, theirs, go, ready)
                }),
                &mut stack,
                flags,
                Some(libc::SIGCHLD),
            )
        }
        .map_err(|e| clone_error(e, req.user_namespace))?
    };
    drop((go_read, ready_write));
    let abort = |message: String| {
        let _ = kill(child, Signal::SIGKILL);
        let _ = waitpid(child, None);
        message
    };
    if req.user_namespace {
        id_maps(child, &req.user).map_err(abort)?;
    }
    fs::File::from(go_write)
        .write_all(b"go")
        .map_err(|e| abort(format!("cannot start the sandbox: {e}")))?;
    let mut verdict = String::new();
    let _ = fs::File::from(ready_read).read_to_string(&mut verdict);
    if verdict == "ok" {
        Ok(child)
    } else if verdict.is_empty() {
        Err(abort("the sandbox's init exited during set-up".into()))
    } else {
        Err(abort(verdict))
    }
}

fn clone_error(e: nix::errno::Errno, user_namespace: bool) -> String {
    if user_namespace {
        format!(
            "cannot create a user namespace: {e}. Unprivileged user namespaces are disabled or exhausted on this machine (sysctl user.max_user_namespaces, kernel.unprivileged_userns_clone, or an AppArmor/SELinux policy); run as root, or use --backend lightweight"
        )
    } else {
        format!("cannot create the sandbox's namespaces: {e} (needs CAP_SYS_ADMIN)")
    }
}

/// Rootless: maps the service user to itself, the one mapping an unprivileged process may
/// write. Init keeps its capabilities inside (it created the namespace) and the server runs as
/// that non-zero uid; root inside maps to nobody outside, so nothing inside is root on the host.
/// `setgroups` must be denied first, so the server keeps the invoker's supplementary groups.
fn id_maps(child: Pid, user: &Account) -> Result<(), String> {
    let proc = PathBuf::from(format!("/proc/{child}"));
    for (file, text) in [
        ("setgroups", "deny".to_owned()),
        ("uid_map", format!("{0} {0} 1\n", user.uid)),
        ("gid_map", format!("{0} {0} 1\n", user.gid)),
    ] {
        fs::write(proc.join(file), text)
            .map_err(|e| format!("cannot write {}: {e}", proc.join(file).display()))?;
    }
    Ok(())
}

fn pipe() -> Result<(OwnedFd, OwnedFd), String> {
    nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(|e| format!("cannot make a pipe: {e}"))
}
