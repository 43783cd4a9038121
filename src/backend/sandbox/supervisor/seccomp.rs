//! The server's system-call filter: what Docker's default profile refuses (keys, new namespaces,
//! tracing, mounts, kernel modules, io_uring, ...), plus `connect()` and TCP Fast Open sends so
//! that no code in the server can point a socket of the host's network (its exposed port, an
//! accepted client) anywhere else, and `bind()` handed to the supervisor for the port handoff.
//! Refusals are `EPERM` (`ENOSYS` for `clone3`, so that libc falls back to `clone`, whose flags
//! a filter can read), so a server degrades rather than dies. Another ABI's calls (i386, x32)
//! are refused whole: the rules are written for the native one.
//!
//! The program is built from labels and checked by a small interpreter in the tests.

use crate::sys::seccomp::{arg, assemble, errno, Ins, ARCH, AUDIT_ARCH, NR, X32_BIT};

/// Every `CLONE_NEW*` flag (what Docker's profile masks).
const CLONE_NEW_ANY: u32 = 0x7E02_0000;
/// `MSG_FASTOPEN`: a send that connects.
const MSG_FASTOPEN: u32 = 0x2000_0000;

/// Refused outright.
const DENIED: &[libc::c_long] = &[
    // The kernel's keyrings (an invoker's keys, shared keyrings).
    libc::SYS_add_key,
    libc::SYS_request_key,
    libc::SYS_keyctl,
    // New namespaces (user namespaces above all) and entering others.
    libc::SYS_unshare,
    libc::SYS_setns,
    // Other processes' memory and the kernel's insides.
    libc::SYS_ptrace,
    libc::SYS_process_vm_readv,
    libc::SYS_process_vm_writev,
    libc::SYS_kcmp,
    libc::SYS_perf_event_open,
    libc::SYS_bpf,
    libc::SYS_userfaultfd,
    // The filesystem tree.
    libc::SYS_mount,
    libc::SYS_umount2,
    libc::SYS_pivot_root,
    libc::SYS_open_tree,
    libc::SYS_move_mount,
    libc::SYS_fsopen,
    libc::SYS_fsconfig,
    libc::SYS_fsmount,
    libc::SYS_fspick,
    libc::SYS_mount_setattr,
    libc::SYS_open_by_handle_at,
    libc::SYS_name_to_handle_at,
    libc::SYS_quotactl,
    libc::SYS_swapon,
    libc::SYS_swapoff,
    libc::SYS_acct,
    // The kernel and the machine.
    libc::SYS_init_module,
    libc::SYS_finit_module,
    libc::SYS_delete_module,
    libc::SYS_kexec_load,
    libc::SYS_kexec_file_load,
    libc::SYS_reboot,
    libc::SYS_syslog,
    libc::SYS_settimeofday,
    libc::SYS_clock_settime,
    libc::SYS_clock_adjtime,
    libc::SYS_adjtimex,
    libc::SYS_setdomainname,
    libc::SYS_vhangup,
    libc::SYS_lookup_dcookie,
    // io_uring runs operations (connect among them) that this filter never sees.
    libc::SYS_io_uring_setup,
    libc::SYS_io_uring_enter,
    libc::SYS_io_uring_register,
    // The server accepts on its port; it never connects anywhere.
    libc::SYS_connect,
    #[cfg(target_arch = "x86_64")]
    libc::SYS_iopl,
    #[cfg(target_arch = "x86_64")]
    libc::SYS_ioperm,
    #[cfg(target_arch = "x86_64")]
    libc::SYS_uselib,
];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Label {
    /// Past the architecture check.
    Native,
    Deny,
    NoSys,
    Notify,
    CloneFlags,
    /// `sendto`, `sendmmsg`: flags are the fourth argument.
    SendFlags3,
    /// `sendmsg`: flags are the third argument.
    SendFlags2,
}

fn assembly() -> Vec<Ins<Label>> {
    use Ins::*;
    let mut a = vec![
        Load(ARCH),
        JumpIfEqual(AUDIT_ARCH, Label::Native),
        Return(errno(libc::EPERM)),
    ];
    a.push(Here(Label::Native));
    a.push(Load(NR));
    a.push(JumpIfAtLeast(X32_BIT, Label::Deny));
    a.push(JumpIfEqual(libc::SYS_bind as u32, Label::Notify));
    a.extend(DENIED.iter().map(|&nr| JumpIfEqual(nr as u32, Label::Deny)));
    a.extend([
        JumpIfEqual(libc::SYS_clone3 as u32, Label::NoSys),
        JumpIfEqual(libc::SYS_clone as u32, Label::CloneFlags),
        JumpIfEqual(libc::SYS_sendto as u32, Label::SendFlags3),
        JumpIfEqual(libc::SYS_sendmmsg as u32, Label::SendFlags3),
        JumpIfEqual(libc::SYS_sendmsg as u32, Label::SendFlags2),
        Return(libc::SECCOMP_RET_ALLOW),
        Here(Label::CloneFlags),
        Load(arg(0)),
        JumpIfAnyBit(CLONE_NEW_ANY, Label::Deny),
        Return(libc::SECCOMP_RET_ALLOW),
        Here(Label::SendFlags3),
        Load(arg(3)),
        JumpIfAnyBit(MSG_FASTOPEN, Label::Deny),
        Return(libc::SECCOMP_RET_ALLOW),
        Here(Label::SendFlags2),
        Load(arg(2)),
        JumpIfAnyBit(MSG_FASTOPEN, Label::Deny),
        Return(libc::SECCOMP_RET_ALLOW),
        Here(Label::Notify),
        Return(libc::SECCOMP_RET_USER_NOTIF),
        Here(Label::Deny),
        Return(errno(libc::EPERM)),
        Here(Label::NoSys),
        Return(errno(libc::ENOSYS)),
    ]);
    a
}

/// The classic-BPF program.
pub(super) fn program() -> Vec<libc::sock_filter> {
    assemble(&assembly())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sys::seccomp::decide;

    fn native(nr: i64, args: [u64; 6]) -> u32 {
        decide(&program(), AUDIT_ARCH, nr, args)
    }

    #[test]
    fn ordinary_calls_pass_and_bind_goes_to_the_supervisor() {
        for nr in [
            libc::SYS_read,
            libc::SYS_write,
            libc::SYS_accept4,
            libc::SYS_socket,
        ] {
            assert_eq!(native(nr, [0; 6]), libc::SECCOMP_RET_ALLOW, "{nr}");
        }
        assert_eq!(native(libc::SYS_bind, [0; 6]), libc::SECCOMP_RET_USER_NOTIF);
        // fork() is clone without namespace flags.
        let sigchld = libc::SIGCHLD as u64;
        assert_eq!(
            native(libc::SYS_clone, [sigchld, 0, 0, 0, 0, 0]),
            libc::SECCOMP_RET_ALLOW
        );
        assert_eq!(
            native(libc::SYS_sendto, [3, 0, 10, 0, 0, 0]),
            libc::SECCOMP_RET_ALLOW
        );
    }

    #[test]
    fn escapes_are_refused() {
        let eperm = errno(libc::EPERM);
        for &nr in DENIED {
            assert_eq!(native(nr, [0; 6]), eperm, "{nr}");
        }
        let new_user = libc::CLONE_NEWUSER as u64 | libc::SIGCHLD as u64;
        assert_eq!(native(libc::SYS_clone, [new_user, 0, 0, 0, 0, 0]), eperm);
        assert_eq!(native(libc::SYS_clone3, [0; 6]), errno(libc::ENOSYS));
        let fastopen = MSG_FASTOPEN as u64;
        assert_eq!(native(libc::SYS_sendto, [3, 0, 10, fastopen, 0, 0]), eperm);
        assert_eq!(native(libc::SYS_sendmsg, [3, 0, fastopen, 0, 0, 0]), eperm);
        // Another ABI: i386 through int 0x80, and x32's numbers.
        assert_eq!(
            decide(&program(), 0x4000_0003, libc::SYS_read, [0; 6]),
            eperm
        );
        assert_eq!(native(X32_BIT as i64 | libc::SYS_read, [0; 6]), eperm);
    }
}
