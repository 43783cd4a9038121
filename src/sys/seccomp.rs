//! System-call filters: a small assembler for classic BPF (labels resolved to forward jumps),
//! their installation, and the filter of disposable servers, which answers the calls that wait
//! for the disk as if they had.

use std::io;
use std::os::fd::{FromRawFd, OwnedFd, RawFd};

/// `AUDIT_ARCH_*` of the running architecture: syscall numbers mean something only with it.
#[cfg(target_arch = "x86_64")]
pub const AUDIT_ARCH: u32 = 0xC000_003E;
#[cfg(target_arch = "aarch64")]
pub const AUDIT_ARCH: u32 = 0xC000_00B7;

/// x32's system calls are x86_64's numbers with this bit set.
pub const X32_BIT: u32 = 0x4000_0000;

/// One instruction, jumping to labels of type `L`.
pub enum Ins<L> {
    /// Load a 32-bit word of `seccomp_data` at this offset.
    Load(usize),
    JumpIfEqual(u32, L),
    JumpIfAtLeast(u32, L),
    JumpIfAnyBit(u32, L),
    Return(u32),
    Here(L),
}

/// The action that fails a call with `e` (0: succeeds without running it).
pub fn errno(e: i32) -> u32 {
    libc::SECCOMP_RET_ERRNO | (e as u32 & libc::SECCOMP_RET_DATA)
}

/// The low 32 bits of system-call argument `i` (little-endian).
pub fn arg(i: usize) -> usize {
    std::mem::offset_of!(libc::seccomp_data, args) + 8 * i
}

/// Where the architecture is.
pub const ARCH: usize = std::mem::offset_of!(libc::seccomp_data, arch);
/// Where the system call's number is.
pub const NR: usize = std::mem::offset_of!(libc::seccomp_data, nr);

/// The classic-BPF program: labels resolved to forward jumps.
pub fn assemble<L: Copy + Eq>(assembly: &[Ins<L>]) -> Vec<libc::sock_filter> {
    let mut at = Vec::new();
    let mut n = 0;
    for ins in assembly {
        match ins {
            Ins::Here(label) => at.push((*label, n)),
            _ => n += 1,
        }
    }
    let target = |label: L| at.iter().find(|(l, _)| *l == label).map(|(_, i)| *i);
    let mut out = Vec::new();
    for ins in assembly {
        let i = out.len();
        let jump = |code: u32, k: u32, label: L| {
            let to = target(label).expect("every label is placed");
            libc::sock_filter {
                code: (libc::BPF_JMP | code | libc::BPF_K) as u16,
                jt: u8::try_from(to - i - 1).expect("a jump within 255 instructions"),
                jf: 0,
                k,
            }
        };
        out.push(match *ins {
            Ins::Here(_) => continue,
            Ins::Load(offset) => libc::sock_filter {
                code: (libc::BPF_LD | libc::BPF_W | libc::BPF_ABS) as u16,
                jt: 0,
                jf: 0,
                k: offset as u32,
            },
            Ins::JumpIfEqual(k, l) => jump(libc::BPF_JEQ, k, l),
            Ins::JumpIfAtLeast(k, l) => jump(libc::BPF_JGE, k, l),
            Ins::JumpIfAnyBit(k, l) => jump(libc::BPF_JSET, k, l),
            Ins::Return(k) => libc::sock_filter {
                code: (libc::BPF_RET | libc::BPF_K) as u16,
                jt: 0,
                jf: 0,
                k,
            },
        });
    }
    out
}

/// Puts the calling thread, and what it execs, under `program` (`no_new_privs` already set).
/// With `SECCOMP_FILTER_FLAG_NEW_LISTENER` in `flags`, returns the notification descriptor.
/// Async-signal-safe: no allocation.
pub fn install(program: &mut [libc::sock_filter], flags: u64) -> io::Result<Option<OwnedFd>> {
    let prog = libc::sock_fprog {
        len: program.len() as u16,
        filter: program.as_mut_ptr(),
    };
    // SAFETY: `prog` points to a valid program that outlives the call.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_seccomp,
            libc::SECCOMP_SET_MODE_FILTER,
            flags,
            &prog as *const libc::sock_fprog,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    let listener = flags & libc::SECCOMP_FILTER_FLAG_NEW_LISTENER != 0;
    // SAFETY: with a listener asked for, the kernel just returned this descriptor to us alone.
    Ok(listener.then(|| unsafe { OwnedFd::from_raw_fd(fd as RawFd) }))
}

/// The calls that wait until data is on the disk.
const SYNCS: &[libc::c_long] = &[
    libc::SYS_fsync,
    libc::SYS_fdatasync,
    libc::SYS_sync_file_range,
    libc::SYS_syncfs,
    libc::SYS_sync,
    libc::SYS_msync,
];

/// The filter of a disposable server (a test run's): the calls that wait for the disk return
/// success without running, since its data is thrown away with it. MariaDB syncs its DDL log,
/// `.frm` files and dictionary on every DDL, whatever its flush settings: the resets of a test
/// pool (an `ALTER TABLE ... AUTO_INCREMENT` per written table) wait on the disk for most of
/// their time otherwise. Everything else, and other ABIs, pass to the filters stacked with it.
pub fn without_disk_sync() -> Vec<libc::sock_filter> {
    #[derive(Clone, Copy, PartialEq, Eq)]
    enum Label {
        Native,
        Skip,
    }
    use Ins::*;
    let mut a = vec![
        Load(ARCH),
        JumpIfEqual(AUDIT_ARCH, Label::Native),
        Return(libc::SECCOMP_RET_ALLOW),
        Here(Label::Native),
        Load(NR),
    ];
    a.extend(SYNCS.iter().map(|&nr| JumpIfEqual(nr as u32, Label::Skip)));
    a.extend([
        Return(libc::SECCOMP_RET_ALLOW),
        Here(Label::Skip),
        Return(errno(0)),
    ]);
    assemble(&a)
}

/// What the kernel would decide: the subset of classic BPF that [`assemble`] emits.
#[cfg(test)]
pub fn decide(program: &[libc::sock_filter], arch: u32, nr: i64, args: [u64; 6]) -> u32 {
    let mut data = vec![0u8; std::mem::size_of::<libc::seccomp_data>()];
    data[0..4].copy_from_slice(&(nr as i32).to_ne_bytes());
    data[4..8].copy_from_slice(&arch.to_ne_bytes());
    for (i, a) in args.iter().enumerate() {
        let at = std::mem::offset_of!(libc::seccomp_data, args) + 8 * i;
        data[at..at + 8].copy_from_slice(&a.to_ne_bytes());
    }
    let (mut pc, mut acc) = (0usize, 0u32);
    loop {
        let ins = program[pc];
        let code = ins.code as u32;
        pc += 1;
        if code == libc::BPF_LD | libc::BPF_W | libc::BPF_ABS {
            let k = ins.k as usize;
            acc = u32::from_ne_bytes(data[k..k + 4].try_into().unwrap());
        } else if code & 0x07 == libc::BPF_RET {
            return ins.k;
        } else {
            let taken = match code & 0xf0 {
                c if c == libc::BPF_JEQ => acc == ins.k,
                c if c == libc::BPF_JGE => acc >= ins.k,
                c if c == libc::BPF_JSET => acc & ins.k != 0,
                other => panic!("unexpected jump {other:#x}"),
            };
            pc += if taken { ins.jt } else { ins.jf } as usize;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_disposable_server_skips_only_the_waits_for_the_disk() {
        let program = without_disk_sync();
        let native = |nr: libc::c_long| decide(&program, AUDIT_ARCH, nr, [0; 6]);
        for &nr in SYNCS {
            assert_eq!(native(nr), errno(0), "{nr}");
        }
        for nr in [
            libc::SYS_write,
            libc::SYS_pwrite64,
            libc::SYS_openat,
            libc::SYS_rename,
        ] {
            assert_eq!(native(nr), libc::SECCOMP_RET_ALLOW, "{nr}");
        }
        // Another ABI's numbers mean other calls: left to run.
        assert_eq!(
            decide(&program, 0x4000_0003, libc::SYS_fsync, [0; 6]),
            libc::SECCOMP_RET_ALLOW
        );
    }
}
