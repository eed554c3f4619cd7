//! Pod networking: a network namespace per pod (see [`netns`]), the pod's address, and host
//! ports forwarded into it (see [`ports`]).
//!
//! Modes (the config file's `[network] mode`):
//! - `auto` (the default): `bridge` as root, `rootless` otherwise.
//! - `bridge` (root): a namespace per pod on a bridge of wasmlet's own (see [`bridge`]): the
//!   pod IP is on the pod's `eth0` and the host reaches it through the bridge.
//! - `rootless`: no privilege needed. When not root, wasmlet enters a user namespace of its own
//!   at start-up (before any thread exists) and is root only there; pod namespaces belong to it.
//!   A pod's namespace has its loopback and the pod IP (from `pod_cidr`) on it; the host reaches
//!   the pod through its port mappings, which wasmlet forwards from the host's namespace.
//! - `cni` (nodes, root): a namespace per pod configured by CNI plugins (see [`cni`]): a
//!   routable pod IP, routes out, teardown at StopPodSandbox.
//! - `host`: no namespaces at all; every pod shares the host's network (a development aid).

pub mod bridge;
pub mod cni;
pub mod connect;
pub mod dns;
pub mod egress;
pub mod listeners;
pub mod lookup;
pub mod netlink;
pub mod netns;
pub mod pasta;
pub mod ports;
pub mod queues;
pub mod services;

use std::collections::BTreeSet;
use std::future::Future;
use std::net::Ipv4Addr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use serde::{Deserialize, Serialize};

pub use netns::{NetNs, Pool};

/// How pods get their network.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NetworkMode {
    /// `Bridge` as root, `Rootless` otherwise (see [`NetworkMode::resolve`]).
    #[default]
    Auto,
    /// A namespace per pod on wasmlet's own bridge (root).
    Bridge,
    /// A namespace per pod, set up by wasmlet itself; no privilege needed.
    Rootless,
    /// A namespace per pod, set up by CNI plugins (root).
    Cni,
    /// Every pod on the host's network.
    Host,
}

impl NetworkMode {
    /// The mode `Auto` stands for: `Bridge` for a process that is root in the host's user
    /// namespace (only it can make links the host sees), `Rootless` otherwise.
    pub fn resolve(self) -> NetworkMode {
        match self {
            NetworkMode::Auto if real_root() => NetworkMode::Bridge,
            NetworkMode::Auto => NetworkMode::Rootless,
            m => m,
        }
    }
}

/// Whether this process is root in the initial user namespace (not merely in one of its own).
pub fn real_root() -> bool {
    rustix::process::geteuid().is_root()
        && std::fs::read_to_string("/proc/self/uid_map").is_ok_and(|m| initial_uid_map(&m))
}

/// Whether a `uid_map` is the initial namespace's: every uid mapped to itself.
fn initial_uid_map(map: &str) -> bool {
    let fields: Vec<&str> = map.split_whitespace().collect();
    fields == ["0", "0", "4294967295"]
}

/// Network settings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NetworkOptions {
    /// See [`NetworkMode`].
    pub mode: NetworkMode,
    /// Pod addresses are taken from this IPv4 range (bridge and rootless modes; the bridge
    /// holds its first address).
    pub pod_cidr: String,
    /// The bridge the pods are on (bridge mode).
    pub bridge: String,
    /// Bridge mode: pods' traffic to other machines leaves behind the host's address
    /// (nftables masquerade, with the host's IPv4 forwarding turned on), as a container
    /// runtime's default network does. Off (the default): pods reach each other and the host,
    /// nothing past it.
    pub masquerade: bool,
    /// Where CNI network configurations are (cni mode).
    pub cni_conf_dir: std::path::PathBuf,
    /// Where CNI plugins are (cni mode).
    pub cni_bin_dirs: Vec<std::path::PathBuf>,
    /// The pasta command (Debian's `passt`) that gives rootless pods a way out: a path, or a
    /// name searched along PATH; empty for none.
    pub pasta: String,
}

impl Default for NetworkOptions {
    fn default() -> NetworkOptions {
        NetworkOptions {
            mode: NetworkMode::Auto,
            pod_cidr: "10.88.0.0/16".into(),
            bridge: "wasmlet0".into(),
            masquerade: false,
            cni_conf_dir: "/etc/cni/net.d".into(),
            cni_bin_dirs: vec!["/opt/cni/bin".into(), "/usr/lib/cni".into()],
            pasta: "pasta".into(),
        }
    }
}

/// An IPv4 range `a.b.c.d/n`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    pub base: Ipv4Addr,
    pub prefix: u8,
}

impl Cidr {
    /// Parses `a.b.c.d/n` (n from 8 to 30).
    pub fn parse(s: &str) -> Result<Cidr, String> {
        let (addr, prefix) = s.split_once('/').ok_or_else(|| format!("pod CIDR {s:?}: expected a.b.c.d/n"))?;
        let base: Ipv4Addr = addr.parse().map_err(|e| format!("pod CIDR {s:?}: {e}"))?;
        let prefix: u8 = prefix.parse().map_err(|e| format!("pod CIDR {s:?}: {e}"))?;
        if !(8..=30).contains(&prefix) {
            return Err(format!("pod CIDR {s:?}: the prefix length must be from 8 to 30"));
        }
        let mask = u32::MAX << (32 - prefix);
        Ok(Cidr { base: Ipv4Addr::from(u32::from(base) & mask), prefix })
    }

    /// Whether `ip` is in the range.
    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        let mask = u32::MAX << (32 - self.prefix);
        u32::from(ip) & mask == u32::from(self.base)
    }

    /// Its first host address: the pods' gateway.
    pub fn gateway(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.base) + 1)
    }

    /// How many host addresses it has (network and broadcast addresses excluded).
    fn hosts(&self) -> u32 {
        (1u32 << (32 - self.prefix)) - 2
    }
}

/// Hands out pod addresses: the lowest free one, skipping the first (kept for a gateway).
#[derive(Debug)]
pub struct Ipam {
    cidr: Cidr,
    used: BTreeSet<Ipv4Addr>,
}

impl Ipam {
    /// An allocator over `cidr`.
    pub fn new(cidr: Cidr) -> Ipam {
        Ipam { cidr, used: BTreeSet::new() }
    }

    /// Marks `ip` taken (a sandbox loaded from the journal).
    pub fn reserve(&mut self, ip: Ipv4Addr) {
        self.used.insert(ip);
    }

    /// The lowest free address; None when the range is full.
    pub fn allocate(&mut self) -> Option<Ipv4Addr> {
        let base = u32::from(self.cidr.base);
        (2..=self.cidr.hosts()).map(|n| Ipv4Addr::from(base + n)).find(|ip| !self.used.contains(ip)).inspect(|ip| {
            self.used.insert(*ip);
        })
    }

    /// Gives `ip` back.
    pub fn release(&mut self, ip: Ipv4Addr) {
        self.used.remove(&ip);
    }

    /// The prefix length of the range.
    pub fn prefix(&self) -> u8 {
        self.cidr.prefix
    }
}

/// Runs `fut` with every poll inside the network namespace `ns`, so sockets it creates are the
/// pod's. Fails (without polling `fut`) if the thread cannot enter it.
pub struct InNetns<F> {
    ns: Arc<NetNs>,
    inner: Pin<Box<F>>,
}

impl<F> InNetns<F> {
    pub fn new(ns: Arc<NetNs>, fut: F) -> InNetns<F> {
        InNetns { ns, inner: Box::pin(fut) }
    }
}

impl<F: Future> Future for InNetns<F> {
    type Output = std::io::Result<F::Output>;
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        if let Err(e) = self.ns.enter() {
            return Poll::Ready(Err(e));
        }
        self.inner.as_mut().poll(cx).map(Ok)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cidr_and_addresses() {
        let c = Cidr::parse("10.88.7.9/16").unwrap();
        assert_eq!(c.base, Ipv4Addr::new(10, 88, 0, 0));
        assert!(Cidr::parse("10.88.0.0").unwrap_err().contains("a.b.c.d/n"));
        assert!(Cidr::parse("10.88.0.0/31").unwrap_err().contains("from 8 to 30"));
        assert!(Cidr::parse("10.88.0.300/16").is_err());
        let mut ipam = Ipam::new(Cidr::parse("10.1.2.0/30").unwrap());
        // A /30 has two host addresses; the first is kept for a gateway.
        assert_eq!(ipam.allocate(), Some(Ipv4Addr::new(10, 1, 2, 2)));
        assert_eq!(ipam.allocate(), None);
        ipam.release(Ipv4Addr::new(10, 1, 2, 2));
        assert_eq!(ipam.allocate(), Some(Ipv4Addr::new(10, 1, 2, 2)));
        let mut ipam = Ipam::new(Cidr::parse("10.88.0.0/16").unwrap());
        ipam.reserve(Ipv4Addr::new(10, 88, 0, 2));
        assert_eq!(ipam.allocate(), Some(Ipv4Addr::new(10, 88, 0, 3)));
        assert_eq!(c.gateway(), Ipv4Addr::new(10, 88, 0, 1));
    }

    #[test]
    fn only_the_initial_user_namespace_is_real_root() {
        assert!(initial_uid_map("         0          0 4294967295\n"));
        assert!(!initial_uid_map("         0       1000          1\n"));
        assert!(!initial_uid_map(""));
        assert_eq!(NetworkMode::Cni.resolve(), NetworkMode::Cni);
        assert_ne!(NetworkMode::Auto.resolve(), NetworkMode::Auto);
    }
}
