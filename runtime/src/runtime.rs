//! The runtime proper: pod sandboxes and wasm containers, their state on disk, and the
//! operations the CRI asks for, in the runtime's own terms.
//!
//! On disk, under the root: `images/` (the image store), `compiled/` (the compiled-code cache)
//! and `state.journal` (every sandbox and container record change, see [`crate::journal`]).
//! Every change is in the journal before the call that made it returns, so a `kill -9` loses
//! nothing a client was told about.

use std::collections::HashMap;
use std::fs;
use std::path::{Component, Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::sync::{broadcast, oneshot, watch};
use wasmlet_images::{Auth, ImageRecord, ImageStore, Reference, RegistryHosts};

use crate::engine::{GuestMeter, GuestNet, GuestSpec, Outcome, Preopen, Program, WasmEngine};
use crate::journal::{Change, Journal, Snapshot};
use crate::logs::{GuestOutput, LogFile, Stream};
use crate::model::*;
use crate::net::dns::PodDns;
use crate::net::{Cidr, Ipam, NetNs, NetworkMode, NetworkOptions, ports};
use crate::podfiles;
use crate::{Error, Result};

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
    /// CPU use since the previous reading, in nanoseconds per second; None on the first one.
    pub nano_cores: Option<u64>,
    /// Wasm memory currently allocated.
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
    /// Pod addresses (rootless mode).
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
    last_sample: Option<(i64, u64)>,
}

/// A running guest: how to end it and how to learn it has ended.
struct Live {
    kill: Option<oneshot::Sender<ExitStatus>>,
    /// Set when a stop is requested: guests that can wind down (wasi:http servers) do.
    stop: watch::Sender<bool>,
    done: watch::Receiver<bool>,
    log: Option<Arc<LogFile>>,
}

impl Runtime {
    /// Opens the runtime on `root`, loading every sandbox and container stored there.
    /// Containers that were running when the last process died are recorded as exited.
    pub fn open(root: impl Into<PathBuf>) -> Result<Runtime> {
        Runtime::open_with(root, RuntimeOptions::default())
    }

    /// Like [`Runtime::open`], with options.
    pub fn open_with(root: impl Into<PathBuf>, options: RuntimeOptions) -> Result<Runtime> {
        let root = root.into();
        fs::create_dir_all(&root).map_err(|e| Error::Internal(format!("create {}: {e}", root.display())))?;
        let images = ImageStore::open(root.join("images"))?;
        let engine = WasmEngine::new(root.join("compiled")).map_err(Error::Internal)?;
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
        let setup = match options.network.mode {
            NetworkMode::Host => Ok(None),
            NetworkMode::Rootless => {
                let cidr = Cidr::parse(&options.network.pod_cidr).map_err(Error::InvalidArgument)?;
                state.ipam = Some(Ipam::new(cidr));
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
            }),
        };
        runtime.load(snapshot)?;
        Ok(runtime)
    }

    /// The image store.
    pub fn images(&self) -> &ImageStore {
        &self.inner.images
    }

    /// Where state lives.
    pub fn root(&self) -> &Path {
        &self.inner.root
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
                    Some(PodNet { ns: None, ip: None, forwards: Vec::new(), cni: None })
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
            let entry =
                Entry { record, meter: Arc::new(GuestMeter::default()), program: None, live: None, last_sample: None };
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

    // ---- sandboxes ------------------------------------------------------------------------

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

    /// Where a pod's DNS queries go out: from its own namespace when it has routes (cni mode),
    /// else from the host's, on wasmlet's behalf.
    fn dns_route(&self, net: &GuestNet) -> (tokio::runtime::Handle, Option<Arc<NetNs>>) {
        match (net, self.inner.options.network.mode) {
            (GuestNet::Pod(ns), NetworkMode::Cni) => (self.inner.engine.pod_handle(), Some(ns.clone())),
            _ => (self.inner.engine.host_handle(), None),
        }
    }

    /// Whether pods can get a network: Ok with a word on the mode, or Err with the reason.
    pub fn network_status(&self) -> std::result::Result<String, String> {
        match (&self.inner.network_error, self.inner.options.network.mode) {
            (Some(why), _) => Err(why.clone()),
            (None, NetworkMode::Rootless) => Ok(format!(
                "rootless: a network namespace per pod, addresses from {}",
                self.inner.options.network.pod_cidr
            )),
            (None, NetworkMode::Host) => Ok("host: every pod on the host's network".to_string()),
            (None, NetworkMode::Cni) => {
                Ok(format!("cni: network {}", self.inner.cni.as_ref().map(|c| c.name.as_str()).unwrap_or_default()))
            }
        }
    }

    fn uses_host_network(&self, spec: &SandboxSpec) -> bool {
        self.inner.options.network.mode == NetworkMode::Host || spec.network == NamespaceMode::Node
    }

    /// A network for a new sandbox: on the host's, or a namespace of its own with an address
    /// and its host ports bound (a port already taken fails here, with nothing kept).
    fn setup_network(&self, id: &str, name: &str, spec: &SandboxSpec, host_ports: &[PortMapping]) -> Result<PodNet> {
        if self.uses_host_network(spec) {
            return Ok(PodNet { ns: None, ip: None, forwards: Vec::new(), cni: None });
        }
        if let Some(why) = &self.inner.network_error {
            return Err(Error::FailedPrecondition(format!("pod sandbox {name}: the pod network is not ready: {why}")));
        }
        if let Some(cni) = &self.inner.cni {
            return self.setup_cni(cni, id, name, spec, host_ports);
        }
        let pool = self.inner.netns_pool.as_ref().expect("rootless mode has a pool");
        let ns =
            Arc::new(pool.take().map_err(|e| Error::Internal(format!("pod sandbox {name}: network namespace: {e}")))?);
        let ip = self.state().ipam.as_mut().expect("rootless mode has addresses").allocate().ok_or_else(|| {
            Error::FailedPrecondition(format!(
                "pod sandbox {name}: no pod address left in {}",
                self.inner.options.network.pod_cidr
            ))
        })?;
        let mut net = PodNet { ns: Some(ns.clone()), ip: Some(ip), forwards: Vec::new(), cni: None };
        let configured = ns.add_loopback_address(ip, 32);
        let started = configured
            .map_err(|e| Error::Internal(format!("pod sandbox {name}: give the pod its address {ip}: {e}")))
            .and_then(|()| self.forward_ports(&mut net, name, host_ports));
        if let Err(e) = started {
            self.release_network(id, net);
            return Err(e);
        }
        // Root only: without privilege a restart loses the pod's network and the sandbox is
        // reported not ready.
        if let Err(e) = self.pin_network(id, &ns) {
            tracing::debug!(sandbox = %id, error = %e, "network namespace not pinned (not root?)");
        }
        Ok(net)
    }

    /// A pod network from the CNI plugins: a namespace pinned where they can find it, then ADD.
    fn setup_cni(
        &self,
        cni: &crate::net::cni::CniNetwork,
        id: &str,
        name: &str,
        spec: &SandboxSpec,
        host_ports: &[PortMapping],
    ) -> Result<PodNet> {
        let not_ready = |what: String| Error::FailedPrecondition(format!("pod sandbox {name}: {what}"));
        let pool = self.inner.netns_pool.as_ref().expect("cni mode has a pool");
        let ns = Arc::new(pool.take().map_err(|e| not_ready(format!("network namespace: {e}")))?);
        let path = self.pin_network(id, &ns).map_err(|e| {
            not_ready(format!("pin the network namespace at {}: {e}", self.netns_pin_path(id).display()))
        })?;
        let pod = pod_identity(spec);
        let attached = match cni.add(id, &path, &pod) {
            Ok(a) => a,
            Err(e) => {
                // Whatever the chain did before it failed is undone.
                let _ = cni.del(id, &path, &pod, None);
                NetNs::unpin(&path);
                return Err(not_ready(e));
            }
        };
        tracing::info!(sandbox = %id, ip = %attached.ip, gateway = ?attached.gateway, "CNI ADD");
        let mut net = PodNet {
            ns: Some(ns),
            ip: Some(attached.ip),
            forwards: Vec::new(),
            cni: Some((pod, Some(attached.result))),
        };
        if let Err(e) = self.forward_ports(&mut net, name, host_ports) {
            self.release_network(id, net);
            return Err(e);
        }
        Ok(net)
    }

    /// Binds the sandbox's host ports and forwards them into its namespace.
    fn forward_ports(&self, net: &mut PodNet, name: &str, host_ports: &[PortMapping]) -> Result<()> {
        let (Some(ns), Some(ip)) = (&net.ns, net.ip) else { return Ok(()) };
        for (m, socket) in ports::bind(name, host_ports)? {
            let target = std::net::SocketAddr::new(ip.into(), m.container_port as u16);
            let task = match socket {
                ports::Bound::Tcp(l) => self.inner.engine.spawn(ports::forward(ns.clone(), l, target)),
                ports::Bound::Udp(u) => self.inner.engine.spawn(ports::forward_udp(ns.clone(), u, target)),
            };
            net.forwards.push(task);
        }
        Ok(())
    }

    fn netns_pin_path(&self, sandbox_id: &str) -> PathBuf {
        self.inner.run_dir.join("netns").join(sandbox_id)
    }

    /// Pins the namespace so it outlives this process (a bind mount: root only); returns where.
    fn pin_network(&self, sandbox_id: &str, ns: &NetNs) -> std::io::Result<PathBuf> {
        let path = self.netns_pin_path(sandbox_id);
        fs::create_dir_all(self.inner.run_dir.join("netns"))?;
        ns.pin(&path)?;
        Ok(path)
    }

    /// The network of a ready sandbox loaded from the journal: its pinned namespace, address
    /// and host ports again; None if the namespace did not survive.
    fn restore_network(&self, state: &mut State, sandbox: &SandboxRecord) -> Option<PodNet> {
        let ns = NetNs::open_pinned(&self.netns_pin_path(&sandbox.id)).ok().flatten()?;
        let ip: std::net::Ipv4Addr = sandbox.ip.parse().ok()?;
        if let Some(ipam) = state.ipam.as_mut() {
            ipam.reserve(ip);
        }
        let cni = self.inner.cni.as_ref().map(|_| (pod_identity(&sandbox.spec), None));
        let mut net = PodNet { ns: Some(Arc::new(ns)), ip: Some(ip), forwards: Vec::new(), cni };
        let name = sandbox.spec.metadata.reserved_name();
        let host_ports = ports::check(&name, &sandbox.spec.port_mappings).unwrap_or_default();
        if let Err(e) = self.forward_ports(&mut net, &name, &host_ports) {
            tracing::error!(sandbox = %sandbox.id, error = %e, "host ports of a restored pod");
        }
        Some(net)
    }

    /// Gives a sandbox's address back and stops its forwarders (their listeners close when
    /// the tasks are dropped; [`Runtime::stop_sandbox`] waits for that).
    /// Call without the state lock: CNI DEL takes a while.
    fn release_network(&self, sandbox_id: &str, net: PodNet) -> Vec<tokio::task::JoinHandle<()>> {
        if let (Some(ip), Some(ipam)) = (net.ip, self.state().ipam.as_mut()) {
            ipam.release(ip);
        }
        if let (Some((pod, result)), Some(cni)) = (&net.cni, &self.inner.cni) {
            let path = self.netns_pin_path(sandbox_id);
            match cni.del(sandbox_id, &path, pod, result.as_ref()) {
                Ok(()) => tracing::info!(sandbox = %sandbox_id, "CNI DEL"),
                Err(e) => tracing::error!(sandbox = %sandbox_id, error = %e, "CNI DEL"),
            }
        }
        if net.ns.is_some() {
            NetNs::unpin(&self.netns_pin_path(sandbox_id));
        }
        for f in &net.forwards {
            f.abort();
        }
        net.forwards
    }

    /// Releases a sandbox's network, if it has one, and returns once its host ports are free.
    async fn drop_network(&self, id: &str) {
        let net = self.state().nets.remove(id);
        let forwards = match net {
            Some(net) => self.release_network(id, net),
            None => Vec::new(),
        };
        // Aborted: awaiting them waits until their listeners are closed.
        for f in forwards {
            let _ = f.await;
        }
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

    fn containers_of(&self, sandbox_id: &str) -> Vec<String> {
        let state = self.state();
        state.containers.values().filter(|e| e.record.sandbox_id == sandbox_id).map(|e| e.record.id.clone()).collect()
    }

    /// One sandbox.
    /// A path to the sandbox's network namespace that `setns` accepts, for clients (probes,
    /// port-forward) that must reach the pod from inside; None on the host's network.
    pub fn netns_path(&self, id: &str) -> Option<String> {
        let state = self.state();
        let ns = state.nets.get(id)?.ns.as_ref()?;
        let pinned = self.netns_pin_path(id);
        Some(if pinned.exists() { pinned.display().to_string() } else { ns.proc_path() })
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

    // ---- containers -----------------------------------------------------------------------

    /// Creates a container in a ready sandbox: resolves its image, checks its log path and
    /// mounts, and has its code compiled (or found in the cache) so the start is quick.
    pub async fn create_container(&self, sandbox_id: &str, spec: ContainerSpec) -> Result<String> {
        let sandbox = self.sandbox(sandbox_id)?;
        if sandbox.state != SandboxState::Ready {
            return Err(Error::FailedPrecondition(format!(
                "pod sandbox {sandbox_id} is not ready: containers cannot be created in it"
            )));
        }
        let name = &spec.metadata.name;
        if name.is_empty() {
            return Err(Error::InvalidArgument("container metadata needs a name".to_string()));
        }
        let image = self.find_image(&spec.image.image)?;
        let log_file = log_file(&sandbox.spec, &spec)?;
        let id = new_id();
        let pod_dir = podfiles::pod_dir(&self.inner.root, &self.inner.run_dir, sandbox_id);
        let files = file_mounts(&spec)?;
        let etc =
            image.run.as_ref().map(|r| self.inner.images.root().join(&r.rootfs).join("etc")).filter(|e| e.is_dir());
        if !files.is_empty() || etc.is_some() {
            podfiles::place_file_mounts(&pod_dir.files.join(&id), &pod_dir.etc, etc.as_deref(), &files)?;
        }
        // Compiling (or loading from disk) blocks: off the executor, unless already in memory.
        let program = match self.inner.engine.cached_program(&image.wasm_digest) {
            Some(p) => p,
            None => {
                let rt = self.clone();
                let image = image.clone();
                tokio::task::spawn_blocking(move || rt.program_for(&image))
                    .await
                    .map_err(|e| Error::Internal(format!("compile task: {e}")))??
            }
        };
        let mut state = self.state();
        if !state.sandboxes.contains_key(sandbox_id) {
            return Err(Error::sandbox_not_found(sandbox_id));
        }
        let taken = state.containers.values().any(|e| {
            e.record.sandbox_id == sandbox_id
                && e.record.spec.metadata.name == spec.metadata.name
                && e.record.spec.metadata.attempt == spec.metadata.attempt
        });
        if taken {
            return Err(Error::AlreadyExists(format!(
                "container {name:?} attempt {} already exists in pod sandbox {sandbox_id}",
                spec.metadata.attempt
            )));
        }
        let record = ContainerRecord {
            id,
            sandbox_id: sandbox_id.to_string(),
            image_ref: image.repo_digests.first().cloned().unwrap_or_else(|| image.id.clone()),
            image_id: image.id.clone(),
            image_name: image.repo_tags.first().cloned().unwrap_or_else(|| spec.image.image.clone()),
            wasm_digest: image.wasm_digest.clone(),
            kind: image.kind,
            image_run: image.run.clone().map(|mut r| {
                r.rootfs = self.inner.images.root().join(&r.rootfs).display().to_string();
                r
            }),
            spec,
            log_file,
            state: ContainerState::Created,
            created_at: now_nanos(),
            started_at: 0,
            finished_at: 0,
            exit: None,
        };
        let id = record.id.clone();
        let meter = Arc::new(GuestMeter::default());
        if let Some(limit) = record.spec.resources.as_ref().map(|r| r.memory_limit_in_bytes).filter(|l| *l > 0) {
            meter.memory_limit.store(limit as u64, Ordering::Relaxed);
        }
        let change = Change::Container(Box::new(record.clone()));
        state
            .containers
            .insert(id.clone(), Entry { record, meter, program: Some(program), live: None, last_sample: None });
        if let Err(e) = self.journal(&state, change) {
            state.containers.remove(&id);
            return Err(e);
        }
        let record = &state.containers[&id].record;
        tracing::info!(container = %id, sandbox = %sandbox_id, name = %record.spec.metadata.name, "container created");
        self.emit(record, EventKind::Created);
        Ok(id)
    }

    fn find_image(&self, image: &str) -> Result<ImageRecord> {
        if image.is_empty() {
            return Err(Error::InvalidArgument("container config names no image".to_string()));
        }
        self.inner.images.resolve(image)?.ok_or_else(|| Error::NotFound { kind: "image", id: image.to_string() })
    }

    fn program_for(&self, image: &ImageRecord) -> Result<Program> {
        let what = image.repo_tags.first().unwrap_or(&image.id);
        self.inner
            .engine
            .program(what, &image.wasm_digest, image.kind, || self.inner.images.read_blob(&image.wasm_digest))
    }

    /// Starts a created container.
    pub fn start_container(&self, id: &str) -> Result<()> {
        let mut state = self.state();
        let (hostname, net) = {
            let entry = state.containers.get(id).ok_or_else(|| Error::container_not_found(id))?;
            (state.hostname(&entry.record.sandbox_id), state.guest_net(&entry.record.sandbox_id))
        };
        let entry = state.containers.get_mut(id).ok_or_else(|| Error::container_not_found(id))?;
        entry.record.start(now_nanos())?;
        let prepared =
            net.and_then(|net| self.prepare_start(entry, &hostname, net)).and_then(|(program, mut spec, log)| {
                if matches!(program, Program::Http(_)) {
                    spec.http_listener = crate::http::bind(&spec)?;
                }
                Ok((program, spec, log))
            });
        let (program, spec, log) = match prepared {
            Ok(p) => p,
            Err(e) => {
                let status = ExitStatus {
                    code: START_ERROR_EXIT_CODE,
                    reason: "StartError".to_string(),
                    message: e.to_string(),
                };
                entry.record.exit(now_nanos(), status);
                let record = entry.record.clone();
                self.journal(&state, Change::Container(Box::new(record.clone())))?;
                self.emit(&record, EventKind::Stopped);
                return Err(e);
            }
        };
        let meter = entry.meter.clone();
        let record = entry.record.clone();
        if let Err(e) = self.journal(&state, Change::Container(Box::new(record.clone()))) {
            if let Some(entry) = state.containers.get_mut(id) {
                entry.record.exit(now_nanos(), ExitStatus::from_outcome(&Outcome::StartFailed(e.to_string())));
            }
            return Err(e);
        }
        let (kill_tx, kill_rx) = oneshot::channel::<ExitStatus>();
        let (done_tx, done_rx) = watch::channel(false);
        let (stop_tx, stop_rx) = watch::channel(false);
        let mut spec = spec;
        spec.stop = Some(stop_rx);
        let (stdout, stderr) = (spec.stdout.clone(), spec.stderr.clone());
        let net = spec.net.clone();
        let guest = self.inner.engine.run(&program, spec, meter);
        let weak: Weak<Inner> = Arc::downgrade(&self.inner);
        let cid = id.to_string();
        self.inner.engine.spawn_for(&net, async move {
            let status = tokio::select! {
                outcome = guest => ExitStatus::from_outcome(&outcome),
                Ok(status) = kill_rx => status,
            };
            stdout.finish();
            stderr.finish();
            if let Some(inner) = weak.upgrade() {
                Runtime { inner }.record_exit(&cid, status);
            }
            let _ = done_tx.send(true);
        });
        if let Some(entry) = state.containers.get_mut(id) {
            entry.live = Some(Live { kill: Some(kill_tx), stop: stop_tx, done: done_rx, log });
        }
        tracing::info!(container = %id, "container started");
        self.emit(&record, EventKind::Started);
        Ok(())
    }

    /// Everything a start needs; an error here is a StartError.
    fn prepare_start(
        &self,
        entry: &mut Entry,
        hostname: &str,
        net: GuestNet,
    ) -> Result<(Program, GuestSpec, Option<Arc<LogFile>>)> {
        let rec = &entry.record;
        let program = match &entry.program {
            Some(p) => p.clone(),
            None => {
                // After a restart: the compiled-code cache has it, so this does not compile.
                let image = self.find_image(&rec.image_id)?;
                let p = self.program_for(&image)?;
                entry.program = Some(p.clone());
                p
            }
        };
        let log = match &rec.log_file {
            Some(path) => Some(Arc::new(
                LogFile::open(path)
                    .map_err(|e| Error::FailedPrecondition(format!("open log file {}: {e}", path.display())))?,
            )),
            None => None,
        };
        let output = |stream| match &log {
            Some(l) => GuestOutput::log(stream, l.clone()),
            None => GuestOutput::discard(stream),
        };
        let pod_dir = podfiles::pod_dir(&self.inner.root, &self.inner.run_dir, &rec.sandbox_id);
        let dns = self.dns_route(&net);
        let (stdout, stderr) = (output(Stream::Stdout), output(Stream::Stderr));
        let mut spec = guest_spec(rec, &pod_dir, &dns, hostname, net, stdout, stderr)?;
        if spec.args.is_empty() {
            spec.args.push(rec.spec.metadata.name.clone());
        }
        Ok((program, spec, log))
    }

    fn record_exit(&self, id: &str, status: ExitStatus) {
        let mut state = self.state();
        let Some(entry) = state.containers.get_mut(id) else { return };
        if let Some(live) = entry.live.as_mut() {
            live.kill = None;
        }
        tracing::info!(container = %id, code = status.code, reason = %status.reason, "container exited");
        if entry.record.exit(now_nanos(), status) {
            let record = entry.record.clone();
            if let Err(e) = self.journal(&state, Change::Container(Box::new(record.clone()))) {
                tracing::error!(container = %id, error = %e, "cannot record the exit");
            }
            self.emit(&record, EventKind::Stopped);
        }
    }

    /// Stops a running container: it has `timeout_secs` to end by itself, then it is killed
    /// (exit code 137). Stopping a container that is not running succeeds and changes nothing.
    pub async fn stop_container(&self, id: &str, timeout_secs: i64) -> Result<()> {
        // Wasm has no signals: a guest is like a process without a SIGTERM handler, which dies
        // at once on SIGTERM (143), unless it can observe the stop: a wasi:http handler drains,
        // a guest that listens on a socket has its stop signalled. Those get the timeout.
        let mut done = {
            let mut state = self.state();
            let entry = state.containers.get_mut(id).ok_or_else(|| Error::container_not_found(id))?;
            let observes =
                matches!(entry.program, Some(Program::Http(_))) || entry.meter.listening.load(Ordering::Relaxed);
            match &mut entry.live {
                Some(live) if entry.record.state == ContainerState::Running => {
                    live.stop.send_replace(true);
                    if !observes
                        && timeout_secs > 0
                        && let Some(kill) = live.kill.take()
                    {
                        let _ = kill.send(ExitStatus::terminated());
                    }
                    live.done.clone()
                }
                _ => return Ok(()),
            }
        };
        let grace = Duration::from_secs(timeout_secs.max(0) as u64);
        let ended = timeout_secs > 0 && tokio::time::timeout(grace, done.wait_for(|d| *d)).await.is_ok();
        if !ended {
            // Whichever stop runs out of time first kills; a shorter later stop is not held up
            // by a longer earlier one.
            let kill = self.state().containers.get_mut(id).and_then(|e| e.live.as_mut()).and_then(|l| l.kill.take());
            if let Some(kill) = kill {
                let _ = kill.send(ExitStatus::killed(timeout_secs.max(0)));
            }
            let _ = done.wait_for(|d| *d).await;
        }
        Ok(())
    }

    /// Removes a container, ending it first if it runs. Idempotent.
    pub async fn remove_container(&self, id: &str) -> Result<()> {
        match self.stop_container(id, 0).await {
            Err(Error::NotFound { .. }) => return Ok(()),
            other => other?,
        }
        let mut state = self.state();
        if let Some(entry) = state.containers.remove(id) {
            let files =
                podfiles::pod_dir(&self.inner.root, &self.inner.run_dir, &entry.record.sandbox_id).files.join(id);
            podfiles::remove_files(&files);
            self.journal(&state, Change::ContainerRemoved(id.to_string()))?;
            tracing::info!(container = %id, "container removed");
            self.emit(&entry.record, EventKind::Deleted);
        }
        Ok(())
    }

    /// One container.
    pub fn container(&self, id: &str) -> Result<ContainerRecord> {
        self.state().containers.get(id).map(|e| e.record.clone()).ok_or_else(|| Error::container_not_found(id))
    }

    /// Every container.
    pub fn containers(&self) -> Vec<ContainerRecord> {
        self.containers_where(|_| true)
    }

    /// The containers `keep` accepts, filtered before they are copied.
    pub fn containers_where(&self, keep: impl Fn(&ContainerRecord) -> bool) -> Vec<ContainerRecord> {
        self.state().containers.values().filter(|e| keep(&e.record)).map(|e| e.record.clone()).collect()
    }

    /// Resource use of a container now.
    pub fn usage(&self, id: &str) -> Result<Usage> {
        let mut state = self.state();
        let entry = state.containers.get_mut(id).ok_or_else(|| Error::container_not_found(id))?;
        let now = now_nanos();
        let cpu = entry.meter.cpu_nanos.load(Ordering::Relaxed);
        let nano_cores = entry.last_sample.and_then(|(t, c)| {
            let dt = (now - t) as u128;
            (dt > 0).then(|| ((cpu.saturating_sub(c)) as u128 * 1_000_000_000 / dt) as u64)
        });
        entry.last_sample = Some((now, cpu));
        let running = entry.record.state == ContainerState::Running;
        let limit = entry.meter.memory_limit.load(Ordering::Relaxed);
        Ok(Usage {
            timestamp: now,
            cpu_nanos: cpu,
            nano_cores,
            memory_bytes: if running { entry.meter.memory_bytes.load(Ordering::Relaxed) } else { 0 },
            memory_limit: (limit > 0).then_some(limit),
        })
    }

    /// Changes a container's resources; a new memory limit applies to the running guest's next
    /// memory growth.
    pub fn update_resources(&self, id: &str, resources: Resources) -> Result<()> {
        let mut state = self.state();
        let entry = state.containers.get_mut(id).ok_or_else(|| Error::container_not_found(id))?;
        if entry.record.state == ContainerState::Exited {
            return Err(Error::FailedPrecondition(format!("container {id} has exited: its resources cannot change")));
        }
        entry.meter.memory_limit.store(resources.memory_limit_in_bytes.max(0) as u64, Ordering::Relaxed);
        entry.record.spec.resources = Some(resources);
        let change = Change::Container(Box::new(entry.record.clone()));
        self.journal(&state, change)
    }

    /// Reopens a running container's log file after the kubelet rotated it.
    pub fn reopen_log(&self, id: &str) -> Result<()> {
        let state = self.state();
        let entry = state.containers.get(id).ok_or_else(|| Error::container_not_found(id))?;
        match (&entry.live, entry.record.state) {
            (Some(Live { log: Some(log), .. }), ContainerState::Running) => {
                log.reopen().map_err(|e| Error::Internal(format!("reopen log of container {id}: {e}")))
            }
            (_, ContainerState::Running) => Ok(()),
            _ => Err(Error::FailedPrecondition(format!("container {id} is not running: its log is closed"))),
        }
    }

    /// Runs `cmd` in a running container's context (its mounts, env and working directory)
    /// as a new instance, and returns its output. `cmd[0]` names a `.wasm` file the container
    /// can see, or else the container's own program runs with `argv = cmd`.
    pub async fn exec_sync(&self, id: &str, cmd: Vec<String>, timeout_secs: i64) -> Result<ExecOutput> {
        if cmd.is_empty() {
            return Err(Error::InvalidArgument(format!("exec in container {id}: empty command")));
        }
        let (record, program, hostname, net) = {
            let state = self.state();
            let entry = state.containers.get(id).ok_or_else(|| Error::container_not_found(id))?;
            if entry.record.state != ContainerState::Running {
                return Err(Error::FailedPrecondition(format!("container {id} is not running")));
            }
            let hostname = state.hostname(&entry.record.sandbox_id);
            let net = state.guest_net(&entry.record.sandbox_id)?;
            (entry.record.clone(), entry.program.clone(), hostname, net)
        };
        let stdout = GuestOutput::capture(Stream::Stdout, EXEC_OUTPUT_LIMIT);
        let stderr = GuestOutput::capture(Stream::Stderr, EXEC_OUTPUT_LIMIT);
        let pod_dir = podfiles::pod_dir(&self.inner.root, &self.inner.run_dir, &record.sandbox_id);
        let dns = self.dns_route(&net);
        let mut spec = guest_spec(&record, &pod_dir, &dns, &hostname, net.clone(), stdout.clone(), stderr.clone())?;
        spec.args = cmd.clone();
        let program = match wasm_in_container(&spec.preopens, &cmd[0]) {
            Some(path) => {
                let rt = self.clone();
                let what = format!("{} in container {id}", cmd[0]);
                tokio::task::spawn_blocking(move || rt.program_from_file(&what, &path))
                    .await
                    .map_err(|e| Error::Internal(format!("compile task: {e}")))??
            }
            None => program.ok_or_else(|| Error::Internal(format!("container {id} runs without a program")))?,
        };
        if matches!(program, Program::Http(_)) {
            return Err(Error::InvalidArgument(format!(
                "exec in container {id}: a wasi:http handler is not a command; name a .wasm file the \
                 container can see"
            )));
        }
        let meter = Arc::new(GuestMeter::default());
        meter.memory_limit.store(
            record.spec.resources.as_ref().map_or(0, |r| r.memory_limit_in_bytes.max(0) as u64),
            Ordering::Relaxed,
        );
        let task = self.inner.engine.spawn_for(&net, self.inner.engine.run(&program, spec, meter));
        let abort = task.abort_handle();
        let outcome = if timeout_secs > 0 {
            match tokio::time::timeout(Duration::from_secs(timeout_secs as u64), task).await {
                Ok(r) => r,
                Err(_) => {
                    abort.abort();
                    return Err(Error::DeadlineExceeded(format!(
                        "exec {:?} in container {id} timed out after {timeout_secs}s",
                        cmd[0]
                    )));
                }
            }
        } else {
            task.await
        }
        .map_err(|e| Error::Internal(format!("exec task: {e}")))?;
        let status = ExitStatus::from_outcome(&outcome);
        let mut err = stderr.captured();
        if !status.message.is_empty() {
            err.extend_from_slice(status.message.as_bytes());
            err.push(b'\n');
        }
        Ok(ExecOutput { stdout: stdout.captured(), stderr: err, exit_code: status.code })
    }

    fn program_from_file(&self, what: &str, path: &Path) -> Result<Program> {
        let bytes = fs::read(path).map_err(|e| Error::InvalidArgument(format!("{what}: {e}")))?;
        let kind = wasmlet_images::WasmKind::detect(what, &bytes)?;
        let digest = wasmlet_images::sha256_digest(&bytes);
        self.inner.engine.program(what, &digest, kind, || Ok(bytes))
    }

    /// Pulls `image` from its registry into the store and compiles it, so that the first
    /// container start does not. Concurrent pulls of one reference share one download; a pull
    /// that does not finish within `deadline` stores nothing and fails with DeadlineExceeded.
    pub async fn pull_image(&self, image: &str, auth: Auth, deadline: Option<Duration>) -> Result<ImageRecord> {
        let reference = Reference::parse(image)?;
        let key = reference.to_string();
        let (mut rx, leader) = {
            let mut pulls = self.inner.pulls.lock().unwrap_or_else(|e| e.into_inner());
            match pulls.get(&key) {
                Some(rx) => (rx.clone(), None),
                None => {
                    let (tx, rx) = watch::channel(None);
                    pulls.insert(key.clone(), rx.clone());
                    (rx, Some(tx))
                }
            }
        };
        if let Some(tx) = leader {
            // The pull runs on its own: a caller that goes away does not cancel it for others.
            let rt = self.clone();
            tokio::spawn(async move {
                let work = rt.pull_and_compile(reference, auth);
                let result = match deadline {
                    Some(d) => tokio::time::timeout(d, work)
                        .await
                        .unwrap_or_else(|_| Err(Error::DeadlineExceeded(format!("pull {key}: not done within {d:?}")))),
                    None => work.await,
                };
                rt.inner.pulls.lock().unwrap_or_else(|e| e.into_inner()).remove(&key);
                let _ = tx.send(Some(result.map_err(Arc::new)));
            });
        }
        let done = rx.wait_for(Option::is_some).await.map_err(|_| Error::Internal("pull task ended".into()))?;
        match done.as_ref().expect("waited for Some") {
            Ok(record) => Ok(record.clone()),
            Err(e) => Err(Error::Shared(e.clone())),
        }
    }

    async fn pull_and_compile(&self, reference: Reference, auth: Auth) -> Result<ImageRecord> {
        let endpoints = self.inner.options.registries.endpoints(&reference.registry);
        let known: std::collections::HashSet<String> = self.inner.images.list()?.into_iter().map(|i| i.id).collect();
        let image = reference.to_string();
        let progress: wasmlet_images::Observer = Arc::new(move |p| {
            if p.finished {
                let what = p.what;
                tracing::info!(image, what, blob = p.digest, bytes = p.done, skipped = p.skipped, "blob ready");
            } else {
                tracing::debug!(image, what = p.what, blob = p.digest, done = p.done, total = ?p.total, "downloading");
            }
        });
        let record =
            wasmlet_images::pull_from(&self.inner.images, &endpoints, &auth, &reference, Some(progress)).await?;
        let rt = self.clone();
        let image = record.clone();
        let compiled = tokio::task::spawn_blocking(move || rt.program_for(&image))
            .await
            .map_err(|e| Error::Internal(format!("compile task: {e}")))?;
        if let Err(e) = compiled {
            // Wasm that does not compile is not kept: the store is left as it was.
            if !known.contains(&record.id) {
                let _ = self.inner.images.remove(&record.id);
            }
            return Err(e);
        }
        Ok(record)
    }

    /// Drops compiled code for an image's wasm once no container uses it.
    pub fn forget_wasm(&self, wasm_digest: &str) {
        let in_use = self.state().containers.values().any(|e| e.record.wasm_digest == wasm_digest);
        if !in_use {
            self.inner.engine.forget(wasm_digest);
        }
    }
}

/// The guest's view of a container: argv, env, directories, working directory. The CRI's
/// command replaces a compat image's entrypoint and its args replace the image's cmd (as
/// Kubernetes defines them); the CRI's env wins over the image's; mounts lie over the image's
/// read-only root filesystem.
fn guest_spec(
    rec: &ContainerRecord,
    pod_dir: &podfiles::PodDir,
    dns_route: &(tokio::runtime::Handle, Option<Arc<NetNs>>),
    hostname: &str,
    net: GuestNet,
    stdout: GuestOutput,
    stderr: GuestOutput,
) -> Result<GuestSpec> {
    let spec = &rec.spec;
    let image = rec.image_run.as_ref();
    let mut args: Vec<String> = match image {
        Some(run) if spec.command.is_empty() => {
            let rest = if spec.args.is_empty() { &run.cmd } else { &spec.args };
            run.entrypoint.iter().chain(rest).cloned().collect()
        }
        _ => spec.command.iter().chain(&spec.args).cloned().collect(),
    };
    if image.is_none() && spec.command.is_empty() && !args.is_empty() {
        args.insert(0, spec.metadata.name.clone());
    }
    let mut env: Vec<(String, String)> = image
        .map(|run| {
            run.env
                .iter()
                .filter_map(|kv| kv.split_once('=').map(|(k, v)| (k.to_string(), v.to_string())))
                .filter(|(k, _)| !spec.envs.iter().any(|(ck, _)| ck == k))
                .collect()
        })
        .unwrap_or_default();
    env.extend(spec.envs.iter().cloned());
    if !hostname.is_empty() && !env.iter().any(|(k, _)| k == "HOSTNAME") {
        env.push(("HOSTNAME".to_string(), hostname.to_string()));
    }
    let mut preopens = Vec::new();
    if let Some(run) = image {
        preopens.push(Preopen { host: PathBuf::from(&run.rootfs), guest: "/".to_string(), read_only: true });
    }
    let mut dirs = Vec::new();
    for m in &spec.mounts {
        if let Resolved::Dir(p) = resolve_mount(m)? {
            dirs.push(p);
        }
    }
    // The pod's /etc files and the file mounts, unless a directory is mounted at their place.
    let files = file_mounts(spec)?;
    let image_etc = image_etc(image).is_some();
    let pod_files = podfiles::preopens(&pod_dir.files.join(&rec.id), &pod_dir.etc, image_etc, &files);
    preopens.extend(pod_files.into_iter().filter(|p| !dirs.iter().any(|d| d.guest == p.guest)));
    preopens.extend(dirs);
    let working_dir =
        if spec.working_dir.is_empty() { image.map_or("", |r| r.working_dir.as_str()) } else { &spec.working_dir };
    let cwd = (!working_dir.is_empty()).then(|| working_dir.to_string());
    // Name lookups follow the pod's files as this container sees them (a kubelet's hosts
    // file mount included).
    let etc = preopens.iter().rev().find(|p| p.guest == "/etc").map(|p| p.host.clone());
    let read = |name: &str| etc.as_ref().and_then(|e| fs::read_to_string(e.join(name)).ok()).unwrap_or_default();
    let dns = (rec.kind == wasmlet_images::WasmKind::Component && !matches!(net, GuestNet::None)).then(|| {
        let mut dns = PodDns::parse(&read("resolv.conf"), &read("hosts"), dns_route.0.clone());
        dns.netns = dns_route.1.clone();
        Arc::new(dns)
    });
    Ok(GuestSpec { args, env, preopens, cwd, stdout, stderr, net, dns, stop: None, http_listener: None })
}

/// A mount with its host path resolved.
enum Resolved {
    /// A directory: preopened as it is.
    Dir(Preopen),
    /// A file: placed in a directory of its own (see [`podfiles`]).
    File(PathBuf),
}

/// Checks a mount and resolves its host path (a symlink is followed, as the CRI asks).
fn resolve_mount(m: &Mount) -> Result<Resolved> {
    if !m.container_path.starts_with('/') || m.container_path.split('/').any(|c| c == "..") {
        return Err(Error::InvalidArgument(format!(
            "mount {:?}: container path must be absolute, without ..",
            m.container_path
        )));
    }
    let host = fs::canonicalize(&m.host_path)
        .map_err(|e| Error::InvalidArgument(format!("mount {}: host path {:?}: {e}", m.container_path, m.host_path)))?;
    if host.is_dir() {
        let guest = m.container_path.trim_end_matches('/');
        let guest = if guest.is_empty() { "/" } else { guest };
        return Ok(Resolved::Dir(Preopen {
            host,
            guest: guest.to_string(),
            read_only: m.readonly || m.recursive_read_only,
        }));
    }
    if m.container_path.ends_with('/') {
        return Err(Error::InvalidArgument(format!(
            "mount {}: host path {:?} is a file",
            m.container_path, m.host_path
        )));
    }
    Ok(Resolved::File(host))
}

/// Who a pod is, for CNI plugins.
fn pod_identity(spec: &SandboxSpec) -> crate::net::cni::PodIdentity {
    let m = &spec.metadata;
    crate::net::cni::PodIdentity { namespace: m.namespace.clone(), name: m.name.clone(), uid: m.uid.clone() }
}

/// The image's own `/etc` directory, if it has one (compat images).
fn image_etc(image: Option<&wasmlet_images::ImageRun>) -> Option<PathBuf> {
    let etc = PathBuf::from(&image?.rootfs).join("etc");
    etc.is_dir().then_some(etc)
}

/// A container's file mounts, resolved.
fn file_mounts(spec: &ContainerSpec) -> Result<Vec<(PathBuf, &Mount)>> {
    let mut out = Vec::new();
    for m in &spec.mounts {
        if let Resolved::File(host) = resolve_mount(m)? {
            out.push((host, m));
        }
    }
    Ok(out)
}

/// The container's log file: `<log_directory>/<log_path>`, refusing a path that leaves the
/// log directory.
fn log_file(sandbox: &SandboxSpec, spec: &ContainerSpec) -> Result<Option<PathBuf>> {
    if spec.log_path.is_empty() {
        return Ok(None);
    }
    let name = &spec.metadata.name;
    if sandbox.log_directory.is_empty() {
        return Err(Error::InvalidArgument(format!(
            "container {name}: log path {:?} given but the pod sandbox has no log directory",
            spec.log_path
        )));
    }
    let mut rel = PathBuf::new();
    for c in Path::new(&spec.log_path).components() {
        match c {
            Component::Normal(part) => rel.push(part),
            Component::CurDir => {}
            Component::ParentDir if rel.pop() => {}
            _ => {
                return Err(Error::InvalidArgument(format!(
                    "container {name}: log path {:?} escapes the log directory {:?}",
                    spec.log_path, sandbox.log_directory
                )));
            }
        }
    }
    if rel.as_os_str().is_empty() {
        return Err(Error::InvalidArgument(format!("container {name}: log path {:?} names no file", spec.log_path)));
    }
    Ok(Some(Path::new(&sandbox.log_directory).join(rel)))
}

/// The host file behind `guest_path` if it is a `.wasm` file inside one of the preopens.
fn wasm_in_container(preopens: &[Preopen], guest_path: &str) -> Option<PathBuf> {
    if !guest_path.ends_with(".wasm") || !guest_path.starts_with('/') {
        return None;
    }
    let guest = Path::new(guest_path);
    let best = preopens.iter().filter(|p| guest.starts_with(&p.guest)).max_by_key(|p| p.guest.len())?;
    let rel = guest.strip_prefix(&best.guest).ok()?;
    let host = fs::canonicalize(best.host.join(rel)).ok()?;
    // A symlink that leads out of the mount does not count.
    (host.starts_with(&best.host) && host.is_file()).then_some(host)
}

fn new_id() -> String {
    hex::encode(rand::random::<[u8; 32]>())
}

/// Nanoseconds since the epoch.
pub fn now_nanos() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos() as i64).unwrap_or(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sandbox(dir: &str) -> SandboxSpec {
        SandboxSpec { log_directory: dir.to_string(), ..Default::default() }
    }

    fn container(log_path: &str) -> ContainerSpec {
        ContainerSpec {
            metadata: ContainerMetadata { name: "c".into(), attempt: 0 },
            log_path: log_path.to_string(),
            ..Default::default()
        }
    }

    #[test]
    fn log_paths_stay_inside_the_log_directory() {
        let ok = log_file(&sandbox("/logs"), &container("c/0.log")).unwrap();
        assert_eq!(ok, Some(PathBuf::from("/logs/c/0.log")));
        let ok = log_file(&sandbox("/logs"), &container("c/../d/./1.log")).unwrap();
        assert_eq!(ok, Some(PathBuf::from("/logs/d/1.log")));
        assert_eq!(log_file(&sandbox(""), &container("")).unwrap(), None);
        for bad in ["../x.log", "/etc/passwd", "c/../../x", ".."] {
            let err = log_file(&sandbox("/logs"), &container(bad)).unwrap_err().to_string();
            assert!(err.contains("escapes the log directory") || err.contains("names no file"), "{bad}: {err}");
        }
        assert!(log_file(&sandbox(""), &container("x.log")).is_err());
    }

    #[test]
    fn exec_wasm_lookup_stays_inside_mounts() {
        let dir = tempfile::tempdir().unwrap();
        let mount = dir.path().join("m");
        fs::create_dir(&mount).unwrap();
        fs::write(mount.join("tool.wasm"), b"x").unwrap();
        fs::write(dir.path().join("outside.wasm"), b"x").unwrap();
        std::os::unix::fs::symlink(dir.path().join("outside.wasm"), mount.join("link.wasm")).unwrap();
        let preopens =
            vec![Preopen { host: fs::canonicalize(&mount).unwrap(), guest: "/data".into(), read_only: true }];
        assert!(wasm_in_container(&preopens, "/data/tool.wasm").is_some());
        assert!(wasm_in_container(&preopens, "/data/link.wasm").is_none());
        assert!(wasm_in_container(&preopens, "/data/../outside.wasm").is_none());
        assert!(wasm_in_container(&preopens, "/other/tool.wasm").is_none());
        assert!(wasm_in_container(&preopens, "tool.wasm").is_none());
    }
}
