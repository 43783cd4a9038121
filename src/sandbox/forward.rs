//! The port forwarder: the one process holding a socket of the host's network namespace (the
//! listener on host 127.0.0.1:PORT, inherited from the supervisor). For each connection it
//! connects to the server on the sandbox's own loopback and copies bytes both ways. A listening
//! socket can only accept, so the sandbox gains no way out through it.

use std::io;
use std::net::{Shutdown, TcpListener, TcpStream};
use std::thread;

pub(super) fn serve(listener: &TcpListener, port: u16) -> i32 {
    loop {
        let outside = match listener.accept() {
            Ok((s, _)) => s,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => {
                eprintln!("isoenv sandbox: forwarder: accept failed: {e}");
                return 1;
            }
        };
        // A connection the server refuses is closed at once: the client sees the server down.
        let Ok(inside) = TcpStream::connect(("127.0.0.1", port)) else {
            continue;
        };
        let _ = thread::Builder::new()
            .stack_size(64 << 10)
            .spawn(move || pipe_both(outside, inside));
    }
}

fn pipe_both(a: TcpStream, b: TcpStream) {
    // Interactive protocols: every small write must leave at once.
    let _ = a.set_nodelay(true);
    let _ = b.set_nodelay(true);
    let (Ok(a2), Ok(b2)) = (a.try_clone(), b.try_clone()) else {
        return;
    };
    let upstream = thread::Builder::new()
        .stack_size(64 << 10)
        .spawn(move || copy(a2, b2));
    copy(b, a);
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
