//! A real Kubernetes control plane for the node tests: etcd, kube-apiserver (TLS, the Node
//! authorizer, RBAC and NodeRestriction), kube-controller-manager (with the CSR signer) and
//! kube-scheduler from ../shared/k8s, on loopback, with certificates made by `openssl`. One
//! control plane serves every test of a test binary (each in a namespace and on a node of its
//! own); its processes end with the test process.
//!
//! The binaries come from `$WASMLET_K8S_BIN`, else `target/k8s` (where `scripts/test`
//! unpacks them with ../shared/k8s/install.sh). Without them the tests are skipped with a
//! line that says so, except under CI (`CI` set), where that is a failure.

use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde_json::Value;

/// Where the Kubernetes binaries are, if they are there.
pub fn k8s_bin() -> Option<PathBuf> {
    let dir = std::env::var_os("WASMLET_K8S_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("workspace").join("target/k8s"));
    dir.join("kube-apiserver").exists().then_some(dir)
}

/// Runs `openssl ARGS` in `dir`: its standard output, or an error with its stderr if it fails.
pub fn openssl(dir: &Path, args: &[&str]) -> Result<String> {
    let out = Command::new("openssl").args(args).current_dir(dir).output().context("run openssl")?;
    if !out.status.success() {
        bail!("openssl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// A Service `name` (port 80 to the pods' port named http, selecting app=`name`) and a client
/// pod `client` of the `net:1` image on `node`, idle until exec'd into: the manifests of the
/// Services test and benchmark.
pub fn service_and_client(name: &str, node: &str) -> String {
    format!(
        r#"apiVersion: v1
kind: Service
metadata: {{name: {name}}}
spec:
  selector: {{app: {name}}}
  ports: [{{name: http, port: 80, targetPort: http}}]
---
apiVersion: v1
kind: Pod
metadata: {{name: client}}
spec:
  runtimeClassName: wasmlet
  nodeName: {node}
  containers: [{{name: c, image: net:1, args: [serve, "9000"]}}]
"#
    )
}

/// A self-signed certificate for `subject`, valid `days`, with its key: `key` and `crt` in `dir`.
pub fn self_signed(dir: &Path, subject: &str, days: u32, key: &str, crt: &str) -> Result<()> {
    let days = days.to_string();
    let args = ["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", &days, "-subj", subject];
    openssl(dir, &[&args[..], &["-keyout", key, "-out", crt]].concat())?;
    Ok(())
}

/// How long the controller-manager's signer makes certificates valid.
pub const SIGNING_DURATION: Duration = Duration::from_secs(180);

/// A key and a certificate signed by the CA `ca.crt`/`ca.key` in `dir`: `NAME.key`, `NAME.crt`;
/// a server's (and a client's) with `server_names` (subjectAltName syntax), else a client's.
pub fn certificate(dir: &Path, name: &str, subject: &str, server_names: Option<&str>) -> Result<()> {
    let (key, csr, crt, ext) =
        (format!("{name}.key"), format!("{name}.csr"), format!("{name}.crt"), format!("{name}.ext"));
    openssl(dir, &["req", "-newkey", "rsa:2048", "-nodes", "-subj", subject, "-keyout", &key, "-out", &csr])?;
    let extensions = match server_names {
        Some(sans) => format!("subjectAltName={sans}\nextendedKeyUsage=serverAuth,clientAuth\n"),
        None => "extendedKeyUsage=clientAuth\n".to_string(),
    };
    std::fs::write(dir.join(&ext), extensions)?;
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            &csr,
            "-CA",
            "ca.crt",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-days",
            "2",
            "-extfile",
            &ext,
            "-out",
            &crt,
        ],
    )?;
    Ok(())
}

/// A kubeconfig for the API server at `port` with the client certificate `NAME.crt`.
fn kubeconfig(dir: &Path, name: &str, port: u16) -> Result<PathBuf> {
    let d = dir.display();
    let text = format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: test\n  cluster: {{server: \"https://127.0.0.1:{port}\", certificate-authority: {d}/ca.crt}}\nusers:\n- name: user\n  user: {{client-certificate: {d}/{name}.crt, client-key: {d}/{name}.key}}\ncontexts:\n- name: test\n  context: {{cluster: test, user: user}}\ncurrent-context: test\n"
    );
    let path = dir.join(format!("{name}.kubeconfig"));
    std::fs::write(&path, text)?;
    Ok(path)
}

/// A process that ends when the test process does: a shell watches this process's pid and
/// kills the child when it is gone (statics are never dropped).
fn supervised(program: &Path, args: &[String], log: &Path) -> Result<Child> {
    let out = std::fs::File::create(log)?;
    let script = "\"$@\" & c=$!; while kill -0 \"$WATCH\" 2>/dev/null && kill -0 $c 2>/dev/null; do sleep 0.5; done; kill $c 2>/dev/null; wait $c";
    Command::new("bash")
        .arg("-c")
        .arg(script)
        .arg("supervised")
        .arg(program)
        .args(args)
        .env("WATCH", std::process::id().to_string())
        .stdin(Stdio::null())
        .stdout(out.try_clone()?)
        .stderr(out)
        .spawn()
        .with_context(|| format!("start {}", program.display()))
}

/// The running control plane.
pub struct ControlPlane {
    pub dir: PathBuf,
    pub bin: PathBuf,
    pub port: u16,
    /// The admin's kubeconfig (group system:masters).
    pub admin: PathBuf,
    _procs: Vec<Child>,
    _tmp: tempfile::TempDir,
}

/// The node-lifecycle controller's grace period on the test control plane.
pub const NODE_MONITOR_GRACE: Duration = Duration::from_secs(20);

static SHARED: OnceLock<Option<ControlPlane>> = OnceLock::new();

impl ControlPlane {
    /// The control plane of this test binary, started on first use; None (with a line that
    /// says why) when the binaries are missing outside CI.
    pub fn shared() -> Option<&'static ControlPlane> {
        SHARED
            .get_or_init(|| {
                let Some(bin) = k8s_bin() else {
                    if std::env::var_os("CI").is_some() {
                        panic!(
                            "the Kubernetes binaries are missing: scripts/test unpacks them from ../shared/k8s (bash ../shared/k8s/install.sh target/k8s), or set WASMLET_K8S_BIN=DIR"
                        );
                    }
                    eprintln!(
                        "skipped: no Kubernetes binaries (unpack them with `bash ../shared/k8s/install.sh target/k8s`, or set WASMLET_K8S_BIN=DIR)"
                    );
                    return None;
                };
                Some(ControlPlane::start(bin).expect("start the control plane"))
            })
            .as_ref()
    }

    fn start(bin: PathBuf) -> Result<ControlPlane> {
        let tmp = tempfile::tempdir()?;
        let dir = tmp.path().to_path_buf();
        self_signed(&dir, "/CN=wasmlet-test-ca", 2, "ca.key", "ca.crt")?;
        certificate(
            &dir,
            "apiserver",
            "/CN=kube-apiserver",
            Some("IP:127.0.0.1,IP:10.96.0.1,DNS:localhost,DNS:kubernetes.default.svc"),
        )?;
        certificate(&dir, "admin", "/O=system:masters/CN=admin", None)?;
        certificate(&dir, "controller-manager", "/CN=system:kube-controller-manager", None)?;
        certificate(&dir, "scheduler", "/CN=system:kube-scheduler", None)?;
        certificate(&dir, "apiserver-kubelet-client", "/O=system:masters/CN=kube-apiserver-kubelet-client", None)?;
        openssl(&dir, &["genrsa", "-out", "sa.key", "2048"])?;
        openssl(&dir, &["rsa", "-in", "sa.key", "-pubout", "-out", "sa.pub"])?;
        let free = crate::free_port;
        let (etcd_client, etcd_peer, port) = (free(), free(), free());
        let d = |f: &str| dir.join(f).display().to_string();
        let mut procs = Vec::new();
        let etcd = which("etcd").context("etcd is missing (apt-get install etcd-server)")?;
        procs.push(supervised(
            &etcd,
            &[
                format!("--data-dir={}", d("etcd")),
                format!("--listen-client-urls=http://127.0.0.1:{etcd_client}"),
                format!("--advertise-client-urls=http://127.0.0.1:{etcd_client}"),
                format!("--listen-peer-urls=http://127.0.0.1:{etcd_peer}"),
                format!("--initial-advertise-peer-urls=http://127.0.0.1:{etcd_peer}"),
                format!("--initial-cluster=default=http://127.0.0.1:{etcd_peer}"),
                "--unsafe-no-fsync".into(),
            ],
            &dir.join("etcd.log"),
        )?);
        procs.push(supervised(
            &bin.join("kube-apiserver"),
            &[
                format!("--etcd-servers=http://127.0.0.1:{etcd_client}"),
                format!("--secure-port={port}"),
                "--bind-address=127.0.0.1".into(),
                "--advertise-address=127.0.0.1".into(),
                format!("--tls-cert-file={}", d("apiserver.crt")),
                format!("--tls-private-key-file={}", d("apiserver.key")),
                format!("--client-ca-file={}", d("ca.crt")),
                format!("--service-account-key-file={}", d("sa.pub")),
                format!("--service-account-signing-key-file={}", d("sa.key")),
                "--service-account-issuer=https://kubernetes.default.svc".into(),
                "--service-cluster-ip-range=10.96.0.0/16".into(),
                "--authorization-mode=Node,RBAC".into(),
                "--enable-admission-plugins=NodeRestriction".into(),
                "--enable-bootstrap-token-auth".into(),
                format!("--kubelet-client-certificate={}", d("apiserver-kubelet-client.crt")),
                format!("--kubelet-client-key={}", d("apiserver-kubelet-client.key")),
                format!("--kubelet-certificate-authority={}", d("ca.crt")),
                // The nodes here are all 127.0.0.1; their host names resolve nowhere.
                "--kubelet-preferred-address-types=InternalIP".into(),
            ],
            &dir.join("apiserver.log"),
        )?);
        let admin = kubeconfig(&dir, "admin", port)?;
        let cp = ControlPlane { dir: dir.clone(), bin: bin.clone(), port, admin, _procs: Vec::new(), _tmp: tmp };
        cp.wait_ready(Duration::from_secs(60)).context("the API server did not become ready")?;
        let kcm = kubeconfig(&dir, "controller-manager", port)?.display().to_string();
        procs.push(supervised(
            &bin.join("kube-controller-manager"),
            &[
                format!("--kubeconfig={kcm}"),
                format!("--authentication-kubeconfig={kcm}"),
                format!("--authorization-kubeconfig={kcm}"),
                "--leader-elect=false".into(),
                "--bind-address=127.0.0.1".into(),
                "--secure-port=0".into(),
                format!("--service-account-private-key-file={}", d("sa.key")),
                format!("--root-ca-file={}", d("ca.crt")),
                "--use-service-account-credentials=true".into(),
                format!("--cluster-signing-cert-file={}", d("ca.crt")),
                format!("--cluster-signing-key-file={}", d("ca.key")),
                // Short-lived node certificates (only TLS bootstrapping's are signed here), so
                // that rotation is seen: valid 3 min (+5 min backdated), rotated 1-2 min in.
                format!("--cluster-signing-duration={}s", SIGNING_DURATION.as_secs()),
                "--controllers=*,bootstrapsigner,tokencleaner".into(),
                format!("--node-monitor-grace-period={}s", NODE_MONITOR_GRACE.as_secs()),
                "--node-monitor-period=2s".into(),
            ],
            &dir.join("controller-manager.log"),
        )?);
        let sched = kubeconfig(&dir, "scheduler", port)?.display().to_string();
        procs.push(supervised(
            &bin.join("kube-scheduler"),
            &[
                format!("--kubeconfig={sched}"),
                format!("--authentication-kubeconfig={sched}"),
                format!("--authorization-kubeconfig={sched}"),
                "--leader-elect=false".into(),
                "--bind-address=127.0.0.1".into(),
                "--secure-port=0".into(),
            ],
            &dir.join("scheduler.log"),
        )?);
        let mut cp = cp;
        cp._procs = procs;
        cp.kubectl_ok(&["apply", "-f", &crate::examples_dir().join("runtimeclass.yaml").display().to_string()])?;
        // The default service account appears once the controller-manager runs.
        cp.wait("the default service account", Duration::from_secs(60), || {
            Ok(cp.kubectl(&["get", "serviceaccount", "default", "-n", "default"])?.status.success())
        })?;
        Ok(cp)
    }

    fn wait_ready(&self, limit: Duration) -> Result<()> {
        self.wait("the API server", limit, || Ok(self.kubectl(&["get", "--raw", "/readyz"])?.status.success()))
    }

    /// Polls `check` every 200 ms until it holds, or fails naming `what`.
    pub fn wait(&self, what: &str, limit: Duration, mut check: impl FnMut() -> Result<bool>) -> Result<()> {
        let deadline = Instant::now() + limit;
        loop {
            if check()? {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("{what}: not within {limit:?}");
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// `kubectl` as the admin.
    pub fn kubectl(&self, args: &[&str]) -> Result<Output> {
        Command::new(self.bin.join("kubectl"))
            .arg("--kubeconfig")
            .arg(&self.admin)
            .args(args)
            .output()
            .context("run kubectl")
    }

    /// `kubectl` as the admin; its stdout, or an error with its stderr.
    pub fn kubectl_ok(&self, args: &[&str]) -> Result<String> {
        let out = self.kubectl(args)?;
        if !out.status.success() {
            bail!("kubectl {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr));
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// `kubectl ... -o json`, parsed.
    pub fn get_json(&self, args: &[&str]) -> Result<Value> {
        let mut all: Vec<&str> = args.to_vec();
        all.extend(["-o", "json"]);
        Ok(serde_json::from_str(&self.kubectl_ok(&all)?)?)
    }

    /// `kubectl get ... -o json`, parsed; None when the object is not there.
    pub fn get_opt_json(&self, args: &[&str]) -> Result<Option<Value>> {
        let mut all: Vec<&str> = args.to_vec();
        all.extend(["-o", "json"]);
        let out = self.kubectl(&all)?;
        if !out.status.success() {
            return Ok(None);
        }
        Ok(Some(serde_json::from_slice(&out.stdout)?))
    }

    /// Applies a manifest given as text.
    pub fn apply(&self, namespace: &str, manifest: &str) -> Result<()> {
        let mut child = Command::new(self.bin.join("kubectl"))
            .arg("--kubeconfig")
            .arg(&self.admin)
            .args(["apply", "-n", namespace, "-f", "-"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()?;
        use std::io::Write;
        child.stdin.take().expect("stdin").write_all(manifest.as_bytes())?;
        let out = child.wait_with_output()?;
        if !out.status.success() {
            bail!("kubectl apply: {}\n{manifest}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(())
    }

    /// Gives nodes kube-proxy's read rights (Services, EndpointSlices), which a wasmlet node
    /// needs to route Services.
    pub fn grant_node_proxier(&self) -> Result<()> {
        let args = ["create", "clusterrolebinding", "wasmlet-node-proxier", "--clusterrole=system:node-proxier"];
        let out = self.kubectl(&[&args[..], &["--group=system:nodes"]].concat())?;
        if !out.status.success() && !String::from_utf8_lossy(&out.stderr).contains("AlreadyExists") {
            bail!("grant the node proxier role: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(())
    }

    /// A namespace of the test's own.
    pub fn namespace(&self, name: &str) -> Result<String> {
        self.kubectl_ok(&["create", "namespace", name])?;
        self.wait("the namespace's default service account", Duration::from_secs(30), || {
            Ok(self.kubectl(&["get", "serviceaccount", "default", "-n", name])?.status.success())
        })?;
        Ok(name.to_string())
    }

    /// A kubeconfig with a client certificate for node `name` (user system:node:NAME, group
    /// system:nodes): exactly a kubelet's rights.
    pub fn node_kubeconfig(&self, name: &str) -> Result<PathBuf> {
        certificate(&self.dir, &format!("node-{name}"), &format!("/O=system:nodes/CN=system:node:{name}"), None)?;
        kubeconfig(&self.dir, &format!("node-{name}"), self.port)
    }

    /// A serving certificate from the cluster CA for node `name`, which the API server checks
    /// (--kubelet-certificate-authority): `serving-NAME.crt` and `.key` in `dir`.
    pub fn serving_certificate(&self, name: &str) -> Result<()> {
        certificate(
            &self.dir,
            &format!("serving-{name}"),
            &format!("/CN={name}"),
            Some(&format!("IP:127.0.0.1,IP:{NODE_API_IP},DNS:{name}")),
        )
    }

    /// The CA certificate.
    pub fn ca(&self) -> PathBuf {
        self.dir.join("ca.crt")
    }
}

fn which(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")?.to_str()?.split(':').map(|d| Path::new(d).join(name)).find(|p| p.exists())
}

/// A node address that is not loopback (the API server's node proxy refuses to proxy to
/// loopback), on a bridge of its own on this machine that [`local_address`] makes: traffic to
/// it stays here. Every node's serving certificate names it.
pub const NODE_API_IP: &str = "10.253.0.1";

/// Puts `ip`/32 on a bridge of its own (this kernel has no dummy links); idempotent; needs
/// root, as the cluster tests do.
pub fn local_address(ip: &str) -> Result<()> {
    let run = |args: &[&str]| Command::new("ip").args(args).output().context("run ip");
    let _ = run(&["link", "add", "wasmlet-api0", "type", "bridge"])?;
    for args in
        [vec!["addr", "replace", &format!("{ip}/32"), "dev", "wasmlet-api0"], vec!["link", "set", "wasmlet-api0", "up"]]
    {
        let out = run(&args)?;
        if !out.status.success() {
            bail!("ip {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr));
        }
    }
    Ok(())
}

/// A `wasmlet node` process joined to the control plane, on a root of its own.
pub struct WasmletNode {
    pub name: String,
    pub dir: tempfile::TempDir,
    pub kubeconfig: PathBuf,
    /// The node API's port (a free one: many nodes share this machine).
    pub port: u16,
    /// Its InternalIP (127.0.0.1 unless a test sets another before `spawn`).
    pub ip: String,
    child: Option<Child>,
    /// More `wasmlet node` arguments.
    pub extra: Vec<String>,
    /// Pass the CA-signed serving certificate files (`--tls-cert-file`); off, the node makes
    /// or asks for its own.
    pub serving_files: bool,
    config: String,
}

/// The test's `[node]` config, with disk thresholds no test machine trips unless the test sets
/// its own: the kubelet's defaults (nodefs 10%, imagefs 15% available, image GC from 85% used)
/// would put every node of a machine whose disk is fuller than that under DiskPressure, and
/// have it reject its pods. The memory threshold keeps the kubelet's default (100Mi).
fn disk_neutral(config: &str) -> String {
    let mut extra = String::new();
    if !config.contains("evictionHard") {
        extra.push_str(
            "evictionHard = { \"memory.available\" = \"100Mi\", \"nodefs.available\" = \"1%\", \
             \"nodefs.inodesFree\" = \"1%\", \"imagefs.available\" = \"1%\", \"imagefs.inodesFree\" = \"1%\" }\n",
        );
    }
    if !config.contains("imageGCHighThresholdPercent") {
        extra.push_str("imageGCHighThresholdPercent = 100\nimageGCLowThresholdPercent = 99\n");
    }
    match config.find("[node]\n") {
        Some(i) => {
            let at = i + "[node]\n".len();
            format!("{}{extra}{}", &config[..at], &config[at..])
        }
        None => format!("[node]\n{extra}{config}"),
    }
}

impl WasmletNode {
    /// Imports the images (file, tag) into a fresh root and starts `wasmlet node --kubeconfig`
    /// as node `name`, with `config` as its config file's text (`[node]` settings and more).
    pub fn start(cp: &ControlPlane, name: &str, images: &[(&Path, &str)], config: &str) -> Result<WasmletNode> {
        let mut n = WasmletNode::prepare(cp, name, images, config)?;
        n.spawn()?;
        Ok(n)
    }

    /// The same, without starting the process (`spawn` does).
    pub fn prepare(cp: &ControlPlane, name: &str, images: &[(&Path, &str)], config: &str) -> Result<WasmletNode> {
        let dir = tempfile::tempdir()?;
        let kubeconfig = cp.node_kubeconfig(name)?;
        cp.serving_certificate(name)?;
        for ext in ["crt", "key"] {
            std::fs::copy(cp.dir.join(format!("serving-{name}.{ext}")), dir.path().join(format!("serving.{ext}")))?;
        }
        let port = crate::free_port();
        let n = WasmletNode {
            name: name.into(),
            dir,
            kubeconfig,
            port,
            ip: "127.0.0.1".into(),
            child: None,
            extra: Vec::new(),
            serving_files: true,
            config: config.into(),
        };
        for (file, tag) in images {
            n.import(file, tag)?;
        }
        Ok(n)
    }

    pub fn root(&self) -> PathBuf {
        self.dir.path().join("root")
    }

    /// `wasmlet image import` into the node's root.
    pub fn import(&self, file: &Path, tag: &str) -> Result<()> {
        let out = Command::new(crate::wasmlet_bin())
            .args(["image", "import", &file.display().to_string(), "--tag", tag, "--root"])
            .arg(self.root())
            .output()?;
        if !out.status.success() {
            bail!("import {}: {}", file.display(), String::from_utf8_lossy(&out.stderr));
        }
        Ok(())
    }

    /// (Re)starts the process on the same root.
    pub fn spawn(&mut self) -> Result<()> {
        let config = self.dir.path().join("wasmlet.toml");
        std::fs::write(&config, disk_neutral(&self.config))?;
        let log = std::fs::OpenOptions::new().create(true).append(true).open(self.dir.path().join("wasmlet.log"))?;
        let child = Command::new(crate::wasmlet_bin())
            .arg("node")
            .arg("--kubeconfig")
            .arg(&self.kubeconfig)
            .arg("--hostname-override")
            .arg(&self.name)
            .args(["--node-ip", &self.ip, "--port", &self.port.to_string()])
            .args(if self.serving_files {
                vec![
                    "--tls-cert-file".into(),
                    self.dir.path().join("serving.crt").into_os_string(),
                    "--tls-private-key-file".into(),
                    self.dir.path().join("serving.key").into_os_string(),
                ]
            } else {
                Vec::new()
            })
            .arg("--root")
            .arg(self.root())
            .arg("--config")
            .arg(&config)
            .args(&self.extra)
            .env("WASMLET_LOG", "info")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("spawn wasmlet node")?;
        self.child = Some(child);
        Ok(())
    }

    /// The process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Its log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("wasmlet.log")).unwrap_or_default()
    }

    /// SIGKILL, and wait for it.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM, and wait for it.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = rustix::process::kill_process(
                rustix::process::Pid::from_raw(c.id() as i32).expect("pid"),
                rustix::process::Signal::TERM,
            );
            let _ = c.wait();
        }
    }
}

impl Drop for WasmletNode {
    fn drop(&mut self) {
        self.kill9();
        crate::release_run_dir(&self.run_dir());
    }
}

/// A node condition's status ("True", "False", "Unknown"), if the Node has it.
pub fn node_condition(node: &Value, kind: &str) -> Option<String> {
    node.pointer("/status/conditions")?
        .as_array()?
        .iter()
        .find(|c| c["type"] == kind)
        .and_then(|c| c["status"].as_str())
        .map(str::to_string)
}

impl WasmletNode {
    /// Its run directory (the default for its root).
    pub fn run_dir(&self) -> PathBuf {
        wasmlet_runtime::default_run_dir_for(&self.root(), rustix::process::geteuid().as_raw())
    }

    /// The CRI socket its runtime serves in the run directory.
    pub fn cri_socket(&self) -> Result<PathBuf> {
        std::fs::read_dir(self.run_dir())?
            .flatten()
            .map(|e| e.path())
            .find(|p| p.file_name().is_some_and(|n| n.to_string_lossy().starts_with("kubelet-")))
            .context("no CRI socket in the run directory")
    }

    /// The pod sandboxes its runtime holds (through its CRI socket in the run directory).
    pub fn sandboxes(&self) -> Result<Vec<crate::cri::PodSandbox>> {
        let socket = self.cri_socket()?;
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        rt.block_on(async {
            let mut c = crate::RuntimeClient::new(cri_proto::connect_unix(&socket).await?);
            Ok(c.list_pod_sandbox(crate::cri::ListPodSandboxRequest { filter: None }).await?.into_inner().items)
        })
    }
}

/// A TCP proxy on loopback to the API server: what a node dials when a test must cut it off
/// from the control plane (stop ends every connection at once) and join it again.
pub struct Proxy {
    pub port: u16,
    stop: Arc<AtomicBool>,
    conns: Arc<Mutex<Vec<TcpStream>>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Proxy {
    /// Forwards 127.0.0.1:`port` to 127.0.0.1:`to` until stopped.
    pub fn start(port: u16, to: u16) -> Result<Proxy> {
        let listener = TcpListener::bind(("127.0.0.1", port)).with_context(|| format!("bind the proxy on {port}"))?;
        let stop = Arc::new(AtomicBool::new(false));
        let conns: Arc<Mutex<Vec<TcpStream>>> = Arc::default();
        let (s, c) = (stop.clone(), conns.clone());
        let thread = std::thread::spawn(move || {
            for client in listener.incoming().flatten() {
                if s.load(Ordering::SeqCst) {
                    return;
                }
                let Ok(server) = TcpStream::connect(("127.0.0.1", to)) else { continue };
                let mut held = c.lock().unwrap_or_else(|e| e.into_inner());
                for (from, into) in [(&client, &server), (&server, &client)] {
                    let (Ok(mut from), Ok(mut into)) = (from.try_clone(), into.try_clone()) else { continue };
                    std::thread::spawn(move || {
                        let _ = std::io::copy(&mut from, &mut into);
                        let _ = into.shutdown(Shutdown::Both);
                    });
                }
                held.push(client);
                held.push(server);
            }
        });
        Ok(Proxy { port, stop, conns, thread: Some(thread) })
    }

    /// Stops accepting and ends every connection through it.
    pub fn stop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect(("127.0.0.1", self.port));
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        for c in self.conns.lock().unwrap_or_else(|e| e.into_inner()).drain(..) {
            let _ = c.shutdown(Shutdown::Both);
        }
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.stop();
    }
}

impl WasmletNode {
    /// Points the node's kubeconfig at another port of loopback (a [`Proxy`]).
    pub fn dial_through(&self, cp: &ControlPlane, port: u16) -> Result<()> {
        let text = std::fs::read_to_string(&self.kubeconfig)?
            .replace(&format!("127.0.0.1:{}", cp.port), &format!("127.0.0.1:{port}"));
        std::fs::write(&self.kubeconfig, text)?;
        Ok(())
    }
}

/// The upstream kubelet (../shared/k8s) joined to the control plane as node `name`, driving
/// the CRI runtime at `socket` (a `wasmlet cri`), on a root of its own.
pub struct StockKubelet {
    pub name: String,
    pub dir: tempfile::TempDir,
    /// Its HTTPS port (the API server reaches it at [`NODE_API_IP`]).
    pub port: u16,
    child: Child,
}

impl StockKubelet {
    pub fn start(cp: &ControlPlane, name: &str, socket: &Path) -> Result<StockKubelet> {
        local_address(NODE_API_IP)?;
        let dir = tempfile::tempdir()?;
        let d = dir.path();
        let kubeconfig = cp.node_kubeconfig(name)?;
        cp.serving_certificate(name)?;
        let port = crate::free_port();
        // This machine's cgroup v1, as ../shared/k8s/README.md says; no evictions (the disks
        // of a test machine may be fuller than the kubelet's defaults like).
        let config = format!(
            "apiVersion: kubelet.config.k8s.io/v1beta1\nkind: KubeletConfiguration\n\
             failCgroupV1: false\ncgroupsPerQOS: false\nenforceNodeAllocatable: []\ncgroupDriver: cgroupfs\n\
             failSwapOn: false\naddress: {NODE_API_IP}\nport: {port}\nreadOnlyPort: 0\nhealthzPort: 0\n\
             containerRuntimeEndpoint: unix://{socket}\npodLogsDir: {logs}\n\
             tlsCertFile: {ca_dir}/serving-{name}.crt\ntlsPrivateKeyFile: {ca_dir}/serving-{name}.key\n\
             authentication:\n  anonymous: {{enabled: false}}\n  webhook: {{enabled: true}}\n  x509: {{clientCAFile: {ca}}}\n\
             authorization: {{mode: Webhook}}\n\
             evictionHard: {{memory.available: \"1Ki\", nodefs.available: \"1%\", imagefs.available: \"1%\"}}\n\
             imageGCHighThresholdPercent: 100\nimageGCLowThresholdPercent: 99\n\
             syncFrequency: 5s\nnodeStatusUpdateFrequency: 2s\n",
            socket = socket.display(),
            logs = d.join("pods").display(),
            ca_dir = cp.dir.display(),
            ca = cp.ca().display(),
        );
        std::fs::write(d.join("kubelet.yaml"), config)?;
        let log = std::fs::File::create(d.join("kubelet.log"))?;
        let child = Command::new(cp.bin.join("kubelet"))
            .arg(format!("--config={}", d.join("kubelet.yaml").display()))
            .arg(format!("--kubeconfig={}", kubeconfig.display()))
            .arg(format!("--hostname-override={name}"))
            .arg(format!("--node-ip={NODE_API_IP}"))
            .arg(format!("--root-dir={}", d.join("root").display()))
            .arg(format!("--cert-dir={}", d.join("pki").display()))
            .arg("--v=2")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("start the kubelet")?;
        Ok(StockKubelet { name: name.into(), dir, port, child })
    }

    /// Its log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("kubelet.log")).unwrap_or_default()
    }
}

impl Drop for StockKubelet {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
