//! `wasmlet`: the node agent binary.

mod client;
mod local_node;
mod node_cmd;
mod progress;
mod stream_cmd;

use std::path::PathBuf;

use local_node::{Identity, LocalNode};
use wasmlet_kubelet::run;

use anyhow::{Context, Result, anyhow, bail};
use clap::{Parser, Subcommand, ValueEnum};
use wasmlet_images::ImageStore;

#[derive(Parser)]
#[command(name = "wasmlet", version, about = "A Kubernetes node agent whose containers are WebAssembly")]
struct Cli {
    /// Format of wasmlet's own log lines (on stderr).
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the CRI v1 API (RuntimeService and ImageService) on a unix socket.
    Cri {
        /// Configuration file (TOML; `wasmlet config default` prints one). Flags win over it.
        #[arg(long, env = "WASMLET_CONFIG")]
        config: Option<PathBuf>,
        /// State directory: images, compiled code, sandboxes, containers.
        #[arg(long, env = "WASMLET_ROOT")]
        root: Option<PathBuf>,
        /// Socket path [default: ROOT/cri.sock].
        #[arg(long)]
        socket: Option<PathBuf>,
        /// A registry (`host` or `host:port`) to reach over plain HTTP; repeatable. Loopback
        /// registries always are.
        #[arg(long = "insecure-registry")]
        insecure_registries: Vec<String>,
    },
    /// Run the pods of Kubernetes manifests (Pods, ConfigMaps, Secrets) with no cluster: probes,
    /// hooks, restarts and status as the kubelet does them. Ctrl-C deletes them gracefully.
    Run {
        /// Manifest files (YAML, several documents each).
        #[arg(required = true)]
        files: Vec<PathBuf>,
        /// Also print what the containers log, each line after "[POD/CONTAINER]".
        #[arg(long)]
        logs: bool,
        /// Delete the pods gracefully after this long, as Ctrl-C does (e.g. 45s, 2m).
        #[arg(long, value_parser = wasmlet_kubelet::run::parse_duration)]
        stop_after: Option<std::time::Duration>,
        #[arg(long, env = "WASMLET_CONFIG")]
        config: Option<PathBuf>,
        #[arg(long, env = "WASMLET_ROOT")]
        root: Option<PathBuf>,
    },
    /// Run as a node: join a cluster (--kubeconfig) and run the pods its scheduler binds here,
    /// and/or the static pods of a manifest directory, followed as it changes.
    Node {
        /// Kubeconfig of the node's credentials for the API server (user system:node:NAME).
        #[arg(long)]
        kubeconfig: Option<PathBuf>,
        /// Kubeconfig with a bootstrap token: when --kubeconfig does not exist yet, a client
        /// certificate is requested with it (TLS bootstrapping) and --kubeconfig written.
        #[arg(long)]
        bootstrap_kubeconfig: Option<PathBuf>,
        /// Directory of static pod manifests.
        #[arg(long)]
        pod_manifest_path: Option<PathBuf>,
        /// The node's name [default: the host name].
        #[arg(long)]
        hostname_override: Option<String>,
        /// The node's InternalIP [default: the host name's first non-loopback IPv4 address].
        #[arg(long)]
        node_ip: Option<String>,
        /// The node API's port (the config's `port`, 10250 by default).
        #[arg(long)]
        port: Option<u16>,
        /// The node API's serving certificate (PEM; the config's `tlsCertFile`).
        #[arg(long, requires = "tls_private_key_file")]
        tls_cert_file: Option<PathBuf>,
        /// Its key (PEM; the config's `tlsPrivateKeyFile`).
        #[arg(long, requires = "tls_cert_file")]
        tls_private_key_file: Option<PathBuf>,
        #[arg(long, env = "WASMLET_CONFIG")]
        config: Option<PathBuf>,
        #[arg(long, env = "WASMLET_ROOT")]
        root: Option<PathBuf>,
    },
    /// Run a command in a container of a pod that `wasmlet run` runs (as `kubectl exec`).
    Exec {
        #[command(flatten)]
        session: Session,
        /// The command and its arguments (after --).
        #[arg(last = true, required = true)]
        command: Vec<String>,
    },
    /// Join the own streams of a container of a pod that `wasmlet run` runs (as `kubectl
    /// attach`): its output, and with -i its stdin (the container needs `stdin: true`), until
    /// it ends.
    Attach {
        #[command(flatten)]
        session: Session,
    },
    /// Forward local ports to a pod that `wasmlet run` runs (as `kubectl port-forward`):
    /// `[LOCAL:]REMOTE`, LOCAL on 127.0.0.1 (`:REMOTE`: any free port).
    PortForward {
        pod: String,
        #[arg(required = true)]
        ports: Vec<String>,
        #[arg(long, env = "WASMLET_CONFIG")]
        config: Option<PathBuf>,
        #[arg(long, env = "WASMLET_ROOT")]
        root: Option<PathBuf>,
    },
    /// Print the logs of a pod's container run by `wasmlet run`.
    Logs {
        pod: String,
        /// Container name (needed when the pod has several).
        #[arg(short = 'c', long)]
        container: Option<String>,
        /// Keep printing as the log grows (and across restarts).
        #[arg(short = 'f', long)]
        follow: bool,
        /// The previous instance's log.
        #[arg(short = 'p', long)]
        previous: bool,
        /// Lines of the log to show, from its end (-1: all).
        #[arg(long, default_value_t = -1, allow_negative_numbers = true)]
        tail: i64,
        /// Only what was logged in this past duration (5s, 2m, 1h30m).
        #[arg(long)]
        since: Option<String>,
        /// Only what was logged at or after this RFC 3339 time.
        #[arg(long)]
        since_time: Option<String>,
        /// Each line with the time it was logged.
        #[arg(long)]
        timestamps: bool,
        /// At most this many bytes.
        #[arg(long)]
        limit_bytes: Option<i64>,
        #[arg(long, env = "WASMLET_ROOT")]
        root: Option<PathBuf>,
    },
    /// Print the default configuration file.
    Config {
        #[command(subcommand)]
        command: ConfigCommand,
    },
    /// Manage the local image store.
    Image {
        #[command(subcommand)]
        command: ImageCommand,
    },
    /// Run one container in a new pod through a CRI server, print its log and exit with its code.
    Pod {
        #[command(subcommand)]
        command: PodCommand,
    },
}

/// Which container of a `wasmlet run` pod an exec or attach session joins, and how.
#[derive(clap::Args)]
struct Session {
    pod: String,
    /// Container name (needed when the pod has several).
    #[arg(short = 'c', long)]
    container: Option<String>,
    /// Pass stdin.
    #[arg(short = 'i', long)]
    stdin: bool,
    /// A terminal.
    #[arg(short = 't', long)]
    tty: bool,
    #[arg(long, env = "WASMLET_CONFIG")]
    config: Option<PathBuf>,
    #[arg(long, env = "WASMLET_ROOT")]
    root: Option<PathBuf>,
}

#[derive(Subcommand)]
enum ConfigCommand {
    /// The default configuration, every key with its default and what it does.
    Default,
}

/// The configuration file. Every key has a default; command-line flags win over it.
#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Config {
    /// State directory.
    root: Option<PathBuf>,
    /// CRI socket path.
    socket: Option<PathBuf>,
    /// Mirrors and plain-HTTP registries, by registry host.
    #[serde(default)]
    registries: std::collections::BTreeMap<String, wasmlet_images::HostConfig>,
    /// Pod networking.
    #[serde(default)]
    network: wasmlet_runtime::net::NetworkOptions,
    /// Per-pod scratch files.
    run_dir: Option<PathBuf>,
    /// Where the CRI streaming server (exec, attach, port-forward) listens.
    stream_address: Option<std::net::SocketAddr>,
    /// The bytes a container's log may hold before it is rotated (a quantity); past it the
    /// guest's output waits for the rotation. `wasmlet node` and `wasmlet run`: twice
    /// containerLogMaxSize by default; `wasmlet cri`: no bound unless set.
    log_bound: Option<String>,
    /// Instances that can run at once (the pooling allocator's slots). Default: sized by
    /// [node] maxPods for `wasmlet node` and `wasmlet run`, 12,000 for `wasmlet cri`.
    instance_slots: Option<u32>,
    /// The node's settings, named as KubeletConfiguration names them.
    #[serde(default)]
    node: wasmlet_kubelet::node::NodeConfig,
}

const DEFAULT_CONFIG: &str = r#"# wasmlet configuration (TOML). Every key is optional; flags win over the file.

# State directory: images, compiled code, sandboxes and containers.
# Default: $XDG_DATA_HOME/wasmlet or ~/.local/share/wasmlet.
# root = "/var/lib/wasmlet"

# CRI socket. Default: <root>/cri.sock.
# socket = "/run/wasmlet/cri.sock"

# Per-pod scratch files (the pods' /etc files, their pinned network namespaces): best on a
# tmpfs. Default: a directory of its own under /dev/shm, else <root>/run.
# run_dir = "/run/wasmlet/pods"

# Where the CRI streaming server listens: Exec, Attach and PortForward answer single-use URLs
# on it. Default: a free port on 127.0.0.1 (reachable by a kubelet on this machine only).
# stream_address = "127.0.0.1:10010"

# How much a container's log file may hold before it is rotated; past it the container's
# output waits for the rotation, so a guest printing at full speed fills no disk. Default for
# `wasmlet node` and `wasmlet run`: twice [node] containerLogMaxSize; for `wasmlet cri`, none
# (the kubelet's rotation size is not known to it).
# log_bound = "20Mi"

# Instances that can run at once: every running container, exec, probe and wasi:http
# request takes one of the pooling allocator's slots (about 4 GiB of address space each,
# nothing resident until used; 24,000 at most). Default: maxPods plus a fifth and 200, 1,000
# at least, for `wasmlet node` and `wasmlet run`; 12,000 for `wasmlet cri`.
# instance_slots = 12000

# Registries, by host as image references spell it. Mirrors are tried in order before the
# registry itself ("http://" for plain HTTP); images keep their canonical names. Loopback
# registries are always reached over plain HTTP.
# [registries."registry.example"]
# mirrors = ["http://127.0.0.1:5000"]
# mirrors_only = true          # never the registry itself (an air-gapped node)
# [registries."plain.lan:5000"]
# insecure = true

# Pod networking. "auto" (the default): "bridge" as root, "rootless" otherwise. "bridge"
# (root): every pod gets a network namespace of its own with a veth on the bridge named by
# `bridge`, which holds pod_cidr's first address (the pods' gateway); pod IPs come from pod_cidr
# and the host reaches them on the bridge; pods reach each other and the host, and other
# machines too when `masquerade` is true, behind the host's address (nftables NAT; the host's
# IPv4 forwarding is turned on). "rootless": every pod gets a network namespace of
# its own, made by wasmlet without privilege (when not run as root, wasmlet enters a user
# namespace of its own first); the pod's IP (from pod_cidr) exists only inside the pod, and the
# host reaches pods through their host ports; rootless pods go out through `pasta` (Debian's
# passt; one process per pod, about 19 MiB and 11 ms at its start; "" for no way out). "cni"
# (nodes, root): every pod gets a namespace configured by the CNI plugins of the first network
# config in cni_conf_dir (a routable pod IP, routes out). "host": every pod shares the host's
# network.
# [network]
# mode = "auto"
# pod_cidr = "10.88.0.0/16"
# bridge = "wasmlet0"
# masquerade = false
# cni_conf_dir = "/etc/cni/net.d"
# cni_bin_dirs = ["/opt/cni/bin", "/usr/lib/cni"]
# pasta = "pasta"

# The node (`wasmlet node --kubeconfig`), keys as the kubelet's KubeletConfiguration names
# them. The default taint keeps ordinary pods off a wasm node; wasm pods tolerate it through
# the RuntimeClass (examples/runtimeclass.yaml); an empty registerWithTaints list registers none.
# [node]
# nodeLabels = { "topology.kubernetes.io/zone" = "edge-1" }
# registerWithTaints = [{ key = "wasmlet.dev/wasm", value = "true", effect = "NoSchedule" }]
# maxPods = 110
# clusterDNS = ["10.96.0.10"]
# clusterDomain = "cluster.local"
# nodeStatusUpdateFrequency = "10s"
# nodeStatusReportFrequency = "5m0s"
# nodeLeaseDurationSeconds = 40
# kubeAPIQPS = 50.0
# kubeAPIBurst = 100
# port = 10250
# rotateCertificates = true
# The node API (logs, exec, port-forward through the API server): where it listens, its
# serving certificate (default: a self-signed one made at each start), and the CA of the
# client certificates it accepts (default: the cluster's CA, from the kubeconfig). Bearer
# tokens are checked with a TokenReview; every request is authorized with a
# SubjectAccessReview on the Node's subresources; anonymous requests are refused.
# address = "0.0.0.0"
# tlsCertFile = "/var/lib/wasmlet/pki/kubelet.crt"
# tlsPrivateKeyFile = "/var/lib/wasmlet/pki/kubelet.key"
# Or ask the cluster for it (a kubernetes.io/kubelet-serving CSR, to be approved), rotated
# before it expires:
# serverTLSBootstrap = true
# authentication = { x509 = { clientCAFile = "/etc/kubernetes/pki/ca.crt" } }
# Container logs, rotated by size (the live file counted in the files kept):
# containerLogMaxSize = "10Mi"
# containerLogMaxFiles = 5
# containerLogMonitorInterval = "10s"
# Eviction (the kubelet's defaults; evictionHard, when given, replaces them all). What pods
# may use (allocatable) leaves out systemReserved, kubeReserved and the hard memory threshold.
# evictionHard = { "memory.available" = "100Mi", "nodefs.available" = "10%", "nodefs.inodesFree" = "5%", "imagefs.available" = "15%", "imagefs.inodesFree" = "5%" }
# evictionSoft = { "memory.available" = "500Mi" }
# evictionSoftGracePeriod = { "memory.available" = "1m30s" }
# evictionMaxPodGracePeriod = 0
# evictionPressureTransitionPeriod = "5m0s"
# systemReserved = { memory = "1Gi" }
# kubeReserved = { memory = "256Mi" }
"#;

fn load_config(path: Option<&std::path::Path>) -> Result<Config> {
    let Some(path) = path else { return Ok(Config::default()) };
    let text = std::fs::read_to_string(path).with_context(|| format!("read config {}", path.display()))?;
    toml::from_str(&text).with_context(|| format!("config {}", path.display()))
}

#[derive(Subcommand)]
enum ImageCommand {
    /// Put a .wasm (module or component) or .wat file into the store.
    Import {
        /// The file.
        file: PathBuf,
        /// Name to tag it with, e.g. `hello` or `registry.example/app:1.0`.
        #[arg(long)]
        tag: Option<String>,
        /// State directory of the wasmlet that will run it.
        #[arg(long, env = "WASMLET_ROOT")]
        root: Option<PathBuf>,
    },
    /// Pull an image from its registry into the store.
    Pull {
        /// Reference, e.g. `registry.example/app:1.0` or `127.0.0.1:5000/app@sha256:...`.
        image: String,
        #[command(flatten)]
        registry: RegistryArgs,
        #[arg(long, env = "WASMLET_ROOT")]
        root: Option<PathBuf>,
    },
    /// Push a .wasm (module or component) or .wat file as a CNCF wasm artifact.
    Push {
        /// The file.
        file: PathBuf,
        /// Where to push it, e.g. `registry.example/app:1.0`.
        image: String,
        /// Annotations, KEY=VALUE (OCI `org.opencontainers.image.*` keys and others).
        #[arg(long = "annotation")]
        annotations: Vec<String>,
        #[command(flatten)]
        registry: RegistryArgs,
    },
    /// Show everything the store knows of an image (id, tag or digest), as JSON.
    Inspect {
        image: String,
        #[arg(long, env = "WASMLET_ROOT")]
        root: Option<PathBuf>,
    },
    /// List images.
    Ls {
        #[arg(long, env = "WASMLET_ROOT")]
        root: Option<PathBuf>,
    },
    /// Remove an image (by id, tag or digest) with all its tags.
    Rm {
        image: String,
        #[arg(long, env = "WASMLET_ROOT")]
        root: Option<PathBuf>,
    },
}

#[derive(clap::Args)]
struct RegistryArgs {
    /// User name for the registry (with --password).
    #[arg(long)]
    username: Option<String>,
    /// Password for the registry.
    #[arg(long, env = "WASMLET_REGISTRY_PASSWORD")]
    password: Option<String>,
    /// Talk to the registry over plain HTTP (loopback registries always are).
    #[arg(long)]
    insecure: bool,
}

impl RegistryArgs {
    fn registry(&self, host: &str) -> wasmlet_images::OciRegistry {
        let auth = match (&self.username, &self.password) {
            (Some(u), p) => {
                wasmlet_images::Auth::Basic { username: u.clone(), password: p.clone().unwrap_or_default() }
            }
            (None, _) => wasmlet_images::Auth::Anonymous,
        };
        let insecure = self.insecure || wasmlet_images::hosts::is_loopback(host);
        wasmlet_images::OciRegistry::new(host, insecure, auth)
    }
}

#[derive(Subcommand)]
enum PodCommand {
    /// RunPodSandbox, CreateContainer, StartContainer, wait for the exit, print the log, clean up.
    Run(client::PodRun),
}

fn default_root() -> PathBuf {
    if let Some(d) = std::env::var_os("XDG_DATA_HOME") {
        return PathBuf::from(d).join("wasmlet");
    }
    match std::env::var_os("HOME") {
        Some(h) => PathBuf::from(h).join(".local/share/wasmlet"),
        None => PathBuf::from("/var/lib/wasmlet"),
    }
}

fn init_tracing(format: LogFormat, default: &str) {
    // kube's client logs every failed request as an error; wasmlet says what failed itself,
    // once per change (node::Complaint).
    let quiet = "kube_client::client::builder=off";
    let filter = tracing_subscriber::EnvFilter::try_from_env("WASMLET_LOG")
        .map(|f| f.add_directive(quiet.parse().expect("a directive")))
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(format!("{default},{quiet}")));
    // Colours only on a terminal: a log file or a pipe gets plain text.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_ansi(ansi);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

fn main() {
    if let Err(e) = run() {
        // The whole chain of causes on one line; no backtrace for a user's mistake.
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

fn run() -> Result<()> {
    let cli = Cli::parse();
    // One TLS crypto provider for the whole process (registry clients).
    let _ = rustls::crypto::ring::default_provider().install_default();
    // A server logs what it does; the client commands speak only when something is wrong.
    let default_level = if matches!(cli.command, Command::Cri { .. } | Command::Node { .. }) { "info" } else { "warn" };
    init_tracing(cli.log_format, default_level);
    if matches!(cli.command, Command::Cri { .. } | Command::Node { .. } | Command::Run { .. }) {
        raise_fd_limit();
    }
    // The real user, before a user namespace maps it to 0: it names the scratch directory.
    let uid = rustix::process::geteuid().as_raw();
    if let Command::Cri { config, .. } | Command::Run { config, .. } | Command::Node { config, .. } = &cli.command {
        let file = load_config(config.as_deref())?;
        let not_root = !rustix::process::geteuid().is_root();
        if file.network.mode.resolve() == wasmlet_runtime::net::NetworkMode::Rootless && not_root {
            // Before any thread exists: the kernel refuses a user namespace to a threaded process.
            wasmlet_runtime::net::netns::enter_user_namespace().context(
                "enter a user namespace for rootless pod networking (is kernel.unprivileged_userns_clone 1?)",
            )?;
        }
    }
    let rt = tokio::runtime::Runtime::new().context("start tokio")?;
    match cli.command {
        Command::Cri { config, root, socket, insecure_registries } => {
            let file = load_config(config.as_deref())?;
            let socket = socket.or(file.socket.clone());
            let (root, _, options) = runtime_setup(file, root, uid, &insecure_registries, false)?;
            rt.block_on(serve(root, socket, options))
        }
        Command::Run { files, logs, stop_after, config, root } => {
            let (root, run_dir, runtime) = runtime_setup(load_config(config.as_deref())?, root, uid, &[], true)?;
            let code = rt.block_on(async move {
                let manifests = run::load(&files)?;
                let local = LocalNode::start(
                    &root,
                    &run_dir,
                    runtime,
                    Identity::local(),
                    run::printer(),
                    run::objects(&manifests),
                )
                .await?;
                local.collect_leftovers().await;
                let rotation = local.log_rotation(Default::default()).await?;
                let code = run::run(local.node.clone(), manifests, run::RunOptions { root, logs, stop_after }).await;
                rotation.abort();
                local.stop().await;
                code
            })?;
            std::process::exit(code)
        }
        Command::Node {
            kubeconfig,
            bootstrap_kubeconfig,
            pod_manifest_path,
            hostname_override,
            node_ip,
            port,
            tls_cert_file,
            tls_private_key_file,
            config,
            root,
        } => {
            let file = load_config(config.as_deref())?;
            let mut node = file.node.clone();
            // Flags win over the file.
            node.port = port.unwrap_or(node.port);
            if tls_cert_file.is_some() {
                (node.tls_cert_file, node.tls_private_key_file) = (tls_cert_file, tls_private_key_file);
            }
            let (root, run_dir, runtime) = runtime_setup(file, root, uid, &[], true)?;
            rt.block_on(node_cmd::run(
                node_cmd::NodeArgs {
                    kubeconfig,
                    bootstrap_kubeconfig,
                    pod_manifest_path,
                    hostname_override,
                    node_ip,
                    config: node,
                    root,
                    run_dir,
                    runtime,
                },
                shutdown_signal(),
            ))
        }
        Command::Exec { session, command } => std::process::exit(rt.block_on(remote(session, command, uid))?),
        Command::Attach { session } => std::process::exit(rt.block_on(remote(session, Vec::new(), uid))?),
        Command::PortForward { pod, ports, config, root } => {
            let (_, run_dir, _) = runtime_setup(load_config(config.as_deref())?, root, uid, &[], false)?;
            let pairs = ports.iter().map(|p| stream_cmd::parse_port_pair(p)).collect::<Result<Vec<_>>>()?;
            rt.block_on(stream_cmd::port_forward(&run_dir, &pod, &pairs))
        }
        Command::Logs { pod, container, follow, previous, tail, since, since_time, timestamps, limit_bytes, root } => {
            let root = root.unwrap_or_else(default_root);
            // The options as kubectl sends them to a kubelet, checked the same way.
            let mut pairs = vec![("follow", follow.to_string()), ("previous", previous.to_string())];
            pairs.push(("timestamps", timestamps.to_string()));
            if tail >= 0 {
                pairs.push(("tailLines", tail.to_string()));
            }
            if let Some(d) = since {
                let secs =
                    go_duration_secs(&d).ok_or_else(|| anyhow!("--since {d:?}: not a duration (5s, 2m, 1h30m)"))?;
                pairs.push(("sinceSeconds", secs.to_string()));
            }
            if let Some(t) = since_time {
                pairs.push(("sinceTime", t));
            }
            if let Some(n) = limit_bytes {
                pairs.push(("limitBytes", n.to_string()));
            }
            let o = wasmlet_kubelet::logs::LogOptions::from_query(
                pairs.iter().map(|(k, v)| (*k, v.as_str())),
                std::time::SystemTime::now(),
            )
            .map_err(|e| anyhow!("wasmlet logs {pod}: {e}"))?;
            rt.block_on(run::logs(&root, &pod, container.as_deref(), &o))
        }
        Command::Config { command: ConfigCommand::Default } => {
            print!("{DEFAULT_CONFIG}");
            Ok(())
        }
        Command::Image { command } => rt.block_on(image(command)),
        Command::Pod { command: PodCommand::Run(args) } => {
            let code = rt.block_on(client::run_pod(args))?;
            std::process::exit(code)
        }
    }
}

/// `wasmlet exec` (a command) or `attach` (none); the exit code.
async fn remote(s: Session, command: Vec<String>, uid: u32) -> Result<i32> {
    let (_, run_dir, _) = runtime_setup(load_config(s.config.as_deref())?, s.root, uid, &[], false)?;
    let attach = command.is_empty();
    let args = stream_cmd::ExecArgs {
        pod: &s.pod,
        container: s.container.as_deref(),
        stdin: s.stdin,
        tty: s.tty,
        cmd: command,
    };
    if attach { stream_cmd::attach(&run_dir, args).await } else { stream_cmd::exec(&run_dir, args).await }
}

/// A Go duration (`1h30m`, `5s`, `250ms`) in whole seconds, rounded up as kubectl rounds
/// --since.
fn go_duration_secs(text: &str) -> Option<u64> {
    let mut nanos = 0f64;
    let mut rest = text;
    if rest.is_empty() {
        return None;
    }
    while !rest.is_empty() {
        let digits = rest.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(rest.len());
        let number: f64 = rest[..digits].parse().ok()?;
        rest = &rest[digits..];
        let unit_len = rest.find(|c: char| c.is_ascii_digit() || c == '.').unwrap_or(rest.len());
        let scale = match &rest[..unit_len] {
            "h" => 3.6e12,
            "m" => 6e10,
            "s" => 1e9,
            "ms" => 1e6,
            "us" | "µs" => 1e3,
            "ns" => 1.0,
            _ => return None,
        };
        nanos += number * scale;
        rest = &rest[unit_len..];
    }
    Some((nanos / 1e9).ceil() as u64)
}

async fn serve(root: PathBuf, socket: Option<PathBuf>, options: wasmlet_runtime::RuntimeOptions) -> Result<()> {
    let socket = socket.unwrap_or_else(|| root.join("cri.sock"));
    let runtime = {
        let root = root.clone();
        tokio::task::spawn_blocking(move || wasmlet_runtime::Runtime::open_with(root, options)).await??
    };
    let listener =
        wasmlet_runtime::server::bind(&socket).await.with_context(|| format!("bind {}", socket.display()))?;
    tracing::info!(root = %root.display(), socket = %socket.display(), "serving CRI v1");
    wasmlet_runtime::server::serve(runtime, listener, shutdown_signal()).await?;
    let _ = std::fs::remove_file(&socket);
    Ok(())
}

/// The root, run directory and runtime options from the config file and the flags (flags win);
/// `uid` is the real user, which names the default run directory. `kubelet`: the kubelet side
/// runs in this process (node, run): it rotates the logs, so they are bounded by default to
/// twice the rotation size, and its maxPods sizes the instance pool.
fn runtime_setup(
    file: Config,
    root: Option<PathBuf>,
    uid: u32,
    insecure_registries: &[String],
    kubelet: bool,
) -> Result<(PathBuf, PathBuf, wasmlet_runtime::RuntimeOptions)> {
    if let Some(n) = file.instance_slots.filter(|n| !(1..=wasmlet_runtime::engine::MAX_POOL_SLOTS).contains(n)) {
        anyhow::bail!(
            "config instance_slots {n}: it must be between 1 and {}",
            wasmlet_runtime::engine::MAX_POOL_SLOTS
        );
    }
    let log_bound = match &file.log_bound {
        Some(q) => Some(
            wasmlet_kubelet::quantity::Quantity::parse(q)
                .ok()
                .map(|q| q.ceil_units())
                .filter(|n| *n >= 64 << 10)
                .ok_or_else(|| anyhow::anyhow!("config log_bound {q:?}: not a quantity of at least 64Ki"))?
                as u64,
        ),
        None if kubelet => file.node.log_policy().ok().map(|p| 2 * p.max_size),
        None => None,
    };
    let registries = wasmlet_images::RegistryHosts { registries: file.registries }.with_insecure(insecure_registries);
    let root = root.or(file.root).unwrap_or_else(default_root);
    let run_dir = file.run_dir.unwrap_or_else(|| wasmlet_runtime::default_run_dir_for(&root, uid));
    let options = wasmlet_runtime::RuntimeOptions {
        registries,
        network: file.network,
        run_dir: Some(run_dir.clone()),
        stream_address: file.stream_address,
        log_bound,
        instance_slots: file
            .instance_slots
            .or(kubelet.then(|| wasmlet_runtime::engine::slots_for_pods(file.node.max_pods))),
    };
    Ok((root, run_dir, options))
}

/// Lets the process hold as many files as the system allows, as container runtimes' units do
/// (LimitNOFILE): every pod holds a few (its log, its namespace), and 10,000 of them pass the
/// usual soft limit. As root the hard limit is raised to fs.nr_open too.
fn raise_fd_limit() {
    use rustix::process::{Resource, getrlimit, setrlimit};
    let have = getrlimit(Resource::Nofile);
    let nr_open = std::fs::read_to_string("/proc/sys/fs/nr_open").ok().and_then(|v| v.trim().parse::<u64>().ok());
    let mut want = have;
    if rustix::process::geteuid().is_root()
        && let Some(n) = nr_open
    {
        want.maximum = Some(want.maximum.map_or(n, |m| m.max(n)));
    }
    want.current = want.maximum;
    if want.current != have.current || want.maximum != have.maximum {
        match setrlimit(Resource::Nofile, want) {
            Ok(()) => tracing::debug!(limit = ?want.current, "open files limit raised"),
            Err(e) => {
                // Without privilege only the soft limit can move, up to the hard one.
                let soft = rustix::process::Rlimit { current: have.maximum, maximum: have.maximum };
                if let Err(e2) = setrlimit(Resource::Nofile, soft) {
                    tracing::warn!(error = %e, again = %e2, "cannot raise the open files limit");
                }
            }
        }
    }
}

/// Ctrl-C or SIGTERM.
async fn shutdown_signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = async { match term.as_mut() { Some(t) => { t.recv().await; } None => std::future::pending().await } } => {}
    }
    tracing::info!("shutting down");
}

/// A .wasm file's bytes, or a .wat file's compiled.
fn read_wasm(file: &std::path::Path) -> Result<Vec<u8>> {
    let bytes = std::fs::read(file).with_context(|| format!("read {}", file.display()))?;
    if file.extension().is_some_and(|e| e == "wat") {
        return Ok(wat::parse_bytes(&bytes).with_context(|| format!("{}: invalid WAT", file.display()))?.into_owned());
    }
    Ok(bytes)
}

async fn image(command: ImageCommand) -> Result<()> {
    let open = |root: Option<PathBuf>| ImageStore::open(root.unwrap_or_else(default_root).join("images"));
    match command {
        ImageCommand::Import { file, tag, root } => {
            let record = open(root)?.import(&read_wasm(&file)?, tag.as_deref())?;
            println!("{}", record.id);
        }
        ImageCommand::Pull { image, registry, root } => {
            let reference = wasmlet_images::Reference::parse(&image)?;
            let store = open(root)?;
            eprintln!("pulling {reference} from {}", reference.registry);
            let started = std::time::Instant::now();
            let progress = Some(progress::observer("downloaded"));
            let record =
                wasmlet_images::pull(&store, &registry.registry(&reference.registry), &reference, progress).await?;
            eprintln!(
                "pulled {reference}: {} bytes, {:?}, in {:.1}s",
                record.size,
                record.kind,
                started.elapsed().as_secs_f64()
            );
            println!("{}", record.id);
        }
        ImageCommand::Push { file, image, annotations, registry } => {
            let reference = wasmlet_images::Reference::parse(&image)?;
            let wasm = read_wasm(&file)?;
            let mut notes = std::collections::BTreeMap::new();
            for kv in annotations {
                let Some((k, v)) = kv.split_once('=') else { bail!("--annotation {kv:?}: expected KEY=VALUE") };
                notes.insert(k.to_string(), v.to_string());
            }
            eprintln!("pushing {} ({} bytes) to {reference}", file.display(), wasm.len());
            let progress = Some(progress::observer("uploaded"));
            let digest =
                wasmlet_images::push_wasm(&registry.registry(&reference.registry), &reference, wasm, notes, progress)
                    .await?;
            eprintln!("pushed {reference}");
            println!("{digest}");
        }
        ImageCommand::Ls { root } => {
            println!("{:<50} {:<11} {:>10}  ID", "TAG", "KIND", "SIZE");
            for i in open(root)?.list()? {
                let kind = format!("{:?}", i.kind).to_lowercase();
                let tags = if i.repo_tags.is_empty() { vec!["<none>".to_string()] } else { i.repo_tags.clone() };
                for t in tags {
                    println!("{t:<50} {kind:<11} {:>10}  {}", i.size, &i.id[7..19]);
                }
            }
        }
        ImageCommand::Inspect { image, root } => match open(root)?.resolve(&image)? {
            Some(r) => println!("{}", serde_json::to_string_pretty(&r)?),
            None => bail!("image {image:?} not found"),
        },
        ImageCommand::Rm { image, root } => match open(root)?.remove(&image)? {
            Some(r) => println!("removed {}", r.id),
            None => bail!("image {image:?} not found"),
        },
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::go_duration_secs;

    #[test]
    fn since_durations_as_kubectl_reads_them() {
        assert_eq!(go_duration_secs("5s"), Some(5));
        assert_eq!(go_duration_secs("1h30m"), Some(5400));
        assert_eq!(go_duration_secs("1.5s"), Some(2), "rounded up");
        assert_eq!(go_duration_secs("250ms"), Some(1));
        assert_eq!(go_duration_secs("5"), None, "a unit is needed");
        assert_eq!(go_duration_secs("5x"), None);
        assert_eq!(go_duration_secs(""), None);
    }
}
