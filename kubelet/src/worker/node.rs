//! What every pod worker on a node shares, and where a pod's files live.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;
use tokio::sync::broadcast;

use super::objects::Objects;
use super::pull::Puller;
use crate::cri::Runtime;
use crate::dns::NodeDns;
use crate::events::Recorder;
use crate::quantity::Quantity;

/// What every pod worker on a node shares.
pub struct Node {
    pub cri: Runtime,
    /// The kubelet's own directory: `pods/<uid>/` (volumes, hosts file, termination logs) and
    /// `logs/<ns>_<name>_<uid>/` (the CRI log directories).
    pub root: PathBuf,
    pub node_name: String,
    pub host_ip: String,
    pub events: Arc<dyn Recorder>,
    pub objects: Arc<dyn Objects>,
    pub dns: NodeDns,
    pub allocatable_cpu: Quantity,
    pub allocatable_memory: Quantity,
    /// Sandbox IDs of the runtime's container events (a worker wakes for its own).
    pub runtime_events: broadcast::Sender<String>,
    /// Image pulls: one at a time (serializeImagePulls), within the pull rate limit.
    pub pulls: Puller,
    /// A directory on a tmpfs, for the pods' `medium: Memory` emptyDirs.
    pub memory_root: PathBuf,
}

impl Node {
    /// Forwards the runtime's container events to the workers, reconnecting the stream if it
    /// ends.
    pub fn watch_runtime_events(self: &Arc<Self>) -> tokio::task::JoinHandle<()> {
        let node = self.clone();
        tokio::spawn(async move {
            loop {
                if let Ok(mut stream) = node.cri.sandbox_events().await {
                    use futures_util::StreamExt;
                    while let Some(id) = stream.next().await {
                        let _ = node.runtime_events.send(id);
                    }
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        })
    }

    pub fn logs_dir(&self, pod: &Pod) -> PathBuf {
        let m = &pod.metadata;
        self.root.join("logs").join(format!(
            "{}_{}_{}",
            m.namespace.as_deref().unwrap_or("default"),
            m.name.as_deref().unwrap_or_default(),
            m.uid.as_deref().unwrap_or_default()
        ))
    }

    pub fn pod_dir(&self, uid: &str) -> PathBuf {
        self.root.join("pods").join(uid)
    }

    /// Where a pod's `medium: Memory` emptyDirs live: on a tmpfs.
    pub fn memory_dir(&self, uid: &str) -> PathBuf {
        self.memory_root.join(uid)
    }
}
