//! Port forwarding. Over SPDY, every forwarded connection is a pair of streams the client opens
//! (`streamtype` data and error, the same `port` and `requestid`); any number of pairs, for any
//! ports, share one connection. Over WebSocket the ports are in the URL and each has a data and
//! an error channel.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::sync::mpsc;

use crate::channels::{Channels, Framing};
use crate::spdy;
use crate::{Backend, Out};

/// The port-forward protocol over SPDY.
pub(crate) const SPDY_PROTOCOLS: &[&str] = &["portforward.k8s.io"];

struct Pair {
    port: u16,
    since: Instant,
    data: Option<spdy::Stream>,
    error: Option<spdy::Stream>,
}

/// Serves one SPDY port-forward connection until the client closes it.
pub(crate) async fn serve_spdy(
    conn: spdy::Connection,
    mut incoming: mpsc::Receiver<spdy::Stream>,
    backend: Arc<dyn Backend>,
    sandbox: String,
    timeout: Duration,
) {
    let mut pairs: HashMap<String, Pair> = HashMap::new();
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        let stream = tokio::select! {
            s = incoming.recv() => match s { Some(s) => s, None => break },
            _ = conn.closed() => break,
            _ = tick.tick() => {
                let stale: Vec<String> =
                    pairs.iter().filter(|(_, p)| p.since.elapsed() > timeout).map(|(k, _)| k.clone()).collect();
                for id in stale {
                    if let Some(e) = pairs.remove(&id).and_then(|p| p.error) {
                        let _ = e.tx.send(Bytes::from(format!("timed out waiting for streams of request {id}"))).await;
                        let _ = e.tx.finish().await;
                    }
                }
                continue;
            }
        };
        let (port, kind) = match check(&stream.headers) {
            Ok(v) => v,
            Err(e) => {
                tracing::debug!(error = %e, "port-forward stream refused");
                conn.refuse(stream, spdy::CANCEL).await;
                continue;
            }
        };
        if conn.accept(&stream).await.is_err() {
            break;
        }
        let id = match spdy::header(&stream.headers, "requestid") {
            Some(id) if !id.is_empty() => id.to_string(),
            // Old clients send no request id; their pairs have consecutive ids, error first.
            _ => (if kind == Kind::Error { stream.id } else { stream.id.saturating_sub(2) }).to_string(),
        };
        let pair = pairs.entry(id.clone()).or_insert(Pair { port, since: Instant::now(), data: None, error: None });
        let slot = if kind == Kind::Data { &mut pair.data } else { &mut pair.error };
        if slot.is_some() || pair.port != port {
            let msg = format!("error processing stream for request {id}: a second {kind:?} stream or another port");
            if let Some(e) = &pair.error {
                let _ = e.tx.send(Bytes::from(msg)).await;
            }
            continue;
        }
        *slot = Some(stream);
        if pair.data.is_some() && pair.error.is_some() {
            let p = pairs.remove(&id).expect("the pair is there");
            let (data, error) = (p.data.expect("data"), p.error.expect("error"));
            let backend = backend.clone();
            let sandbox = sandbox.clone();
            tokio::spawn(async move {
                let (tx, etx) = (data.tx.clone(), error.tx.clone());
                if let Err(msg) = forward(&*backend, &sandbox, port, data.rx, Out::Spdy(tx.clone())).await {
                    let _ = etx.send(Bytes::from(error_body(&msg))).await;
                }
                let _ = tx.finish().await;
                let _ = etx.finish().await;
            });
        }
    }
    conn.close().await;
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Data,
    Error,
}

fn check(headers: &spdy::Headers) -> Result<(u16, Kind), String> {
    let port = spdy::header(headers, "port").ok_or("\"port\" header is required")?;
    let port: u16 = port.parse().map_err(|e| format!("unable to parse {port:?} as a port: {e}"))?;
    if port == 0 {
        return Err("port \"0\" must be > 0".into());
    }
    match spdy::header(headers, "streamtype") {
        Some("data") => Ok((port, Kind::Data)),
        Some("error") => Ok((port, Kind::Error)),
        Some(other) => Err(format!("invalid stream type {other:?}")),
        None => Err("\"streamType\" header is required".into()),
    }
}

/// The error stream's body: the kubelet's JSON (a client that reads it as text still shows the
/// message). The connection stays usable, so it never asks the client to close it.
fn error_body(msg: &str) -> String {
    let mut s = serde_json::json!({"message": msg}).to_string();
    s.push('\n');
    s
}

/// Connects to the port and copies both ways until the pod's side ends. `Err` is the message
/// for the error stream.
async fn forward(
    backend: &dyn Backend,
    sandbox: &str,
    port: u16,
    mut from_client: mpsc::Receiver<Bytes>,
    to_client: Out,
) -> Result<(), String> {
    let tcp: TcpStream = backend
        .port_forward(sandbox, port)
        .await
        .map_err(|e| format!("error forwarding port {port} to pod {sandbox}: {e}"))?;
    let _ = tcp.set_nodelay(true);
    let (mut rd, mut wr) = tcp.into_split();
    let upstream = tokio::spawn(async move {
        // What is already queued goes in one write, as many chunks as one vectored write takes.
        let mut parts = Vec::new();
        while let Some(b) = from_client.recv().await {
            parts.push(b);
            while parts.len() < spdy::MAX_PARTS
                && let Ok(b) = from_client.try_recv()
            {
                parts.push(b);
            }
            if spdy::write_parts(&mut wr, &mut parts).await.is_err() {
                return;
            }
        }
        // The client finished its side: pass the half-close on.
        let _ = wr.shutdown().await;
    });
    let mut buf = bytes::BytesMut::new();
    loop {
        match spdy::read_chunk(&mut rd, &mut buf).await {
            Ok(None) => break,
            Ok(Some(chunk)) => {
                if to_client.send(chunk).await.is_err() {
                    break;
                }
            }
            Err(e) => {
                upstream.abort();
                return Err(format!("error forwarding port {port} to pod {sandbox}: read: {e}"));
            }
        }
    }
    upstream.abort();
    Ok(())
}

/// The ports of a WebSocket port-forward URL (`?port=80&port=8080`).
pub(crate) fn query_ports(query: &str) -> Result<Vec<u16>, String> {
    let mut ports = Vec::new();
    for kv in query.split('&').filter(|s| !s.is_empty()) {
        let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
        if k == "port" {
            for p in v.split(',') {
                let port: u16 = p.parse().map_err(|e| format!("unable to parse {p:?} as a port: {e}"))?;
                if port == 0 {
                    return Err("port \"0\" must be > 0".into());
                }
                ports.push(port);
            }
        }
    }
    if ports.is_empty() {
        return Err("query parameter \"port\" is required".into());
    }
    Ok(ports)
}

/// Serves a WebSocket port forward: channel 2i carries port i's data, 2i+1 its errors; each
/// channel's first message is its port, little-endian.
pub(crate) async fn serve_ws<IO>(
    ws: tokio_tungstenite::WebSocketStream<IO>,
    protocol: &str,
    ports: Vec<u16>,
    backend: Arc<dyn Backend>,
    sandbox: String,
) where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let readable: Vec<u8> = (0..ports.len()).map(|i| (2 * i) as u8).collect();
    let (channels, mut rx) = Channels::start(ws, Framing::of(protocol), &readable);
    let mut tasks = Vec::new();
    for (i, port) in ports.into_iter().enumerate() {
        let data = channels.sender((2 * i) as u8);
        let error = channels.sender((2 * i + 1) as u8);
        let from_client = rx.remove(&((2 * i) as u8)).expect("a receiver per data channel");
        let backend = backend.clone();
        let sandbox = sandbox.clone();
        tasks.push(tokio::spawn(async move {
            let _ = data.send(Bytes::copy_from_slice(&port.to_le_bytes())).await;
            let _ = error.send(Bytes::copy_from_slice(&port.to_le_bytes())).await;
            if let Err(msg) = forward(&*backend, &sandbox, port, from_client, Out::Ws(data)).await {
                let _ = error.send(Bytes::from(msg)).await;
            }
        }));
    }
    tokio::select! {
        _ = async { for t in tasks { let _ = t.await; } } => {}
        _ = channels.closed() => {}
    }
    channels.close().await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_and_query_are_checked() {
        let h = |v: &[(&str, &str)]| v.iter().map(|(a, b)| (a.to_string(), b.to_string())).collect::<Vec<_>>();
        assert_eq!(check(&h(&[("port", "80"), ("streamtype", "data")])), Ok((80, Kind::Data)));
        assert!(check(&h(&[("streamtype", "data")])).unwrap_err().contains("\"port\" header is required"));
        assert!(check(&h(&[("port", "x"), ("streamtype", "data")])).unwrap_err().contains("unable to parse"));
        assert!(check(&h(&[("port", "0"), ("streamtype", "data")])).unwrap_err().contains("must be > 0"));
        assert!(check(&h(&[("port", "80"), ("streamtype", "stdin")])).unwrap_err().contains("invalid stream type"));
        assert_eq!(query_ports("port=80&port=8080,9090"), Ok(vec![80, 8080, 9090]));
        assert!(query_ports("").is_err());
        assert!(query_ports("port=99999").is_err());
        assert_eq!(error_body("x"), "{\"message\":\"x\"}\n");
    }
}
