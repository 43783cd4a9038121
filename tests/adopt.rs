//! Adopting isoenv in another repository, as the README's "Adopt isoenv" section says: a Rust
//! workspace whose xtask is a few lines over `isoenv::cli`, and a repository that is not Rust,
//! driven by the standalone `isoenv` binary from a subdirectory. Both live outside this
//! repository, bring up their own database, answer a query through the activate script, and
//! leave nothing behind.

mod common;

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use common::reachable_tempdir;

/// What an enclosing `test --isolated` run exports; a scratch repository must not see it.
const OUTER: [&str; 8] = [
    "DATABASE_URL",
    "REDIS_URL",
    "ISOENV_ACTIVE",
    "ISOENV_ENGINE",
    "ISOENV_POSTGRES_URL",
    "ISOENV_MYSQL_URL",
    "ISOENV_REDIS_URL",
    "WASI_SANDBOX_DIR",
];

fn run(cmd: &mut Command) -> Output {
    for var in OUTER {
        cmd.env_remove(var);
    }
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{cmd:?} failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// `SELECT 6*7` through the environment's activate script, with psql and no arguments.
fn answer(activate: &Path) -> String {
    let out = run(Command::new("bash").arg("-c").arg(format!(
        "source {}; psql -w -tAc 'select 6*7'",
        activate.display()
    )));
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// Destroys the scratch repository's environment however the test ends.
struct Destroy(Box<dyn Fn() -> Command>);

impl Drop for Destroy {
    fn drop(&mut self) {
        let _ = (self.0)().args(["db", "destroy", "dev"]).output();
    }
}

fn shared_cache() -> PathBuf {
    common::cache_dir()
}

#[test]
fn a_rust_workspace_adopts_isoenv_with_a_few_lines_of_xtask() {
    let repo = reachable_tempdir();
    let root = repo.path();
    let isoenv = env!("CARGO_MANIFEST_DIR");
    fs::create_dir_all(root.join(".cargo")).unwrap();
    fs::create_dir_all(root.join("xtask/src")).unwrap();
    fs::write(
        root.join(".cargo/config.toml"),
        "[alias]\nxtask = \"run --quiet --package xtask --\"\n",
    )
    .unwrap();
    fs::write(
        root.join("Cargo.toml"),
        "[workspace]\nmembers = [\"xtask\"]\nresolver = \"2\"\n",
    )
    .unwrap();
    fs::write(
        root.join("xtask/Cargo.toml"),
        format!(
            "[package]\nname = \"xtask\"\nversion = \"0.1.0\"\nedition = \"2021\"\npublish = false\n\n[dependencies]\nisoenv = {{ path = \"{isoenv}\" }}\n"
        ),
    )
    .unwrap();
    // The README's xtask, word for word.
    fs::write(
        root.join("xtask/src/main.rs"),
        r#"fn main() -> std::process::ExitCode {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    isoenv::cli::main("cargo xtask", root.to_owned())
}
"#,
    )
    .unwrap();
    fs::write(
        root.join(".env"),
        format!("ISOENV_CACHE_DIR={}\n", shared_cache().display()),
    )
    .unwrap();
    // The same versions as this repository, from the local registry: no network, and a build
    // directory of its own that later runs reuse.
    fs::copy(
        Path::new(isoenv).join("Cargo.lock"),
        root.join("Cargo.lock"),
    )
    .unwrap();
    let target = Path::new(env!("CARGO_TARGET_TMPDIR")).join("adopt-target");
    let dir = root.to_owned();
    let cargo = move || {
        let mut c = Command::new(env!("CARGO"));
        c.current_dir(&dir)
            .env("CARGO_TARGET_DIR", &target)
            .env("CARGO_NET_OFFLINE", "true");
        c
    };

    let xtask = cargo.clone();
    let _destroy = Destroy(Box::new(move || {
        let mut c = xtask();
        c.arg("xtask");
        c
    }));
    run(cargo().args(["xtask", "db", "up"]));
    let state = root.join(".isoenv");
    assert!(
        state.join("dev/state.json").is_file(),
        "state lives in the scratch repository"
    );
    assert_eq!(answer(&state.join("dev/bin/activate")), "42");
    run(cargo().args(["xtask", "db", "destroy", "dev"]));
    assert!(!state.join("dev").exists());
}

#[test]
fn any_repository_adopts_isoenv_with_the_standalone_binary() {
    let repo = reachable_tempdir();
    let root = repo.path();
    // A Django-like project: the repository root is found from a subdirectory, as git does.
    fs::create_dir_all(root.join(".git")).unwrap();
    fs::create_dir_all(root.join("app/polls")).unwrap();
    fs::write(
        root.join(".env"),
        format!("ISOENV_CACHE_DIR={}\n", shared_cache().display()),
    )
    .unwrap();
    let polls = root.join("app/polls");
    let isoenv = move || {
        let mut c = Command::new(env!("CARGO_BIN_EXE_isoenv"));
        c.current_dir(&polls);
        c
    };
    let _destroy = Destroy(Box::new(isoenv.clone()));
    run(isoenv().args(["db", "up"]));
    let state = root.join(".isoenv");
    assert!(
        state.join("dev/state.json").is_file(),
        "state lives at the root"
    );
    assert_eq!(answer(&state.join("dev/bin/activate")), "42");
    let listed = run(isoenv().args(["db", "list"]));
    assert!(String::from_utf8_lossy(&listed.stdout).contains("dev"));
    run(isoenv().args(["db", "destroy", "dev"]));
    assert!(!state.join("dev").exists());
}

/// A repository under a 0700 directory (root's home, in most CI containers): servers could not
/// enter it, so the state root moves where they can and `.isoenv` links to it.
#[test]
fn a_repository_under_a_private_directory_works_out_of_the_box() {
    let private = tempfile::Builder::new()
        .prefix("isoenv-private-")
        .tempdir()
        .unwrap();
    fs::set_permissions(private.path(), fs::Permissions::from_mode(0o700)).unwrap();
    let root = private.path().join("repo");
    fs::create_dir_all(root.join(".git")).unwrap();
    fs::write(
        root.join(".env"),
        format!("ISOENV_CACHE_DIR={}\n", shared_cache().display()),
    )
    .unwrap();
    let dir = root.clone();
    let isoenv = move || {
        let mut c = Command::new(env!("CARGO_BIN_EXE_isoenv"));
        c.current_dir(&dir);
        c
    };
    let _destroy = Destroy(Box::new(isoenv.clone()));
    let up = run(isoenv().args(["db", "up"]));
    assert!(
        String::from_utf8_lossy(&up.stderr).contains("environments live in"),
        "the move is said: {}",
        String::from_utf8_lossy(&up.stderr)
    );
    assert_eq!(answer(&root.join(".isoenv/dev/bin/activate")), "42");
    let inspect = run(isoenv().args(["db", "inspect", "dev", "--json"]));
    let info: serde_json::Value = serde_json::from_slice(&inspect.stdout).unwrap();
    let data = PathBuf::from(info["dir"].as_str().unwrap());
    assert!(data.starts_with("/var/lib/isoenv/roots"), "{data:?}");
    run(isoenv().args(["db", "destroy", "dev"]));
    let moved = fs::canonicalize(root.join(".isoenv")).unwrap();
    fs::remove_dir_all(moved).unwrap();
}
