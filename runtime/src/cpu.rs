//! CPU held inside wasm, as the kernel's CFS holds a cgroup.
//!
//! Every poll of a guest's future is timed and charged to its container ([`Metered`]): that
//! is the CPU the stats report. Two controls act on the polls:
//!
//! - **Quota** (limits.cpu, the CFS quota and period): a container that used its quota in the
//!   current period waits for the next one. An overrun (a poll ends at the next epoch tick,
//!   not at the quota's last nanosecond) is paid back from the next period, so the average
//!   holds. Each container's periods start at a phase of its own ([`Phases`]): where its quota
//!   overlaps least with the quotas of the other limited containers, so that limited guests
//!   started together tile the period rather than all spend their quota at its top, saturate
//!   every core at once and leave the rest idle. (The kernel's CFS timers start wherever each
//!   cgroup first ran.)
//! - **Shares** (requests.cpu, the CFS weight): the node's cores are tokens, one per core. A
//!   poll holds one; when none is free the guest queues, and the token that frees next goes to
//!   the queued guest with the least weighted CPU time (its virtual runtime: CPU time scaled by
//!   1024 / shares). Busy guests thus split saturated cores in proportion to their shares,
//!   and with fewer busy guests than cores each runs unhindered, as under CFS. A guest well
//!   behind the running ones (one that slept, as a light server between requests) runs at
//!   once on a lent token and makes them yield, as a waking task preempts under CFS.

use std::cell::Cell;
use std::collections::{BTreeMap, HashSet};
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::task::{Context, Poll, Waker, ready};
use std::time::{Duration, Instant};

use crate::engine::GuestMeter;

/// The CFS period when the CRI gives none.
pub const DEFAULT_PERIOD: Duration = Duration::from_millis(100);
/// The shares of a container the CRI gives none (the kernel's default cpu.shares).
const DEFAULT_SHARES: u64 = 1024;
/// How far behind the busiest a guest that slept may place itself: CFS's half of its
/// latency target. Without a bound, a guest idle for an hour would own the cores for as long.
const SLEEPER_CREDIT_NANOS: u64 = 3_000_000;
/// How far behind the guests that run a queued one must be to preempt them (CFS's wakeup
/// granularity).
const WAKEUP_GRANULARITY_NANOS: u64 = 1_000_000;

/// A container's CPU controls and counters (shared by its exec'd and per-request instances).
#[derive(Debug, Default)]
pub struct Cpu {
    /// The quota per period in microseconds; 0: none.
    quota_micros: AtomicU64,
    period_micros: AtomicU64,
    /// 0: the default.
    shares: AtomicU64,
    /// CPU nanoseconds scaled by 1024 / shares.
    vruntime: AtomicU64,
    bucket: Mutex<Bucket>,
    /// Its place in [`Phases`] (0: none yet).
    phase: AtomicU64,
    periods: AtomicU64,
    throttled_periods: AtomicU64,
    throttled_nanos: AtomicU64,
}

/// What cgroup's cpu.stat says of throttling.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ThrottleStat {
    /// Periods in which the container ran.
    pub periods: u64,
    /// Periods in which it used its quota and waited.
    pub throttled_periods: u64,
    /// Time it spent waiting for a new period.
    pub throttled_nanos: u64,
}

impl Cpu {
    /// Sets the controls from the CRI's figures (quota and period in microseconds; a quota of
    /// 0 or less is no quota, a period of 0 the default; shares of 0 the default).
    pub fn set(&self, quota_micros: i64, period_micros: i64, shares: i64) {
        let period = if period_micros > 0 { period_micros as u64 } else { DEFAULT_PERIOD.as_micros() as u64 };
        self.period_micros.store(period, Ordering::Relaxed);
        self.quota_micros.store(quota_micros.max(0) as u64, Ordering::Relaxed);
        self.shares.store(shares.max(0) as u64, Ordering::Relaxed);
    }

    fn weight(&self) -> u64 {
        match self.shares.load(Ordering::Relaxed) {
            0 => DEFAULT_SHARES,
            s => s.clamp(2, 262_144),
        }
    }

    fn quota(&self) -> Option<(u64, Duration)> {
        let quota = self.quota_micros.load(Ordering::Relaxed);
        let period = self.period_micros.load(Ordering::Relaxed).max(1);
        (quota > 0).then(|| (quota * 1000, Duration::from_micros(period)))
    }

    /// None when the container may run now; else when its next period starts.
    fn admit(&self, now: Instant) -> Option<Instant> {
        let (quota, period) = self.quota()?;
        let mut bucket = self.bucket.lock().unwrap_or_else(|e| e.into_inner());
        let first = || {
            let (id, fraction) = Phases::node().place(quota as f64 / period.as_nanos().max(1) as f64);
            self.phase.store(id, Ordering::Relaxed);
            phase_start(now, period, fraction)
        };
        match bucket.admit(now, quota, period, first) {
            Admission::Run { new_period } => {
                if new_period {
                    self.periods.fetch_add(1, Ordering::Relaxed);
                }
                None
            }
            Admission::Wait { until, first, new_period } => {
                // A period counts once it starts, whether the guest runs in it or waits.
                if new_period {
                    self.periods.fetch_add(1, Ordering::Relaxed);
                }
                if first {
                    self.throttled_periods.fetch_add(1, Ordering::Relaxed);
                    self.throttled_nanos.fetch_add((until - now).as_nanos() as u64, Ordering::Relaxed);
                }
                Some(until)
            }
        }
    }

    fn charge(&self, nanos: u64) {
        if self.quota().is_some() {
            self.bucket.lock().unwrap_or_else(|e| e.into_inner()).used += nanos;
        }
        self.vruntime.fetch_add(nanos.saturating_mul(DEFAULT_SHARES) / self.weight(), Ordering::Relaxed);
    }

    /// Throttling so far.
    pub fn throttling(&self) -> ThrottleStat {
        ThrottleStat {
            periods: self.periods.load(Ordering::Relaxed),
            throttled_periods: self.throttled_periods.load(Ordering::Relaxed),
            throttled_nanos: self.throttled_nanos.load(Ordering::Relaxed),
        }
    }
}

/// CPU used in the current period.
#[derive(Debug, Default)]
struct Bucket {
    start: Option<Instant>,
    /// Nanoseconds used since `start` (an overrun carried from earlier periods included).
    used: u64,
    throttled: bool,
}

#[derive(Debug, PartialEq, Eq)]
enum Admission {
    Run {
        new_period: bool,
    },
    /// `first`: the first wait of this period, which may be a new one (an overrun carried
    /// in can use up its quota before the guest runs in it).
    Wait {
        until: Instant,
        first: bool,
        new_period: bool,
    },
}

impl Bucket {
    /// Moves to the period `now` is in (paying an overrun from the periods passed; unused
    /// quota is not banked), then says whether the quota is left. `first` gives the start of
    /// the first period.
    fn admit(&mut self, now: Instant, quota: u64, period: Duration, first: impl FnOnce() -> Instant) -> Admission {
        let mut new_period = self.start.is_none();
        let start = *self.start.get_or_insert_with(first);
        if now >= start + period {
            let passed = ((now - start).as_nanos() / period.as_nanos()) as u32;
            self.start = Some(start + period * passed);
            self.used = self.used.saturating_sub(quota.saturating_mul(u64::from(passed)));
            self.throttled = false;
            new_period = true;
        }
        if self.used < quota {
            return Admission::Run { new_period };
        }
        let first = !std::mem::replace(&mut self.throttled, true);
        Admission::Wait { until: self.start.unwrap_or(now) + period, first, new_period }
    }
}

impl Drop for Cpu {
    fn drop(&mut self) {
        Phases::node().remove(*self.phase.get_mut());
    }
}

/// Where in the period the limited containers' periods start, and how much of it each one's
/// quota takes (fractions of a period): a new one is placed where its quota overlaps least
/// with the others', so that ten containers limited to a tenth of a core each tile the period.
struct Phases {
    /// The last id given, and every placed container's (id, phase, share).
    placed: Mutex<(u64, Vec<Placed>)>,
}

/// A placed container: its id, its phase and its quota's share of the period.
type Placed = (u64, f64, f64);

/// Past this many limited containers a new one is placed by the golden-ratio sequence, not by
/// comparing it with every other (which costs the square of their number).
const PHASES_COMPARED: usize = 256;

impl Phases {
    fn node() -> &'static Phases {
        static PHASES: Phases = Phases { placed: Mutex::new((0, Vec::new())) };
        &PHASES
    }

    /// Places a container whose quota is `share` of its period: (its id, its phase).
    fn place(&self, share: f64) -> (u64, f64) {
        let mut placed = self.placed.lock().unwrap_or_else(|e| e.into_inner());
        placed.0 += 1;
        let id = placed.0;
        let share = share.clamp(0.0, 1.0);
        let phase = if placed.1.len() < PHASES_COMPARED {
            least_overlap(&placed.1, share)
        } else {
            // The fractional part of id times the golden ratio.
            (id as f64 * 0.618_033_988_749_895).fract()
        };
        placed.1.push((id, phase, share));
        (id, phase)
    }

    fn remove(&self, id: u64) {
        if id != 0 {
            self.placed.lock().unwrap_or_else(|e| e.into_inner()).1.retain(|p| p.0 != id);
        }
    }
}

/// The phase at which a quota of `share` overlaps least with the `placed` ones (their ends,
/// and 0, are the candidates: the first of the best wins).
fn least_overlap(placed: &[Placed], share: f64) -> f64 {
    let candidates = std::iter::once(0.0).chain(placed.iter().map(|&(_, p, l)| (p + l).fract()));
    let mut best = (f64::INFINITY, 0.0);
    for c in candidates {
        let overlap: f64 = placed.iter().map(|&(_, p, l)| circular_overlap(c, share, p, l)).sum();
        if overlap < best.0 - 1e-9 {
            best = (overlap, c);
        }
    }
    best.1
}

/// How much `[a, a + l)` and `[b, b + m)` overlap on a circle of circumference 1.
fn circular_overlap(a: f64, l: f64, b: f64, m: f64) -> f64 {
    [-1.0, 0.0, 1.0].iter().map(|k| ((a + l).min(b + k + m) - a.max(b + k)).max(0.0)).sum()
}

/// The latest instant not after `now` at which a period of phase `fraction` starts (periods
/// counted from a fixed origin).
fn phase_start(now: Instant, period: Duration, fraction: f64) -> Instant {
    static ORIGIN: OnceLock<Instant> = OnceLock::new();
    let origin = *ORIGIN.get_or_init(|| now);
    let period = period.as_nanos().max(1);
    let offset = ((period as f64 * fraction) as u128).min(period - 1);
    let elapsed = now.saturating_duration_since(origin).as_nanos();
    let back = Duration::from_nanos(((elapsed + period - offset) % period) as u64);
    now.checked_sub(back).unwrap_or(now)
}

/// The node's cores as tokens, handed to queued guests least virtual runtime first.
struct Cores {
    state: Mutex<CoresState>,
    /// How many there are (and how many may be lent at most).
    cores: isize,
    /// Makes every running guest yield now ([`preempt_all`]; counted in unit tests).
    preempt: fn(),
}

struct CoresState {
    /// Tokens free; below zero, tokens lent to guests that preempted the running ones
    /// (at most one per core), which the next ones released pay back.
    free: isize,
    /// The least virtual runtime of the guests running or queued at the last release (CFS's
    /// min_vruntime); only grows. A guest that slept starts no further behind it than
    /// [`SLEEPER_CREDIT_NANOS`].
    min_vruntime: u64,
    /// Queued guests by (virtual runtime, ticket).
    queued: BTreeMap<(u64, u64), Waker>,
    /// Tickets handed a token they have not yet taken.
    granted: HashSet<u64>,
    next_ticket: u64,
    /// The virtual runtimes of the guests holding a token, as of when each took it or last
    /// kept it (a multiset, by count): a guest that queues well behind the furthest ahead of
    /// them preempts them, as a waking task preempts the running one under CFS.
    running: BTreeMap<u64, usize>,
}

impl CoresState {
    fn run(&mut self, vruntime: u64) {
        *self.running.entry(vruntime).or_default() += 1;
    }

    fn stop(&mut self, vruntime: u64) {
        if let Some(n) = self.running.get_mut(&vruntime) {
            *n -= 1;
            if *n == 0 {
                self.running.remove(&vruntime);
            }
        }
    }
}

thread_local! {
    /// This thread is polling a guest that holds a token: a guest polled inside it (none is
    /// today) runs on that token rather than wait for one it would be queued behind.
    static HOLDING: Cell<bool> = const { Cell::new(false) };
    /// The guest being polled was preempted at an epoch tick: it is still runnable.
    static PREEMPTED: Cell<bool> = const { Cell::new(false) };
    /// The guest just polled on this thread computes: its last run ended at an epoch tick
    /// (it may be waiting for its quota or a core since). Set by `Metered`, read by `tiered`.
    static COMPUTES: Cell<bool> = const { Cell::new(false) };
}

/// Runs a guest's future `fut` on the executor it was spawned on while it waits on I/O, and
/// on `batch` while it computes, moving it at each change. The executor where requests and
/// wakeups arrive then has idle threads: a light guest's request is polled when it arrives,
/// not after a computing guest's poll (up to an epoch tick) on the same thread. Dropping the
/// returned future drops `fut` wherever it is.
pub(crate) async fn tiered<F>(fut: F, batch: tokio::runtime::Handle) -> F::Output
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    /// Polls `fut` until it ends or its polls stop (`computing`: false) or start (true)
    /// ending in computation; `None` then.
    async fn until<F: Future>(fut: &mut Pin<Box<F>>, computing: bool) -> Option<F::Output> {
        std::future::poll_fn(|cx| {
            COMPUTES.set(false);
            match fut.as_mut().poll(cx) {
                Poll::Ready(v) => Poll::Ready(Some(v)),
                Poll::Pending if COMPUTES.replace(false) == computing => Poll::Pending,
                Poll::Pending => Poll::Ready(None),
            }
        })
        .await
    }
    /// The task on `batch`, aborted (dropping the guest) when the guest's owner goes away.
    struct Away<T>(tokio::task::JoinHandle<T>);
    impl<T> Drop for Away<T> {
        fn drop(&mut self) {
            self.0.abort();
        }
    }
    let mut fut = Box::pin(fut);
    loop {
        if let Some(v) = until(&mut fut, false).await {
            return v;
        }
        let mut away = Away(batch.spawn(async move {
            let v = until(&mut fut, true).await;
            (fut, v)
        }));
        match (&mut away.0).await {
            Ok((_, Some(v))) => return v,
            Ok((back, None)) => fut = back,
            Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
            // The batch executor shut down: so does the process.
            Err(_) => return std::future::pending().await,
        }
    }
}

/// The engines whose running guests a wakeup preempts (one in a wasmlet; tests make many).
static ENGINES: Mutex<Vec<wasmtime::EngineWeak>> = Mutex::new(Vec::new());

/// Registers `engine`: a guest that queues for a core behind guests with more virtual runtime
/// preempts them at once (an epoch tick now), as CFS's wakeup preemption does, instead of
/// waiting for the next tick.
pub(crate) fn preempts(engine: &wasmtime::Engine) {
    let mut engines = ENGINES.lock().unwrap_or_else(|e| e.into_inner());
    engines.retain(|e| e.upgrade().is_some());
    engines.push(engine.weak());
}

fn preempt_all() {
    for e in ENGINES.lock().unwrap_or_else(|e| e.into_inner()).iter() {
        if let Some(e) = e.upgrade() {
            e.increment_epoch();
        }
    }
}

/// Called by a store's epoch deadline callback: the guest polled on this thread yields
/// because its slice ended, not because it waits for anything.
pub(crate) fn preempted() {
    PREEMPTED.set(true);
}

impl Cores {
    /// The node's: one token per core wasmlet may use.
    fn node() -> &'static Cores {
        static CORES: OnceLock<Cores> = OnceLock::new();
        CORES.get_or_init(|| {
            let n = std::thread::available_parallelism().map_or(1, |n| n.get());
            Cores::new(n, preempt_all)
        })
    }

    fn new(n: usize, preempt: fn()) -> Cores {
        Cores {
            preempt,
            cores: n as isize,
            state: Mutex::new(CoresState {
                free: n as isize,
                min_vruntime: 0,
                queued: BTreeMap::new(),
                granted: HashSet::new(),
                next_ticket: 0,
                running: BTreeMap::new(),
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, CoresState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Ready once `cpu`'s guest holds a token, with the virtual runtime it runs under (to
    /// give to [`Cores::keep`] or [`Cores::release`]); `ticket` remembers its place across
    /// polls. `waking`: its last poll ended waiting (on I/O, a timer), not computing.
    fn acquire(&self, cpu: &Cpu, ticket: &mut Option<(u64, u64)>, cx: &mut Context<'_>, waking: bool) -> Poll<u64> {
        let mut s = self.lock();
        if let Some(key) = *ticket {
            if s.granted.remove(&key.1) {
                *ticket = None;
                let v = cpu.vruntime.load(Ordering::Relaxed);
                s.run(v);
                return Poll::Ready(v);
            }
            if let Some(w) = s.queued.get_mut(&key) {
                w.clone_from(cx.waker());
            }
            return Poll::Pending;
        }
        let floor = s.min_vruntime.saturating_sub(SLEEPER_CREDIT_NANOS);
        let v = cpu.vruntime.fetch_max(floor, Ordering::Relaxed).max(floor);
        if s.free > 0 {
            s.free -= 1;
            s.run(v);
            return Poll::Ready(v);
        }
        // Waking behind guests that ran more than it (it slept, or weighs more): it runs now,
        // on a token lent until one of them, told to yield at once, gives its own back.
        // (Queued instead, it would wait for that yield and the wakeup after it; and a
        // computing guest keeps a core's token while its thread waits for the core.) A guest
        // that computes queues: the epoch ticks share the cores among those.
        let ahead = s.running.last_key_value().map_or(0, |(&v, _)| v);
        if waking && v.saturating_add(WAKEUP_GRANULARITY_NANOS) < ahead && s.free > -self.cores {
            s.free -= 1;
            s.run(v);
            drop(s);
            (self.preempt)();
            return Poll::Ready(v);
        }
        let key = (v, s.next_ticket);
        s.next_ticket += 1;
        s.queued.insert(key, cx.waker().clone());
        *ticket = Some(key);
        Poll::Pending
    }

    /// Whether a guest preempted with `vruntime`, holding the token it took under `held`,
    /// keeps it (now under `vruntime`): unless a token is lent, which it pays back, or a
    /// queued guest is further behind, which the token then goes to when it is released.
    fn keep(&self, held: u64, vruntime: u64) -> bool {
        let mut s = self.lock();
        let keep = s.free >= 0 && s.queued.first_key_value().is_none_or(|(k, _)| k.0 >= vruntime);
        if keep {
            s.stop(held);
            s.run(vruntime);
        }
        keep
    }

    /// Gives a token back, held under `held` (none: granted but never taken), by a guest now
    /// at `vruntime`: to the queued guest with the least virtual runtime, if any.
    fn release(&self, held: Option<u64>, vruntime: u64) {
        let mut s = self.lock();
        if let Some(held) = held {
            s.stop(held);
        }
        // The least of the guests that still run or wait for a core, this one included: a
        // guest that ran far ahead must not lift the floor above guests running behind it.
        let queued = s.queued.first_key_value().map(|(k, _)| k.0);
        let running = s.running.first_key_value().map(|(&v, _)| v);
        let least = [queued, running].into_iter().flatten().fold(vruntime, u64::min);
        s.min_vruntime = s.min_vruntime.max(least);
        if s.free < 0 {
            // Pays back a lent token.
            s.free += 1;
            return;
        }
        match s.queued.pop_first() {
            Some(((_, ticket), waker)) => {
                s.granted.insert(ticket);
                drop(s);
                waker.wake();
            }
            None => s.free += 1,
        }
    }

    /// A queued or granted guest went away (killed): its place, or its token, is passed on.
    fn abandon(&self, key: (u64, u64)) {
        let mut s = self.lock();
        if s.queued.remove(&key).is_none() && s.granted.remove(&key.1) {
            drop(s);
            self.release(None, 0);
        }
    }
}

/// Gives the token back when the guest's poll ends, panics included, unless it is kept.
struct Holding<'a> {
    cpu: &'a Cpu,
    /// The virtual runtime the token is held under.
    held: u64,
    kept: bool,
}

impl Drop for Holding<'_> {
    fn drop(&mut self) {
        HOLDING.set(false);
        if !self.kept {
            Cores::node().release(Some(self.held), self.cpu.vruntime.load(Ordering::Relaxed));
        }
    }
}

/// A guest's future, timed and charged to its meter at each poll, and run only within its
/// container's quota and on a core token.
pub(crate) struct Metered<F> {
    inner: Pin<Box<F>>,
    meter: Arc<GuestMeter>,
    /// The container's meter, whose quota and shares apply.
    root: Arc<GuestMeter>,
    /// Throttled until the next period.
    wait: Option<Pin<Box<tokio::time::Sleep>>>,
    ticket: Option<(u64, u64)>,
    /// It was preempted holding a token and kept it for its next poll (under this virtual
    /// runtime).
    held: Option<u64>,
    /// Its last poll ended at an epoch tick: it computes rather than waits.
    computing: bool,
}

impl<F> Metered<F> {
    pub(crate) fn new(meter: Arc<GuestMeter>, inner: F) -> Metered<F> {
        let root = meter.root().clone();
        Metered { inner: Box::pin(inner), meter, root, wait: None, ticket: None, held: None, computing: false }
    }
}

impl<F: Future> Future for Metered<F> {
    type Output = F::Output;
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let r = self.as_mut().poll_guest(cx);
        COMPUTES.set(r.is_pending() && self.computing);
        r
    }
}

impl<F: Future> Metered<F> {
    fn poll_guest(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let this = &mut *self;
        let root = &this.root;
        let mut holding = if HOLDING.get() {
            None
        } else {
            loop {
                if let Some(wait) = this.wait.as_mut() {
                    ready!(wait.as_mut().poll(cx));
                    this.wait = None;
                }
                match root.cpu.admit(Instant::now()) {
                    Some(until) => {
                        if let Some(held) = this.held.take() {
                            Cores::node().release(Some(held), root.cpu.vruntime.load(Ordering::Relaxed));
                        }
                        this.wait = Some(Box::pin(tokio::time::sleep_until(until.into())));
                    }
                    None => break,
                }
            }
            let held = match this.held.take() {
                Some(held) => held,
                None => ready!(Cores::node().acquire(&root.cpu, &mut this.ticket, cx, !this.computing)),
            };
            HOLDING.set(true);
            PREEMPTED.set(false);
            Some(Holding { cpu: &root.cpu, held, kept: false })
        };
        thread_nice(if this.computing { COMPUTING_NICE } else { 0 });
        let started = Instant::now();
        let r = this.inner.as_mut().poll(cx);
        let spent = started.elapsed().as_nanos() as u64;
        this.meter.cpu_nanos.fetch_add(spent, Ordering::Relaxed);
        if let Some(parent) = &this.meter.counted_in {
            parent.cpu_nanos.fetch_add(spent, Ordering::Relaxed);
        }
        root.cpu.charge(spent);
        if let Some(h) = holding.as_mut() {
            // Preempted, it is polled again at once: it keeps the core unless a guest that
            // is owed more waits for one. (A guest waiting on I/O gives the core back.)
            this.computing = r.is_pending() && PREEMPTED.replace(false);
            if this.computing {
                let v = root.cpu.vruntime.load(Ordering::Relaxed);
                h.kept = Cores::node().keep(h.held, v);
                this.held = h.kept.then_some(v);
            }
        }
        r
    }
}

impl<F> Drop for Metered<F> {
    fn drop(&mut self) {
        if let Some(key) = self.ticket.take() {
            Cores::node().abandon(key);
        }
        if let Some(held) = self.held {
            Cores::node().release(Some(held), self.root.cpu.vruntime.load(Ordering::Relaxed));
        }
    }
}

/// The nice value of a thread while it polls a guest that computes: the host's own threads
/// (host-port forwarders, the CRI server, the kubelet) and guests that wait on I/O then get a
/// core at once when they wake, as CFS gives a waking task with a small weight's neighbour.
const COMPUTING_NICE: i32 = 10;

thread_local! {
    /// The nice value this thread was last set to.
    static NICE: Cell<i32> = const { Cell::new(0) };
}

/// Sets the calling thread's nice value, when the process may lower it again (a thread that
/// could only raise it would end up at the lowest priority for good).
fn thread_nice(nice: i32) {
    static MAY: OnceLock<bool> = OnceLock::new();
    if NICE.get() == nice || !*MAY.get_or_init(may_renice) {
        return;
    }
    if rustix::process::setpriority_process(Some(rustix::thread::gettid()), nice).is_ok() {
        NICE.set(nice);
    }
}

/// Whether a thread may raise its nice value and lower it back (CAP_SYS_NICE, or a nice
/// limit that allows it), tried on a thread of its own.
fn may_renice() -> bool {
    std::thread::spawn(|| {
        let me = Some(rustix::thread::gettid());
        rustix::process::setpriority_process(me, COMPUTING_NICE).is_ok()
            && rustix::process::setpriority_process(me, 0).is_ok()
    })
    .join()
    .unwrap_or(false)
}

/// CPU readings kept so that every reader of "nano-cores now" gets the same answer: a rate
/// over the newest reading at least a second old, not over whatever the last reader left.
#[derive(Debug, Default)]
pub struct CpuWindow {
    /// (nanoseconds since the epoch, cumulative CPU nanoseconds), oldest first, a second apart.
    samples: std::collections::VecDeque<(i64, u64)>,
}

const SAMPLE_EVERY_NANOS: i64 = 1_000_000_000;
const SAMPLES_KEPT: usize = 12;

impl CpuWindow {
    /// Nano-cores used up to `now` (when `cpu` was read); None with no earlier reading.
    pub fn rate(&mut self, now: i64, cpu: u64) -> Option<u64> {
        let base = self.samples.iter().rev().find(|(t, _)| now - t >= SAMPLE_EVERY_NANOS).or(self.samples.front());
        let rate = base.and_then(|&(t, c)| {
            let dt = (now - t) as u128;
            (dt > 0).then(|| (cpu.saturating_sub(c) as u128 * 1_000_000_000 / dt) as u64)
        });
        if self.samples.back().is_none_or(|(t, _)| now - t >= SAMPLE_EVERY_NANOS) {
            self.samples.push_back((now, cpu));
            if self.samples.len() > SAMPLES_KEPT {
                self.samples.pop_front();
            }
        }
        rate
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: u64 = 1_000_000;

    /// A guest that computes for its first `computing` polls, then waits once, then ends; it
    /// notes the thread of each poll, and whether it was dropped.
    struct TwoPhases {
        computing: usize,
        polls: Vec<String>,
        dropped: Arc<std::sync::atomic::AtomicBool>,
        waited: bool,
    }

    impl Future for TwoPhases {
        type Output = Vec<String>;
        fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Vec<String>> {
            let name = std::thread::current().name().unwrap_or_default().to_string();
            self.polls.push(name);
            if self.polls.len() <= self.computing {
                COMPUTES.set(true);
                cx.waker().wake_by_ref();
                return Poll::Pending;
            }
            if !std::mem::replace(&mut self.waited, true) {
                // Waits on something that wakes it from elsewhere.
                let w = cx.waker().clone();
                std::thread::spawn(move || w.wake());
                return Poll::Pending;
            }
            Poll::Ready(std::mem::take(&mut self.polls))
        }
    }

    impl Drop for TwoPhases {
        fn drop(&mut self) {
            self.dropped.store(true, Ordering::SeqCst);
        }
    }

    fn executors() -> (tokio::runtime::Runtime, tokio::runtime::Runtime) {
        let rt = |name: &str| {
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .thread_name(name)
                .enable_all()
                .build()
                .unwrap()
        };
        (rt("home"), rt("batch"))
    }

    #[test]
    fn a_computing_guest_runs_on_the_batch_executor_and_comes_back_to_wait() {
        let (home, batch) = executors();
        let dropped = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let guest = TwoPhases { computing: 3, polls: Vec::new(), dropped: dropped.clone(), waited: false };
        let polls = home.block_on(home.spawn(tiered(guest, batch.handle().clone()))).unwrap();
        // The first computing poll is at home; the rest of its computing on the batch
        // executor, where the poll that ends waiting also happens; the wake brings it home.
        assert_eq!(polls, ["home", "batch", "batch", "batch", "home"]);
        assert!(dropped.load(Ordering::SeqCst));
    }

    #[test]
    fn dropping_a_tiered_guest_drops_it_where_it_runs() {
        let (home, batch) = executors();
        let dropped = Arc::new(std::sync::atomic::AtomicBool::new(false));
        // It computes for good: it stays on the batch executor.
        let guest = TwoPhases { computing: usize::MAX, polls: Vec::new(), dropped: dropped.clone(), waited: false };
        let task = home.spawn(tiered(guest, batch.handle().clone()));
        std::thread::sleep(Duration::from_millis(20));
        assert!(!dropped.load(Ordering::SeqCst));
        task.abort();
        let deadline = Instant::now() + Duration::from_secs(10);
        while !dropped.load(Ordering::SeqCst) {
            assert!(Instant::now() < deadline, "the guest on the batch executor was never dropped");
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    #[test]
    fn a_bucket_runs_within_its_quota_and_pays_an_overrun_back() {
        let period = Duration::from_millis(100);
        let t0 = Instant::now();
        let mut b = Bucket::default();
        let admit = |b: &mut Bucket, t: Instant| b.admit(t, 20 * MS, period, || t0);
        assert_eq!(admit(&mut b, t0), Admission::Run { new_period: true });
        b.used = 25 * MS;
        let wait = Admission::Wait { until: t0 + period, first: true, new_period: false };
        assert_eq!(admit(&mut b, t0 + Duration::from_millis(30)), wait);
        let again = admit(&mut b, t0 + Duration::from_millis(40));
        assert_eq!(again, Admission::Wait { until: t0 + period, first: false, new_period: false });
        // The next period starts 5 ms in debt.
        assert_eq!(admit(&mut b, t0 + period), Admission::Run { new_period: true });
        assert_eq!(b.used, 5 * MS);
        // Idle periods pay debt but bank nothing.
        b.used = 0;
        assert_eq!(admit(&mut b, t0 + period * 5), Admission::Run { new_period: true });
        assert_eq!((b.used, b.start), (0, Some(t0 + period * 5)));
        // A debt of more than a quota (the quota was lowered): the new period starts spent,
        // and is still a new period (cpu.stat's nr_throttled never passes nr_periods).
        b.used = 45 * MS;
        let next = admit(&mut b, t0 + period * 6);
        assert_eq!(next, Admission::Wait { until: t0 + period * 7, first: true, new_period: true });
    }

    #[test]
    fn limited_containers_tile_the_period() {
        // Ten quotas of a tenth: one after the other, no overlap.
        let mut placed = Vec::new();
        for id in 0..10 {
            let p = least_overlap(&placed, 0.1);
            placed.push((id, p, 0.1));
        }
        let mut phases: Vec<f64> = placed.iter().map(|p| p.1).collect();
        phases.sort_by(f64::total_cmp);
        for (i, p) in phases.iter().enumerate() {
            assert!((p - i as f64 / 10.0).abs() < 1e-9, "{phases:?}");
        }
        // An eleventh overlaps, but with as little as can be.
        let p = least_overlap(&placed, 0.1);
        let overlap: f64 = placed.iter().map(|&(_, b, m)| circular_overlap(p, 0.1, b, m)).sum();
        assert!((overlap - 0.1).abs() < 1e-9);
        // Overlaps wrap around the period's end.
        assert!((circular_overlap(0.95, 0.1, 0.0, 0.1) - 0.05).abs() < 1e-9);
        assert_eq!(circular_overlap(0.2, 0.1, 0.5, 0.1), 0.0);
        // A container that goes away frees its place.
        let phases = Phases { placed: Mutex::new((0, Vec::new())) };
        let (a, pa) = phases.place(0.5);
        let (_, pb) = phases.place(0.5);
        assert_eq!((pa, pb), (0.0, 0.5));
        phases.remove(a);
        assert_eq!(phases.place(0.5).1, 0.0);
    }

    #[test]
    fn a_phase_start_is_on_the_phase_and_not_after_now() {
        let period = Duration::from_millis(100);
        let now = Instant::now() + Duration::from_secs(1);
        for fraction in [0.0, 0.25, 0.999] {
            let start = phase_start(now, period, fraction);
            assert!(start <= now && now - start < period);
            let later = phase_start(now + Duration::from_millis(337), period, fraction);
            assert_eq!((later - start).as_nanos() % period.as_nanos(), 0, "the same phase");
        }
    }

    #[test]
    fn readers_of_the_cpu_rate_do_not_split_each_others_window() {
        const S: i64 = 1_000_000_000;
        let mut w = CpuWindow::default();
        assert_eq!(w.rate(0, 0), None);
        // Half a core throughout; two readers, 100 ms apart, each see half a core.
        assert_eq!(w.rate(S, 500_000_000), Some(500_000_000));
        assert_eq!(w.rate(S + S / 10, 550_000_000), Some(500_000_000));
        assert_eq!(w.rate(S + S / 10 + 1000, 550_000_500), Some(500_000_000));
        // Readings a second or more apart: the window reaches back to the newest one a
        // second old or more.
        assert_eq!(w.rate(3 * S, 1_000_000_000), Some(250_000_000));
        assert_eq!(w.rate(4 * S, 1_000_000_000), Some(0));
    }

    #[test]
    fn quota_and_shares_come_from_the_cri_figures() {
        let cpu = Cpu::default();
        cpu.set(20_000, 0, 0);
        assert_eq!(cpu.quota(), Some((20 * MS, DEFAULT_PERIOD)));
        assert_eq!(cpu.weight(), 1024);
        cpu.set(-1, 50_000, 512);
        assert_eq!((cpu.quota(), cpu.weight()), (None, 512));
        cpu.charge(MS);
        assert_eq!(cpu.vruntime.load(Ordering::Relaxed), 2 * MS);
    }

    fn waker() -> (Arc<std::sync::atomic::AtomicUsize>, Waker) {
        struct Count(Arc<std::sync::atomic::AtomicUsize>);
        impl std::task::Wake for Count {
            fn wake(self: Arc<Self>) {
                self.0.fetch_add(1, Ordering::Relaxed);
            }
        }
        let n = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        (n.clone(), Waker::from(Arc::new(Count(n))))
    }

    #[test]
    fn a_freed_core_goes_to_the_guest_furthest_behind() {
        let cores = Cores::new(1, count_preemption);
        let (busy, light, late) = (Cpu::default(), Cpu::default(), Cpu::default());
        // Both queue within the wakeup granularity of the running guest (further behind,
        // they would preempt it).
        busy.vruntime.store(50 * MS, Ordering::Relaxed);
        light.vruntime.store(49 * MS + MS / 5, Ordering::Relaxed);
        late.vruntime.store(49 * MS + MS / 2, Ordering::Relaxed);
        let (woken, w) = waker();
        let mut cx = Context::from_waker(&w);
        let (mut t_busy, mut t_late, mut t_light) = (None, None, None);
        assert!(cores.acquire(&busy, &mut t_busy, &mut cx, true).is_ready());
        assert!(cores.acquire(&late, &mut t_late, &mut cx, true).is_pending());
        assert!(cores.acquire(&light, &mut t_light, &mut cx, true).is_pending());
        cores.release(Some(50 * MS), busy.vruntime.load(Ordering::Relaxed));
        assert_eq!(woken.load(Ordering::Relaxed), 1);
        assert!(cores.acquire(&late, &mut t_late, &mut cx, true).is_pending());
        assert_eq!(cores.acquire(&light, &mut t_light, &mut cx, true), Poll::Ready(49 * MS + MS / 5));
        // A killed waiter's grant is passed on, not lost.
        cores.release(Some(49 * MS + MS / 5), light.vruntime.load(Ordering::Relaxed));
        cores.abandon(t_late.unwrap());
        assert!(cores.acquire(&busy, &mut t_busy, &mut cx, true).is_ready());
    }

    #[test]
    fn a_guest_far_ahead_does_not_lift_the_floor_above_one_running_behind() {
        let cores = Cores::new(2, count_preemption);
        let (ahead, behind, sleeper) = (Cpu::default(), Cpu::default(), Cpu::default());
        ahead.vruntime.store(100 * MS, Ordering::Relaxed);
        behind.vruntime.store(10 * MS, Ordering::Relaxed);
        let (_, w) = waker();
        let mut cx = Context::from_waker(&w);
        assert!(cores.acquire(&ahead, &mut None, &mut cx, true).is_ready());
        assert!(cores.acquire(&behind, &mut None, &mut cx, true).is_ready());
        cores.release(Some(100 * MS), 101 * MS);
        // The sleeper starts its credit behind the guest still running, not behind the one
        // that left: it would otherwise queue behind that one and never preempt it.
        assert_eq!(cores.acquire(&sleeper, &mut None, &mut cx, true), Poll::Ready(10 * MS - SLEEPER_CREDIT_NANOS));
    }

    thread_local! {
        static PREEMPTIONS: Cell<usize> = const { Cell::new(0) };
    }

    fn count_preemption() {
        PREEMPTIONS.set(PREEMPTIONS.get() + 1);
    }

    #[test]
    fn a_guest_well_behind_the_running_ones_runs_at_once_on_a_lent_token() {
        let cores = Cores::new(2, count_preemption);
        let cpu = |ms: f64| {
            let c = Cpu::default();
            c.vruntime.store((ms * MS as f64) as u64, Ordering::Relaxed);
            c
        };
        let (a, b, light, close, late) = (cpu(50.0), cpu(20.0), cpu(30.0), cpu(49.5), cpu(29.5));
        let (_, w) = waker();
        let mut cx = Context::from_waker(&w);
        // Two guests take the two cores as they come, neither kept one at a preemption.
        assert_eq!(cores.acquire(&a, &mut None, &mut cx, true), Poll::Ready(50 * MS));
        assert_eq!(cores.acquire(&b, &mut None, &mut cx, true), Poll::Ready(20 * MS));
        // Within the wakeup granularity of the furthest ahead: it queues and waits its turn.
        assert!(cores.acquire(&close, &mut None, &mut cx, true).is_pending());
        assert_eq!(PREEMPTIONS.get(), 0);
        // Well behind the furthest ahead (a), though not behind b: it runs now, and the
        // running guests are told to yield.
        assert_eq!(cores.acquire(&light, &mut None, &mut cx, true), Poll::Ready(30 * MS));
        assert_eq!(PREEMPTIONS.get(), 1);
        // The first to yield pays the lent token back; the next keeps its own, as the queued
        // guest is not behind it.
        assert!(!cores.keep(50 * MS, 51 * MS));
        cores.release(Some(50 * MS), 51 * MS);
        assert!(cores.keep(20 * MS, 21 * MS));
        // A guest that computes queues wherever it is.
        assert!(cores.acquire(&cpu(0.0), &mut None, &mut cx, false).is_pending());
        assert_eq!(PREEMPTIONS.get(), 1);
        // With b at 21 ms and the light guest at 30 ms running, 29.5 ms is not behind.
        assert!(cores.acquire(&late, &mut None, &mut cx, true).is_pending());
        assert_eq!(PREEMPTIONS.get(), 1);
        // Guests that slept start at the floor (3 ms behind b's 20 ms): one token per core is
        // lent at most, then they queue.
        for lent in 1..=2 {
            assert_eq!(cores.acquire(&cpu(0.0), &mut None, &mut cx, true), Poll::Ready(17 * MS));
            assert_eq!(PREEMPTIONS.get(), 1 + lent);
        }
        assert!(cores.acquire(&cpu(0.0), &mut None, &mut cx, true).is_pending());
        assert_eq!(PREEMPTIONS.get(), 3);
    }

    #[test]
    fn a_sleeper_gets_bounded_credit() {
        let cores = Cores::new(1, count_preemption);
        let (old, idle) = (Cpu::default(), Cpu::default());
        old.vruntime.store(100 * MS, Ordering::Relaxed);
        let (_, w) = waker();
        let mut cx = Context::from_waker(&w);
        let mut t = None;
        assert!(cores.acquire(&old, &mut t, &mut cx, true).is_ready());
        cores.release(Some(100 * MS), old.vruntime.load(Ordering::Relaxed));
        assert!(cores.acquire(&idle, &mut t, &mut cx, true).is_ready());
        assert_eq!(idle.vruntime.load(Ordering::Relaxed), 100 * MS - SLEEPER_CREDIT_NANOS);
    }
}
