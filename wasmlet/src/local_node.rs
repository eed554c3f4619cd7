//! The runtime and the kubelet side in one process: the runtime serves CRI on a socket of its
//! own, and the pod workers drive it through that socket as they would a remote runtime.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result};
use wasmlet_kubelet::cri::Cri;
use wasmlet_kubelet::dns::{NodeDns, parse_resolv_conf};
use wasmlet_kubelet::events::Recorder;
use wasmlet_kubelet::quantity::Quantity;
use wasmlet_kubelet::worker::{self, Node};

/// Who the node is, as its pods see it.
pub struct Identity {
    pub node_name: String,
    pub host_ip: String,
    pub cluster_dns: Vec<String>,
    pub cluster_domain: String,
}

impl Identity {
    /// The machine's own name, loopback as its address, no cluster DNS (`wasmlet run`).
    pub fn local() -> Identity {
        Identity {
            node_name: hostname(),
            host_ip: "127.0.0.1".into(),
            cluster_dns: Vec::new(),
            cluster_domain: "cluster.local".into(),
        }
    }
}

/// The kernel's host name.
pub fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default().trim().to_string()
}

/// A runtime serving CRI on a socket of its own inside this process, and the node context
/// of the pod workers that drive it through that socket. The runtime (its CRI server and the
/// guests) runs on threads of its own ("wasmlet-runtime"), apart from the pod workers and
/// probes, as a kubelet and its runtime are apart: neither starves the other, and the CPU
/// each side spends can be told apart.
pub struct LocalNode {
    pub node: Arc<Node>,
    /// The in-process CRI socket.
    pub socket: PathBuf,
    /// The runtime's Service table (`wasmlet node` keeps it current from the cluster).
    pub services: Arc<wasmlet_runtime::net::services::ServiceTable>,
    stop_server: tokio::sync::oneshot::Sender<()>,
    server: tokio::task::JoinHandle<std::io::Result<()>>,
    threads: tokio::runtime::Runtime,
}

impl LocalNode {
    /// Rotates the containers' logs by `policy` until the task is aborted.
    pub async fn log_rotation(
        &self,
        policy: wasmlet_kubelet::logrotate::Policy,
    ) -> Result<tokio::task::JoinHandle<()>> {
        let channel = cri_proto::connect_unix(&self.socket).await.context("connect the log rotation to the CRI")?;
        Ok(tokio::spawn(wasmlet_kubelet::logrotate::run(Cri::new(channel), policy)))
    }

    pub async fn start(
        root: &Path,
        run_dir: &Path,
        options: wasmlet_runtime::RuntimeOptions,
        identity: Identity,
        events: Arc<dyn Recorder>,
        objects: Arc<dyn worker::Objects>,
    ) -> Result<LocalNode> {
        let threads = tokio::runtime::Builder::new_multi_thread()
            .thread_name("wasmlet-runtime")
            .enable_all()
            .build()
            .context("start the runtime's threads")?;
        let runtime = {
            let root = root.to_path_buf();
            threads.spawn_blocking(move || wasmlet_runtime::Runtime::open_with(root, options)).await??
        };
        let services = runtime.services();
        std::fs::create_dir_all(run_dir).with_context(|| format!("create {}", run_dir.display()))?;
        let socket = run_dir.join(format!("kubelet-{}.sock", std::process::id()));
        let (stop_server, stopped) = tokio::sync::oneshot::channel::<()>();
        // Bound on the runtime's threads: the listener belongs to their I/O driver.
        let listener = {
            let socket = socket.clone();
            threads.spawn(async move { wasmlet_runtime::server::bind(&socket).await }).await?
        }
        .with_context(|| format!("bind {}", socket.display()))?;
        let server = threads.spawn(wasmlet_runtime::server::serve(runtime, listener, async {
            let _ = stopped.await;
        }));
        let channel = cri_proto::connect_unix(&socket).await.context("connect to the in-process CRI server")?;
        let host_resolv = std::fs::read_to_string("/etc/resolv.conf").unwrap_or_default();
        let node = Arc::new(Node {
            cri: Arc::new(Cri::new(channel)),
            root: root.join("kubelet"),
            node_name: identity.node_name,
            host_ip: identity.host_ip,
            events,
            objects,
            dns: NodeDns {
                cluster_dns: identity.cluster_dns,
                cluster_domain: identity.cluster_domain,
                host: parse_resolv_conf(&host_resolv),
            },
            allocatable_cpu: Quantity::from_units(std::thread::available_parallelism().map_or(1, |n| n.get()) as i128),
            allocatable_memory: Quantity::from_units(wasmlet_kubelet::node::memory_total().unwrap_or(1 << 30) as i128),
            runtime_events: tokio::sync::broadcast::channel(1024).0,
            pulls: worker::Puller::default(),
            memory_root: memory_root(run_dir),
        });
        Ok(LocalNode { node, socket, services, stop_server, server, threads })
    }

    /// Removes the pods a previous run left behind (killed before it could clean up): for
    /// `wasmlet run` and static pods, whose runtime is this process's alone, every pod
    /// sandbox in it is a leftover.
    pub async fn collect_leftovers(&self) {
        let Ok(list) = self.node.cri.sandboxes(None).await else { return };
        for s in list {
            let name = s.metadata.as_ref().map(|m| m.name.clone()).unwrap_or_default();
            tracing::info!(sandbox = %s.id, pod = %name, "removing a pod left by an earlier run");
            let _ = self.node.cri.stop_sandbox(&s.id).await;
            let _ = self.node.cri.remove_sandbox(&s.id).await;
        }
    }

    /// Stops the CRI server and removes its socket.
    pub async fn stop(self) {
        let _ = self.stop_server.send(());
        let _ = self.server.await;
        let _ = std::fs::remove_file(&self.socket);
        // Gone if empty: each pod removed its own.
        let _ = std::fs::remove_dir(&self.node.memory_root);
        // (A runtime may not be dropped from async code, where this is called.)
        self.threads.shutdown_background();
    }
}

/// A directory on a tmpfs for memory-backed emptyDirs: in the run directory when that is a
/// tmpfs (the default one is, in /dev/shm), else in /dev/shm under a name of its own.
fn memory_root(run_dir: &Path) -> PathBuf {
    const TMPFS_MAGIC: i64 = 0x0102_1994;
    let tmpfs = rustix::fs::statfs(run_dir).is_ok_and(|s| s.f_type == TMPFS_MAGIC);
    if tmpfs {
        run_dir.join("kubelet-memory")
    } else {
        let key = wasmlet_images::sha256_digest(run_dir.display().to_string().as_bytes());
        PathBuf::from(format!("/dev/shm/wasmlet-memory-{}", &key[7..23]))
    }
}
