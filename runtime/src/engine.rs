//! The one shared wasmtime engine, its linkers, and running a guest to its end.
//!
//! Guests run as async calls on a tokio runtime of their own, so a busy guest never delays the
//! gRPC server. An epoch ticker makes every running guest yield to the executor each tick: a
//! guest in a tight loop still lets others run, and dropping its future (a kill) takes effect
//! at the next tick or host call.
//!
//! Guests of a pod with its own network namespace run on the pod executor, whose threads move
//! into the pod's namespace before each poll (see [`crate::net::netns`]); guests of host-network
//! pods run on a second executor whose threads never move.

use std::collections::HashMap;
use std::future::Future;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use wasmlet_images::{CompiledCache, CompiledProgram};
use wasmtime::component::ResourceTable;
use wasmtime::{Config, Engine, InstancePre, Linker, ResourceLimiter, Store, UpdateDeadline};
use wasmtime_wasi::p1::WasiP1Ctx;
use wasmtime_wasi::p2::bindings::CommandPre;
use wasmtime_wasi::{FsPerms, I32Exit, WasiCtx, WasiCtxBuilder, WasiCtxView, WasiView};

use wasmlet_images::WasmKind;

use crate::logs::GuestOutput;
use crate::net::NetNs;
use crate::net::dns::PodDns;
use crate::{Error, Result};

/// How often the epoch advances: the longest a guest runs before yielding, and the longest a
/// kill waits for a guest that is computing.
pub const EPOCH_TICK: Duration = Duration::from_millis(1);

/// A program linked and ready to instantiate (pre-instantiated once per image).
#[derive(Clone)]
pub enum Program {
    /// A core module with WASI preview 1.
    Module(InstancePre<P1State>),
    /// A `wasi:cli/command` component with WASI preview 2.
    Component(CommandPre<P2State>),
    /// A `wasi:http/incoming-handler` component: served over HTTP, an instance per request.
    Http(wasmtime_wasi_http::p2::bindings::ProxyPre<P2State>),
}

/// A directory the guest sees.
#[derive(Debug, Clone)]
pub struct Preopen {
    /// Host directory (symlinks already resolved).
    pub host: PathBuf,
    /// Path in the guest.
    pub guest: String,
    /// Whether the guest may only read.
    pub read_only: bool,
}

/// The network a guest's sockets live in.
#[derive(Debug, Clone)]
pub enum GuestNet {
    /// No sockets at all.
    None,
    /// The host's network (hostNetwork pods).
    Host,
    /// The pod's own namespace.
    Pod(Arc<NetNs>),
}

impl GuestNet {
    /// The namespace to enter before polling the guest, if it has one of its own.
    pub fn netns(&self) -> Option<Arc<NetNs>> {
        match self {
            GuestNet::Pod(ns) => Some(ns.clone()),
            GuestNet::None | GuestNet::Host => None,
        }
    }
}

/// Everything one guest instance is given.
pub struct GuestSpec {
    /// argv, program name first.
    pub args: Vec<String>,
    /// Environment, in order.
    pub env: Vec<(String, String)>,
    /// Directories.
    pub preopens: Vec<Preopen>,
    /// Initial working directory (components only: preview 1 has no such notion).
    pub cwd: Option<String>,
    /// fd 1.
    pub stdout: GuestOutput,
    /// fd 2.
    pub stderr: GuestOutput,
    /// Where its sockets are.
    pub net: GuestNet,
    /// How its name lookups are answered (components; None: none are).
    pub dns: Option<Arc<PodDns>>,
    /// How its outgoing wasi:http requests go (components with a network).
    pub egress: Option<Arc<crate::net::egress::Egress>>,
    /// Becomes true when a stop is requested (wasi:http servers drain and end).
    pub stop: Option<tokio::sync::watch::Receiver<bool>>,
    /// A wasi:http server's listener, bound in the pod's namespace before StartContainer
    /// answers (so a started server accepts at once, and a taken port fails the start).
    pub http_listener: Option<Arc<std::net::TcpListener>>,
    /// fd 0 of a container with `stdin` (attach sessions write to it); else it reads as empty.
    pub stdin: Option<Arc<crate::stdio::Term<wasmtime_wasi::cli::AsyncStdinStream>>>,
    /// An exec session's streams: they replace stdout and stderr, and give the guest a stdin.
    pub session: Option<crate::stdio::SessionIo>,
}

impl GuestSpec {
    /// A guest given only its arguments and output: no environment, files, network or stdin.
    pub fn new(args: Vec<String>, stdout: GuestOutput, stderr: GuestOutput) -> GuestSpec {
        GuestSpec {
            args,
            env: vec![],
            preopens: vec![],
            cwd: None,
            stdout,
            stderr,
            net: GuestNet::None,
            dns: None,
            egress: None,
            stop: None,
            http_listener: None,
            stdin: None,
            session: None,
        }
    }
}

/// Counters a running guest updates, read by the stats RPCs; the memory limit may be changed
/// while it runs (UpdateContainerResources).
#[derive(Debug, Default)]
pub struct GuestMeter {
    /// Time spent running the guest (polls of its future), in nanoseconds.
    pub cpu_nanos: AtomicU64,
    /// Linear memory and table bytes currently allocated.
    pub memory_bytes: AtomicU64,
    /// Memory limit in bytes; 0 means none.
    pub memory_limit: AtomicU64,
    oom: AtomicBool,
    /// The guest put a TCP socket in listening mode: it is a server, which can see its
    /// listener close when it is asked to stop.
    pub listening: AtomicBool,
    /// The ports it listens on (those known when it listened), closed at a stop.
    pub listen_ports: std::sync::Mutex<Vec<u16>>,
    /// Which sockets of its namespace are the container's (on its root meter only).
    pub sockets: std::sync::Mutex<crate::net::queues::SocketClaim>,
    /// The bytes queued in those sockets when they were last read: memory a cgroup would
    /// charge to the container (on its root meter only).
    pub socket_bytes: AtomicU64,
    /// The container an exec'd instance belongs to: its CPU time and memory count there too,
    /// and the container's memory limit covers them, as a cgroup covers a process's children.
    pub counted_in: Option<Arc<GuestMeter>>,
    /// The container's CPU quota and shares (used on its root meter only).
    pub cpu: crate::cpu::Cpu,
}

impl GuestMeter {
    /// The meter of an instance exec'd in the container metered by `container`.
    pub fn exec_in(container: Arc<GuestMeter>) -> GuestMeter {
        GuestMeter { counted_in: Some(container), ..GuestMeter::default() }
    }

    /// Applies a container's CRI resources: the memory limit from the next memory growth, the
    /// CPU quota and shares from the next poll.
    pub fn set_resources(&self, r: &crate::model::Resources) {
        self.memory_limit.store(r.memory_limit_in_bytes.max(0) as u64, Ordering::Relaxed);
        self.cpu.set(r.cpu_quota, r.cpu_period, r.cpu_shares);
    }

    /// The container's meter: this one, or the one it is counted in.
    pub fn root(self: &Arc<Self>) -> &Arc<GuestMeter> {
        self.counted_in.as_ref().unwrap_or(self)
    }
}

/// How a guest ended, before it is mapped to CRI exit codes and reasons.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// It returned or called exit with this code.
    Exited(i32),
    /// It trapped; the message names the trap.
    Trapped(String),
    /// It tried to grow memory past its limit.
    OutOfMemory { limit: u64 },
    /// It could not be instantiated (e.g. an import nobody provides).
    StartFailed(String),
}

/// Store state for preview 1 modules.
pub struct P1State {
    wasi: WasiP1Ctx,
    limiter: Limiter,
}

/// Store state for preview 2 components.
pub struct P2State {
    ctx: WasiCtx,
    table: ResourceTable,
    limiter: Limiter,
    dns: Option<Arc<PodDns>>,
    http: wasmtime_wasi_http::WasiHttpCtx,
    http_hooks: crate::http::Hooks,
    udp_flows: crate::net::connect::UdpFlows,
}

impl P2State {
    pub(crate) fn new(ctx: WasiCtx, limiter: Limiter, spec: &GuestSpec) -> P2State {
        let meter = limiter.meter.clone();
        P2State {
            ctx,
            table: ResourceTable::new(),
            limiter,
            dns: spec.dns.clone(),
            http: wasmtime_wasi_http::WasiHttpCtx::new(),
            http_hooks: crate::http::Hooks { egress: spec.egress.clone(), meter },
            udp_flows: Default::default(),
        }
    }

    pub(crate) fn limiter(&mut self) -> &mut Limiter {
        &mut self.limiter
    }
}

impl wasmtime_wasi_http::WasiHttpView for P2State {
    fn http(&mut self) -> wasmtime_wasi_http::WasiHttpCtxView<'_> {
        wasmtime_wasi_http::WasiHttpCtxView { ctx: &mut self.http, table: &mut self.table, hooks: &mut self.http_hooks }
    }
}

impl crate::net::lookup::HasPodDns for P2State {
    fn table(&mut self) -> &mut ResourceTable {
        &mut self.table
    }
    fn pod_dns(&self) -> Option<Arc<PodDns>> {
        self.dns.clone()
    }
}

impl crate::net::connect::HasServices for P2State {
    fn sockets(&mut self) -> wasmtime_wasi::sockets::WasiSocketsCtxView<'_> {
        wasmtime_wasi::sockets::WasiSocketsCtxView { ctx: self.ctx.sockets(), table: &mut self.table }
    }
    fn destination(
        &self,
        dst: std::net::SocketAddr,
        protocol: crate::net::services::Protocol,
    ) -> Result<std::net::SocketAddr, String> {
        match &self.http_hooks.egress {
            Some(e) => e.services.destination(e.client, dst, protocol),
            None => Ok(dst),
        }
    }
    fn serves(
        &self,
        dst: std::net::SocketAddr,
        protocol: crate::net::services::Protocol,
        endpoint: std::net::SocketAddr,
    ) -> bool {
        self.http_hooks.egress.as_ref().is_some_and(|e| e.services.serves(dst, protocol, endpoint))
    }
    fn udp_flows(&mut self) -> &mut crate::net::connect::UdpFlows {
        &mut self.udp_flows
    }
}

impl WasiView for P2State {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView { ctx: &mut self.ctx, table: &mut self.table }
    }
}

/// Enforces the memory limit and keeps the meter's memory figure current.
pub(crate) struct Limiter {
    meter: Arc<GuestMeter>,
}

impl Limiter {
    pub(crate) fn new(meter: Arc<GuestMeter>) -> Limiter {
        Limiter { meter }
    }
}

impl Drop for Limiter {
    fn drop(&mut self) {
        // An exec'd instance's memory leaves its container's count with it.
        if let Some(parent) = &self.meter.counted_in {
            let mine = self.meter.memory_bytes.load(Ordering::Relaxed);
            let _ = parent
                .memory_bytes
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |v| Some(v.saturating_sub(mine)));
        }
    }
}

impl Limiter {
    /// Counts `grown` more bytes for the guest (and the container it runs in), or refuses them
    /// past a memory limit.
    fn charge(&mut self, grown: u64) -> wasmtime::Result<bool> {
        let limit = self.meter.memory_limit.load(Ordering::Relaxed);
        let used = self.meter.memory_bytes.load(Ordering::Relaxed);
        let after = used + grown;
        // The sockets' queues count too, as a cgroup charges them: a guest whose peers filled
        // them has that much less to grow into.
        if limit != 0 && after + self.meter.socket_bytes.load(Ordering::Relaxed) > limit {
            self.meter.oom.store(true, Ordering::Relaxed);
            return Err(wasmtime::Error::msg(format!("memory limit of {limit} bytes exceeded")));
        }
        if let Some(parent) = &self.meter.counted_in {
            let limit = parent.memory_limit.load(Ordering::Relaxed);
            let total =
                parent.memory_bytes.load(Ordering::Relaxed) + grown + parent.socket_bytes.load(Ordering::Relaxed);
            if limit != 0 && total > limit {
                self.meter.oom.store(true, Ordering::Relaxed);
                return Err(wasmtime::Error::msg(format!("the container's memory limit of {limit} bytes exceeded")));
            }
            parent.memory_bytes.fetch_add(grown, Ordering::Relaxed);
        }
        self.meter.memory_bytes.store(after, Ordering::Relaxed);
        Ok(true)
    }
}

/// What a table element holds of the host's memory: a pointer (the pooling allocator
/// reserves as much per element).
const TABLE_ELEMENT_BYTES: u64 = 8;

impl ResourceLimiter for Limiter {
    fn memory_growing(&mut self, current: usize, desired: usize, _max: Option<usize>) -> wasmtime::Result<bool> {
        self.charge(desired.saturating_sub(current) as u64)
    }

    /// Tables count as the guest's memory, as the kernel would count their pages.
    fn table_growing(&mut self, current: usize, desired: usize, _max: Option<usize>) -> wasmtime::Result<bool> {
        self.charge(desired.saturating_sub(current) as u64 * TABLE_ELEMENT_BYTES)
    }
}

/// The shared engine, linkers, compiled-code cache and guest executor.
pub struct WasmEngine {
    engine: Engine,
    module_linker: Linker<P1State>,
    component_linker: wasmtime::component::Linker<P2State>,
    cache: CompiledCache,
    /// Programs by wasm digest: a second container of an image neither compiles nor links.
    programs: Mutex<HashMap<String, Program>>,
    /// Always Some until dropped; taken in Drop to shut down without blocking.
    executor: Option<tokio::runtime::Runtime>,
    /// For guests on the host's network: its threads never enter a pod's namespace.
    host_executor: Option<tokio::runtime::Runtime>,
    /// For the host ports' forwarders: unmetered host work that must not queue behind the
    /// guests' polls (a millisecond each) at every hop of a request.
    ports_executor: Option<tokio::runtime::Runtime>,
    /// Where guests without the host's network run while they compute (`cpu::tiered`): the
    /// pod executor's threads stay free for guests that wait on I/O and wake, so a light
    /// request is never queued behind a computing guest's poll. Its threads move between pod
    /// namespaces too.
    batch_executor: Option<tokio::runtime::Runtime>,
    ticker_stop: Arc<AtomicBool>,
}

impl WasmEngine {
    /// An engine whose compiled code is cached under `cache_dir`, with [`POOL_SLOTS`] slots.
    pub fn new(cache_dir: PathBuf) -> std::result::Result<WasmEngine, String> {
        WasmEngine::with_slots(cache_dir, POOL_SLOTS)
    }

    /// The same with `slots` pooling-allocator slots (see [`slots_for_pods`]).
    pub fn with_slots(cache_dir: PathBuf, slots: u32) -> std::result::Result<WasmEngine, String> {
        let engine = new_engine(slots)?;
        let mut module_linker = Linker::new(&engine);
        wasmtime_wasi::p1::add_to_linker_async(&mut module_linker, |s: &mut P1State| &mut s.wasi)
            .map_err(|e| format!("link wasi preview 1: {e:#}"))?;
        // A process exits with whatever status a byte holds (a shell's 127 for a command not
        // found); wasmtime-wasi's proc_exit refuses 126 and more, which would make those
        // exits traps.
        module_linker.allow_shadowing(true);
        module_linker
            .func_wrap(
                "wasi_snapshot_preview1",
                "proc_exit",
                |_: wasmtime::Caller<'_, P1State>, status: i32| -> wasmtime::Result<()> {
                    Err(I32Exit(status & 0xff).into())
                },
            )
            .map_err(|e| format!("link proc_exit: {e:#}"))?;
        module_linker.allow_shadowing(false);
        let mut component_linker = wasmtime::component::Linker::new(&engine);
        wasmtime_wasi::p2::add_to_linker_async(&mut component_linker)
            .map_err(|e| format!("link wasi preview 2: {e:#}"))?;
        wasmtime_wasi_http::p2::add_only_http_to_linker_async(&mut component_linker)
            .map_err(|e| format!("link wasi:http: {e:#}"))?;
        crate::net::lookup::add_to_linker(&mut component_linker)
            .map_err(|e| format!("link the pod name lookup: {e:#}"))?;
        crate::net::connect::add_to_linker(&mut component_linker)
            .map_err(|e| format!("link the Service-aware connect: {e:#}"))?;
        let cache = CompiledCache::new(cache_dir, &engine).map_err(|e| e.to_string())?;
        // A guest's poll lasts up to an epoch tick: the I/O and timer drivers are polled
        // between any two (tokio's default is every 61), or a woken guest waits for dozens.
        let guest_executor = |name: &str, threads: Option<usize>, what: &str| {
            let mut b = tokio::runtime::Builder::new_multi_thread();
            if let Some(n) = threads {
                b.worker_threads(n);
            }
            b.thread_name(name).event_interval(1).enable_all().build().map_err(|e| format!("{what} executor: {e}"))
        };
        let host_executor = guest_executor("wasm-guest-host", Some(2), "host-network guest")?;
        let batch_executor = guest_executor("wasm-batch", None, "computing guest")?;
        // The forwarders do little between polls: tokio's default driver interval suits them.
        let ports_executor = tokio::runtime::Builder::new_multi_thread()
            .thread_name("wasm-ports")
            .worker_threads(1)
            .enable_all()
            .build()
            .map_err(|e| format!("host port executor: {e}"))?;
        let executor = guest_executor("wasm-guest", None, "guest")?;
        crate::cpu::preempts(&engine);
        let ticker_stop = Arc::new(AtomicBool::new(false));
        let (e, stop) = (engine.clone(), ticker_stop.clone());
        std::thread::Builder::new()
            .name("wasm-epoch".into())
            .spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    std::thread::sleep(EPOCH_TICK);
                    e.increment_epoch();
                }
            })
            .map_err(|e| format!("epoch ticker: {e}"))?;
        Ok(WasmEngine {
            engine,
            module_linker,
            component_linker,
            cache,
            programs: Mutex::new(HashMap::new()),
            executor: Some(executor),
            host_executor: Some(host_executor),
            ports_executor: Some(ports_executor),
            batch_executor: Some(batch_executor),
            ticker_stop,
        })
    }

    /// The compiled-code cache.
    pub fn cache(&self) -> &CompiledCache {
        &self.cache
    }

    /// The program for an image's wasm: from memory, else from the compiled-code cache, else
    /// compiled from `wasm()`. Blocking; call it off the async executor. `what` names the
    /// image in errors.
    pub fn program(
        &self,
        what: &str,
        wasm_digest: &str,
        kind: WasmKind,
        wasm: impl FnOnce() -> wasmlet_images::Result<Vec<u8>>,
    ) -> Result<Program> {
        if let Some(p) = self.cached_program(wasm_digest) {
            return Ok(p);
        }
        let compiled = self.cache.load_or_compile(&self.engine, what, wasm_digest, kind, wasm)?;
        let unlinkable = |e: wasmtime::Error| Error::InvalidArgument(format!("{what}: cannot be linked: {e:#}"));
        let program = match compiled {
            CompiledProgram::Module(m) => Program::Module(self.module_linker.instantiate_pre(&m).map_err(unlinkable)?),
            CompiledProgram::Component(c) => {
                let pre = self.component_linker.instantiate_pre(&c).map_err(unlinkable)?;
                match CommandPre::new(pre.clone()) {
                    Ok(command) => Program::Component(command),
                    Err(not_command) => match wasmtime_wasi_http::p2::bindings::ProxyPre::new(pre) {
                        Ok(proxy) => Program::Http(proxy),
                        Err(_) => {
                            return Err(Error::InvalidArgument(format!(
                                "{what}: neither a wasi:cli/command nor a wasi:http/incoming-handler component: \
                                 {not_command:#}"
                            )));
                        }
                    },
                }
            }
        };
        self.programs.lock().unwrap_or_else(|e| e.into_inner()).insert(wasm_digest.to_string(), program.clone());
        Ok(program)
    }

    /// The program for `wasm_digest` if it is already linked in memory (no I/O, no compile).
    pub fn cached_program(&self, wasm_digest: &str) -> Option<Program> {
        self.programs.lock().unwrap_or_else(|e| e.into_inner()).get(wasm_digest).cloned()
    }

    /// Drops the in-memory program of `wasm_digest` (its image was removed).
    pub fn forget(&self, wasm_digest: &str) {
        self.programs.lock().unwrap_or_else(|e| e.into_inner()).remove(wasm_digest);
        self.cache.forget(wasm_digest);
    }

    /// Spawns `fut` on the pod executor (guests in pod namespaces, or without a network).
    pub fn spawn<F>(&self, fut: F) -> tokio::task::JoinHandle<F::Output>
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        self.executor.as_ref().expect("executor lives until drop").spawn(fut)
    }

    /// Spawns a host port's forwarder on its own executor (its thread moves between pod
    /// namespaces).
    pub fn spawn_forwarder<F>(&self, fut: F) -> tokio::task::JoinHandle<F::Output>
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        self.ports_executor.as_ref().expect("executor lives until drop").spawn(fut)
    }

    /// The pod executor (its threads move between pod namespaces).
    pub fn pod_handle(&self) -> tokio::runtime::Handle {
        self.executor.as_ref().expect("executor lives until drop").handle().clone()
    }

    /// The host-network executor, where name lookups of rootless pods run.
    pub fn host_handle(&self) -> tokio::runtime::Handle {
        self.host_executor.as_ref().expect("executor lives until drop").handle().clone()
    }

    /// Spawns `fut` on the executor for guests on `net`.
    pub fn spawn_for<F>(&self, net: &GuestNet, fut: F) -> tokio::task::JoinHandle<F::Output>
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        match net {
            GuestNet::Host => self.host_executor.as_ref().expect("executor lives until drop").spawn(fut),
            GuestNet::None | GuestNet::Pod(_) => self.spawn(fut),
        }
    }

    /// Runs a guest to its end. Dropping the returned future kills the guest.
    pub fn run(
        &self,
        program: &Program,
        spec: GuestSpec,
        meter: Arc<GuestMeter>,
    ) -> impl Future<Output = Outcome> + Send + 'static {
        let engine = self.engine.clone();
        let program = program.clone();
        let m = meter.clone();
        let netns = spec.net.netns();
        let host = matches!(spec.net, GuestNet::Host);
        let metered = crate::cpu::Metered::new(meter, async move {
            let mut wasi = match build_wasi(&spec, &m) {
                Ok(w) => w,
                Err(e) => return Outcome::StartFailed(e),
            };
            let limiter = Limiter { meter: m.clone() };
            let result = match program {
                Program::Http(pre) => {
                    let port = crate::http::port(&spec, 8080);
                    return match crate::http::serve(engine, pre, spec, m.clone(), port).await {
                        Ok(()) => Outcome::Exited(0),
                        Err(e) => Outcome::StartFailed(e),
                    };
                }
                Program::Module(pre) => {
                    let mut store = Store::new(&engine, P1State { wasi: wasi.build_p1(), limiter });
                    prepare(&mut store, |s| &mut s.limiter);
                    run_module(&mut store, &pre).await
                }
                Program::Component(pre) => {
                    let state = P2State::new(wasi.build(), limiter, &spec);
                    let mut store = Store::new(&engine, state);
                    prepare(&mut store, |s| &mut s.limiter);
                    run_component(&mut store, &pre).await
                }
            };
            classify(result, &m)
        });
        let guest = async move {
            match netns {
                Some(ns) => crate::net::InNetns::new(ns, metered)
                    .await
                    .unwrap_or_else(|e| Outcome::StartFailed(format!("enter the pod's network namespace: {e}"))),
                None => metered.await,
            }
        };
        // A host-network guest stays on the host executor, whose threads never enter a pod's
        // namespace.
        let batch = (!host).then(|| self.batch_executor.as_ref().expect("executor lives until drop").handle().clone());
        async move {
            match batch {
                Some(batch) => crate::cpu::tiered(guest, batch).await,
                None => guest.await,
            }
        }
    }
}

/// Instances the pooling allocator keeps slots for (core instances, memories, tables, async
/// stacks) by default: 10,000 idle pods, each a running guest, with room for their exec'd,
/// probe and per-request instances. About 50 TB of address space is reserved (of x86-64's
/// 128), nothing resident until used.
pub const POOL_SLOTS: u32 = 12_000;

/// The most slots the address space allows with room to spare (each reserves about 4 GiB).
pub const MAX_POOL_SLOTS: u32 = 24_000;

/// The slots for a node of `max_pods` pods: one running guest each and a fifth more for the
/// exec'd, probe and per-request instances and sidecars, 1,000 at least.
pub fn slots_for_pods(max_pods: u32) -> u32 {
    (max_pods.saturating_add(max_pods / 5).saturating_add(200)).clamp(1_000, MAX_POOL_SLOTS)
}

/// What a pool that ran out of slots says, with the settings that give it more.
pub(crate) fn slot_hint(message: String) -> String {
    if message.contains("concurrent") && message.contains("limit") {
        return format!(
            "{message} (every pooling-allocator slot is in use: raise `instance_slots`, or [node] maxPods, which sizes it)"
        );
    }
    message
}

/// The engine: epoch interruption, and the pooling allocator (instances from pre-reserved
/// slots, memories reset with `madvise` instead of mapped and unmapped each time) where the
/// host lets a process reserve that much address space; the default allocator otherwise.
fn new_engine(slots: u32) -> std::result::Result<Engine, String> {
    let mut config = Config::new();
    config.epoch_interruption(true);
    let mut pool = wasmtime::PoolingAllocationConfig::default();
    pool.total_core_instances(slots)
        .total_memories(slots)
        .total_tables(slots)
        .total_stacks(slots)
        .total_component_instances(slots)
        .max_core_instances_per_component(50)
        .max_memories_per_component(50)
        .max_tables_per_component(50)
        // Limits sized for real code, not wasmtime's defaults (1 MiB of instance state, which
        // a 40,000-function module exceeds; 20,000 table elements; one memory and one table a
        // module). The instance sizes are checks, not reservations; a table slot reserves
        // its elements' 8 bytes each of address space.
        .max_core_instance_size(64 << 20)
        .max_component_instance_size(128 << 20)
        .table_elements(1 << 20)
        .max_tables_per_module(8)
        .max_memories_per_module(4)
        // Each slot freed costs a madvise and a TLB shootdown on every core; batching them and
        // resetting the first pages of a memory with memset instead keeps an instance per
        // request (wasi:http, probes) cheap.
        .decommit_batch_size(32)
        .linear_memory_keep_resident(128 << 10)
        .table_keep_resident(16 << 10);
    let mut pooled = config.clone();
    pooled.allocation_strategy(wasmtime::InstanceAllocationStrategy::Pooling(pool));
    match Engine::new(&pooled) {
        Ok(engine) => {
            tracing::debug!(slots, "pooling instance allocator");
            Ok(engine)
        }
        Err(e) => {
            tracing::warn!(error = %format!("{e:#}"), "pooling allocator unavailable; instances allocated on demand");
            Engine::new(&config).map_err(|e| format!("wasmtime engine: {e:#}"))
        }
    }
}

impl Drop for WasmEngine {
    fn drop(&mut self) {
        self.ticker_stop.store(true, Ordering::Relaxed);
        // Dropping a runtime blocks, which panics inside async code: let it wind down alone.
        let executors =
            [self.executor.take(), self.host_executor.take(), self.ports_executor.take(), self.batch_executor.take()];
        for executor in executors.into_iter().flatten() {
            executor.shutdown_background();
        }
    }
}

type RunResult = std::result::Result<i32, (wasmtime::Error, bool)>;

pub(crate) fn prepare<T: 'static>(store: &mut Store<T>, limiter: fn(&mut T) -> &mut Limiter) {
    store.limiter(move |s| limiter(s) as &mut dyn ResourceLimiter);
    store.set_epoch_deadline(1);
    store.epoch_deadline_callback(|_| {
        crate::cpu::preempted();
        Ok(UpdateDeadline::Yield(1))
    });
}

async fn run_module(store: &mut Store<P1State>, pre: &InstancePre<P1State>) -> RunResult {
    let instance = pre.instantiate_async(&mut *store).await.map_err(|e| (e, true))?;
    let start = instance
        .get_typed_func::<(), ()>(&mut *store, "_start")
        .map_err(|e| (e.context("module exports no `_start` function"), true))?;
    start.call_async(&mut *store, ()).await.map(|()| 0).map_err(|e| (e, false))
}

async fn run_component(store: &mut Store<P2State>, pre: &CommandPre<P2State>) -> RunResult {
    let command = pre.instantiate_async(&mut *store).await.map_err(|e| (e, true))?;
    match command.wasi_cli_run().call_run(&mut *store).await {
        Ok(Ok(())) => Ok(0),
        Ok(Err(())) => Ok(1),
        Err(e) => Err((e, false)),
    }
}

fn classify(result: RunResult, meter: &GuestMeter) -> Outcome {
    match result {
        Ok(code) => Outcome::Exited(code),
        Err((e, _)) if e.downcast_ref::<I32Exit>().is_some() => {
            Outcome::Exited(e.downcast_ref::<I32Exit>().map(|x| x.0).unwrap_or(1))
        }
        Err(_) if meter.oom.load(Ordering::Relaxed) => {
            Outcome::OutOfMemory { limit: meter.memory_limit.load(Ordering::Relaxed) }
        }
        Err((e, true)) => Outcome::StartFailed(slot_hint(format!("{e:#}"))),
        Err((e, false)) => match e.downcast_ref::<wasmtime::Trap>() {
            Some(trap) => Outcome::Trapped(format!("wasm trap: {trap}")),
            None => Outcome::Trapped(format!("{e:#}")),
        },
    }
}

pub(crate) fn build_wasi(spec: &GuestSpec, meter: &Arc<GuestMeter>) -> std::result::Result<WasiCtxBuilder, String> {
    let mut b = WasiCtxBuilder::new();
    b.args(&spec.args).envs(&spec.env).stdout(spec.stdout.clone()).stderr(spec.stderr.clone());
    // Not allowed: with it, wasmtime-wasi's preview 1 poll_oneoff sleeps a lone relative timer
    // with std::thread::sleep, which holds the executor thread (every guest on it, and the
    // kill of this one) for the whole sleep.
    b.allow_blocking_current_thread(false);
    if let Some(i) = &spec.stdin {
        b.stdin(i.clone());
    }
    if let Some(s) = &spec.session {
        if let Some(i) = &s.stdin {
            b.stdin(i.clone());
        }
        if let Some(o) = &s.stdout {
            b.stdout(o.clone());
        }
        if let Some(e) = &s.stderr {
            b.stderr(e.clone());
        }
    }
    if !matches!(spec.net, GuestNet::None) {
        // Sockets are created in the namespace of the polling thread: the pod's.
        // Every address is allowed; a listen is noted, as it makes the guest one that can
        // observe a stop (StopContainer).
        // Binds and connects are noted in the container's claim on its sockets, whose queues
        // count as its memory (net::queues).
        let meter = meter.clone();
        b.socket_addr_check(move |addr, used| {
            use wasmtime_wasi::sockets::SocketAddrUse as Use;
            if matches!(used, Use::TcpListen) {
                meter.listening.store(true, Ordering::Relaxed);
                if addr.port() != 0 {
                    meter.listen_ports.lock().unwrap_or_else(|e| e.into_inner()).push(addr.port());
                }
            }
            let mut claim = meter.root().sockets.lock().unwrap_or_else(|e| e.into_inner());
            match used {
                Use::TcpBind | Use::TcpListen | Use::UdpBind => claim.bound(addr.port()),
                Use::TcpConnect | Use::UdpSend => claim.connected(addr),
                _ => {}
            }
            Box::pin(async { true })
        });
        b.allow_tcp(true).allow_udp(true).allow_ip_name_lookup(true);
    }
    if let Some(cwd) = &spec.cwd {
        b.initial_cwd(cwd);
    }
    for p in &spec.preopens {
        let perms = if p.read_only { FsPerms::ReadOnly } else { FsPerms::ReadWrite };
        b.preopened_dir(&p.host, &p.guest, perms)
            .map_err(|e| format!("preopen {} at {}: {e:#}", p.host.display(), p.guest))?;
    }
    Ok(b)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::logs::Stream;

    #[test]
    fn queued_socket_bytes_count_against_the_limit() {
        let container = Arc::new(GuestMeter::default());
        container.memory_limit.store(1 << 20, Ordering::Relaxed);
        let mut own = Limiter::new(container.clone());
        assert!(own.charge(512 << 10).is_ok());
        container.socket_bytes.store(600 << 10, Ordering::Relaxed);
        assert!(own.charge(1).is_err(), "512 KiB grown and 600 KiB queued: past 1 MiB");
        // An exec'd instance grows into what its container's memory and sockets leave.
        let mut exec = Limiter::new(Arc::new(GuestMeter::exec_in(container.clone())));
        assert!(exec.charge(1).is_err());
        container.socket_bytes.store(0, Ordering::Relaxed);
        assert!(exec.charge(256 << 10).is_ok());
        assert!(own.charge(256 << 10).is_ok(), "the queue drained: room again");
    }

    fn spec(out: &GuestOutput) -> GuestSpec {
        GuestSpec::new(vec!["t".into()], out.clone(), GuestOutput::discard(Stream::Stderr))
    }

    fn engine() -> (tempfile::TempDir, WasmEngine) {
        let dir = tempfile::tempdir().unwrap();
        let e = WasmEngine::new(dir.path().to_path_buf()).unwrap();
        (dir, e)
    }

    fn program(e: &WasmEngine, wat: &str) -> Program {
        let wasm = wat::parse_str(wat).unwrap();
        let digest = wasmlet_images::sha256_digest(&wasm);
        e.program("test", &digest, WasmKind::Module, || Ok(wasm)).unwrap()
    }

    #[tokio::test]
    async fn memory_growth_past_the_limit_is_out_of_memory() {
        let (_d, e) = engine();
        let p = program(
            &e,
            r#"(module (memory 1) (func (export "_start")
                 (drop (memory.grow (i32.const 100)))))"#,
        );
        let out = GuestOutput::discard(Stream::Stdout);
        let meter = Arc::new(GuestMeter::default());
        meter.memory_limit.store(1 << 20, Ordering::Relaxed);
        let outcome = e.run(&p, spec(&out), meter.clone()).await;
        assert_eq!(outcome, Outcome::OutOfMemory { limit: 1 << 20 });
        let meter = Arc::new(GuestMeter::default());
        assert_eq!(e.run(&p, spec(&out), meter.clone()).await, Outcome::Exited(0));
        assert_eq!(meter.memory_bytes.load(Ordering::Relaxed), 101 * 65536);
    }

    #[test]
    fn slots_follow_the_nodes_max_pods() {
        assert_eq!(slots_for_pods(110), 1_000);
        assert_eq!(slots_for_pods(10_000), 12_200);
        assert_eq!(slots_for_pods(100_000), MAX_POOL_SLOTS);
        let hint = slot_hint("maximum concurrent core instance limit of 3 reached".into());
        assert!(hint.contains("raise `instance_slots`, or [node] maxPods"), "{hint}");
        assert_eq!(slot_hint("other".into()), "other");
    }

    #[tokio::test]
    async fn a_full_pool_names_the_setting_that_raises_it() {
        let dir = tempfile::tempdir().unwrap();
        let e = WasmEngine::with_slots(dir.path().to_path_buf(), 1).unwrap();
        let p = program(&e, r#"(module (memory 1) (func (export "_start") (loop $l (br $l))))"#);
        let out = GuestOutput::discard(Stream::Stdout);
        let first = tokio::spawn(e.run(&p, spec(&out), Arc::new(GuestMeter::default())));
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        assert!(!first.is_finished(), "the first guest holds the one slot");
        match e.run(&p, spec(&out), Arc::new(GuestMeter::default())).await {
            Outcome::StartFailed(msg) => assert!(msg.contains("raise `instance_slots`, or [node] maxPods"), "{msg}"),
            other => panic!("{other:?}"),
        }
        first.abort();
    }

    #[tokio::test]
    async fn tables_count_against_the_memory_limit() {
        let (_d, e) = engine();
        // One page of memory and 100,000 table elements (800,000 bytes), grown by 50,000.
        let p = program(
            &e,
            r#"(module (memory 1) (table 100000 funcref) (func (export "_start")
                 (drop (table.grow (ref.null func) (i32.const 50000)))))"#,
        );
        let out = GuestOutput::discard(Stream::Stdout);
        let meter = Arc::new(GuestMeter::default());
        meter.memory_limit.store(512 << 10, Ordering::Relaxed);
        let outcome = e.run(&p, spec(&out), meter.clone()).await;
        assert_eq!(outcome, Outcome::OutOfMemory { limit: 512 << 10 });
        let meter = Arc::new(GuestMeter::default());
        assert_eq!(e.run(&p, spec(&out), meter.clone()).await, Outcome::Exited(0));
        assert_eq!(meter.memory_bytes.load(Ordering::Relaxed), 65536 + 150_000 * 8);
    }

    #[tokio::test]
    async fn exits_traps_and_missing_start() {
        let (_d, e) = engine();
        let exit = program(
            &e,
            r#"(module (import "wasi_snapshot_preview1" "proc_exit" (func $exit (param i32)))
                 (memory (export "memory") 1) (func (export "_start") (call $exit (i32.const 42))))"#,
        );
        let trap = program(&e, r#"(module (func (export "_start") unreachable))"#);
        let nostart = program(&e, r#"(module (func (export "main")))"#);
        let out = GuestOutput::discard(Stream::Stdout);
        let m = || Arc::new(GuestMeter::default());
        assert_eq!(e.run(&exit, spec(&out), m()).await, Outcome::Exited(42));
        match e.run(&trap, spec(&out), m()).await {
            Outcome::Trapped(msg) => assert!(msg.contains("unreachable"), "{msg}"),
            other => panic!("{other:?}"),
        }
        match e.run(&nostart, spec(&out), m()).await {
            Outcome::StartFailed(msg) => assert!(msg.contains("_start"), "{msg}"),
            other => panic!("{other:?}"),
        }
    }

    /// CPU cores `meter`'s guest used over `window`, from its meter.
    async fn cores_used(meter: &GuestMeter, window: Duration) -> f64 {
        let (t0, c0) = (std::time::Instant::now(), meter.cpu_nanos.load(Ordering::Relaxed));
        tokio::time::sleep(window).await;
        let used = meter.cpu_nanos.load(Ordering::Relaxed) - c0;
        used as f64 / t0.elapsed().as_nanos() as f64
    }

    const SPIN: &str = r#"(module (func (export "_start") (loop $l (br $l))))"#;

    /// Held by the tests that measure the CPU their guests get and by the one that compiles
    /// for seconds: beside each other, on the same cores, they would take each other's.
    static CPU_BOUND: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

    #[tokio::test]
    async fn a_cpu_quota_holds_a_spinning_guest_and_changes_while_it_runs() {
        let _alone = CPU_BOUND.lock().await;
        let (_d, e) = engine();
        let spin = program(&e, SPIN);
        let out = GuestOutput::discard(Stream::Stdout);
        let meter = Arc::new(GuestMeter::default());
        meter.cpu.set(20_000, 100_000, 0);
        let run = e.spawn(e.run(&spin, spec(&out), meter.clone()));
        tokio::time::sleep(Duration::from_millis(200)).await;
        let used = cores_used(&meter, Duration::from_millis(1000)).await;
        assert!((0.17..=0.23).contains(&used), "a 200m quota used {used:.3} cores");
        // UpdateContainerResources: a tenth of a core from now.
        meter.cpu.set(10_000, 100_000, 0);
        tokio::time::sleep(Duration::from_millis(200)).await;
        let used = cores_used(&meter, Duration::from_millis(1000)).await;
        assert!((0.08..=0.12).contains(&used), "a 100m quota used {used:.3} cores");
        let stat = meter.cpu.throttling();
        assert!(stat.throttled_periods >= 15 && stat.throttled_periods <= stat.periods, "{stat:?}");
        run.abort();
    }

    #[tokio::test]
    async fn busy_guests_split_saturated_cores_by_their_shares() {
        let _alone = CPU_BOUND.lock().await;
        let (_d, e) = engine();
        let spin = program(&e, SPIN);
        let out = GuestOutput::discard(Stream::Stdout);
        // Twice as many spinning guests as cores: half with requests.cpu 500m, half 1500m.
        let n = std::thread::available_parallelism().map_or(1, |n| n.get());
        let meters: Vec<_> = (0..2 * n)
            .map(|i| {
                let m = Arc::new(GuestMeter::default());
                m.cpu.set(0, 0, if i % 2 == 0 { 512 } else { 1536 });
                m
            })
            .collect();
        let runs: Vec<_> = meters.iter().map(|m| e.spawn(e.run(&spin, spec(&out), m.clone()))).collect();
        tokio::time::sleep(Duration::from_millis(300)).await;
        let before: Vec<u64> = meters.iter().map(|m| m.cpu_nanos.load(Ordering::Relaxed)).collect();
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let used: Vec<u64> = meters.iter().zip(before).map(|(m, b)| m.cpu_nanos.load(Ordering::Relaxed) - b).collect();
        let light: u64 = used.iter().step_by(2).sum();
        let heavy: u64 = used.iter().skip(1).step_by(2).sum();
        let ratio = heavy as f64 / light as f64;
        assert!((2.2..=4.0).contains(&ratio), "1500m against 500m got {ratio:.2} times the CPU: {used:?}");
        for r in runs {
            r.abort();
        }
    }

    #[tokio::test]
    async fn a_module_of_forty_thousand_functions_runs() {
        let _alone = CPU_BOUND.lock().await;
        let (_d, e) = engine();
        let n = 40_000;
        let mut wat = String::from("(module (type $f (func (result i32))) (table 40000 funcref)\n");
        for i in 0..n {
            wat.push_str(&format!("(func $f{i} (result i32) i32.const {i})\n"));
        }
        wat.push_str("(elem (i32.const 0) func");
        for i in 0..n {
            wat.push_str(&format!(" $f{i}"));
        }
        wat.push_str(")\n(memory 1) (memory 1)\n");
        wat.push_str(
            r#"(func (export "_start") (if (i32.ne (call_indirect (type $f) (i32.const 39999)) (i32.const 39999))
                 (then unreachable))))"#,
        );
        let p = program(&e, &wat);
        let out = GuestOutput::discard(Stream::Stdout);
        assert_eq!(e.run(&p, spec(&out), Arc::new(GuestMeter::default())).await, Outcome::Exited(0));
    }

    #[tokio::test]
    async fn a_spinning_guest_yields_and_can_be_dropped() {
        let (_d, e) = engine();
        let spin = program(&e, SPIN);
        let out = GuestOutput::discard(Stream::Stdout);
        let meter = Arc::new(GuestMeter::default());
        let run = e.spawn(e.run(&spin, spec(&out), meter.clone()));
        // The meter counts a poll's CPU when the poll ends: more than two ticks' worth shows
        // that a poll of the spinning guest itself ended, that is, it gave its thread back.
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while meter.cpu_nanos.load(Ordering::Relaxed) <= 2 * EPOCH_TICK.as_nanos() as u64 {
            assert!(std::time::Instant::now() < deadline, "the spinning guest never yielded");
            tokio::time::sleep(EPOCH_TICK).await;
        }
        run.abort();
        assert!(run.await.unwrap_err().is_cancelled());
    }
}
