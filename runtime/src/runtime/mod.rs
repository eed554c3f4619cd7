//! The runtime proper: pod sandboxes and wasm containers, their state on disk, and the
//! operations the CRI asks for, in the runtime's own terms.
//!
//! On disk, under the root: `images/` (the image store), `compiled/` (the compiled-code cache)
//! and `state.journal` (every sandbox and container record change, see [`crate::journal`]).
//! Every change is in the journal before the call that made it returns, so a `kill -9` loses
//! nothing a client was told about.
//!
//! By job: sandboxes.rs, network.rs (a sandbox's network), containers.rs, exec.rs, images.rs
//! (pulls and compiled code), spec.rs (a record as a guest sees it). Work that blocks (network
//! set-up and CNI, loading compiled code, binding inside a namespace) runs off the executor
//! and without the state lock; the lock guards only the records.

use std::collections::HashMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{SystemTime, UNIX_EPOCH};

use tokio::sync::{broadcast, oneshot, watch};
use wasmlet_images::{ImageRecord, ImageStore, RegistryHosts};

use crate::engine::{GuestMeter, GuestNet, Program, WasmEngine};
use crate::journal::{Change, Journal, Snapshot};
use crate::logs::LogFile;
use crate::model::*;
use crate::net::{Cidr, Ipam, NetNs, NetworkMode, NetworkOptions};
use crate::{Error, Result};

mod attach;
mod containers;
mod exec;
mod images;
mod network;
mod sandboxes;
mod spec;

/// Runtime handler names wasmlet answers to; "" is the default.
pub const RUNTIME_HANDLERS: [&str; 2] = ["", "wasmlet"];

/// The most ExecSync returns of each of stdout and stderr (as the CRI asks).
pub const EXEC_OUTPUT_LIMIT: usize = 16 * 1024 * 1024;

/// A change to a container, for GetContainerEvents.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    /// The container.
    pub container_id: String,
    /// Its sandbox.
    pub sandbox_id: String,
    /// What happened.
    pub kind: EventKind,
    /// When, in nanoseconds since the epoch.
    pub at: i64,
}

/// What happened to a container.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventKind {
    Created,
    Started,
    Stopped,
    Deleted,
}

/// Resource use of one container at one moment.
#[derive(Debug, Clone, Default)]
pub struct Usage {
    /// When it was read.
    pub timestamp: i64,
    /// Cumulative CPU time.
    pub cpu_nanos: u64,
    /// CPU use over the last second or so (the same for every reader), in nanoseconds per
    /// second; None on the first reading.
    pub nano_cores: Option<u64>,
    /// Memory held: wasm memory currently allocated and the bytes queued in its sockets.
    pub memory_bytes: u64,
    /// The memory limit, if any.
    pub memory_limit: Option<u64>,
}

/// What ExecSync returns.
#[derive(Debug, Clone, Default)]
pub struct ExecOutput {
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
    pub exit_code: i32,
}

type PullResult = std::result::Result<ImageRecord, Arc<Error>>;

/// Settings of a runtime that are not state.
#[derive(Debug, Clone, Default)]
pub struct RuntimeOptions {
    /// Mirrors and plain-HTTP registries (loopback registries are always plain HTTP).
    pub registries: RegistryHosts,
    /// How pods get their network.
    pub network: NetworkOptions,
    /// Where per-pod scratch files go (`/etc` files, namespace pins); None: [`default_run_dir`].
    pub run_dir: Option<PathBuf>,
    /// Where the streaming server (exec, attach, port-forward URLs) listens; None: a free port
    /// on 127.0.0.1.
    pub stream_address: Option<std::net::SocketAddr>,
    /// The bytes a container's log file may hold between rotations; past it the guest's
    /// output waits until the kubelet rotates the file (ReopenContainerLog). None: no bound,
    /// for a kubelet whose rotation size the runtime does not know.
    pub log_bound: Option<u64>,
    /// Pooling-allocator slots (instances that can run at once); None: [`crate::engine::POOL_SLOTS`].
    pub instance_slots: Option<u32>,
}

/// A directory on tmpfs for `root`'s per-pod scratch files when `/dev/shm` is there (creating
/// files costs microseconds there, up to 350 us each on a well-used ext4), else `<root>/run`.
/// It outlives the process, not the machine, as the pods' namespaces do.
pub fn default_run_dir(root: &Path) -> PathBuf {
    default_run_dir_for(root, rustix::process::geteuid().as_raw())
}

/// [`default_run_dir`] of a wasmlet running as `uid`.
pub fn default_run_dir_for(root: &Path, uid: u32) -> PathBuf {
    let shm = Path::new("/dev/shm");
    if shm.is_dir() {
        let key = wasmlet_images::sha256_digest(root.display().to_string().as_bytes());
        return shm.join(format!("wasmlet-{uid}-{}", &key[7..23]));
    }
    root.join("run")
}

/// The runtime. Cheap to clone; all clones share one state.
#[derive(Clone)]
pub struct Runtime {
    inner: Arc<Inner>,
}

struct Inner {
    root: PathBuf,
    /// Per-pod scratch files (see [`default_run_dir`]).
    run_dir: PathBuf,
    options: RuntimeOptions,
    /// Pulls in flight by normalized reference: later callers wait for the first one's result.
    pulls: Mutex<HashMap<String, watch::Receiver<Option<PullResult>>>>,
    journal: Journal,
    images: ImageStore,
    engine: WasmEngine,
    state: Mutex<State>,
    events: broadcast::Sender<Event>,
    pod_cidr: Mutex<String>,
    /// Namespaces made ahead (rootless mode, when namespaces can be made at all).
    netns_pool: Option<crate::net::Pool>,
    /// Why pods cannot get a network, if they cannot (NetworkReady is false then).
    network_error: Option<String>,
    /// The CNI network (cni mode).
    cni: Option<crate::net::cni::CniNetwork>,
    /// The node's bridge (bridge mode).
    bridge: Option<crate::net::bridge::Bridge>,
    /// The pasta command rootless pods go out through (rootless mode, when found).
    pasta: Option<PathBuf>,
    /// The pod range parsed (bridge and rootless modes, where wasmlet hands out addresses).
    cidr: Option<Cidr>,
    /// The cluster's Service ports, which guests' connections to ClusterIPs go through.
    services: Arc<crate::net::services::ServiceTable>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        // The scratch directory lives on tmpfs, outside the root: leave none behind when no pod
        // needs it (remove_dir only removes empty directories).
        for dir in [self.run_dir.join("pods"), self.run_dir.join("netns"), self.run_dir.clone()] {
            let _ = fs::remove_dir(dir);
        }
    }
}

#[derive(Default)]
struct State {
    sandboxes: HashMap<String, SandboxRecord>,
    /// Reserved sandbox names -> sandbox id.
    sandbox_names: HashMap<String, String>,
    containers: HashMap<String, Entry>,
    /// The network of each ready sandbox.
    nets: HashMap<String, PodNet>,
    /// Pod addresses (bridge and rootless modes).
    ipam: Option<Ipam>,
}

impl State {
    /// The hostname a sandbox's containers see (empty if the sandbox is gone).
    fn hostname(&self, sandbox_id: &str) -> String {
        self.sandboxes.get(sandbox_id).map(|s| s.spec.hostname.clone()).unwrap_or_default()
    }

    /// Where the sockets of a sandbox's containers live.
    fn guest_net(&self, sandbox_id: &str) -> Result<GuestNet> {
        match self.nets.get(sandbox_id) {
            Some(PodNet { ns: Some(ns), .. }) => Ok(GuestNet::Pod(ns.clone())),
            Some(PodNet { ns: None, .. }) => Ok(GuestNet::Host),
            None => Err(Error::FailedPrecondition(format!(
                "pod sandbox {sandbox_id} has no network: it is not ready (stopped, or wasmlet restarted)"
            ))),
        }
    }
}

/// A ready sandbox's network: its namespace (None on the host's network), address and host
/// port forwarders.
struct PodNet {
    ns: Option<Arc<NetNs>>,
    /// The pod's way out in rootless mode.
    pasta: Option<crate::net::pasta::Pasta>,
    ip: Option<std::net::Ipv4Addr>,
    forwards: Vec<tokio::task::JoinHandle<()>>,
    /// Set up by CNI: who the pod is and the ADD result, for DEL.
    cni: Option<(crate::net::cni::PodIdentity, Option<serde_json::Value>)>,
}

struct Entry {
    record: ContainerRecord,
    meter: Arc<GuestMeter>,
    program: Option<Program>,
    live: Option<Live>,
    cpu_window: crate::cpu::CpuWindow,
}

/// A running guest: how to end it and how to learn it has ended.
struct Live {
    kill: Option<oneshot::Sender<ExitStatus>>,
    /// Set when a stop is requested: guests that can wind down (wasi:http servers) do.
    stop: watch::Sender<bool>,
    done: watch::Receiver<bool>,
    log: Option<Arc<LogFile>>,
    attach: attach::Attachable,
}

impl Runtime {
    /// Opens the runtime on `root`, loading every sandbox and container stored there.
    /// Containers that were running when the last process died are recorded as exited.
    pub fn open(root: impl Into<PathBuf>) -> Result<Runtime> {
        Runtime::open_with(root, RuntimeOptions::default())
    }

    /// Like [`Runtime::open`], with options.
    pub fn open_with(root: impl Into<PathBuf>, mut options: RuntimeOptions) -> Result<Runtime> {
        options.network.mode = options.network.mode.resolve();
        let root = root.into();
        fs::create_dir_all(&root).map_err(|e| Error::Internal(format!("create {}: {e}", root.display())))?;
        let images = ImageStore::open(root.join("images"))?;
        let slots = options.instance_slots.unwrap_or(crate::engine::POOL_SLOTS);
        let engine = WasmEngine::with_slots(root.join("compiled"), slots).map_err(Error::Internal)?;
        let (journal, snapshot) = Journal::open(&root.join("state.journal"))?;
        let (events, _) = broadcast::channel(1024);
        let mut state = State::default();
        // One namespace now tells whether this process may make them at all.
        let namespaces = || match NetNs::create(&[]) {
            Ok(_) => Ok(crate::net::Pool::new(2)),
            Err(e) => Err(format!(
                "cannot create network namespaces ({e}): run wasmlet as root, or as a user allowed to \
                 create user namespaces, or set [network] mode = \"host\""
            )),
        };
        let mut cni = None;
        let mut bridge = None;
        let mut pasta = None;
        let mut pod_range = None;
        let setup = match options.network.mode {
            NetworkMode::Host => Ok(None),
            NetworkMode::Bridge => {
                let cidr = Cidr::parse(&options.network.pod_cidr).map_err(Error::InvalidArgument)?;
                state.ipam = Some(Ipam::new(cidr));
                pod_range = Some(cidr);
                let name = &options.network.bridge;
                crate::net::bridge::Bridge::setup(name, cidr, options.network.masquerade)
                    .map_err(|e| format!("set up bridge {name} for the pods: {e} (bridge mode needs root)"))
                    .and_then(|b| {
                        let masquerade = options.network.masquerade;
                        tracing::info!(bridge = %name, gateway = %b.gateway(), masquerade, "pod bridge");
                        bridge = Some(b);
                        namespaces().map(Some)
                    })
            }
            NetworkMode::Auto | NetworkMode::Rootless => {
                let cidr = Cidr::parse(&options.network.pod_cidr).map_err(Error::InvalidArgument)?;
                state.ipam = Some(Ipam::new(cidr));
                pod_range = Some(cidr);
                pasta = crate::net::pasta::find(&options.network.pasta);
                match &pasta {
                    Some(p) => tracing::info!(pasta = %p.display(), "rootless pods go out through pasta"),
                    None if options.network.pasta.is_empty() => {}
                    None => tracing::warn!(
                        pasta = %options.network.pasta,
                        "pasta not found: rootless pods have no way out (install Debian's passt, or set [network] pasta)"
                    ),
                }
                namespaces().map(Some)
            }
            NetworkMode::Cni => {
                let n = &options.network;
                crate::net::cni::CniNetwork::load(&n.cni_conf_dir, &n.cni_bin_dirs).and_then(|net| {
                    tracing::info!(network = %net.name, config = %net.source.display(), "CNI network");
                    cni = Some(net);
                    namespaces().map(Some)
                })
            }
        };
        let (netns_pool, network_error) = match setup {
            Ok(pool) => (pool, None),
            Err(why) => {
                tracing::error!("pod network not ready: {why}");
                (None, Some(why))
            }
        };
        let run_dir = options.run_dir.clone().unwrap_or_else(|| default_run_dir(&root));
        fs::create_dir_all(&run_dir).map_err(|e| Error::Internal(format!("create {}: {e}", run_dir.display())))?;
        let runtime = Runtime {
            inner: Arc::new(Inner {
                root,
                run_dir,
                options,
                pulls: Mutex::new(HashMap::new()),
                journal,
                images,
                engine,
                state: Mutex::new(state),
                events,
                pod_cidr: Mutex::new(String::new()),
                netns_pool,
                network_error,
                cni,
                bridge,
                pasta,
                cidr: pod_range,
                services: crate::net::services::ServiceTable::new(),
            }),
        };
        runtime.load(snapshot)?;
        Ok(runtime)
    }

    /// The Service table guests' connections go through; whoever watches the cluster's
    /// Services and EndpointSlices keeps it current.
    pub fn services(&self) -> Arc<crate::net::services::ServiceTable> {
        self.inner.services.clone()
    }

    /// The image store.
    pub fn images(&self) -> &ImageStore {
        &self.inner.images
    }

    /// Where state lives.
    pub fn root(&self) -> &Path {
        &self.inner.root
    }

    /// Where the streaming server listens.
    pub fn stream_address(&self) -> std::net::SocketAddr {
        self.inner.options.stream_address.unwrap_or_else(|| std::net::SocketAddr::from(([127, 0, 0, 1], 0)))
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.inner.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Writes a change to the journal. Called with the state lock held, after the change was
    /// made in `state`, so the journal's order is the state's order.
    fn journal(&self, state: &State, change: Change) -> Result<()> {
        let live = state.sandboxes.len() + state.containers.len();
        self.inner.journal.append(&change, live, || Snapshot {
            sandboxes: state.sandboxes.clone(),
            containers: state.containers.iter().map(|(id, e)| (id.clone(), e.record.clone())).collect(),
        })
    }

    fn emit(&self, rec: &ContainerRecord, kind: EventKind) {
        let _ = self.inner.events.send(Event {
            container_id: rec.id.clone(),
            sandbox_id: rec.sandbox_id.clone(),
            kind,
            at: now_nanos(),
        });
    }

    /// Container events from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<Event> {
        self.inner.events.subscribe()
    }

    fn load(&self, snapshot: Snapshot) -> Result<()> {
        let mut state = self.state();
        for mut sandbox in snapshot.sandboxes.into_values() {
            let id = sandbox.id.clone();
            state.sandbox_names.insert(sandbox.spec.metadata.reserved_name(), id.clone());
            // A namespace lives as long as the process holding it: the pod's network is gone.
            // Host-network sandboxes keep theirs.
            let ready = sandbox.state == SandboxState::Ready;
            let net = match ready {
                false => None,
                true if self.uses_host_network(&sandbox.spec) => {
                    Some(PodNet { ns: None, pasta: None, ip: None, forwards: Vec::new(), cni: None })
                }
                true => self.restore_network(&mut state, &sandbox),
            };
            let lost = ready && net.is_none() && sandbox.stop();
            if let Some(net) = net {
                state.nets.insert(id.clone(), net);
            }
            state.sandboxes.insert(id.clone(), sandbox.clone());
            if lost {
                tracing::warn!(sandbox = %id, "pod network was lost when wasmlet stopped; sandbox marked not ready");
                self.journal(&state, Change::Sandbox(Box::new(sandbox)))?;
            }
        }
        for mut record in snapshot.containers.into_values() {
            let lost = matches!(record.state, ContainerState::Running | ContainerState::Unknown);
            if lost {
                record.exit(now_nanos(), ExitStatus::lost());
                tracing::warn!(container = %record.id, "container was running when wasmlet stopped; marked exited");
            }
            let entry = Entry {
                record,
                meter: Arc::new(GuestMeter::default()),
                program: None,
                live: None,
                cpu_window: Default::default(),
            };
            let change = Change::Container(Box::new(entry.record.clone()));
            state.containers.insert(entry.record.id.clone(), entry);
            if lost {
                self.journal(&state, change)?;
            }
        }
        // Pins of sandboxes that are gone or no longer ready (removed while wasmlet was down, or
        // a crash between pinning and the journal).
        if let Ok(pins) = fs::read_dir(self.inner.run_dir.join("netns")) {
            for pin in pins.flatten() {
                let id = pin.file_name().to_string_lossy().into_owned();
                if !state.nets.contains_key(&id) {
                    NetNs::unpin(&pin.path());
                }
            }
        }
        tracing::info!(sandboxes = state.sandboxes.len(), containers = state.containers.len(), "loaded state");
        Ok(())
    }
}

fn new_id() -> String {
    hex::encode(rand::random::<[u8; 32]>())
}

/// Nanoseconds since the epoch.
pub fn now_nanos() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos() as i64).unwrap_or(1)
}
