//! The lightweight backend: a directory and variables, and (in service mode) the real server as
//! a local process in that directory. No root, no Docker, no isolation beyond ownership.

use std::io;

use super::local::{Confinement, Spawn};
use super::BackendKind;
use crate::sys::process::ProcessId;

pub struct Lightweight;

impl Confinement for Lightweight {
    fn kind(&self) -> BackendKind {
        BackendKind::Lightweight
    }

    fn spawn(&self, s: &Spawn) -> io::Result<ProcessId> {
        s.launch
            .spawn_detached(s.user, &s.layout.dir, &s.layout.log)
    }
}
