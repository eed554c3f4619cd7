//! The pod's sandbox: its CRI config, its creation with the managed /etc/hosts, and the
//! pod's volumes.

use std::collections::HashMap;

use cri_proto::v1 as cri;

use super::Worker;
use crate::cri as kcri;
use crate::dns;
use crate::events::Kind;
use crate::model;
use crate::volumes;

impl Worker {
    pub(super) fn sandbox_config(&self, attempt: u32) -> (cri::PodSandboxConfig, Vec<dns::Warning>) {
        let pod = &self.pod;
        let spec = model::spec(pod);
        let (hostname, _) = dns::hostname_and_domain(pod, &self.node.dns.cluster_domain);
        let (resolv, warnings) = dns::dns_config(pod, &self.node.dns);
        let host_network = spec.host_network == Some(true);
        let mut port_mappings = Vec::new();
        for c in spec.init_containers.iter().flatten().chain(spec.containers.iter()) {
            for p in c.ports.iter().flatten() {
                let host_port = p.host_port.unwrap_or(0);
                if host_port == 0 || host_network {
                    continue;
                }
                let protocol = match p.protocol.as_deref() {
                    Some("UDP") => cri::Protocol::Udp,
                    Some("SCTP") => cri::Protocol::Sctp,
                    _ => cri::Protocol::Tcp,
                };
                port_mappings.push(cri::PortMapping {
                    protocol: protocol as i32,
                    container_port: p.container_port,
                    host_port,
                    host_ip: p.host_ip.clone().unwrap_or_default(),
                });
            }
        }
        let mode = |node: bool, pod_mode: cri::NamespaceMode| {
            if node { cri::NamespaceMode::Node as i32 } else { pod_mode as i32 }
        };
        let pid_default = if spec.share_process_namespace == Some(true) {
            cri::NamespaceMode::Pod
        } else {
            cri::NamespaceMode::Container
        };
        let mut labels: HashMap<String, String> = pod.metadata.labels.clone().unwrap_or_default().into_iter().collect();
        labels.insert(kcri::POD_NAME.into(), self.name().into());
        labels.insert(kcri::POD_NAMESPACE.into(), self.ns().into());
        labels.insert(kcri::POD_UID.into(), self.uid.clone());
        let config = cri::PodSandboxConfig {
            metadata: Some(cri::PodSandboxMetadata {
                name: self.name().into(),
                uid: self.uid.clone(),
                namespace: self.ns().into(),
                attempt,
            }),
            hostname: if host_network { String::new() } else { hostname },
            log_directory: self.node.logs_dir(pod).display().to_string(),
            dns_config: Some(cri::DnsConfig {
                servers: resolv.servers,
                searches: resolv.searches,
                options: resolv.options,
            }),
            port_mappings,
            labels,
            annotations: pod.metadata.annotations.clone().unwrap_or_default().into_iter().collect(),
            linux: Some(cri::LinuxPodSandboxConfig {
                security_context: Some(cri::LinuxSandboxSecurityContext {
                    namespace_options: Some(cri::NamespaceOption {
                        network: mode(host_network, cri::NamespaceMode::Pod),
                        pid: mode(spec.host_pid == Some(true), pid_default),
                        ipc: mode(spec.host_ipc == Some(true), cri::NamespaceMode::Pod),
                        ..Default::default()
                    }),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        };
        (config, warnings)
    }

    /// Runs a new sandbox and writes the pod's managed /etc/hosts; returns the sandbox ID.
    pub(super) async fn create_sandbox(&mut self, attempt: u32) -> Result<String, String> {
        let (config, warnings) = self.sandbox_config(attempt);
        for w in warnings {
            self.event(None, Kind::Warning, w.reason, w.message);
        }
        std::fs::create_dir_all(self.node.logs_dir(&self.pod)).map_err(|e| e.to_string())?;
        crate::metrics::inc(&crate::metrics::STARTED_PODS, &[]);
        let id = self.node.cri.run_sandbox(config).await.map_err(|s| {
            crate::metrics::inc(&crate::metrics::STARTED_PODS_ERRORS, &[]);
            s.message().to_string()
        })?;
        self.net = self.node.cri.sandbox_network(&id).await.map_err(|s| s.message().to_string())?;
        self.net_of = Some(id.clone());
        // The kubelet-managed /etc/hosts, mounted into every container.
        let spec = model::spec(&self.pod);
        let hosts = if spec.host_network == Some(true) {
            let node_hosts = std::fs::read_to_string("/etc/hosts").unwrap_or_default();
            dns::host_network_hosts_file(&self.pod, &node_hosts)
        } else {
            // The pod's name maps to its address inside its namespace, where the runtime
            // reports no pod IP (rootless) too: the pod reaches itself there.
            let own: Vec<String> =
                [self.net.address()].into_iter().filter(|a| !a.is_empty()).map(str::to_string).collect();
            dns::hosts_file(&self.pod, &own, &self.node.dns.cluster_domain)
        };
        let dir = self.node.pod_dir(&self.uid);
        std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
        std::fs::write(dir.join("etc-hosts"), hosts).map_err(|e| e.to_string())?;
        Ok(id)
    }

    /// The pod's and the node's addresses, for the downward API.
    pub(super) fn ips(&self) -> (Vec<String>, Vec<String>) {
        let pod: Vec<String> = [self.net.ip.clone()].into_iter().filter(|s| !s.is_empty()).collect();
        (pod, vec![self.node.host_ip.clone()])
    }

    /// Sets up (or refreshes) every volume; false after a FailedMount.
    pub(super) fn setup_volumes(&mut self) -> bool {
        let ns = self.ns().to_string();
        let objects = self.node.objects.clone();
        let cms = |n: &str| objects.config_map(&ns, n);
        let secrets = |n: &str| objects.secret(&ns, n);
        let tokens = |audience: &str, expiration: i64| objects.service_account_token(&self.pod, audience, expiration);
        let claims = |name: &str| objects.claim(&ns, name);
        let (pod_ips, host_ips) = self.ips();
        let dir = self.node.pod_dir(&self.uid);
        let memory_dir = self.node.memory_dir(&self.uid);
        let mut failed = Vec::new();
        {
            let sources = volumes::Sources {
                config_maps: &cms,
                secrets: &secrets,
                tokens: &tokens,
                claims: &claims,
                pod_ips: &pod_ips,
                host_ips: &host_ips,
                node_name: &self.node.node_name,
                allocatable_cpu: self.node.allocatable_cpu,
                allocatable_memory: self.node.allocatable_memory,
                memory_dir: &memory_dir,
            };
            for v in model::spec(&self.pod).volumes.iter().flatten() {
                if let Err(e) = volumes::setup(&self.pod, &dir, v, &sources) {
                    failed.push(e.0);
                }
            }
        }
        for message in &failed {
            self.event(None, Kind::Warning, "FailedMount", message.clone());
        }
        failed.is_empty()
    }
}
