//! The node's settings, named as the kubelet's KubeletConfiguration names them (the config
//! file's `[node]` table), with the kubelet's defaults.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// The label every wasmlet node carries, and the key of its default taint: wasm workloads
/// select and tolerate it (examples/runtimeclass.yaml), ordinary ones stay off.
pub const WASM_LABEL: &str = "wasmlet.dev/wasm";

/// The RuntimeClass handler this node serves.
pub const HANDLER: &str = "wasmlet";

/// A taint as KubeletConfiguration's registerWithTaints writes it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Taint {
    pub key: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub value: String,
    pub effect: String,
}

/// Node settings (see the kubelet's KubeletConfiguration for each).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default, rename_all = "camelCase")]
pub struct NodeConfig {
    /// Labels added at registration (and reconciled at each start).
    pub node_labels: BTreeMap<String, String>,
    /// Taints the Node is created with. Default: `wasmlet.dev/wasm=true:NoSchedule`, so only
    /// pods that tolerate it (through the RuntimeClass) land here.
    pub register_with_taints: Vec<Taint>,
    pub max_pods: u32,
    #[serde(rename = "clusterDNS")]
    pub cluster_dns: Vec<String>,
    pub cluster_domain: String,
    /// How often the node status is computed (posted when it changed).
    #[serde(with = "go_duration")]
    pub node_status_update_frequency: Duration,
    /// How often the status is posted even when nothing changed.
    #[serde(with = "go_duration")]
    pub node_status_report_frequency: Duration,
    pub node_lease_duration_seconds: u32,
    #[serde(rename = "kubeAPIQPS")]
    pub kube_api_qps: f64,
    #[serde(rename = "kubeAPIBurst")]
    pub kube_api_burst: u32,
    /// The port in the Node's daemonEndpoints (the node API).
    pub port: u16,
    /// Rotate the client certificate TLS bootstrapping issued before it expires (on by
    /// default, as kubeadm configures kubelets).
    pub rotate_certificates: bool,
    /// The address the node API listens on.
    pub address: String,
    /// The node API's serving certificate and key (PEM files); without them a self-signed one
    /// is made at each start.
    pub tls_cert_file: Option<std::path::PathBuf>,
    pub tls_private_key_file: Option<std::path::PathBuf>,
    /// Ask the cluster for the serving certificate (a `kubernetes.io/kubelet-serving`
    /// CertificateSigningRequest, approved by someone or an approver) and rotate it.
    #[serde(rename = "serverTLSBootstrap")]
    pub server_tls_bootstrap: bool,
    /// Who may call the node API.
    pub authentication: Authentication,
    /// A running container's log is rotated when it reaches this size (a quantity).
    pub container_log_max_size: String,
    /// Log files kept per container, the live one counted.
    pub container_log_max_files: u32,
    /// How often container logs are looked at for rotation (at least 3s).
    #[serde(with = "go_duration")]
    pub container_log_monitor_interval: Duration,
    /// Hard eviction thresholds by signal (`memory.available = "100Mi"`, `nodefs.available =
    /// "10%"`); given, they replace the kubelet's defaults.
    pub eviction_hard: Option<BTreeMap<String, String>>,
    /// Soft eviction thresholds, each with its grace period in evictionSoftGracePeriod.
    pub eviction_soft: BTreeMap<String, String>,
    pub eviction_soft_grace_period: BTreeMap<String, String>,
    /// The longest grace period a pod evicted for a soft threshold gets.
    pub eviction_max_pod_grace_period: i64,
    /// How long MemoryPressure/DiskPressure stay after their threshold stops being met.
    #[serde(with = "go_duration")]
    pub eviction_pressure_transition_period: Duration,
    /// Resources kept for the system and for the node agent (`memory = "1Gi"`): left out of
    /// the node's allocatable.
    pub system_reserved: BTreeMap<String, String>,
    pub kube_reserved: BTreeMap<String, String>,
    /// Image garbage collection: unused images go once the image filesystem is this full
    /// (percent; 100 turns it off), down to the low threshold.
    #[serde(rename = "imageGCHighThresholdPercent")]
    pub image_gc_high_threshold_percent: i32,
    #[serde(rename = "imageGCLowThresholdPercent")]
    pub image_gc_low_threshold_percent: i32,
    /// Images seen for less than this are never collected.
    #[serde(rename = "imageMinimumGCAge", with = "go_duration")]
    pub image_minimum_gc_age: Duration,
    /// Images unused for longer than this are collected whatever the disk (0s: off).
    #[serde(rename = "imageMaximumGCAge", with = "go_duration")]
    pub image_maximum_gc_age: Duration,
}

/// KubeletConfiguration's `authentication`: client certificates signed by the client CA (by
/// default the cluster's CA, from the kubeconfig), and bearer tokens checked with the API
/// server (TokenReview). Anonymous requests are refused.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default, rename_all = "camelCase")]
pub struct Authentication {
    pub x509: X509,
}

/// Client certificate authentication.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default, rename_all = "camelCase")]
pub struct X509 {
    /// PEM bundle of the CAs client certificates must chain to.
    #[serde(rename = "clientCAFile")]
    pub client_ca_file: Option<std::path::PathBuf>,
}

impl Default for NodeConfig {
    fn default() -> NodeConfig {
        NodeConfig {
            node_labels: BTreeMap::new(),
            register_with_taints: vec![Taint {
                key: WASM_LABEL.into(),
                value: "true".into(),
                effect: "NoSchedule".into(),
            }],
            max_pods: 110,
            cluster_dns: Vec::new(),
            cluster_domain: "cluster.local".into(),
            node_status_update_frequency: Duration::from_secs(10),
            node_status_report_frequency: Duration::from_secs(300),
            node_lease_duration_seconds: 40,
            kube_api_qps: 50.0,
            kube_api_burst: 100,
            port: 10250,
            rotate_certificates: true,
            address: "0.0.0.0".into(),
            tls_cert_file: None,
            tls_private_key_file: None,
            server_tls_bootstrap: false,
            authentication: Authentication::default(),
            container_log_max_size: "10Mi".into(),
            container_log_max_files: 5,
            container_log_monitor_interval: crate::logrotate::PERIOD,
            eviction_hard: None,
            eviction_soft: BTreeMap::new(),
            eviction_soft_grace_period: BTreeMap::new(),
            eviction_max_pod_grace_period: 0,
            eviction_pressure_transition_period: Duration::from_secs(300),
            system_reserved: BTreeMap::new(),
            kube_reserved: BTreeMap::new(),
            image_gc_high_threshold_percent: 85,
            image_gc_low_threshold_percent: 80,
            image_minimum_gc_age: Duration::from_secs(120),
            image_maximum_gc_age: Duration::ZERO,
        }
    }
}

impl NodeConfig {
    /// The Lease is renewed every quarter of its duration, as the kubelet does.
    pub fn lease_renew_interval(&self) -> Duration {
        Duration::from_secs(u64::from(self.node_lease_duration_seconds.max(1))) / 4
    }

    /// containerLogMaxSize and containerLogMaxFiles as a rotation policy.
    /// Checked with the other settings by [`NodeConfig::check`], before the node starts.
    pub fn log_policy(&self) -> Result<crate::logrotate::Policy, String> {
        let size = crate::quantity::Quantity::parse(&self.container_log_max_size)
            .ok()
            .map(|q| q.ceil_units())
            .filter(|n| *n > 0)
            .ok_or_else(|| format!("containerLogMaxSize {:?}: not a positive quantity", self.container_log_max_size))?;
        if self.container_log_max_files < 2 {
            return Err(format!("containerLogMaxFiles {}: it must be at least 2", self.container_log_max_files));
        }
        if self.container_log_monitor_interval < Duration::from_secs(3) {
            return Err(format!(
                "containerLogMonitorInterval {:?}: it must be at least 3s",
                self.container_log_monitor_interval
            ));
        }
        Ok(crate::logrotate::Policy {
            max_size: size as u64,
            max_files: self.container_log_max_files as usize,
            period: self.container_log_monitor_interval,
        })
    }

    /// The eviction settings, parsed. Checked by [`NodeConfig::check`].
    pub fn eviction(&self) -> Result<crate::eviction::Config, String> {
        let hard = self.eviction_hard.clone().unwrap_or_else(crate::eviction::default_hard);
        let thresholds = crate::eviction::parse(&hard, &self.eviction_soft, &self.eviction_soft_grace_period)?;
        Ok(crate::eviction::Config {
            thresholds,
            max_pod_grace: self.eviction_max_pod_grace_period,
            transition: self.eviction_pressure_transition_period,
        })
    }

    /// The memory left out of allocatable: systemReserved, kubeReserved and the hard
    /// memory.available threshold, in bytes.
    pub fn reserved_memory(&self) -> u64 {
        let q = |m: &BTreeMap<String, String>| {
            m.get("memory")
                .and_then(|v| crate::quantity::Quantity::parse(v).ok())
                .map_or(0, |q| q.ceil_units().max(0) as u64)
        };
        let threshold = self.eviction().ok().and_then(|c| {
            c.thresholds.into_iter().find(|t| t.signal == crate::eviction::Signal::MemoryAvailable && t.hard())
        });
        let threshold = match threshold.map(|t| t.amount) {
            Some(crate::eviction::Amount::Quantity(b)) => b,
            _ => 0,
        };
        q(&self.system_reserved) + q(&self.kube_reserved) + threshold
    }

    /// The image garbage collector's settings. Checked by [`NodeConfig::check`].
    pub fn image_gc(&self) -> Result<crate::imagegc::Policy, String> {
        let (high, low) = (self.image_gc_high_threshold_percent, self.image_gc_low_threshold_percent);
        for (name, v) in [("imageGCHighThresholdPercent", high), ("imageGCLowThresholdPercent", low)] {
            if !(0..=100).contains(&v) {
                return Err(format!("{name} {v}: it must be from 0 to 100"));
            }
        }
        if low >= high {
            return Err(format!(
                "imageGCLowThresholdPercent {low} must be less than imageGCHighThresholdPercent {high}"
            ));
        }
        let (min_age, max_age) = (self.image_minimum_gc_age, self.image_maximum_gc_age);
        if !max_age.is_zero() && max_age <= min_age {
            return Err(format!("imageMaximumGCAge {max_age:?} must be more than imageMinimumGCAge {min_age:?}"));
        }
        Ok(crate::imagegc::Policy { high_percent: high as u8, low_percent: low as u8, min_age, max_age })
    }

    /// What is wrong with the settings, if anything.
    pub fn check(&self) -> Result<(), String> {
        for t in &self.register_with_taints {
            if !matches!(t.effect.as_str(), "NoSchedule" | "PreferNoSchedule" | "NoExecute") {
                return Err(format!(
                    "registerWithTaints: taint {:?}: effect {:?} is not NoSchedule, PreferNoSchedule or NoExecute",
                    t.key, t.effect
                ));
            }
        }
        if self.max_pods == 0 {
            return Err("maxPods must be at least 1".into());
        }
        if self.node_status_update_frequency.is_zero() || self.node_status_report_frequency.is_zero() {
            return Err("nodeStatusUpdateFrequency and nodeStatusReportFrequency must be positive".into());
        }
        if self.kube_api_qps <= 0.0 || self.kube_api_burst == 0 {
            return Err("kubeAPIQPS and kubeAPIBurst must be positive".into());
        }
        self.address
            .parse::<std::net::IpAddr>()
            .map_err(|_| format!("address: {:?} is not an IP address", self.address))?;
        if self.tls_cert_file.is_some() != self.tls_private_key_file.is_some() {
            return Err("tlsCertFile and tlsPrivateKeyFile go together".into());
        }
        if self.server_tls_bootstrap && self.tls_cert_file.is_some() {
            return Err("serverTLSBootstrap asks the cluster for the serving certificate: give no tlsCertFile".into());
        }
        for ip in &self.cluster_dns {
            ip.parse::<std::net::IpAddr>().map_err(|_| format!("clusterDNS: {ip:?} is not an IP address"))?;
        }
        self.log_policy()?;
        self.eviction()?;
        self.image_gc()?;
        for (what, m) in [("systemReserved", &self.system_reserved), ("kubeReserved", &self.kube_reserved)] {
            for (k, v) in m {
                if !matches!(k.as_str(), "cpu" | "memory" | "ephemeral-storage" | "pid") {
                    return Err(format!("{what}: unknown resource {k:?} (cpu, memory, ephemeral-storage, pid)"));
                }
                let q = crate::quantity::Quantity::parse(v).map_err(|e| format!("{what} {k}: {e}"))?;
                if q.ceil_units() < 0 {
                    return Err(format!("{what} {k}: {v:?} is negative"));
                }
            }
        }
        if self.eviction_max_pod_grace_period < 0 {
            return Err("evictionMaxPodGracePeriod must not be negative".into());
        }
        Ok(())
    }
}

/// Durations written as Go writes them ("10s", "5m0s", "1h30m", "500ms").
pub mod go_duration {
    use super::*;

    pub fn parse(text: &str) -> Result<Duration, String> {
        let bad = || format!("{text:?} is not a duration (e.g. 10s, 5m0s, 1h)");
        if text == "0" {
            return Ok(Duration::ZERO);
        }
        let mut rest = text;
        let mut total = 0f64;
        if rest.is_empty() {
            return Err(bad());
        }
        while !rest.is_empty() {
            let n = rest.find(|c: char| !(c.is_ascii_digit() || c == '.')).ok_or_else(bad)?;
            let value: f64 = rest[..n].parse().map_err(|_| bad())?;
            rest = &rest[n..];
            let u = rest.find(|c: char| c.is_ascii_digit() || c == '.').unwrap_or(rest.len());
            let scale = match &rest[..u] {
                "ns" => 1e-9,
                "us" | "µs" => 1e-6,
                "ms" => 1e-3,
                "s" => 1.0,
                "m" => 60.0,
                "h" => 3600.0,
                _ => return Err(bad()),
            };
            total += value * scale;
            rest = &rest[u..];
        }
        Ok(Duration::from_secs_f64(total))
    }

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&format!("{}s", d.as_secs_f64()))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let text = String::deserialize(d)?;
        parse(&text).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_the_kubelets() {
        let c = NodeConfig::default();
        assert_eq!((c.max_pods, c.node_lease_duration_seconds, c.port), (110, 40, 10250));
        assert_eq!(c.node_status_update_frequency, Duration::from_secs(10));
        assert_eq!(c.node_status_report_frequency, Duration::from_secs(300));
        assert_eq!(c.lease_renew_interval(), Duration::from_secs(10));
        assert_eq!(c.register_with_taints[0].key, WASM_LABEL);
        assert!(c.check().is_ok());
    }

    #[test]
    fn keys_are_kubelet_configuration_names() {
        let c: NodeConfig = toml::from_str(
            "nodeLabels = { zone = \"edge\" }\nmaxPods = 20\nclusterDNS = [\"10.96.0.10\"]\nnodeStatusUpdateFrequency = \"2s\"\nnodeStatusReportFrequency = \"1m0s\"\nnodeLeaseDurationSeconds = 8\nkubeAPIQPS = 5.0\nkubeAPIBurst = 10\nregisterWithTaints = []\n",
        )
        .unwrap();
        assert_eq!(c.max_pods, 20);
        assert_eq!(c.cluster_dns, vec!["10.96.0.10".to_string()]);
        assert_eq!(c.node_status_update_frequency, Duration::from_secs(2));
        assert_eq!(c.node_status_report_frequency, Duration::from_secs(60));
        assert_eq!(c.lease_renew_interval(), Duration::from_secs(2));
        assert!(c.register_with_taints.is_empty(), "an empty list overrides the default taint");
        let e = toml::from_str::<NodeConfig>("maxpods = 3\n").unwrap_err().to_string();
        assert!(e.contains("unknown field `maxpods`"), "{e}");
        let e = toml::from_str::<NodeConfig>("nodeStatusUpdateFrequency = \"10 sec\"\n").unwrap_err().to_string();
        assert!(e.contains("is not a duration"), "{e}");
        let bad = NodeConfig { cluster_dns: vec!["dns".into()], ..NodeConfig::default() };
        assert!(bad.check().unwrap_err().contains("clusterDNS"));
        let c: NodeConfig = toml::from_str("containerLogMaxSize = \"1Mi\"\ncontainerLogMaxFiles = 3\n").unwrap();
        assert_eq!(
            c.log_policy(),
            Ok(crate::logrotate::Policy { max_size: 1 << 20, max_files: 3, period: Duration::from_secs(10) })
        );
        let bad = NodeConfig { container_log_monitor_interval: Duration::from_secs(1), ..NodeConfig::default() };
        assert!(bad.check().unwrap_err().contains("containerLogMonitorInterval 1s: it must be at least 3s"));
        let bad = NodeConfig { container_log_max_size: "big".into(), ..NodeConfig::default() };
        assert!(bad.check().unwrap_err().contains("containerLogMaxSize \"big\""));
        let bad = NodeConfig { container_log_max_files: 1, ..NodeConfig::default() };
        assert!(bad.check().unwrap_err().contains("containerLogMaxFiles 1"));
        let c: NodeConfig = toml::from_str(
            "evictionHard = { \"memory.available\" = \"200Mi\" }\nevictionPressureTransitionPeriod = \"10s\"\nsystemReserved = { memory = \"1Gi\" }\n",
        )
        .unwrap();
        assert_eq!(c.eviction().unwrap().transition, Duration::from_secs(10));
        assert_eq!(c.reserved_memory(), (1 << 30) + (200 << 20));
        assert_eq!(NodeConfig::default().reserved_memory(), 100 << 20, "the default hard threshold");
        let bad = NodeConfig {
            eviction_soft: [("memory.available".to_string(), "1Gi".to_string())].into(),
            ..NodeConfig::default()
        };
        assert!(
            bad.check().unwrap_err().contains("evictionSoftGracePeriod: none for the soft threshold memory.available")
        );
        let bad =
            NodeConfig { system_reserved: [("gpu".to_string(), "1".to_string())].into(), ..NodeConfig::default() };
        assert!(bad.check().unwrap_err().contains("systemReserved: unknown resource \"gpu\""));
    }

    #[test]
    fn image_gc_settings_are_checked() {
        let p = NodeConfig::default().image_gc().unwrap();
        assert_eq!((p.high_percent, p.low_percent, p.min_age), (85, 80, Duration::from_secs(120)));
        let cfg = |high, low, max| NodeConfig {
            image_gc_high_threshold_percent: high,
            image_gc_low_threshold_percent: low,
            image_maximum_gc_age: Duration::from_secs(max),
            ..NodeConfig::default()
        };
        assert!(cfg(101, 80, 0).check().unwrap_err().contains("imageGCHighThresholdPercent 101"));
        assert!(cfg(80, 80, 0).check().unwrap_err().contains("must be less than imageGCHighThresholdPercent 80"));
        assert!(cfg(85, 80, 60).check().unwrap_err().contains("imageMaximumGCAge 60s must be more"));
        assert!(cfg(100, 0, 0).check().is_ok());
    }

    #[test]
    fn go_durations() {
        use go_duration::parse;
        assert_eq!(parse("1h30m"), Ok(Duration::from_secs(5400)));
        assert_eq!(parse("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse("1.5s"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse("0"), Ok(Duration::ZERO));
        assert!(parse("").is_err());
        assert!(parse("5").is_err());
        assert!(parse("5d").is_err());
    }
}
