//! The ssh-tunnel backend: the database runs elsewhere (the development VM) and what runs here is
//! the forwarder (`ssh`), recorded as the `vm` environment so that `list`, `url`, `env` and
//! the activate script work as for any other. Opened by `db up` in development with
//! `DB_VM_SSH_ENABLED=true`, never created by name.

mod ssh;

use std::path::PathBuf;

use nix::sys::signal::Signal;

use super::{
    Answer, Backend, BackendKind, CreateOptions, EnvState, Host, Started, Status, STOP_GRACE,
};
use crate::config::SslMode;
use crate::engine::{Credentials, Endpoint};
use crate::error::{Error, IoContext, Result};
use crate::layout::Layout;
use crate::remote;
use crate::sys::net;
use crate::sys::process::{ProcessId, ServiceUser};

pub use ssh::{TunnelError, TunnelSpec};

pub struct SshTunnel;

impl Backend for SshTunnel {
    fn kind(&self) -> BackendKind {
        BackendKind::SshTunnel
    }

    fn noun(&self) -> &'static str {
        "ssh tunnel"
    }

    fn create(
        &self,
        host: &dyn Host,
        opts: &CreateOptions,
        layout: &Layout,
        progress: &dyn Fn(&str),
    ) -> Result<EnvState> {
        let tunnel = Tunnel::configured(host)?;
        let port = net::free_port().context(|| "cannot find a free port on 127.0.0.1".into())?;
        layout
            .make()
            .context(|| format!("cannot create {}", layout.dir.display()))?;
        let mut state = EnvState::new(opts, net::LOOPBACK.to_string(), port);
        tunnel.open(host, &mut state, layout, progress)?;
        Ok(state)
    }

    /// Reopens the tunnel unless it runs with the configured settings and the database answers
    /// through it.
    fn start(
        &self,
        host: &dyn Host,
        state: &mut EnvState,
        layout: &Layout,
        progress: &dyn Fn(&str),
    ) -> Result<Started> {
        let tunnel = Tunnel::configured(host)?;
        if let Some(pid) = state.process.filter(ProcessId::is_alive) {
            let same = state.tunnel.as_ref() == Some(&tunnel.spec);
            if same && remote::check(host.database(), &state.host, state.port).is_ok() {
                return Ok(Started::Already);
            }
            progress(if same {
                "the tunnel no longer answers; reopening it"
            } else {
                "the tunnel settings changed; reopening it"
            });
            pid.stop(Signal::SIGTERM, STOP_GRACE);
        }
        state.process = None;
        if net::is_taken(state.port) {
            state.port =
                net::free_port().context(|| "cannot find a free port on 127.0.0.1".into())?;
        }
        tunnel.open(host, state, layout, progress)?;
        Ok(Started::Now)
    }

    fn stop(&self, _host: &dyn Host, state: &mut EnvState, layout: &Layout) -> Result<()> {
        if let Some(pid) = state.process.take() {
            pid.stop(Signal::SIGTERM, STOP_GRACE);
            state.store(layout)?;
        }
        Ok(())
    }

    fn status(&self, _host: &dyn Host, state: &EnvState) -> Status {
        state.status(ProcessId::is_alive)
    }

    fn teardown(&self, _host: &dyn Host, state: &EnvState, _layout: &Layout) -> Result<()> {
        if let Some(pid) = state.process {
            pid.stop(Signal::SIGTERM, STOP_GRACE);
        }
        Ok(())
    }

    /// The local end of the tunnel; there is no socket.
    fn endpoint(&self, state: &EnvState, _layout: &Layout) -> Endpoint {
        super::tcp_only(state)
    }

    /// Clients use TLS if the VM's server offers it.
    fn client_tls(&self) -> SslMode {
        SslMode::Prefer
    }

    /// The VM's database, checked with the configured login (and TLS when it offers it).
    fn answers(&self, host: &dyn Host, state: &EnvState, _layout: &Layout) -> Answer {
        Answer::of_remote(host.database(), &state.host, state.port)
    }
}

/// The tunnel the configuration asks for, and the ssh that makes it.
struct Tunnel {
    ssh: PathBuf,
    spec: TunnelSpec,
}

impl Tunnel {
    fn configured(host: &dyn Host) -> Result<Self> {
        let db = host.database();
        let Some(settings) = &db.ssh_tunnel else {
            return Err(Error::Unsupported(
                "this is an SSH tunnel environment, but DB_VM_SSH_ENABLED is not true in this configuration; enable it, or destroy the environment (`cargo xtask db destroy vm`)".into(),
            ));
        };
        let ssh = which::which("ssh").map_err(|e| Error::EngineMissing {
            engine: "ssh (the OpenSSH client)".into(),
            detail: e.to_string(),
            install: "apt-get install openssh-client (or your system's OpenSSH client package)"
                .into(),
        })?;
        Ok(Tunnel {
            ssh,
            spec: TunnelSpec::new(db, settings, host.root()),
        })
    }

    /// Starts ssh, records it, waits until the database answers through it, and writes the
    /// client files for the VM's login.
    fn open(
        &self,
        host: &dyn Host,
        state: &mut EnvState,
        layout: &Layout,
        progress: &dyn Fn(&str),
    ) -> Result<()> {
        progress(&format!(
            "opening an ssh tunnel 127.0.0.1:{} -> {}",
            state.port,
            self.spec.route()
        ));
        let starting = ssh::spawn(&self.ssh, &self.spec, state.port, layout)?;
        state.process = Some(starting.process);
        state.tunnel = Some(self.spec.clone());
        if let Err(e) = state.store(layout) {
            starting.process.stop(Signal::SIGTERM, STOP_GRACE);
            return Err(e);
        }
        let db = host.database();
        let report = match starting.wait(db) {
            Ok(report) => report,
            Err(e) => {
                state.process = None;
                let _ = state.store(layout);
                return Err(e.into());
            }
        };
        state.engine_version = report.version.clone();
        let creds = Credentials {
            user: db.user.clone(),
            password: db.password.clone(),
            database: db.name.clone(),
        };
        host.write_client_files(state, layout, &creds, &ServiceUser::invoker())
            .context(|| format!("cannot write the client files in {}", layout.dir.display()))?;
        state.store(layout)
    }
}
