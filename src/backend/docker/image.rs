//! isoenv's local images, for machines that reach no registry: an engine's server as this
//! machine has it installed (binaries, their shared libraries, share files), `/bin/sh` for the
//! entrypoint, and a data directory initialized ahead (isoenv's cached one), in one
//! `FROM scratch` layer made with `docker import`. The image implements the official image's
//! interface (see [`crate::engine::Container`]).

use std::collections::BTreeSet;
use std::fs;
use std::io;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};

use crate::engine::{Container, EngineKind, ImageRecipe, CONTAINER_UID};

/// Where the entrypoint script goes, as in the official images.
const ENTRYPOINT: &str = "/usr/local/bin/docker-entrypoint.sh";
/// The label holding what an image was built from; a rebuild is skipped while it matches.
pub const SOURCE_LABEL: &str = "isoenv.source";
/// The layout of isoenv's images; part of [`SOURCE_LABEL`], so a new layout rebuilds them.
pub const FORMAT: u32 = 1;
/// The label naming the engine of an isoenv image (how `create` finds a local fallback).
pub const ENGINE_LABEL: &str = "isoenv.engine";

/// How every local image's reference begins.
pub const LOCAL_PREFIX: &str = "isoenv/";

/// The local image's reference: `isoenv/ENGINE:VERSION-local`, where VERSION has as many
/// components as the official default tag (`postgres:15` -> `15`, `mariadb:10.11` -> `10.11`).
pub fn local_reference(engine: EngineKind, official: &str, version: &str) -> String {
    let parts = official
        .rsplit_once(':')
        .map_or(1, |(_, tag)| tag.split('.').count());
    let numeric: Vec<&str> = version
        .split(|c: char| !c.is_ascii_digit())
        .filter(|p| !p.is_empty())
        .take(parts)
        .collect();
    format!("{LOCAL_PREFIX}{engine}:{}-local", numeric.join("."))
}

/// The image's configuration, as `docker import` changes (Dockerfile instructions; import takes
/// no STOPSIGNAL, so containers get theirs when isoenv makes them).
pub fn changes(
    engine: EngineKind,
    recipe: &ImageRecipe,
    container: &Container,
    source: &str,
) -> Vec<String> {
    let mut out: Vec<String> = recipe
        .env
        .iter()
        .map(|(k, v)| format!("ENV {k}={v}"))
        .collect();
    out.push(format!("USER {CONTAINER_UID}:{CONTAINER_UID}"));
    if recipe.entrypoint.is_some() {
        out.push(format!("ENTRYPOINT [\"{ENTRYPOINT}\"]"));
    }
    out.push(format!("CMD [\"{}\"]", recipe.command));
    out.push(format!("EXPOSE {}/tcp", container.port));
    out.push(format!("VOLUME [\"{}\"]", container.data));
    out.push(format!(
        "LABEL {ENGINE_LABEL}={engine} {SOURCE_LABEL}=\"{source}\""
    ));
    out
}

/// The root filesystem: the recipe's host paths and libraries, `/bin/sh`, a minimal `/etc`,
/// the entrypoint, and the data directory (from `template`, else empty) owned by the service
/// account.
pub fn rootfs(
    recipe: &ImageRecipe,
    container: &Container,
    template: Option<&Path>,
) -> Result<Vec<u8>, String> {
    let mut fs = Rootfs::default();
    let io = |what: &str| {
        let what = what.to_owned();
        move |e: io::Error| format!("{what}: {e}")
    };
    for (dir, mode) in [
        ("/etc", 0o755),
        ("/tmp", 0o1777),
        ("/run", 0o755),
        ("/var", 0o755),
    ] {
        fs.dir(Path::new(dir), mode, 0).map_err(io(dir))?;
    }
    fs.link(Path::new("/var/run"), Path::new("/run"))
        .map_err(io("/var/run"))?;
    let account = recipe.account;
    let home = Path::new(container.data)
        .parent()
        .unwrap_or(Path::new("/"))
        .display()
        .to_string();
    let uid = CONTAINER_UID;
    let etc = [
        (
            "/etc/passwd",
            format!(
                "root:x:0:0:root:/root:/bin/sh\n{account}:x:{uid}:{uid}:{account}:{home}:/bin/sh\n"
            ),
        ),
        ("/etc/group", format!("root:x:0:\n{account}:x:{uid}:\n")),
        (
            "/etc/nsswitch.conf",
            "passwd: files\ngroup: files\nhosts: files dns\n".to_owned(),
        ),
    ];
    for (path, text) in etc {
        fs.file(Path::new(path), text.as_bytes(), 0o644, 0)
            .map_err(io(path))?;
    }
    let shell = Path::new("/bin/sh");
    // Clusters are initialized with --locale=C.UTF-8, which glibc loads from here.
    let locale = Path::new("/usr/lib/locale/C.utf8");
    if locale.exists() {
        fs.host(locale).map_err(io("/usr/lib/locale/C.utf8"))?;
    }
    for exe in recipe
        .executables
        .iter()
        .map(PathBuf::as_path)
        .chain([shell])
    {
        for lib in crate::sys::ldd::shared_libraries(exe)? {
            fs.host(&lib).map_err(io(&lib.display().to_string()))?;
        }
    }
    for path in recipe.paths.iter().map(PathBuf::as_path).chain([shell]) {
        fs.host(path).map_err(io(&path.display().to_string()))?;
    }
    if let Some(script) = recipe.entrypoint {
        fs.file(Path::new(ENTRYPOINT), script.as_bytes(), 0o755, 0)
            .map_err(io(ENTRYPOINT))?;
    }
    for dir in &recipe.writable {
        fs.dir(Path::new(dir), 0o755, uid).map_err(io(dir))?;
    }
    let data = Path::new(container.data);
    match template {
        Some(t) => fs
            .tree(t, data, uid, &recipe.data_patches)
            .map_err(io(&t.display().to_string()))?,
        None => fs.dir(data, 0o700, uid).map_err(io(container.data))?,
    }
    fs.builder
        .into_inner()
        .map_err(io("cannot finish the archive"))
}

/// A tar archive of a root filesystem, each path added once, parents before children.
struct Rootfs {
    builder: tar::Builder<Vec<u8>>,
    seen: BTreeSet<PathBuf>,
}

impl Default for Rootfs {
    fn default() -> Self {
        Rootfs {
            builder: tar::Builder::new(Vec::new()),
            seen: BTreeSet::new(),
        }
    }
}

/// The archive's name for an absolute path.
fn entry_name(path: &Path) -> &Path {
    path.strip_prefix("/").unwrap_or(path)
}

fn header(kind: tar::EntryType, mode: u32, uid: u32, size: u64) -> tar::Header {
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(kind);
    h.set_mode(mode);
    h.set_uid(uid.into());
    h.set_gid(uid.into());
    h.set_size(size);
    h
}

impl Rootfs {
    /// Records `path`; false if it is already in the archive.
    fn first(&mut self, path: &Path) -> bool {
        self.seen.insert(path.to_owned())
    }

    /// Adds the missing parents of `path` as root-owned directories.
    fn parents(&mut self, path: &Path) -> io::Result<()> {
        if let Some(parent) = path.parent().filter(|p| *p != Path::new("/")) {
            if !self.seen.contains(parent) {
                self.dir(parent, 0o755, 0)?;
            }
        }
        Ok(())
    }

    fn dir(&mut self, path: &Path, mode: u32, uid: u32) -> io::Result<()> {
        self.parents(path)?;
        if !self.first(path) {
            return Ok(());
        }
        let mut h = header(tar::EntryType::Directory, mode, uid, 0);
        self.builder
            .append_data(&mut h, entry_name(path), io::empty())
    }

    fn file(&mut self, path: &Path, contents: &[u8], mode: u32, uid: u32) -> io::Result<()> {
        self.parents(path)?;
        if !self.first(path) {
            return Ok(());
        }
        let mut h = header(tar::EntryType::Regular, mode, uid, contents.len() as u64);
        self.builder.append_data(&mut h, entry_name(path), contents)
    }

    fn link(&mut self, path: &Path, target: &Path) -> io::Result<()> {
        self.parents(path)?;
        if !self.first(path) {
            return Ok(());
        }
        let mut h = header(tar::EntryType::Symlink, 0o777, 0, 0);
        self.builder.append_link(&mut h, entry_name(path), target)
    }

    /// Adds a host path at the same path, root-owned with its mode: a directory with its
    /// contents, a symbolic link with its target. A symbolic link on the way (merged /usr:
    /// `/lib -> usr/lib`) is kept as a link, and the path is added again through it.
    fn host(&mut self, path: &Path) -> io::Result<()> {
        let mut prefix = PathBuf::from("/");
        let parts: Vec<Component> = path.components().skip(1).collect();
        for (i, part) in parts.iter().enumerate() {
            prefix.push(part);
            let meta = fs::symlink_metadata(&prefix)?;
            if meta.file_type().is_symlink() {
                let target = fs::read_link(&prefix)?;
                self.link(&prefix, &target)?;
                let through = normalize(
                    &prefix
                        .parent()
                        .unwrap_or(Path::new("/"))
                        .join(target)
                        .join(parts[i + 1..].iter().collect::<PathBuf>()),
                );
                return self.host(&through);
            }
            let last = i + 1 == parts.len();
            if meta.is_dir() {
                self.dir(&prefix, meta.permissions().mode() & 0o7777, 0)?;
                if last {
                    for entry in fs::read_dir(&prefix)? {
                        self.host(&entry?.path())?;
                    }
                }
            } else if meta.is_file() && last && self.first(&prefix) {
                let mut h = header(
                    tar::EntryType::Regular,
                    meta.permissions().mode() & 0o7777,
                    0,
                    meta.len(),
                );
                h.set_mtime(meta.mtime().max(0) as u64);
                self.builder
                    .append_data(&mut h, entry_name(&prefix), fs::File::open(&prefix)?)?;
            }
        }
        Ok(())
    }

    /// Adds the host directory `from` at `to`, owned by `uid` with its modes, appending each
    /// patch's line to its file (a path relative to `from`).
    fn tree(
        &mut self,
        from: &Path,
        to: &Path,
        uid: u32,
        patches: &[(&str, &str)],
    ) -> io::Result<()> {
        let meta = fs::symlink_metadata(from)?;
        let mode = meta.permissions().mode() & 0o7777;
        if meta.is_dir() {
            self.dir(to, mode, uid)?;
            let mut entries: Vec<_> = fs::read_dir(from)?.collect::<io::Result<_>>()?;
            entries.sort_by_key(|e| e.file_name());
            for entry in entries {
                let name = entry.file_name();
                let nested: Vec<(&str, &str)> = patches
                    .iter()
                    .filter_map(|(file, line)| {
                        let rest = Path::new(file).strip_prefix(&name).ok()?;
                        Some((rest.to_str()?, *line))
                    })
                    .collect();
                self.tree(&entry.path(), &to.join(&name), uid, &nested)?;
            }
        } else if meta.is_file() {
            let mut contents = fs::read(from)?;
            for (file, line) in patches {
                if file.is_empty() {
                    contents.extend_from_slice(format!("\n{line}\n").as_bytes());
                }
            }
            self.file(to, &contents, mode, uid)?;
        } else if meta.file_type().is_symlink() {
            self.link(to, &fs::read_link(from)?)?;
        }
        Ok(())
    }
}

/// Resolves `.` and `..` lexically.
fn normalize(path: &Path) -> PathBuf {
    let mut out = PathBuf::from("/");
    for part in path.components() {
        match part {
            Component::ParentDir => {
                out.pop();
            }
            Component::Normal(p) => out.push(p),
            Component::RootDir | Component::CurDir | Component::Prefix(_) => {}
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn local_references_follow_the_official_tags() {
        let cases = [
            (
                EngineKind::Postgres,
                "postgres:15",
                "15.18",
                "isoenv/postgres:15-local",
            ),
            (
                EngineKind::Mysql,
                "mariadb:10.11",
                "10.11.19-MariaDB",
                "isoenv/mysql:10.11-local",
            ),
            (
                EngineKind::Redis,
                "redis:7.0",
                "7.0.15",
                "isoenv/redis:7.0-local",
            ),
        ];
        for (engine, official, version, want) in cases {
            assert_eq!(local_reference(engine, official, version), want);
        }
    }

    #[test]
    fn paths_normalize() {
        assert_eq!(
            normalize(Path::new("/lib64/../usr/lib64/x")),
            Path::new("/usr/lib64/x")
        );
        assert_eq!(normalize(Path::new("/a/./b")), Path::new("/a/b"));
    }

    /// What an archive holds: (path, kind, mode, uid, contents or link target).
    fn entries(tar: &[u8]) -> Vec<(String, tar::EntryType, u32, u64, String)> {
        let mut archive = tar::Archive::new(tar);
        archive
            .entries()
            .unwrap()
            .map(|e| {
                let mut e = e.unwrap();
                let h = e.header().clone();
                let mut text = String::new();
                if h.entry_type() == tar::EntryType::Symlink {
                    text = e.link_name().unwrap().unwrap().display().to_string();
                } else {
                    io::Read::read_to_string(&mut e, &mut text).unwrap_or_default();
                }
                (
                    e.path().unwrap().display().to_string(),
                    h.entry_type(),
                    h.mode().unwrap(),
                    h.uid().unwrap(),
                    text,
                )
            })
            .collect()
    }

    #[test]
    fn host_paths_keep_links_on_the_way_and_trees_get_owner_and_patches() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path();
        fs::create_dir_all(root.join("usr/lib")).unwrap();
        fs::write(root.join("usr/lib/libx.so"), "elf").unwrap();
        std::os::unix::fs::symlink("usr/lib", root.join("lib")).unwrap();
        let data = root.join("data");
        fs::create_dir_all(data.join("global")).unwrap();
        fs::set_permissions(&data, fs::Permissions::from_mode(0o700)).unwrap();
        fs::write(data.join("pg_hba.conf"), "local all all trust").unwrap();
        fs::write(data.join("global/x"), "1").unwrap();

        let mut fs_ = Rootfs::default();
        fs_.host(&root.join("lib/libx.so")).unwrap();
        fs_.tree(
            &data,
            Path::new("/var/lib/pg"),
            999,
            &[("pg_hba.conf", "host all")],
        )
        .unwrap();
        let got = entries(&fs_.builder.into_inner().unwrap());
        let find = |p: &str| {
            got.iter()
                .find(|e| e.0.trim_end_matches('/') == p)
                .unwrap_or_else(|| panic!("{p} missing from {got:?}"))
                .clone()
        };
        let base = entry_name(root).display().to_string();
        let link = find(&format!("{base}/lib"));
        assert_eq!(
            (link.1, link.4.as_str()),
            (tar::EntryType::Symlink, "usr/lib")
        );
        let lib = find(&format!("{base}/usr/lib/libx.so"));
        assert_eq!((lib.3, lib.4.as_str()), (0, "elf"));
        let dir = find("var/lib/pg");
        assert_eq!(
            (dir.1, dir.2, dir.3),
            (tar::EntryType::Directory, 0o700, 999)
        );
        assert_eq!(find("var/lib/pg/global/x").3, 999);
        assert_eq!(
            find("var/lib/pg/pg_hba.conf").4,
            "local all all trust\nhost all\n"
        );
        // Parents come before children, each once.
        let names: Vec<&str> = got.iter().map(|e| e.0.as_str()).collect();
        let pos = |p: &str| {
            names
                .iter()
                .position(|n| n.trim_end_matches('/') == p)
                .unwrap()
        };
        assert!(pos("var/lib") < pos("var/lib/pg"));
        let mut unique = names.clone();
        unique.dedup();
        assert_eq!(unique.len(), names.len());
    }
}
