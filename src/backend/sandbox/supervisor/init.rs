//! The sandbox's pid 1: builds the filesystem the manifest grants (the order bubblewrap and
//! youki use), brings up `lo`, starts the server without privileges, then
//! reaps and forwards signals until the server exits.

use std::fs::{self, File};
use std::io::{self, Write};
use std::os::fd::{FromRawFd, RawFd};
use std::os::unix::fs::{symlink, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use nix::mount::{mount, umount2, MntFlags, MsFlags};
use nix::sched::CloneFlags;
use nix::sys::signal::{kill, Signal};
use nix::sys::statvfs::FsFlags;
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::{Gid, Pid, Uid};

use super::{handled_signals, Account, Request};
use crate::backend::manifest::{Bind, Mode};
use crate::backend::sandbox::cgroup;

/// Device nodes a server may open; everything else in `/dev` does not exist.
const DEVICES: [&str; 6] = ["null", "zero", "full", "random", "urandom", "tty"];
/// Top-level links of a merged-/usr system (`/lib -> usr/lib`), recreated so that binaries'
/// interpreter and library paths resolve inside the binds.
const USR_LINKS: [&str; 6] = ["bin", "sbin", "lib", "lib32", "lib64", "libx32"];
/// The parts of sysfs that exist inside.
const SYS_PARTS: [&str; 2] = ["class/net", "devices/virtual/net"];

/// Runs in the cloned child. Reports "ok" or the error on `ready`, then supervises.
pub(super) fn main(
    req: &Request,
    cgroups: &[PathBuf],
    channel: RawFd,
    go: RawFd,
    ready: RawFd,
) -> isize {
    // SAFETY: the fds were made for this child by the supervisor and are owned here alone.
    let (mut go, mut ready) = unsafe { (File::from_raw_fd(go), File::from_raw_fd(ready)) };
    if nix::sys::prctl::set_pdeathsig(Signal::SIGKILL).is_err() {
        return 1;
    }
    // The supervisor writes "go" once it has written our id maps (rootless); EOF means it died.
    let mut buf = [0u8; 2];
    if io::Read::read_exact(&mut go, &mut buf).is_err() {
        return 1;
    }
    drop(go);
    // Into the cgroups first, by ourselves while single-threaded (see `cgroup::attach_self`).
    let started = cgroup::attach_self(cgroups)
        .map_err(|e| e.to_string())
        .and_then(|()| setup(req))
        .and_then(|()| start(req, channel));
    // Only the server needed it, before its exec.
    let _ = nix::unistd::close(channel);
    match started {
        Ok(server) => {
            let _ = ready.write_all(b"ok");
            drop(ready);
            reap(server)
        }
        Err(message) => {
            let _ = ready.write_all(message.as_bytes());
            1
        }
    }
}

fn setup(req: &Request) -> Result<(), String> {
    // After the move into the sandbox's cgroups, so that they are its cgroup root.
    nix::sched::unshare(CloneFlags::CLONE_NEWCGROUP)
        .map_err(|e| format!("cannot unshare the cgroup namespace: {e}"))?;
    mount_none("/", MsFlags::MS_REC | MsFlags::MS_SLAVE)
        .map_err(|e| format!("cannot make / a slave mount: {e}"))?;
    let root = req.dir.join("root");
    let memory = req.manifest.limits.memory.0;
    tmpfs(&root, "mode=0755,size=1m")?;
    // Before the binds, which may go inside them.
    tmpfs(&root.join("tmp"), &format!("mode=1777,size={memory}"))?;
    etc(&root.join("etc"), &req.user, &req.hostname)?;
    bind_all(&root, &req.manifest.fs)?;
    for name in USR_LINKS {
        if let Ok(target) = fs::read_link(Path::new("/").join(name)) {
            let _ = symlink(target, root.join(name));
        }
    }
    devices(&root, memory)?;
    sys(&root)?;
    let proc = root.join("proc");
    mkdir(&proc)?;
    mount(
        Some("proc"),
        &proc,
        Some("proc"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
        None::<&str>,
    )
    .map_err(|e| format!("cannot mount /proc: {e}"))?;
    pivot(&root)?;
    // Only the manifest's rw binds, /tmp and /dev/shm stay writable.
    mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY | MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        None::<&str>,
    )
    .map_err(|e| format!("cannot make the root read-only: {e}"))?;
    nix::unistd::sethostname(&req.hostname).map_err(|e| format!("cannot set the hostname: {e}"))?;
    loopback_up().map_err(|e| format!("cannot bring up lo: {e}"))
}

/// Binds every path, parents before children; read-only needs a second remount.
fn bind_all(root: &Path, binds: &[Bind]) -> Result<(), String> {
    let mut order: Vec<&Bind> = binds.iter().collect();
    order.sort_by_key(|b| b.guest().components().count());
    for (i, bind) in order.iter().enumerate() {
        let target = root.join(bind.guest().strip_prefix("/").unwrap_or(bind.guest()));
        let inside_bind = order[..i]
            .iter()
            .any(|b| bind.guest().starts_with(b.guest()));
        let is_dir = fs::metadata(&bind.host)
            .map_err(|e| format!("{}: {e}", bind.host.display()))?
            .is_dir();
        if !target.exists() {
            // Never create a mount point through another bind: it would land on the host.
            if inside_bind {
                return Err(format!(
                    "{} is inside another bind and does not exist there; bind its parent instead",
                    bind.guest().display()
                ));
            }
            if is_dir {
                mkdir(&target)?;
            } else {
                mkdir(target.parent().unwrap_or(root))?;
                File::create(&target).map_err(|e| format!("{}: {e}", target.display()))?;
            }
        }
        bind_mount(&bind.host, &target, bind.mode)?;
    }
    Ok(())
}

/// Binds `host` (with what is mounted below it) on `target`, then takes away setuid and device
/// files and, for `ro`, writes: the flags of a bind are only changed by a second remount.
fn bind_mount(host: &Path, target: &Path, mode: Mode) -> Result<(), String> {
    mount(
        Some(host),
        target,
        None::<&str>,
        MsFlags::MS_BIND | MsFlags::MS_REC,
        None::<&str>,
    )
    .map_err(|e| format!("cannot bind {}: {e}", host.display()))?;
    let mut flags = MsFlags::MS_REMOUNT
        | MsFlags::MS_BIND
        | MsFlags::MS_NOSUID
        | MsFlags::MS_NODEV
        | kept_flags(target)?;
    if mode == Mode::Ro {
        flags |= MsFlags::MS_RDONLY;
    }
    mount(None::<&str>, target, None::<&str>, flags, None::<&str>)
        .map_err(|e| format!("cannot restrict {}: {e}", host.display()))
}

/// The flags a remount must repeat: in a user namespace the kernel locks those of mounts that
/// came from the host (`noexec`, atime, read-only), and refuses a remount that would drop them.
fn kept_flags(target: &Path) -> Result<MsFlags, String> {
    let have = nix::sys::statvfs::statvfs(target)
        .map_err(|e| format!("cannot read the flags of {}: {e}", target.display()))?
        .flags();
    Ok([
        (FsFlags::ST_RDONLY, MsFlags::MS_RDONLY),
        (FsFlags::ST_NOEXEC, MsFlags::MS_NOEXEC),
        (FsFlags::ST_NOATIME, MsFlags::MS_NOATIME),
        (FsFlags::ST_NODIRATIME, MsFlags::MS_NODIRATIME),
        (FsFlags::ST_RELATIME, MsFlags::MS_RELATIME),
    ]
    .into_iter()
    .filter(|(st, _)| have.contains(*st))
    .fold(MsFlags::empty(), |all, (_, ms)| all | ms))
}

/// A `/sys` holding only the network view: a sysfs mounted in the sandbox's network namespace
/// lists that namespace's interfaces (just `lo`), and nothing else of the host's devices,
/// kernel or cgroups is granted. The whole sysfs is mounted aside and dropped again.
fn sys(root: &Path) -> Result<(), String> {
    let whole = root.join(".sysfs");
    mkdir(&whole)?;
    mount(
        Some("sysfs"),
        &whole,
        Some("sysfs"),
        MsFlags::MS_RDONLY | MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
        None::<&str>,
    )
    .map_err(|e| format!("cannot mount sysfs: {e}"))?;
    // `class/net/lo` is a link to `../../devices/virtual/net/lo`.
    for part in SYS_PARTS {
        let target = root.join("sys").join(part);
        mkdir(&target)?;
        bind_mount(&whole.join(part), &target, Mode::Ro)?;
    }
    umount2(&whole, MntFlags::MNT_DETACH).map_err(|e| format!("cannot detach sysfs: {e}"))?;
    fs::remove_dir(&whole).map_err(|e| format!("cannot remove {}: {e}", whole.display()))
}

fn devices(root: &Path, memory: u64) -> Result<(), String> {
    let dev = root.join("dev");
    tmpfs(&dev, "mode=0755,size=64k")?;
    for name in DEVICES {
        let target = dev.join(name);
        File::create(&target).map_err(|e| format!("{}: {e}", target.display()))?;
        mount(
            Some(&Path::new("/dev").join(name)),
            &target,
            None::<&str>,
            MsFlags::MS_BIND,
            None::<&str>,
        )
        .map_err(|e| format!("cannot bind /dev/{name}: {e}"))?;
    }
    for (link, target) in [
        ("fd", "/proc/self/fd"),
        ("stdin", "/proc/self/fd/0"),
        ("stdout", "/proc/self/fd/1"),
        ("stderr", "/proc/self/fd/2"),
    ] {
        symlink(target, dev.join(link)).map_err(|e| format!("/dev/{link}: {e}"))?;
    }
    // PostgreSQL's dynamic shared memory lives here; it counts against the memory limit.
    tmpfs(&dev.join("shm"), &format!("mode=1777,size={memory}"))
}

/// Only what the engines need: the service user (PostgreSQL's initdb and server look it up),
/// `localhost`, and files-only name lookup.
fn etc(dir: &Path, user: &Account, hostname: &str) -> Result<(), String> {
    mkdir(dir)?;
    let files = [
        (
            "passwd",
            format!(
                "root:x:0:0:root:/:/usr/sbin/nologin\n{}:x:{}:{}::/nonexistent:/usr/sbin/nologin\n",
                user.name, user.uid, user.gid
            ),
        ),
        (
            "group",
            format!("root:x:0:\n{}:x:{}:\n", user.name, user.gid),
        ),
        (
            "hosts",
            format!("127.0.0.1 localhost {hostname}\n::1 localhost\n"),
        ),
        (
            "nsswitch.conf",
            "passwd: files\ngroup: files\nhosts: files\n".into(),
        ),
    ];
    for (name, text) in files {
        let path = dir.join(name);
        fs::write(&path, text).map_err(|e| format!("{}: {e}", path.display()))?;
        let _ = fs::set_permissions(&path, fs::Permissions::from_mode(0o644));
    }
    Ok(())
}

fn pivot(root: &Path) -> Result<(), String> {
    let old = root.join(".oldroot");
    mkdir(&old)?;
    nix::unistd::pivot_root(root, &old).map_err(|e| format!("pivot_root failed: {e}"))?;
    nix::unistd::chdir("/").map_err(|e| format!("cannot enter the new root: {e}"))?;
    umount2("/.oldroot", MntFlags::MNT_DETACH)
        .map_err(|e| format!("cannot detach the host's root: {e}"))?;
    fs::remove_dir("/.oldroot").map_err(|e| format!("cannot remove /.oldroot: {e}"))
}

fn tmpfs(path: &Path, options: &str) -> Result<(), String> {
    mkdir(path)?;
    mount(
        Some("tmpfs"),
        path,
        Some("tmpfs"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        Some(options),
    )
    .map_err(|e| format!("cannot mount a tmpfs on {}: {e}", path.display()))
}

fn mount_none(path: &str, flags: MsFlags) -> nix::Result<()> {
    mount(None::<&str>, path, None::<&str>, flags, None::<&str>)
}

fn mkdir(path: &Path) -> Result<(), String> {
    fs::create_dir_all(path).map_err(|e| format!("cannot create {}: {e}", path.display()))
}

/// `ip link set lo up`, with the ioctl (a new network namespace starts with `lo` down).
fn loopback_up() -> io::Result<()> {
    // SAFETY: plain socket and ioctl calls on a zeroed `ifreq` naming "lo".
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0);
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        let _close = std::os::fd::OwnedFd::from_raw_fd(fd);
        let mut req: libc::ifreq = std::mem::zeroed();
        for (dst, src) in req.ifr_name.iter_mut().zip(b"lo\0") {
            *dst = *src as libc::c_char;
        }
        if libc::ioctl(fd, libc::SIOCGIFFLAGS, &mut req) < 0 {
            return Err(io::Error::last_os_error());
        }
        req.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short;
        if libc::ioctl(fd, libc::SIOCSIFFLAGS, &req) < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Makes this process unprivileged for good: no capabilities (bounding set included), no way
/// to regain any (no_new_privs), the service user's uid and gid and no other group. Runs in a
/// freshly forked child of the single-threaded init.
fn drop_privileges(user: &Account, last_cap: i32, user_namespace: bool) -> io::Result<()> {
    for cap in 0..=last_cap {
        // SAFETY: prctl with integer arguments.
        if unsafe { libc::prctl(libc::PR_CAPBSET_DROP, cap, 0, 0, 0) } < 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() != Some(libc::EINVAL) {
                return Err(e);
            }
        }
    }
    nix::sys::prctl::set_no_new_privs()?;
    // A user namespace denies setgroups (see `id_maps`).
    if !user_namespace {
        nix::unistd::setgroups(&[])?;
    }
    let (uid, gid) = (Uid::from_raw(user.uid), Gid::from_raw(user.gid));
    nix::unistd::setresgid(gid, gid, gid)?;
    // Leaving uid 0 clears the permitted, effective and ambient sets; in a user namespace the
    // uid is already non-zero, and exec clears them (no file capabilities, empty ambient set).
    nix::unistd::setresuid(uid, uid, uid)?;
    Ok(())
}

fn last_cap() -> i32 {
    fs::read_to_string("/proc/sys/kernel/cap_last_cap")
        .ok()
        .and_then(|t| t.trim().parse().ok())
        .unwrap_or(63)
}

/// Spawns the server, unprivileged, with only the manifest's environment, under the filter
/// that hands it the exposed port (see [`super::handoff`]).
fn start(req: &Request, channel: RawFd) -> Result<Pid, String> {
    let cap = last_cap();
    let (user, user_namespace) = (req.user.clone(), req.user_namespace);
    let mut cmd = Command::new(&req.program);
    cmd.args(&req.args)
        .env_clear()
        .envs(&req.manifest.env)
        .current_dir("/")
        .stdin(Stdio::null());
    let blocked = handled_signals();
    // SAFETY: init is single-threaded, so the child may allocate. The mask init blocks for
    // itself would otherwise be inherited (std does not reset it), and a server like Redis
    // would never see its stop signal.
    unsafe {
        cmd.pre_exec(move || {
            blocked.thread_unblock()?;
            drop_privileges(&user, cap, user_namespace)?;
            super::handoff::install(channel)
        });
    }
    cmd.spawn()
        .map(|child| Pid::from_raw(child.id() as i32))
        .map_err(|e| format!("cannot start {}: {e}", req.program.display()))
}

/// pid 1's duty: reap every orphan, pass stop signals to the server, and end with it.
fn reap(server: Pid) -> isize {
    let signals = handled_signals();
    loop {
        let Ok(sig) = signals.wait() else { continue };
        if sig != Signal::SIGCHLD {
            let _ = kill(server, sig);
            continue;
        }
        loop {
            match waitpid(None::<Pid>, Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::Exited(pid, code)) if pid == server => return code as isize,
                Ok(WaitStatus::Signaled(pid, sig, _)) if pid == server => {
                    return 128 + sig as isize
                }
                Ok(WaitStatus::StillAlive) | Err(_) => break,
                Ok(_) => {}
            }
        }
    }
}
