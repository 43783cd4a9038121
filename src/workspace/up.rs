//! `db up`, `db down` and `db status`: what the profile uses, brought up, down, or checked. In
//! production only ever a read-only check of the configured database.

use serde::Serialize;

use super::policy::{plan_up, Action, UpPlan};
use super::{EnvInfo, Workspace};
use crate::backend::{Answer, BackendKind, CreateOptions, EnvState, Started, Status};
use crate::config::{EnvironmentConfig, Profile};
use crate::engine::EngineKind;
use crate::error::{Error, IoContext, Result};
use crate::remote::{self, ServerReport};

/// What `db down` did.
#[derive(Debug, Clone)]
pub enum Down {
    /// The environment of that name is stopped; its data is kept.
    Stopped(String),
    /// Staging: the container, its volume and the environment are gone.
    Removed(&'static str),
    /// `up` had made nothing.
    Nothing,
}

#[derive(Debug, Clone, Serialize)]
#[serde(tag = "outcome", rename_all = "kebab-case")]
pub enum UpOutcome {
    Created(EnvInfo),
    Started(EnvInfo),
    AlreadyUp(EnvInfo),
    /// Production: the configured database answered; nothing was created or changed.
    Verified {
        /// The database, as a URL without the password.
        target: String,
        report: ServerReport,
    },
}

/// What `db status` found: one line per thing that must work.
#[derive(Debug, Clone, Serialize)]
pub struct StatusReport {
    pub environment: Profile,
    /// The environment `up` manages, if it exists (none in production).
    pub env: Option<EnvInfo>,
    pub checks: Vec<Check>,
}

impl StatusReport {
    pub fn healthy(&self) -> bool {
        !self.checks.is_empty() && self.checks.iter().all(|c| c.ok)
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Check {
    pub what: String,
    pub ok: bool,
    pub detail: String,
}

impl Workspace {
    /// Brings up what this profile uses: the local default, the VM tunnel, staging's container,
    /// or (production) a read-only check of the configured database.
    pub fn up(
        &self,
        config: &EnvironmentConfig,
        install: bool,
        progress: &dyn Fn(&str),
    ) -> Result<UpOutcome> {
        match plan_up(config) {
            UpPlan::Env {
                name,
                engine,
                backend,
                ..
            } => self.up_env(name, engine, backend, install, progress),
            UpPlan::VerifyProduction => {
                let db = &self.database;
                let report = remote::verify(db, &db.host, db.port)?;
                Ok(UpOutcome::Verified {
                    target: db.redacted_url(),
                    report,
                })
            }
        }
    }

    fn up_env(
        &self,
        name: &str,
        engine: EngineKind,
        backend: BackendKind,
        install: bool,
        progress: &dyn Fn(&str),
    ) -> Result<UpOutcome> {
        let layout = self.layout(name);
        let existing = EnvState::load(&layout)
            .context(|| format!("cannot read the state of environment `{name}`"))?;
        let Some(state) = existing else {
            let opts = CreateOptions {
                install,
                ..CreateOptions::server(name, engine, backend)
            };
            return self.create(&opts, progress).map(UpOutcome::Created);
        };
        if state.backend != backend {
            return Err(Error::Env {
                name: name.into(),
                message: format!("it is a {} environment, but this configuration brings up a {backend} one; destroy it first (`cargo xtask db destroy {name}`)", state.backend),
            });
        }
        if state.backend.backend().status(self, &state) == Status::EnvOnly {
            return Ok(UpOutcome::AlreadyUp(self.info(&state, &layout)));
        }
        self.guard(Action::Start, "start an environment")?;
        let (layout, _lock, mut state) = self.open_locked(name)?;
        let started = state
            .backend
            .backend()
            .start(self, &mut state, &layout, progress)?;
        let info = self.info(&state, &layout);
        Ok(match started {
            Started::Already => UpOutcome::AlreadyUp(info),
            Started::Now => UpOutcome::Started(info),
        })
    }

    /// Undoes what `up` did: stops the local server or the tunnel (data kept); in staging
    /// removes the container with its volume, as per-run containers are.
    pub fn down(&self, config: &EnvironmentConfig) -> Result<Down> {
        self.guard(Action::Stop, "bring anything down")?;
        let result = match plan_up(config) {
            UpPlan::Env {
                name,
                removed_by_down: true,
                ..
            } => self.destroy(name).map(|()| Down::Removed(name)),
            UpPlan::Env { name, .. } => self.stop(name).map(|i| Down::Stopped(i.name)),
            UpPlan::VerifyProduction => unreachable!("guarded above"),
        };
        match result {
            Err(Error::NotFound { .. }) => Ok(Down::Nothing),
            other => other,
        }
    }

    /// Whether what `up` manages is running and its database answers. Never changes anything.
    pub fn status(&self, config: &EnvironmentConfig) -> Result<StatusReport> {
        let db = &self.database;
        let mut checks = Vec::new();
        let name = match plan_up(config) {
            UpPlan::Env { name, .. } => name,
            UpPlan::VerifyProduction => {
                checks.push(Check::of(
                    "production database",
                    Answer::of_remote(db, &db.host, db.port),
                ));
                return Ok(StatusReport {
                    environment: self.profile,
                    env: None,
                    checks,
                });
            }
        };
        let layout = self.layout(name);
        let Some(state) = EnvState::load(&layout)
            .context(|| format!("cannot read the state of environment `{name}`"))?
        else {
            checks.push(Check {
                what: format!("environment `{name}`"),
                ok: false,
                detail: "does not exist; `cargo xtask db up` creates it".into(),
            });
            return Ok(StatusReport {
                environment: self.profile,
                env: None,
                checks,
            });
        };
        let backend = state.backend.backend();
        let info = self.info(&state, &layout);
        let running = info.status == Status::Running;
        checks.push(Check {
            what: backend.noun().into(),
            ok: running,
            detail: match backend.handle(&state).filter(|_| running) {
                Some(handle) => format!("running ({handle})"),
                None => format!("{}; `cargo xtask db up` starts it", info.status.as_str()),
            },
        });
        if running {
            checks.push(Check::of(
                &format!("database at {}:{}", state.host, state.port),
                backend.answers(self, &state, &layout),
            ));
        }
        Ok(StatusReport {
            environment: self.profile,
            env: Some(info),
            checks,
        })
    }
}

impl Check {
    fn of(what: &str, answer: Answer) -> Self {
        Check {
            what: what.into(),
            ok: answer.ok,
            detail: answer.detail,
        }
    }
}
