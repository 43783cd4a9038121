//! The port forwarder, in the supervisor (outside the sandbox and its cgroups, so it costs the
//! sandbox none of its CPU quota). It accepts on the host's 127.0.0.1:PORT; each connection's
//! thread enters the sandbox's network namespace (`setns` changes only the calling thread) and
//! connects to the server on the sandbox's own loopback, then bytes are copied both ways.
//! Nothing inside the sandbox ever holds a socket of the host's network.

use std::io;
use std::net::{Shutdown, TcpListener, TcpStream};
use std::os::fd::OwnedFd;
use std::sync::Arc;
use std::thread;

use nix::sched::CloneFlags;

const STACK: usize = 64 << 10;

/// Serves `listener` from a background thread for as long as the process lives.
pub(super) fn start(listener: TcpListener, netns: OwnedFd, port: u16) -> io::Result<()> {
    let netns = Arc::new(netns);
    thread::Builder::new()
        .name("forward-accept".into())
        .stack_size(STACK)
        .spawn(move || loop {
            let outside = match listener.accept() {
                Ok((s, _)) => s,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    eprintln!("isoenv sandbox: forwarder: accept failed: {e}");
                    return;
                }
            };
            let netns = Arc::clone(&netns);
            let _ = thread::Builder::new()
                .stack_size(STACK)
                .spawn(move || connect_inside(outside, &netns, port));
        })
        .map(drop)
}

fn connect_inside(outside: TcpStream, netns: &OwnedFd, port: u16) {
    if let Err(e) = nix::sched::setns(netns, CloneFlags::CLONE_NEWNET) {
        eprintln!("isoenv sandbox: forwarder: cannot enter the sandbox's network: {e}");
        return;
    }
    // A connection the server refuses is closed at once: the client sees the server down.
    let Ok(inside) = TcpStream::connect(("127.0.0.1", port)) else {
        return;
    };
    // Interactive protocols: every small write must leave at once.
    let _ = outside.set_nodelay(true);
    let _ = inside.set_nodelay(true);
    let (Ok(outside2), Ok(inside2)) = (outside.try_clone(), inside.try_clone()) else {
        return;
    };
    let upstream = thread::Builder::new()
        .stack_size(STACK)
        .spawn(move || copy(outside2, inside2));
    copy(inside, outside);
    if let Ok(t) = upstream {
        let _ = t.join();
    }
}

/// Copies until EOF, then passes the half-close on.
fn copy(mut from: TcpStream, mut to: TcpStream) {
    let _ = io::copy(&mut from, &mut to);
    let _ = to.shutdown(Shutdown::Write);
    let _ = from.shutdown(Shutdown::Read);
}
