//! The shared libraries an executable loads, as `ldd` reports them: what a sandbox binds and
//! what a local image copies.

use std::path::{Path, PathBuf};

/// The files of `binary`'s shared libraries and of its ELF interpreter, as the loader finds them.
/// `ldd` takes 40 ms, as much as a sandbox's whole start, so what it says is remembered (see
/// [`super::memo`]) until the binary or the loader's cache (`ldconfig` after any library is
/// installed) changes.
pub fn shared_libraries(binary: &Path) -> Result<Vec<PathBuf>, String> {
    let loader_cache = std::fs::metadata(LOADER_CACHE)
        .map(|m| super::memo::stamp(&m))
        .unwrap_or_default();
    let listed = super::memo::remembered(binary, &format!("libraries {loader_cache}"), || {
        let out = std::process::Command::new("ldd")
            .arg(binary)
            .output()
            .map_err(|e| {
                format!(
                    "cannot run ldd to find {}'s libraries: {e}",
                    binary.display()
                )
            })?;
        Ok::<_, String>(String::from_utf8_lossy(&out.stdout).into_owned())
    })?;
    Ok(parse_ldd(&listed))
}

const LOADER_CACHE: &str = "/etc/ld.so.cache";

fn parse_ldd(text: &str) -> Vec<PathBuf> {
    text.lines()
        .filter_map(|l| {
            let l = l.trim();
            let path = match l.split_once("=>") {
                Some((_, right)) => right.trim(),
                None => l,
            };
            let path = path.split_whitespace().next()?;
            path.starts_with('/').then(|| PathBuf::from(path))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ldd_output() {
        let text = "\tlinux-vdso.so.1 (0x00007ffd)\n\
                    \tlibssl.so.3 => /lib/x86_64-linux-gnu/libssl.so.3 (0x00007f)\n\
                    \tlibgone.so => not found\n\
                    \t/lib64/ld-linux-x86-64.so.2 (0x00007f)\n";
        assert_eq!(
            parse_ldd(text),
            [
                PathBuf::from("/lib/x86_64-linux-gnu/libssl.so.3"),
                PathBuf::from("/lib64/ld-linux-x86-64.so.2")
            ]
        );
    }

    #[test]
    fn a_real_binary_loads_libc() {
        let libs = shared_libraries(Path::new("/bin/sh")).unwrap();
        assert!(
            libs.iter().any(|l| l.to_string_lossy().contains("libc.so")),
            "{libs:?}"
        );
    }
}
