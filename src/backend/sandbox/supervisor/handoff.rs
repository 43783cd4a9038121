//! The exposed port, handed to the server: socket activation without the server's help.
//!
//! The supervisor listens on the host's `127.0.0.1:PORT`. The server runs under a seccomp filter
//! that turns its `bind()` calls into notifications for the supervisor
//! (`SECCOMP_RET_USER_NOTIF`). When the server binds the exposed port, the supervisor installs
//! its host socket in place of the server's socket (`SECCOMP_IOCTL_NOTIF_ADDFD` with `SETFD`) and
//! answers the `bind()` with success. The server's `listen()` and `accept()` then work on the
//! host's port itself: no forwarder, no copy, no extra hop (bypass4netns does the same for
//! rootless containers). Every other `bind()` continues unchanged inside the sandbox.
//!
//! The server holds one listening socket of the host's network and the connections it accepts
//! there; the filter refuses `connect()` (and connecting sends), so none of them can be pointed
//! anywhere else, and every socket it creates is in the sandbox's network, which has only `lo`. The supervisor hands the socket over once and then closes its own copy, so the port
//! closes when the server does. Connections made before the server is listening wait in the
//! backlog, as with systemd's socket activation.

use std::fs::File;
use std::io::{self, IoSlice, IoSliceMut};
use std::net::TcpListener;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::FileExt;
use std::thread;

use nix::sys::socket::{
    recvmsg, sendmsg, socketpair, AddressFamily, ControlMessage, ControlMessageOwned, MsgFlags,
    SockFlag, SockType,
};

/// A `struct sockaddr_in`: family, port (network order), address, padding.
const SOCKADDR_IN_LEN: usize = 16;

/// The channel on which the server's filter reaches the supervisor: a socket pair (the
/// supervisor's end, the sandbox's end).
pub(super) fn channel() -> io::Result<(OwnedFd, OwnedFd)> {
    Ok(socketpair(
        AddressFamily::Unix,
        SockType::SeqPacket,
        None,
        SockFlag::SOCK_CLOEXEC,
    )?)
}

/// Puts the calling process (the server, before it execs; `no_new_privs` already set) under the
/// filter ([`super::seccomp`]) and sends the notification descriptor to the supervisor over
/// `channel`.
pub(super) fn install(channel: RawFd) -> io::Result<()> {
    let mut program = super::seccomp::program();
    let flags = libc::SECCOMP_FILTER_FLAG_NEW_LISTENER;
    let notify = crate::sys::seccomp::install(&mut program, flags)?
        .ok_or_else(|| io::Error::other("the filter came without its listener"))?;
    let fds = [notify.as_raw_fd()];
    sendmsg::<()>(
        channel,
        &[IoSlice::new(b"n")],
        &[ControlMessage::ScmRights(&fds)],
        MsgFlags::empty(),
        None,
    )?;
    Ok(())
}

/// Receives the server's notification descriptor (sent before the server exec'd).
pub(super) fn receive(channel: &OwnedFd) -> io::Result<OwnedFd> {
    let mut byte = [0u8; 1];
    let mut iov = [IoSliceMut::new(&mut byte)];
    let mut space = nix::cmsg_space!([RawFd; 1]);
    let msg = recvmsg::<()>(
        channel.as_raw_fd(),
        &mut iov,
        Some(&mut space),
        MsgFlags::MSG_CMSG_CLOEXEC,
    )?;
    for cmsg in msg.cmsgs()? {
        if let ControlMessageOwned::ScmRights(fds) = cmsg {
            if let Some(&fd) = fds.first() {
                // SAFETY: SCM_RIGHTS installed this descriptor in our table for us.
                return Ok(unsafe { OwnedFd::from_raw_fd(fd) });
            }
        }
    }
    Err(io::Error::other(
        "the server's seccomp descriptor did not arrive",
    ))
}

/// Answers the server's `bind()` calls from a background thread for as long as the process lives.
pub(super) fn serve(notify: OwnedFd, listener: TcpListener) -> io::Result<()> {
    let port = listener.local_addr()?.port();
    thread::Builder::new()
        .name("port-handoff".into())
        .stack_size(64 << 10)
        .spawn(move || {
            let mut listener = Some(listener);
            loop {
                match answer(&notify, &mut listener, port) {
                    Ok(()) => {}
                    // The target died mid-call: nothing to answer.
                    Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {}
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => {
                        eprintln!("isoenv sandbox: port handoff stopped: {e}");
                        return;
                    }
                }
            }
        })
        .map(drop)
}

/// Receives one notification and answers it: the host socket for the first bind of the exposed
/// port, the ordinary `bind()` for anything else.
fn answer(notify: &OwnedFd, listener: &mut Option<TcpListener>, port: u16) -> io::Result<()> {
    // SAFETY: a zeroed seccomp_notif is what NOTIF_RECV requires.
    let mut req: libc::seccomp_notif = unsafe { std::mem::zeroed() };
    ioctl(notify, libc::SECCOMP_IOCTL_NOTIF_RECV, &mut req)?;
    let (fd, addr, len) = (req.data.args[0], req.data.args[1], req.data.args[2]);
    let mut resp = libc::seccomp_notif_resp {
        id: req.id,
        val: 0,
        error: 0,
        flags: libc::SECCOMP_USER_NOTIF_FLAG_CONTINUE as u32,
    };
    if let Some(host) = listener.as_ref() {
        let mut sockaddr = [0u8; SOCKADDR_IN_LEN];
        let read = len as usize >= SOCKADDR_IN_LEN
            && File::open(format!("/proc/{}/mem", req.pid))
                .and_then(|mem| mem.read_exact_at(&mut sockaddr, addr))
                .is_ok();
        // Read while the caller still sits in this very call, not in a recycled pid.
        let mut id = req.id;
        if read
            && takes_host_socket(&sockaddr, port)
            && ioctl(notify, libc::SECCOMP_IOCTL_NOTIF_ID_VALID, &mut id).is_ok()
        {
            let flags = std::fs::read_to_string(format!("/proc/{}/fdinfo/{fd}", req.pid))
                .ok()
                .and_then(|t| fd_flags(&t))
                .unwrap_or(0);
            host.set_nonblocking(flags & libc::O_NONBLOCK != 0)?;
            let mut add = libc::seccomp_notif_addfd {
                id: req.id,
                flags: libc::SECCOMP_ADDFD_FLAG_SETFD as u32,
                srcfd: host.as_raw_fd() as u32,
                newfd: fd as u32,
                newfd_flags: (flags & libc::O_CLOEXEC) as u32,
            };
            ioctl(notify, libc::SECCOMP_IOCTL_NOTIF_ADDFD, &mut add)?;
            resp.flags = 0;
            // Handed over once: the port now closes with the server.
            *listener = None;
        }
    }
    ioctl(notify, libc::SECCOMP_IOCTL_NOTIF_SEND, &mut resp)
}

fn ioctl<T>(fd: &OwnedFd, request: libc::Ioctl, arg: &mut T) -> io::Result<()> {
    // SAFETY: each request is used with the argument type the kernel defines for it.
    if unsafe { libc::ioctl(fd.as_raw_fd(), request, arg as *mut T) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Whether a `bind()` to `sockaddr` asks for the exposed port: IPv4, that port, on loopback or
/// any address (the host socket is on 127.0.0.1 either way).
fn takes_host_socket(sockaddr: &[u8; SOCKADDR_IN_LEN], port: u16) -> bool {
    let family = u16::from_ne_bytes([sockaddr[0], sockaddr[1]]);
    let bound = u16::from_be_bytes([sockaddr[2], sockaddr[3]]);
    let ip = [sockaddr[4], sockaddr[5], sockaddr[6], sockaddr[7]];
    i32::from(family) == libc::AF_INET && bound == port && (ip == [127, 0, 0, 1] || ip == [0; 4])
}

/// The `flags:` (octal) of a `/proc/PID/fdinfo/FD`: the descriptor's status flags and cloexec.
fn fd_flags(fdinfo: &str) -> Option<i32> {
    let octal = fdinfo.lines().find_map(|l| l.strip_prefix("flags:"))?;
    i32::from_str_radix(octal.trim(), 8).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sockaddr(family: i32, port: u16, ip: [u8; 4]) -> [u8; SOCKADDR_IN_LEN] {
        let mut s = [0u8; SOCKADDR_IN_LEN];
        s[..2].copy_from_slice(&(family as u16).to_ne_bytes());
        s[2..4].copy_from_slice(&port.to_be_bytes());
        s[4..8].copy_from_slice(&ip);
        s
    }

    #[test]
    fn only_an_ipv4_bind_of_the_exposed_port_takes_the_host_socket() {
        assert!(takes_host_socket(
            &sockaddr(libc::AF_INET, 5432, [127, 0, 0, 1]),
            5432
        ));
        assert!(takes_host_socket(
            &sockaddr(libc::AF_INET, 5432, [0; 4]),
            5432
        ));
        assert!(!takes_host_socket(
            &sockaddr(libc::AF_INET, 5433, [127, 0, 0, 1]),
            5432
        ));
        assert!(!takes_host_socket(
            &sockaddr(libc::AF_INET, 5432, [10, 0, 0, 1]),
            5432
        ));
        assert!(!takes_host_socket(
            &sockaddr(libc::AF_INET6, 5432, [0; 4]),
            5432
        ));
        assert!(!takes_host_socket(
            &sockaddr(libc::AF_UNIX, 5432, [127, 0, 0, 1]),
            5432
        ));
    }

    #[test]
    fn fdinfo_flags_are_octal() {
        let info = "pos:\t0\nflags:\t02004002\nmnt_id:\t9\nino:\t1\n";
        let flags = fd_flags(info).unwrap();
        assert_ne!(flags & libc::O_CLOEXEC, 0);
        assert_ne!(flags & libc::O_NONBLOCK, 0);
        assert_eq!(fd_flags("pos:\t0\n"), None);
    }
}
