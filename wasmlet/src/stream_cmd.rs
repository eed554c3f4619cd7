//! `wasmlet exec`, `attach` and `port-forward` for the pods `wasmlet run` runs, as kubectl's:
//! a CRI Exec, Attach or PortForward on the run's socket, then the streams over SPDY to the
//! runtime's streaming server (the same code that serves kubectl through a node).
//! - `exec POD [-c C] [-i] [-t] -- CMD...` exits with the command's exit code;
//! - `attach POD [-c C] [-i] [-t]` joins the container's own streams until it ends;
//! - `port-forward POD [LOCAL:]REMOTE...` listens on 127.0.0.1:LOCAL and carries each
//!   connection to REMOTE on the pod's loopback.

use std::collections::HashMap;
use std::path::Path;

use anyhow::{Context, Result, anyhow, bail};
use cri_proto::v1 as cri;
use tokio::io::AsyncWriteExt;
use wasmlet_kubelet::cri::{CONTAINER_NAME, POD_NAME};
use wasmlet_streaming::spdy::{Connection, Stream};

/// What `wasmlet exec` or `attach` was asked.
pub struct ExecArgs<'a> {
    pub pod: &'a str,
    pub container: Option<&'a str>,
    pub stdin: bool,
    pub tty: bool,
    /// Empty for attach.
    pub cmd: Vec<String>,
}

type Client = cri::runtime_service_client::RuntimeServiceClient<tonic::transport::Channel>;

/// The CRI clients of the runs of this root (`kubelet-<pid>.sock` in its run directory).
async fn runs(run_dir: &Path) -> Result<Vec<Client>> {
    let entries = std::fs::read_dir(run_dir).with_context(|| format!("no run of this root: {}", run_dir.display()))?;
    let mut clients = Vec::new();
    for entry in entries {
        let path = entry?.path();
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or_default();
        if !(name.starts_with("kubelet-") && name.ends_with(".sock")) {
            continue;
        }
        if let Ok(channel) = cri_proto::connect_unix(&path).await {
            clients.push(Client::new(channel));
        }
    }
    Ok(clients)
}

/// The running container the session goes to.
async fn find(run_dir: &Path, a: &ExecArgs<'_>) -> Result<(Client, String)> {
    for mut rt in runs(run_dir).await? {
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

/// Copies what the peer sends on a stream to `to` (our stdout or stderr, a local connection),
/// then ends `to`.
fn drain(mut s: Stream, mut to: impl tokio::io::AsyncWrite + Unpin + Send + 'static) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        while let Some(d) = s.rx.recv().await {
            if to.write_all(&d).await.is_err() {
                break;
            }
            let _ = to.flush().await;
        }
        let _ = to.shutdown().await;
    })
}

/// Sends what `from` gives (our stdin, a local connection) on a stream, then finishes it.
fn feed(
    tx: wasmlet_streaming::spdy::StreamSender,
    mut from: impl tokio::io::AsyncRead + Unpin + Send + 'static,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut buf = bytes::BytesMut::new();
        while let Ok(Some(chunk)) = wasmlet_streaming::spdy::read_chunk(&mut from, &mut buf).await {
            if tx.send(chunk).await.is_err() {
                break;
            }
        }
        let _ = tx.finish().await;
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
    session(&url, &a).await
}

/// Joins the container's own streams until it ends; 0, or the error.
pub async fn attach(run_dir: &Path, a: ExecArgs<'_>) -> Result<i32> {
    let (mut rt, id) = find(run_dir, &a).await?;
    let req = cri::AttachRequest {
        container_id: id,
        tty: a.tty,
        stdin: a.stdin,
        stdout: true,
        stderr: !a.tty,
        ..Default::default()
    };
    let url = rt.attach(req).await.map_err(|e| anyhow!("attach: {}", e.message()))?.into_inner().url;
    session(&url, &a).await
}

/// A remote command session on the streaming URL `url`: our stdin to it (with -i), its stdout
/// and stderr to ours; the exit code its status reports.
async fn session(url: &str, a: &ExecArgs<'_>) -> Result<i32> {
    let (c, _) = wasmlet_streaming::spdy::dial(url, "v4.channel.k8s.io").await?;
    let mut error = open(&c, "error").await?;
    if a.stdin {
        feed(open(&c, "stdin").await?.tx, tokio::io::stdin());
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

/// `[LOCAL:]REMOTE` (a lone port is both).
pub fn parse_port_pair(text: &str) -> Result<(u16, u16)> {
    let port = |p: &str| p.parse::<u16>().ok().filter(|p| *p > 0).ok_or_else(|| anyhow!("{p:?} is not a port"));
    Ok(match text.split_once(':') {
        Some(("", remote)) => (0, port(remote)?),
        Some((local, remote)) => (port(local)?, port(remote)?),
        None => (port(text)?, port(text)?),
    })
}

/// Forwards 127.0.0.1:LOCAL to REMOTE in the pod for every pair, until interrupted or the
/// streaming connection ends.
pub async fn port_forward(run_dir: &Path, pod: &str, pairs: &[(u16, u16)]) -> Result<()> {
    let mut found = None;
    for mut rt in runs(run_dir).await? {
        let filter = cri::PodSandboxFilter {
            label_selector: HashMap::from([(POD_NAME.to_string(), pod.to_string())]),
            state: Some(cri::PodSandboxStateValue { state: cri::PodSandboxState::SandboxReady as i32 }),
            ..Default::default()
        };
        let Ok(list) = rt.list_pod_sandbox(cri::ListPodSandboxRequest { filter: Some(filter) }).await else { continue };
        if let Some(s) = list.into_inner().items.into_iter().next() {
            found = Some((rt, s.id));
            break;
        }
    }
    let (mut rt, sandbox) =
        found.ok_or_else(|| anyhow!("no ready pod {pod:?} (is `wasmlet run` running it, with this root?)"))?;
    let req =
        cri::PortForwardRequest { pod_sandbox_id: sandbox, port: pairs.iter().map(|(_, r)| i32::from(*r)).collect() };
    let url = rt.port_forward(req).await.map_err(|e| anyhow!("port-forward: {}", e.message()))?.into_inner().url;
    let (conn, _) = wasmlet_streaming::spdy::dial(&url, "portforward.k8s.io").await?;
    let next_id = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let mut listeners = Vec::new();
    for (local, remote) in pairs.iter().copied() {
        let l = tokio::net::TcpListener::bind(("127.0.0.1", local))
            .await
            .with_context(|| format!("listen on 127.0.0.1:{local}"))?;
        println!("Forwarding from 127.0.0.1:{} -> {remote}", l.local_addr()?.port());
        let (conn, next_id) = (conn.clone(), next_id.clone());
        listeners.push(tokio::spawn(async move {
            while let Ok((tcp, _)) = l.accept().await {
                let id = next_id.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                println!("Handling connection for {local}");
                let conn = conn.clone();
                tokio::spawn(async move {
                    if let Err(e) = forward_one(&conn, tcp, remote, id).await {
                        eprintln!("error forwarding port {remote}: {e:#}");
                    }
                });
            }
        }));
    }
    tokio::select! {
        _ = conn.closed() => bail!("lost the connection to the pod"),
        _ = tokio::signal::ctrl_c() => Ok(()),
    }
}

/// One local connection, as client-go's port forwarder carries it: an error stream and a
/// data stream for the same request id.
async fn forward_one(conn: &Connection, tcp: tokio::net::TcpStream, port: u16, id: u64) -> Result<()> {
    let headers = |kind: &str| -> Vec<(String, String)> {
        vec![
            ("streamtype".into(), kind.into()),
            ("port".into(), port.to_string()),
            ("requestid".into(), id.to_string()),
        ]
    };
    let mut error = conn.open(headers("error")).await.context("open the error stream")?;
    let data = conn.open(headers("data")).await.context("open the data stream")?;
    let (rd, wr) = tcp.into_split();
    let up = feed(data.tx.clone(), rd);
    let _ = drain(data, wr).await;
    up.abort();
    let mut message = Vec::new();
    while let Ok(Some(d)) = tokio::time::timeout(std::time::Duration::from_millis(100), error.rx.recv()).await {
        message.extend_from_slice(&d);
    }
    if message.is_empty() {
        return Ok(());
    }
    // The kubelet's JSON ({"message": ...}) or plain text.
    let text = serde_json::from_slice::<serde_json::Value>(&message)
        .ok()
        .and_then(|v| v["message"].as_str().map(str::to_string))
        .unwrap_or_else(|| String::from_utf8_lossy(&message).trim().to_string());
    bail!("{text}")
}
