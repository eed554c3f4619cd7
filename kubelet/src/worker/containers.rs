//! Containers: their CRI config, start with the postStart hook, hooks, kills (preStop and
//! the grace period), and the removal of a deleted pod.

use std::collections::HashMap;
use std::time::Duration;

use tokio::time::Instant;

use cri_proto::v1 as cri;
use k8s_openapi::api::core::v1::{Container, LifecycleHandler};

use super::Worker;
use crate::actions::Start;
use crate::clock;
use crate::cri as kcri;
use crate::env::{self, EnvSources};
use crate::events::Kind;
use crate::model::{self, Instance, Observed, State, SyncError, is_sidecar};
use crate::prober::{self, Target};
use crate::quantity::Quantity;
use crate::status;
use crate::volumes;

impl Worker {
    /// The container's CRI config (CreateContainerConfigError on failure).
    pub(super) fn container_config(
        &self,
        c: &Container,
        restart_count: i32,
        image_ref: &str,
    ) -> Result<cri::ContainerConfig, String> {
        let ns = self.ns().to_string();
        let objects = self.node.objects.clone();
        let cms = |n: &str| objects.config_map(&ns, n);
        let secrets = |n: &str| objects.secret(&ns, n);
        let (pod_ips, host_ips) = self.ips();
        let links = model::spec(&self.pod).enable_service_links != Some(false);
        let services = env::service_env(&objects.services(), &ns, links);
        let envs = env::build(
            c,
            &EnvSources {
                pod: &self.pod,
                pod_ips: &pod_ips,
                host_ips: &host_ips,
                node_name: &self.node.node_name,
                allocatable_cpu: self.node.allocatable_cpu,
                allocatable_memory: self.node.allocatable_memory,
                config_maps: &cms,
                secrets: &secrets,
                services: &services,
            },
        )
        .map_err(|e| e.0)?;
        let command = env::expand_all(c.command.as_deref().unwrap_or_default(), &envs);
        let args = env::expand_all(c.args.as_deref().unwrap_or_default(), &envs);
        let pod_dir = self.node.pod_dir(&self.uid);
        let spec = model::spec(&self.pod);
        let mut mounts = Vec::new();
        for m in c.volume_mounts.iter().flatten() {
            let v = spec
                .volumes
                .iter()
                .flatten()
                .find(|v| v.name == m.name)
                .ok_or_else(|| format!("cannot find volume {:?} to mount into container {:?}", m.name, c.name))?;
            // Set up earlier in this sync: only where it lives is needed here.
            let ready = volumes::location(&pod_dir, v);
            let mut host = ready.host_path.clone();
            let sub = match (&m.sub_path, &m.sub_path_expr) {
                (Some(s), _) if !s.is_empty() => Some(s.clone()),
                (_, Some(e)) if !e.is_empty() => {
                    let lookup = |n: &str| envs.iter().find(|(k, _)| k == n).map(|(_, v)| v.clone());
                    let expanded = env::expand(e, &lookup);
                    if expanded.contains("$(") {
                        return Err(format!("failed to prepare subPath for volumeMount {:?}: missing value", m.name));
                    }
                    Some(expanded)
                }
                _ => None,
            };
            if let Some(sub) = sub {
                volumes::check_relative(&sub).map_err(|e| format!("subPath {e}"))?;
                host = host.join(&sub);
                if !host.exists() {
                    std::fs::create_dir_all(&host).map_err(|e| format!("create subPath {}: {e}", host.display()))?;
                }
            }
            mounts.push(cri::Mount {
                container_path: m.mount_path.clone(),
                host_path: host.display().to_string(),
                readonly: m.read_only == Some(true) || ready.read_only,
                ..Default::default()
            });
        }
        if !mounts.iter().any(|m| m.container_path == "/etc/hosts") {
            let hosts = pod_dir.join("etc-hosts");
            if hosts.exists() {
                mounts.push(cri::Mount {
                    container_path: "/etc/hosts".into(),
                    host_path: hosts.display().to_string(),
                    ..Default::default()
                });
            }
        }
        let termination_path = c.termination_message_path.clone().unwrap_or_else(|| "/dev/termination-log".into());
        let mut annotations: HashMap<String, String> = HashMap::new();
        if !termination_path.is_empty() {
            let dir = pod_dir.join("containers").join(&c.name);
            std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
            let file = dir.join(format!("{:08x}", rand::random::<u32>()));
            std::fs::write(&file, b"").map_err(|e| e.to_string())?;
            use std::os::unix::fs::PermissionsExt;
            let _ = std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o666));
            mounts.push(cri::Mount {
                container_path: termination_path.clone(),
                host_path: file.display().to_string(),
                ..Default::default()
            });
            annotations.insert(kcri::TERMINATION_MESSAGE_PATH.into(), termination_path);
        }
        annotations.insert(
            "io.kubernetes.container.terminationMessagePolicy".into(),
            c.termination_message_policy.clone().unwrap_or_else(|| "File".into()),
        );
        annotations.insert(kcri::CONTAINER_HASH.into(), model::container_hash(c));
        annotations.insert(kcri::RESTART_COUNT.into(), restart_count.to_string());
        annotations.insert("io.kubernetes.pod.terminationGracePeriod".into(), self.grace().to_string());
        let labels: HashMap<String, String> = [
            (kcri::CONTAINER_NAME.to_string(), c.name.clone()),
            (kcri::POD_NAME.to_string(), self.name().to_string()),
            (kcri::POD_NAMESPACE.to_string(), self.ns().to_string()),
            (kcri::POD_UID.to_string(), self.uid.clone()),
        ]
        .into();
        let limits = c.resources.as_ref().and_then(|r| r.limits.as_ref());
        let limit = |k: &str| limits.and_then(|l| l.get(k)).and_then(|q| Quantity::parse(&q.0).ok());
        let requests = c.resources.as_ref().and_then(|r| r.requests.as_ref());
        let request = |k: &str| requests.and_then(|l| l.get(k)).and_then(|q| Quantity::parse(&q.0).ok());
        let memory = limit("memory").map_or(0, |q| q.ceil_units() as i64);
        // As the kubelet's milliCPUToQuota: millicores of the 100 ms period, at least 1 ms.
        let cpu_quota = limit("cpu").map_or(0, |q| (q.ceil_millis() as i64 * 100).max(1000));
        // As milliCPUToShares: the request (the API server defaults it to the limit), 2 at
        // the least (BestEffort).
        let cpu_millis = request("cpu").or_else(|| limit("cpu")).map_or(0, |q| q.ceil_millis() as i64);
        let cpu_shares = (cpu_millis * 1024 / 1000).clamp(2, 262_144);
        Ok(cri::ContainerConfig {
            metadata: Some(cri::ContainerMetadata { name: c.name.clone(), attempt: restart_count as u32 }),
            image: Some(cri::ImageSpec {
                image: image_ref.to_string(),
                user_specified_image: c.image.clone().unwrap_or_default(),
                ..Default::default()
            }),
            command,
            args,
            working_dir: c.working_dir.clone().unwrap_or_default(),
            envs: envs.into_iter().map(|(key, value)| cri::KeyValue { key, value }).collect(),
            mounts,
            labels,
            annotations,
            log_path: format!("{}/{restart_count}.log", c.name),
            stdin: c.stdin == Some(true),
            stdin_once: c.stdin_once == Some(true),
            tty: c.tty == Some(true),
            linux: Some(cri::LinuxContainerConfig {
                resources: Some(cri::LinuxContainerResources {
                    memory_limit_in_bytes: memory,
                    cpu_period: if cpu_quota > 0 { 100_000 } else { 0 },
                    cpu_quota,
                    cpu_shares,
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        })
    }

    /// Creates and starts one container, then runs its postStart hook.
    pub(super) async fn start(&mut self, s: &Start, sandbox_id: &str) -> Result<(), SyncError> {
        let Some(c) = self.container(&s.name) else { return Ok(()) };
        let image_ref = self.ensure_image(&c).await?;
        let config = match self.container_config(&c, s.restart_count, &image_ref) {
            Ok(c) => c,
            Err(message) => {
                self.event(Some(&c.name), Kind::Warning, "Failed", format!("Error: {message}"));
                return Err(SyncError { reason: "CreateContainerConfigError".into(), message });
            }
        };
        let (sandbox_config, _) = self.sandbox_config(0);
        let id = match self.node.cri.create_container(sandbox_id, config, sandbox_config).await {
            Ok(id) => id,
            Err(st) => {
                let message = st.message().to_string();
                self.event(Some(&c.name), Kind::Warning, "Failed", format!("Error: {message}"));
                return Err(SyncError { reason: "CreateContainerError".into(), message });
            }
        };
        self.event(Some(&c.name), Kind::Normal, "Created", format!("Created container: {}", c.name));
        if let Err(st) = self.node.cri.start_container(&id).await {
            let message = st.message().to_string();
            self.event(Some(&c.name), Kind::Warning, "Failed", format!("Error: {message}"));
            return Err(SyncError { reason: "RunContainerError".into(), message });
        }
        self.event(Some(&c.name), Kind::Normal, "Started", format!("Started container {}", c.name));
        let kind = if super::field_path(&self.pod, &c.name).starts_with("spec.initContainers") {
            "init_container"
        } else {
            "container"
        };
        crate::metrics::inc(&crate::metrics::STARTED_CONTAINERS, &[("container_type", kind)]);
        self.ensure_probes(&c);
        if let Some(hook) = c.lifecycle.as_ref().and_then(|l| l.post_start.clone()) {
            let target = Target { net: self.net.clone(), container_id: id.clone() };
            if let Err(e) = self.run_hook(&hook, &c, &target, None).await {
                tracing::info!(pod = %self.name(), container = %c.name, error = %e, "postStart hook failed");
                self.event(Some(&c.name), Kind::Warning, "FailedPostStartHook", "PostStartHook failed".into());
                self.event(Some(&c.name), Kind::Normal, "Killing", "FailedPostStartHook".into());
                let _ = self.node.cri.stop_container(&id, self.grace().max(2)).await;
                return Err(SyncError { reason: "PostStartHookError".into(), message: e });
            }
        }
        Ok(())
    }

    /// Runs a lifecycle handler: exec (no timeout of its own), httpGet (any response is
    /// success), sleep; tcpSocket is refused as the kubelet does.
    pub(super) async fn run_hook(
        &self,
        h: &LifecycleHandler,
        c: &Container,
        target: &Target,
        limit: Option<Duration>,
    ) -> Result<(), String> {
        let limit = limit.unwrap_or(Duration::from_secs(3600));
        if let Some(e) = &h.exec {
            let cmd = e.command.clone().unwrap_or_default();
            let r = self
                .node
                .cri
                .exec_sync(&target.container_id, cmd.clone(), limit)
                .await
                .map_err(|s| s.message().to_string())?;
            if r.exit_code != 0 {
                let mut out = r.stdout;
                out.extend_from_slice(&r.stderr);
                return Err(format!(
                    "command {cmd:?} exited with {}: {}",
                    r.exit_code,
                    String::from_utf8_lossy(&out[..out.len().min(prober::MAX_OUTPUT)])
                ));
            }
            return Ok(());
        }
        if let Some(g) = &h.http_get {
            if let Some(fallback) = prober::http_hook(target, g, c, limit).await? {
                self.event(Some(&c.name), Kind::Warning, "LifecycleHTTPFallback", fallback);
            }
            return Ok(());
        }
        if let Some(s) = &h.sleep {
            tokio::time::sleep(Duration::from_secs(s.seconds.max(0) as u64).min(limit)).await;
            return Ok(());
        }
        if h.tcp_socket.is_some() {
            return Err("invalid handler: tcpSocket is not supported for lifecycle hooks".into());
        }
        Err("invalid handler: no action".into())
    }

    /// Stops one container: Killing event, preStop within the grace period, then StopContainer
    /// with what is left (at least 2 s).
    pub(super) async fn kill_container(&self, i: &Instance, message: Option<&str>, grace: i64) {
        if i.state != State::Running && i.state != State::Unknown && i.state != State::Created {
            return;
        }
        let message = message.map_or_else(|| format!("Stopping container {}", i.name), str::to_string);
        self.event(Some(&i.name), Kind::Normal, "Killing", message);
        let mut grace = grace;
        let pre_stop = self.container(&i.name).and_then(|c| Some((c.lifecycle.clone()?.pre_stop?, c)));
        if let Some((hook, c)) = pre_stop
            && grace > 0
            && i.state == State::Running
        {
            let t0 = Instant::now();
            let target = Target { net: self.net.clone(), container_id: i.id.clone() };
            let limit = Duration::from_secs(grace as u64);
            match tokio::time::timeout(limit, self.run_hook(&hook, &c, &target, Some(limit))).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    tracing::info!(pod = %self.name(), container = %i.name, error = %e, "preStop hook failed");
                    self.event(Some(&i.name), Kind::Warning, "FailedPreStopHook", "PreStopHook failed".into());
                }
                Err(_) => {
                    tracing::info!(pod = %self.name(), container = %i.name, "preStop hook did not finish within the grace period");
                }
            }
            grace -= t0.elapsed().as_secs() as i64;
        }
        if let Err(e) = self.node.cri.stop_container(&i.id, grace.max(2)).await {
            tracing::warn!(pod = %self.name(), container = %i.name, error = %e, "StopContainer");
        }
    }

    /// Stops every container: app (and regular init) containers in parallel, then sidecars in
    /// reverse order.
    pub(super) async fn kill_all(&self, observed: &Observed, grace: i64) {
        let spec = model::spec(&self.pod);
        let sidecars: Vec<&Container> = spec.init_containers.iter().flatten().filter(|c| is_sidecar(c)).collect();
        let running: Vec<&Instance> = observed.instances.iter().filter(|i| i.state == State::Running).collect();
        let first: Vec<_> = running
            .iter()
            .filter(|i| !sidecars.iter().any(|s| s.name == i.name))
            .map(|i| self.kill_container(i, None, grace))
            .collect();
        futures_util::future::join_all(first).await;
        for s in sidecars.iter().rev() {
            if let Some(i) = running.iter().find(|i| i.name == s.name) {
                self.kill_container(i, None, grace).await;
            }
        }
    }

    /// Ends the pod: stops probes that must stop, kills everything, stops the sandbox. The pod
    /// keeps its status; nothing restarts.
    pub(super) async fn terminate(&mut self, observed: &Observed, grace: i64, deleting: bool) {
        self.terminal = true;
        if deleting {
            self.pod.metadata.deletion_timestamp = Some(status::time(clock::now()));
            self.pod.metadata.deletion_grace_period_seconds = Some(grace);
            self.update_views(observed);
        }
        self.kill_all(observed, grace).await;
        if let Some(s) = &observed.sandbox {
            let _ = self.node.cri.stop_sandbox(&s.id).await;
        }
        for (_, t) in self.probe_tasks.drain() {
            t.abort();
        }
    }

    /// Removes the pod's volumes (an evicted pod's emptyDirs: the space is what eviction
    /// reclaims); its logs stay for `kubectl logs`.
    pub(super) fn remove_volumes(&self) {
        let _ = std::fs::remove_dir_all(self.node.pod_dir(&self.uid).join("volumes"));
        let _ = std::fs::remove_dir_all(self.node.memory_dir(&self.uid));
    }

    /// Removes the pod's containers, sandboxes and files (after deletion).
    pub(super) async fn remove(&mut self, observed: &Observed) {
        for i in &observed.instances {
            let _ = self.node.cri.remove_container(&i.id).await;
        }
        if let Ok(list) = self.node.cri.sandboxes(Some(&self.uid)).await {
            for s in list {
                let _ = self.node.cri.stop_sandbox(&s.id).await;
                let _ = self.node.cri.remove_sandbox(&s.id).await;
            }
        }
        let _ = std::fs::remove_dir_all(self.node.pod_dir(&self.uid));
        let _ = std::fs::remove_dir_all(self.node.memory_dir(&self.uid));
    }
}
