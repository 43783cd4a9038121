//! The operating system's side, at the bottom of the crate: nothing here imports the rest of it.

pub mod bytes;
pub mod files;
pub mod hash;
pub mod identity;
pub mod ldd;
pub mod lock;
pub mod memo;
pub mod net;
pub mod process;
pub mod seccomp;
pub mod secret;
pub mod shell;
pub mod userns;
