//! Whether anyone but this process changed a MariaDB server's schemas, told from the server's
//! statement counters: a reset skips its schema check (a third of its server time) when, since
//! the database was last proven clean, the only DDL the server ran was this process's own.
//!
//! The server counts every statement it runs by kind (`Com_alter_table`, `Com_create_view`,
//! ...), prepared, in a stored procedure or an event alike, and counts it before running it, so
//! a failed one counts too. This process counts its own DDL (the `AUTO_INCREMENT` resets) only
//! once the server has answered it, and a snapshot of both waits until none of its own is in
//! flight: between two snapshots, the server's count grew by exactly this process's own only if
//! nobody else ran any. Anything unsure (own DDL that failed, a server restarted, a
//! count that grew more) means the full check, never a skipped one.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::RwLock;

/// Statements that can change a schema, or a database's objects: their counters' prefixes
/// (more than needed is only more full checks).
const KINDS: &[&str] = &[
    "com_alter_",
    "com_create_",
    "com_drop_",
    "com_rename_",
    "com_install_",
    "com_uninstall_",
    "com_truncate",
];

/// The server's counters, as `SHOW GLOBAL STATUS` gives them.
pub(super) const STATUS: &str =
    "SHOW GLOBAL STATUS WHERE Variable_name LIKE 'Com\\_%' OR Variable_name = 'Uptime'";

/// One process's DDL on one server.
#[derive(Default)]
pub(super) struct Ledger {
    /// Held shared while own DDL runs, exclusively while a snapshot is read.
    quiet: RwLock<()>,
    /// Own DDL statements the server has answered.
    own: AtomicU64,
    /// Bumped when own DDL fails, so whether the server counted it is unknown (it may not
    /// have reached it): every snapshot taken before is void.
    era: AtomicU64,
}

/// The counts at one moment, with none of this process's DDL in flight.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Snapshot {
    server: u64,
    uptime: u64,
    own: u64,
    era: u64,
}

impl Ledger {
    /// A snapshot of the rows `read` gets from [`STATUS`], with none of own DDL in flight.
    pub(super) fn snapshot<E>(
        &self,
        read: impl FnOnce() -> Result<Vec<(String, String)>, E>,
    ) -> Result<Snapshot, E> {
        let _quiet = self.quiet.write().unwrap_or_else(|e| e.into_inner());
        let (server, uptime) = counts(&read()?);
        Ok(Snapshot {
            server,
            uptime,
            own: self.own.load(Ordering::SeqCst),
            era: self.era.load(Ordering::SeqCst),
        })
    }

    /// Runs statements that hold `ddl` DDL statements of this process's own.
    pub(super) fn own<T, E>(
        &self,
        ddl: u64,
        statements: impl FnOnce() -> Result<T, E>,
    ) -> Result<T, E> {
        let _running = self.quiet.read().unwrap_or_else(|e| e.into_inner());
        let out = statements();
        match &out {
            Ok(_) => self.own.fetch_add(ddl, Ordering::SeqCst),
            Err(_) => self.era.fetch_add(1, Ordering::SeqCst),
        };
        out
    }
}

/// The DDL statements the server has counted, and its uptime, from `SHOW GLOBAL STATUS` rows.
fn counts(rows: &[(String, String)]) -> (u64, u64) {
    let value = |v: &str| v.parse::<u64>().unwrap_or(0);
    let mut ddl = 0u64;
    let mut uptime = 0;
    for (name, v) in rows {
        let name = name.to_ascii_lowercase();
        if name == "uptime" {
            uptime = value(v);
        } else if KINDS.iter().any(|k| name.starts_with(k)) {
            ddl = ddl.wrapping_add(value(v));
        }
    }
    (ddl, uptime)
}

/// Whether all the DDL the server ran between `before` and `after` was this process's own: a
/// pure decision.
pub(super) fn only_own_between(before: &Snapshot, after: &Snapshot) -> bool {
    before.era == after.era
        && after.uptime >= before.uptime
        && after.server.checked_sub(before.server) == after.own.checked_sub(before.own)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(server: u64, uptime: u64, own: u64, era: u64) -> Snapshot {
        Snapshot {
            server,
            uptime,
            own,
            era,
        }
    }

    #[test]
    fn only_ddl_of_schema_kinds_is_counted() {
        let rows: Vec<(String, String)> = [
            ("Com_alter_table", "3"),
            ("Com_create_view", "1"),
            ("Com_drop_trigger", "2"),
            ("Com_rename_table", "1"),
            ("Com_truncate", "1"),
            ("Com_select", "900"),
            ("Com_insert", "40"),
            ("Com_stmt_execute", "7"),
            ("Uptime", "120"),
        ]
        .iter()
        .map(|(a, b)| (a.to_string(), b.to_string()))
        .collect();
        assert_eq!(counts(&rows), (8, 120));
    }

    #[test]
    fn a_check_is_skipped_only_when_every_ddl_was_our_own() {
        let before = at(100, 50, 10, 0);
        assert!(
            only_own_between(&before, &at(100, 51, 10, 0)),
            "none at all"
        );
        assert!(only_own_between(&before, &at(105, 52, 15, 0)), "five, ours");
        assert!(
            !only_own_between(&before, &at(106, 52, 15, 0)),
            "one more, someone else's"
        );
        assert!(
            !only_own_between(&before, &at(105, 52, 15, 1)),
            "a statement of ours failed"
        );
        assert!(
            !only_own_between(&before, &at(115, 3, 25, 0)),
            "the server restarted"
        );
        assert!(
            !only_own_between(&before, &at(90, 60, 10, 0)),
            "counts went back"
        );
    }
}
