//! The end-to-end test harness: starts the real `wasmlet` binary on a temporary root and unix
//! socket, talks to it with the tonic CRI client, and knows where the test workloads are.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use cri::image_service_client::ImageServiceClient;
use cri::runtime_service_client::RuntimeServiceClient;
pub use cri_proto::v1 as cri;
use tonic::transport::Channel;

pub mod cluster;
pub mod images;
pub mod token;
pub use token::TokenServer;

/// The repository's `examples/` directory.
pub fn examples_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("workspace").join("examples")
}

/// The preview 1 test workload (`workloads/tool.c`).
pub fn tool_module() -> &'static Path {
    Path::new(env!("WORKLOAD_TOOL"))
}

/// The same workload as a `wasi:cli/command` component.
pub fn tool_component() -> &'static Path {
    Path::new(env!("WORKLOAD_TOOL_COMPONENT"))
}

/// A component that serves and connects through wasi:sockets (`workloads/net.c`).
pub fn net_component() -> &'static Path {
    Path::new(env!("WORKLOAD_NET"))
}

/// A `wasi:http/proxy` component answering every request with its path (`workloads/http.c`).
pub fn http_component() -> &'static Path {
    Path::new(env!("WORKLOAD_HTTP"))
}

/// The conformance userland (`workloads/box.c`): sh, echo, sleep, top, cat, ls, hostname,
/// pgrep, true, false and env in one preview 1 module, picked by argv[0].
pub fn box_module() -> &'static Path {
    Path::new(env!("WORKLOAD_BOX"))
}

/// A CNI config directory in `dir` with one network on `bridge` over `subnet` (Debian's
/// `plugin`, bridge for a working one, and host-local addresses), and a wasmlet config file
/// using it (its path).
pub fn cni_config(dir: &Path, bridge: &str, subnet: &str, plugin: &str) -> std::path::PathBuf {
    let conf = dir.join("net.d");
    std::fs::create_dir_all(&conf).unwrap();
    let list = serde_json::json!({
        "cniVersion": "1.0.0",
        "name": "wasmlet-test",
        "plugins": [{
            "type": plugin,
            "bridge": bridge,
            "isGateway": true,
            "ipMasq": false,
            "ipam": {"type": "host-local", "ranges": [[{"subnet": subnet}]], "dataDir": dir.join("ipam")},
        }],
    });
    std::fs::write(conf.join("10-test.conflist"), serde_json::to_vec(&list).unwrap()).unwrap();
    let file = dir.join("wasmlet.toml");
    std::fs::write(
        &file,
        format!(
            "[network]\nmode = \"cni\"\ncni_conf_dir = \"{}\"\ncni_bin_dirs = [\"/usr/lib/cni\", \"/opt/cni/bin\"]\n",
            conf.display()
        ),
    )
    .unwrap();
    file
}

/// A network of wasmlet's own bridge mode for one test (root): a config file in `dir` naming
/// a bridge and a /24 that no other test process uses at the same time. Dropping it deletes
/// the bridge.
pub struct TestBridge {
    /// The bridge's name.
    pub name: String,
    /// The first three octets of its /24, with a trailing dot ("10.232.57.").
    pub prefix: String,
    /// The wasmlet config file.
    pub config: std::path::PathBuf,
}

impl TestBridge {
    /// A bridge `wl<letter><pid>` over 10.232.N.0/24 (`letter` tells apart the tests of one
    /// process).
    pub fn new(dir: &Path, letter: char) -> TestBridge {
        let pid = std::process::id();
        let name = format!("wl{letter}{:04x}", pid & 0xffff);
        let third = (pid.wrapping_mul(7) + letter as u32) % 250 + 2;
        let prefix = format!("10.232.{third}.");
        let config = dir.join("wasmlet-bridge.toml");
        std::fs::write(&config, format!("[network]\nbridge = \"{name}\"\npod_cidr = \"{prefix}0/24\"\n")).unwrap();
        TestBridge { name, prefix, config }
    }

    /// The pods' gateway: the bridge's address.
    pub fn gateway(&self) -> String {
        format!("{}1", self.prefix)
    }
}

impl Drop for TestBridge {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["link", "del", &self.name]).status();
    }
}

/// Runs `command` with `input` on its stdin (written from a thread of its own, so that a large
/// input cannot deadlock against the child's output) and returns its output.
pub fn output_with_input(command: &mut Command, input: &[u8]) -> std::io::Result<std::process::Output> {
    use std::io::Write;
    let mut child = command.stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn()?;
    let mut stdin = child.stdin.take().expect("piped");
    let data = input.to_vec();
    // A child that ends before reading it all closes the pipe: not an error here.
    let feeder = std::thread::spawn(move || {
        let _ = stdin.write_all(&data);
    });
    let out = child.wait_with_output();
    let _ = feeder.join();
    out
}

/// Checks that the host reaches `ip` straight through the device `dev` (no gateway) before
/// a test dials it: an address that exists only inside a pod's namespace would otherwise go
/// out of the machine by the default route.
pub fn ensure_on_device(ip: &str, dev: &str) -> Result<()> {
    let out = Command::new("ip").args(["-o", "route", "get", ip]).output()?;
    let route = String::from_utf8_lossy(&out.stdout);
    anyhow::ensure!(
        out.status.success() && route.contains(&format!(" dev {dev} ")) && !route.contains(" via "),
        "{ip} is not reached through {dev} on this machine: {route}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

/// Whether the tests run as root (CNI networks and bridges need it).
pub fn is_root() -> bool {
    rustix::process::geteuid().is_root()
}

/// Whether a test that needs root skips here: without root it says why (`needs`) and skips,
/// except under CI, which runs as root, where it fails.
pub fn skip_unless_root(needs: &str) -> bool {
    if is_root() {
        return false;
    }
    assert!(std::env::var_os("CI").is_none(), "{needs}");
    eprintln!("skipped: {needs}");
    true
}

/// A TCP port free on the host's loopback right now.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).expect("free port")
}

/// Waits (polling) until the container's log has a line containing `needle`.
pub async fn wait_log(rt: &mut RuntimeClient, id: &str, needle: &str, limit: Duration) -> Result<()> {
    let path = status(rt, id).await?.log_path;
    let deadline = Instant::now() + limit;
    loop {
        if read_log(Path::new(&path)).is_ok_and(|l| l.iter().any(|r| r.text.contains(needle))) {
            return Ok(());
        }
        let s = status(rt, id).await?;
        if s.state == cri::ContainerState::ContainerExited as i32 || Instant::now() > deadline {
            bail!(
                "container {id} (state {}, {}) never logged {needle:?}: {:?}",
                s.state,
                s.message,
                read_log(Path::new(&path))
            );
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// The `wasmlet` binary built next to the test executables (or `$WASMLET_BIN`).
pub fn wasmlet_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("WASMLET_BIN") {
        return PathBuf::from(p);
    }
    let exe = std::env::current_exe().expect("current exe");
    // target/<profile>/deps/<test> -> target/<profile>/wasmlet
    let bin = exe.parent().and_then(Path::parent).map(|d| d.join("wasmlet")).expect("target dir");
    assert!(
        bin.exists(),
        "{} is missing: build it first (cargo build -p wasmlet, or cargo test --workspace)",
        bin.display()
    );
    bin
}

pub type RuntimeClient = RuntimeServiceClient<Channel>;
pub type ImageClient = ImageServiceClient<Channel>;

/// A running `wasmlet cri` process on its own root and socket.
pub struct Server {
    /// Temporary directory holding the root, the socket and the logs.
    pub dir: tempfile::TempDir,
    child: Option<Child>,
    args: Vec<String>,
    /// Run as this uid and gid (from root, through `setpriv`), with a copy of the binary.
    run_as: Option<(u32, PathBuf)>,
    /// Extra environment variables.
    envs: Vec<(String, String)>,
}

impl Server {
    /// Starts a server on a fresh root.
    pub async fn start() -> Result<Server> {
        Server::start_with(&[]).await
    }

    /// Starts a server on a fresh root with extra `wasmlet cri` arguments.
    pub async fn start_with(args: &[&str]) -> Result<Server> {
        Server::start_with_env(args, &[]).await
    }

    /// The same with extra environment variables.
    pub async fn start_with_env(args: &[&str], envs: &[(&str, &str)]) -> Result<Server> {
        let dir = tempfile::tempdir()?;
        let args = args.iter().map(|a| a.to_string()).collect();
        let envs = envs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        let mut s = Server { dir, child: None, args, run_as: None, envs };
        s.spawn().await?;
        Ok(s)
    }

    /// Starts a server as the unprivileged user `nobody` (65534), as a user on a laptop would
    /// run it. The caller must be root (CI is); `None` otherwise.
    pub async fn start_unprivileged() -> Result<Option<Server>> {
        Server::start_unprivileged_with_env(&[]).await
    }

    /// The same with extra environment variables.
    pub async fn start_unprivileged_with_env(envs: &[(&str, &str)]) -> Result<Option<Server>> {
        if !is_root() {
            return Ok(None);
        }
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir()?;
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o777))?;
        // The build directory may be closed to other users: a copy they can run.
        let bin = dir.path().join("wasmlet");
        if std::fs::hard_link(wasmlet_bin(), &bin).is_err() {
            std::fs::copy(wasmlet_bin(), &bin)?;
        }
        std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o755))?;
        let envs = envs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        let mut s = Server { dir, child: None, args: Vec::new(), run_as: Some((65534, bin)), envs };
        s.spawn().await?;
        Ok(Some(s))
    }

    /// The state root.
    pub fn root(&self) -> PathBuf {
        self.dir.path().join("root")
    }

    /// Its per-pod scratch directory (the server's default for its root).
    pub fn run_dir(&self) -> PathBuf {
        let uid = self.run_as.as_ref().map_or_else(|| rustix::process::geteuid().as_raw(), |(id, _)| *id);
        wasmlet_runtime::default_run_dir_for(&self.root(), uid)
    }

    /// The CRI socket.
    pub fn socket(&self) -> PathBuf {
        self.dir.path().join("run/cri.sock")
    }

    /// A directory for pod logs.
    pub fn log_dir(&self, pod: &str) -> PathBuf {
        self.dir.path().join("logs").join(pod)
    }

    /// (Re)starts the server process on the same root and waits until it answers.
    pub async fn spawn(&mut self) -> Result<()> {
        let stderr = std::fs::OpenOptions::new().create(true).append(true).open(self.dir.path().join("server.log"))?;
        let mut command = match &self.run_as {
            None => Command::new(wasmlet_bin()),
            Some((id, bin)) => {
                let mut c = Command::new("setpriv");
                c.args([format!("--reuid={id}"), format!("--regid={id}"), "--clear-groups".into()]).arg(bin);
                c
            }
        };
        let child = command
            .arg("cri")
            .arg("--root")
            .arg(self.root())
            .arg("--socket")
            .arg(self.socket())
            .args(&self.args)
            .env("WASMLET_LOG", "info")
            .envs(self.envs.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .context("spawn wasmlet cri")?;
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(ch) = cri_proto::connect_unix(self.socket()).await {
                let mut c = RuntimeServiceClient::new(ch);
                if c.version(cri::VersionRequest { version: "0.1.0".into() }).await.is_ok() {
                    return Ok(());
                }
            }
            if let Some(status) = self.child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                bail!("wasmlet exited with {status} before serving:\n{}", self.server_log());
            }
            if Instant::now() > deadline {
                bail!("wasmlet did not serve within 30s:\n{}", self.server_log());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The server's own log (stderr) so far.
    pub fn server_log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("server.log")).unwrap_or_default()
    }

    /// Kills the server with SIGKILL and waits for it to die.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// The server's process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(Child::id).expect("server running")
    }

    /// Whether the server process is still alive.
    pub fn alive(&mut self) -> bool {
        self.child.as_mut().is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// A RuntimeService client on a new connection.
    pub async fn runtime(&self) -> RuntimeClient {
        RuntimeServiceClient::new(cri_proto::connect_unix(self.socket()).await.expect("connect"))
            .max_decoding_message_size(cri_proto::MAX_MESSAGE_BYTES)
    }

    /// An ImageService client on a new connection.
    pub async fn images(&self) -> ImageClient {
        ImageServiceClient::new(cri_proto::connect_unix(self.socket()).await.expect("connect"))
            .max_decoding_message_size(cri_proto::MAX_MESSAGE_BYTES)
    }

    /// `wasmlet image import FILE --tag TAG` on this server's root; returns the image id.
    pub fn import(&self, file: &Path, tag: &str) -> Result<String> {
        let out = self.wasmlet(&["image", "import", &file.display().to_string(), "--tag", tag])?;
        if !out.status.success() {
            bail!("import {} failed: {}", file.display(), String::from_utf8_lossy(&out.stderr));
        }
        Ok(String::from_utf8(out.stdout)?.trim().to_string())
    }

    /// Runs `wasmlet ARGS --root ROOT`.
    pub fn wasmlet(&self, args: &[&str]) -> Result<std::process::Output> {
        Ok(Command::new(wasmlet_bin()).args(args).arg("--root").arg(self.root()).output()?)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill9();
        release_run_dir(&self.run_dir());
    }
}

/// Lets go of what a killed wasmlet left in its run dir: the pod namespaces it pinned (as
/// root), which outlive it by design and keep their veths on the bridge (a bridge takes 1,024
/// at most), and the scratch directory itself.
pub fn release_run_dir(run_dir: &Path) {
    for pin in std::fs::read_dir(run_dir.join("netns")).into_iter().flatten().flatten() {
        wasmlet_runtime::net::NetNs::unpin(&pin.path());
    }
    let _ = std::fs::remove_dir_all(run_dir);
}

/// A sandbox config with unique metadata and a log directory under the server's temp dir.
pub fn sandbox_config(server: &Server, name: &str) -> cri::PodSandboxConfig {
    cri::PodSandboxConfig {
        metadata: Some(cri::PodSandboxMetadata {
            name: name.to_string(),
            uid: format!("uid-{name}"),
            namespace: "test".to_string(),
            attempt: 0,
        }),
        hostname: name.to_string(),
        log_directory: server.log_dir(name).display().to_string(),
        labels: HashMap::from([("app".to_string(), name.to_string())]),
        annotations: HashMap::from([("note".to_string(), format!("pod {name}"))]),
        ..Default::default()
    }
}

/// A container config running `image` with `args`, logging to `<name>/0.log`.
pub fn container_config(name: &str, image: &str, args: &[&str]) -> cri::ContainerConfig {
    cri::ContainerConfig {
        metadata: Some(cri::ContainerMetadata { name: name.to_string(), attempt: 0 }),
        image: Some(cri::ImageSpec { image: image.to_string(), ..Default::default() }),
        command: vec!["tool".to_string()],
        args: args.iter().map(|s| s.to_string()).collect(),
        log_path: format!("{name}/0.log"),
        labels: HashMap::from([("container".to_string(), name.to_string())]),
        ..Default::default()
    }
}

/// Puts a sandbox on the host's network (NamespaceOption network NODE: hostNetwork pods).
pub fn host_network(cfg: &mut cri::PodSandboxConfig) {
    cfg.linux = Some(cri::LinuxPodSandboxConfig {
        security_context: Some(cri::LinuxSandboxSecurityContext {
            namespace_options: Some(cri::NamespaceOption {
                network: cri::NamespaceMode::Node as i32,
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    });
}

/// An HTTP/1.0 GET of `path` on 127.0.0.1:`port`: the whole answer.
pub fn http_get(port: u16, path: &str) -> std::io::Result<String> {
    use std::io::{Read, Write};
    let mut c = std::net::TcpStream::connect(("127.0.0.1", port))?;
    c.set_nodelay(true)?;
    c.set_read_timeout(Some(Duration::from_secs(30)))?;
    c.write_all(format!("GET {path} HTTP/1.0\r\nHost: web\r\n\r\n").as_bytes())?;
    let mut answer = String::new();
    c.read_to_string(&mut answer)?;
    Ok(answer)
}

/// A pod `name` whose wasi:http handler (the `http` image, which must be imported) answers on
/// a free host port: (sandbox id, container id, host port), once it answers.
pub async fn http_pod(server: &Server, rt: &mut RuntimeClient, name: &str) -> Result<(String, String, u16)> {
    http_pod_of(server, rt, name, "http", Duration::from_secs(30)).await
}

/// `cfg` with TCP host ports: (container port, host port; 0 picks none) pairs.
pub fn with_ports(mut cfg: cri::PodSandboxConfig, ports: &[(i32, i32)]) -> cri::PodSandboxConfig {
    cfg.port_mappings = ports
        .iter()
        .map(|&(container_port, host_port)| cri::PortMapping {
            protocol: cri::Protocol::Tcp as i32,
            container_port,
            host_port,
            host_ip: String::new(),
        })
        .collect();
    cfg
}

/// [`http_pod`] with the handler of `image`, given `limit` to answer (a large component
/// compiles first).
pub async fn http_pod_of(
    server: &Server,
    rt: &mut RuntimeClient,
    name: &str,
    image: &str,
    limit: Duration,
) -> Result<(String, String, u16)> {
    let port = free_port();
    let cfg = with_ports(sandbox_config(server, name), &[(8080, port as i32)]);
    let sb = run_sandbox(rt, &cfg).await?;
    let mut web = container_config("web", image, &[]);
    web.command.clear();
    let id = start(rt, &sb, &cfg, web).await;
    let deadline = std::time::Instant::now() + limit;
    while !http_get(port, "/").is_ok_and(|a| a.starts_with("HTTP/1.0 200")) {
        anyhow::ensure!(std::time::Instant::now() < deadline, "pod {name} never answered\n{}", server.server_log());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok((sb, id, port))
}

/// The resident memory of process `pid` in MiB (0 when it cannot be read).
pub fn rss_mib(pid: u32) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|kb| kb.parse::<f64>().ok())
        .map_or(0.0, |kb| kb / 1024.0)
}

/// A benchmark's setting: `$name`, else `default`.
pub fn bench_env(name: &str, default: usize) -> usize {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// The `p` quantile (0 to 1) of `v`, in milliseconds.
pub fn percentile_ms(v: &mut [Duration], p: f64) -> f64 {
    v.sort();
    let i = ((v.len() as f64 - 1.0) * p).round() as usize;
    v[i].as_secs_f64() * 1000.0
}

/// Runs a sandbox and returns its id.
pub async fn run_sandbox(rt: &mut RuntimeClient, config: &cri::PodSandboxConfig) -> Result<String> {
    Ok(rt
        .run_pod_sandbox(cri::RunPodSandboxRequest { config: Some(config.clone()), runtime_handler: String::new() })
        .await?
        .into_inner()
        .pod_sandbox_id)
}

/// A container running the socket workload (`net`, imported under that name) with `args`.
pub fn net_config(name: &str, args: &[&str]) -> cri::ContainerConfig {
    let mut c = container_config(name, "net", args);
    c.command = vec!["net".into()];
    c
}

/// Creates and starts a container; its id. Panics on failure (for tests).
pub async fn start(rt: &mut RuntimeClient, sb: &str, cfg: &cri::PodSandboxConfig, c: cri::ContainerConfig) -> String {
    let id = create(rt, sb, cfg, c).await.unwrap();
    rt.start_container(cri::StartContainerRequest { container_id: id.clone() }).await.unwrap();
    id
}

/// The stdout lines of a container once it has exited, which it must with 0 (for tests).
pub async fn stdout_of(rt: &mut RuntimeClient, id: &str) -> Vec<String> {
    let s = wait_exited(rt, id, Duration::from_secs(30)).await.unwrap();
    let log = read_log(Path::new(&s.log_path)).unwrap();
    assert_eq!(s.exit_code, 0, "{id}: {log:?}");
    texts(&log, "stdout")
}

/// The pod IP PodSandboxStatus reports.
pub async fn pod_ip(rt: &mut RuntimeClient, sb: &str) -> String {
    let s = rt.pod_sandbox_status(cri::PodSandboxStatusRequest { pod_sandbox_id: sb.into(), verbose: false }).await;
    s.unwrap().into_inner().status.unwrap().network.unwrap().ip
}

/// The pod's address inside its own namespace (PodSandboxStatus's verbose `pod_address`): its
/// IP, also where the runtime reports none (rootless mode).
pub async fn pod_address(rt: &mut RuntimeClient, sb: &str) -> String {
    let s = rt.pod_sandbox_status(cri::PodSandboxStatusRequest { pod_sandbox_id: sb.into(), verbose: true }).await;
    s.unwrap().into_inner().info.get("pod_address").cloned().unwrap_or_default()
}

/// Creates a container in a sandbox and returns its id.
pub async fn create(
    rt: &mut RuntimeClient,
    sandbox: &str,
    sandbox_config: &cri::PodSandboxConfig,
    config: cri::ContainerConfig,
) -> std::result::Result<String, tonic::Status> {
    Ok(rt
        .create_container(cri::CreateContainerRequest {
            pod_sandbox_id: sandbox.to_string(),
            config: Some(config),
            sandbox_config: Some(sandbox_config.clone()),
        })
        .await?
        .into_inner()
        .container_id)
}

/// The status of a container.
pub async fn status(rt: &mut RuntimeClient, id: &str) -> Result<cri::ContainerStatus> {
    rt.container_status(cri::ContainerStatusRequest { container_id: id.to_string(), verbose: false })
        .await?
        .into_inner()
        .status
        .context("no status")
}

/// Waits (polling) until the container has exited, for at most `limit`.
pub async fn wait_exited(rt: &mut RuntimeClient, id: &str, limit: Duration) -> Result<cri::ContainerStatus> {
    let deadline = Instant::now() + limit;
    loop {
        let s = status(rt, id).await?;
        if s.state == cri::ContainerState::ContainerExited as i32 {
            return Ok(s);
        }
        if Instant::now() > deadline {
            bail!("container {id} still in state {} after {limit:?}", s.state);
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// One record of a CRI log file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogRecord {
    pub timestamp: String,
    pub stream: String,
    pub tag: String,
    pub text: String,
}

/// Reads and checks a CRI log file: every line must be `<RFC3339Nano> <stdout|stderr> <P|F> <text>`.
pub fn read_log(path: &Path) -> Result<Vec<LogRecord>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("read log {}", path.display()))?;
    let mut out = Vec::new();
    for line in text.split_terminator('\n') {
        let mut parts = line.splitn(4, ' ');
        let (ts, stream, tag, text) = (
            parts.next().unwrap_or_default(),
            parts.next().unwrap_or_default(),
            parts.next().unwrap_or_default(),
            parts.next().context("short log line")?,
        );
        check_timestamp(ts).with_context(|| format!("log line {line:?}"))?;
        if !matches!(stream, "stdout" | "stderr") || !matches!(tag, "P" | "F") {
            bail!("bad log line {line:?}");
        }
        out.push(LogRecord { timestamp: ts.into(), stream: stream.into(), tag: tag.into(), text: text.into() });
    }
    Ok(out)
}

/// `YYYY-MM-DDTHH:MM:SS.nnnnnnnnnZ`, within a day of now.
fn check_timestamp(ts: &str) -> Result<()> {
    let b = ts.as_bytes();
    let digits = |r: std::ops::Range<usize>| b[r].iter().all(u8::is_ascii_digit);
    let shape = b.len() == 30
        && digits(0..4)
        && b[4] == b'-'
        && digits(5..7)
        && b[7] == b'-'
        && digits(8..10)
        && b[10] == b'T'
        && digits(11..13)
        && b[13] == b':'
        && digits(14..16)
        && b[16] == b':'
        && digits(17..19)
        && b[19] == b'.'
        && digits(20..29)
        && b[29] == b'Z';
    if !shape {
        bail!("timestamp {ts:?} is not RFC 3339 with nanoseconds in UTC");
    }
    let year: i32 = ts[0..4].parse()?;
    if !(2024..2200).contains(&year) {
        bail!("timestamp {ts:?} is not now");
    }
    Ok(())
}

/// The texts of a log's records from one stream.
pub fn texts(records: &[LogRecord], stream: &str) -> Vec<String> {
    records.iter().filter(|r| r.stream == stream).map(|r| r.text.clone()).collect()
}

/// A Debian `docker-registry` serving on a free loopback port, its storage in a temp dir.
pub struct RegistryServer {
    /// Temp directory with the config and the storage.
    pub dir: tempfile::TempDir,
    /// `127.0.0.1:PORT`.
    pub host: String,
    /// The token server, for a registry started with [`RegistryServer::start_with_token`].
    pub token: Option<TokenServer>,
    child: Child,
}

impl RegistryServer {
    /// Starts a registry without authentication (the test command installs `docker-registry`).
    pub async fn start() -> Result<RegistryServer> {
        RegistryServer::start_with(Auth::None).await
    }

    /// Starts a registry that wants a bearer token from a [`TokenServer`], which issues them to
    /// `user` with `password`.
    pub async fn start_with_token(user: &str, password: &str) -> Result<RegistryServer> {
        RegistryServer::start_with(Auth::Token(user, password)).await
    }

    /// Starts a registry that wants HTTP basic authentication as `user` with `password`.
    pub async fn start_with_htpasswd(user: &str, password: &str) -> Result<RegistryServer> {
        RegistryServer::start_with(Auth::Basic(user, password)).await
    }

    async fn start_with(auth: Auth<'_>) -> Result<RegistryServer> {
        let dir = tempfile::tempdir()?;
        let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let host = format!("127.0.0.1:{port}");
        let config = format!(
            "version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\nhttp:\n  addr: {host}\n",
            dir.path().join("data").display()
        );
        let mut token = None;
        let config = match auth {
            Auth::None => config,
            Auth::Token(user, password) => {
                let server = TokenServer::start(dir.path(), user, password).await?;
                let config = format!("{config}{}", server.registry_auth_config(dir.path()));
                token = Some(server);
                config
            }
            Auth::Basic(user, password) => {
                // The registry reads bcrypt htpasswd entries; Python's crypt makes one.
                let script = "import crypt,sys; print(sys.argv[1] + ':' + crypt.crypt(sys.argv[2], crypt.mksalt(crypt.METHOD_BLOWFISH)))";
                let out = Command::new("python3").args(["-W", "ignore", "-c", script, user, password]).output()?;
                if !out.status.success() {
                    bail!("make htpasswd: {}", String::from_utf8_lossy(&out.stderr));
                }
                let htpasswd = dir.path().join("htpasswd");
                std::fs::write(&htpasswd, out.stdout)?;
                format!("{config}auth:\n  htpasswd:\n    realm: wasmlet-test\n    path: {}\n", htpasswd.display())
            }
        };
        let config_path = dir.path().join("config.yml");
        std::fs::write(&config_path, config)?;
        let log = std::fs::File::create(dir.path().join("registry.log"))?;
        let child = Command::new("docker-registry")
            .arg("serve")
            .arg(&config_path)
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("start docker-registry (apt-get install docker-registry)")?;
        let deadline = Instant::now() + Duration::from_secs(20);
        while tokio::net::TcpStream::connect(&host).await.is_err() {
            if Instant::now() > deadline {
                bail!("docker-registry did not listen on {host}");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(RegistryServer { dir, host, token, child })
    }

    /// What the registry has logged: its access log among the rest.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("registry.log")).unwrap_or_default()
    }

    /// How many times the blob `digest` was downloaded (GET requests in the access log).
    pub fn blob_downloads(&self, digest: &str) -> usize {
        self.log().lines().filter(|l| l.contains("\"GET /v2/") && l.contains(&format!("/blobs/{digest} "))).count()
    }

    /// Where the registry keeps a blob's bytes (to corrupt it).
    pub fn blob_path(&self, digest: &str) -> PathBuf {
        let hex = digest.trim_start_matches("sha256:");
        self.dir.path().join("data/docker/registry/v2/blobs/sha256").join(&hex[..2]).join(hex).join("data")
    }
}

impl Drop for RegistryServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

enum Auth<'a> {
    None,
    Basic(&'a str, &'a str),
    Token(&'a str, &'a str),
}

/// `wasmlet image push FILE REF --username USER --password PASSWORD`, as it ended.
pub fn push_as(file: &Path, reference: &str, user: &str, password: &str) -> std::process::Output {
    Command::new(wasmlet_bin())
        .args(["image", "push"])
        .arg(file)
        .arg(reference)
        .args(["--username", user, "--password", password])
        .output()
        .expect("run wasmlet image push")
}

/// `wasmlet image push FILE REF`; returns the manifest digest.
pub fn push(file: &Path, reference: &str) -> Result<String> {
    let out = Command::new(wasmlet_bin()).args(["image", "push"]).arg(file).arg(reference).output()?;
    if !out.status.success() {
        bail!("push {reference} failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(String::from_utf8(out.stdout)?.trim().to_string())
}

/// PullImage of `image` through the CRI; the image id on success.
pub async fn pull(img: &mut ImageClient, image: &str) -> std::result::Result<String, tonic::Status> {
    let spec = cri::ImageSpec { image: image.to_string(), ..Default::default() };
    img.pull_image(cri::PullImageRequest { image: Some(spec), ..Default::default() })
        .await
        .map(|r| r.into_inner().image_ref)
}

/// A network namespace a test makes to stand for "the world outside" (root only): a veth pair
/// `wlo<letter><pid>` with the host end at 10.233.N.1/30 and the other end, in the namespace,
/// at 10.233.N.2. Deleted on drop.
pub struct OutsideNetns {
    pub name: String,
    /// The address inside the namespace.
    pub address: String,
    /// The host's end of the veth: an address of the host's own, on a link of its own.
    pub host_address: String,
}

impl OutsideNetns {
    pub fn new(letter: char) -> OutsideNetns {
        let pid = std::process::id();
        let name = format!("wlo{letter}{:04x}", pid & 0xffff);
        let third = (pid.wrapping_mul(11) + letter as u32) % 250 + 2;
        let (host, inside) = (format!("10.233.{third}.1/30"), format!("10.233.{third}.2/30"));
        let ip = |args: &[&str]| {
            let out = std::process::Command::new("ip").args(args).output().expect("run ip");
            assert!(out.status.success(), "ip {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        };
        let peer = format!("{name}p");
        ip(&["netns", "add", &name]);
        let ns = OutsideNetns {
            name: name.clone(),
            address: format!("10.233.{third}.2"),
            host_address: format!("10.233.{third}.1"),
        };
        ip(&["link", "add", &name, "type", "veth", "peer", "name", &peer]);
        ip(&["link", "set", &peer, "netns", &name]);
        ip(&["addr", "add", &host, "dev", &name]);
        ip(&["link", "set", &name, "up"]);
        for args in [
            vec!["addr", "add", &inside, "dev", &peer],
            vec!["link", "set", &peer, "up"],
            vec!["link", "set", "lo", "up"],
        ] {
            ip(&[&["-n", &name][..], &args].concat());
        }
        ns
    }

    /// Runs `serve` with a listener on `port` inside the namespace, in a thread of its own
    /// (which enters the namespace), once the listener is bound.
    fn listen_inside<F>(&self, port: u16, serve: F) -> std::thread::JoinHandle<()>
    where
        F: FnOnce(std::net::TcpListener) + Send + 'static,
    {
        let (name, addr) = (self.name.clone(), self.address.clone());
        let (ready_tx, ready) = std::sync::mpsc::channel();
        let t = std::thread::spawn(move || {
            let ns = std::fs::File::open(format!("/run/netns/{name}")).expect("the namespace");
            rustix::thread::move_into_link_name_space(
                std::os::fd::AsFd::as_fd(&ns),
                Some(rustix::thread::LinkNameSpaceType::Network),
            )
            .expect("enter the namespace");
            let listener = std::net::TcpListener::bind((addr.as_str(), port)).expect("listen inside");
            ready_tx.send(()).unwrap();
            serve(listener);
        });
        ready.recv().expect("the server listens");
        t
    }

    /// Answers one TCP connection on `port` with "outside saw <peer>".
    pub fn answer_once(&self, port: u16) -> std::thread::JoinHandle<()> {
        self.listen_inside(port, |listener| {
            use std::io::{Read, Write};
            let (mut c, peer) = listener.accept().expect("accept");
            // Read the client's message first and its end last: closing a socket with unread
            // input sends a reset, which may reach the client (through pasta, say) before the
            // answer does.
            let mut buf = [0u8; 256];
            let _ = c.read(&mut buf);
            let _ = c.write_all(format!("outside saw {}", peer.ip()).as_bytes());
            let _ = c.shutdown(std::net::Shutdown::Write);
            let _ = c.set_read_timeout(Some(std::time::Duration::from_secs(5)));
            while matches!(c.read(&mut buf), Ok(n) if n > 0) {}
        })
    }

    /// A sink on `port`: counts what each connection sends until the client ends its side,
    /// answers the count, for ever.
    pub fn sink(&self, port: u16) {
        self.listen_inside(port, |listener| {
            use std::io::{Read, Write};
            let mut buf = vec![0u8; 1 << 20];
            while let Ok((mut c, _)) = listener.accept() {
                let mut total = 0u64;
                while let Ok(n) = c.read(&mut buf) {
                    if n == 0 {
                        break;
                    }
                    total += n as u64;
                }
                let _ = c.write_all(format!("{total}\n").as_bytes());
            }
        });
    }
}

impl Drop for OutsideNetns {
    fn drop(&mut self) {
        let _ = std::process::Command::new("ip").args(["link", "del", &self.name]).output();
        let _ = std::process::Command::new("ip").args(["netns", "del", &self.name]).output();
    }
}

/// A DNS server for a test on `addr`:53, UDP and TCP, that knows the A records `records` and
/// says every other name does not exist; a name starting with `big.` gets a truncated answer
/// over UDP (the TC bit) and the full one over TCP, a name starting with `garbage.` gets bytes
/// that are no DNS message. Returns the names it was asked for; None when port 53 cannot be
/// bound (not root).
pub async fn dns_server(
    addr: &str,
    records: &[(&str, [u8; 4])],
) -> Option<std::sync::Arc<std::sync::Mutex<Vec<String>>>> {
    let socket = match tokio::net::UdpSocket::bind((addr, 53)).await {
        Ok(s) => s,
        Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => return None,
        Err(e) => panic!("bind the test DNS server on {addr}: {e}"),
    };
    let tcp = tokio::net::TcpListener::bind((addr, 53)).await.expect("the test DNS server's TCP port");
    let records: std::sync::Arc<Vec<(String, [u8; 4])>> =
        std::sync::Arc::new(records.iter().map(|(n, a)| (n.to_string(), *a)).collect());
    let asked = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let (log, known) = (asked.clone(), records.clone());
    tokio::spawn(async move {
        let mut buf = [0u8; 512];
        while let Ok((n, peer)) = socket.recv_from(&mut buf).await {
            if let Some(a) = dns_answer(&buf[..n], &known, &log, true) {
                let _ = socket.send_to(&a, peer).await;
            }
        }
    });
    let log = asked.clone();
    tokio::spawn(async move {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        while let Ok((mut c, _)) = tcp.accept().await {
            let (known, log) = (records.clone(), log.clone());
            tokio::spawn(async move {
                let Ok(len) = c.read_u16().await else { return };
                let mut q = vec![0u8; len as usize];
                if c.read_exact(&mut q).await.is_err() {
                    return;
                }
                if let Some(a) = dns_answer(&q, &known, &log, false) {
                    let _ = c.write_all(&(a.len() as u16).to_be_bytes()).await;
                    let _ = c.write_all(&a).await;
                }
            });
        }
    });
    Some(asked)
}

/// The test DNS server's answer to the query `q` (see [`dns_server`]).
fn dns_answer(
    q: &[u8],
    records: &[(String, [u8; 4])],
    log: &std::sync::Mutex<Vec<String>>,
    udp: bool,
) -> Option<Vec<u8>> {
    // The question name, label by label.
    let (mut i, mut labels) = (12, Vec::new());
    while i < q.len() && q[i] != 0 {
        let len = q[i] as usize;
        labels.push(String::from_utf8_lossy(&q[i + 1..(i + 1 + len).min(q.len())]).into_owned());
        i += 1 + len;
    }
    if i + 5 > q.len() {
        return None;
    }
    let qtype = u16::from_be_bytes([q[i + 1], q[i + 2]]);
    let name = labels.join(".");
    log.lock().unwrap().push(name.clone());
    if name.starts_with("garbage.") {
        return Some(vec![q[0], q[1], 0x81, 0x80, 0, 1, 0, 9, 0xde, 0xad]);
    }
    let mut a = q[..i + 5].to_vec();
    a[2] = 0x81;
    a[3] = 0x80;
    if udp && name.starts_with("big.") {
        a[2] |= 0x02;
        return Some(a);
    }
    let found = records.iter().find(|(n, _)| *n == name).map(|(_, ip)| *ip);
    let found = found.or_else(|| name.starts_with("big.").then_some([10, 99, 0, 99]));
    match found {
        Some(ip) if qtype == 1 => {
            a[7] = 1;
            a.extend_from_slice(&[0xc0, 12, 0, 1, 0, 1, 0, 0, 0, 30, 0, 4]);
            a.extend_from_slice(&ip);
        }
        Some(_) => {}
        None => a[3] = 0x83, // NXDOMAIN
    }
    Some(a)
}
