//! The CRI as the pod workers use it. [`RuntimeClient`] is the narrow interface they see (one
//! method per thing the kubelet asks a runtime); [`Cri`] implements it over the runtime and
//! image gRPC services, speaking the kubelet's labels and annotations and turning CRI statuses
//! into [`Instance`]s. It works the same over an in-process socket (`wasmlet run`) or a remote
//! runtime; unit tests put a fake in its place.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use futures_util::stream::BoxStream;

use cri::image_service_client::ImageServiceClient;
use cri::runtime_service_client::RuntimeServiceClient;
use cri_proto::v1 as cri;
use tonic::transport::Channel;

use super::metrics;
use super::model::{Instance, Observed, Sandbox, State};

pub const POD_NAME: &str = "io.kubernetes.pod.name";
pub const POD_NAMESPACE: &str = "io.kubernetes.pod.namespace";
pub const POD_UID: &str = "io.kubernetes.pod.uid";
pub const CONTAINER_NAME: &str = "io.kubernetes.container.name";
pub const CONTAINER_HASH: &str = "io.kubernetes.container.hash";
pub const RESTART_COUNT: &str = "io.kubernetes.container.restartCount";
pub const TERMINATION_MESSAGE_PATH: &str = "io.kubernetes.container.terminationMessagePath";

/// What the kubelet side asks of a container runtime. Errors are the CRI's gRPC statuses.
#[async_trait::async_trait]
pub trait RuntimeClient: Send + Sync {
    /// Every sandbox and container of the pod with this UID (the newest sandbox only).
    async fn observe(&self, uid: &str) -> Result<Observed, tonic::Status>;
    /// The sandbox's IP and network namespace.
    async fn sandbox_network(&self, id: &str) -> Result<SandboxNetwork, tonic::Status>;
    /// The sandboxes of the pod with this UID, or every sandbox.
    async fn sandboxes(&self, uid: Option<&str>) -> Result<Vec<cri::PodSandbox>, tonic::Status>;
    /// Runs a sandbox; its ID.
    async fn run_sandbox(&self, config: cri::PodSandboxConfig) -> Result<String, tonic::Status>;
    async fn stop_sandbox(&self, id: &str) -> Result<(), tonic::Status>;
    async fn remove_sandbox(&self, id: &str) -> Result<(), tonic::Status>;
    /// Creates a container in the sandbox; its ID.
    async fn create_container(
        &self,
        sandbox_id: &str,
        config: cri::ContainerConfig,
        sandbox: cri::PodSandboxConfig,
    ) -> Result<String, tonic::Status>;
    async fn start_container(&self, id: &str) -> Result<(), tonic::Status>;
    /// Stops the container, giving it `grace` seconds.
    async fn stop_container(&self, id: &str, grace: i64) -> Result<(), tonic::Status>;
    async fn remove_container(&self, id: &str) -> Result<(), tonic::Status>;
    async fn exec_sync(
        &self,
        id: &str,
        cmd: Vec<String>,
        timeout: Duration,
    ) -> Result<cri::ExecSyncResponse, tonic::Status>;
    /// Pulls the image; its reference.
    async fn pull(
        &self,
        image: &str,
        auth: Option<cri::AuthConfig>,
        sandbox: Option<cri::PodSandboxConfig>,
    ) -> Result<String, tonic::Status>;
    /// The image's ID and size if the runtime has it.
    async fn image_status(&self, image: &str) -> Result<Option<(String, u64)>, tonic::Status>;
    /// Why the runtime is not ready, worded as the kubelet's Ready condition words it; None
    /// when it reports RuntimeReady and NetworkReady.
    async fn readiness_problem(&self) -> Option<String>;
    /// The IDs of the sandboxes whose containers change, as the runtime reports them; ends
    /// when the runtime's event stream does.
    async fn sandbox_events(&self) -> Result<BoxStream<'static, String>, tonic::Status>;
    /// Every container's stats (ListContainerStats).
    async fn container_stats(&self) -> Result<Vec<cri::ContainerStats>, tonic::Status>;
    /// Every image the runtime has (ListImages).
    async fn images(&self) -> Result<Vec<crate::imagegc::Image>, tonic::Status>;
    /// The IDs of the images of every container the runtime has, running or not.
    async fn images_in_use(&self) -> Result<std::collections::HashSet<String>, tonic::Status>;
    async fn remove_image(&self, id: &str) -> Result<(), tonic::Status>;
}

/// The runtime as the pod workers share it.
pub type Runtime = Arc<dyn RuntimeClient>;

/// A CRI client (runtime and image services on one channel).
#[derive(Clone)]
pub struct Cri {
    pub rt: RuntimeServiceClient<Timed>,
    pub img: ImageServiceClient<Timed>,
}

/// A channel to the runtime that times every CRI call into the kubelet's runtime operation
/// metrics (kubelet_runtime_operations_*), whichever part of the kubelet makes it.
#[derive(Clone)]
pub struct Timed(Channel);

type Call = http::Request<tonic::body::Body>;

impl tower::Service<Call> for Timed {
    type Response = <Channel as tower::Service<Call>>::Response;
    type Error = <Channel as tower::Service<Call>>::Error;
    type Future = std::pin::Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut std::task::Context<'_>) -> std::task::Poll<Result<(), Self::Error>> {
        self.0.poll_ready(cx)
    }

    fn call(&mut self, req: Call) -> Self::Future {
        let op = metrics::operation_type(req.uri().path());
        let started = std::time::Instant::now();
        let call = self.0.call(req);
        Box::pin(async move {
            let r = call.await;
            // A failed unary call answers with its grpc-status in the headers.
            let failed = match &r {
                Ok(resp) => resp.headers().get("grpc-status").is_some_and(|s| s != "0"),
                Err(_) => true,
            };
            let l = [("operation_type", op.as_str())];
            metrics::inc(&metrics::RUNTIME_OPERATIONS, &l);
            metrics::observe(&metrics::RUNTIME_OPERATIONS_DURATION, &l, started.elapsed());
            if failed {
                metrics::inc(&metrics::RUNTIME_OPERATIONS_ERRORS, &l);
            }
            r
        })
    }
}

fn at(nanos: i64) -> Option<SystemTime> {
    (nanos > 0).then(|| SystemTime::UNIX_EPOCH + Duration::from_nanos(nanos as u64))
}

fn state(s: i32) -> State {
    match cri::ContainerState::try_from(s) {
        Ok(cri::ContainerState::ContainerCreated) => State::Created,
        Ok(cri::ContainerState::ContainerRunning) => State::Running,
        Ok(cri::ContainerState::ContainerExited) => State::Exited,
        _ => State::Unknown,
    }
}

/// A sandbox's network as the runtime reports it.
#[derive(Debug, Clone, Default)]
pub struct SandboxNetwork {
    /// The pod IP (empty where the runtime reports none: rootless pods).
    pub ip: String,
    /// A path `setns` accepts, when the pod has a namespace of its own.
    pub netns: Option<String>,
    /// The pod's address inside that namespace, where the runtime says (wasmlet's verbose
    /// `pod_address`): what probes dial from there when there is no pod IP.
    pub inside: Option<String>,
}

impl SandboxNetwork {
    /// The pod's own address: its IP, or where the runtime reports none (rootless), its
    /// address inside its namespace; empty if it has neither.
    pub fn address(&self) -> &str {
        match (&*self.ip, &self.inside) {
            ("", Some(inside)) => inside,
            (ip, _) => ip,
        }
    }
}

impl Cri {
    pub fn new(channel: Channel) -> Cri {
        let max = cri_proto::MAX_MESSAGE_BYTES;
        Cri {
            rt: RuntimeServiceClient::new(Timed(channel.clone()))
                .max_decoding_message_size(max)
                .max_encoding_message_size(max),
            img: ImageServiceClient::new(Timed(channel)).max_decoding_message_size(max).max_encoding_message_size(max),
        }
    }
}

fn uid_selector(uid: &str) -> HashMap<String, String> {
    [(POD_UID.to_string(), uid.to_string())].into()
}

#[async_trait::async_trait]
impl RuntimeClient for Cri {
    async fn observe(&self, uid: &str) -> Result<Observed, tonic::Status> {
        let mut rt = self.rt.clone();
        let sandboxes = self.sandboxes(Some(uid)).await?;
        let newest = sandboxes.iter().max_by_key(|s| (s.metadata.as_ref().map_or(0, |m| m.attempt), s.created_at));
        let sandbox = match newest {
            Some(s) => {
                let ready = s.state == cri::PodSandboxState::SandboxReady as i32;
                let ip = if ready { self.sandbox_network(&s.id).await?.ip } else { String::new() };
                Some(Sandbox { id: s.id.clone(), ready, ip, attempt: s.metadata.as_ref().map_or(0, |m| m.attempt) })
            }
            None => None,
        };
        let containers = rt
            .list_containers(cri::ListContainersRequest {
                filter: Some(cri::ContainerFilter { label_selector: uid_selector(uid), ..Default::default() }),
            })
            .await?
            .into_inner()
            .containers;
        let mut instances = Vec::with_capacity(containers.len());
        for c in containers {
            let status = match rt
                .container_status(cri::ContainerStatusRequest { container_id: c.id.clone(), verbose: false })
                .await
            {
                Ok(r) => r.into_inner().status,
                // Removed meanwhile.
                Err(e) if e.code() == tonic::Code::NotFound => continue,
                Err(e) => return Err(e),
            };
            let Some(s) = status else { continue };
            let mut i = instance(&s);
            if i.exited()
                && let Some(m) = termination_message(&s)
            {
                i.message = if i.message.is_empty() { m } else { format!("{}: {m}", i.message) };
            }
            instances.push(i);
        }
        Ok(Observed { sandbox, instances })
    }

    async fn sandbox_network(&self, id: &str) -> Result<SandboxNetwork, tonic::Status> {
        let r = self
            .rt
            .clone()
            .pod_sandbox_status(cri::PodSandboxStatusRequest { pod_sandbox_id: id.to_string(), verbose: true })
            .await?
            .into_inner();
        let ip = r.status.and_then(|s| s.network).map(|n| n.ip).unwrap_or_default();
        Ok(SandboxNetwork {
            ip,
            netns: r.info.get("network_namespace").cloned(),
            inside: r.info.get("pod_address").cloned(),
        })
    }

    async fn sandboxes(&self, uid: Option<&str>) -> Result<Vec<cri::PodSandbox>, tonic::Status> {
        let filter = uid.map(|u| cri::PodSandboxFilter { label_selector: uid_selector(u), ..Default::default() });
        Ok(self.rt.clone().list_pod_sandbox(cri::ListPodSandboxRequest { filter }).await?.into_inner().items)
    }

    async fn run_sandbox(&self, config: cri::PodSandboxConfig) -> Result<String, tonic::Status> {
        let r = self
            .rt
            .clone()
            .run_pod_sandbox(cri::RunPodSandboxRequest { config: Some(config), runtime_handler: String::new() })
            .await?;
        Ok(r.into_inner().pod_sandbox_id)
    }

    async fn create_container(
        &self,
        sandbox_id: &str,
        config: cri::ContainerConfig,
        sandbox: cri::PodSandboxConfig,
    ) -> Result<String, tonic::Status> {
        let r = self
            .rt
            .clone()
            .create_container(cri::CreateContainerRequest {
                pod_sandbox_id: sandbox_id.to_string(),
                config: Some(config),
                sandbox_config: Some(sandbox),
            })
            .await?;
        Ok(r.into_inner().container_id)
    }

    async fn start_container(&self, id: &str) -> Result<(), tonic::Status> {
        self.rt.clone().start_container(cri::StartContainerRequest { container_id: id.to_string() }).await?;
        Ok(())
    }

    async fn image_status(&self, image: &str) -> Result<Option<(String, u64)>, tonic::Status> {
        let r = self
            .img
            .clone()
            .image_status(cri::ImageStatusRequest {
                image: Some(cri::ImageSpec { image: image.to_string(), ..Default::default() }),
                verbose: false,
            })
            .await?
            .into_inner();
        Ok(r.image.map(|i| (i.id, i.size)))
    }

    async fn pull(
        &self,
        image: &str,
        auth: Option<cri::AuthConfig>,
        sandbox: Option<cri::PodSandboxConfig>,
    ) -> Result<String, tonic::Status> {
        let r = self
            .img
            .clone()
            .pull_image(cri::PullImageRequest {
                image: Some(cri::ImageSpec { image: image.to_string(), ..Default::default() }),
                auth,
                sandbox_config: sandbox,
            })
            .await?;
        Ok(r.into_inner().image_ref)
    }

    async fn exec_sync(
        &self,
        id: &str,
        cmd: Vec<String>,
        timeout: Duration,
    ) -> Result<cri::ExecSyncResponse, tonic::Status> {
        let r = self
            .rt
            .clone()
            .exec_sync(cri::ExecSyncRequest {
                container_id: id.to_string(),
                cmd,
                timeout: timeout.as_secs().max(1) as i64,
            })
            .await?;
        Ok(r.into_inner())
    }

    async fn stop_container(&self, id: &str, grace: i64) -> Result<(), tonic::Status> {
        self.rt
            .clone()
            .stop_container(cri::StopContainerRequest { container_id: id.to_string(), timeout: grace.max(0) })
            .await?;
        Ok(())
    }

    async fn remove_container(&self, id: &str) -> Result<(), tonic::Status> {
        self.rt.clone().remove_container(cri::RemoveContainerRequest { container_id: id.to_string() }).await?;
        Ok(())
    }

    async fn stop_sandbox(&self, id: &str) -> Result<(), tonic::Status> {
        self.rt.clone().stop_pod_sandbox(cri::StopPodSandboxRequest { pod_sandbox_id: id.to_string() }).await?;
        Ok(())
    }

    async fn remove_sandbox(&self, id: &str) -> Result<(), tonic::Status> {
        self.rt.clone().remove_pod_sandbox(cri::RemovePodSandboxRequest { pod_sandbox_id: id.to_string() }).await?;
        Ok(())
    }

    async fn readiness_problem(&self) -> Option<String> {
        let status = match self.rt.clone().status(cri::StatusRequest { verbose: false }).await {
            Ok(r) => r.into_inner().status.unwrap_or_default(),
            Err(e) => return Some(format!("container runtime is down: {}", e.message())),
        };
        readiness_problem(&status.conditions)
    }

    async fn container_stats(&self) -> Result<Vec<cri::ContainerStats>, tonic::Status> {
        let mut rt = self.rt.clone();
        let r = rt.list_container_stats(cri::ListContainerStatsRequest { filter: None }).await?;
        Ok(r.into_inner().stats)
    }

    async fn images(&self) -> Result<Vec<crate::imagegc::Image>, tonic::Status> {
        let r = self.img.clone().list_images(cri::ListImagesRequest { filter: None }).await?.into_inner();
        Ok(r.images.into_iter().map(|i| crate::imagegc::Image { id: i.id, size: i.size, pinned: i.pinned }).collect())
    }

    async fn images_in_use(&self) -> Result<std::collections::HashSet<String>, tonic::Status> {
        let r = self.rt.clone().list_containers(cri::ListContainersRequest { filter: None }).await?.into_inner();
        // Image.id is what containers carry as image_ref (and image_id, since CRI 1.36).
        Ok(r.containers.into_iter().flat_map(|c| [c.image_ref, c.image_id]).filter(|id| !id.is_empty()).collect())
    }

    async fn remove_image(&self, id: &str) -> Result<(), tonic::Status> {
        let spec = cri::ImageSpec { image: id.to_string(), ..Default::default() };
        self.img.clone().remove_image(cri::RemoveImageRequest { image: Some(spec) }).await?;
        Ok(())
    }

    async fn sandbox_events(&self) -> Result<BoxStream<'static, String>, tonic::Status> {
        use futures_util::StreamExt;
        let stream = self.rt.clone().get_container_events(cri::GetEventsRequest {}).await?.into_inner();
        // Ends at the first error, as a broken stream is reconnected by the caller.
        Ok(stream
            .take_while(|e| std::future::ready(e.is_ok()))
            .filter_map(|e| async move { e.ok()?.pod_sandbox_status.map(|s| s.id) })
            .boxed())
    }
}

/// The kubelet's words for a runtime whose status conditions are not all true.
pub fn readiness_problem(conditions: &[cri::RuntimeCondition]) -> Option<String> {
    let find = |t: &str| conditions.iter().find(|c| c.r#type == t);
    for (kind, what) in
        [("RuntimeReady", "container runtime not ready"), ("NetworkReady", "container runtime network not ready")]
    {
        match find(kind) {
            Some(c) if c.status => {}
            Some(c) => return Some(format!("{what}: {kind}=false reason:{} message:{}", c.reason, c.message)),
            None => return Some(format!("{what}: {kind}=false reason: message:the runtime did not report {kind}")),
        }
    }
    None
}

#[cfg(test)]
mod readiness_tests {
    use super::*;

    #[test]
    fn runtime_conditions_in_the_kubelets_words() {
        let c = |t: &str, ok: bool| cri::RuntimeCondition {
            r#type: t.into(),
            status: ok,
            reason: if ok { String::new() } else { "NetworkPluginNotReady".into() },
            message: if ok { String::new() } else { "no CNI config".into() },
        };
        assert_eq!(readiness_problem(&[c("RuntimeReady", true), c("NetworkReady", true)]), None);
        assert_eq!(
            readiness_problem(&[c("RuntimeReady", true), c("NetworkReady", false)]).unwrap(),
            "container runtime network not ready: NetworkReady=false reason:NetworkPluginNotReady message:no CNI config"
        );
        assert!(readiness_problem(&[c("NetworkReady", true)]).unwrap().starts_with("container runtime not ready"));
    }
}

/// The most of a termination message file read, and of the log fallback.
const MAX_MESSAGE: usize = 4096;
const MAX_LOG_MESSAGE: usize = 2048;
const MAX_LOG_LINES: usize = 80;

/// An exited container's termination message, as the kubelet finds it: the file mounted at
/// its terminationMessagePath (at most 4096 bytes); with FallbackToLogsOnError and a non-zero
/// exit, an empty or missing file gives the end of its log instead (80 lines, 2048 bytes).
pub fn termination_message(s: &cri::ContainerStatus) -> Option<String> {
    let path = s.annotations.get(TERMINATION_MESSAGE_PATH)?;
    let fallback = s.exit_code != 0
        && s.annotations.get("io.kubernetes.container.terminationMessagePolicy").map(String::as_str)
            == Some("FallbackToLogsOnError");
    let file = s.mounts.iter().find(|m| &m.container_path == path).map(|m| m.host_path.clone());
    let written = file.and_then(|f| std::fs::read(f).ok()).unwrap_or_default();
    if !written.is_empty() {
        let end = written.len().min(MAX_MESSAGE);
        return Some(String::from_utf8_lossy(&written[..end]).into_owned());
    }
    if !fallback {
        return None;
    }
    let log = std::fs::read_to_string(&s.log_path).ok()?;
    // CRI records: "<time> <stream> <P|F> <text>"; partial records continue the line.
    let mut lines: Vec<String> = Vec::new();
    let mut partial = String::new();
    for record in log.lines() {
        let mut f = record.splitn(4, ' ');
        let (tag, text) = (f.nth(2), f.next().unwrap_or(""));
        partial.push_str(text);
        if tag != Some("P") {
            lines.push(std::mem::take(&mut partial));
        }
    }
    let start = lines.len().saturating_sub(MAX_LOG_LINES);
    let mut text = lines[start..].join("\n");
    if text.len() > MAX_LOG_MESSAGE {
        let mut cut = text.len() - MAX_LOG_MESSAGE;
        while !text.is_char_boundary(cut) {
            cut += 1;
        }
        text = text[cut..].to_string();
    }
    (!text.is_empty()).then_some(text)
}

/// A CRI container status as an [`Instance`].
pub fn instance(s: &cri::ContainerStatus) -> Instance {
    let name = s.labels.get(CONTAINER_NAME).cloned().or_else(|| s.metadata.as_ref().map(|m| m.name.clone()));
    let restart_count = s
        .annotations
        .get(RESTART_COUNT)
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| s.metadata.as_ref().map_or(0, |m| m.attempt as i32));
    Instance {
        id: s.id.clone(),
        name: name.unwrap_or_default(),
        restart_count,
        state: state(s.state),
        created_at: at(s.created_at).unwrap_or(SystemTime::UNIX_EPOCH),
        started_at: at(s.started_at),
        finished_at: at(s.finished_at),
        exit_code: s.exit_code,
        reason: s.reason.clone(),
        message: s.message.clone(),
        image: s.image.as_ref().map(|i| i.image.clone()).unwrap_or_default(),
        image_ref: s.image_ref.clone(),
        hash: s.annotations.get(CONTAINER_HASH).cloned().unwrap_or_default(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(dir: &std::path::Path, code: i32, policy: &str, file: &str, log: &str) -> cri::ContainerStatus {
        let msg = dir.join("msg");
        std::fs::write(&msg, file).unwrap();
        let log_path = dir.join("0.log");
        std::fs::write(&log_path, log).unwrap();
        cri::ContainerStatus {
            exit_code: code,
            log_path: log_path.display().to_string(),
            mounts: vec![cri::Mount {
                container_path: "/dev/termination-log".into(),
                host_path: msg.display().to_string(),
                ..Default::default()
            }],
            annotations: [
                (TERMINATION_MESSAGE_PATH.to_string(), "/dev/termination-log".to_string()),
                ("io.kubernetes.container.terminationMessagePolicy".to_string(), policy.to_string()),
            ]
            .into(),
            ..Default::default()
        }
    }

    #[test]
    fn termination_messages_from_the_file_or_the_log() {
        let tmp = tempfile::tempdir().unwrap();
        let log = "2026-11-27T00:00:00Z stdout P par\n2026-11-27T00:00:00Z stdout F tial\n2026-11-27T00:00:01Z stderr F boom\n";
        let s = status(tmp.path(), 1, "File", "bye", log);
        assert_eq!(termination_message(&s).as_deref(), Some("bye"));
        let s = status(tmp.path(), 1, "File", "", log);
        assert_eq!(termination_message(&s), None, "File policy: no fallback");
        let s = status(tmp.path(), 1, "FallbackToLogsOnError", "", log);
        assert_eq!(termination_message(&s).as_deref(), Some("partial\nboom"));
        let s = status(tmp.path(), 0, "FallbackToLogsOnError", "", log);
        assert_eq!(termination_message(&s), None, "no fallback on success");
        let big = "x".repeat(5000);
        let s = status(tmp.path(), 0, "File", &big, log);
        assert_eq!(termination_message(&s).unwrap().len(), 4096);
        let many: String = (0..100).map(|i| format!("2026-11-27T00:00:00Z stdout F line {i}\n")).collect();
        let s = status(tmp.path(), 2, "FallbackToLogsOnError", "", &many);
        let m = termination_message(&s).unwrap();
        assert!(m.starts_with("line 20\n") && m.ends_with("line 99"), "the last 80 lines: {m}");
    }
}
