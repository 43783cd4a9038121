//! The pools' keeper: one process per server and test run that lends databases to the tests
//! over a local socket (see [`super::lease`]) and gives released ones back clean while the tests
//! go on, over connections it keeps warm, where a test process under nextest would have paid a
//! new connection and cold caches for every handout and reset.
//!
//! The keeper is the test binary itself, started again with [`ENV`] set: a constructor in this
//! module (run before the binary's `main`) sees the variable, serves, and exits, so no other
//! program has to be installed. It holds an advisory lock on the server while it serves, so
//! there is at most one, and the pools know it is there; it exits when the test runner does.
//! Without it (a test binary run by hand, or a keeper that could not start) a release resets
//! the database itself, as before.

use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};

use super::Source;
use crate::engine::EngineKind;
use crate::sys::process::ProcessId;
use crate::workspace::test_run::url_var;

/// Set on a keeper process: `ENGINE:RUNNER_PID:RUNNER_START_TIME`.
const ENV: &str = "ISOENV_TESTING_KEEPER";

/// The advisory lock a PostgreSQL keeper holds while it serves (MariaDB's is a named lock).
pub(super) const LOCK: i64 = 0x6973_6f65_6b70; // "isoekp"

#[used]
#[link_section = ".init_array"]
static ENTRY: extern "C" fn() = entry;

/// Runs before `main` in every binary that links `isoenv::testing`; does nothing unless this
/// process was started as a keeper.
extern "C" fn entry() {
    let Ok(spec) = std::env::var(ENV) else {
        return;
    };
    let served = std::panic::catch_unwind(|| match parse(&spec) {
        Some((engine @ EngineKind::Postgres, runner)) => Source::of_test(engine)
            .and_then(|s| super::postgres::keep(s, runner))
            .is_ok(),
        Some((engine @ EngineKind::Mysql, runner)) => Source::of_test(engine)
            .and_then(|s| super::mysql::keep(s, runner))
            .is_ok(),
        _ => false,
    });
    std::process::exit(if matches!(served, Ok(true)) { 0 } else { 1 });
}

fn parse(spec: &str) -> Option<(EngineKind, ProcessId)> {
    let mut parts = spec.split(':');
    let engine = parts.next()?.parse().ok()?;
    let pid = parts.next()?.parse().ok()?;
    let start_time = parts.next()?.parse().ok()?;
    Some((engine, ProcessId { pid, start_time }))
}

/// Starts a keeper for `engine`'s server at `url`, living as long as `runner`: this test binary
/// again, in its own session, with no output (a runner waits for processes holding its pipes).
pub(super) fn spawn(engine: EngineKind, url: &str, runner: ProcessId) -> std::io::Result<()> {
    let mut cmd = Command::new(std::env::current_exe()?);
    // The keeper is not a test under a runner: it must not start keepers itself.
    cmd.env(
        ENV,
        format!("{engine}:{}:{}", runner.pid, runner.start_time),
    )
    .env(url_var(engine), url)
    .env_remove("NEXTEST_RUN_ID")
    .env_remove("CARGO")
    .stdin(Stdio::null())
    .stdout(Stdio::null())
    .stderr(Stdio::null());
    // SAFETY: setsid is async-signal-safe and touches no state of the parent.
    unsafe {
        cmd.pre_exec(|| nix::unistd::setsid().map(drop).map_err(Into::into));
    }
    cmd.spawn().map(drop)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_keeper_spec_round_trips() {
        assert_eq!(
            parse("postgres:42:777"),
            Some((
                EngineKind::Postgres,
                ProcessId {
                    pid: 42,
                    start_time: 777
                }
            ))
        );
        assert_eq!(parse("postgres:42"), None);
        assert_eq!(parse("oracle:1:2"), None);
    }
}
