//! The node API's resource figures from the CRI's stats: `/stats/summary` (the kubelet's
//! summary API, what `kubectl get --raw .../proxy/stats/summary` shows) and
//! `/metrics/resource` (the Prometheus text metrics-server scrapes). Pure, but for
//! [`node_usage`], which reads /proc.

use std::collections::HashMap;
use std::fmt::Write;

use cri_proto::v1 as cri;
use serde_json::{Value, json};

use crate::eviction::{FsStats, Storage};

/// The machine's own usage.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct NodeUsage {
    /// Cumulative CPU time of every core, in nanoseconds (all but idle and iowait).
    pub cpu_nanos: u64,
    /// Memory in use (total less available), in bytes.
    pub working_set: u64,
    /// Memory available, in bytes.
    pub available: u64,
}

/// Reads the machine's usage from /proc/stat and /proc/meminfo.
pub fn node_usage() -> NodeUsage {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    parse_node_usage(&stat, &meminfo)
}

/// A field of /proc/meminfo's text (`MemTotal`, `MemAvailable`), in bytes.
pub fn meminfo_bytes(meminfo: &str, key: &str) -> Option<u64> {
    meminfo
        .lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map(|kib| kib * 1024)
}

fn parse_node_usage(stat: &str, meminfo: &str) -> NodeUsage {
    // USER_HZ is 100 on Linux: one tick is 10 ms.
    const NANOS_PER_TICK: u64 = 10_000_000;
    let cpu = stat.lines().find(|l| l.starts_with("cpu ")).map_or(0, |l| {
        let f: Vec<u64> = l.split_whitespace().skip(1).filter_map(|v| v.parse().ok()).collect();
        // user nice system idle iowait irq softirq steal ...
        f.iter().enumerate().filter(|(i, _)| *i != 3 && *i != 4 && *i < 8).map(|(_, v)| v).sum::<u64>()
    });
    let kib = |key: &str| meminfo_bytes(meminfo, key).unwrap_or(0);
    let (total, available) = (kib("MemTotal"), kib("MemAvailable"));
    NodeUsage { cpu_nanos: cpu * NANOS_PER_TICK, working_set: total.saturating_sub(available), available }
}

/// One running container's figures.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ContainerStat {
    pub name: String,
    /// Nanoseconds since the epoch.
    pub started: i64,
    pub at: i64,
    pub cpu_nanos: u64,
    pub nano_cores: Option<u64>,
    pub working_set: u64,
}

/// One ready pod's figures.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PodStat {
    pub name: String,
    pub namespace: String,
    pub uid: String,
    pub started: i64,
    pub containers: Vec<ContainerStat>,
    pub network: Option<cri::NetworkUsage>,
}

/// The ready pods and their running containers' stats, from the CRI's lists.
pub fn pods(
    sandboxes: &[cri::PodSandbox],
    containers: &[cri::Container],
    stats: &[cri::PodSandboxStats],
) -> Vec<PodStat> {
    let linux: HashMap<&str, &cri::LinuxPodSandboxStats> =
        stats.iter().filter_map(|s| Some((s.attributes.as_ref()?.id.as_str(), s.linux.as_ref()?))).collect();
    let by_id: HashMap<&str, &cri::ContainerStats> = linux
        .values()
        .flat_map(|l| l.containers.iter())
        .filter_map(|s| s.attributes.as_ref().map(|a| (a.id.as_str(), s)))
        .collect();
    let mut out = Vec::new();
    for sb in sandboxes.iter().filter(|s| s.state == cri::PodSandboxState::SandboxReady as i32) {
        let m = sb.metadata.clone().unwrap_or_default();
        let mut pod = PodStat {
            name: m.name,
            namespace: m.namespace,
            uid: m.uid,
            started: sb.created_at,
            containers: Vec::new(),
            network: linux.get(sb.id.as_str()).and_then(|l| l.network.clone()),
        };
        for c in containers
            .iter()
            .filter(|c| c.pod_sandbox_id == sb.id && c.state == cri::ContainerState::ContainerRunning as i32)
        {
            let s = by_id.get(c.id.as_str());
            let cpu = s.and_then(|s| s.cpu.as_ref());
            let mem = s.and_then(|s| s.memory.as_ref());
            pod.containers.push(ContainerStat {
                name: c.metadata.as_ref().map(|m| m.name.clone()).unwrap_or_default(),
                started: c.created_at,
                at: cpu.map_or(0, |c| c.timestamp),
                cpu_nanos: cpu.and_then(|c| c.usage_core_nano_seconds.as_ref()).map_or(0, |v| v.value),
                nano_cores: cpu.and_then(|c| c.usage_nano_cores.as_ref()).map(|v| v.value),
                working_set: mem.and_then(|m| m.working_set_bytes.as_ref()).map_or(0, |v| v.value),
            });
        }
        pod.containers.sort_by(|a, b| a.name.cmp(&b.name));
        out.push(pod);
    }
    out.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
    out
}

fn time(nanos: i64) -> String {
    k8s_openapi::jiff::Timestamp::from_nanosecond(nanos as i128).map(|t| t.to_string()).unwrap_or_default()
}

/// A filesystem's figures in the summary's form (statsapi.FsStats), `used` by what is
/// reported on it (the whole filesystem's use when None).
fn fs_json(at: i64, fs: Option<FsStats>, used: Option<u64>) -> Value {
    let mut v = json!({"time": time(at)});
    if let Some(f) = fs {
        v["availableBytes"] = json!(f.available);
        v["capacityBytes"] = json!(f.capacity);
        v["inodesFree"] = json!(f.inodes_free);
        v["inodes"] = json!(f.inodes);
        if used.is_none() {
            v["usedBytes"] = json!(f.capacity.saturating_sub(f.available));
            v["inodesUsed"] = json!(f.inodes.saturating_sub(f.inodes_free));
        }
    }
    if let Some(u) = used {
        v["usedBytes"] = json!(u);
    }
    v
}

/// A pod's network in the summary's form (statsapi.NetworkStats).
fn network_json(n: &cri::NetworkUsage) -> Value {
    let value = |v: &Option<cri::UInt64Value>| v.as_ref().map_or(0, |v| v.value);
    let iface = |i: &cri::NetworkInterfaceUsage| {
        json!({
            "name": i.name,
            "rxBytes": value(&i.rx_bytes),
            "rxErrors": value(&i.rx_errors),
            "txBytes": value(&i.tx_bytes),
            "txErrors": value(&i.tx_errors),
        })
    };
    let mut v = n.default_interface.as_ref().map(iface).unwrap_or_else(|| json!({}));
    v["time"] = json!(time(n.timestamp));
    v["interfaces"] = n.interfaces.iter().map(iface).collect();
    v
}

/// The summary API's JSON (statsapi.Summary). Disk figures come from `storage`, the eviction
/// manager's last round, as the kubelet's come from its housekeeping; `images_bytes` is what
/// the image store holds (the CRI's ImageFsInfo).
pub fn summary(
    node_name: &str,
    node_started: i64,
    now: i64,
    node: &NodeUsage,
    pods: &[PodStat],
    storage: &Storage,
    images_bytes: Option<u64>,
) -> Value {
    let disk_at = if storage.at > 0 { storage.at } else { now };
    let no_pod = Default::default();
    let cpu = |at: i64, total: u64, cores: Option<u64>| {
        let mut v = json!({"time": time(at), "usageCoreNanoSeconds": total});
        if let Some(c) = cores {
            v["usageNanoCores"] = json!(c);
        }
        v
    };
    let memory = |at: i64, ws: u64| json!({"time": time(at), "workingSetBytes": ws, "usageBytes": ws});
    let pods: Vec<Value> = pods
        .iter()
        .map(|p| {
            let disk = storage.pods.get(&p.uid).unwrap_or(&no_pod);
            let containers: Vec<Value> = p
                .containers
                .iter()
                .map(|c| {
                    json!({
                        "name": c.name,
                        "startTime": time(c.started),
                        "cpu": cpu(c.at, c.cpu_nanos, c.nano_cores),
                        "memory": memory(c.at, c.working_set),
                        // A wasm container writes no layer of its own: its image is read-only.
                        "rootfs": fs_json(disk_at, storage.image_fs, Some(0)),
                        "logs": fs_json(disk_at, storage.node_fs, Some(disk.logs.get(&c.name).copied().unwrap_or(0))),
                    })
                })
                .collect();
            let volumes: Vec<Value> = disk
                .volumes
                .iter()
                .map(|(name, (bytes, in_memory))| {
                    let mut v = fs_json(disk_at, if *in_memory { None } else { storage.node_fs }, Some(*bytes));
                    v["name"] = json!(name);
                    v
                })
                .collect();
            let total: u64 = p.containers.iter().map(|c| c.cpu_nanos).sum();
            let cores = p.containers.iter().map(|c| c.nano_cores).sum::<Option<u64>>();
            let ws: u64 = p.containers.iter().map(|c| c.working_set).sum();
            let at = p.containers.iter().map(|c| c.at).max().unwrap_or(now);
            let mut v = json!({
                "podRef": {"name": p.name, "namespace": p.namespace, "uid": p.uid},
                "startTime": time(p.started),
                "containers": containers,
                "cpu": cpu(at, total, cores),
                "memory": memory(at, ws),
                "volume": volumes,
                "ephemeral-storage": fs_json(disk_at, storage.node_fs, Some(disk.disk)),
            });
            if let Some(n) = &p.network {
                v["network"] = network_json(n);
            }
            v
        })
        .collect();
    json!({
        "node": {
            "nodeName": node_name,
            "startTime": time(node_started),
            "cpu": cpu(now, node.cpu_nanos, None),
            "memory": {"time": time(now), "workingSetBytes": node.working_set, "usageBytes": node.working_set, "availableBytes": node.available},
            "fs": fs_json(disk_at, storage.node_fs, None),
            "runtime": {"imageFs": fs_json(disk_at, storage.image_fs, images_bytes)},
        },
        "pods": pods,
    })
}

/// `/metrics/resource`: the kubelet's resource metrics in Prometheus text, what
/// metrics-server reads (times in milliseconds since the epoch).
pub fn resource_metrics(now: i64, node: &NodeUsage, pods: &[PodStat]) -> String {
    let ms = |nanos: i64| nanos / 1_000_000;
    let secs = |nanos: u64| nanos as f64 / 1e9;
    let mut t = String::new();
    let family = |t: &mut String, name: &str, help: &str, kind: &str| {
        let _ = writeln!(t, "# HELP {name} [STABLE] {help}\n# TYPE {name} {kind}");
    };
    // One sample per container: its value, and its time (none for a start time).
    let per_container = |t: &mut String,
                         name: &str,
                         help: &str,
                         kind: &str,
                         value: &dyn Fn(&ContainerStat) -> String,
                         stamped: bool| {
        family(t, name, help, kind);
        for p in pods {
            for c in &p.containers {
                let stamp = if stamped { format!(" {}", ms(c.at.max(1))) } else { String::new() };
                let labels = format!("container=\"{}\",namespace=\"{}\",pod=\"{}\"", c.name, p.namespace, p.name);
                let _ = writeln!(t, "{name}{{{labels}}} {}{stamp}", value(c));
            }
        }
    };
    per_container(
        &mut t,
        "container_cpu_usage_seconds_total",
        "Cumulative cpu time consumed by the container in core-seconds",
        "counter",
        &|c| secs(c.cpu_nanos).to_string(),
        true,
    );
    per_container(
        &mut t,
        "container_memory_working_set_bytes",
        "Current working set of the container in bytes",
        "gauge",
        &|c| c.working_set.to_string(),
        true,
    );
    per_container(
        &mut t,
        "container_start_time_seconds",
        "Start time of the container since unix epoch in seconds",
        "gauge",
        &|c| (c.started as f64 / 1e9).to_string(),
        false,
    );
    family(
        &mut t,
        "node_cpu_usage_seconds_total",
        "Cumulative cpu time consumed by the node in core-seconds",
        "counter",
    );
    let _ = writeln!(t, "node_cpu_usage_seconds_total {} {}", secs(node.cpu_nanos), ms(now));
    family(&mut t, "node_memory_working_set_bytes", "Current working set of the node in bytes", "gauge");
    let _ = writeln!(t, "node_memory_working_set_bytes {} {}", node.working_set, ms(now));
    family(&mut t, "pod_cpu_usage_seconds_total", "Cumulative cpu time consumed by the pod in core-seconds", "counter");
    for p in pods {
        let total: u64 = p.containers.iter().map(|c| c.cpu_nanos).sum();
        let _ = writeln!(
            t,
            "pod_cpu_usage_seconds_total{{namespace=\"{}\",pod=\"{}\"}} {} {}",
            p.namespace,
            p.name,
            secs(total),
            ms(now)
        );
    }
    family(&mut t, "pod_memory_working_set_bytes", "Current working set of the pod in bytes", "gauge");
    for p in pods {
        let ws: u64 = p.containers.iter().map(|c| c.working_set).sum();
        let _ = writeln!(
            t,
            "pod_memory_working_set_bytes{{namespace=\"{}\",pod=\"{}\"}} {} {}",
            p.namespace,
            p.name,
            ws,
            ms(now)
        );
    }
    family(&mut t, "scrape_error", "1 if there was an error while getting container metrics, 0 otherwise", "gauge");
    t.push_str("scrape_error 0\n");
    t
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sandbox(id: &str, name: &str, ready: bool) -> cri::PodSandbox {
        cri::PodSandbox {
            id: id.into(),
            metadata: Some(cri::PodSandboxMetadata {
                name: name.into(),
                uid: format!("u-{name}"),
                namespace: "ns".into(),
                attempt: 0,
            }),
            state: if ready { cri::PodSandboxState::SandboxReady } else { cri::PodSandboxState::SandboxNotready }
                as i32,
            created_at: 1_000_000_000,
            ..Default::default()
        }
    }

    fn container(id: &str, sb: &str, name: &str, running: bool) -> cri::Container {
        cri::Container {
            id: id.into(),
            pod_sandbox_id: sb.into(),
            metadata: Some(cri::ContainerMetadata { name: name.into(), attempt: 0 }),
            state: if running { cri::ContainerState::ContainerRunning } else { cri::ContainerState::ContainerExited }
                as i32,
            created_at: 2_000_000_000,
            ..Default::default()
        }
    }

    fn stat(id: &str, cpu: u64, ws: u64) -> cri::ContainerStats {
        cri::ContainerStats {
            attributes: Some(cri::ContainerAttributes { id: id.into(), ..Default::default() }),
            cpu: Some(cri::CpuUsage {
                timestamp: 3_000_000_000,
                usage_core_nano_seconds: Some(cri::UInt64Value { value: cpu }),
                usage_nano_cores: Some(cri::UInt64Value { value: 5 }),
                ..Default::default()
            }),
            memory: Some(cri::MemoryUsage {
                timestamp: 3_000_000_000,
                working_set_bytes: Some(cri::UInt64Value { value: ws }),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn ready_pods_and_running_containers_add_up() {
        let sbs = [sandbox("s1", "web", true), sandbox("s2", "gone", false)];
        let cs = [
            container("c1", "s1", "app", true),
            container("c2", "s1", "side", true),
            container("c3", "s1", "old", false),
        ];
        let lo = cri::NetworkInterfaceUsage {
            name: "lo".into(),
            rx_bytes: Some(cri::UInt64Value { value: 300 }),
            tx_bytes: Some(cri::UInt64Value { value: 300 }),
            ..Default::default()
        };
        let st = [cri::PodSandboxStats {
            attributes: Some(cri::PodSandboxAttributes { id: "s1".into(), ..Default::default() }),
            linux: Some(cri::LinuxPodSandboxStats {
                containers: vec![stat("c1", 2_000_000_000, 1000), stat("c2", 500_000_000, 24)],
                network: Some(cri::NetworkUsage {
                    timestamp: 3_000_000_000,
                    default_interface: Some(lo.clone()),
                    interfaces: vec![lo],
                }),
                ..Default::default()
            }),
            windows: None,
        }];
        let p = pods(&sbs, &cs, &st);
        assert_eq!(p.len(), 1);
        assert_eq!(p[0].containers.iter().map(|c| c.name.as_str()).collect::<Vec<_>>(), ["app", "side"]);
        let node = NodeUsage { cpu_nanos: 9_000_000_000, working_set: 1 << 30, available: 1 << 31 };
        let fs = FsStats { available: 600, capacity: 1000, inodes_free: 90, inodes: 100 };
        let storage = Storage {
            at: 3_500_000_000,
            node_fs: Some(fs),
            image_fs: Some(fs),
            pods: HashMap::from([(
                "u-web".to_string(),
                crate::eviction::PodStorage {
                    volumes: [("cache".to_string(), (40, false)), ("shm".to_string(), (8, true))].into(),
                    logs: [("app".to_string(), 10)].into(),
                    disk: 55,
                },
            )]),
        };
        let s = summary("n1", 0, 4_000_000_000, &node, &p, &storage, Some(77));
        assert_eq!(s["node"]["fs"]["usedBytes"], 400);
        assert_eq!(s["node"]["fs"]["inodesUsed"], 10);
        assert_eq!(s["node"]["runtime"]["imageFs"]["usedBytes"], 77);
        let pod = &s["pods"][0];
        assert_eq!(pod["network"]["name"], "lo");
        assert_eq!(pod["network"]["rxBytes"], 300);
        assert_eq!(pod["network"]["interfaces"][0]["txBytes"], 300);
        assert_eq!(pod["ephemeral-storage"]["usedBytes"], 55);
        assert_eq!(pod["ephemeral-storage"]["capacityBytes"], 1000);
        assert_eq!(
            pod["volume"][0],
            json!({"time": "1970-01-01T00:00:03.5Z", "name": "cache", "usedBytes": 40, "availableBytes": 600, "capacityBytes": 1000, "inodesFree": 90, "inodes": 100})
        );
        assert_eq!(pod["volume"][1], json!({"time": "1970-01-01T00:00:03.5Z", "name": "shm", "usedBytes": 8}));
        assert_eq!(pod["containers"][0]["logs"]["usedBytes"], 10);
        assert_eq!(pod["containers"][1]["logs"]["usedBytes"], 0);
        assert_eq!(pod["containers"][0]["rootfs"]["usedBytes"], 0);
        assert_eq!(s["node"]["nodeName"], "n1");
        let pod = &s["pods"][0];
        assert_eq!(pod["podRef"], json!({"name": "web", "namespace": "ns", "uid": "u-web"}));
        assert_eq!(pod["cpu"]["usageCoreNanoSeconds"], 2_500_000_000u64);
        assert_eq!(pod["cpu"]["usageNanoCores"], 10);
        assert_eq!(pod["memory"]["workingSetBytes"], 1024);
        assert_eq!(pod["containers"][0]["startTime"], "1970-01-01T00:00:02Z");
        let m = resource_metrics(4_000_000_000, &node, &p);
        assert!(
            m.contains("container_cpu_usage_seconds_total{container=\"app\",namespace=\"ns\",pod=\"web\"} 2 3000\n"),
            "{m}"
        );
        assert!(m.contains("pod_memory_working_set_bytes{namespace=\"ns\",pod=\"web\"} 1024 4000\n"), "{m}");
        assert!(m.contains("node_cpu_usage_seconds_total 9 4000\n"), "{m}");
        assert!(m.contains("# TYPE node_memory_working_set_bytes gauge\n"), "{m}");
    }

    #[test]
    fn proc_files_parse() {
        let stat = "cpu  100 5 50 1000 20 3 2 1 0 0\ncpu0 1 2 3\n";
        let meminfo = "MemTotal:       2048 kB\nMemFree:         100 kB\nMemAvailable:    1024 kB\n";
        let u = parse_node_usage(stat, meminfo);
        assert_eq!(u.cpu_nanos, (100 + 5 + 50 + 3 + 2 + 1) * 10_000_000);
        assert_eq!((u.working_set, u.available), (1024 * 1024, 1024 * 1024));
    }
}
