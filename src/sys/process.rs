//! Server processes: the unprivileged user they run as, detached spawning, identity that survives
//! pid reuse, and graceful stop.

use std::ffi::OsString;
use std::fs::File;
use std::io;
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread::sleep;
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag};
use nix::unistd::{Pid, User};
use serde::{Deserialize, Serialize};

use super::userns::{Entry, SubIds};

/// The user a server runs as. As root it is never root (PostgreSQL refuses it, and a database
/// needs no privileges): `ISOENV_SERVICE_USER`, else the invoking `SUDO_USER`, else `nobody`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceUser {
    pub name: String,
    pub uid: u32,
    pub gid: u32,
    /// How processes become this user.
    pub switch: Switch,
}

/// How a process becomes the user it must run as.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Switch {
    /// It is the invoker already.
    No,
    /// As root: `setgid`/`setuid` before exec.
    Setuid,
    /// Without root: a user namespace of its own that maps only this user's ids, taken from
    /// the invoker's subordinate ones.
    Subordinate(SubIds),
}

impl ServiceUser {
    pub fn resolve(requested: Option<&str>) -> Result<Self, String> {
        if !nix::unistd::geteuid().is_root() {
            return Ok(Self::invoker());
        }
        let name = requested
            .map(str::to_owned)
            .or_else(sudo_user)
            .unwrap_or_else(|| "nobody".into());
        match User::from_name(&name) {
            Ok(Some(u)) if !u.uid.is_root() => Ok(ServiceUser {
                name,
                uid: u.uid.as_raw(),
                gid: u.gid.as_raw(),
                switch: Switch::Setuid,
            }),
            Ok(Some(_)) => Err(format!(
                "service user `{name}` is root; servers must run unprivileged (set ISOENV_SERVICE_USER to another user)"
            )),
            _ => Err(format!(
                "service user `{name}` does not exist (create it, or set ISOENV_SERVICE_USER to an existing unprivileged user)"
            )),
        }
    }

    /// Whether each environment's servers get an identity of their own
    /// ([`crate::sys::identity`]): as root, unless a service user was chosen.
    pub fn per_environment(requested: Option<&str>) -> bool {
        nix::unistd::geteuid().is_root() && requested.is_none() && sudo_user().is_none()
    }

    /// An environment's own identity: uid = gid, no account, no other group.
    pub fn own(id: u32) -> Self {
        ServiceUser {
            name: format!("isoenv-{id}"),
            uid: id,
            gid: id,
            switch: Switch::Setuid,
        }
    }

    /// Without root, an environment's own identity: host uid `uid` of the invoker's
    /// subordinate ids, and the gid paired with it.
    pub fn subordinate(uid: u32, ids: SubIds) -> Self {
        ServiceUser {
            name: format!("isoenv-{uid}"),
            uid,
            gid: ids.gid_of(uid),
            switch: Switch::Subordinate(ids),
        }
    }

    /// Whoever runs isoenv: for processes that act with the user's own credentials (ssh).
    pub fn invoker() -> Self {
        let euid = nix::unistd::geteuid();
        let user = User::from_uid(euid).ok().flatten();
        ServiceUser {
            name: user.map_or_else(|| euid.to_string(), |u| u.name),
            uid: euid.as_raw(),
            gid: nix::unistd::getegid().as_raw(),
            switch: Switch::No,
        }
    }

    /// Makes `cmd` run as this user, with no supplementary groups. Call before any other
    /// `pre_exec`, and hand `spawn`'s result to [`Applied::spawned`].
    pub fn apply(&self, cmd: &mut Command) -> io::Result<Applied> {
        match &self.switch {
            Switch::No => Ok(Applied(None)),
            Switch::Setuid => {
                cmd.uid(self.uid).gid(self.gid);
                Ok(Applied(None))
            }
            Switch::Subordinate(ids) => Entry::prepare(
                cmd,
                ids.server(self.uid, self.gid),
                Some((self.uid, self.gid)),
            )
            .map(|e| Applied(Some(e))),
        }
    }

    /// Gives `path` (not a symlink's target) to this user.
    pub fn chown(&self, path: &Path) -> io::Result<()> {
        match &self.switch {
            Switch::No => Ok(()),
            Switch::Setuid => std::os::unix::fs::lchown(path, Some(self.uid), Some(self.gid)),
            Switch::Subordinate(ids) => ids.chown(path, self.uid, self.gid, false),
        }
    }

    /// Makes `dir` the place both the server and the invoker write (`run/`: sockets, lock and
    /// pid files): the server's own as root (root reaches it anyway); without root, the
    /// invoker's with the server's group, so the invoker can still reach the sockets and clear
    /// what a dead server left.
    pub fn share_dir(&self, dir: &Path) -> io::Result<()> {
        let mode = match &self.switch {
            Switch::Subordinate(ids) => {
                ids.chown(dir, ids.uid, self.gid, false)?;
                0o770
            }
            _ => {
                self.chown(dir)?;
                0o700
            }
        };
        std::fs::set_permissions(dir, std::os::unix::fs::PermissionsExt::from_mode(mode))
    }
}

/// What [`ServiceUser::apply`] set going, finished once the command is spawned.
pub struct Applied(Option<Entry>);

impl Applied {
    pub fn spawned(self, child: io::Result<Child>) -> io::Result<Child> {
        match self.0 {
            Some(entry) => entry.finish(child),
            None => child,
        }
    }
}

/// A program with arguments, kept as data so that decisions about it are testable and so that
/// each backend can run it its own way.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Launch {
    pub program: PathBuf,
    pub args: Vec<OsString>,
    /// The signal the process gets when the thread that spawned it ends (`PR_SET_PDEATHSIG`),
    /// for servers that must not outlive their owner.
    pub parent_death: Option<Signal>,
    /// The process and its children do not wait for the disk ([`super::seccomp::without_disk_sync`]),
    /// for servers whose data is thrown away with them.
    pub disk_sync: bool,
}

impl Launch {
    pub fn new(program: impl Into<PathBuf>) -> Self {
        Launch {
            program: program.into(),
            args: Vec::new(),
            parent_death: None,
            disk_sync: true,
        }
    }

    pub fn arg(mut self, arg: impl Into<OsString>) -> Self {
        self.args.push(arg.into());
        self
    }

    pub fn die_with_parent(mut self, signal: Signal) -> Self {
        self.parent_death = Some(signal);
        self
    }

    pub fn without_disk_sync(mut self) -> Self {
        self.disk_sync = false;
        self
    }

    pub fn command(&self) -> Command {
        let mut cmd = Command::new(&self.program);
        cmd.args(&self.args);
        cmd
    }

    /// Runs to completion as `user`; on failure the error carries the output's tail.
    pub fn run(&self, user: &ServiceUser, cwd: &Path) -> Result<(), String> {
        let mut cmd = self.command();
        let cannot = |e: io::Error| format!("cannot run {}: {e}", self.program.display());
        let applied = user.apply(&mut cmd).map_err(cannot)?;
        // SAFETY: prctl and fresh_start are async-signal-safe and touch no state of the parent.
        // An initializer dies with the command that runs it: a killed `create` leaves none.
        unsafe {
            cmd.pre_exec(|| {
                nix::sys::prctl::set_pdeathsig(Signal::SIGKILL)?;
                fresh_start()
            });
        }
        cmd.current_dir(cwd)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .env_remove("PGPASSWORD");
        let out = applied
            .spawned(cmd.spawn())
            .and_then(Child::wait_with_output)
            .map_err(cannot)?;
        if out.status.success() {
            return Ok(());
        }
        let mut text = String::from_utf8_lossy(&out.stderr).into_owned();
        text.push_str(&String::from_utf8_lossy(&out.stdout));
        Err(format!(
            "{} failed ({}):\n{}",
            self.program.display(),
            out.status,
            tail(&text, 20)
        ))
    }

    /// Starts the program in its own session (so a terminal's Ctrl-C does not reach it) with
    /// output appended to `log`, and returns without waiting: the server outlives this process.
    pub fn spawn_detached(
        &self,
        user: &ServiceUser,
        cwd: &Path,
        log: &Path,
    ) -> io::Result<ProcessId> {
        let out = File::options()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(log)?;
        let mut cmd = self.command();
        let applied = user.apply(&mut cmd)?;
        cmd.current_dir(cwd)
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out);
        let parent_death = self.parent_death;
        // Built here: the child may not allocate.
        let mut filter = (!self.disk_sync).then(super::seccomp::without_disk_sync);
        // SAFETY: setsid, prctl, fresh_start and installing a filter are async-signal-safe and
        // touch no state of the parent. They run after the switch to the service user, which
        // would clear the death signal; the filter after `no_new_privs`, which it needs.
        unsafe {
            cmd.pre_exec(move || {
                nix::unistd::setsid()?;
                if let Some(sig) = parent_death {
                    nix::sys::prctl::set_pdeathsig(sig)?;
                }
                fresh_start()?;
                if let Some(program) = filter.as_mut() {
                    super::seccomp::install(program, 0)?;
                }
                Ok(())
            });
        }
        let child = applied.spawned(cmd.spawn())?;
        ProcessId::of(child.id() as i32)
    }
}

/// The user who ran `sudo`, when it was not root.
fn sudo_user() -> Option<String> {
    std::env::var("SUDO_USER").ok().filter(|u| u != "root")
}

/// In a child between fork and exec: nothing of the invoker's state goes on to the program.
/// Every inherited descriptor beyond stdin, stdout and stderr closes at exec (a directory the
/// invoker held open would otherwise reach the whole filesystem through `/proc/self/fd`), and
/// the process gets a session keyring of its own (the invoker's keys stay the invoker's), and
/// `no_new_privs`. Three system calls, async-signal-safe.
fn fresh_start() -> io::Result<()> {
    // SAFETY: raw system calls with integer arguments; no memory is touched.
    let closed = unsafe {
        libc::syscall(
            libc::SYS_close_range,
            3u32,
            u32::MAX,
            libc::CLOSE_RANGE_CLOEXEC,
        )
    };
    if closed != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: as above. A kernel without keyrings (or a filter refusing them) has none to leak.
    unsafe {
        libc::syscall(
            libc::SYS_keyctl,
            1, /* KEYCTL_JOIN_SESSION_KEYRING */
            0usize,
        );
    }
    // No setuid program it runs can give it more than it has.
    nix::sys::prctl::set_no_new_privs().map_err(io::Error::from)
}

/// The last `n` lines of `text`.
pub fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// A process identified by pid and kernel start time, so a recycled pid is never mistaken for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcessId {
    pub pid: i32,
    /// Field 22 of `/proc/PID/stat`: clock ticks after boot.
    pub start_time: u64,
}

impl ProcessId {
    pub fn of(pid: i32) -> io::Result<Self> {
        let stat =
            read_stat(pid)?.ok_or_else(|| io::Error::other(format!("process {pid} vanished")))?;
        Ok(ProcessId {
            pid,
            start_time: stat.start_time,
        })
    }

    /// Alive and still the same process. A zombie counts as dead only once all its threads are
    /// gone: a multi-threaded server's leader turns zombie while other threads still exit and
    /// still hold its sockets.
    pub fn is_alive(&self) -> bool {
        reap(self.pid);
        self.is_running()
    }

    /// [`Self::is_alive`] without collecting the exit status of a child of ours: for a process
    /// another thread waits for (it would find nothing to wait for).
    pub fn is_running(&self) -> bool {
        match read_stat(self.pid) {
            Ok(Some(s)) if s.start_time == self.start_time => {
                s.state != 'Z' || threads_left(self.pid)
            }
            _ => false,
        }
    }

    /// Alive but on its way out: its leader already a zombie, or a SIGKILL pending. Such a
    /// server still holds its port for a moment; nothing may be started in its place yet.
    pub fn is_exiting(&self) -> bool {
        if !self.is_alive() {
            return false;
        }
        let zombie = read_stat(self.pid).is_ok_and(|s| s.is_some_and(|s| s.state == 'Z'));
        let status =
            std::fs::read_to_string(format!("/proc/{}/status", self.pid)).unwrap_or_default();
        let killed = status.lines().any(|l| {
            l.strip_prefix("ShdPnd:")
                .or_else(|| l.strip_prefix("SigPnd:"))
                .and_then(|mask| u64::from_str_radix(mask.trim(), 16).ok())
                .is_some_and(|mask| mask & (1 << (Signal::SIGKILL as u64 - 1)) != 0)
        });
        zombie || killed
    }

    pub fn signal(&self, signal: Signal) -> bool {
        self.is_alive() && kill(Pid::from_raw(self.pid), signal).is_ok()
    }

    /// Sends `signal`, waits up to `grace` for exit, then SIGKILLs. Returns whether it needed
    /// SIGKILL.
    pub fn stop(&self, signal: Signal, grace: Duration) -> bool {
        if !self.signal(signal) {
            return false;
        }
        if self.wait_exit(grace) {
            return false;
        }
        self.signal(Signal::SIGKILL);
        self.wait_exit(Duration::from_secs(10));
        true
    }

    pub fn wait_exit(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while self.is_alive() {
            if Instant::now() >= deadline {
                return false;
            }
            sleep(Duration::from_millis(2));
        }
        true
    }

    /// When it started, on the wall clock (`/proc/stat`'s boot time plus its start ticks).
    pub fn started(&self) -> Option<std::time::SystemTime> {
        let stat = std::fs::read_to_string("/proc/stat").ok()?;
        let boot: u64 = stat
            .lines()
            .find_map(|l| l.strip_prefix("btime "))?
            .trim()
            .parse()
            .ok()?;
        // SAFETY: sysconf has no preconditions.
        let ticks = u64::try_from(unsafe { libc::sysconf(libc::_SC_CLK_TCK) })
            .ok()
            .filter(|&t| t > 0)?;
        let after_boot = Duration::from_millis(self.start_time * 1000 / ticks);
        Some(std::time::UNIX_EPOCH + Duration::from_secs(boot) + after_boot)
    }
}

/// The processes whose working directory is `dir` or below it: what a command killed before it
/// recorded its server left running there (servers and initializers start in the directory
/// they belong to).
pub fn working_in(dir: &Path) -> Vec<ProcessId> {
    let Ok(dir) = std::fs::canonicalize(dir) else {
        return Vec::new();
    };
    working_dirs()
        .filter(|(_, cwd)| cwd.starts_with(&dir))
        .filter_map(|(pid, _)| ProcessId::of(pid).ok())
        .collect()
}

/// Every process with its working directory, as `/proc` shows them (a deleted one ends in
/// ` (deleted)`).
fn working_dirs() -> impl Iterator<Item = (i32, PathBuf)> {
    std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter_map(|pid| Some((pid, std::fs::read_link(format!("/proc/{pid}/cwd")).ok()?)))
}

/// The processes working in `dir` or below it that run one of `programs`, without those whose
/// parent is one of them too (a server's own workers go with it): the servers a command
/// started there and was killed before it recorded them.
pub fn running_in(dir: &Path, programs: &[PathBuf]) -> Vec<ProcessId> {
    let programs: Vec<PathBuf> = programs
        .iter()
        .map(|p| std::fs::canonicalize(p).unwrap_or_else(|_| p.clone()))
        .collect();
    leaders(working_in(dir).into_iter().filter(|p| {
        std::fs::read_link(format!("/proc/{}/exe", p.pid)).is_ok_and(|exe| programs.contains(&exe))
    }))
}

/// Of `found`, this process aside, those whose parent is not among them.
fn leaders(found: impl Iterator<Item = ProcessId>) -> Vec<ProcessId> {
    let found: Vec<(ProcessId, i32)> = found
        .filter(|p| p.pid != std::process::id() as i32)
        .filter_map(|p| Some((p, read_stat(p.pid).ok()??.parent)))
        .collect();
    found
        .iter()
        .filter(|(_, parent)| !found.iter().any(|(q, _)| q.pid == *parent))
        .map(|(p, _)| *p)
        .collect()
}

/// The name and the process id in `name`, made as `prefix` + `NAME-PID`: what isoenv calls
/// the scratch directories and cgroups it names after the process that made them.
pub fn named_by<'a>(name: &'a str, prefix: &str) -> Option<(&'a str, i32)> {
    let (rest, pid) = name.strip_prefix(prefix)?.rsplit_once('-')?;
    Some((rest, pid.parse().ok()?))
}

/// Argument `n` of process `pid`'s command line (0: the program).
pub fn argument(pid: i32, n: usize) -> Option<String> {
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    let arg = cmdline.split(|b| *b == 0).nth(n)?;
    Some(String::from_utf8_lossy(arg).into_owned())
}

/// The processes working in a directory under `root` that was deleted while they ran (an
/// environment removed by hand), with that directory.
pub fn orphans_under(root: &Path) -> Vec<(ProcessId, PathBuf)> {
    let roots: Vec<PathBuf> = std::iter::once(root.to_owned())
        .chain(std::fs::canonicalize(root))
        .collect();
    working_dirs()
        .filter_map(|(pid, cwd)| {
            let dir = PathBuf::from(cwd.to_str()?.strip_suffix(" (deleted)")?);
            // The directory right under the root: the environment, wherever inside it it ran.
            let (root, inside) = roots
                .iter()
                .find_map(|r| Some((r, dir.strip_prefix(r).ok()?)))?;
            let env = root.join(inside.components().next()?);
            Some((ProcessId::of(pid).ok()?, env))
        })
        .collect()
}

/// Stops every process [`working_in`] `dir` with SIGTERM, and SIGKILL only past a grace, so
/// that a server removes what it keeps outside the directory: PostgreSQL's shared memory in
/// `/dev/shm` and its System V segment, which a SIGKILL leaves behind for good once the
/// directory is gone (a single-user `postgres` under `initdb` keeps them too). Those whose
/// parent is not among them first (a server, a supervisor, an `initdb`), then what is left.
pub fn stop_working_in(dir: &Path) {
    for leader in leaders(working_in(dir).into_iter()) {
        leader.stop(Signal::SIGTERM, Duration::from_secs(5));
    }
    for pid in working_in(dir) {
        pid.stop(Signal::SIGTERM, Duration::from_secs(5));
    }
}

/// Collects the exit status if `pid` is our own child (a no-op otherwise), so that a server we
/// spawned in this process does not linger as a zombie.
fn reap(pid: i32) {
    let _ = waitpid(Pid::from_raw(pid), Some(WaitPidFlag::WNOHANG));
}

/// Whether a zombie leader still has threads that have not finished exiting.
fn threads_left(pid: i32) -> bool {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .map(|tasks| {
            tasks
                .flatten()
                .any(|t| t.file_name().to_str() != Some(&pid.to_string()))
        })
        .unwrap_or(false)
}

struct Stat {
    state: char,
    parent: i32,
    start_time: u64,
}

fn read_stat(pid: i32) -> io::Result<Option<Stat>> {
    let text = match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(t) => t,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    Ok(parse_stat(&text))
}

/// The command name (field 2) may contain spaces and parentheses, so fields are counted after
/// the last `)`.
fn parse_stat(text: &str) -> Option<Stat> {
    let rest = &text[text.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    Some(Stat {
        state: fields.first()?.chars().next()?,
        parent: fields.get(1)?.parse().ok()?,
        start_time: fields.get(19)?.parse().ok()?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_made_after_a_process_give_it_back() {
        assert_eq!(
            named_by(".removing-dev-42", ".removing-"),
            Some(("dev", 42))
        );
        assert_eq!(
            named_by("isoenv-test-1a-redis-7", "isoenv-"),
            Some(("test-1a-redis", 7))
        );
        assert_eq!(named_by("isoenv-dev", "isoenv-"), None);
        assert_eq!(named_by("other-dev-42", "isoenv-"), None);
    }

    #[test]
    fn stat_parsing_survives_odd_command_names() {
        let line = "42 (a) b (c)) S 1 42 42 0 -1 4194560 100 0 0 0 0 0 0 0 20 0 1 0 777 1000 10";
        let s = parse_stat(line).unwrap();
        assert_eq!((s.state, s.parent, s.start_time), ('S', 1, 777));
    }

    #[test]
    fn identity_detects_exit_and_pid_reuse() {
        let me = ProcessId::of(std::process::id() as i32).unwrap();
        assert!(me.is_alive());
        let recycled = ProcessId {
            start_time: me.start_time + 1,
            ..me
        };
        assert!(!recycled.is_alive());

        let mut child = Command::new("sleep").arg("30").spawn().unwrap();
        let id = ProcessId::of(child.id() as i32).unwrap();
        assert!(id.is_alive());
        assert!(!id.stop(Signal::SIGTERM, Duration::from_secs(5)));
        assert!(!id.is_alive());
        let _ = child.wait();
    }

    #[test]
    fn stop_escalates_to_sigkill() {
        let mut child = Command::new("bash")
            .args(["-c", "trap '' TERM; sleep 30"])
            .spawn()
            .unwrap();
        let id = ProcessId::of(child.id() as i32).unwrap();
        sleep(Duration::from_millis(100));
        assert!(id.stop(Signal::SIGTERM, Duration::from_millis(200)));
        assert!(!id.is_alive());
        let _ = child.wait();
    }
}
