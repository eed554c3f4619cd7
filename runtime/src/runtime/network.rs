//! A sandbox's network: host, a namespace of its own (rootless) or CNI; host ports; pinning
//! so a restart keeps it; release.

use std::collections::HashMap;
use std::fs;
use std::path::PathBuf;
use std::sync::Arc;

use crate::engine::GuestNet;
use crate::model::*;
use crate::net::egress::Inside;
use crate::net::netns::Interface;
use crate::net::queues::{SocketClaim, queued_bytes};
use crate::net::{NetNs, NetworkMode, ports};
use crate::{Error, Result};

use super::spec::*;
use super::{PodNet, Runtime, State};

/// NetworkReady's reason in rootless mode: pods run and their host ports work, but they have no
/// pod IP the host can dial, which a kubelet's probes and Services need. (wasmlet's own
/// kubelet in `wasmlet run` needs none: it dials from inside the pods' namespaces.)
const ROOTLESS_REASON: &str = "RootlessPodNetwork";

impl Runtime {
    /// A TCP connection to `port` on a ready sandbox's loopback, made from inside its network
    /// (port forwarding). The error reads as Go's dialer words it.
    pub async fn connect_in_pod(&self, sandbox_id: &str, port: u16) -> Result<tokio::net::TcpStream> {
        let net = {
            let state = self.state();
            if !state.sandboxes.contains_key(sandbox_id) {
                return Err(Error::sandbox_not_found(sandbox_id));
            }
            state.guest_net(sandbox_id)?
        };
        let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
        let dial = move || std::net::TcpStream::connect_timeout(&addr, std::time::Duration::from_secs(10));
        let connected = tokio::task::spawn_blocking(move || match net {
            GuestNet::Pod(ns) => ns.run_inside(dial),
            GuestNet::Host | GuestNet::None => dial(),
        })
        .await
        .map_err(|e| Error::Internal(format!("dial task: {e}")))?;
        let tcp =
            connected.map_err(|e| Error::FailedPrecondition(wasmlet_streaming::go_dial_error("tcp4", addr, &e)))?;
        tcp.set_nonblocking(true).map_err(|e| Error::Internal(format!("socket: {e}")))?;
        tokio::net::TcpStream::from_std(tcp).map_err(|e| Error::Internal(format!("socket: {e}")))
    }

    /// How the guests of sandbox `id` on `net` reach out: a pod's DNS queries go out from its
    /// own namespace when it has routes (cni mode), else from the host's, on wasmlet's behalf;
    /// its outgoing connections as [`crate::net::egress`] says.
    pub(super) fn net_route(&self, id: &str, net: &GuestNet) -> NetRoute {
        let mode = self.inner.options.network.mode;
        let (pod, host) = (self.inner.engine.pod_handle(), self.inner.engine.host_handle());
        let dns = match (net, mode) {
            (GuestNet::Pod(ns), NetworkMode::Cni) => (pod.clone(), Some(ns.clone())),
            _ => (host.clone(), None),
        };
        // wasmlet's own pod ranges (bridge, rootless); CNI's pods have routes for everything.
        let inside = match self.inner.cidr {
            Some(cidr) => Inside::LoopbackAnd(cidr),
            None => Inside::Everything,
        };
        let egress = match net {
            GuestNet::Pod(ns) => Some((pod, ns.clone(), inside)),
            GuestNet::Host | GuestNet::None => None,
        };
        let client =
            self.state().nets.get(id).and_then(|n| n.ip).map_or(std::net::IpAddr::from([127, 0, 0, 1]), Into::into);
        NetRoute { dns, egress, host, services: self.inner.services.clone(), client }
    }

    /// Whether pods can get a network as a kubelet needs it: Ok with a word on the mode, or
    /// Err with the reason (a CamelCase word) and the message.
    pub fn network_status(&self) -> std::result::Result<String, (&'static str, String)> {
        let n = &self.inner.options.network;
        match (&self.inner.network_error, n.mode) {
            (Some(why), _) => Err(("NetworkPluginNotReady", why.clone())),
            // Pods run, but a kubelet that dials pod IPs from the host cannot reach them.
            (None, NetworkMode::Auto | NetworkMode::Rootless) => Err((
                ROOTLESS_REASON,
                format!(
                    "rootless: a network namespace per pod, addresses from {} that only the pod itself \
                     can reach, so none is reported as a pod IP (host ports reach the pods; {}); for pod \
                     IPs the host can reach, run wasmlet as root (bridge mode) or set [network] mode = \"cni\"",
                    n.pod_cidr,
                    match &self.inner.pasta {
                        Some(_) => "pods go out through pasta",
                        None => "pods have no way out: pasta (Debian's passt) was not found",
                    }
                ),
            )),
            (None, NetworkMode::Bridge) => {
                Ok(format!("bridge: a network namespace per pod on bridge {}, addresses from {}", n.bridge, n.pod_cidr))
            }
            (None, NetworkMode::Host) => Ok("host: every pod on the host's network".to_string()),
            (None, NetworkMode::Cni) => {
                Ok(format!("cni: network {}", self.inner.cni.as_ref().map(|c| c.name.as_str()).unwrap_or_default()))
            }
        }
    }

    /// Whether the host can reach the addresses this runtime gives pods, so that they are
    /// reported as pod IPs (not in rootless mode: they exist only inside each pod).
    pub fn pod_ips_reachable(&self) -> bool {
        !matches!(self.inner.options.network.mode, NetworkMode::Auto | NetworkMode::Rootless)
    }

    pub(super) fn uses_host_network(&self, spec: &SandboxSpec) -> bool {
        self.inner.options.network.mode == NetworkMode::Host || spec.network == NamespaceMode::Node
    }

    /// A network for a new sandbox: on the host's, or a namespace of its own with an address
    /// and its host ports bound (a port already taken fails here, with nothing kept).
    pub(super) fn setup_network(
        &self,
        id: &str,
        name: &str,
        spec: &SandboxSpec,
        host_ports: &[PortMapping],
    ) -> Result<PodNet> {
        if self.uses_host_network(spec) {
            return Ok(PodNet { ns: None, pasta: None, ip: None, forwards: Vec::new(), cni: None });
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
        let mut net = PodNet { ns: Some(ns.clone()), pasta: None, ip: Some(ip), forwards: Vec::new(), cni: None };
        // On the bridge the address is the pod's eth0's; rootless pods hold it on their loopback
        // (and on pasta's link, their way out).
        let configured = match &self.inner.bridge {
            Some(bridge) => bridge.attach(id, &ns, ip),
            None => ns.add_loopback_address(ip, 32).map(|()| {
                // Without its way out a pod still runs (and serves): a pasta that cannot start
                // here (no usable /dev/net/tun, say) is reported, not fatal.
                net.pasta = self.start_pasta(&ns, ip).unwrap_or_else(|e| {
                    tracing::warn!(sandbox = %id, error = %e, "the pod has no way out");
                    None
                });
            }),
        };
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
    pub(super) fn setup_cni(
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
            pasta: None,
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
    pub(super) fn forward_ports(&self, net: &mut PodNet, name: &str, host_ports: &[PortMapping]) -> Result<()> {
        let (Some(ns), Some(ip)) = (&net.ns, net.ip) else { return Ok(()) };
        for (m, socket) in ports::bind(name, host_ports)? {
            let target = std::net::SocketAddr::new(ip.into(), m.container_port as u16);
            let task = match socket {
                ports::Bound::Tcp(l) => self.inner.engine.spawn_forwarder(ports::forward(ns.clone(), l, target)),
                ports::Bound::Udp(u) => self.inner.engine.spawn_forwarder(ports::forward_udp(ns.clone(), u, target)),
            };
            net.forwards.push(task);
        }
        Ok(())
    }

    /// The network interfaces of each of `ids` that has a namespace of its own (host-network
    /// pods have none to report), read in one pass over the namespaces. A namespace that
    /// cannot be read is left out.
    pub async fn network_usage(&self, ids: &[&str]) -> HashMap<String, Vec<Interface>> {
        let (ids, namespaces): (Vec<String>, Vec<Arc<NetNs>>) = {
            let state = self.state();
            ids.iter().filter_map(|id| Some((id.to_string(), state.nets.get(*id)?.ns.clone()?))).unzip()
        };
        if namespaces.is_empty() {
            return HashMap::new();
        }
        let read = tokio::task::spawn_blocking(move || crate::net::netns::interfaces_of(namespaces)).await;
        let read = match read.map_err(std::io::Error::other).and_then(|r| r) {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the pods' network counters");
                return HashMap::new();
            }
        };
        ids.into_iter()
            .zip(read)
            .filter_map(|(id, r)| {
                r.inspect_err(|e| tracing::debug!(sandbox = %id, error = %e, "network counters"))
                    .ok()
                    .map(|ifs| (id, ifs))
            })
            .collect()
    }

    /// Reads what the sockets of each running container that claimed some hold in their
    /// queues (net::queues) into its meter, visiting each pod's namespace once (the host's
    /// tables for host-network pods). A namespace that cannot be read keeps its last figures.
    pub async fn sample_socket_queues(&self) {
        type Group = (Vec<Arc<crate::engine::GuestMeter>>, Vec<SocketClaim>);
        let (mut pods, mut host): (Vec<(Arc<NetNs>, Group)>, Vec<Group>) = (Vec::new(), Vec::new());
        {
            let state = self.state();
            let mut by_pod: HashMap<&str, Group> = HashMap::new();
            for e in state.containers.values().filter(|e| e.record.state == ContainerState::Running) {
                let claim = e.meter.sockets.lock().unwrap_or_else(|e| e.into_inner()).clone();
                if !claim.is_empty() {
                    let g = by_pod.entry(e.record.sandbox_id.as_str()).or_default();
                    g.0.push(e.meter.clone());
                    g.1.push(claim);
                }
            }
            for (id, g) in by_pod {
                match state.nets.get(id).map(|n| n.ns.clone()) {
                    Some(Some(ns)) => pods.push((ns, g)),
                    Some(None) => host.push(g),
                    None => {}
                }
            }
        }
        if pods.is_empty() && host.is_empty() {
            return;
        }
        let read = tokio::task::spawn_blocking(move || {
            let (namespaces, groups): (Vec<Arc<NetNs>>, Vec<Group>) = pods.into_iter().unzip();
            let (meters, claims): (Vec<_>, Vec<Vec<SocketClaim>>) = groups.into_iter().unzip();
            let inside = crate::net::netns::read_in_each(namespaces, move |i| queued_bytes(&claims[i]))?;
            let outside = host.iter().map(|g| queued_bytes(&g.1));
            let meters = meters.iter().chain(host.iter().map(|g| &g.0));
            for (meters, totals) in meters.zip(inside.into_iter().chain(outside)) {
                match totals {
                    Ok(totals) => {
                        for (m, t) in meters.iter().zip(totals) {
                            m.socket_bytes.store(t, std::sync::atomic::Ordering::Relaxed);
                        }
                    }
                    Err(e) => tracing::debug!(error = %e, "socket queues"),
                }
            }
            std::io::Result::Ok(())
        })
        .await;
        if let Err(e) = read.map_err(std::io::Error::other).and_then(|r| r) {
            tracing::warn!(error = %e, "cannot read the pods' socket queues");
        }
    }

    /// A rootless pod's pasta, when there is a pasta command.
    fn start_pasta(
        &self,
        ns: &Arc<NetNs>,
        ip: std::net::Ipv4Addr,
    ) -> std::io::Result<Option<crate::net::pasta::Pasta>> {
        let (Some(bin), Some(cidr)) = (&self.inner.pasta, self.inner.cidr) else { return Ok(None) };
        crate::net::pasta::Pasta::start(bin, ns, ip, cidr).map(Some).map_err(|e| {
            std::io::Error::new(
                e.kind(),
                format!("{e} (pasta gives rootless pods their way out; [network] pasta = \"\" runs them without one)"),
            )
        })
    }

    pub(super) fn netns_pin_path(&self, sandbox_id: &str) -> PathBuf {
        self.inner.run_dir.join("netns").join(sandbox_id)
    }

    /// Pins the namespace so it outlives this process (a bind mount: root only); returns where.
    pub(super) fn pin_network(&self, sandbox_id: &str, ns: &NetNs) -> std::io::Result<PathBuf> {
        let path = self.netns_pin_path(sandbox_id);
        fs::create_dir_all(self.inner.run_dir.join("netns"))?;
        ns.pin(&path)?;
        Ok(path)
    }

    /// The network of a ready sandbox loaded from the journal: its pinned namespace, address
    /// and host ports again; None if the namespace did not survive.
    pub(super) fn restore_network(&self, state: &mut State, sandbox: &SandboxRecord) -> Option<PodNet> {
        let ns = NetNs::open_pinned(&self.netns_pin_path(&sandbox.id)).ok().flatten()?;
        let ip: std::net::Ipv4Addr = sandbox.ip.parse().ok()?;
        if let Some(ipam) = state.ipam.as_mut() {
            ipam.reserve(ip);
        }
        let cni = self.inner.cni.as_ref().map(|_| (pod_identity(&sandbox.spec), None));
        let ns = Arc::new(ns);
        // A restored rootless pod gets a new pasta (the old one died with the old process).
        let pasta = match (&self.inner.bridge, &cni) {
            (None, None) => self.start_pasta(&ns, ip).unwrap_or_else(|e| {
                tracing::error!(sandbox = %sandbox.id, error = %e, "pasta of a restored pod");
                None
            }),
            _ => None,
        };
        let mut net = PodNet { ns: Some(ns), pasta, ip: Some(ip), forwards: Vec::new(), cni };
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
    pub(super) fn release_network(&self, sandbox_id: &str, net: PodNet) -> Vec<tokio::task::JoinHandle<()>> {
        if let (Some(ip), Some(ipam)) = (net.ip, self.state().ipam.as_mut()) {
            ipam.release(ip);
        }
        if let (Some(bridge), Some(_)) = (&self.inner.bridge, &net.ns)
            && let Err(e) = bridge.detach(sandbox_id)
        {
            tracing::error!(sandbox = %sandbox_id, error = %e, "remove the pod's veth");
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
    pub(super) async fn drop_network(&self, id: &str) {
        let Some(net) = self.state().nets.remove(id) else { return };
        // CNI DEL runs plugins: off the executor.
        let (rt, sandbox) = (self.clone(), id.to_string());
        let forwards = match tokio::task::spawn_blocking(move || rt.release_network(&sandbox, net)).await {
            Ok(forwards) => forwards,
            Err(e) => {
                tracing::error!(sandbox = %id, error = %e, "release the pod network");
                Vec::new()
            }
        };
        // Aborted: awaiting them waits until their listeners are closed.
        for f in forwards {
            let _ = f.await;
        }
    }
}
