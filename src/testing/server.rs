//! Where a test's server comes from: the one `cargo xtask test --isolated` exports
//! (`ISOENV_<ENGINE>_URL`), else one shared by every test process of the run (nextest starts a
//! process per test; cargo a process per test binary), else one for this process alone.
//!
//! A run's server belongs to the runner process (the test process's parent). A small watchdog,
//! forked from the process that started the server, stops it when the runner exits, or after
//! `ISOENV_IDLE_TIMEOUT` seconds without a handout, so no process outlives the run. Its
//! directory stays: the next run takes it on and starts the server again, with the pool's
//! template and databases in it, rather than making all of them (kept for a day of disuse, and
//! never past a restart of the machine). Any other leftover is removed by the next
//! provisioning.

use std::fs;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::{mpsc, Mutex, OnceLock};
use std::time::Duration;

use nix::fcntl::{Flock, FlockArg};
use nix::sys::signal::Signal;

use crate::backend::Status;
use crate::backend::{memory, BackendKind, Host};
use crate::engine::EngineKind;
use crate::envfile::Vars;
use crate::sys::process::ProcessId;
use crate::workspace::test_run::url_var;
use crate::workspace::{CreateOptions, Workspace};
use crate::EnvironmentConfig;

use super::{Result, TestingError};

/// How long a run's server waits for another handout before it stops, when its runner lives on.
const IDLE_TIMEOUT: Duration = Duration::from_secs(30 * 60);

/// Who a provisioned server belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Owner {
    /// The test runner (nextest, or cargo): every test process it starts shares the server.
    Run(ProcessId),
    /// This process alone (a test binary started by hand).
    Process(ProcessId),
}

/// The admin URL of the server for `engine`.
pub(super) fn url(engine: EngineKind) -> Result<String> {
    if let Ok(url) = std::env::var(url_var(engine)) {
        return Ok(url);
    }
    static SERVERS: Mutex<Vec<(EngineKind, String)>> = Mutex::new(Vec::new());
    let mut servers = SERVERS.lock().unwrap_or_else(|e| e.into_inner());
    if let Some((_, url)) = servers.iter().find(|(e, _)| *e == engine) {
        return Ok(url.clone());
    }
    let url = provision(engine).map_err(|source| TestingError::Provision {
        engine,
        source: Box::new(source),
    })?;
    servers.push((engine, url.clone()));
    Ok(url)
}

/// Marks the run's servers as in use, so the idle timeout counts from the last handout.
pub(super) fn in_use() {
    if let Some(files) = ALIVE.get() {
        for file in files.lock().unwrap_or_else(|e| e.into_inner()).iter() {
            let _ = nix::sys::stat::utimensat(
                None,
                file,
                &nix::sys::time::TimeSpec::UTIME_NOW,
                &nix::sys::time::TimeSpec::UTIME_NOW,
                nix::sys::stat::UtimensatFlags::FollowSymlink,
            );
        }
    }
}

/// The files whose modification time says when this process last handed out a database.
static ALIVE: OnceLock<Mutex<Vec<PathBuf>>> = OnceLock::new();

/// The test runner: this process's parent, when cargo or nextest started it.
pub(super) fn runner() -> Option<ProcessId> {
    let started =
        std::env::var_os("NEXTEST_RUN_ID").is_some() || std::env::var_os("CARGO").is_some();
    let parent = nix::unistd::getppid().as_raw();
    (started && parent > 1)
        .then(|| ProcessId::of(parent).ok())
        .flatten()
}

fn owner() -> crate::Result<Owner> {
    match runner() {
        Some(runner) => Ok(Owner::Run(runner)),
        None => ProcessId::of(std::process::id() as i32)
            .map(Owner::Process)
            .map_err(|e| io(Path::new("/proc"), e)),
    }
}

fn provision(engine: EngineKind) -> crate::Result<String> {
    match owner()? {
        Owner::Run(runner) => shared(engine, runner),
        Owner::Process(me) => own(engine, me),
    }
}

/// The state root every test process of this user shares, reachable by the unprivileged
/// service user when we are root.
fn workspace() -> crate::Result<(PathBuf, Workspace)> {
    let base = std::env::temp_dir().join(format!("isoenv-testing-{}", nix::unistd::geteuid()));
    fs::create_dir_all(&base).map_err(|e| io(&base, e))?;
    fs::set_permissions(&base, fs::Permissions::from_mode(0o755)).map_err(|e| io(&base, e))?;
    let mut vars = Vars::from_pairs([
        ("WASI_SANDBOX_DIR", base.join("state").display().to_string()),
        ("ISOENV_CACHE_DIR", base.join("cache").display().to_string()),
    ]);
    if let Ok(place) = std::env::var(memory::VAR) {
        vars = vars.with(memory::VAR, place);
    }
    let config = EnvironmentConfig::from_vars(&vars, &base)?;
    Ok((base, Workspace::new(&config, vars)))
}

/// The run's server: made by the first test process that asks, found by the others. A
/// previous run's server, stopped when that run ended, is taken on and started again, with its
/// data: the pool's template and databases are there already, so the run's first tests do not
/// wait for them (nor for a data directory removed and another made, which is slow on ext4).
fn shared(engine: EngineKind, runner: ProcessId) -> crate::Result<String> {
    let (base, ws) = workspace()?;
    // Once the run's server runs, its other processes find it without the lock and without
    // collecting again (1 ms of each test process under nextest). Its record names its process
    // before the server answers: the run's tag, written once it answers, says it is ready.
    let tag = run_tag(runner);
    let running = |n: &String| {
        ws.inspect(n)
            .is_ok_and(|i| i.owner == Some(runner) && i.status == Status::Running)
            && fs::read_to_string(ws.layout(n).dir.join(RUN_FILE)).is_ok_and(|t| t == tag)
    };
    let name = match slots(engine).find(running) {
        Some(name) => name,
        None => provide(&base, &ws, engine, runner)?,
    };
    ALIVE
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .push(ws.layout(&name).dir.join(ALIVE_FILE));
    in_use();
    end_with(runner).map_err(|e| io(Path::new("/proc"), e))?;
    ws.url(&name)
}

/// The run's server, made or taken on (or found, made by another of its processes) under the
/// lock that makes one process do it: its name.
fn provide(
    base: &Path,
    ws: &Workspace,
    engine: EngineKind,
    runner: ProcessId,
) -> crate::Result<String> {
    // One process makes the server; the others wait here, then find it.
    let _held = lock(base)?;
    remove_unusable(ws, engine)?;
    ws.gc_except(&is_slot)?;
    // This run's (made by another of its processes), else one a previous run left, else a
    // free one.
    let name = match slots(engine).find(|n| ws.inspect(n).is_ok_and(|i| i.owner == Some(runner))) {
        Some(name) => Some(name),
        None => take_on(ws, slots(engine), runner)?,
    }
    .or_else(|| slots(engine).find(|name| !ws.layout(name).dir.exists()))
    // Every slot is another live run's: a server for this run alone, collected after it.
    .unwrap_or_else(|| format!("run-{}-{}-{engine}", runner.pid, runner.start_time));
    let alive = ws.layout(&name).dir.join(ALIVE_FILE);
    let found = ws.inspect(&name).map(|info| info.status);
    let run = ws.layout(&name).dir.join(RUN_FILE);
    let tag = run_tag(runner);
    if found.as_ref().ok() != Some(&Status::Running) {
        // A previous run's is started again; one this run started already and that stopped
        // (the idle timeout, a crash) is made anew, since processes of this run may still hold
        // what it lent before.
        let previous = fs::read_to_string(&run).is_ok_and(|t| t != tag);
        let started = match found {
            Ok(_) if previous => ws.start(&name, &|_| {}).ok(),
            _ => None,
        };
        let info = match started {
            Some(info) => info,
            None => {
                if ws.layout(&name).dir.exists() {
                    ws.destroy(&name)?;
                }
                let opts = CreateOptions {
                    owner: Some(runner),
                    ..CreateOptions::server(&name, engine, BackendKind::Lightweight)
                };
                ws.create(&opts, &|_| {})?
            }
        };
        let boot = ws.layout(&name).dir.join(BOOT_FILE);
        fs::write(&boot, boot_id()).map_err(|e| io(&boot, e))?;
        fs::write(&run, &tag).map_err(|e| io(&run, e))?;
        fs::write(&alive, b"").map_err(|e| io(&alive, e))?;
        if let Some(pid) = info.pid {
            let server = ProcessId::of(pid).map_err(|e| io(Path::new("/proc"), e))?;
            watch(server, engine.engine().stop_signal(), runner, &alive)
                .map_err(|e| io(&alive, e))?;
        }
    }
    Ok(name)
}

/// What [`RUN_FILE`] holds for the run of `runner`.
fn run_tag(runner: ProcessId) -> String {
    format!("{}:{}", runner.pid, runner.start_time)
}

/// Holds the state directory `base` exclusively: one process at a time makes, takes on or
/// removes run servers.
fn lock(base: &Path) -> crate::Result<Flock<fs::File>> {
    let dir = fs::File::open(base).map_err(|e| io(base, e))?;
    Flock::lock(dir, FlockArg::LockExclusive).map_err(|(_, e)| io(base, e.into()))
}

/// Stops this process if its run ends first. The run's servers stop then, and the next run
/// takes them on with the databases in them: a test of a killed runner (nextest killed, its
/// tests orphaned) that went on would write into a database the next run may be given.
fn end_with(runner: ProcessId) -> std::io::Result<()> {
    static WATCHED: OnceLock<()> = OnceLock::new();
    if WATCHED.get().is_some() {
        return Ok(());
    }
    let fd = pidfd(runner)?;
    std::thread::Builder::new()
        .name("isoenv-run".into())
        .spawn(move || {
            let mut pfd = libc::pollfd {
                fd: fd.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one valid pollfd, for the descriptor this thread owns.
            while unsafe { libc::poll(&mut pfd, 1, -1) } < 1 {}
            super::stop_process(&format!(
                "the test run this process belongs to (process {}) has ended, and its servers \
                 with it; stopping this test process before it writes into a database the next \
                 run may be given.",
                runner.pid
            ));
        })?;
    let _ = WATCHED.set(());
    Ok(())
}

/// How many runs at once (of this user) keep a server of each engine for the next runs.
const SLOTS: usize = 4;

/// The names of `engine`'s run servers that the next runs take on.
fn slots(engine: EngineKind) -> impl Iterator<Item = String> {
    (0..SLOTS).map(move |i| format!("run-{engine}-{i}"))
}

/// Whether `name` is a server the next runs take on.
fn is_slot(name: &str) -> bool {
    EngineKind::ALL
        .into_iter()
        .any(|engine| slots(engine).any(|slot| slot == name))
}

/// Written in a server's directory: when a handout last used it.
const ALIVE_FILE: &str = "alive";
/// Written in a server's directory: the run that last started it.
const RUN_FILE: &str = "started-by";
/// Written in a server's directory: the boot it last started in.
const BOOT_FILE: &str = "boot";
/// How long a previous run's server is kept for the next run.
const KEPT_FOR: Duration = Duration::from_secs(24 * 3600);

/// Takes on for `runner` the first of `slots` that a previous run left, if any.
fn take_on(
    ws: &Workspace,
    slots: impl Iterator<Item = String>,
    runner: ProcessId,
) -> crate::Result<Option<String>> {
    for name in slots {
        let Ok(info) = ws.inspect(&name) else {
            continue;
        };
        if ws.adopt(&name, runner)? {
            if info.status == Status::Running {
                // Its watchdog died with it: stopped, to be started again with one.
                ws.stop(&name)?;
            }
            return Ok(Some(name));
        }
    }
    Ok(None)
}

/// Removes `engine`'s servers that previous runs left and that are not to be taken on: unused
/// for [`KEPT_FOR`], or last run before the machine restarted (it skipped its disk syncs, so a
/// crash may have torn its files), or with their data elsewhere than this run wants it
/// (`ISOENV_TEST_DATA`). Other engines' wait until they are asked for, rather than being
/// removed on this run's way. `gc` leaves these servers to this.
fn remove_unusable(ws: &Workspace, engine: EngineKind) -> crate::Result<()> {
    let boot = boot_id();
    let in_memory =
        engine.engine().data_in_memory() && matches!(memory::place(ws.vars()), Ok(Some(_)));
    let unusable = |dir: &Path| {
        if memory::linked(&dir.join("data")).is_some() != in_memory {
            return true;
        }
        let last_boot = fs::read_to_string(dir.join(BOOT_FILE)).ok();
        let unused_for = fs::metadata(dir.join(ALIVE_FILE))
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| t.elapsed().ok());
        !usable(last_boot.as_deref(), &boot, unused_for)
    };
    remove_left(ws, slots(engine), unusable).map(drop)
}

/// Removes every server previous runs left for the next ones (a live run's stay), returning
/// their names: to take their disk space back.
pub(super) fn remove_kept() -> crate::Result<Vec<String>> {
    let (base, ws) = workspace()?;
    let _held = lock(&base)?;
    remove_left(&ws, EngineKind::ALL.into_iter().flat_map(slots), |_| true)
}

/// Removes those of the servers `names` that previous runs left (their owner exited) and that
/// `unwanted` picks (given the server's directory).
fn remove_left(
    ws: &Workspace,
    names: impl Iterator<Item = String>,
    unwanted: impl Fn(&Path) -> bool,
) -> crate::Result<Vec<String>> {
    let mut removed = Vec::new();
    for name in names {
        let Ok(info) = ws.inspect(&name) else {
            continue;
        };
        let dead_owner = info.owner.is_some_and(|o| !o.is_alive());
        if dead_owner && unwanted(&info.dir) {
            ws.destroy(&name)?;
            removed.push(name);
        }
    }
    Ok(removed)
}

/// Whether a previous run's server may be taken on: it last ran in this boot (`boot`, empty
/// when unknown) and was used less than [`KEPT_FOR`] ago. A pure decision.
fn usable(last_boot: Option<&str>, boot: &str, unused_for: Option<Duration>) -> bool {
    !boot.is_empty() && last_boot == Some(boot) && unused_for.is_some_and(|d| d < KEPT_FOR)
}

/// This boot of the machine (empty if unknown, which no server's file matches).
fn boot_id() -> String {
    fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .map(|b| b.trim().to_owned())
        .unwrap_or_default()
}

/// A server owned by this process, spawned from a thread that lives as long as the process,
/// so it gets its stop signal when the process exits; what it leaves on disk is collected by
/// the next provisioning.
fn own(engine: EngineKind, me: ProcessId) -> crate::Result<String> {
    let (tx, rx) = mpsc::channel();
    std::thread::Builder::new()
        .name("isoenv-keeper".into())
        .spawn(move || {
            let _ = tx.send(own_here(engine, me));
            // The server's parent-death signal is tied to this thread: keep it alive.
            loop {
                std::thread::park();
            }
        })
        .map_err(|e| crate::Error::Io {
            context: "cannot start the isoenv keeper thread".into(),
            cause: e,
        })?;
    rx.recv().unwrap_or_else(|_| {
        Err(crate::Error::Unsupported(
            "the isoenv keeper thread died".into(),
        ))
    })
}

fn own_here(engine: EngineKind, me: ProcessId) -> crate::Result<String> {
    let (_, ws) = workspace()?;
    ws.gc_except(&is_slot)?;
    let name = format!("t{}-{}", me.pid, engine);
    let opts = CreateOptions {
        owner: Some(me),
        ..CreateOptions::server(&name, engine, BackendKind::Lightweight)
    };
    ws.create(&opts, &|_| {})?;
    ws.url(&name)
}

fn io(path: &Path, source: std::io::Error) -> crate::Error {
    crate::Error::Io {
        context: format!("cannot prepare {}", path.display()),
        cause: source,
    }
}

/// Forks the watchdog of a run's server: it sends `signal` to the server (SIGKILL after 30 s)
/// once the runner has exited, the server's directory is gone, or `alive` has not been touched
/// for the idle timeout, and exits with the server. Both processes are held by pidfds, so a
/// recycled pid is never signalled.
fn watch(
    server: ProcessId,
    signal: Signal,
    runner: ProcessId,
    alive: &Path,
) -> std::io::Result<()> {
    let server_fd = pidfd(server)?;
    let runner_fd = pidfd(runner)?;
    let alive = std::ffi::CString::new(alive.as_os_str().as_bytes())?;
    let null = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/null")?;
    let idle = std::env::var("ISOENV_IDLE_TIMEOUT")
        .ok()
        .and_then(|s| s.parse().ok())
        .map_or(IDLE_TIMEOUT, Duration::from_secs)
        .as_secs() as i64;
    // SAFETY: the child calls only async-signal-safe system calls on memory prepared above (no
    // allocation, no locks) and ends with `_exit`.
    match unsafe { nix::unistd::fork() }? {
        nix::unistd::ForkResult::Parent { .. } => Ok(()),
        nix::unistd::ForkResult::Child => unsafe {
            watchdog(
                server_fd.as_raw_fd(),
                runner_fd.as_raw_fd(),
                null.as_raw_fd(),
                &alive,
                idle,
                signal as i32,
            )
        },
    }
}

fn pidfd(p: ProcessId) -> std::io::Result<OwnedFd> {
    // SAFETY: pidfd_open returns a new descriptor we own, or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, p.pid, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: a fresh descriptor from the kernel.
    let fd = unsafe { OwnedFd::from_raw_fd(fd as RawFd) };
    // Opened after a check could race with pid reuse: check again with the fd held.
    if !p.is_alive() {
        return Err(std::io::Error::other(format!("process {} is gone", p.pid)));
    }
    Ok(fd)
}

/// The watchdog's body, in the forked child. Leaves the test's session and output (a runner
/// waits for processes holding its pipes), keeps only its two pidfds, and polls.
unsafe fn watchdog(
    server: RawFd,
    runner: RawFd,
    null: RawFd,
    alive: &std::ffi::CStr,
    idle: i64,
    signal: i32,
) -> ! {
    libc::setsid();
    for fd in 0..3 {
        libc::dup2(null, fd);
    }
    libc::dup2(server, 3);
    libc::dup2(runner, 4);
    libc::syscall(libc::SYS_close_range, 5u32, u32::MAX, 0u32);
    let mut fds = [
        libc::pollfd {
            fd: 3,
            events: libc::POLLIN,
            revents: 0,
        },
        libc::pollfd {
            fd: 4,
            events: libc::POLLIN,
            revents: 0,
        },
    ];
    loop {
        fds[0].revents = 0;
        fds[1].revents = 0;
        libc::poll(fds.as_mut_ptr(), 2, 1000);
        if fds[0].revents != 0 {
            libc::_exit(0);
        }
        if fds[1].revents != 0 || idle_for(alive) > idle {
            break;
        }
    }
    libc::syscall(
        libc::SYS_pidfd_send_signal,
        3,
        signal,
        std::ptr::null::<libc::siginfo_t>(),
        0u32,
    );
    if libc::poll(fds.as_mut_ptr(), 1, 30_000) == 0 {
        libc::syscall(
            libc::SYS_pidfd_send_signal,
            3,
            libc::SIGKILL,
            std::ptr::null::<libc::siginfo_t>(),
            0u32,
        );
    }
    libc::_exit(0)
}

/// Seconds since `alive` was touched; very long when it is gone (the environment was removed).
unsafe fn idle_for(alive: &std::ffi::CStr) -> i64 {
    let mut st: libc::stat = std::mem::zeroed();
    if libc::stat(alive.as_ptr(), &mut st) != 0 {
        return i64::MAX;
    }
    let mut now: libc::timespec = std::mem::zeroed();
    libc::clock_gettime(libc::CLOCK_REALTIME, &mut now);
    now.tv_sec - st.st_mtime
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_slot_names_are_taken_on_and_left_out_of_gc() {
        for engine in EngineKind::ALL {
            assert!(slots(engine).all(|slot| is_slot(&slot)));
            assert!(
                !is_slot(&format!("run-{engine}-{SLOTS}")),
                "past the last slot"
            );
        }
        // A run's own server when every slot is taken, a process's own, a user's.
        assert!(!is_slot("run-4242-99-postgres"));
        assert!(!is_slot("t4242-postgres"));
        assert!(!is_slot("run-oracle-0"));
        assert!(!is_slot("dev"));
    }

    #[test]
    fn a_server_is_taken_on_only_in_the_boot_it_ran_in_and_within_a_day() {
        let hour = Some(Duration::from_secs(3600));
        assert!(usable(Some("b1"), "b1", hour));
        assert!(!usable(Some("b0"), "b1", hour), "another boot");
        assert!(!usable(None, "b1", hour), "no boot written");
        assert!(!usable(Some(""), "", hour), "this boot unknown");
        assert!(
            !usable(Some("b1"), "b1", Some(KEPT_FOR)),
            "unused for a day"
        );
        assert!(!usable(Some("b1"), "b1", None), "never used");
    }
}
