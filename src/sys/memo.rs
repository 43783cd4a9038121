//! What is slow to learn about an installed file (an executable's version, its libraries),
//! remembered per file, as long as the file is the same one (path, inode, change time, size):
//! in this process, and across processes in the user's cache directory.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// `facet` of `file` (with whatever else it depends on in its name), from memory, else
/// `learn`ed and remembered. An empty value is never remembered.
pub fn remembered<E>(
    file: &Path,
    facet: &str,
    learn: impl FnOnce() -> Result<String, E>,
) -> Result<String, E> {
    static SEEN: Mutex<Vec<(String, String)>> = Mutex::new(Vec::new());
    let Ok(meta) = std::fs::metadata(file) else {
        return learn();
    };
    let key = format!("{facet}\0{}\0{}", file.display(), stamp(&meta));
    let mut seen = SEEN.lock().unwrap_or_else(|e| e.into_inner());
    if let Some((_, value)) = seen.iter().find(|(k, _)| *k == key) {
        return Ok(value.clone());
    }
    let memo = memo_dir().map(|d| d.join(format!("{:016x}", super::hash::fnv1a(&key))));
    let kept = memo
        .as_ref()
        .and_then(|f| std::fs::read_to_string(f).ok())
        .and_then(|text| Some(text.strip_prefix(&key)?.strip_prefix('\n')?.to_owned()))
        .filter(|v| !v.is_empty());
    let value = match kept {
        Some(v) => v,
        None => {
            let v = learn()?;
            // Only a speed-up: a memo that cannot be written is skipped.
            if let (Some(file), false) = (&memo, v.is_empty()) {
                let _ = file
                    .parent()
                    .map_or(Ok(()), std::fs::create_dir_all)
                    .and_then(|()| {
                        super::files::write_atomic(file, format!("{key}\n{v}").as_bytes())
                    });
            }
            v
        }
    };
    seen.push((key, value.clone()));
    Ok(value)
}

/// What changes whenever a file is replaced or rewritten.
pub fn stamp(meta: &std::fs::Metadata) -> String {
    format!(
        "{}\0{}.{}\0{}",
        meta.ino(),
        meta.ctime(),
        meta.ctime_nsec(),
        meta.size()
    )
}

/// Where values are remembered across processes, if the user has a cache directory:
/// `$XDG_CACHE_HOME/isoenv/memo`, else `~/.cache/isoenv/memo`.
fn memo_dir() -> Option<PathBuf> {
    let base = match std::env::var_os("XDG_CACHE_HOME").filter(|v| !v.is_empty()) {
        Some(dir) => PathBuf::from(dir),
        None => PathBuf::from(std::env::var_os("HOME").filter(|v| !v.is_empty())?).join(".cache"),
    };
    Some(base.join("isoenv").join("memo"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_value_is_learned_once_per_file_and_again_when_the_file_changes() {
        let dir = std::env::temp_dir().join(format!("isoenv-memo-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("bin");
        std::fs::write(&file, "one").unwrap();
        let facet = format!("test {}", std::process::id());
        let learned = std::cell::Cell::new(0);
        let learn = || {
            learned.set(learned.get() + 1);
            Ok::<_, ()>(format!("v{}", learned.get()))
        };
        assert_eq!(remembered(&file, &facet, learn).unwrap(), "v1");
        assert_eq!(remembered(&file, &facet, learn).unwrap(), "v1");
        assert_eq!(learned.get(), 1);
        std::fs::write(&file, "changed").unwrap();
        assert_eq!(remembered(&file, &facet, learn).unwrap(), "v2");
        assert_eq!(remembered(&file, "another facet", learn).unwrap(), "v3");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
