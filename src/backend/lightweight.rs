//! The lightweight backend: a directory and variables, and (in service mode) the real server as
//! a local process in that directory. No root, no Docker, no isolation beyond ownership.

use std::io;

use super::{Backend, BackendKind};
use crate::process::{Launch, ProcessId, ServiceUser};
use crate::state::Layout;

pub struct Lightweight;

impl Backend for Lightweight {
    fn kind(&self) -> BackendKind {
        BackendKind::Lightweight
    }

    fn spawn(&self, launch: &Launch, layout: &Layout, user: &ServiceUser) -> io::Result<ProcessId> {
        launch.spawn_detached(user, &layout.dir, &layout.log)
    }
}
