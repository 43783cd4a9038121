//! The ssh-tunnel backend: the database runs elsewhere (the development VM) and what runs here
//! is the forwarder, as the invoking user, whose SSH key and agent it uses.

use std::io;

use nix::sys::signal::Signal;

use super::{Backend, BackendKind};
use crate::engine::Engine;
use crate::process::{Launch, ProcessId, ServiceUser};
use crate::state::Layout;

pub struct SshTunnel;

impl Backend for SshTunnel {
    fn kind(&self) -> BackendKind {
        BackendKind::SshTunnel
    }

    fn spawn(&self, launch: &Launch, layout: &Layout, _: &ServiceUser) -> io::Result<ProcessId> {
        launch.spawn_detached(&ServiceUser::invoker(), &layout.dir, &layout.log)
    }

    fn stop_signal(&self, _: &dyn Engine) -> Signal {
        Signal::SIGTERM
    }
}
