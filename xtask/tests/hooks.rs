//! `cargo xtask hooks` in a real temporary git repository: install, status, a foreign hook left
//! alone, commits refused for a staged `.env` or a configured password, `--no-verify` and the
//! skip variable, uninstall.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use tempfile::TempDir;

const PASSWORD: &str = "Vm-Pa55word-4-hooks";

struct Repo {
    dir: TempDir,
}

impl Repo {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let r = Repo { dir };
        r.git(&["init", "-q"]);
        r.git(&["config", "user.email", "dev@example.com"]);
        r.git(&["config", "user.name", "Dev"]);
        fs::write(
            r.path().join("isoenv.env"),
            format!("DB_VM_PASSWORD={PASSWORD}\n"),
        )
        .unwrap();
        r
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    fn hook(&self) -> PathBuf {
        self.path().join(".git/hooks/pre-commit")
    }

    /// The hook calls the xtask under test with this repository's configuration.
    fn xtask_line(&self) -> String {
        format!(
            "{} --env-file {}",
            env!("CARGO_BIN_EXE_xtask"),
            self.path().join("isoenv.env").display()
        )
    }

    fn git(&self, args: &[&str]) -> Output {
        let out = Command::new("git")
            .args(args)
            .current_dir(self.path())
            .env("ISOENV_XTASK", self.xtask_line())
            .env_remove("ISOENV_SKIP_HOOKS")
            .output()
            .unwrap();
        out
    }

    fn xtask(&self, args: &[&str]) -> Output {
        Command::new(env!("CARGO_BIN_EXE_xtask"))
            .arg("--env-file")
            .arg(self.path().join("isoenv.env"))
            .args(args)
            .current_dir(self.path())
            .output()
            .unwrap()
    }

    fn commit(&self, file: &str, content: &str, extra: &[&str]) -> Output {
        fs::write(self.path().join(file), content).unwrap();
        self.git(&["add", file]);
        let mut args = vec!["commit", "-q", "-m", file];
        args.extend(extra);
        self.git(&args)
    }
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

#[test]
fn a_foreign_hook_is_never_overwritten_or_removed() {
    let repo = Repo::new();
    assert!(text(&repo.xtask(&["hooks", "status"])).contains("not installed"));
    let foreign = "#!/bin/sh\n# lint-staged\nexit 0\n";
    fs::create_dir_all(repo.hook().parent().unwrap()).unwrap();
    fs::write(repo.hook(), foreign).unwrap();

    let out = repo.xtask(&["hooks", "install"]);
    assert!(!out.status.success());
    assert!(text(&out).contains("not isoenv's"), "{}", text(&out));
    assert!(text(&repo.xtask(&["hooks", "status"])).contains("another tool's"));
    assert!(repo.xtask(&["hooks", "uninstall"]).status.success());
    assert_eq!(fs::read_to_string(repo.hook()).unwrap(), foreign);
}

#[test]
fn the_hook_refuses_secrets_and_can_be_skipped_and_removed() {
    let repo = Repo::new();
    for _ in 0..2 {
        // Installing twice is harmless.
        let out = repo.xtask(&["hooks", "install"]);
        assert!(out.status.success(), "{}", text(&out));
    }
    assert!(text(&repo.xtask(&["hooks", "status"])).contains("installed (isoenv)"));

    let ok = repo.commit("README.md", "hello\n", &[]);
    assert!(ok.status.success(), "{}", text(&ok));

    let env = repo.commit(".env", "DB_VM_HOST=vm\n", &[]);
    assert!(!env.status.success(), "a staged .env was committed");
    assert!(text(&env).contains(".env: a .env file"), "{}", text(&env));
    repo.git(&["rm", "-q", "--cached", ".env"]);

    let leak = repo.commit(
        "config.toml",
        &format!("url = \"postgres://app:{PASSWORD}@vm/app\"\n"),
        &[],
    );
    assert!(!leak.status.success(), "a password was committed");
    assert!(
        text(&leak).contains("config.toml: contains the value of DB_VM_PASSWORD"),
        "{}",
        text(&leak)
    );
    assert!(
        !text(&leak).contains(PASSWORD),
        "the hook printed the password"
    );

    let skipped = repo.commit("config.toml", "x = 1\n", &["--no-verify"]);
    assert!(skipped.status.success(), "{}", text(&skipped));
    fs::write(repo.path().join(".env"), "A=1\n").unwrap();
    repo.git(&["add", ".env"]);
    let out = Command::new("git")
        .args(["commit", "-q", "-m", "skip"])
        .current_dir(repo.path())
        .env("ISOENV_XTASK", repo.xtask_line())
        .env("ISOENV_SKIP_HOOKS", "1")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "ISOENV_SKIP_HOOKS=1 did not skip: {}",
        text(&out)
    );

    assert!(repo.xtask(&["hooks", "uninstall"]).status.success());
    assert!(!repo.hook().exists());
    assert!(text(&repo.xtask(&["hooks", "status"])).contains("not installed"));
}
