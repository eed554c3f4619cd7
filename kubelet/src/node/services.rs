//! Services without kube-proxy: the node watches Services and EndpointSlices and turns them
//! into the Service ports its guests' connections go through (the runtime's Service table).
//! What kube-proxy would program into iptables, computed here as plain data:
//! - every ClusterIP (both families of a dual-stack Service) and port of a Service that has
//!   one (not headless, not ExternalName);
//! - its endpoints: the addresses of the Service's EndpointSlices (label
//!   `kubernetes.io/service-name`) of the ClusterIP's family, with the slice port whose name
//!   and protocol are the Service port's; ready ones, or, when none is ready, the serving
//!   terminating ones (kube-proxy's fallback), never the others;
//! - `sessionAffinity: ClientIP` with its timeout (10800 s by default).
//!
//! A Service port no slice port matches has no endpoint (connections are refused, as
//! kube-proxy's REJECT rule does); a slice of a Service that does not exist is ignored.

use std::collections::{BTreeSet, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::Api;
use kube::runtime::reflector::{self, Store, reflector};
use kube::runtime::{WatchStreamExt, watcher};

/// The label an EndpointSlice names its Service with.
const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";
/// `sessionAffinityConfig.clientIP.timeoutSeconds` when unset.
const DEFAULT_AFFINITY_SECONDS: u64 = 10_800;

/// A transport protocol wasmlet routes (SCTP Services are left to the network).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    Tcp,
    Udp,
}

/// One Service port as the runtime's table wants it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceRoute {
    /// `namespace/name:port` (the port's name, or its number when unnamed).
    pub name: String,
    pub cluster_ip: IpAddr,
    pub port: u16,
    pub protocol: Protocol,
    /// Sorted, without duplicates.
    pub endpoints: Vec<SocketAddr>,
    pub affinity: Option<Duration>,
}

/// The routes of `services` over `slices`.
pub fn routes(services: &[Arc<Service>], slices: &[Arc<EndpointSlice>]) -> Vec<ServiceRoute> {
    // Slices by (namespace, service name).
    let mut by_service: HashMap<(&str, &str), Vec<&EndpointSlice>> = HashMap::new();
    for s in slices {
        let ns = s.metadata.namespace.as_deref().unwrap_or_default();
        if let Some(svc) = s.metadata.labels.as_ref().and_then(|l| l.get(SERVICE_NAME_LABEL)) {
            by_service.entry((ns, svc.as_str())).or_default().push(s);
        }
    }
    let mut out = Vec::new();
    for svc in services {
        let (Some(name), Some(spec)) = (svc.metadata.name.as_deref(), svc.spec.as_ref()) else { continue };
        let ns = svc.metadata.namespace.as_deref().unwrap_or_default();
        if spec.type_.as_deref() == Some("ExternalName") {
            continue;
        }
        let mut ips: Vec<IpAddr> = spec.cluster_ips.iter().flatten().filter_map(|ip| ip.parse().ok()).collect();
        if ips.is_empty()
            && let Some(ip) = spec.cluster_ip.as_deref().and_then(|ip| ip.parse().ok())
        {
            ips.push(ip);
        }
        let affinity = (spec.session_affinity.as_deref() == Some("ClientIP")).then(|| {
            let secs = spec
                .session_affinity_config
                .as_ref()
                .and_then(|c| c.client_ip.as_ref())
                .and_then(|c| c.timeout_seconds)
                .map_or(DEFAULT_AFFINITY_SECONDS, |s| s.max(1) as u64);
            Duration::from_secs(secs)
        });
        let slices = by_service.get(&(ns, name)).map(Vec::as_slice).unwrap_or_default();
        for port in spec.ports.iter().flatten() {
            let protocol = match port.protocol.as_deref().unwrap_or("TCP") {
                "TCP" => Protocol::Tcp,
                "UDP" => Protocol::Udp,
                _ => continue,
            };
            let Ok(number) = u16::try_from(port.port) else { continue };
            let port_name = port.name.as_deref().unwrap_or_default();
            for &ip in &ips {
                out.push(ServiceRoute {
                    name: format!(
                        "{ns}/{name}:{}",
                        if port_name.is_empty() { number.to_string() } else { port_name.into() }
                    ),
                    cluster_ip: ip,
                    port: number,
                    protocol,
                    endpoints: endpoints(slices, ip, port_name, protocol),
                    affinity,
                });
            }
        }
    }
    out
}

/// The endpoints of one Service port for the ClusterIP `ip`'s family.
fn endpoints(slices: &[&EndpointSlice], ip: IpAddr, port_name: &str, protocol: Protocol) -> Vec<SocketAddr> {
    let family = if ip.is_ipv4() { "IPv4" } else { "IPv6" };
    let proto = match protocol {
        Protocol::Tcp => "TCP",
        Protocol::Udp => "UDP",
    };
    let (mut ready, mut terminating) = (BTreeSet::new(), BTreeSet::new());
    for s in slices.iter().filter(|s| s.address_type == family) {
        let Some(target) = s.ports.iter().flatten().find(|p| {
            p.name.as_deref().unwrap_or_default() == port_name && p.protocol.as_deref().unwrap_or("TCP") == proto
        }) else {
            continue;
        };
        let Some(target) = target.port.and_then(|p| u16::try_from(p).ok()) else { continue };
        for e in s.endpoints.iter().flatten() {
            let c = e.conditions.as_ref();
            // Unset conditions mean ready and serving, not terminating.
            let is_ready = c.and_then(|c| c.ready).unwrap_or(true);
            let serving = c.and_then(|c| c.serving).unwrap_or(is_ready);
            let is_terminating = c.and_then(|c| c.terminating).unwrap_or(false);
            for a in e.addresses.iter().filter_map(|a| a.parse::<IpAddr>().ok()) {
                let addr = SocketAddr::new(a, target);
                if is_ready && !is_terminating {
                    ready.insert(addr);
                } else if serving && is_terminating {
                    terminating.insert(addr);
                }
            }
        }
    }
    if ready.is_empty() { terminating } else { ready }.into_iter().collect()
}

/// Watches EndpointSlices and, with the Services of `services` (whose watch bumps `changed`),
/// hands every new set of routes to `sink`, until aborted.
pub async fn watch(
    client: kube::Client,
    services: Store<Service>,
    changed: tokio::sync::watch::Receiver<()>,
    sink: Arc<dyn Fn(Vec<ServiceRoute>) + Send + Sync>,
) {
    let (slices, slices_w) = reflector::store::<EndpointSlice>();
    let slice_events =
        reflector(slices_w, watcher(Api::<EndpointSlice>::all(client), watcher::Config::default())).default_backoff();
    let service_events = futures_util::stream::unfold(changed, |mut rx| async move {
        rx.changed().await.ok()?;
        Some(((), rx))
    });
    let mut events = Box::pin(futures_util::stream::select(service_events, slice_events.map(explain)));
    let mut last = None;
    while events.next().await.is_some() {
        // Events come in bursts (a rollout changes many slices): one recomputation per burst.
        while let Some(Some(())) = futures_util::FutureExt::now_or_never(events.next()) {}
        // Nothing is published before both have been listed once (a partial view would
        // refuse connections to Services whose slices are not listed yet).
        let listed = |ready: Option<Result<(), _>>| ready.is_some_and(|r| r.is_ok());
        if !listed(futures_util::FutureExt::now_or_never(services.wait_until_ready()))
            || !listed(futures_util::FutureExt::now_or_never(slices.wait_until_ready()))
        {
            continue;
        }
        publish(&services, &slices, &sink, &mut last);
    }
}

/// Says what a refused watch needs: a node may not list EndpointSlices unless granted the
/// rights kube-proxy has (it may list Services).
fn explain<T>(event: Result<T, watcher::Error>) {
    if let Err(e) = event
        && e.to_string().contains("403")
    {
        tracing::warn!(
            error = %e,
            "Services cannot be routed: the node may not watch EndpointSlices; \
             grant it kube-proxy's rights (kubectl create clusterrolebinding wasmlet-node-proxier \
             --clusterrole=system:node-proxier --group=system:nodes)"
        );
    }
}

fn publish(
    services: &Store<Service>,
    slices: &Store<EndpointSlice>,
    sink: &Arc<dyn Fn(Vec<ServiceRoute>) + Send + Sync>,
    last: &mut Option<Vec<ServiceRoute>>,
) {
    let now = routes(&services.state(), &slices.state());
    if last.as_ref() != Some(&now) {
        let endpoints: usize = now.iter().map(|r| r.endpoints.len()).sum();
        tracing::debug!(ports = now.len(), endpoints, "service routes");
        sink(now.clone());
        *last = Some(now);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn service(json: &str) -> Arc<Service> {
        Arc::new(serde_json::from_str(json).unwrap())
    }
    fn slice(json: &str) -> Arc<EndpointSlice> {
        Arc::new(serde_json::from_str(json).unwrap())
    }

    const WEB: &str = r#"{"metadata": {"name": "web", "namespace": "ns"},
        "spec": {"clusterIP": "10.96.0.20", "clusterIPs": ["10.96.0.20"],
                 "ports": [{"name": "http", "port": 80, "targetPort": "http", "protocol": "TCP"},
                           {"name": "other", "port": 81}]}}"#;

    fn web_slice(name: &str, endpoints: &str) -> Arc<EndpointSlice> {
        slice(&format!(
            r#"{{"metadata": {{"name": "{name}", "namespace": "ns", "labels": {{"kubernetes.io/service-name": "web"}}}},
                "addressType": "IPv4", "ports": [{{"name": "http", "port": 8080, "protocol": "TCP"}}],
                "endpoints": {endpoints}}}"#
        ))
    }

    fn addrs(list: &[&str]) -> Vec<SocketAddr> {
        list.iter().map(|a| a.parse().unwrap()).collect()
    }

    #[test]
    fn ready_endpoints_of_the_named_port_across_slices() {
        let slices = [
            web_slice(
                "a",
                r#"[{"addresses": ["10.88.0.6"], "conditions": {"ready": true}},
                    {"addresses": ["10.88.0.7"], "conditions": {"ready": false}},
                    {"addresses": ["10.88.0.8"], "conditions": {"ready": false, "serving": true, "terminating": true}}]"#,
            ),
            web_slice("b", r#"[{"addresses": ["10.88.0.5"]}, {"addresses": ["10.88.0.6"]}]"#),
        ];
        let r = routes(&[service(WEB)], &slices);
        assert_eq!(r.len(), 2);
        assert_eq!(r[0].name, "ns/web:http");
        assert_eq!((r[0].cluster_ip, r[0].port, r[0].protocol), ("10.96.0.20".parse().unwrap(), 80, Protocol::Tcp));
        // Unset conditions are ready; duplicates are merged; unready and terminating left out.
        assert_eq!(r[0].endpoints, addrs(&["10.88.0.5:8080", "10.88.0.6:8080"]));
        assert_eq!(r[0].affinity, None);
        // Port "other" matches no slice port: no endpoint (refused).
        assert_eq!(r[1].name, "ns/web:other");
        assert!(r[1].endpoints.is_empty());
    }

    #[test]
    fn terminating_endpoints_only_when_nothing_is_ready() {
        let slices = [web_slice(
            "a",
            r#"[{"addresses": ["10.88.0.7"], "conditions": {"ready": false, "serving": false, "terminating": true}},
                {"addresses": ["10.88.0.8"], "conditions": {"ready": false, "serving": true, "terminating": true}}]"#,
        )];
        assert_eq!(routes(&[service(WEB)], &slices)[0].endpoints, addrs(&["10.88.0.8:8080"]));
    }

    #[test]
    fn affinity_headless_external_and_orphan_slices() {
        let sticky = service(
            r#"{"metadata": {"name": "web", "namespace": "ns"},
                "spec": {"clusterIP": "10.96.0.20", "ports": [{"name": "http", "port": 80}],
                         "sessionAffinity": "ClientIP",
                         "sessionAffinityConfig": {"clientIP": {"timeoutSeconds": 30}}}}"#,
        );
        let headless = service(
            r#"{"metadata": {"name": "db", "namespace": "ns"},
                "spec": {"clusterIP": "None", "ports": [{"port": 5432}]}}"#,
        );
        let external = service(
            r#"{"metadata": {"name": "ext", "namespace": "ns"},
                "spec": {"type": "ExternalName", "externalName": "example.test", "ports": [{"port": 80}]}}"#,
        );
        // A slice naming a Service that does not exist, in another namespace.
        let orphan = slice(
            r#"{"metadata": {"name": "x", "namespace": "other", "labels": {"kubernetes.io/service-name": "web"}},
                "addressType": "IPv4", "ports": [{"name": "http", "port": 9}], "endpoints": [{"addresses": ["10.88.9.9"]}]}"#,
        );
        let r = routes(&[sticky, headless, external], &[orphan]);
        assert_eq!(r.len(), 1, "{r:?}");
        assert_eq!(r[0].affinity, Some(Duration::from_secs(30)));
        assert!(r[0].endpoints.is_empty());
    }

    #[test]
    fn dual_stack_services_route_each_family_to_its_slices() {
        let svc = service(
            r#"{"metadata": {"name": "web", "namespace": "ns"},
                "spec": {"clusterIP": "10.96.0.20", "clusterIPs": ["10.96.0.20", "fd00::20"],
                         "ports": [{"name": "http", "port": 80}]}}"#,
        );
        let v6 = slice(
            r#"{"metadata": {"name": "v6", "namespace": "ns", "labels": {"kubernetes.io/service-name": "web"}},
                "addressType": "IPv6", "ports": [{"name": "http", "port": 8080}], "endpoints": [{"addresses": ["fd00::5"]}]}"#,
        );
        let slices = [web_slice("v4", r#"[{"addresses": ["10.88.0.5"]}]"#), v6];
        let r = routes(&[svc], &slices);
        assert_eq!(r.len(), 2);
        assert_eq!(r[0].endpoints, addrs(&["10.88.0.5:8080"]));
        assert_eq!(r[1].endpoints, addrs(&["[fd00::5]:8080"]));
    }
}
