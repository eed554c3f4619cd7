//! The CRI v1 server: RuntimeService and ImageService over [`Runtime`].
//!
//! This is the one module that speaks protobuf: requests are mapped to the runtime's own types,
//! records back to CRI messages, and every runtime error to one gRPC code ([`status`]).

use std::collections::HashMap;
use std::pin::Pin;

use cri::image_service_server::ImageService;
use cri::runtime_service_server::RuntimeService;
use cri_proto::v1 as cri;
use tokio_stream::Stream;
use tonic::{Request, Response, Status};

use crate::model::{self, ContainerRecord, ContainerState, Labels, NamespaceMode, SandboxRecord, SandboxState};
use crate::net::netns::Interface;
use crate::runtime::{EventKind, RUNTIME_HANDLERS, Runtime, now_nanos};
use crate::{Error, Result};

/// CRI version wasmlet speaks.
pub const CRI_VERSION: &str = "v1";
/// What Version answers as `version` (the kubelet checks for "0.1.0").
pub const KUBE_RUNTIME_API_VERSION: &str = "0.1.0";
/// Items per message in the Stream* list RPCs.
const STREAM_CHUNK: usize = 500;
/// The key of PodSandboxStatus's verbose info that holds the pod's address inside its own
/// namespace (reported even where the pod IP is not, in rootless mode).
pub const POD_ADDRESS_INFO: &str = "pod_address";

/// Maps a runtime error to the gRPC status a CRI client expects.
pub fn status(e: Error) -> Status {
    Status::new(code(&e), e.to_string())
}

fn code(e: &Error) -> tonic::Code {
    use tonic::Code;
    use wasmlet_images::Error as I;
    match e {
        Error::Shared(inner) => code(inner),
        Error::NotFound { .. } | Error::Image(I::NotFound(_)) => Code::NotFound,
        Error::InvalidArgument(_)
        | Error::Image(
            I::InvalidReference { .. }
            | I::NotWasm { .. }
            | I::InvalidWasm { .. }
            | I::BadImage { .. }
            | I::TooLarge { .. },
        ) => Code::InvalidArgument,
        // As containerd: whatever the registry said is in the message.
        Error::Image(I::Registry { .. }) => Code::Unknown,
        Error::AlreadyExists(_) => Code::AlreadyExists,
        Error::FailedPrecondition(_) => Code::FailedPrecondition,
        Error::Unimplemented(_) => Code::Unimplemented,
        Error::DeadlineExceeded(_) => Code::DeadlineExceeded,
        Error::Image(I::DigestMismatch { .. }) => Code::DataLoss,
        Error::Image(I::CorruptIndex { .. } | I::Io { .. }) | Error::Internal(_) => Code::Internal,
    }
}

/// Maps a streaming server refusal to its gRPC status.
fn stream_status(e: wasmlet_streaming::Error) -> Status {
    match e {
        wasmlet_streaming::Error::TooManyRequests(_) => Status::resource_exhausted(e.to_string()),
        wasmlet_streaming::Error::InvalidRequest(_) => Status::invalid_argument(e.to_string()),
        other => Status::internal(other.to_string()),
    }
}

fn invalid(msg: impl Into<String>) -> Status {
    Status::invalid_argument(msg.into())
}

/// The CRI server. Serve it with `cri::runtime_service_server::RuntimeServiceServer::new(s.clone())`
/// and the image service likewise (see [`crate::server`]).
#[derive(Clone)]
pub struct CriServer {
    runtime: Runtime,
    streaming: wasmlet_streaming::Server,
}

impl CriServer {
    /// A server over `runtime`, whose Exec, Attach and PortForward answer URLs on `streaming`.
    pub fn new(runtime: Runtime, streaming: wasmlet_streaming::Server) -> CriServer {
        CriServer { runtime, streaming }
    }

    /// Checks that a container exists and runs (before its exec or attach URL is handed out).
    fn running(&self, id: &str) -> std::result::Result<(), Status> {
        if id.is_empty() {
            return Err(invalid("missing required container_id"));
        }
        let c = self.runtime.container(id).map_err(status)?;
        if c.state != ContainerState::Running {
            return Err(Status::failed_precondition(format!("container {id} is not running")));
        }
        Ok(())
    }

    async fn blocking<T: Send + 'static>(&self, f: impl FnOnce(Runtime) -> Result<T> + Send + 'static) -> Result<T> {
        let rt = self.runtime.clone();
        tokio::task::spawn_blocking(move || f(rt)).await.map_err(|e| Error::Internal(format!("task: {e}")))?
    }
}

// ---- protobuf -> runtime ----------------------------------------------------------------------

fn labels(m: HashMap<String, String>) -> Labels {
    m.into_iter().collect()
}

fn hash(m: &Labels) -> HashMap<String, String> {
    m.iter().map(|(k, v)| (k.clone(), v.clone())).collect()
}

fn ns_mode(v: i32) -> NamespaceMode {
    match cri::NamespaceMode::try_from(v) {
        Ok(cri::NamespaceMode::Container) => NamespaceMode::Container,
        Ok(cri::NamespaceMode::Node) => NamespaceMode::Node,
        Ok(cri::NamespaceMode::Target) => NamespaceMode::Target,
        _ => NamespaceMode::Pod,
    }
}

fn ns_mode_back(m: NamespaceMode) -> i32 {
    (match m {
        NamespaceMode::Pod => cri::NamespaceMode::Pod,
        NamespaceMode::Container => cri::NamespaceMode::Container,
        NamespaceMode::Node => cri::NamespaceMode::Node,
        NamespaceMode::Target => cri::NamespaceMode::Target,
    }) as i32
}

fn sandbox_spec(
    config: Option<cri::PodSandboxConfig>,
    handler: String,
) -> std::result::Result<model::SandboxSpec, Status> {
    let c = config.ok_or_else(|| invalid("RunPodSandbox: config is required"))?;
    let m = c.metadata.ok_or_else(|| invalid("RunPodSandbox: config.metadata is required"))?;
    let ns = c.linux.as_ref().and_then(|l| l.security_context.as_ref()).and_then(|s| s.namespace_options.as_ref());
    Ok(model::SandboxSpec {
        metadata: model::SandboxMetadata { name: m.name, uid: m.uid, namespace: m.namespace, attempt: m.attempt },
        hostname: c.hostname,
        log_directory: c.log_directory,
        dns: c.dns_config.map(|d| model::DnsConfig { servers: d.servers, searches: d.searches, options: d.options }),
        port_mappings: c
            .port_mappings
            .into_iter()
            .map(|p| model::PortMapping {
                protocol: p.protocol,
                container_port: p.container_port,
                host_port: p.host_port,
                host_ip: p.host_ip,
            })
            .collect(),
        labels: labels(c.labels),
        annotations: labels(c.annotations),
        network: ns.map_or(NamespaceMode::Pod, |n| ns_mode(n.network)),
        pid: ns.map_or(NamespaceMode::Pod, |n| ns_mode(n.pid)),
        ipc: ns.map_or(NamespaceMode::Pod, |n| ns_mode(n.ipc)),
        runtime_handler: handler,
    })
}

fn resources(r: cri::LinuxContainerResources) -> model::Resources {
    model::Resources {
        cpu_period: r.cpu_period,
        cpu_quota: r.cpu_quota,
        cpu_shares: r.cpu_shares,
        memory_limit_in_bytes: r.memory_limit_in_bytes,
        oom_score_adj: r.oom_score_adj,
        cpuset_cpus: r.cpuset_cpus,
        cpuset_mems: r.cpuset_mems,
        hugepage_limits: r.hugepage_limits.into_iter().map(|h| (h.page_size, h.limit)).collect(),
        unified: labels(r.unified),
        memory_swap_limit_in_bytes: r.memory_swap_limit_in_bytes,
    }
}

fn resources_back(r: &model::Resources) -> cri::LinuxContainerResources {
    cri::LinuxContainerResources {
        cpu_period: r.cpu_period,
        cpu_quota: r.cpu_quota,
        cpu_shares: r.cpu_shares,
        memory_limit_in_bytes: r.memory_limit_in_bytes,
        oom_score_adj: r.oom_score_adj,
        cpuset_cpus: r.cpuset_cpus.clone(),
        cpuset_mems: r.cpuset_mems.clone(),
        hugepage_limits: r
            .hugepage_limits
            .iter()
            .map(|(page_size, limit)| cri::HugepageLimit { page_size: page_size.clone(), limit: *limit })
            .collect(),
        unified: hash(&r.unified),
        memory_swap_limit_in_bytes: r.memory_swap_limit_in_bytes,
    }
}

fn image_spec(i: Option<cri::ImageSpec>) -> model::ImageSpec {
    let i = i.unwrap_or_default();
    model::ImageSpec {
        image: i.image,
        annotations: labels(i.annotations),
        user_specified_image: i.user_specified_image,
        runtime_handler: i.runtime_handler,
    }
}

fn container_spec(c: Option<cri::ContainerConfig>) -> std::result::Result<model::ContainerSpec, Status> {
    let c = c.ok_or_else(|| invalid("CreateContainer: config is required"))?;
    let m = c.metadata.ok_or_else(|| invalid("CreateContainer: config.metadata is required"))?;
    Ok(model::ContainerSpec {
        metadata: model::ContainerMetadata { name: m.name, attempt: m.attempt },
        image: image_spec(c.image),
        command: c.command,
        args: c.args,
        working_dir: c.working_dir,
        envs: c.envs.into_iter().map(|kv| (kv.key, kv.value)).collect(),
        mounts: c
            .mounts
            .into_iter()
            .map(|m| model::Mount {
                container_path: m.container_path,
                host_path: m.host_path,
                readonly: m.readonly,
                selinux_relabel: m.selinux_relabel,
                propagation: m.propagation,
                recursive_read_only: m.recursive_read_only,
            })
            .collect(),
        labels: labels(c.labels),
        annotations: labels(c.annotations),
        log_path: c.log_path,
        stdin: c.stdin,
        stdin_once: c.stdin_once,
        tty: c.tty,
        resources: c.linux.and_then(|l| l.resources).map(resources),
        stop_signal: c.stop_signal,
    })
}

// ---- runtime -> protobuf ----------------------------------------------------------------------

fn sandbox_state(s: SandboxState) -> i32 {
    (match s {
        SandboxState::Ready => cri::PodSandboxState::SandboxReady,
        SandboxState::NotReady => cri::PodSandboxState::SandboxNotready,
    }) as i32
}

fn sandbox_metadata(r: &SandboxRecord) -> cri::PodSandboxMetadata {
    let m = &r.spec.metadata;
    cri::PodSandboxMetadata {
        name: m.name.clone(),
        uid: m.uid.clone(),
        namespace: m.namespace.clone(),
        attempt: m.attempt,
    }
}

fn to_pod_sandbox(r: &SandboxRecord) -> cri::PodSandbox {
    cri::PodSandbox {
        id: r.id.clone(),
        metadata: Some(sandbox_metadata(r)),
        state: sandbox_state(r.state),
        created_at: r.created_at,
        labels: hash(&r.spec.labels),
        annotations: hash(&r.spec.annotations),
        runtime_handler: r.spec.runtime_handler.clone(),
    }
}

/// A sandbox's CRI status; `ip_reported` false (rootless) leaves its address out: it exists
/// only inside the pod, and the host would route it away.
fn to_sandbox_status(r: &SandboxRecord, ip_reported: bool) -> cri::PodSandboxStatus {
    let s = &r.spec;
    let ip = if ip_reported { r.ip.clone() } else { String::new() };
    cri::PodSandboxStatus {
        id: r.id.clone(),
        metadata: Some(sandbox_metadata(r)),
        state: sandbox_state(r.state),
        created_at: r.created_at,
        network: Some(cri::PodSandboxNetworkStatus { ip, additional_ips: Vec::new() }),
        linux: Some(cri::LinuxPodSandboxStatus {
            namespaces: Some(cri::Namespace {
                options: Some(cri::NamespaceOption {
                    network: ns_mode_back(s.network),
                    pid: ns_mode_back(s.pid),
                    ipc: ns_mode_back(s.ipc),
                    ..Default::default()
                }),
            }),
        }),
        labels: hash(&s.labels),
        annotations: hash(&s.annotations),
        runtime_handler: s.runtime_handler.clone(),
    }
}

fn container_state(s: ContainerState) -> i32 {
    (match s {
        ContainerState::Created => cri::ContainerState::ContainerCreated,
        ContainerState::Running => cri::ContainerState::ContainerRunning,
        ContainerState::Exited => cri::ContainerState::ContainerExited,
        ContainerState::Unknown => cri::ContainerState::ContainerUnknown,
    }) as i32
}

fn image_spec_back(r: &ContainerRecord) -> cri::ImageSpec {
    cri::ImageSpec {
        image: r.image_name.clone(),
        annotations: hash(&r.spec.image.annotations),
        user_specified_image: r.spec.image.user_specified_image.clone(),
        runtime_handler: r.spec.image.runtime_handler.clone(),
        image_ref: r.image_ref.clone(),
    }
}

fn container_metadata(r: &ContainerRecord) -> cri::ContainerMetadata {
    cri::ContainerMetadata { name: r.spec.metadata.name.clone(), attempt: r.spec.metadata.attempt }
}

fn to_container(r: &ContainerRecord) -> cri::Container {
    cri::Container {
        id: r.id.clone(),
        pod_sandbox_id: r.sandbox_id.clone(),
        metadata: Some(container_metadata(r)),
        image: Some(image_spec_back(r)),
        image_ref: r.image_ref.clone(),
        state: container_state(r.state),
        created_at: r.created_at,
        labels: hash(&r.spec.labels),
        annotations: hash(&r.spec.annotations),
        image_id: r.image_id.clone(),
    }
}

fn to_container_status(r: &ContainerRecord) -> cri::ContainerStatus {
    let exit = r.exit.clone().unwrap_or(model::ExitStatus { code: 0, reason: String::new(), message: String::new() });
    cri::ContainerStatus {
        id: r.id.clone(),
        metadata: Some(container_metadata(r)),
        state: container_state(r.state),
        created_at: r.created_at,
        started_at: r.started_at,
        finished_at: r.finished_at,
        exit_code: exit.code,
        image: Some(image_spec_back(r)),
        image_ref: r.image_ref.clone(),
        reason: exit.reason,
        message: exit.message,
        labels: hash(&r.spec.labels),
        annotations: hash(&r.spec.annotations),
        mounts: r
            .spec
            .mounts
            .iter()
            .map(|m| cri::Mount {
                container_path: m.container_path.clone(),
                host_path: m.host_path.clone(),
                readonly: m.readonly,
                selinux_relabel: m.selinux_relabel,
                propagation: m.propagation,
                recursive_read_only: m.recursive_read_only,
                ..Default::default()
            })
            .collect(),
        log_path: r.log_file.as_ref().map(|p| p.display().to_string()).unwrap_or_default(),
        resources: r
            .spec
            .resources
            .as_ref()
            .map(|res| cri::ContainerResources { linux: Some(resources_back(res)), windows: None }),
        image_id: r.image_id.clone(),
        user: None,
        stop_signal: r.spec.stop_signal,
    }
}

fn to_image(i: &wasmlet_images::ImageRecord) -> cri::Image {
    cri::Image {
        id: i.id.clone(),
        repo_tags: i.repo_tags.clone(),
        repo_digests: i.repo_digests.clone(),
        size: i.size.max(1),
        uid: i.uid.map(|value| cri::Int64Value { value }),
        username: i.username.clone(),
        spec: Some(cri::ImageSpec { image: i.id.clone(), annotations: hash(&i.annotations), ..Default::default() }),
        pinned: false,
    }
}

fn matches_labels(selector: &HashMap<String, String>, labels: &Labels) -> bool {
    selector.iter().all(|(k, v)| labels.get(k) == Some(v))
}

fn filter_sandboxes(rt: &Runtime, f: Option<cri::PodSandboxFilter>) -> Vec<cri::PodSandbox> {
    let f = f.unwrap_or_default();
    let mut out: Vec<_> = rt
        .sandboxes_where(|s| {
            (f.id.is_empty() || s.id.starts_with(&f.id))
                && f.state.as_ref().is_none_or(|st| st.state == sandbox_state(s.state))
                && matches_labels(&f.label_selector, &s.spec.labels)
        })
        .iter()
        .map(to_pod_sandbox)
        .collect();
    out.sort_by_key(|s| s.created_at);
    out
}

fn filter_containers(rt: &Runtime, f: Option<cri::ContainerFilter>) -> Vec<cri::Container> {
    let f = f.unwrap_or_default();
    let mut out: Vec<_> = rt
        .containers_where(|c| {
            (f.id.is_empty() || c.id.starts_with(&f.id))
                && (f.pod_sandbox_id.is_empty() || c.sandbox_id.starts_with(&f.pod_sandbox_id))
                && f.state.as_ref().is_none_or(|st| st.state == container_state(c.state))
                && matches_labels(&f.label_selector, &c.spec.labels)
        })
        .iter()
        .map(to_container)
        .collect();
    out.sort_by_key(|c| c.created_at);
    out
}

fn uint(value: u64) -> Option<cri::UInt64Value> {
    Some(cri::UInt64Value { value })
}

fn container_stats(rt: &Runtime, r: &ContainerRecord) -> Result<cri::ContainerStats> {
    let u = rt.usage(&r.id)?;
    Ok(cri::ContainerStats {
        attributes: Some(cri::ContainerAttributes {
            id: r.id.clone(),
            metadata: Some(container_metadata(r)),
            labels: hash(&r.spec.labels),
            annotations: hash(&r.spec.annotations),
        }),
        cpu: Some(cri::CpuUsage {
            timestamp: u.timestamp,
            usage_core_nano_seconds: uint(u.cpu_nanos),
            usage_nano_cores: u.nano_cores.and_then(uint),
            psi: None,
        }),
        memory: Some(cri::MemoryUsage {
            timestamp: u.timestamp,
            working_set_bytes: uint(u.memory_bytes),
            available_bytes: u.memory_limit.and_then(|l| uint(l.saturating_sub(u.memory_bytes))),
            usage_bytes: uint(u.memory_bytes),
            rss_bytes: uint(u.memory_bytes),
            page_faults: uint(0),
            major_page_faults: uint(0),
            psi: None,
        }),
        writable_layer: Some(cri::FilesystemUsage {
            timestamp: u.timestamp,
            fs_id: Some(cri::FilesystemIdentifier { mountpoint: rt.root().display().to_string() }),
            used_bytes: uint(0),
            inodes_used: uint(0),
        }),
        swap: None,
        io: None,
    })
}

/// A pod's network usage from its namespace's interfaces: with CNI the pod's own interface
/// (eth0) is the default and loopback is left out, as the kubelet's cAdvisor does; a pod of
/// wasmlet's own network has only its loopback, which carries all its traffic (its address
/// is there), so that is reported.
fn network_usage(ts: i64, ifaces: &[Interface]) -> Option<cri::NetworkUsage> {
    let usage = |i: &Interface| cri::NetworkInterfaceUsage {
        name: i.name.clone(),
        rx_bytes: uint(i.rx_bytes),
        rx_errors: uint(i.rx_errors),
        tx_bytes: uint(i.tx_bytes),
        tx_errors: uint(i.tx_errors),
    };
    let own: Vec<_> = ifaces.iter().filter(|i| i.name != "lo").map(usage).collect();
    let interfaces = if own.is_empty() { ifaces.iter().map(usage).collect::<Vec<_>>() } else { own };
    let default = interfaces.iter().find(|i| i.name == "eth0").or(interfaces.first()).cloned()?;
    Some(cri::NetworkUsage { timestamp: ts, default_interface: Some(default), interfaces })
}

/// A sandbox's stats from those of `records`, its containers, and its interfaces.
fn sandbox_stats(
    rt: &Runtime,
    s: &SandboxRecord,
    records: &[ContainerRecord],
    net: Option<&Vec<Interface>>,
) -> Result<cri::PodSandboxStats> {
    let mut containers = Vec::new();
    for c in records {
        containers.push(container_stats(rt, c)?);
    }
    let running = records.iter().filter(|c| c.state == ContainerState::Running).count() as u64;
    let ts = now_nanos();
    let sum = |f: &dyn Fn(&cri::ContainerStats) -> Option<u64>| containers.iter().filter_map(f).sum::<u64>();
    let cpu = sum(&|c| c.cpu.as_ref()?.usage_core_nano_seconds.as_ref().map(|v| v.value));
    let nano_cores = sum(&|c| c.cpu.as_ref()?.usage_nano_cores.as_ref().map(|v| v.value));
    let mem = sum(&|c| c.memory.as_ref()?.working_set_bytes.as_ref().map(|v| v.value));
    Ok(cri::PodSandboxStats {
        attributes: Some(cri::PodSandboxAttributes {
            id: s.id.clone(),
            metadata: Some(sandbox_metadata(s)),
            labels: hash(&s.spec.labels),
            annotations: hash(&s.spec.annotations),
        }),
        linux: Some(cri::LinuxPodSandboxStats {
            cpu: Some(cri::CpuUsage {
                timestamp: ts,
                usage_core_nano_seconds: uint(cpu),
                usage_nano_cores: uint(nano_cores),
                psi: None,
            }),
            memory: Some(cri::MemoryUsage {
                timestamp: ts,
                working_set_bytes: uint(mem),
                usage_bytes: uint(mem),
                rss_bytes: uint(mem),
                ..Default::default()
            }),
            network: net.and_then(|n| network_usage(ts, n)),
            process: Some(cri::ProcessUsage { timestamp: ts, process_count: uint(running) }),
            containers,
            io: None,
        }),
        windows: None,
    })
}

/// The label keys every metric of ListPodSandboxMetrics starts with: the container's id, name
/// and image (a pod's own metrics: its id, "POD" and no image). The kubelet appends namespace,
/// pod and container, and serves them on /metrics/cadvisor.
const METRIC_LABELS: [&str; 3] = ["id", "name", "image"];

/// The metrics ListPodSandboxMetrics reports, under cAdvisor's names: (name, help, type, the
/// label keys after [`METRIC_LABELS`]). Values are whole units (the CRI carries integers).
const METRICS: &[(&str, &str, cri::MetricType, &[&str])] = &[
    ("container_cpu_usage_seconds_total", "CPU time used, in seconds.", cri::MetricType::Counter, &[]),
    ("container_memory_usage_bytes", "Memory held now, in bytes.", cri::MetricType::Gauge, &[]),
    ("container_memory_working_set_bytes", "Working set now, in bytes.", cri::MetricType::Gauge, &[]),
    ("container_memory_rss", "Resident memory now, in bytes.", cri::MetricType::Gauge, &[]),
    ("container_oom_events_total", "Times the container ran out of memory.", cri::MetricType::Counter, &[]),
    ("container_spec_memory_limit_bytes", "The memory limit, in bytes (0: none).", cri::MetricType::Gauge, &[]),
    ("container_spec_cpu_quota", "The CPU quota per period, in microseconds.", cri::MetricType::Gauge, &[]),
    ("container_spec_cpu_period", "The CPU quota period, in microseconds.", cri::MetricType::Gauge, &[]),
    ("container_spec_cpu_shares", "The CPU shares.", cri::MetricType::Gauge, &[]),
    ("container_network_receive_bytes_total", "Bytes received.", cri::MetricType::Counter, &["interface"]),
    ("container_network_receive_errors_total", "Receive errors.", cri::MetricType::Counter, &["interface"]),
    ("container_network_transmit_bytes_total", "Bytes sent.", cri::MetricType::Counter, &["interface"]),
    ("container_network_transmit_errors_total", "Transmit errors.", cri::MetricType::Counter, &["interface"]),
];

fn metric_descriptors() -> Vec<cri::MetricDescriptor> {
    METRICS
        .iter()
        .map(|(name, help, _, extra)| cri::MetricDescriptor {
            name: name.to_string(),
            help: help.to_string(),
            label_keys: METRIC_LABELS.iter().chain(extra.iter()).map(|k| k.to_string()).collect(),
        })
        .collect()
}

/// One metric of [`METRICS`] by name, with its label values.
fn metric(name: &str, ts: i64, labels: &[&str], value: u64) -> cri::Metric {
    let (_, _, kind, _) = METRICS.iter().find(|m| m.0 == name).expect("a metric of METRICS");
    cri::Metric {
        name: name.to_string(),
        timestamp: ts,
        metric_type: *kind as i32,
        label_values: labels.iter().map(|l| l.to_string()).collect(),
        value: uint(value),
    }
}

/// A pod's metrics from its stats: the network at pod level, CPU and memory per container.
fn sandbox_metrics(stats: &cri::PodSandboxStats, by_id: &HashMap<&str, &ContainerRecord>) -> cri::PodSandboxMetrics {
    let id = stats.attributes.as_ref().map(|a| a.id.clone()).unwrap_or_default();
    let linux = stats.linux.clone().unwrap_or_default();
    let ts = linux.cpu.as_ref().map_or(0, |c| c.timestamp);
    let mut metrics = Vec::new();
    if let Some(net) = &linux.network {
        for i in &net.interfaces {
            let labels = [id.as_str(), "POD", "", i.name.as_str()];
            let v = |x: &Option<cri::UInt64Value>| x.as_ref().map_or(0, |v| v.value);
            metrics.push(metric("container_network_receive_bytes_total", ts, &labels, v(&i.rx_bytes)));
            metrics.push(metric("container_network_receive_errors_total", ts, &labels, v(&i.rx_errors)));
            metrics.push(metric("container_network_transmit_bytes_total", ts, &labels, v(&i.tx_bytes)));
            metrics.push(metric("container_network_transmit_errors_total", ts, &labels, v(&i.tx_errors)));
        }
    }
    let container_metrics = linux
        .containers
        .iter()
        .filter_map(|c| {
            let r = by_id.get(c.attributes.as_ref()?.id.as_str())?;
            let labels = [r.id.as_str(), r.spec.metadata.name.as_str(), r.image_name.as_str()];
            let cpu = c.cpu.as_ref().and_then(|c| c.usage_core_nano_seconds.as_ref()).map_or(0, |v| v.value);
            let mem = c.memory.unwrap_or_default();
            let v = |x: Option<cri::UInt64Value>| x.map_or(0, |v| v.value);
            let res = r.spec.resources.clone().unwrap_or_default();
            let oom = r.exit.as_ref().is_some_and(|e| e.reason == "OOMKilled");
            let at = c.cpu.as_ref().map_or(ts, |c| c.timestamp);
            Some(cri::ContainerMetrics {
                container_id: r.id.clone(),
                metrics: vec![
                    metric("container_cpu_usage_seconds_total", at, &labels, cpu / 1_000_000_000),
                    metric("container_memory_usage_bytes", at, &labels, v(mem.usage_bytes)),
                    metric("container_memory_working_set_bytes", at, &labels, v(mem.working_set_bytes)),
                    metric("container_memory_rss", at, &labels, v(mem.rss_bytes)),
                    metric("container_oom_events_total", at, &labels, u64::from(oom)),
                    metric("container_spec_memory_limit_bytes", at, &labels, res.memory_limit_in_bytes.max(0) as u64),
                    metric("container_spec_cpu_quota", at, &labels, res.cpu_quota.max(0) as u64),
                    metric("container_spec_cpu_period", at, &labels, res.cpu_period.max(0) as u64),
                    metric("container_spec_cpu_shares", at, &labels, res.cpu_shares.max(0) as u64),
                ],
            })
        })
        .collect();
    cri::PodSandboxMetrics { pod_sandbox_id: id, metrics, container_metrics }
}

fn chunked<T: Send + 'static, M: Send + 'static>(items: Vec<T>, wrap: fn(Vec<T>) -> M) -> ResponseStream<M> {
    let mut chunks = Vec::new();
    let mut items = items.into_iter().peekable();
    while items.peek().is_some() {
        chunks.push(Ok(wrap(items.by_ref().take(STREAM_CHUNK).collect())));
    }
    Box::pin(tokio_stream::iter(chunks))
}

type ResponseStream<T> = Pin<Box<dyn Stream<Item = std::result::Result<T, Status>> + Send>>;

fn unimplemented<T>(why: &str) -> std::result::Result<Response<T>, Status> {
    Err(Status::unimplemented(why.to_string()))
}

#[tonic::async_trait]
impl RuntimeService for CriServer {
    type StreamPodSandboxesStream = ResponseStream<cri::StreamPodSandboxesResponse>;
    type StreamContainersStream = ResponseStream<cri::StreamContainersResponse>;
    type StreamContainerStatsStream = ResponseStream<cri::StreamContainerStatsResponse>;
    type StreamPodSandboxStatsStream = ResponseStream<cri::StreamPodSandboxStatsResponse>;
    type GetContainerEventsStream = ResponseStream<cri::ContainerEventResponse>;
    type StreamPodSandboxMetricsStream = ResponseStream<cri::StreamPodSandboxMetricsResponse>;

    async fn version(
        &self,
        _: Request<cri::VersionRequest>,
    ) -> std::result::Result<Response<cri::VersionResponse>, Status> {
        Ok(Response::new(cri::VersionResponse {
            version: KUBE_RUNTIME_API_VERSION.to_string(),
            runtime_name: "wasmlet".to_string(),
            runtime_version: env!("CARGO_PKG_VERSION").to_string(),
            runtime_api_version: CRI_VERSION.to_string(),
        }))
    }

    #[tracing::instrument(skip_all)]
    async fn run_pod_sandbox(
        &self,
        req: Request<cri::RunPodSandboxRequest>,
    ) -> std::result::Result<Response<cri::RunPodSandboxResponse>, Status> {
        let r = req.into_inner();
        let spec = sandbox_spec(r.config, r.runtime_handler)?;
        // Network set-up (namespaces, CNI plugins, host ports) blocks: off the executor.
        let id = self.blocking(move |rt| rt.run_sandbox(spec)).await.map_err(status)?;
        Ok(Response::new(cri::RunPodSandboxResponse { pod_sandbox_id: id }))
    }

    #[tracing::instrument(skip_all, fields(sandbox = %req.get_ref().pod_sandbox_id))]
    async fn stop_pod_sandbox(
        &self,
        req: Request<cri::StopPodSandboxRequest>,
    ) -> std::result::Result<Response<cri::StopPodSandboxResponse>, Status> {
        self.runtime.stop_sandbox(&req.into_inner().pod_sandbox_id).await.map_err(status)?;
        Ok(Response::new(cri::StopPodSandboxResponse {}))
    }

    #[tracing::instrument(skip_all, fields(sandbox = %req.get_ref().pod_sandbox_id))]
    async fn remove_pod_sandbox(
        &self,
        req: Request<cri::RemovePodSandboxRequest>,
    ) -> std::result::Result<Response<cri::RemovePodSandboxResponse>, Status> {
        self.runtime.remove_sandbox(&req.into_inner().pod_sandbox_id).await.map_err(status)?;
        Ok(Response::new(cri::RemovePodSandboxResponse {}))
    }

    async fn pod_sandbox_status(
        &self,
        req: Request<cri::PodSandboxStatusRequest>,
    ) -> std::result::Result<Response<cri::PodSandboxStatusResponse>, Status> {
        let r = req.into_inner();
        let s = self.runtime.sandbox(&r.pod_sandbox_id).map_err(status)?;
        let mut info = HashMap::new();
        if r.verbose {
            let spec = serde_json::to_string(&s.spec).unwrap_or_default();
            info.insert("info".to_string(), spec);
            // Where the pod's network lives, as containerd reports its netns path.
            if let Some(path) = self.runtime.netns_path(&s.id) {
                info.insert("network_namespace".to_string(), path);
            }
            // The pod's address inside its namespace, for a client that dials from there.
            if !s.ip.is_empty() {
                info.insert(POD_ADDRESS_INFO.to_string(), s.ip.clone());
            }
        }
        Ok(Response::new(cri::PodSandboxStatusResponse {
            status: Some(to_sandbox_status(&s, self.runtime.pod_ips_reachable())),
            info,
            containers_statuses: Vec::new(),
            timestamp: now_nanos(),
        }))
    }

    async fn list_pod_sandbox(
        &self,
        req: Request<cri::ListPodSandboxRequest>,
    ) -> std::result::Result<Response<cri::ListPodSandboxResponse>, Status> {
        let items = filter_sandboxes(&self.runtime, req.into_inner().filter);
        Ok(Response::new(cri::ListPodSandboxResponse { items }))
    }

    async fn stream_pod_sandboxes(
        &self,
        req: Request<cri::StreamPodSandboxesRequest>,
    ) -> std::result::Result<Response<Self::StreamPodSandboxesStream>, Status> {
        let items = filter_sandboxes(&self.runtime, req.into_inner().filter);
        Ok(Response::new(chunked(items, |pod_sandboxes| cri::StreamPodSandboxesResponse { pod_sandboxes })))
    }

    #[tracing::instrument(skip_all, fields(sandbox = %req.get_ref().pod_sandbox_id))]
    async fn create_container(
        &self,
        req: Request<cri::CreateContainerRequest>,
    ) -> std::result::Result<Response<cri::CreateContainerResponse>, Status> {
        let r = req.into_inner();
        let spec = container_spec(r.config)?;
        let id = self.runtime.create_container(&r.pod_sandbox_id, spec).await.map_err(status)?;
        Ok(Response::new(cri::CreateContainerResponse { container_id: id }))
    }

    #[tracing::instrument(skip_all, fields(container = %req.get_ref().container_id))]
    async fn start_container(
        &self,
        req: Request<cri::StartContainerRequest>,
    ) -> std::result::Result<Response<cri::StartContainerResponse>, Status> {
        // A start may load compiled code from disk and bind inside the pod's namespace.
        let id = req.into_inner().container_id;
        self.blocking(move |rt| rt.start_container(&id)).await.map_err(status)?;
        Ok(Response::new(cri::StartContainerResponse {}))
    }

    #[tracing::instrument(skip_all, fields(container = %req.get_ref().container_id))]
    async fn stop_container(
        &self,
        req: Request<cri::StopContainerRequest>,
    ) -> std::result::Result<Response<cri::StopContainerResponse>, Status> {
        let r = req.into_inner();
        match self.runtime.stop_container(&r.container_id, r.timeout).await {
            // Stopping what is gone is not an error (the CRI asks for idempotence).
            Ok(()) | Err(Error::NotFound { .. }) => Ok(Response::new(cri::StopContainerResponse {})),
            Err(e) => Err(status(e)),
        }
    }

    #[tracing::instrument(skip_all, fields(container = %req.get_ref().container_id))]
    async fn remove_container(
        &self,
        req: Request<cri::RemoveContainerRequest>,
    ) -> std::result::Result<Response<cri::RemoveContainerResponse>, Status> {
        self.runtime.remove_container(&req.into_inner().container_id).await.map_err(status)?;
        Ok(Response::new(cri::RemoveContainerResponse {}))
    }

    async fn list_containers(
        &self,
        req: Request<cri::ListContainersRequest>,
    ) -> std::result::Result<Response<cri::ListContainersResponse>, Status> {
        let containers = filter_containers(&self.runtime, req.into_inner().filter);
        Ok(Response::new(cri::ListContainersResponse { containers }))
    }

    async fn stream_containers(
        &self,
        req: Request<cri::StreamContainersRequest>,
    ) -> std::result::Result<Response<Self::StreamContainersStream>, Status> {
        let items = filter_containers(&self.runtime, req.into_inner().filter);
        Ok(Response::new(chunked(items, |containers| cri::StreamContainersResponse { containers })))
    }

    async fn container_status(
        &self,
        req: Request<cri::ContainerStatusRequest>,
    ) -> std::result::Result<Response<cri::ContainerStatusResponse>, Status> {
        let r = req.into_inner();
        let c = self.runtime.container(&r.container_id).map_err(status)?;
        let mut info = HashMap::new();
        if r.verbose {
            info.insert("info".to_string(), serde_json::to_string(&c).unwrap_or_default());
        }
        Ok(Response::new(cri::ContainerStatusResponse { status: Some(to_container_status(&c)), info }))
    }

    async fn update_container_resources(
        &self,
        req: Request<cri::UpdateContainerResourcesRequest>,
    ) -> std::result::Result<Response<cri::UpdateContainerResourcesResponse>, Status> {
        let r = req.into_inner();
        let res = r.linux.map(resources).unwrap_or_default();
        self.runtime.update_resources(&r.container_id, res).map_err(status)?;
        Ok(Response::new(cri::UpdateContainerResourcesResponse {}))
    }

    async fn reopen_container_log(
        &self,
        req: Request<cri::ReopenContainerLogRequest>,
    ) -> std::result::Result<Response<cri::ReopenContainerLogResponse>, Status> {
        self.runtime.reopen_log(&req.into_inner().container_id).map_err(status)?;
        Ok(Response::new(cri::ReopenContainerLogResponse {}))
    }

    #[tracing::instrument(skip_all, fields(container = %req.get_ref().container_id))]
    async fn exec_sync(
        &self,
        req: Request<cri::ExecSyncRequest>,
    ) -> std::result::Result<Response<cri::ExecSyncResponse>, Status> {
        let r = req.into_inner();
        let out = self.runtime.exec_sync(&r.container_id, r.cmd, r.timeout).await.map_err(status)?;
        Ok(Response::new(cri::ExecSyncResponse { stdout: out.stdout, stderr: out.stderr, exit_code: out.exit_code }))
    }

    #[tracing::instrument(skip_all, fields(container = %req.get_ref().container_id))]
    async fn exec(&self, req: Request<cri::ExecRequest>) -> std::result::Result<Response<cri::ExecResponse>, Status> {
        let r = req.into_inner();
        self.running(&r.container_id)?;
        let url = self
            .streaming
            .exec_url(wasmlet_streaming::ExecRequest {
                container_id: r.container_id,
                cmd: r.cmd,
                tty: r.tty,
                stdin: r.stdin,
                stdout: r.stdout,
                stderr: r.stderr,
            })
            .map_err(stream_status)?;
        Ok(Response::new(cri::ExecResponse { url }))
    }

    #[tracing::instrument(skip_all, fields(container = %req.get_ref().container_id))]
    async fn attach(
        &self,
        req: Request<cri::AttachRequest>,
    ) -> std::result::Result<Response<cri::AttachResponse>, Status> {
        let r = req.into_inner();
        self.running(&r.container_id)?;
        let url = self
            .streaming
            .attach_url(wasmlet_streaming::AttachRequest {
                container_id: r.container_id,
                tty: r.tty,
                stdin: r.stdin,
                stdout: r.stdout,
                stderr: r.stderr,
            })
            .map_err(stream_status)?;
        Ok(Response::new(cri::AttachResponse { url }))
    }

    #[tracing::instrument(skip_all, fields(sandbox = %req.get_ref().pod_sandbox_id))]
    async fn port_forward(
        &self,
        req: Request<cri::PortForwardRequest>,
    ) -> std::result::Result<Response<cri::PortForwardResponse>, Status> {
        let r = req.into_inner();
        if r.pod_sandbox_id.is_empty() {
            return Err(invalid("missing required pod_sandbox_id"));
        }
        let sandbox = self.runtime.sandbox(&r.pod_sandbox_id).map_err(status)?;
        if sandbox.state != SandboxState::Ready {
            return Err(Status::failed_precondition(format!("pod sandbox {} is not ready", r.pod_sandbox_id)));
        }
        let mut ports = Vec::with_capacity(r.port.len());
        for p in r.port {
            ports.push(
                u16::try_from(p)
                    .ok()
                    .filter(|p| *p > 0)
                    .ok_or_else(|| invalid(format!("port {p} is not a TCP port")))?,
            );
        }
        let url = self
            .streaming
            .port_forward_url(wasmlet_streaming::PortForwardRequest { sandbox_id: r.pod_sandbox_id, ports })
            .map_err(stream_status)?;
        Ok(Response::new(cri::PortForwardResponse { url }))
    }

    async fn container_stats(
        &self,
        req: Request<cri::ContainerStatsRequest>,
    ) -> std::result::Result<Response<cri::ContainerStatsResponse>, Status> {
        let c = self.runtime.container(&req.into_inner().container_id).map_err(status)?;
        self.runtime.sample_socket_queues().await;
        let stats = container_stats(&self.runtime, &c).map_err(status)?;
        Ok(Response::new(cri::ContainerStatsResponse { stats: Some(stats) }))
    }

    async fn list_container_stats(
        &self,
        req: Request<cri::ListContainerStatsRequest>,
    ) -> std::result::Result<Response<cri::ListContainerStatsResponse>, Status> {
        self.runtime.sample_socket_queues().await;
        let stats = self.list_container_stats_inner(req.into_inner().filter)?;
        Ok(Response::new(cri::ListContainerStatsResponse { stats }))
    }

    async fn stream_container_stats(
        &self,
        req: Request<cri::StreamContainerStatsRequest>,
    ) -> std::result::Result<Response<Self::StreamContainerStatsStream>, Status> {
        self.runtime.sample_socket_queues().await;
        let stats = self.list_container_stats_inner(req.into_inner().filter)?;
        Ok(Response::new(chunked(stats, |container_stats| cri::StreamContainerStatsResponse { container_stats })))
    }

    async fn pod_sandbox_stats(
        &self,
        req: Request<cri::PodSandboxStatsRequest>,
    ) -> std::result::Result<Response<cri::PodSandboxStatsResponse>, Status> {
        let s = self.runtime.sandbox(&req.into_inner().pod_sandbox_id).map_err(status)?;
        let records = self.runtime.containers_where(|c| c.sandbox_id == s.id);
        let net = self.runtime.network_usage(&[s.id.as_str()]).await;
        self.runtime.sample_socket_queues().await;
        let stats = sandbox_stats(&self.runtime, &s, &records, net.get(&s.id)).map_err(status)?;
        Ok(Response::new(cri::PodSandboxStatsResponse { stats: Some(stats) }))
    }

    async fn list_pod_sandbox_stats(
        &self,
        req: Request<cri::ListPodSandboxStatsRequest>,
    ) -> std::result::Result<Response<cri::ListPodSandboxStatsResponse>, Status> {
        self.runtime.sample_socket_queues().await;
        let stats = self.list_sandbox_stats_inner(req.into_inner().filter).await?;
        Ok(Response::new(cri::ListPodSandboxStatsResponse { stats }))
    }

    async fn stream_pod_sandbox_stats(
        &self,
        req: Request<cri::StreamPodSandboxStatsRequest>,
    ) -> std::result::Result<Response<Self::StreamPodSandboxStatsStream>, Status> {
        self.runtime.sample_socket_queues().await;
        let stats = self.list_sandbox_stats_inner(req.into_inner().filter).await?;
        Ok(Response::new(chunked(stats, |pod_sandbox_stats| cri::StreamPodSandboxStatsResponse { pod_sandbox_stats })))
    }

    async fn update_runtime_config(
        &self,
        req: Request<cri::UpdateRuntimeConfigRequest>,
    ) -> std::result::Result<Response<cri::UpdateRuntimeConfigResponse>, Status> {
        let cidr = req.into_inner().runtime_config.and_then(|c| c.network_config).map(|n| n.pod_cidr);
        if let Some(cidr) = cidr {
            self.runtime.set_pod_cidr(cidr);
        }
        Ok(Response::new(cri::UpdateRuntimeConfigResponse {}))
    }

    async fn status(
        &self,
        req: Request<cri::StatusRequest>,
    ) -> std::result::Result<Response<cri::StatusResponse>, Status> {
        let condition = |t: &str, ready: std::result::Result<String, (&str, String)>| {
            let (status, reason, message) = match ready {
                Ok(message) => (true, String::new(), message),
                Err((reason, message)) => (false, reason.to_string(), message),
            };
            cri::RuntimeCondition { r#type: t.to_string(), status, reason, message }
        };
        let mut info = HashMap::new();
        if req.into_inner().verbose {
            info.insert("root".to_string(), serde_json::json!(self.runtime.root()).to_string());
        }
        Ok(Response::new(cri::StatusResponse {
            status: Some(cri::RuntimeStatus {
                conditions: vec![
                    condition("RuntimeReady", Ok(String::new())),
                    condition("NetworkReady", self.runtime.network_status()),
                ],
            }),
            info,
            runtime_handlers: RUNTIME_HANDLERS
                .iter()
                .map(|name| cri::RuntimeHandler {
                    name: name.to_string(),
                    // Read-only preopens are read-only all the way down; there are no user
                    // namespaces: guests have no uids at all.
                    features: Some(cri::RuntimeHandlerFeatures {
                        recursive_read_only_mounts: true,
                        user_namespaces: false,
                    }),
                })
                .collect(),
            features: Some(cri::RuntimeFeatures {
                supplemental_groups_policy: false,
                user_namespaces_host_network: false,
            }),
        }))
    }

    async fn checkpoint_container(
        &self,
        _: Request<cri::CheckpointContainerRequest>,
    ) -> std::result::Result<Response<cri::CheckpointContainerResponse>, Status> {
        unimplemented("checkpointing a running wasm instance is not supported")
    }

    async fn get_container_events(
        &self,
        _: Request<cri::GetEventsRequest>,
    ) -> std::result::Result<Response<Self::GetContainerEventsStream>, Status> {
        let rt = self.runtime.clone();
        let mut rx = rt.subscribe();
        let stream = async_stream(move |tx| async move {
            loop {
                let ev = match rx.recv().await {
                    Ok(ev) => ev,
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                        tracing::warn!(missed = n, "container event subscriber lagged");
                        continue;
                    }
                    Err(_) => return,
                };
                let kind = match ev.kind {
                    EventKind::Created => cri::ContainerEventType::ContainerCreatedEvent,
                    EventKind::Started => cri::ContainerEventType::ContainerStartedEvent,
                    EventKind::Stopped => cri::ContainerEventType::ContainerStoppedEvent,
                    EventKind::Deleted => cri::ContainerEventType::ContainerDeletedEvent,
                };
                let statuses =
                    rt.containers_where(|c| c.sandbox_id == ev.sandbox_id).iter().map(to_container_status).collect();
                let msg = cri::ContainerEventResponse {
                    container_id: ev.container_id,
                    container_event_type: kind as i32,
                    created_at: ev.at,
                    pod_sandbox_status: rt
                        .sandbox(&ev.sandbox_id)
                        .ok()
                        .map(|s| to_sandbox_status(&s, rt.pod_ips_reachable())),
                    containers_statuses: statuses,
                };
                if tx.send(Ok(msg)).await.is_err() {
                    return;
                }
            }
        });
        Ok(Response::new(stream))
    }

    async fn list_metric_descriptors(
        &self,
        _: Request<cri::ListMetricDescriptorsRequest>,
    ) -> std::result::Result<Response<cri::ListMetricDescriptorsResponse>, Status> {
        Ok(Response::new(cri::ListMetricDescriptorsResponse { descriptors: metric_descriptors() }))
    }

    async fn list_pod_sandbox_metrics(
        &self,
        _: Request<cri::ListPodSandboxMetricsRequest>,
    ) -> std::result::Result<Response<cri::ListPodSandboxMetricsResponse>, Status> {
        Ok(Response::new(cri::ListPodSandboxMetricsResponse { pod_metrics: self.sandbox_metrics().await? }))
    }

    async fn stream_pod_sandbox_metrics(
        &self,
        _: Request<cri::StreamPodSandboxMetricsRequest>,
    ) -> std::result::Result<Response<Self::StreamPodSandboxMetricsStream>, Status> {
        let metrics = self.sandbox_metrics().await?;
        Ok(Response::new(chunked(metrics, |pod_sandbox_metrics| cri::StreamPodSandboxMetricsResponse {
            pod_sandbox_metrics,
        })))
    }

    async fn runtime_config(
        &self,
        _: Request<cri::RuntimeConfigRequest>,
    ) -> std::result::Result<Response<cri::RuntimeConfigResponse>, Status> {
        // wasmlet makes no cgroups; cgroupfs is the kubelet's own default, so say it explicitly
        // rather than leave the zero value (systemd).
        Ok(Response::new(cri::RuntimeConfigResponse {
            linux: Some(cri::LinuxRuntimeConfiguration { cgroup_driver: cri::CgroupDriver::Cgroupfs as i32 }),
        }))
    }

    async fn update_pod_sandbox_resources(
        &self,
        req: Request<cri::UpdatePodSandboxResourcesRequest>,
    ) -> std::result::Result<Response<cri::UpdatePodSandboxResourcesResponse>, Status> {
        // Best effort by definition: limits are per container inside wasm, nothing pod-level.
        self.runtime.sandbox(&req.into_inner().pod_sandbox_id).map_err(status)?;
        Ok(Response::new(cri::UpdatePodSandboxResourcesResponse {}))
    }
}

impl CriServer {
    fn list_container_stats_inner(
        &self,
        f: Option<cri::ContainerStatsFilter>,
    ) -> std::result::Result<Vec<cri::ContainerStats>, Status> {
        let f = f.unwrap_or_default();
        let mut out = Vec::new();
        for c in self.runtime.containers() {
            let wanted = (f.id.is_empty() || c.id.starts_with(&f.id))
                && (f.pod_sandbox_id.is_empty() || c.sandbox_id.starts_with(&f.pod_sandbox_id))
                && matches_labels(&f.label_selector, &c.spec.labels)
                && c.state == ContainerState::Running;
            if wanted {
                match container_stats(&self.runtime, &c) {
                    Ok(s) => out.push(s),
                    Err(Error::NotFound { .. }) => {} // removed meanwhile
                    Err(e) => return Err(status(e)),
                }
            }
        }
        Ok(out)
    }

    async fn list_sandbox_stats_inner(
        &self,
        f: Option<cri::PodSandboxStatsFilter>,
    ) -> std::result::Result<Vec<cri::PodSandboxStats>, Status> {
        let f = f.unwrap_or_default();
        // The containers grouped by sandbox once: not a scan of them all for each sandbox.
        let mut by_sandbox: HashMap<String, Vec<ContainerRecord>> = HashMap::new();
        for c in self.runtime.containers() {
            by_sandbox.entry(c.sandbox_id.clone()).or_default().push(c);
        }
        let sandboxes: Vec<SandboxRecord> = self.runtime.sandboxes_where(|s| {
            (f.id.is_empty() || s.id.starts_with(&f.id)) && matches_labels(&f.label_selector, &s.spec.labels)
        });
        let ids: Vec<&str> = sandboxes.iter().map(|s| s.id.as_str()).collect();
        let nets = self.runtime.network_usage(&ids).await;
        let mut out = Vec::new();
        for s in &sandboxes {
            let records = by_sandbox.get(&s.id).map_or(&[][..], Vec::as_slice);
            out.push(sandbox_stats(&self.runtime, s, records, nets.get(&s.id)).map_err(status)?);
        }
        Ok(out)
    }

    async fn sandbox_metrics(&self) -> std::result::Result<Vec<cri::PodSandboxMetrics>, Status> {
        let stats = self.list_sandbox_stats_inner(None).await?;
        let records = self.runtime.containers();
        let by_id: HashMap<&str, &ContainerRecord> = records.iter().map(|r| (r.id.as_str(), r)).collect();
        Ok(stats.iter().map(|s| sandbox_metrics(s, &by_id)).collect())
    }

    fn find_image(
        &self,
        spec: Option<cri::ImageSpec>,
    ) -> std::result::Result<Option<wasmlet_images::ImageRecord>, Status> {
        let image = spec.map(|s| s.image).unwrap_or_default();
        if image.is_empty() {
            return Err(invalid("image spec names no image"));
        }
        self.runtime.images().resolve(&image).map_err(|e| status(e.into()))
    }
}

/// Registry credentials from a CRI AuthConfig.
fn auth(a: Option<cri::AuthConfig>) -> Result<wasmlet_images::Auth> {
    use base64::Engine;
    use wasmlet_images::Auth;
    let Some(a) = a else { return Ok(Auth::Anonymous) };
    if !a.registry_token.is_empty() {
        return Ok(Auth::Bearer(a.registry_token));
    }
    if !a.username.is_empty() {
        return Ok(Auth::Basic { username: a.username, password: a.password });
    }
    if !a.auth.is_empty() {
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(a.auth.trim())
            .ok()
            .and_then(|b| String::from_utf8(b).ok())
            .and_then(|s| s.split_once(':').map(|(u, p)| (u.to_string(), p.to_string())));
        let Some((username, password)) = decoded else {
            return Err(Error::InvalidArgument("auth config: `auth` is not base64 of user:password".to_string()));
        };
        return Ok(Auth::Basic { username, password });
    }
    if !a.identity_token.is_empty() {
        return Err(Error::Unimplemented(
            "auth config: identity tokens are not supported; give a registry token".into(),
        ));
    }
    Ok(Auth::Anonymous)
}

/// The client's deadline from the `grpc-timeout` header (`<digits><H|M|S|m|u|n>`).
fn grpc_timeout(meta: &tonic::metadata::MetadataMap) -> Option<std::time::Duration> {
    crate::server::grpc_timeout(meta.get("grpc-timeout")?.to_str().ok()?)
}

/// A response stream fed by a task through a channel.
fn async_stream<T, F, Fut>(f: F) -> ResponseStream<T>
where
    T: Send + 'static,
    F: FnOnce(tokio::sync::mpsc::Sender<std::result::Result<T, Status>>) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    tokio::spawn(f(tx));
    Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))
}

#[tonic::async_trait]
impl ImageService for CriServer {
    type StreamImagesStream = ResponseStream<cri::StreamImagesResponse>;

    async fn list_images(
        &self,
        req: Request<cri::ListImagesRequest>,
    ) -> std::result::Result<Response<cri::ListImagesResponse>, Status> {
        let images = self.list_images_inner(req.into_inner().filter).await?;
        Ok(Response::new(cri::ListImagesResponse { images }))
    }

    async fn stream_images(
        &self,
        req: Request<cri::StreamImagesRequest>,
    ) -> std::result::Result<Response<Self::StreamImagesStream>, Status> {
        let images = self.list_images_inner(req.into_inner().filter).await?;
        Ok(Response::new(chunked(images, |images| cri::StreamImagesResponse { images })))
    }

    async fn image_status(
        &self,
        req: Request<cri::ImageStatusRequest>,
    ) -> std::result::Result<Response<cri::ImageStatusResponse>, Status> {
        let r = req.into_inner();
        let found = self.find_image(r.image)?;
        let mut info = HashMap::new();
        if r.verbose
            && let Some(i) = &found
        {
            info.insert("info".to_string(), serde_json::to_string(i).unwrap_or_default());
        }
        Ok(Response::new(cri::ImageStatusResponse { image: found.as_ref().map(to_image), info }))
    }

    #[tracing::instrument(skip_all)]
    async fn pull_image(
        &self,
        req: Request<cri::PullImageRequest>,
    ) -> std::result::Result<Response<cri::PullImageResponse>, Status> {
        // Stop a little before the client's deadline, so that the answer is ours
        // (DeadlineExceeded, naming the image) rather than the transport's.
        let deadline = grpc_timeout(req.metadata()).map(|d| d.mul_f64(0.9));
        let r = req.into_inner();
        let name = r.image.map(|s| s.image).unwrap_or_default();
        if name.is_empty() {
            return Err(invalid("PullImage: image spec names no image"));
        }
        let auth = auth(r.auth).map_err(status)?;
        let record = self.runtime.pull_image(&name, auth, deadline).await.map_err(status)?;
        Ok(Response::new(cri::PullImageResponse { image_ref: record.id }))
    }

    #[tracing::instrument(skip_all)]
    async fn remove_image(
        &self,
        req: Request<cri::RemoveImageRequest>,
    ) -> std::result::Result<Response<cri::RemoveImageResponse>, Status> {
        let image = req.into_inner().image.map(|s| s.image).unwrap_or_default();
        if image.is_empty() {
            return Err(invalid("RemoveImage: image spec names no image"));
        }
        let removed = self.blocking(move |rt| Ok(rt.images().remove(&image)?)).await.map_err(status)?;
        if let Some(r) = removed {
            self.runtime.forget_wasm(&r.wasm_digest);
        }
        Ok(Response::new(cri::RemoveImageResponse {}))
    }

    async fn image_fs_info(
        &self,
        _: Request<cri::ImageFsInfoRequest>,
    ) -> std::result::Result<Response<cri::ImageFsInfoResponse>, Status> {
        let u = self.blocking(|rt| Ok(rt.images().fs_usage())).await.map_err(status)?;
        Ok(Response::new(cri::ImageFsInfoResponse {
            image_filesystems: vec![cri::FilesystemUsage {
                timestamp: now_nanos(),
                fs_id: Some(cri::FilesystemIdentifier { mountpoint: u.mountpoint.display().to_string() }),
                used_bytes: uint(u.used_bytes),
                inodes_used: uint(u.inodes_used),
            }],
            container_filesystems: Vec::new(),
        }))
    }
}

impl CriServer {
    async fn list_images_inner(&self, f: Option<cri::ImageFilter>) -> std::result::Result<Vec<cri::Image>, Status> {
        let wanted = f.and_then(|f| f.image).map(|s| s.image).filter(|s| !s.is_empty());
        let images = match wanted {
            Some(name) => self.blocking(move |rt| Ok(rt.images().resolve(&name)?.into_iter().collect())).await,
            None => self.blocking(|rt| Ok(rt.images().list()?)).await,
        }
        .map_err(status)?;
        Ok(images.iter().map(to_image).collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;
    use tonic::Code;

    #[test]
    fn every_error_has_its_code() {
        use wasmlet_images::Error as I;
        let io = || std::io::Error::other("x");
        let cases: Vec<(Error, Code)> = vec![
            (Error::NotFound { kind: "container", id: "x".into() }, Code::NotFound),
            (Error::Image(I::NotFound("x".into())), Code::NotFound),
            (Error::InvalidArgument("x".into()), Code::InvalidArgument),
            (Error::Image(I::InvalidReference { reference: "X".into(), reason: "r".into() }), Code::InvalidArgument),
            (Error::Image(I::NotWasm { what: "x".into(), reason: "r".into() }), Code::InvalidArgument),
            (Error::Image(I::InvalidWasm { what: "x".into(), reason: "r".into() }), Code::InvalidArgument),
            (Error::Image(I::BadImage { image: "x".into(), reason: "r".into() }), Code::InvalidArgument),
            (Error::Image(I::TooLarge { what: "x".into(), limit: 1 }), Code::InvalidArgument),
            (Error::Image(I::Registry { context: "x".into(), reason: "r".into() }), Code::Unknown),
            (Error::AlreadyExists("x".into()), Code::AlreadyExists),
            (Error::FailedPrecondition("x".into()), Code::FailedPrecondition),
            (Error::Unimplemented("x".into()), Code::Unimplemented),
            (Error::DeadlineExceeded("x".into()), Code::DeadlineExceeded),
            (Error::Image(I::DigestMismatch { digest: "a".into(), actual: "b".into() }), Code::DataLoss),
            (Error::Image(I::CorruptIndex { path: "p".into(), reason: "r".into() }), Code::Internal),
            (Error::Image(I::Io { context: "c".into(), source: io() }), Code::Internal),
            (Error::Internal("x".into()), Code::Internal),
            (Error::Shared(std::sync::Arc::new(Error::DeadlineExceeded("x".into()))), Code::DeadlineExceeded),
        ];
        for (e, code) in cases {
            let msg = e.to_string();
            let s = status(e);
            assert_eq!(s.code(), code, "{msg}");
            assert_eq!(s.message(), msg);
        }
    }

    #[test]
    fn auth_configs() {
        use wasmlet_images::Auth;
        let basic = Auth::Basic { username: "u".into(), password: "p:w".into() };
        let cfg = |f: fn(&mut cri::AuthConfig)| {
            let mut a = cri::AuthConfig::default();
            f(&mut a);
            auth(Some(a))
        };
        assert_eq!(auth(None).unwrap(), Auth::Anonymous);
        assert_eq!(cfg(|a| a.registry_token = "t".into()).unwrap(), Auth::Bearer("t".into()));
        assert_eq!(cfg(|a| (a.username, a.password) = ("u".into(), "p:w".into())).unwrap(), basic);
        assert_eq!(cfg(|a| a.auth = "dTpwOnc=".into()).unwrap(), basic);
        assert!(cfg(|a| a.auth = "!!".into()).is_err());
        assert!(matches!(cfg(|a| a.identity_token = "i".into()), Err(Error::Unimplemented(_))));
    }

    #[test]
    fn grpc_timeouts() {
        let mut m = tonic::metadata::MetadataMap::new();
        assert_eq!(grpc_timeout(&m), None);
        for (v, d) in [("2S", 2000), ("1500m", 1500), ("1M", 60_000), ("3000000u", 3000)] {
            m.insert("grpc-timeout", v.parse().unwrap());
            assert_eq!(grpc_timeout(&m), Some(std::time::Duration::from_millis(d)), "{v}");
        }
        m.insert("grpc-timeout", "5x".parse().unwrap());
        assert_eq!(grpc_timeout(&m), None);
    }

    #[test]
    fn label_selectors_are_anded_equality() {
        let labels: Labels = BTreeMap::from([("a".into(), "1".into()), ("b".into(), "2".into())]);
        let sel = |pairs: &[(&str, &str)]| pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        assert!(matches_labels(&sel(&[]), &labels));
        assert!(matches_labels(&sel(&[("a", "1")]), &labels));
        assert!(matches_labels(&sel(&[("a", "1"), ("b", "2")]), &labels));
        assert!(!matches_labels(&sel(&[("a", "1"), ("b", "3")]), &labels));
        assert!(!matches_labels(&sel(&[("c", "1")]), &labels));
    }
}
