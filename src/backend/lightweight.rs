//! The lightweight backend: a directory and variables, and (in service mode) the real server as
//! a local process in that directory. No root, no Docker, no isolation beyond ownership.

use std::io;

use super::local::{Confinement, Spawn};
use super::{memory, BackendKind};
use crate::sys::files::remove_tree;
use crate::sys::process::stop_working_in;
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

    fn leftovers(&self) -> io::Result<Vec<String>> {
        Ok(memory::strays()
            .into_iter()
            .map(|dir| {
                stop_working_in(&dir);
                let _ = remove_tree(&dir);
                format!(
                    "{} (data in memory of an environment that is gone)",
                    dir.display()
                )
            })
            .collect())
    }
}
