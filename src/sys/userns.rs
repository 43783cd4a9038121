//! Without root, an identity of each environment's own comes from the invoker's subordinate ids
//! (`/etc/subuid`, `/etc/subgid`, as rootless Podman uses them): a server is spawned into a user
//! namespace of its own that maps only its id, written by the setuid helpers `newuidmap` and
//! `newgidmap`, and switches to it before exec. The invoker keeps the environment's files in
//! hand through a second mapping (itself as root, and its whole subordinate range), in which
//! `chown` and `rm` run.

use std::ffi::OsStr;
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::thread::JoinHandle;

/// A contiguous range of host ids.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Range {
    pub first: u32,
    pub count: u32,
}

impl Range {
    pub fn contains(&self, id: u32) -> bool {
        id >= self.first && id - self.first < self.count
    }
}

/// The invoker's subordinate ids, and the invoker itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SubIds {
    pub uid: u32,
    pub gid: u32,
    pub uids: Range,
    pub gids: Range,
}

impl SubIds {
    /// The invoker's ranges, and the means to map them; else why not, with the fix.
    pub fn of_invoker() -> Result<SubIds, String> {
        let uid = nix::unistd::getuid().as_raw();
        let gid = nix::unistd::getgid().as_raw();
        let name = nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(uid))
            .ok()
            .flatten()
            .map(|u| u.name)
            .ok_or_else(|| format!("uid {uid} has no account, so it has no subordinate ids"))?;
        let range = |file: &str| {
            let text = std::fs::read_to_string(file).unwrap_or_default();
            parse(&text, &name, uid).ok_or_else(|| {
                format!(
                    "{file} gives `{name}` no range of subordinate ids (as root: usermod --add-subuids 100000-165535 --add-subgids 100000-165535 {name})"
                )
            })
        };
        let ids = SubIds {
            uid,
            gid,
            uids: range("/etc/subuid")?,
            gids: range("/etc/subgid")?,
        };
        for helper in ["newuidmap", "newgidmap"] {
            if !on_path(helper) {
                return Err(format!(
                    "{helper} is not installed (apt install uidmap, or dnf install shadow-utils)"
                ));
            }
        }
        Ok(ids)
    }

    /// The uids environments may claim: as many as both ranges hold.
    pub fn uids_for_environments(&self) -> Range {
        Range {
            first: self.uids.first,
            count: self.uids.count.min(self.gids.count),
        }
    }

    /// The host gid paired with the host uid `uid` of the range.
    pub fn gid_of(&self, uid: u32) -> u32 {
        self.gids.first + (uid - self.uids.first)
    }

    /// The mapping in which the invoker is root and owns its whole subordinate range, which
    /// starts at 1.
    fn owner(&self) -> Maps {
        Maps {
            uids: vec![[0, self.uid, 1], [1, self.uids.first, self.uids.count]],
            gids: vec![[0, self.gid, 1], [1, self.gids.first, self.gids.count]],
        }
    }

    /// `uid:gid` of the host ids `uid`/`gid` in [`Self::owner`]'s mapping.
    fn inner(&self, uid: u32, gid: u32) -> String {
        let inner = |id: u32, own: u32, range: &Range| match id == own {
            true => 0,
            false => 1 + id - range.first,
        };
        format!(
            "{}:{}",
            inner(uid, self.uid, &self.uids),
            inner(gid, self.gid, &self.gids)
        )
    }

    /// Gives `path` (with `-R`, its tree) to host ids `uid`:`gid` of the range or the invoker.
    pub fn chown(&self, path: &Path, uid: u32, gid: u32, recursive: bool) -> io::Result<()> {
        let owner = self.inner(uid, gid);
        let mut args: Vec<&OsStr> = vec![OsStr::new("-h")];
        if recursive {
            args.push(OsStr::new("-R"));
        }
        args.extend([OsStr::new(&owner), OsStr::new("--"), path.as_os_str()]);
        self.as_owner("chown", &args)
    }

    /// Removes a tree that holds files of the subordinate range.
    pub fn remove_tree(&self, path: &Path) -> io::Result<()> {
        self.as_owner(
            "rm",
            &[OsStr::new("-rf"), OsStr::new("--"), path.as_os_str()],
        )
    }

    /// Runs `program` as root of [`Self::owner`]'s mapping.
    fn as_owner(&self, program: &str, args: &[&OsStr]) -> io::Result<()> {
        let mut cmd = Command::new(program);
        cmd.args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let entry = Entry::prepare(&mut cmd, self.owner(), None)?;
        let child = entry.finish(cmd.spawn())?;
        let out = child.wait_with_output()?;
        if out.status.success() {
            return Ok(());
        }
        Err(io::Error::other(format!(
            "{program} {} in a user namespace of the invoker's subordinate ids failed ({}): {}",
            args.iter()
                .map(|a| a.to_string_lossy())
                .collect::<Vec<_>>()
                .join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )))
    }

    /// The mapping of a server that runs as host ids `uid`:`gid` of the range, the same ids
    /// inside (so that it sees itself as it is seen).
    pub fn server(&self, uid: u32, gid: u32) -> Maps {
        Maps {
            uids: vec![[uid, uid, 1]],
            gids: vec![[gid, gid, 1]],
        }
    }
}

fn on_path(program: &str) -> bool {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path).any(|dir| dir.join(program).is_file())
}

/// The first range `/etc/subuid` (or `subgid`) text gives the user, by name or by uid.
fn parse(text: &str, name: &str, uid: u32) -> Option<Range> {
    text.lines().find_map(|line| {
        let mut fields = line.trim().split(':');
        let (who, first, count) = (fields.next()?, fields.next()?, fields.next()?);
        if who != name && who != uid.to_string() {
            return None;
        }
        let range = Range {
            first: first.parse().ok()?,
            count: count.parse().ok()?,
        };
        (range.count > 0).then_some(range)
    })
}

/// Lines of a user namespace's maps: `[inner, outer, count]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Maps {
    pub uids: Vec<[u32; 3]>,
    pub gids: Vec<[u32; 3]>,
}

/// A command on its way into a user namespace of its own. Its child unshares, says its pid and
/// waits; a thread of ours has the helpers write the maps and lets it go on. (The thread, since
/// `spawn` returns only once the child has exec'd.)
pub struct Entry {
    /// The child's ends, held until `spawn` returns so that the thread sees the end of a child
    /// that never got as far as saying its pid.
    theirs: (OwnedFd, OwnedFd),
    mapper: JoinHandle<Result<(), String>>,
}

impl Entry {
    /// Makes `cmd` enter the namespace `maps` describes, then (with `become_ids`) switch to
    /// those inner uid and gid with no supplementary group. Must come before any
    /// other `pre_exec` that a change of credentials would undo (the parent-death signal).
    pub fn prepare(
        cmd: &mut Command,
        maps: Maps,
        become_ids: Option<(u32, u32)>,
    ) -> io::Result<Entry> {
        let (pid_read, pid_write) = pipe()?;
        let (go_read, go_write) = pipe()?;
        let fds = [
            pid_read.as_raw_fd(),
            pid_write.as_raw_fd(),
            go_read.as_raw_fd(),
            go_write.as_raw_fd(),
        ];
        // SAFETY: only async-signal-safe system calls on integers and a stack buffer.
        unsafe {
            cmd.pre_exec(move || enter(fds, become_ids));
        }
        let mapper = std::thread::spawn(move || write_maps(pid_read, go_write, &maps));
        Ok(Entry {
            theirs: (pid_write, go_read),
            mapper,
        })
    }

    /// The spawned child, once its maps are written; else the reason they were not.
    pub fn finish(self, spawned: io::Result<Child>) -> io::Result<Child> {
        drop(self.theirs);
        let mapped = self
            .mapper
            .join()
            .unwrap_or_else(|_| Err("the thread writing the maps panicked".into()));
        match (spawned, mapped) {
            (Ok(child), Ok(())) => Ok(child),
            (Ok(mut child), Err(why)) => {
                let _ = child.kill();
                let _ = child.wait();
                Err(io::Error::other(why))
            }
            // The helpers' own words say more than the child's failure.
            (Err(_), Err(why)) if !why.is_empty() => Err(io::Error::other(why)),
            (Err(e), _) => Err(e),
        }
    }
}

/// The child's side: unshare, say the pid, wait for the maps, switch.
fn enter(fds: [i32; 4], become_ids: Option<(u32, u32)>) -> io::Result<()> {
    let [pid_read, pid_write, go_read, go_write] = fds;
    let fail = || Err(io::Error::last_os_error());
    // SAFETY: plain system calls; the buffers live on this stack.
    unsafe {
        // Our copies of the parent's ends would keep the pipes open against ourselves.
        libc::close(pid_read);
        libc::close(go_write);
        if libc::unshare(libc::CLONE_NEWUSER) != 0 {
            return fail();
        }
        let pid = libc::getpid().to_ne_bytes();
        if libc::write(pid_write, pid.as_ptr().cast(), pid.len()) != pid.len() as isize {
            return fail();
        }
        let mut go = [0u8; 1];
        if libc::read(go_read, go.as_mut_ptr().cast(), 1) != 1 {
            return Err(io::Error::from_raw_os_error(libc::EPERM));
        }
        if let Some((uid, gid)) = become_ids {
            if libc::setgroups(0, std::ptr::null()) != 0
                || libc::setresgid(gid, gid, gid) != 0
                || libc::setresuid(uid, uid, uid) != 0
            {
                return fail();
            }
        }
    }
    Ok(())
}

/// The parent's side: the child's pid, then `newuidmap`/`newgidmap`, then the go.
fn write_maps(pid_read: OwnedFd, go_write: OwnedFd, maps: &Maps) -> Result<(), String> {
    let mut pid = [0u8; 4];
    File::from(pid_read)
        .read_exact(&mut pid)
        .map_err(|_| String::new())?;
    let pid = i32::from_ne_bytes(pid).to_string();
    for (helper, lines) in [("newuidmap", &maps.uids), ("newgidmap", &maps.gids)] {
        let out = Command::new(helper)
            .arg(&pid)
            .args(lines.iter().flatten().map(u32::to_string))
            .stdin(Stdio::null())
            .output()
            .map_err(|e| format!("cannot run {helper}: {e} (apt install uidmap)"))?;
        if !out.status.success() {
            return Err(format!(
                "{helper} {pid} {lines:?} failed ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
    }
    File::from(go_write)
        .write_all(b"g")
        .map_err(|e| format!("cannot let the process go on: {e}"))
}

fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(io::Error::from)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_range_is_found_by_name_or_uid() {
        let text = "alice:100000:65536\n1000:200000:10\nbob:300000:0\n";
        assert_eq!(
            parse(text, "alice", 5),
            Some(Range {
                first: 100000,
                count: 65536
            })
        );
        assert_eq!(parse(text, "carol", 1000).map(|r| r.first), Some(200000));
        // An empty range is none.
        assert_eq!(parse(text, "bob", 7), None);
        assert_eq!(parse("garbage\n", "alice", 5), None);
    }

    #[test]
    fn the_owner_mapping_puts_the_invoker_at_0_and_the_range_from_1() {
        let ids = SubIds {
            uid: 1000,
            gid: 1001,
            uids: Range {
                first: 100000,
                count: 65536,
            },
            gids: Range {
                first: 300000,
                count: 100,
            },
        };
        assert_eq!(ids.uids_for_environments().count, 100);
        assert_eq!(ids.gid_of(100007), 300007);
        assert_eq!(ids.inner(100007, 300007), "8:8");
        assert_eq!(ids.inner(1000, 300007), "0:8");
        assert_eq!(ids.owner().uids, vec![[0, 1000, 1], [1, 100000, 65536]]);
        assert!(ids.uids.contains(165535) && !ids.uids.contains(165536));
    }
}
