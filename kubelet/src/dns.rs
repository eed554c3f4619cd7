//! A pod's hostname, DNS configuration (dnsPolicy and dnsConfig) and managed /etc/hosts, as
//! the kubelet computes them (`pkg/kubelet/network/dns`, `managedHostsFileContent`).

use k8s_openapi::api::core::v1::Pod;

use super::model;

/// The node's DNS settings.
#[derive(Debug, Clone, Default)]
pub struct NodeDns {
    /// The kubelet's clusterDNS (empty: none configured).
    pub cluster_dns: Vec<String>,
    pub cluster_domain: String,
    /// The node's resolv.conf.
    pub host: ResolvConf,
}

/// A resolv.conf's contents (and the CRI DNSConfig).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ResolvConf {
    pub servers: Vec<String>,
    pub searches: Vec<String>,
    pub options: Vec<String>,
}

/// Reads resolv.conf text.
pub fn parse_resolv_conf(text: &str) -> ResolvConf {
    let mut r = ResolvConf::default();
    for line in text.lines() {
        let line = line.split(['#', ';']).next().unwrap_or("");
        let mut f = line.split_whitespace();
        match f.next() {
            Some("nameserver") => r.servers.extend(f.next().map(str::to_string)),
            Some("search") | Some("domain") => r.searches = f.map(str::to_string).collect(),
            Some("options") => r.options.extend(f.map(str::to_string)),
            _ => {}
        }
    }
    r
}

fn dedup(v: Vec<String>) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for s in v {
        if !out.contains(&s) {
            out.push(s);
        }
    }
    out
}

/// A warning the kubelet records while forming the DNS config.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Warning {
    pub reason: &'static str,
    pub message: String,
}

/// The pod's DNS config from its dnsPolicy and dnsConfig.
pub fn dns_config(pod: &Pod, node: &NodeDns) -> (ResolvConf, Vec<Warning>) {
    let spec = model::spec(pod);
    let mut warnings = Vec::new();
    let host_network = spec.host_network == Some(true);
    let mut policy = spec.dns_policy.clone().unwrap_or_else(|| "ClusterFirst".into());
    if policy == "ClusterFirst" && host_network {
        policy = "Default".into();
    }
    if policy == "ClusterFirstWithHostNet" {
        policy = "ClusterFirst".into();
    }
    if policy == "ClusterFirst" && node.cluster_dns.is_empty() {
        let name = pod.metadata.name.as_deref().unwrap_or_default();
        warnings.push(Warning {
            reason: "MissingClusterDNS",
            message: format!(
                "pod: \"{}\". kubelet does not have ClusterDNS IP configured and cannot create Pod using \"ClusterFirst\" policy. Falling back to \"Default\" policy.",
                actions_format(pod, name)
            ),
        });
        policy = "Default".into();
    }
    let mut r = match policy.as_str() {
        "ClusterFirst" => {
            let ns = pod.metadata.namespace.as_deref().unwrap_or("default");
            let d = &node.cluster_domain;
            let mut searches = Vec::new();
            if !d.is_empty() {
                searches = vec![format!("{ns}.svc.{d}"), format!("svc.{d}"), d.clone()];
            }
            searches.extend(node.host.searches.iter().cloned());
            ResolvConf { servers: node.cluster_dns.clone(), searches: dedup(searches), options: vec!["ndots:5".into()] }
        }
        "None" => ResolvConf::default(),
        _ => node.host.clone(),
    };
    if let Some(c) = &spec.dns_config {
        r.servers = dedup(r.servers.into_iter().chain(c.nameservers.iter().flatten().cloned()).collect());
        r.searches = dedup(r.searches.into_iter().chain(c.searches.iter().flatten().cloned()).collect());
        for o in c.options.iter().flatten() {
            let name = o.name.clone().unwrap_or_default();
            let text = match &o.value {
                Some(v) => format!("{name}:{v}"),
                None => name.clone(),
            };
            let existing = r.options.iter().position(|x| x.split(':').next() == Some(name.as_str()));
            match existing {
                Some(i) => r.options[i] = text,
                None => r.options.push(text),
            }
        }
    }
    if r.servers.len() > 3 {
        warnings.push(Warning {
            reason: "DNSConfigForming",
            message: format!(
                "Nameserver limits were exceeded, some nameservers have been omitted, the applied nameserver line is: {}",
                r.servers[..3].join(" ")
            ),
        });
        r.servers.truncate(3);
    }
    let mut searches = Vec::new();
    let mut chars = 0;
    for s in &r.searches {
        if searches.len() == 32 || chars + s.len() + usize::from(!searches.is_empty()) > 2048 {
            break;
        }
        chars += s.len() + usize::from(!searches.is_empty());
        searches.push(s.clone());
    }
    if searches.len() < r.searches.len() {
        warnings.push(Warning {
            reason: "DNSConfigForming",
            message: format!(
                "Search Line limits were exceeded, some search paths have been omitted, the applied search line is: {}",
                searches.join(" ")
            ),
        });
        r.searches = searches;
    }
    (r, warnings)
}

fn actions_format(pod: &Pod, _name: &str) -> String {
    super::actions::format_pod(pod)
}

/// The hostname and the domain (`<subdomain>.<ns>.svc.<cluster domain>`, if a subdomain is set).
pub fn hostname_and_domain(pod: &Pod, cluster_domain: &str) -> (String, Option<String>) {
    let spec = model::spec(pod);
    let mut host = spec
        .hostname
        .clone()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| pod.metadata.name.clone().unwrap_or_default());
    if host.len() > 63 {
        host.truncate(63);
        host = host.trim_end_matches(['-', '.']).to_string();
    }
    let domain = spec.subdomain.as_ref().filter(|s| !s.is_empty()).map(|sub| {
        let ns = pod.metadata.namespace.as_deref().unwrap_or("default");
        if cluster_domain.is_empty() { format!("{sub}.{ns}.svc") } else { format!("{sub}.{ns}.svc.{cluster_domain}") }
    });
    (host, domain)
}

/// The kubelet-managed /etc/hosts of a pod with its own network.
pub fn hosts_file(pod: &Pod, pod_ips: &[String], cluster_domain: &str) -> String {
    let (host, domain) = hostname_and_domain(pod, cluster_domain);
    let mut s = String::from(
        "# Kubernetes-managed hosts file.\n127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\nfe00::0\tip6-localnet\nfe00::0\tip6-mcastprefix\nfe00::1\tip6-allnodes\nfe00::2\tip6-allrouters\n",
    );
    for ip in pod_ips {
        match &domain {
            Some(d) => s.push_str(&format!("{ip}\t{host}.{d}\t{host}\n")),
            None => s.push_str(&format!("{ip}\t{host}\n")),
        }
    }
    s.push_str(&host_aliases(pod));
    s
}

/// The hosts file of a hostNetwork pod: the node's, with the pod's aliases.
pub fn host_network_hosts_file(pod: &Pod, node_hosts: &str) -> String {
    format!("# Kubernetes-managed hosts file (host network).\n{node_hosts}{}", host_aliases(pod))
}

fn host_aliases(pod: &Pod) -> String {
    let aliases = model::spec(pod).host_aliases.as_deref().unwrap_or_default();
    if aliases.is_empty() {
        return String::new();
    }
    let mut s = String::from("\n# Entries added by HostAliases.\n");
    for a in aliases {
        s.push_str(&a.ip);
        for h in a.hostnames.iter().flatten() {
            s.push('\t');
            s.push_str(h);
        }
        s.push('\n');
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{HostAlias, PodDNSConfig, PodDNSConfigOption, PodSpec};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

    fn pod(spec: PodSpec) -> Pod {
        Pod {
            metadata: ObjectMeta {
                name: Some("web".into()),
                namespace: Some("shop".into()),
                uid: Some("u".into()),
                ..Default::default()
            },
            spec: Some(spec),
            ..Default::default()
        }
    }

    fn node() -> NodeDns {
        NodeDns {
            cluster_dns: vec!["10.96.0.10".into()],
            cluster_domain: "cluster.local".into(),
            host: parse_resolv_conf("nameserver 192.0.2.53\nsearch lan example.com\noptions edns0 # x\n"),
        }
    }

    #[test]
    fn cluster_first_default_none_and_host_network() {
        let (r, w) = dns_config(&pod(PodSpec::default()), &node());
        assert!(w.is_empty());
        assert_eq!(r.servers, ["10.96.0.10"]);
        assert_eq!(r.searches, ["shop.svc.cluster.local", "svc.cluster.local", "cluster.local", "lan", "example.com"]);
        assert_eq!(r.options, ["ndots:5"]);
        let (r, _) = dns_config(&pod(PodSpec { dns_policy: Some("Default".into()), ..Default::default() }), &node());
        assert_eq!(r, node().host);
        let (r, _) = dns_config(&pod(PodSpec { host_network: Some(true), ..Default::default() }), &node());
        assert_eq!(r, node().host, "ClusterFirst on the host network falls back to Default");
        let with_net = PodSpec {
            host_network: Some(true),
            dns_policy: Some("ClusterFirstWithHostNet".into()),
            ..Default::default()
        };
        assert_eq!(dns_config(&pod(with_net), &node()).0.servers, ["10.96.0.10"]);
        let none = PodSpec {
            dns_policy: Some("None".into()),
            dns_config: Some(PodDNSConfig {
                nameservers: Some(vec!["1.1.1.1".into()]),
                searches: Some(vec!["a.example".into()]),
                options: Some(vec![PodDNSConfigOption { name: Some("ndots".into()), value: Some("2".into()) }]),
            }),
            ..Default::default()
        };
        let (r, _) = dns_config(&pod(none), &node());
        assert_eq!(
            r,
            ResolvConf {
                servers: vec!["1.1.1.1".into()],
                searches: vec!["a.example".into()],
                options: vec!["ndots:2".into()]
            }
        );
    }

    #[test]
    fn dns_config_merges_options_by_name_and_limits_warn() {
        let spec = PodSpec {
            dns_config: Some(PodDNSConfig {
                nameservers: Some(vec!["10.96.0.10".into(), "1.1.1.1".into(), "8.8.8.8".into(), "9.9.9.9".into()]),
                options: Some(vec![
                    PodDNSConfigOption { name: Some("ndots".into()), value: Some("1".into()) },
                    PodDNSConfigOption { name: Some("edns0".into()), value: None },
                ]),
                ..Default::default()
            }),
            ..Default::default()
        };
        let (r, w) = dns_config(&pod(spec), &node());
        assert_eq!(r.servers, ["10.96.0.10", "1.1.1.1", "8.8.8.8"], "deduplicated, then cut to 3");
        assert_eq!(r.options, ["ndots:1", "edns0"]);
        assert_eq!(w[0].reason, "DNSConfigForming");
        // Missing cluster DNS: a warning, then Default.
        let mut n = node();
        n.cluster_dns.clear();
        let (r, w) = dns_config(&pod(PodSpec::default()), &n);
        assert_eq!(r, n.host);
        assert_eq!(w[0].reason, "MissingClusterDNS");
        assert!(w[0].message.contains("Falling back to \"Default\" policy."), "{}", w[0].message);
    }

    #[test]
    fn hostname_rules_and_hosts_file() {
        let long = "a".repeat(62) + "-b";
        let p = pod(PodSpec { hostname: Some(long), ..Default::default() });
        assert_eq!(hostname_and_domain(&p, "cluster.local").0, "a".repeat(62), "cut to 63, trailing '-' trimmed");
        let p = pod(PodSpec {
            subdomain: Some("sub".into()),
            host_aliases: Some(vec![HostAlias {
                ip: "10.1.2.3".into(),
                hostnames: Some(vec!["foo.local".into(), "bar.local".into()]),
            }]),
            ..Default::default()
        });
        let hosts = hosts_file(&p, &["10.88.0.5".into()], "cluster.local");
        assert!(hosts.starts_with("# Kubernetes-managed hosts file.\n127.0.0.1\tlocalhost\n"));
        assert!(hosts.contains("\n10.88.0.5\tweb.sub.shop.svc.cluster.local\tweb\n"), "{hosts}");
        assert!(hosts.ends_with("\n# Entries added by HostAliases.\n10.1.2.3\tfoo.local\tbar.local\n"), "{hosts}");
        let plain = hosts_file(&pod(PodSpec::default()), &["10.88.0.5".into()], "cluster.local");
        assert!(plain.ends_with("fe00::2\tip6-allrouters\n10.88.0.5\tweb\n"));
        let hn = host_network_hosts_file(&pod(PodSpec::default()), "127.0.0.1 localhost\n");
        assert_eq!(hn, "# Kubernetes-managed hosts file (host network).\n127.0.0.1 localhost\n");
    }
}
