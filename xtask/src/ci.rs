//! `ci`: the whole pipeline, as `.ci/run` and the README run it: what the suite needs installed
//! first (asked on a terminal; without asking under `CI=true`, `ISOENV_AUTO_INSTALL=1` or
//! `--install`), then fmt, clippy, `env check` on `.env.example`, and the whole test suite
//! through `test --isolated` on every engine.

use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _, Result};
use clap::Args;
use isoenv::engine::{EngineKind, PackageManager};
use xshell::{cmd, Shell};

#[derive(Args)]
pub struct CiArgs {
    /// Install what the suite needs without asking (as CI=true or ISOENV_AUTO_INSTALL=1 do).
    #[arg(long)]
    install: bool,
}

pub fn run(ctx: &isoenv::cli::Context, args: CiArgs) -> Result<ExitCode> {
    let vars = ctx.vars()?;
    prepare(&vars, args.install || isoenv::cli::installs_unasked(&vars))?;
    let sh = Shell::new()?;
    sh.change_dir(crate::project_root());
    cmd!(sh, "cargo fmt --all -- --check").run()?;
    cmd!(
        sh,
        "cargo clippy --workspace --all-targets --quiet -- -D warnings"
    )
    .run()?;
    cmd!(sh, "cargo xtask env check --env-file .env.example").run()?;
    isoenv::cli::test::test(ctx, isoenv::cli::test::TestArgs::ci())
}

/// Something the suite needs beyond Rust: how to tell it is here, and its Debian package.
struct Need {
    what: String,
    here: bool,
    package: String,
}

/// What the suite needs: the three engines, the shells the activate scripts are tested in,
/// sshd and ssh for the tunnel and remote engines, `ip` for their network namespaces, Python's
/// venv for the pytest example, a C compiler and the PostgreSQL server headers for the isolation
/// probes' extension, and newuidmap for rootless environments' identities. `major` is the installed PostgreSQL's.
fn needs(vars: &isoenv::Vars, major: Option<&str>) -> Vec<Need> {
    let mut needs: Vec<Need> = EngineKind::ALL
        .iter()
        .map(|kind| {
            let engine = kind.engine();
            let package = engine
                .packages()
                .iter()
                .find(|(pm, _)| *pm == PackageManager::Apt)
                .map_or("?", |(_, p)| p);
            Need {
                what: format!("{kind} server"),
                here: engine.locate(vars).is_ok(),
                package: package.to_owned(),
            }
        })
        .collect();
    let program = |name: &str, package: &str| Need {
        what: name.to_owned(),
        here: on_path(name),
        package: package.to_owned(),
    };
    needs.extend([
        program("zsh", "zsh"),
        program("fish", "fish"),
        program("sshd", "openssh-server"),
        program("ssh", "openssh-client"),
        program("ip", "iproute2"),
        program("gcc", "gcc"),
        program("newuidmap", "uidmap"),
        program("docker", "docker.io"),
        Need {
            what: "python3 -m venv".into(),
            here: succeeds(Command::new("python3").args(["-m", "venv", "--help"])),
            package: "python3-venv".into(),
        },
    ]);
    if let Some(major) = major {
        needs.push(Need {
            what: format!("PostgreSQL {major} server headers"),
            here: Path::new(&format!(
                "/usr/include/postgresql/{major}/server/postgres.h"
            ))
            .exists(),
            package: format!("postgresql-server-dev-{major}"),
        });
    }
    needs
}

/// Installs what is missing (in two rounds: the server headers follow the PostgreSQL that the
/// first round installed), checks what cannot be installed, and starts the Docker daemon.
fn prepare(vars: &isoenv::Vars, unasked: bool) -> Result<()> {
    install(&needs(vars, None), unasked)?;
    install(&needs(vars, postgres_major().as_deref()), unasked)?;
    for (tool, package) in [
        ("nsenter", "util-linux"),
        ("setpriv", "util-linux"),
        ("ldd", "libc-bin"),
    ] {
        if !on_path(tool) {
            bail!("{tool} is missing ({package}): the sandbox tests probe with it");
        }
    }
    if !nix::unistd::geteuid().is_root() {
        bail!("the suite runs as root: the sandbox and isolation tests need it");
    }
    rootless_ids(unasked)?;
    docker_daemon()
}

/// The rootless tests run as `nobody`, whose environments take their identities from its
/// subordinate ids: it gets a range no account uses, below root's own range of identities.
fn rootless_ids(unasked: bool) -> Result<()> {
    let has = |file: &str| {
        std::fs::read_to_string(file)
            .unwrap_or_default()
            .lines()
            .any(|l| l.starts_with("nobody:"))
    };
    if has("/etc/subuid") && has("/etc/subgid") {
        return Ok(());
    }
    let range = "1700000000-1700065535";
    let command = format!("usermod --add-subuids {range} --add-subgids {range} nobody");
    if !unasked && !isoenv::cli::confirm(&format!("the rootless tests need `{command}`. Run it?")) {
        bail!("the rootless tests run as nobody with subordinate ids: run `{command}`");
    }
    eprintln!("ci: {command}");
    if !succeeds(Command::new("sh").args(["-c", &command])) {
        bail!("`{command}` failed");
    }
    Ok(())
}

fn install(needs: &[Need], unasked: bool) -> Result<()> {
    let missing: Vec<&Need> = needs.iter().filter(|n| !n.here).collect();
    if missing.is_empty() {
        return Ok(());
    }
    let what = missing.iter().map(|n| n.what.as_str()).collect::<Vec<_>>();
    let mut packages: Vec<&str> = Vec::new();
    for n in &missing {
        if !packages.contains(&n.package.as_str()) {
            packages.push(&n.package);
        }
    }
    let packages = packages.join(" ");
    if PackageManager::detect() != Some(PackageManager::Apt) {
        bail!(
            "the suite needs {} (Debian packages: {packages}); install them with your system's package manager",
            what.join(", ")
        );
    }
    let command = PackageManager::Apt.install_command(&packages);
    let asked = format!(
        "the suite needs {}. Install with `{command}`?",
        what.join(", ")
    );
    if !unasked && !isoenv::cli::confirm(&asked) {
        bail!(
            "the suite needs {}: install them with `{command}` (or run `cargo xtask ci --install`)",
            what.join(", ")
        );
    }
    eprintln!("ci: installing {packages}");
    // Debian's maintainer scripts would start system-wide servers; the tests start their own.
    let policy = Path::new("/usr/sbin/policy-rc.d");
    let ours = !policy.exists() && nix::unistd::geteuid().is_root();
    if ours {
        std::fs::write(policy, "#!/bin/sh\nexit 101\n")?;
        std::fs::set_permissions(policy, std::fs::Permissions::from_mode(0o755))?;
    }
    let installed = Command::new("sh").args(["-c", &command]).status();
    if ours {
        std::fs::remove_file(policy)?;
    }
    if !installed
        .with_context(|| format!("cannot run `{command}`"))?
        .success()
    {
        bail!("`{command}` failed");
    }
    Ok(())
}

/// The newest PostgreSQL major version under Debian's layout.
fn postgres_major() -> Option<String> {
    let mut majors: Vec<u32> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse().ok())
        .collect();
    majors.sort();
    majors.last().map(u32::to_string)
}

/// The docker backend's tests need a reachable engine; a machine with `dockerd` and none
/// running gets one started (its log in the temp directory).
fn docker_daemon() -> Result<()> {
    let up = || succeeds(Command::new("docker").arg("info"));
    if up() {
        return Ok(());
    }
    if on_path("dockerd") {
        eprintln!("ci: starting dockerd");
        let log = std::fs::File::create(std::env::temp_dir().join("isoenv-ci-dockerd.log"))?;
        Command::new("dockerd")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .process_group(0)
            .spawn()
            .context("cannot start dockerd")?;
        let deadline = Instant::now() + Duration::from_secs(30);
        while !up() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(500));
        }
    }
    if !up() {
        bail!("the Docker daemon is not reachable: the docker backend's tests need it (start dockerd, or set DOCKER_HOST)");
    }
    Ok(())
}

/// On `PATH`, or in the system directories a non-login root shell may lack.
fn on_path(program: &str) -> bool {
    std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .chain(["/usr/sbin".into(), "/sbin".into()])
        .any(|dir| dir.join(program).is_file())
}

fn succeeds(cmd: &mut Command) -> bool {
    cmd.stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}
