//! The ssh-tunnel backend: the database runs elsewhere (the development VM) and what runs here
//! is the forwarder, as the invoking user, whose SSH key and agent it uses.

use std::io;

use nix::sys::signal::Signal;

use super::{Backend, BackendKind, Spawn};
use crate::engine::Engine;
use crate::process::{ProcessId, ServiceUser};

pub struct SshTunnel;

impl Backend for SshTunnel {
    fn kind(&self) -> BackendKind {
        BackendKind::SshTunnel
    }

    fn spawn(&self, s: &Spawn) -> io::Result<ProcessId> {
        s.launch
            .spawn_detached(&ServiceUser::invoker(), &s.layout.dir, &s.layout.log)
    }

    fn stop_signal(&self, _: &dyn Engine) -> Signal {
        Signal::SIGTERM
    }
}
