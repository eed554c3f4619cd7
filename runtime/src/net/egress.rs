//! Connections wasmlet makes on a guest's behalf (outgoing wasi:http requests): the name is
//! resolved as the pod resolves names, a Service address is sent to one of its endpoints (see
//! [`services`](super::services)), and the socket is made in the namespace that reaches the
//! destination:
//! - the pod's own loopback and pod addresses: from inside the pod's namespace (its localhost
//!   is its own; in bridge mode the other pods are on the bridge);
//! - anything else: from inside the pod in cni mode (the plugins gave it routes out), else from
//!   the host's namespace, as the pod's DNS queries are (rootless pods have no route out, and
//!   the bridge has no NAT out).

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use super::dns::{LookupError, PodDns};
use super::services::{Protocol, ServiceTable};
use super::{Cidr, InNetns, NetNs};

/// Which destinations are dialled from inside the pod's namespace.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Inside {
    /// All of them (cni mode).
    Everything,
    /// Loopback and addresses in the pod range (rootless and bridge modes).
    LoopbackAnd(Cidr),
}

impl Inside {
    /// Whether `ip` is dialled from inside the pod.
    pub fn dials(&self, ip: IpAddr) -> bool {
        match self {
            Inside::Everything => true,
            Inside::LoopbackAnd(cidr) => ip.is_loopback() || matches!(ip, IpAddr::V4(v4) if cidr.contains(v4)),
        }
    }
}

/// What a guest's outgoing connections go through.
pub struct Egress {
    pub dns: Arc<PodDns>,
    /// The pod's namespace and the executor whose threads may enter it (None: a guest on the
    /// host's network).
    pub pod: Option<(tokio::runtime::Handle, Arc<NetNs>, Inside)>,
    /// Where the other connections are made: an executor whose threads stay in the host's
    /// namespace.
    pub host: tokio::runtime::Handle,
    pub services: Arc<ServiceTable>,
    /// The pod's address, which Service affinity keys on.
    pub client: IpAddr,
}

/// Why a connection was not made.
#[derive(Debug)]
pub enum ConnectError {
    /// The name did not resolve.
    Lookup(String, LookupError),
    /// A Service port with no ready endpoint (named).
    NoEndpoints(String),
    /// Not connected within the timeout.
    Timeout(SocketAddr),
    /// The kernel's answer (refused, unreachable, ...).
    Io(SocketAddr, io::Error),
}

impl std::fmt::Display for ConnectError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ConnectError::Lookup(name, e) => write!(f, "lookup {name}: {e:?}"),
            ConnectError::NoEndpoints(svc) => write!(f, "service {svc} has no ready endpoints"),
            ConnectError::Timeout(a) => write!(f, "connect {a}: timed out"),
            ConnectError::Io(a, e) => write!(f, "connect {a}: {e}"),
        }
    }
}

impl Egress {
    /// A TCP connection to `host:port`, trying each address `host` resolves to in turn.
    pub async fn connect(
        &self,
        host: &str,
        port: u16,
        timeout: Duration,
    ) -> Result<tokio::net::TcpStream, ConnectError> {
        let addrs =
            self.dns.clone().resolve(host.to_string()).await.map_err(|e| ConnectError::Lookup(host.into(), e))?;
        let mut last = ConnectError::Lookup(host.into(), LookupError::NotFound);
        for ip in addrs {
            let dst = match self.services.destination(self.client, SocketAddr::new(ip, port), Protocol::Tcp) {
                Ok(dst) => dst,
                Err(svc) => {
                    last = ConnectError::NoEndpoints(svc);
                    continue;
                }
            };
            match self.dial(dst, timeout).await {
                Ok(s) => return Ok(s),
                Err(e) => last = e,
            }
        }
        Err(last)
    }

    async fn dial(&self, dst: SocketAddr, timeout: Duration) -> Result<tokio::net::TcpStream, ConnectError> {
        let connect = async move {
            match tokio::time::timeout(timeout, tokio::net::TcpStream::connect(dst)).await {
                Ok(r) => r.map_err(|e| ConnectError::Io(dst, e)),
                Err(_) => Err(ConnectError::Timeout(dst)),
            }
        };
        // The socket belongs to the namespace of the thread that makes it.
        let joined = match &self.pod {
            Some((handle, ns, inside)) if inside.dials(dst.ip()) => handle
                .spawn(InNetns::new(ns.clone(), connect))
                .await
                .map(|r| r.unwrap_or_else(|e| Err(ConnectError::Io(dst, e)))),
            _ => self.host.spawn(connect).await,
        };
        joined.unwrap_or_else(|e| Err(ConnectError::Io(dst, io::Error::other(e))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn services_are_sent_to_an_endpoint_and_empty_ones_refused() {
        let server = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let target = server.local_addr().unwrap();
        let services = ServiceTable::new();
        let spec = |endpoints: Vec<SocketAddr>| super::super::services::ServicePortSpec {
            name: "ns/svc:http".into(),
            cluster_ip: "10.96.7.7".parse().unwrap(),
            port: 80,
            protocol: Protocol::Tcp,
            endpoints,
            affinity: None,
        };
        services.replace(vec![spec(vec![target])]);
        let handle = tokio::runtime::Handle::current();
        let egress = Egress {
            dns: Arc::new(PodDns::parse("", "10.96.7.7 web.ns.svc\n", handle.clone())),
            pod: None,
            host: handle,
            services: services.clone(),
            client: "10.88.0.2".parse().unwrap(),
        };
        let accept = tokio::spawn(async move { server.accept().await.map(|(_, peer)| peer) });
        let s = egress.connect("web.ns.svc", 80, Duration::from_secs(5)).await.unwrap();
        assert_eq!(s.peer_addr().unwrap(), target);
        accept.await.unwrap().unwrap();
        services.replace(vec![spec(vec![])]);
        let e = egress.connect("10.96.7.7", 80, Duration::from_secs(5)).await.unwrap_err();
        assert!(matches!(&e, ConnectError::NoEndpoints(s) if s == "ns/svc:http"), "{e}");
        let e = egress.connect("no.such.name", 80, Duration::from_secs(5)).await.unwrap_err();
        assert!(matches!(e, ConnectError::Lookup(_, LookupError::NotFound)), "{e}");
    }

    #[test]
    fn loopback_and_pod_addresses_are_dialled_inside() {
        let rootless = Inside::LoopbackAnd(Cidr::parse("10.88.0.0/16").unwrap());
        let inside = |ip: &str| rootless.dials(ip.parse().unwrap());
        assert!(inside("127.0.0.1") && inside("::1") && inside("10.88.3.4"));
        assert!(!inside("10.89.0.1") && !inside("192.0.2.10") && !inside("10.96.0.10"));
        assert!(Inside::Everything.dials("192.0.2.10".parse().unwrap()));
    }
}
