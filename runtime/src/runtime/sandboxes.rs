//! Pod sandboxes: run (the name reserved while the network is set up), stop, remove, and
//! the queries.

use std::path::Path;

use crate::journal::Change;
use crate::model::*;
use crate::net::ports;
use crate::podfiles;
use crate::{Error, Result};

use super::{RUNTIME_HANDLERS, Runtime, new_id, now_nanos};

impl Runtime {
    /// Creates a ready sandbox and returns its id.
    pub fn run_sandbox(&self, spec: SandboxSpec) -> Result<String> {
        if !RUNTIME_HANDLERS.contains(&spec.runtime_handler.as_str()) {
            return Err(Error::InvalidArgument(format!(
                "unknown runtime handler {:?}: wasmlet serves {:?}",
                spec.runtime_handler, RUNTIME_HANDLERS
            )));
        }
        let m = &spec.metadata;
        if m.name.is_empty() || m.namespace.is_empty() || m.uid.is_empty() {
            return Err(Error::InvalidArgument("pod sandbox metadata needs a name, a namespace and a uid".to_string()));
        }
        if !spec.log_directory.is_empty() && !Path::new(&spec.log_directory).is_absolute() {
            return Err(Error::InvalidArgument(format!(
                "pod sandbox {}: log directory {:?} is not absolute",
                m.name, spec.log_directory
            )));
        }
        let name = m.reserved_name();
        let host_ports = ports::check(&name, &spec.port_mappings)?;
        if let Some(dns) = &spec.dns {
            podfiles::check_dns(&name, dns)?;
        }
        let id = new_id();
        {
            // The name is reserved while the network is set up without the state lock (CNI
            // plugins take tens of milliseconds; other calls go on meanwhile).
            let mut state = self.state();
            if let Some(existing) = state.sandbox_names.get(&name) {
                return Err(Error::AlreadyExists(format!(
                    "pod sandbox name {name:?} is reserved by sandbox {existing}; remove it first"
                )));
            }
            state.sandbox_names.insert(name.clone(), id.clone());
        }
        let unreserve = || {
            self.state().sandbox_names.remove(&name);
        };
        let net = match self.setup_network(&id, &name, &spec, &host_ports) {
            Ok(net) => net,
            Err(e) => {
                unreserve();
                return Err(e);
            }
        };
        let mut record =
            SandboxRecord { id, spec, state: SandboxState::Ready, created_at: now_nanos(), ip: String::new() };
        record.ip = net.ip.map(|ip| ip.to_string()).unwrap_or_default();
        let pod_dir = podfiles::pod_dir(&self.inner.root, &self.inner.run_dir, &record.id);
        if let Err(e) = podfiles::write_etc(&pod_dir, &record.spec.hostname, &record.ip, record.spec.dns.as_ref()) {
            podfiles::remove_pod_dir(&pod_dir);
            self.release_network(&record.id, net);
            unreserve();
            return Err(e);
        }
        let id = record.id.clone();
        let change = Change::Sandbox(Box::new(record.clone()));
        let mut state = self.state();
        state.sandboxes.insert(id.clone(), record);
        state.nets.insert(id.clone(), net);
        if let Err(e) = self.journal(&state, change) {
            state.sandboxes.remove(&id);
            state.sandbox_names.remove(&name);
            let net = state.nets.remove(&id);
            drop(state);
            if let Some(net) = net {
                self.release_network(&id, net);
            }
            podfiles::remove_pod_dir(&pod_dir);
            return Err(e);
        }
        tracing::info!(sandbox = %id, name = %name, "pod sandbox ready");
        Ok(id)
    }

    /// Stops every container of the sandbox at once, releases its network (namespace,
    /// address, host ports) and marks it not ready. Idempotent; a missing sandbox is not an
    /// error.
    pub async fn stop_sandbox(&self, id: &str) -> Result<()> {
        let ids = self.containers_of(id);
        for c in ids {
            self.stop_container(&c, 0).await?;
        }
        self.drop_network(id).await;
        let mut state = self.state();
        if let Some(sandbox) = state.sandboxes.get_mut(id)
            && sandbox.stop()
        {
            let change = Change::Sandbox(Box::new(sandbox.clone()));
            self.journal(&state, change)?;
            tracing::info!(sandbox = %id, "pod sandbox stopped");
        }
        Ok(())
    }

    /// Removes the sandbox with its containers (running ones are ended first). Idempotent.
    pub async fn remove_sandbox(&self, id: &str) -> Result<()> {
        for c in self.containers_of(id) {
            self.remove_container(&c).await?;
        }
        self.drop_network(id).await;
        let mut state = self.state();
        if let Some(sandbox) = state.sandboxes.remove(id) {
            podfiles::remove_pod_dir(&podfiles::pod_dir(&self.inner.root, &self.inner.run_dir, id));
            state.sandbox_names.remove(&sandbox.spec.metadata.reserved_name());
            self.journal(&state, Change::SandboxRemoved(id.to_string()))?;
            tracing::info!(sandbox = %id, "pod sandbox removed");
        }
        Ok(())
    }

    pub(super) fn containers_of(&self, sandbox_id: &str) -> Vec<String> {
        let state = self.state();
        state.containers.values().filter(|e| e.record.sandbox_id == sandbox_id).map(|e| e.record.id.clone()).collect()
    }

    /// One sandbox.
    /// A path to the sandbox's network namespace that `setns` accepts, for clients (probes,
    /// port-forward) that must reach the pod from inside; None on the host's network.
    pub fn netns_path(&self, id: &str) -> Option<String> {
        let state = self.state();
        Some(state.nets.get(id)?.ns.as_ref()?.path())
    }

    pub fn sandbox(&self, id: &str) -> Result<SandboxRecord> {
        self.state().sandboxes.get(id).cloned().ok_or_else(|| Error::sandbox_not_found(id))
    }

    /// Every sandbox.
    pub fn sandboxes(&self) -> Vec<SandboxRecord> {
        self.sandboxes_where(|_| true)
    }

    /// The sandboxes `keep` accepts, filtered before they are copied: a kubelet lists one
    /// pod's sandboxes among thousands, many times a second.
    pub fn sandboxes_where(&self, keep: impl Fn(&SandboxRecord) -> bool) -> Vec<SandboxRecord> {
        self.state().sandboxes.values().filter(|s| keep(s)).cloned().collect()
    }

    /// The pod CIDR the kubelet last gave (UpdateRuntimeConfig).
    pub fn set_pod_cidr(&self, cidr: String) {
        tracing::info!(%cidr, "pod CIDR updated");
        *self.inner.pod_cidr.lock().unwrap_or_else(|e| e.into_inner()) = cidr;
    }
}
