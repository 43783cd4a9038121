//! The machine's cgroup layout, read from `/proc/self/mountinfo` (never from hard-coded paths),
//! and the groups that hold a sandbox's limits: v1 (and hybrid) through the v1 controllers,
//! v2 through the unified hierarchy. What is decided (which directories, which files, which
//! values) is pure; [`Plan::apply`] and [`attach_self`] do the writing.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::backend::manifest::Limits;
use crate::backend::Enforcement;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Version {
    V1,
    Hybrid,
    V2,
    None,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Mount {
    pub path: String,
    /// v1 controllers on this hierarchy (empty for cgroup2).
    pub controllers: Vec<String>,
    pub v2: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CgroupLayout {
    pub version: Version,
    pub mounts: Vec<Mount>,
}

impl CgroupLayout {
    pub fn detect() -> std::io::Result<Self> {
        Ok(Self::parse(&std::fs::read_to_string(
            "/proc/self/mountinfo",
        )?))
    }

    /// Hybrid: v1 controllers plus a cgroup2 hierarchy (often at `/sys/fs/cgroup/unified`).
    pub fn parse(mountinfo: &str) -> Self {
        let mounts: Vec<Mount> = mountinfo
            .lines()
            .filter_map(|line| {
                // "ID PARENT MAJ:MIN ROOT MOUNTPOINT OPTS [OPTIONAL...] - FSTYPE SOURCE SUPEROPTS"
                let (left, right) = line.split_once(" - ")?;
                let path = left.split_whitespace().nth(4)?.to_owned();
                let mut r = right.split_whitespace();
                let fstype = r.next()?;
                let superopts = r.nth(1).unwrap_or_default();
                match fstype {
                    "cgroup2" => Some(Mount {
                        path,
                        controllers: Vec::new(),
                        v2: true,
                    }),
                    "cgroup" => Some(Mount {
                        path,
                        controllers: superopts
                            .split(',')
                            .filter(|o| !matches!(*o, "rw" | "ro" | "xattr") && !o.contains('='))
                            .map(str::to_owned)
                            .collect(),
                        v2: false,
                    }),
                    _ => None,
                }
            })
            .collect();
        let (v1, v2) = (mounts.iter().any(|m| !m.v2), mounts.iter().any(|m| m.v2));
        let version = match (v1, v2) {
            (true, true) => Version::Hybrid,
            (true, false) => Version::V1,
            (false, true) => Version::V2,
            (false, false) => Version::None,
        };
        CgroupLayout { version, mounts }
    }

    pub fn controllers(&self) -> Vec<&str> {
        self.mounts
            .iter()
            .flat_map(|m| m.controllers.iter().map(String::as_str))
            .collect()
    }
}

/// One limit and how it is (to be) enforced.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Setting {
    /// `memory`, `cpu` or `pids`.
    pub limit: String,
    /// The limit as the manifest states it, e.g. `512M`.
    pub value: String,
    /// The files written, in order, with their contents. Empty: cannot be enforced here.
    pub writes: Vec<(PathBuf, String)>,
    /// How: e.g. `cgroup v1 memory.limit_in_bytes`; or why not.
    pub via: String,
}

impl Setting {
    fn outcome(&self, via: String, enforced: bool) -> Enforcement {
        Enforcement {
            limit: self.limit.clone(),
            value: self.value.clone(),
            via,
            enforced,
        }
    }
}

/// The groups to make for one sandbox and the limits to write into them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Plan {
    pub groups: Vec<PathBuf>,
    pub settings: Vec<Setting>,
}

const CPU_PERIOD_US: u64 = 100_000;

impl CgroupLayout {
    /// Plans groups named `name` under this process's own groups (`self_cgroup` is the text of
    /// `/proc/self/cgroup`). v1 controllers win over v2 on hybrid machines.
    pub fn plan(&self, self_cgroup: &str, name: &str, limits: &Limits) -> Plan {
        let memory = limits.memory.0.to_string();
        let quota = ((limits.cpu * CPU_PERIOD_US as f64).round() as u64).max(1000);
        let pids = limits.pids.to_string();
        type Files = Vec<(&'static str, String)>;
        let wanted: [(&str, String, Files, Files); 3] = [
            (
                "memory",
                limits.memory.to_string(),
                vec![
                    ("memory.limit_in_bytes", memory.clone()),
                    // Without it the group could swap past the limit.
                    ("memory.memsw.limit_in_bytes", memory.clone()),
                ],
                vec![
                    ("memory.max", memory.clone()),
                    ("memory.swap.max", "0".into()),
                ],
            ),
            (
                "cpu",
                format!("{}", limits.cpu),
                vec![
                    ("cpu.cfs_period_us", CPU_PERIOD_US.to_string()),
                    ("cpu.cfs_quota_us", quota.to_string()),
                ],
                vec![("cpu.max", format!("{quota} {CPU_PERIOD_US}"))],
            ),
            (
                "pids",
                pids.clone(),
                vec![("pids.max", pids.clone())],
                vec![("pids.max", pids)],
            ),
        ];
        let mut groups: Vec<PathBuf> = Vec::new();
        let mut settings = Vec::new();
        for (controller, value, v1_files, v2_files) in wanted {
            let v1 = self
                .mounts
                .iter()
                .find(|m| !m.v2 && m.controllers.iter().any(|c| c == controller));
            let (dir, files, via) = match (v1, self.mounts.iter().find(|m| m.v2)) {
                (Some(m), _) => (
                    own_group(self_cgroup, |c| c.split(',').any(|c| c == controller))
                        .map(|parent| join(&m.path, &parent, name)),
                    v1_files,
                    format!("cgroup v1 {}", v1_files_name(controller)),
                ),
                (None, Some(m))
                    if self.version == Version::V2 || controller_in_v2(m, controller) =>
                {
                    let via = format!("cgroup v2 {}", v2_files[0].0);
                    (
                        own_group(self_cgroup, str::is_empty)
                            .map(|parent| join(&m.path, &parent, name)),
                        v2_files,
                        via,
                    )
                }
                _ => (
                    None,
                    Vec::new(),
                    format!("no {controller} controller is mounted"),
                ),
            };
            let Some(dir) = dir else {
                settings.push(Setting {
                    limit: controller.into(),
                    value,
                    writes: Vec::new(),
                    via,
                });
                continue;
            };
            if !groups.contains(&dir) {
                groups.push(dir.clone());
            }
            settings.push(Setting {
                limit: controller.into(),
                value,
                writes: files.into_iter().map(|(f, v)| (dir.join(f), v)).collect(),
                via,
            });
        }
        Plan { groups, settings }
    }
}

fn v1_files_name(controller: &str) -> &'static str {
    match controller {
        "memory" => "memory.limit_in_bytes",
        "cpu" => "cpu.cfs_quota_us",
        _ => "pids.max",
    }
}

/// On v2 a controller is usable where the root lists it (`cgroup.controllers`).
fn controller_in_v2(mount: &Mount, controller: &str) -> bool {
    fs::read_to_string(Path::new(&mount.path).join("cgroup.controllers"))
        .is_ok_and(|t| t.split_whitespace().any(|c| c == controller))
}

/// This process's group in the hierarchy whose controller list matches.
fn own_group(self_cgroup: &str, matches: impl Fn(&str) -> bool) -> Option<String> {
    self_cgroup.lines().find_map(|l| {
        let mut parts = l.splitn(3, ':');
        let (_, controllers, path) = (parts.next()?, parts.next()?, parts.next()?);
        matches(controllers).then(|| path.to_owned())
    })
}

fn join(mount: &str, parent: &str, name: &str) -> PathBuf {
    Path::new(mount)
        .join(parent.trim_start_matches('/'))
        .join(name)
}

impl Plan {
    /// Makes the groups and writes the limits. A limit the kernel refuses, or whose group this
    /// user may not create (rootless), is reported as not enforced with the reason (never
    /// silently assumed); the groups made are in the result even on error.
    pub fn apply(&self) -> (Vec<PathBuf>, io::Result<Vec<Enforcement>>) {
        let mut made = Vec::new();
        let mut refused: Vec<(&Path, String)> = Vec::new();
        for dir in &self.groups {
            if let Some(parent) = dir.parent() {
                // v2: the parent must delegate the controllers to its children.
                let control = parent.join("cgroup.subtree_control");
                if control.exists() {
                    let _ = fs::write(&control, "+memory +cpu +pids");
                }
            }
            match fs::create_dir(dir) {
                Ok(()) => made.push(dir.clone()),
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => made.push(dir.clone()),
                Err(e) if e.kind() == io::ErrorKind::PermissionDenied => {
                    refused.push((dir, e.to_string()))
                }
                Err(e) => {
                    return (
                        made,
                        Err(io::Error::new(
                            e.kind(),
                            format!("cannot create cgroup {}: {e}", dir.display()),
                        )),
                    )
                }
            }
        }
        let result = self
            .settings
            .iter()
            .map(|s| {
                let why = refused
                    .iter()
                    .find(|(dir, _)| s.writes.first().is_some_and(|(f, _)| f.starts_with(dir)));
                if let Some((dir, e)) = why {
                    let why = refusal(&s.via, &dir.display().to_string(), e);
                    return s.outcome(format!("{}: {why}", s.via), false);
                }
                let enforced = !s.writes.is_empty()
                    && s.writes.iter().enumerate().all(|(i, (file, value))| {
                        // memsw/swap files exist only with swap accounting; skipping them is safe.
                        let optional = i > 0 && s.limit == "memory";
                        match fs::write(file, value) {
                            Ok(()) => true,
                            Err(_) if optional && !file.exists() => true,
                            Err(_) => false,
                        }
                    });
                s.outcome(s.via.clone(), enforced)
            })
            .collect();
        (made, Ok(result))
    }

    /// What [`Plan::apply`] would achieve, without making anything: a stopped sandbox's
    /// limits, each "applied at start" only where this user may create its group.
    pub fn preview(&self) -> Vec<Enforcement> {
        self.settings
            .iter()
            .map(|s| {
                let parent = s
                    .writes
                    .first()
                    .and_then(|(file, _)| file.parent()?.parent());
                let allowed = parent.map(|parent| {
                    nix::unistd::access(parent, nix::unistd::AccessFlags::W_OK).map_err(|e| {
                        let what = format!("a group in {}", parent.display());
                        refusal(&s.via, &what, &io::Error::from(e).to_string())
                    })
                });
                let via = match allowed {
                    None => s.via.clone(),
                    Some(Ok(())) => format!("{}, applied at start", s.via),
                    Some(Err(why)) => format!("{}: {why}", s.via),
                };
                s.outcome(via, false)
            })
            .collect()
    }

    /// Whether the files still hold the planned values (what `inspect` reports).
    pub fn verify(&self) -> Vec<Enforcement> {
        self.settings
            .iter()
            .map(|s| {
                let holds = s.writes.first().is_some_and(|(file, value)| {
                    fs::read_to_string(file).is_ok_and(|t| same_value(&t, value))
                });
                s.outcome(s.via.clone(), holds)
            })
            .collect()
    }
}

/// Why a group could not be made, said plainly: cgroup v1 has no delegation to unprivileged
/// users at all, and v2 only where the subtree was delegated (systemd's `Delegate=yes`).
fn refusal(via: &str, what: &str, e: &str) -> String {
    let hint = match (
        nix::unistd::geteuid().is_root(),
        via.starts_with("cgroup v1"),
    ) {
        (false, true) => "cgroup v1 limits need root",
        (false, false) => "cgroup v2 limits need this subtree delegated to the user",
        (true, _) => "the cgroup hierarchy is read-only or not ours here",
    };
    format!("cannot create {what} ({e}); {hint}")
}

/// v1 rounds memory limits to pages and prints `max` as a huge number; compare loosely.
fn same_value(read: &str, written: &str) -> bool {
    let read = read.trim();
    read == written
        || match (read.parse::<u64>(), written.parse::<u64>()) {
            (Ok(r), Ok(w)) => r / 4096 == w / 4096,
            _ => false,
        }
}

/// Moves the calling thread's process into each group. The caller must be single-threaded.
/// A v1 hierarchy takes it through `tasks` as "0" (this thread): the kernel then skips the
/// global lock whose taking waits for an RCU grace period, 10-16 ms of every sandbox start
/// through `cgroup.procs`. v2 has no such file, and takes the process through `cgroup.procs`.
pub fn attach_self(groups: &[PathBuf]) -> io::Result<()> {
    for dir in groups {
        let tasks = dir.join("tasks");
        let file = if tasks.exists() {
            tasks
        } else {
            dir.join("cgroup.procs")
        };
        fs::write(&file, "0").map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("cannot move the sandbox into {}: {e}", dir.display()),
            )
        })?;
    }
    Ok(())
}

/// How many processes the kernel's OOM killer has ended in these groups (cgroup v2's
/// `memory.events`, v1's `memory.oom_control`; only the memory group has either).
pub fn oom_kills(groups: &[PathBuf]) -> u64 {
    groups
        .iter()
        .flat_map(|dir| ["memory.events", "memory.oom_control"].map(|f| dir.join(f)))
        .filter_map(|file| fs::read_to_string(file).ok())
        .map(|text| parse_oom_kills(&text))
        .sum()
}

fn parse_oom_kills(text: &str) -> u64 {
    text.lines()
        .find_map(|l| l.strip_prefix("oom_kill ")?.trim().parse().ok())
        .unwrap_or(0)
}

/// Removes the groups once their processes are gone (the kernel refuses while any remain, so
/// this retries for a short while after a kill).
pub fn remove(groups: &[PathBuf]) -> io::Result<()> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    for dir in groups {
        loop {
            match fs::remove_dir(dir) {
                Ok(()) => break,
                Err(e) if e.kind() == io::ErrorKind::NotFound => break,
                Err(e) if std::time::Instant::now() > deadline => {
                    return Err(io::Error::new(
                        e.kind(),
                        format!("cannot remove cgroup {}: {e}", dir.display()),
                    ))
                }
                Err(_) => std::thread::sleep(std::time::Duration::from_millis(5)),
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::manifest::Bytes;

    #[test]
    fn plans_v1_groups_under_our_own() {
        let mountinfo = "\
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
32 31 0:29 / /sys/fs/cgroup/cpu,cpuacct rw shared:9 - cgroup cgroup rw,cpu,cpuacct
39 31 0:36 / /sys/fs/cgroup/pids rw,relatime - cgroup cgroup rw,pids
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw";
        let own = "8:pids:/\n4:memory:/process_api/abc\n2:cpu,cpuacct:/\n0::/\n";
        let limits = Limits {
            memory: Bytes(64 << 20),
            cpu: 0.5,
            pids: 32,
        };
        let plan = CgroupLayout::parse(mountinfo).plan(own, "isoenv-x", &limits);
        assert_eq!(
            plan.groups,
            [
                PathBuf::from("/sys/fs/cgroup/memory/process_api/abc/isoenv-x"),
                PathBuf::from("/sys/fs/cgroup/cpu,cpuacct/isoenv-x"),
                PathBuf::from("/sys/fs/cgroup/pids/isoenv-x"),
            ]
        );
        let cpu = &plan.settings[1];
        assert_eq!(cpu.writes[1].1, "50000");
        assert_eq!(cpu.via, "cgroup v1 cpu.cfs_quota_us");
        assert_eq!(plan.settings[0].value, "64M");
        assert_eq!(plan.settings[0].writes[0].1, (64u64 << 20).to_string());
        // Without a pids hierarchy the limit is reported, not pretended.
        let no_pids = mountinfo.replace("rw,pids", "rw,freezer");
        let plan = CgroupLayout::parse(&no_pids).plan(own, "isoenv-x", &limits);
        assert!(plan.settings[2].writes.is_empty());
        assert!(plan.settings[2].via.contains("no pids controller"));
    }

    #[test]
    fn hybrid_v1_and_v2() {
        let hybrid = "\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
32 31 0:29 / /sys/fs/cgroup/cpu,cpuacct rw shared:9 - cgroup cgroup rw,cpu,cpuacct
40 31 0:37 / /sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,xattr,name=systemd
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw";
        let l = CgroupLayout::parse(hybrid);
        assert_eq!(l.version, Version::Hybrid);
        assert_eq!(l.controllers(), ["memory", "cpu", "cpuacct"]);
        let v2 = "30 23 0:26 / /sys/fs/cgroup rw - cgroup2 cgroup2 rw,nsdelegate";
        assert_eq!(CgroupLayout::parse(v2).version, Version::V2);
        assert_eq!(
            CgroupLayout::parse(&hybrid.replace("cgroup2 cgroup2", "tmpfs tmpfs")).version,
            Version::V1
        );
        assert_eq!(CgroupLayout::parse("").version, Version::None);
    }

    #[test]
    fn oom_kills_are_read_from_either_version() {
        let v1 = "oom_kill_disable 0\nunder_oom 0\noom_kill 3\n";
        let v2 = "low 0\nhigh 0\nmax 12\noom 2\noom_kill 2\noom_group_kill 0\n";
        assert_eq!(parse_oom_kills(v1), 3);
        assert_eq!(parse_oom_kills(v2), 2);
        assert_eq!(parse_oom_kills(""), 0);
    }
}
