//! CNI, the standard way nodes give pods their network: wasmlet runs the plugins of the first
//! network configuration in the config directory (`*.conflist`, `*.conf`, `*.json`, by name) as
//! the CNI spec's exec protocol says: the command, container id, namespace path, interface name
//! and plugin path in the environment, the plugin's config (with the previous plugin's result)
//! on stdin, a result or an error as JSON on stdout. ADD at RunPodSandbox, DEL (in reverse
//! order) at StopPodSandbox. Debian's `containernetworking-plugins` (bridge, host-local,
//! loopback, portmap) are the reference set.

use std::io::Write;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use serde_json::{Value, json};

/// A loaded network configuration.
#[derive(Debug, Clone)]
pub struct CniNetwork {
    pub name: String,
    cni_version: String,
    plugins: Vec<Value>,
    bin_dirs: Vec<PathBuf>,
    /// The file it came from.
    pub source: PathBuf,
}

/// Who the pod is, for the plugins (CNI_ARGS, as the kubelet's runtimes pass it).
#[derive(Debug, Clone)]
pub struct PodIdentity {
    pub namespace: String,
    pub name: String,
    pub uid: String,
}

/// What ADD gave the pod.
#[derive(Debug, Clone)]
pub struct CniAttachment {
    pub ip: Ipv4Addr,
    pub gateway: Option<Ipv4Addr>,
    /// The last plugin's result (DEL gets it as prevResult).
    pub result: Value,
}

impl CniNetwork {
    /// The first configuration in `conf_dir` whose plugins are all found in `bin_dirs`.
    pub fn load(conf_dir: &Path, bin_dirs: &[PathBuf]) -> Result<CniNetwork, String> {
        let mut files: Vec<PathBuf> = std::fs::read_dir(conf_dir)
            .map_err(|e| format!("CNI config directory {}: {e}", conf_dir.display()))?
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|x| x == "conflist" || x == "conf" || x == "json"))
            .collect();
        files.sort();
        let source =
            files.into_iter().next().ok_or_else(|| format!("no CNI network config in {}", conf_dir.display()))?;
        let text = std::fs::read_to_string(&source).map_err(|e| format!("{}: {e}", source.display()))?;
        let conf: Value = serde_json::from_str(&text).map_err(|e| format!("{}: not JSON: {e}", source.display()))?;
        let field = |k: &str| conf.get(k).and_then(Value::as_str).map(str::to_string);
        let name = field("name").ok_or_else(|| format!("{}: no network name", source.display()))?;
        let cni_version = field("cniVersion").unwrap_or_else(|| "1.0.0".into());
        let plugins = match conf.get("plugins") {
            Some(Value::Array(p)) if !p.is_empty() => p.clone(),
            Some(_) => return Err(format!("{}: \"plugins\" must be a non-empty list", source.display())),
            None => vec![conf.clone()],
        };
        let net = CniNetwork { name, cni_version, plugins, bin_dirs: bin_dirs.to_vec(), source };
        for p in &net.plugins {
            net.binary(p)?;
        }
        Ok(net)
    }

    fn binary(&self, plugin: &Value) -> Result<PathBuf, String> {
        let kind = plugin
            .get("type")
            .and_then(Value::as_str)
            .ok_or_else(|| format!("{}: a plugin of network {} has no type", self.source.display(), self.name))?;
        if kind.contains('/') {
            return Err(format!("{}: plugin type {kind:?} is not a plain name", self.source.display()));
        }
        self.bin_dirs.iter().map(|d| d.join(kind)).find(|p| p.is_file()).ok_or_else(|| {
            let dirs: Vec<String> = self.bin_dirs.iter().map(|d| d.display().to_string()).collect();
            format!(
                "CNI plugin {kind:?} (network {}, {}) not found in {}",
                self.name,
                self.source.display(),
                dirs.join(":")
            )
        })
    }

    /// Runs ADD through the chain for the pod `id` whose namespace is at `netns`.
    pub fn add(&self, id: &str, netns: &Path, pod: &PodIdentity) -> Result<CniAttachment, String> {
        let mut prev: Option<Value> = None;
        for plugin in &self.plugins {
            prev = Some(self.exec(plugin, "ADD", id, netns, pod, prev.as_ref())?);
        }
        let result = prev.unwrap_or(Value::Null);
        let ip = result["ips"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|i| i["address"].as_str())
            .filter_map(|a| a.split('/').next()?.parse::<Ipv4Addr>().ok())
            .next()
            .ok_or_else(|| format!("CNI network {}: the result gives the pod no IPv4 address: {result}", self.name))?;
        let gateway = result["ips"][0]["gateway"].as_str().and_then(|g| g.parse().ok());
        Ok(CniAttachment { ip, gateway, result })
    }

    /// Runs DEL through the chain in reverse order; every plugin is asked even if one fails.
    pub fn del(&self, id: &str, netns: &Path, pod: &PodIdentity, prev: Option<&Value>) -> Result<(), String> {
        let mut first_error = None;
        for plugin in self.plugins.iter().rev() {
            if let Err(e) = self.exec(plugin, "DEL", id, netns, pod, prev) {
                first_error.get_or_insert(e);
            }
        }
        first_error.map_or(Ok(()), Err)
    }

    fn exec(
        &self,
        plugin: &Value,
        command: &str,
        id: &str,
        netns: &Path,
        pod: &PodIdentity,
        prev: Option<&Value>,
    ) -> Result<Value, String> {
        let binary = self.binary(plugin)?;
        let mut conf = plugin.clone();
        conf["name"] = json!(self.name);
        conf["cniVersion"] = json!(self.cni_version);
        if let Some(prev) = prev {
            conf["prevResult"] = prev.clone();
        }
        let path: Vec<String> = self.bin_dirs.iter().map(|d| d.display().to_string()).collect();
        let args = format!(
            "IgnoreUnknown=1;K8S_POD_NAMESPACE={};K8S_POD_NAME={};K8S_POD_INFRA_CONTAINER_ID={id};K8S_POD_UID={}",
            pod.namespace, pod.name, pod.uid
        );
        let kind = plugin["type"].as_str().unwrap_or("?");
        let mut child = Command::new(&binary)
            .env_clear()
            .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
            .env("CNI_COMMAND", command)
            .env("CNI_CONTAINERID", id)
            .env("CNI_NETNS", netns)
            .env("CNI_IFNAME", "eth0")
            .env("CNI_PATH", path.join(":"))
            .env("CNI_ARGS", args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| format!("CNI plugin {kind} ({}): {e}", binary.display()))?;
        let stdin = serde_json::to_vec(&conf).expect("json");
        if let Some(mut i) = child.stdin.take() {
            let _ = i.write_all(&stdin);
        }
        let out = child.wait_with_output().map_err(|e| format!("CNI plugin {kind}: {e}"))?;
        let stdout = String::from_utf8_lossy(&out.stdout);
        if !out.status.success() {
            let err: Value = serde_json::from_str(&stdout).unwrap_or(Value::Null);
            let msg = err["msg"].as_str().map(str::to_string).unwrap_or_else(|| stdout.trim().to_string());
            let details = err["details"].as_str().unwrap_or_default();
            let stderr = String::from_utf8_lossy(&out.stderr);
            return Err(format!("CNI plugin {kind} {command} failed: {msg} {details} {}", stderr.trim())
                .trim()
                .to_string());
        }
        if command == "DEL" || stdout.trim().is_empty() {
            return Ok(prev.cloned().unwrap_or(Value::Null));
        }
        serde_json::from_str(&stdout).map_err(|e| format!("CNI plugin {kind} {command}: result is not JSON: {e}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn configs_and_missing_plugins() {
        let dir = tempfile::tempdir().unwrap();
        let bins = dir.path().join("bin");
        std::fs::create_dir_all(&bins).unwrap();
        std::fs::write(bins.join("bridge"), "").unwrap();
        let conf = dir.path().join("conf");
        std::fs::create_dir_all(&conf).unwrap();
        assert!(CniNetwork::load(&conf, std::slice::from_ref(&bins)).unwrap_err().contains("no CNI network config"));
        std::fs::write(
            conf.join("10-pods.conflist"),
            r#"{"cniVersion":"1.0.0","name":"pods","plugins":[{"type":"bridge"},{"type":"portmap"}]}"#,
        )
        .unwrap();
        let e = CniNetwork::load(&conf, std::slice::from_ref(&bins)).unwrap_err();
        assert!(e.contains("\"portmap\"") && e.contains("not found") && e.contains("10-pods.conflist"), "{e}");
        std::fs::write(bins.join("portmap"), "").unwrap();
        let net = CniNetwork::load(&conf, std::slice::from_ref(&bins)).unwrap();
        assert_eq!((net.name.as_str(), net.plugins.len()), ("pods", 2));
        std::fs::write(conf.join("00-bad.conf"), "{").unwrap();
        assert!(CniNetwork::load(&conf, &[bins]).unwrap_err().contains("not JSON"));
    }
}
