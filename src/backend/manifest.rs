//! The sandbox's capability manifest (`manifest.json` in the environment directory), WASI-style:
//! what it does not grant does not exist inside. Versioned, strict (unknown fields are errors)
//! and every error names its JSON path.
//!
//! ```json
//! { "version": 1,
//!   "fs": [ { "host": "/usr/lib/postgresql/15", "mode": "ro" },
//!           { "host": "/p/.isoenv/dev/data", "guest": "/p/.isoenv/dev/data", "mode": "rw" } ],
//!   "network": { "expose": "127.0.0.1:5432" },
//!   "limits": { "memory": "512M", "cpu": 1.0, "pids": 256 },
//!   "env": { "LANG": "C.UTF-8" } }
//! ```

use std::collections::BTreeMap;
use std::fmt;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::path::{Component, Path, PathBuf};

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::sys::bytes::parse_memory;

pub const VERSION: u32 = 1;
pub const FILE: &str = "manifest.json";
/// Below this no engine starts; a typo like `64K` would only show up as an OOM loop.
const MIN_MEMORY: u64 = 16 << 20;
const MIN_PIDS: u32 = 8;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    pub version: u32,
    /// Host paths visible inside, at their guest path; nothing else of the host's filesystem is.
    pub fs: Vec<Bind>,
    pub network: Network,
    pub limits: Limits,
    /// The server's whole environment: nothing is inherited.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Bind {
    pub host: PathBuf,
    /// Defaults to the host path.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guest: Option<PathBuf>,
    pub mode: Mode,
}

impl Bind {
    pub fn guest(&self) -> &Path {
        self.guest.as_deref().unwrap_or(&self.host)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    Ro,
    Rw,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Network {
    /// The one port reachable from the host, on the host's loopback; inside, the server listens
    /// on the same port of its own loopback. There is no other network (no outbound access).
    /// Port 0 (containers only): a free port, chosen by Docker at each start.
    pub expose: SocketAddrV4,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Limits {
    pub memory: Bytes,
    /// A fraction of one core (1.5 = one and a half cores).
    pub cpu: f64,
    pub pids: u32,
}

/// A memory size written as `512M`, `1G`, `1.5G` or a number of bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Bytes(pub u64);

impl fmt::Display for Bytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let units = [(1u64 << 30, "G"), (1 << 20, "M"), (1 << 10, "K")];
        match units.iter().find(|(size, _)| self.0 % size == 0) {
            Some((size, unit)) => write!(f, "{}{unit}", self.0 / size),
            None => write!(f, "{}", self.0),
        }
    }
}

impl Serialize for Bytes {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Bytes {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Number(u64),
            Text(String),
        }
        match Raw::deserialize(d)? {
            Raw::Number(n) => Ok(Bytes(n)),
            Raw::Text(t) => parse_memory(&t)
                .map(Bytes)
                .map_err(serde::de::Error::custom),
        }
    }
}

/// A manifest problem: which file, which JSON path, what is wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}: {path}: {message}", file.display())]
pub struct ManifestError {
    pub file: PathBuf,
    pub path: String,
    pub message: String,
}

/// What the defaults are made from: the engine's read-only paths, the environment's own
/// read-write and read-only paths, and the configured limits.
pub struct Defaults<'a> {
    pub read_only: &'a [PathBuf],
    pub read_write: &'a [PathBuf],
    pub port: u16,
    pub memory: u64,
}

impl Manifest {
    pub fn defaults(d: &Defaults) -> Self {
        // A path inside another of the same mode is already granted.
        let covered =
            |list: &[PathBuf], p: &PathBuf| list.iter().any(|o| o != p && p.starts_with(o));
        let mut fs: Vec<Bind> = Vec::new();
        for (list, mode) in [(d.read_only, Mode::Ro), (d.read_write, Mode::Rw)] {
            for p in list {
                if !covered(list, p) && !fs.iter().any(|b| &b.host == p) {
                    fs.push(Bind {
                        host: p.clone(),
                        guest: None,
                        mode,
                    });
                }
            }
        }
        Manifest {
            version: VERSION,
            fs,
            network: Network {
                expose: SocketAddrV4::new(Ipv4Addr::LOCALHOST, d.port),
            },
            limits: Limits {
                memory: Bytes(d.memory),
                cpu: 1.0,
                pids: 256,
            },
            env: [
                ("LANG", "C.UTF-8"),
                ("TZ", "UTC"),
                ("PATH", "/usr/bin:/bin"),
            ]
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect(),
        }
    }

    /// Parses and validates; `cpus` is how many cores this machine has.
    pub fn parse(file: &Path, text: &str, cpus: usize) -> Result<Self, ManifestError> {
        let de = &mut serde_json::Deserializer::from_str(text);
        let manifest: Manifest = serde_path_to_error::deserialize(de).map_err(|e| {
            let path = e.path().to_string();
            ManifestError {
                file: file.to_owned(),
                path: if path == "." {
                    "(top level)".into()
                } else {
                    path
                },
                message: e.into_inner().to_string(),
            }
        })?;
        manifest
            .validate(cpus)
            .map_err(|(path, message)| ManifestError {
                file: file.to_owned(),
                path,
                message,
            })?;
        Ok(manifest)
    }

    pub fn load(file: &Path) -> Result<Self, ManifestError> {
        let text = std::fs::read_to_string(file).map_err(|e| ManifestError {
            file: file.to_owned(),
            path: "(file)".into(),
            message: format!("cannot read it: {e}"),
        })?;
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        Self::parse(file, &text, cpus)
    }

    pub fn to_json(&self) -> String {
        let mut text = serde_json::to_string_pretty(self).expect("a manifest serializes");
        text.push('\n');
        text
    }

    fn validate(&self, cpus: usize) -> Result<(), (String, String)> {
        if self.version != VERSION {
            return Err((
                "version".into(),
                format!(
                    "version {} is not supported (this isoenv reads version {VERSION})",
                    self.version
                ),
            ));
        }
        for (i, bind) in self.fs.iter().enumerate() {
            let at = |field: &str| format!("fs[{i}].{field}");
            if !is_clean_absolute(&bind.host) {
                return Err((at("host"), "must be an absolute path without `..`".into()));
            }
            if !is_clean_absolute(bind.guest()) || bind.guest() == Path::new("/") {
                return Err((
                    at("guest"),
                    "must be an absolute path other than `/`, without `..`".into(),
                ));
            }
            // /proc and /dev are the sandbox's own; /etc and /tmp are its own too, but files
            // may be bound into them.
            let guest = bind.guest();
            if let Some(reserved) = ["/proc", "/dev", "/etc", "/tmp"].iter().find(|r| {
                guest == Path::new(r) || (guest.starts_with(r) && matches!(**r, "/proc" | "/dev"))
            }) {
                return Err((
                    at("guest"),
                    format!("{reserved} is provided by the sandbox itself and cannot be bound"),
                ));
            }
            if std::fs::symlink_metadata(&bind.host).is_err() {
                return Err((
                    at("host"),
                    format!("{} does not exist", bind.host.display()),
                ));
            }
            if self.fs[..i].iter().any(|b| b.guest() == bind.guest()) {
                return Err((
                    at("guest"),
                    format!("{} is bound twice", bind.guest().display()),
                ));
            }
        }
        if *self.network.expose.ip() != Ipv4Addr::LOCALHOST {
            return Err((
                "network.expose".into(),
                format!(
                    "{} is not 127.0.0.1: the port is only ever exposed on the host's loopback",
                    self.network.expose.ip()
                ),
            ));
        }
        let limits = &self.limits;
        if limits.memory.0 < MIN_MEMORY {
            return Err((
                "limits.memory".into(),
                format!(
                    "{} is below the minimum of {}",
                    limits.memory,
                    Bytes(MIN_MEMORY)
                ),
            ));
        }
        if !(limits.cpu > 0.0 && limits.cpu <= cpus as f64) {
            return Err((
                "limits.cpu".into(),
                format!(
                    "{} must be above 0 and at most {cpus} (this machine's cores)",
                    limits.cpu
                ),
            ));
        }
        if limits.pids < MIN_PIDS {
            return Err((
                "limits.pids".into(),
                format!("{} is below the minimum of {MIN_PIDS}", limits.pids),
            ));
        }
        if let Some(key) = self.env.keys().find(|k| {
            k.is_empty() || k.contains('=') || k.contains('\0') || k.starts_with(char::is_numeric)
        }) {
            return Err((format!("env.{key}"), "is not a valid variable name".into()));
        }
        Ok(())
    }
}

fn is_clean_absolute(p: &Path) -> bool {
    p.is_absolute() && !p.components().any(|c| c == Component::ParentDir)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Manifest {
        Manifest::defaults(&Defaults {
            read_only: &["/usr/bin".into(), "/usr".into(), "/usr".into()],
            read_write: &[std::env::current_dir().unwrap()],
            port: 5432,
            memory: 512 << 20,
        })
    }

    fn parse(text: &str) -> Result<Manifest, ManifestError> {
        Manifest::parse(Path::new("m.json"), text, 2)
    }

    #[test]
    fn defaults_round_trip() {
        let m = sample();
        assert_eq!(m.fs.len(), 2, "duplicates and covered paths are bound once");
        let text = m.to_json();
        assert!(text.contains("\"memory\": \"512M\""), "{text}");
        assert!(text.contains("\"expose\": \"127.0.0.1:5432\""), "{text}");
        assert_eq!(parse(&text).unwrap(), m);
    }

    #[test]
    fn errors_name_the_json_path() {
        let text = sample().to_json();
        let cases = [
            (text.replace("\"512M\"", "\"12X\""), "limits.memory", "unit"),
            (
                text.replace("\"512M\"", "\"1M\""),
                "limits.memory",
                "minimum",
            ),
            (
                text.replace("\"cpu\": 1.0", "\"cpu\": 3.0"),
                "limits.cpu",
                "at most 2",
            ),
            (
                text.replace("\"pids\": 256", "\"pids\": 256, \"swap\": 1"),
                "limits.swap",
                "unknown field `swap`",
            ),
            (
                text.replace("127.0.0.1:5432", "0.0.0.0:5432"),
                "network.expose",
                "loopback",
            ),
            (
                text.replace("\"mode\": \"rw\"", "\"mode\": \"rwx\""),
                "fs[1].mode",
                "unknown variant",
            ),
            (
                text.replace("\"/usr\"", "\"/no/such/dir\""),
                "fs[0].host",
                "does not exist",
            ),
            (
                text.replace("\"/usr\"", "\"/usr/../etc\""),
                "fs[0].host",
                "`..`",
            ),
            (
                text.replace("\"version\": 1", "\"version\": 2"),
                "version",
                "not supported",
            ),
        ];
        for (text, path, message) in cases {
            let err = parse(&text).unwrap_err();
            assert_eq!(err.path, path, "{err}");
            assert!(err.message.contains(message), "{err}");
            assert!(err.to_string().starts_with("m.json: "), "{err}");
        }
        let proc_bind = text.replacen(
            "\"mode\": \"ro\"",
            "\"guest\": \"/proc/x\", \"mode\": \"ro\"",
            1,
        );
        assert_eq!(parse(&proc_bind).unwrap_err().path, "fs[0].guest");
    }

    #[test]
    fn sizes_print_in_their_largest_unit() {
        assert_eq!(Bytes(512 << 20).to_string(), "512M");
        assert_eq!(Bytes(3 << 29).to_string(), "1536M");
        assert_eq!(Bytes(1000).to_string(), "1000");
    }
}
