//! The guard that undoes a half-made environment: whatever its record says exists (a server, a
//! container, a tunnel) is torn down by its backend, then the directory goes.

use std::path::PathBuf;

use super::gc::retire;
use crate::backend::{EnvState, Host};
use crate::layout::Layout;

/// Removes a half-made environment unless disarmed.
pub(super) struct Cleanup<'a> {
    pub host: &'a dyn Host,
    pub dir: Option<PathBuf>,
}

impl Cleanup<'_> {
    pub fn disarm(&mut self) {
        self.dir = None;
    }
}

impl Drop for Cleanup<'_> {
    fn drop(&mut self) {
        let Some(dir) = self.dir.take() else {
            return;
        };
        let layout = Layout::new(dir);
        if let Ok(Some(state)) = EnvState::load(&layout) {
            let _ = state.backend.backend().teardown(self.host, &state, &layout);
        }
        let _ = retire(&layout.dir);
    }
}
