//! Services at the socket layer: when a guest connects to a Service's ClusterIP and port,
//! wasmlet connects it to one of the Service's ready endpoints instead, as kube-proxy's rules
//! would have rewritten the packets. Round robin over the endpoints the watcher chose (ready
//! ones, or serving terminating ones when none is ready);
//! `sessionAffinity: ClientIP` keeps a client on its endpoint for the affinity's timeout; a
//! Service port with no endpoint refuses the connection (kube-proxy's REJECT).
//!
//! The table is filled by whoever watches the API (`wasmlet node`); it is empty otherwise, and
//! every address then goes where it says.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

/// A transport protocol of a Service port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Protocol {
    Tcp,
    Udp,
}

/// One Service port as the API describes it, with the endpoints to use.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServicePortSpec {
    /// `namespace/name:port`, for errors and logs.
    pub name: String,
    /// The ClusterIP (one per family for a dual-stack Service: one spec each).
    pub cluster_ip: IpAddr,
    pub port: u16,
    pub protocol: Protocol,
    /// The endpoints to use (ready ones, or serving terminating ones when none is ready), with
    /// the target port resolved, in a stable order.
    pub endpoints: Vec<SocketAddr>,
    /// `sessionAffinity: ClientIP` and its timeout.
    pub affinity: Option<Duration>,
}

/// Where a connection goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    /// Not a Service address: as the guest asked.
    Direct,
    /// To this endpoint.
    To(SocketAddr),
    /// A Service port with no ready endpoint: refused, with the Service's name.
    Refused(String),
}

struct Port {
    spec: ServicePortSpec,
    next: AtomicUsize,
    /// Client address -> its endpoint and when it last connected (ClientIP affinity).
    sticky: Mutex<HashMap<IpAddr, (SocketAddr, Instant)>>,
}

/// The Service ports of the cluster, by (ClusterIP, port, protocol).
#[derive(Default)]
pub struct ServiceTable {
    ports: RwLock<HashMap<(IpAddr, u16, Protocol), Arc<Port>>>,
}

impl std::fmt::Debug for ServiceTable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServiceTable").field("ports", &self.len()).finish()
    }
}

impl ServiceTable {
    pub fn new() -> Arc<ServiceTable> {
        Arc::new(ServiceTable::default())
    }

    /// Replaces the whole table. A port that stays keeps its round-robin position and the
    /// affinities whose endpoint is still there.
    pub fn replace(&self, specs: Vec<ServicePortSpec>) {
        let mut ports = self.ports.write().unwrap_or_else(|e| e.into_inner());
        let mut next = HashMap::with_capacity(specs.len());
        for spec in specs {
            let key = (spec.cluster_ip, spec.port, spec.protocol);
            let port = match ports.remove(&key) {
                Some(old) if old.spec == spec => old,
                Some(old) => {
                    let mut sticky = std::mem::take(&mut *old.sticky.lock().unwrap_or_else(|e| e.into_inner()));
                    sticky.retain(|_, (ep, _)| spec.endpoints.contains(ep));
                    if spec.affinity.is_none() {
                        sticky.clear();
                    }
                    let n = old.next.load(Ordering::Relaxed);
                    Arc::new(Port { spec, next: AtomicUsize::new(n), sticky: Mutex::new(sticky) })
                }
                None => Arc::new(Port { spec, next: AtomicUsize::new(0), sticky: Mutex::new(HashMap::new()) }),
            };
            next.insert(key, port);
        }
        *ports = next;
    }

    pub fn len(&self) -> usize {
        self.ports.read().unwrap_or_else(|e| e.into_inner()).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The address a connection from `client` to `dst` is made to: `dst` itself, or a Service's
    /// endpoint; Err with the Service's name when it has none (the connection is refused).
    pub fn destination(&self, client: IpAddr, dst: SocketAddr, protocol: Protocol) -> Result<SocketAddr, String> {
        match self.route(client, dst, protocol) {
            Route::Direct => Ok(dst),
            Route::To(endpoint) => Ok(endpoint),
            Route::Refused(service) => Err(service),
        }
    }

    /// Whether `endpoint` is still one of the endpoints of the Service port at `dst` (a UDP
    /// flow keeps its endpoint while it is, as a conntrack entry does).
    pub fn serves(&self, dst: SocketAddr, protocol: Protocol, endpoint: SocketAddr) -> bool {
        let ports = self.ports.read().unwrap_or_else(|e| e.into_inner());
        ports.get(&(dst.ip(), dst.port(), protocol)).is_some_and(|p| p.spec.endpoints.contains(&endpoint))
    }

    /// Where a connection from `client` to `dst` goes.
    pub fn route(&self, client: IpAddr, dst: SocketAddr, protocol: Protocol) -> Route {
        self.route_at(client, dst, protocol, Instant::now())
    }

    fn route_at(&self, client: IpAddr, dst: SocketAddr, protocol: Protocol, now: Instant) -> Route {
        let port = {
            let ports = self.ports.read().unwrap_or_else(|e| e.into_inner());
            match ports.get(&(dst.ip(), dst.port(), protocol)) {
                Some(p) => p.clone(),
                None => return Route::Direct,
            }
        };
        let endpoints = &port.spec.endpoints;
        if endpoints.is_empty() {
            return Route::Refused(port.spec.name.clone());
        }
        let mut sticky = port.spec.affinity.map(|t| (t, port.sticky.lock().unwrap_or_else(|e| e.into_inner())));
        if let Some((timeout, map)) = sticky.as_mut() {
            if let Some((ep, last)) = map.get_mut(&client)
                && now.duration_since(*last) <= *timeout
                && endpoints.contains(ep)
            {
                *last = now;
                return Route::To(*ep);
            }
            // Expired entries go as they are met, and all of them once the map is large.
            if map.len() > 4096 {
                map.retain(|_, (_, last)| now.duration_since(*last) <= *timeout);
            }
        }
        let ep = endpoints[port.next.fetch_add(1, Ordering::Relaxed) % endpoints.len()];
        if let Some((_, map)) = sticky.as_mut() {
            map.insert(client, (ep, now));
        }
        Route::To(ep)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(endpoints: &[&str], affinity: Option<Duration>) -> ServicePortSpec {
        ServicePortSpec {
            name: "default/web:http".into(),
            cluster_ip: "10.96.0.20".parse().unwrap(),
            port: 80,
            protocol: Protocol::Tcp,
            endpoints: endpoints.iter().map(|e| e.parse().unwrap()).collect(),
            affinity,
        }
    }

    const VIP: &str = "10.96.0.20:80";
    fn client(n: u8) -> IpAddr {
        IpAddr::from([10, 88, 0, n])
    }

    #[test]
    fn round_robin_over_the_endpoints_and_direct_elsewhere() {
        let t = ServiceTable::new();
        t.replace(vec![spec(&["10.88.0.5:8080", "10.88.0.6:8080"], None)]);
        let got: Vec<Route> = (0..4).map(|_| t.route(client(2), VIP.parse().unwrap(), Protocol::Tcp)).collect();
        let a = Route::To("10.88.0.5:8080".parse().unwrap());
        let b = Route::To("10.88.0.6:8080".parse().unwrap());
        assert_eq!(got, vec![a.clone(), b.clone(), a, b]);
        // Another port, another protocol, another address: not the Service.
        assert_eq!(t.route(client(2), "10.96.0.20:81".parse().unwrap(), Protocol::Tcp), Route::Direct);
        assert_eq!(t.route(client(2), VIP.parse().unwrap(), Protocol::Udp), Route::Direct);
        assert_eq!(t.route(client(2), "10.88.0.5:8080".parse().unwrap(), Protocol::Tcp), Route::Direct);
    }

    #[test]
    fn no_endpoint_is_refused_with_the_service_name() {
        let t = ServiceTable::new();
        t.replace(vec![spec(&[], None)]);
        assert_eq!(t.route(client(2), VIP.parse().unwrap(), Protocol::Tcp), Route::Refused("default/web:http".into()));
    }

    #[test]
    fn client_ip_affinity_sticks_until_its_timeout_and_its_endpoint_goes() {
        let t = ServiceTable::new();
        let eps = ["10.88.0.5:8080", "10.88.0.6:8080", "10.88.0.7:8080"];
        t.replace(vec![spec(&eps, Some(Duration::from_secs(10)))]);
        let now = Instant::now();
        let at =
            |c: u8, s: u64| t.route_at(client(c), VIP.parse().unwrap(), Protocol::Tcp, now + Duration::from_secs(s));
        let first = at(2, 0);
        for s in 1..5 {
            assert_eq!(at(2, s), first, "client 2 sticks");
        }
        assert_ne!(at(3, 5), first, "another client gets the next endpoint");
        // Past the timeout since its last connection, client 2 is balanced again.
        assert_ne!(at(2, 30), first);
        // An endpoint that goes away (turns unready) takes its clients' affinity with it.
        let stuck = at(4, 40);
        let Route::To(stuck_ep) = stuck else { panic!("{stuck:?}") };
        let left: Vec<&str> = eps.iter().copied().filter(|e| e.parse::<SocketAddr>().unwrap() != stuck_ep).collect();
        t.replace(vec![spec(&left, Some(Duration::from_secs(10)))]);
        let now_route = t.route(client(4), VIP.parse().unwrap(), Protocol::Tcp);
        assert_ne!(now_route, stuck);
        assert!(matches!(now_route, Route::To(ep) if left.contains(&ep.to_string().as_str())));
    }

    #[test]
    fn a_replaced_table_forgets_services_that_went() {
        let t = ServiceTable::new();
        t.replace(vec![spec(&["10.88.0.5:8080"], None)]);
        assert_eq!(t.len(), 1);
        t.replace(vec![]);
        assert!(t.is_empty());
        assert_eq!(t.route(client(2), VIP.parse().unwrap(), Protocol::Tcp), Route::Direct);
    }
}
