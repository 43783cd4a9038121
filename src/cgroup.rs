//! The machine's cgroup layout, read from `/proc/self/mountinfo` (never from hard-coded paths).

use serde::Serialize;

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

#[cfg(test)]
mod tests {
    use super::*;

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
}
