//! `wasmlet exec POD [-c C] [-i] [-t] -- CMD...`: runs a command in a container of a pod that
//! `wasmlet run` runs, as `kubectl exec` does: a CRI Exec on the run's socket, then the
//! streams over SPDY to the runtime's streaming server. Exits with the command's exit code.

use std::collections::HashMap;
use std::path::Path;

use anyhow::{Context, Result, anyhow, bail};
use bytes::Bytes;
use cri_proto::v1 as cri;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use wasmlet_kubelet::cri::{CONTAINER_NAME, POD_NAME};
use wasmlet_streaming::spdy::{Connection, Stream};

/// What `wasmlet exec` was asked.
pub struct ExecArgs<'a> {
    pub pod: &'a str,
    pub container: Option<&'a str>,
    pub stdin: bool,
    pub tty: bool,
    pub cmd: Vec<String>,
}

/// The running container the command goes to, found on the CRI sockets of the runs of this
/// root (`kubelet-<pid>.sock` in its run directory).
async fn find(
    run_dir: &Path,
    a: &ExecArgs<'_>,
) -> Result<(cri::runtime_service_client::RuntimeServiceClient<tonic::transport::Channel>, String)> {
    let entries = std::fs::read_dir(run_dir).with_context(|| format!("no run of this root: {}", run_dir.display()))?;
    for entry in entries {
        let path = entry?.path();
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or_default();
        if !(name.starts_with("kubelet-") && name.ends_with(".sock")) {
            continue;
        }
        let Ok(channel) = cri_proto::connect_unix(&path).await else { continue };
        let mut rt = cri::runtime_service_client::RuntimeServiceClient::new(channel);
        let mut labels = HashMap::from([(POD_NAME.to_string(), a.pod.to_string())]);
        if let Some(c) = a.container {
            labels.insert(CONTAINER_NAME.to_string(), c.to_string());
        }
        let filter = cri::ContainerFilter {
            label_selector: labels,
            state: Some(cri::ContainerStateValue { state: cri::ContainerState::ContainerRunning as i32 }),
            ..Default::default()
        };
        let Ok(list) = rt.list_containers(cri::ListContainersRequest { filter: Some(filter) }).await else { continue };
        let list = list.into_inner().containers;
        let mut names: Vec<String> = list.iter().filter_map(|c| c.metadata.as_ref().map(|m| m.name.clone())).collect();
        names.sort();
        names.dedup();
        match (list.first(), names.len()) {
            (None, _) => continue,
            (Some(_), n) if n > 1 => {
                bail!("pod {} has several containers ({}): choose one with -c", a.pod, names.join(", "))
            }
            (Some(c), _) => return Ok((rt, c.id.clone())),
        }
    }
    Err(anyhow!(
        "no running container{} of pod {:?} (is `wasmlet run` running it, with this root?)",
        a.container.map(|c| format!(" {c:?}")).unwrap_or_default(),
        a.pod
    ))
}

async fn open(c: &Connection, kind: &str) -> Result<Stream> {
    c.open(vec![("streamtype".into(), kind.into())]).await.with_context(|| format!("open the {kind} stream"))
}

/// Copies a stream to our stdout or stderr.
fn drain(mut s: Stream, mut to: impl tokio::io::AsyncWrite + Unpin + Send + 'static) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        while let Some(d) = s.rx.recv().await {
            if to.write_all(&d).await.is_err() {
                break;
            }
            let _ = to.flush().await;
        }
    })
}

/// Runs the command; its exit code.
pub async fn exec(run_dir: &Path, a: ExecArgs<'_>) -> Result<i32> {
    if a.cmd.is_empty() {
        bail!("wasmlet exec {}: no command (give it after --)", a.pod);
    }
    let (mut rt, id) = find(run_dir, &a).await?;
    let req = cri::ExecRequest {
        container_id: id,
        cmd: a.cmd.clone(),
        tty: a.tty,
        stdin: a.stdin,
        stdout: true,
        stderr: !a.tty,
        ..Default::default()
    };
    let url = rt.exec(req).await.map_err(|e| anyhow!("exec: {}", e.message()))?.into_inner().url;
    let (c, _) = wasmlet_streaming::spdy::dial(&url, "v4.channel.k8s.io").await?;
    let mut error = open(&c, "error").await?;
    if a.stdin {
        let s = open(&c, "stdin").await?;
        tokio::spawn(async move {
            let mut input = tokio::io::stdin();
            let mut buf = vec![0u8; 32 * 1024];
            loop {
                match input.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        if s.tx.send(Bytes::copy_from_slice(&buf[..n])).await.is_err() {
                            break;
                        }
                    }
                }
            }
            let _ = s.tx.finish().await;
        });
    }
    let out = drain(open(&c, "stdout").await?, tokio::io::stdout());
    let err = if a.tty { None } else { Some(drain(open(&c, "stderr").await?, tokio::io::stderr())) };
    let mut status = Vec::new();
    while let Some(d) = error.rx.recv().await {
        status.extend_from_slice(&d);
    }
    let _ = out.await;
    if let Some(e) = err {
        let _ = e.await;
    }
    c.close().await;
    let status: serde_json::Value = serde_json::from_slice(&status).unwrap_or_default();
    if status["status"] == "Success" {
        return Ok(0);
    }
    if status["reason"] == "NonZeroExitCode"
        && let Some(code) = status["details"]["causes"][0]["message"].as_str().and_then(|m| m.parse().ok())
    {
        return Ok(code);
    }
    bail!("{}", status["message"].as_str().unwrap_or("the command could not be run"))
}
