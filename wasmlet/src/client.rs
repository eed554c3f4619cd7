//! A small CRI client: runs one container in a fresh pod and reports how it ended.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use cri::runtime_service_client::RuntimeServiceClient;
use cri_proto::v1 as cri;
use tokio_stream::StreamExt;

#[derive(clap::Args)]
pub struct PodRun {
    /// CRI socket of the server.
    #[arg(long)]
    socket: PathBuf,
    /// Image (id, tag or digest) of the container.
    #[arg(long)]
    image: String,
    /// Pod and container name.
    #[arg(long, default_value = "hello")]
    name: String,
    /// Directory for the pod's logs [default: TMP/wasmlet-pod-logs].
    #[arg(long)]
    log_dir: Option<PathBuf>,
    /// Environment variables, KEY=VALUE.
    #[arg(long = "env", short = 'e')]
    env: Vec<String>,
    /// Keep the pod instead of removing it at the end.
    #[arg(long)]
    keep: bool,
    /// Arguments for the container (its argv after the program name).
    #[arg(last = true)]
    args: Vec<String>,
}

async fn connect(socket: &PathBuf) -> Result<tonic::transport::Channel> {
    // The server may still be starting: wait up to 10 s for its socket.
    let mut last = None;
    for _ in 0..200 {
        match cri_proto::connect_unix(socket).await {
            Ok(c) => return Ok(c),
            Err(e) => last = Some(e),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Err(last.map(anyhow::Error::from).unwrap_or_else(|| anyhow::anyhow!("no connection")))
        .with_context(|| format!("connect to {}", socket.display()))
}

/// Runs the pod and returns the container's exit code.
pub async fn run_pod(a: PodRun) -> Result<i32> {
    let channel = connect(&a.socket).await?;
    let mut rt = RuntimeServiceClient::new(channel).max_decoding_message_size(cri_proto::MAX_MESSAGE_BYTES);
    let log_dir = a.log_dir.clone().unwrap_or_else(|| std::env::temp_dir().join("wasmlet-pod-logs"));
    let uid = format!("{:032x}", rand_u128());
    let log_directory = log_dir.join(format!("default_{}_{uid}", a.name));
    let sandbox_config = cri::PodSandboxConfig {
        metadata: Some(cri::PodSandboxMetadata {
            name: a.name.clone(),
            uid: uid.clone(),
            namespace: "default".into(),
            attempt: 0,
        }),
        hostname: a.name.clone(),
        log_directory: log_directory.display().to_string(),
        ..Default::default()
    };
    let sandbox = rt
        .run_pod_sandbox(cri::RunPodSandboxRequest {
            config: Some(sandbox_config.clone()),
            runtime_handler: String::new(),
        })
        .await?
        .into_inner()
        .pod_sandbox_id;
    let mut envs = Vec::new();
    for kv in &a.env {
        let Some((key, value)) = kv.split_once('=') else { bail!("--env {kv:?}: expected KEY=VALUE") };
        envs.push(cri::KeyValue { key: key.into(), value: value.into() });
    }
    let log_path = format!("{}/0.log", a.name);
    let config = cri::ContainerConfig {
        metadata: Some(cri::ContainerMetadata { name: a.name.clone(), attempt: 0 }),
        image: Some(cri::ImageSpec { image: a.image.clone(), ..Default::default() }),
        args: a.args.clone(),
        envs,
        log_path: log_path.clone(),
        ..Default::default()
    };
    let result = async {
        let id = rt
            .create_container(cri::CreateContainerRequest {
                pod_sandbox_id: sandbox.clone(),
                config: Some(config),
                sandbox_config: Some(sandbox_config),
            })
            .await?
            .into_inner()
            .container_id;
        let mut events = rt.get_container_events(cri::GetEventsRequest {}).await?.into_inner();
        rt.start_container(cri::StartContainerRequest { container_id: id.clone() }).await?;
        loop {
            let status = rt
                .container_status(cri::ContainerStatusRequest { container_id: id.clone(), verbose: false })
                .await?
                .into_inner()
                .status
                .context("no status")?;
            if status.state == cri::ContainerState::ContainerExited as i32 {
                return Ok::<_, anyhow::Error>(status);
            }
            // Wake on the next event for this container (or re-check after a while).
            let _ = tokio::time::timeout(Duration::from_secs(1), async {
                while let Some(Ok(ev)) = events.next().await {
                    if ev.container_id == id {
                        break;
                    }
                }
            })
            .await;
        }
    }
    .await;
    let log = std::fs::read_to_string(log_directory.join(&log_path)).unwrap_or_default();
    if !a.keep {
        rt.stop_pod_sandbox(cri::StopPodSandboxRequest { pod_sandbox_id: sandbox.clone() }).await?;
        rt.remove_pod_sandbox(cri::RemovePodSandboxRequest { pod_sandbox_id: sandbox.clone() }).await?;
        let _ = std::fs::remove_dir_all(&log_directory);
    }
    let status = result?;
    print!("{log}");
    std::io::Write::flush(&mut std::io::stdout())?;
    let message = if status.message.is_empty() { String::new() } else { format!(": {}", status.message) };
    eprintln!("container {} exited with code {} ({}){message}", a.name, status.exit_code, status.reason);
    Ok(status.exit_code)
}

fn rand_u128() -> u128 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_nanos());
    (u128::from(h.finish()) << 64) | u128::from(std::process::id())
}
