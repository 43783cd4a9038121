//! Handouts over the keeper's socket. A test process asks the run's keeper for a database and
//! holds the connection as its lease: closing it (the guard dropped, or the process gone, even
//! by `kill -9`) gives the database back, and the keeper resets it on connections it keeps
//! warm. A handout is then one local round trip: the test process opens no connection of its
//! own to the server for it, where each process under nextest used to pay one (5-7 ms) and a
//! cold first query. The lease binds both ways: a borrower whose keeper dies first stops
//! itself, since the keeper's death frees what it lent.
//!
//! The socket lives in a directory only this user can enter, named by a hash of the server's
//! URL, so a test finds its server's keeper and nobody else's. Without a keeper (a test binary
//! run by hand, the run's first test before its keeper is up) the caller uses its own pool.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::Shutdown;
use std::os::unix::fs::{DirBuilderExt, MetadataExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use super::{with_database, TestDb};
use crate::engine::EngineKind;
use crate::sys::hash::fnv1a;

/// A pool the keeper lends databases from.
pub(super) trait Lender: Send + Sync {
    /// The pool's key (template or schema): a request naming another is not served.
    fn key(&self) -> &str;
    /// A clean database, given back when the guard drops.
    fn lend(self: Arc<Self>) -> super::Result<TestDb>;
}

/// How long a test waits for its database: a keeper may have to make one first.
const WAIT: Duration = Duration::from_secs(300);

/// The keeper's socket for the server at `url`, in a directory of this user's own; `None` if
/// that directory cannot be made so.
fn path(url: &str) -> Option<PathBuf> {
    // Made and checked once per process: a handout is on every test's path.
    static DIR: OnceLock<Option<PathBuf>> = OnceLock::new();
    let dir = DIR.get_or_init(|| {
        let me = nix::unistd::geteuid().as_raw();
        let base = std::env::temp_dir().join(format!("isoenv-testing-{me}"));
        let dir = base.join("keepers");
        let _ = std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&dir);
        // Another user's directory on the way could swap the socket for one of theirs.
        let ours =
            |p: &Path| std::fs::symlink_metadata(p).is_ok_and(|m| m.is_dir() && m.uid() == me);
        let private = std::fs::symlink_metadata(&dir).is_ok_and(|m| m.mode() & 0o077 == 0);
        (ours(&base) && ours(&dir) && private).then_some(dir)
    });
    Some(dir.as_ref()?.join(format!("{:016x}.sock", fnv1a(url))))
}

/// Borrows a database of the pool `key` from the keeper of the server at `url`, if one
/// listens and has one to give.
pub(super) fn borrow(engine: EngineKind, url: &str, key: &str) -> Option<TestDb> {
    let mut stream = UnixStream::connect(path(url)?).ok()?;
    stream.set_read_timeout(Some(WAIT)).ok()?;
    stream.write_all(format!("{key}\n").as_bytes()).ok()?;
    let mut answer = String::new();
    BufReader::new(&stream).read_line(&mut answer).ok()?;
    let name = answer.strip_suffix('\n')?;
    let valid = !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
    if !valid {
        return None;
    }
    let end = hold(stream, name)?;
    Some(TestDb {
        engine,
        url: with_database(url, name),
        name: name.to_owned(),
        release: Some(Box::new(end)),
    })
}

/// Holds a lease: returns what ends it (closing the connection). A thread waits on the
/// connection meanwhile, and if the keeper goes first (killed, or its run over) it stops this
/// process: the keeper's death frees the database for the next claimer, and a test still
/// writing to it (a pool reconnecting) would write into another test's database.
fn hold(stream: UnixStream, name: &str) -> Option<impl FnOnce()> {
    stream.set_read_timeout(None).ok()?;
    let watched = stream.try_clone().ok()?;
    let ended = Arc::new(AtomicBool::new(false));
    let (by_us, name) = (ended.clone(), name.to_owned());
    std::thread::Builder::new()
        .name(format!("isoenv-lease-{name}"))
        .spawn(move || {
            let mut byte = [0u8; 1];
            // The keeper never writes again: any answer (end of file, an error) is its end.
            while let Err(e) = (&watched).read(&mut byte) {
                if e.kind() != std::io::ErrorKind::Interrupted {
                    break;
                }
            }
            if !by_us.load(Ordering::SeqCst) {
                super::stop_process(&format!(
                    "the test keeper that lent database {name} has gone away, so the database \
                     may now be another test's; stopping this test process before it writes \
                     there. Rerun the tests."
                ));
            }
        })
        .ok()?;
    Some(move || {
        ended.store(true, Ordering::SeqCst);
        let _ = stream.shutdown(Shutdown::Both);
    })
}

/// A keeper's socket, served on threads of its own; closed when dropped.
pub(super) struct Service {
    path: PathBuf,
    stop: Arc<AtomicBool>,
}

impl Service {
    /// Lends `lender`'s databases at the socket for `url`. The caller holds the keeper's lock on
    /// the server, so a socket already there is a dead keeper's.
    pub(super) fn open(url: &str, lender: Arc<dyn Lender>) -> Option<Service> {
        let path = path(url)?;
        let _ = std::fs::remove_file(&path);
        let listener = UnixListener::bind(&path).ok()?;
        if let Some(dir) = path.parent() {
            sweep(dir, STALE);
        }
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = stop.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                if stopped.load(Ordering::Relaxed) {
                    break;
                }
                if let Ok(stream) = stream {
                    let lender = lender.clone();
                    std::thread::spawn(move || serve(stream, lender));
                }
            }
        });
        Some(Service { path, stop })
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        // Wakes the accepting thread, which then sees the flag.
        let _ = UnixStream::connect(&self.path);
        let _ = std::fs::remove_file(&self.path);
    }
}

/// How old a socket nobody listens on must be before a keeper removes it: a keeper that is
/// starting has bound its socket a moment ago.
const STALE: Duration = Duration::from_secs(60);

/// Removes the sockets in `dir` that killed keepers left (`kill -9` runs no cleanup): older than
/// `age`, and refusing connections.
fn sweep(dir: &Path, age: Duration) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let socket = entry.path();
        let old = entry
            .metadata()
            .and_then(|m| m.modified())
            .is_ok_and(|t| t.elapsed().is_ok_and(|e| e > age));
        let is_socket = socket.extension().is_some_and(|e| e == "sock");
        if is_socket && old {
            let refused = UnixStream::connect(&socket)
                .is_err_and(|e| e.kind() == std::io::ErrorKind::ConnectionRefused);
            if refused {
                let _ = std::fs::remove_file(&socket);
            }
        }
    }
}

/// One lease: the request, the database's name (an empty line: none to give, the test uses its
/// own pool), then the connection held until the test lets go.
fn serve(mut stream: UnixStream, lender: Arc<dyn Lender>) {
    let mut request = String::new();
    let asked = BufReader::new(&stream).read_line(&mut request).is_ok()
        && request.strip_suffix('\n') == Some(lender.key());
    let lent = if asked { lender.lend().ok() } else { None };
    let answer = lent.as_ref().map_or("", |db| db.name());
    if stream.write_all(format!("{answer}\n").as_bytes()).is_ok() && lent.is_some() {
        // Returns at end of file: the test dropped its guard, or its process is gone.
        let _ = std::io::copy(&mut &stream, &mut std::io::sink());
    }
    drop(lent); // gives the database back
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    /// Lends one name, and records when it comes back.
    struct Once {
        key: String,
        back: Arc<Mutex<Vec<String>>>,
    }

    impl Lender for Once {
        fn key(&self) -> &str {
            &self.key
        }
        fn lend(self: Arc<Self>) -> crate::testing::Result<TestDb> {
            let back = self.back.clone();
            Ok(TestDb {
                engine: EngineKind::Postgres,
                url: String::new(),
                name: "isoenv_c_1".into(),
                release: Some(Box::new(move || {
                    back.lock().unwrap().push("isoenv_c_1".into())
                })),
            })
        }
    }

    fn returned(back: &Mutex<Vec<String>>) -> bool {
        (0..500).any(|_| {
            std::thread::sleep(Duration::from_millis(2));
            !back.lock().unwrap().is_empty()
        })
    }

    #[test]
    fn a_lease_lasts_as_long_as_its_connection() {
        let url = format!("postgres://u:p@127.0.0.1:1/lease-{}", std::process::id());
        let back = Arc::new(Mutex::new(Vec::new()));
        let lender = Arc::new(Once {
            key: "tpl".into(),
            back: back.clone(),
        });
        let service = Service::open(&url, lender).expect("the socket");
        assert!(borrow(EngineKind::Postgres, &url, "other").is_none());
        let db = borrow(EngineKind::Postgres, &url, "tpl").expect("a database");
        assert_eq!(db.url(), "postgres://u:p@127.0.0.1:1/isoenv_c_1");
        std::thread::sleep(Duration::from_millis(20));
        assert!(back.lock().unwrap().is_empty(), "given back while held");
        drop(db);
        assert!(returned(&back), "not given back when the guard dropped");
        drop(service);
        assert!(borrow(EngineKind::Postgres, &url, "tpl").is_none());
    }

    /// Ends `child` (by pid) if the test stops before it does.
    struct Child(std::process::Child);

    impl Drop for Child {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }

    /// Runs this test again as `role`, and waits for it to say `ready` on its output.
    fn spawn(test: &str, role: &str, url: &str, ready: &str) -> Child {
        use std::process::{Command, Stdio};
        let mut child = Child(
            Command::new(std::env::current_exe().unwrap())
                .args([test, "--exact", "--nocapture", "--test-threads=1"])
                .env(ROLE, role)
                .env(URL, url)
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap(),
        );
        let out = BufReader::new(child.0.stdout.take().unwrap());
        let said = out
            .lines()
            .map_while(|l| l.ok())
            .any(|l| l.ends_with(ready));
        assert!(said, "the {role} did not get ready");
        child
    }

    const ROLE: &str = "ISOENV_LEASE_TEST_ROLE";
    const URL: &str = "ISOENV_LEASE_TEST_URL";

    #[test]
    fn a_borrower_stops_when_its_keeper_dies() {
        const TEST: &str = "testing::lease::tests::a_borrower_stops_when_its_keeper_dies";
        let a_while = Duration::from_secs(60);
        match (std::env::var(ROLE).as_deref(), std::env::var(URL)) {
            (Ok("keeper"), Ok(url)) => {
                let back = Arc::new(Mutex::new(Vec::new()));
                let lender = Arc::new(Once {
                    key: "tpl".into(),
                    back,
                });
                let _service = Service::open(&url, lender).expect("the socket");
                println!("LISTENING");
                std::thread::sleep(a_while);
                return;
            }
            (Ok("borrower"), Ok(url)) => {
                let _db = borrow(EngineKind::Postgres, &url, "tpl").expect("a database");
                println!("BORROWED");
                std::thread::sleep(a_while);
                return;
            }
            _ => {}
        }
        let url = format!("postgres://u:p@127.0.0.1:1/keeper-{}", std::process::id());
        let mut keeper = spawn(TEST, "keeper", &url, "LISTENING");
        let mut borrower = spawn(TEST, "borrower", &url, "BORROWED");
        keeper.0.kill().unwrap();
        keeper.0.wait().unwrap();
        // What the killed keeper could not remove.
        let _ = std::fs::remove_file(path(&url).unwrap());
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        let status = loop {
            if let Some(status) = borrower.0.try_wait().unwrap() {
                break status;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "the borrower outlived its keeper"
            );
            std::thread::sleep(Duration::from_millis(10));
        };
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(status.signal(), Some(libc::SIGABRT), "{status}");
        let mut said = String::new();
        borrower
            .0
            .stderr
            .take()
            .unwrap()
            .read_to_string(&mut said)
            .unwrap();
        assert!(
            said.contains("keeper that lent database isoenv_c_1 has gone"),
            "{said}"
        );
    }

    #[test]
    fn sockets_killed_keepers_left_are_swept_but_live_and_new_ones_kept() {
        let dir = tempfile::tempdir().unwrap();
        let dead = dir.path().join("dead.sock");
        drop(UnixListener::bind(&dead).unwrap());
        let live = dir.path().join("live.sock");
        let _listening = UnixListener::bind(&live).unwrap();
        let other = dir.path().join("notes.txt");
        std::fs::write(&other, "").unwrap();
        std::thread::sleep(Duration::from_millis(50));
        // Bound a moment ago, and not listening yet as far as a sweep can tell.
        let starting = dir.path().join("starting.sock");
        drop(UnixListener::bind(&starting).unwrap());
        sweep(dir.path(), Duration::from_millis(30));
        assert!(!dead.exists(), "a dead keeper's socket stayed");
        assert!(live.exists(), "a live keeper's socket was removed");
        assert!(starting.exists(), "a starting keeper's socket was removed");
        assert!(other.exists());
    }

    #[test]
    fn sockets_are_named_by_server_in_a_private_directory() {
        let a = path("postgres://u:p@127.0.0.1:5432/postgres").expect("a private directory");
        let b = path("postgres://u:p@127.0.0.1:5433/postgres").expect("a private directory");
        assert_ne!(a, b);
        assert_eq!(a.parent(), b.parent());
        let mode = std::fs::metadata(a.parent().unwrap()).unwrap().mode();
        assert_eq!(mode & 0o777, 0o700);
    }
}
