//! Which endpoints serve a registry: mirrors first, then the registry itself, each over HTTPS
//! or plain HTTP — in the spirit of containerd's `hosts.toml`, as one table of the config file:
//!
//! ```toml
//! [registries."registry.example"]
//! mirrors = ["http://127.0.0.1:5000", "https://mirror.example"]
//! [registries."plain.lan:5000"]
//! insecure = true
//! [registries."registry.k8s.io"]          # an air-gapped node: the mirror only
//! mirrors = ["http://127.0.0.1:5000"]
//! mirrors_only = true
//! ```
//!
//! Images keep their canonical names (`registry.example/app:1`) whichever endpoint served them.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Settings for every registry that needs any.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegistryHosts {
    /// By registry host as references spell it (`docker.io`, `host:port`).
    #[serde(default)]
    pub registries: BTreeMap<String, HostConfig>,
}

/// One registry's settings.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HostConfig {
    /// Endpoints tried in order before the registry itself: `http://host:port` or
    /// `https://host` (a bare host means https).
    #[serde(default)]
    pub mirrors: Vec<String>,
    /// Reach the registry itself over plain HTTP.
    #[serde(default)]
    pub insecure: bool,
    /// Never reach the registry itself, only its mirrors (ignored without mirrors).
    #[serde(default)]
    pub mirrors_only: bool,
}

/// One place to pull from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    /// `host` or `host:port`.
    pub host: String,
    /// Plain HTTP.
    pub insecure: bool,
}

impl RegistryHosts {
    /// The endpoints for `registry`, in the order to try them.
    pub fn endpoints(&self, registry: &str) -> Vec<Endpoint> {
        let config = self.registries.get(registry);
        let mut out: Vec<Endpoint> = config
            .map(|c| {
                c.mirrors
                    .iter()
                    .map(|m| match m.split_once("://") {
                        Some(("http", host)) => {
                            Endpoint { host: host.trim_end_matches('/').to_string(), insecure: true }
                        }
                        Some((_, host)) => {
                            Endpoint { host: host.trim_end_matches('/').to_string(), insecure: is_loopback(host) }
                        }
                        None => Endpoint { host: m.trim_end_matches('/').to_string(), insecure: is_loopback(m) },
                    })
                    .collect()
            })
            .unwrap_or_default();
        if config.is_some_and(|c| c.mirrors_only) && !out.is_empty() {
            return out;
        }
        let insecure = config.is_some_and(|c| c.insecure) || is_loopback(registry);
        out.push(Endpoint { host: registry.to_string(), insecure });
        out
    }

    /// Marks `hosts` as plain-HTTP registries (the `--insecure-registry` flag).
    pub fn with_insecure(mut self, hosts: &[String]) -> RegistryHosts {
        for h in hosts {
            self.registries.entry(h.clone()).or_default().insecure = true;
        }
        self
    }
}

/// Loopback registries are reached over plain HTTP, as Docker does.
pub fn is_loopback(host: &str) -> bool {
    if let Ok(ip) = host.parse::<std::net::IpAddr>() {
        return ip.is_loopback();
    }
    let name = match host.rsplit_once(':') {
        Some((h, p)) if p.chars().all(|c| c.is_ascii_digit()) && !h.is_empty() => h,
        _ => host,
    };
    let name = name.trim_start_matches('[').trim_end_matches(']');
    name == "localhost" || name.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mirrors_then_the_registry() {
        let hosts: RegistryHosts = toml::from_str(
            r#"
            [registries."registry.example"]
            mirrors = ["http://10.0.0.5:5000/", "https://mirror.example", "127.0.0.1:5001"]
            [registries."plain.lan:5000"]
            insecure = true
            "#,
        )
        .unwrap();
        let e = |host: &str, insecure| Endpoint { host: host.into(), insecure };
        assert_eq!(
            hosts.endpoints("registry.example"),
            [
                e("10.0.0.5:5000", true),
                e("mirror.example", false),
                e("127.0.0.1:5001", true),
                e("registry.example", false)
            ]
        );
        assert_eq!(hosts.endpoints("plain.lan:5000"), [e("plain.lan:5000", true)]);
        assert_eq!(hosts.endpoints("docker.io"), [e("docker.io", false)]);
        assert_eq!(hosts.endpoints("localhost:5000"), [e("localhost:5000", true)]);
        let flagged = RegistryHosts::default().with_insecure(&["reg.lan".into()]);
        assert_eq!(flagged.endpoints("reg.lan"), [e("reg.lan", true)]);
        assert!(toml::from_str::<RegistryHosts>("[registries.x]\nmirror = []").is_err(), "typos are refused");
        let only: RegistryHosts =
            toml::from_str("[registries.a]\nmirrors = [\"http://127.0.0.1:5\"]\nmirrors_only = true\n[registries.b]\nmirrors_only = true").unwrap();
        assert_eq!(only.endpoints("a"), [e("127.0.0.1:5", true)]);
        assert_eq!(only.endpoints("b"), [e("b", false)], "no mirrors: the registry itself");
    }

    #[test]
    fn loopback() {
        for h in ["localhost", "localhost:5000", "127.0.0.1", "127.3.2.1:80", "[::1]:5000", "::1"] {
            assert!(is_loopback(h), "{h}");
        }
        for h in ["docker.io", "10.0.0.1:5000", "localhost.example", "[fe80::1]:5000"] {
            assert!(!is_loopback(h), "{h}");
        }
    }
}
