//! The CRI as the pod workers use it: a thin client over the runtime and image services that
//! speaks the kubelet's labels and annotations, and turns CRI statuses into [`Instance`]s.
//! It works the same over an in-process socket (`wasmlet run`) or a remote runtime.

use std::collections::HashMap;
use std::time::{Duration, SystemTime};

use cri::image_service_client::ImageServiceClient;
use cri::runtime_service_client::RuntimeServiceClient;
use cri_proto::v1 as cri;
use tonic::transport::Channel;

use super::model::{Instance, Observed, Sandbox, State};

pub const POD_NAME: &str = "io.kubernetes.pod.name";
pub const POD_NAMESPACE: &str = "io.kubernetes.pod.namespace";
pub const POD_UID: &str = "io.kubernetes.pod.uid";
pub const CONTAINER_NAME: &str = "io.kubernetes.container.name";
pub const CONTAINER_HASH: &str = "io.kubernetes.container.hash";
pub const RESTART_COUNT: &str = "io.kubernetes.container.restartCount";
pub const TERMINATION_MESSAGE_PATH: &str = "io.kubernetes.container.terminationMessagePath";

/// A CRI client (runtime and image services on one channel).
#[derive(Clone)]
pub struct Cri {
    pub rt: RuntimeServiceClient<Channel>,
    pub img: ImageServiceClient<Channel>,
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
    pub ip: String,
    /// A path `setns` accepts, when the pod has a namespace of its own.
    pub netns: Option<String>,
}

impl Cri {
    pub fn new(channel: Channel) -> Cri {
        Cri { rt: RuntimeServiceClient::new(channel.clone()), img: ImageServiceClient::new(channel) }
    }

    /// Every sandbox and container of the pod with this UID.
    pub async fn observe(&self, uid: &str) -> Result<Observed, tonic::Status> {
        let selector: HashMap<String, String> = [(POD_UID.to_string(), uid.to_string())].into();
        let mut rt = self.rt.clone();
        let sandboxes = rt
            .list_pod_sandbox(cri::ListPodSandboxRequest {
                filter: Some(cri::PodSandboxFilter { label_selector: selector.clone(), ..Default::default() }),
            })
            .await?
            .into_inner()
            .items;
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
                filter: Some(cri::ContainerFilter { label_selector: selector, ..Default::default() }),
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
            instances.push(instance(&s));
        }
        Ok(Observed { sandbox, instances })
    }

    /// The sandbox's IP and network namespace.
    pub async fn sandbox_network(&self, id: &str) -> Result<SandboxNetwork, tonic::Status> {
        let r = self
            .rt
            .clone()
            .pod_sandbox_status(cri::PodSandboxStatusRequest { pod_sandbox_id: id.to_string(), verbose: true })
            .await?
            .into_inner();
        let ip = r.status.and_then(|s| s.network).map(|n| n.ip).unwrap_or_default();
        Ok(SandboxNetwork { ip, netns: r.info.get("network_namespace").cloned() })
    }

    /// The image's ID and size if the runtime has it.
    pub async fn image_status(&self, image: &str) -> Result<Option<(String, u64)>, tonic::Status> {
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

    pub async fn pull(&self, image: &str, sandbox: Option<cri::PodSandboxConfig>) -> Result<String, tonic::Status> {
        let r = self
            .img
            .clone()
            .pull_image(cri::PullImageRequest {
                image: Some(cri::ImageSpec { image: image.to_string(), ..Default::default() }),
                auth: None,
                sandbox_config: sandbox,
            })
            .await?;
        Ok(r.into_inner().image_ref)
    }

    pub async fn exec_sync(
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

    pub async fn stop_container(&self, id: &str, grace: i64) -> Result<(), tonic::Status> {
        self.rt
            .clone()
            .stop_container(cri::StopContainerRequest { container_id: id.to_string(), timeout: grace.max(0) })
            .await?;
        Ok(())
    }

    pub async fn stop_sandbox(&self, id: &str) -> Result<(), tonic::Status> {
        self.rt.clone().stop_pod_sandbox(cri::StopPodSandboxRequest { pod_sandbox_id: id.to_string() }).await?;
        Ok(())
    }

    pub async fn remove_sandbox(&self, id: &str) -> Result<(), tonic::Status> {
        self.rt.clone().remove_pod_sandbox(cri::RemovePodSandboxRequest { pod_sandbox_id: id.to_string() }).await?;
        Ok(())
    }
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
