//! Attach: a client joins a running container's own streams. Its output reaches every
//! attached client through taps on the container's stdout and stderr (the log still gets all
//! of it); a container with `stdin` reads from a pipe that attached clients write to, closed
//! after the first session when it has `stdinOnce`.

use std::sync::Arc;

use tokio::io::{AsyncWrite, AsyncWriteExt, DuplexStream};
use wasmtime_wasi::cli::AsyncStdinStream;

use crate::logs::Taps;
use crate::model::ContainerState;
use crate::stdio::Term;
use crate::{Error, Result};

use super::Runtime;

/// How much typed input may wait for a container that is not reading its stdin.
const STDIN_BUFFER: usize = 64 * 1024;

/// A running container's streams, as attach sessions reach them.
#[derive(Clone)]
pub(super) struct Attachable {
    pub stdout: Taps,
    /// The same taps as `stdout` for a container with a terminal (its stderr goes there).
    pub stderr: Taps,
    /// The write side of its stdin (a container with `stdin`); `None` inside once closed.
    pub stdin: Option<Arc<tokio::sync::Mutex<Option<DuplexStream>>>>,
    pub stdin_once: bool,
    pub tty: bool,
}

impl Attachable {
    /// The streams for a container about to start, and the guest's side of its stdin.
    pub fn new(stdin: bool, stdin_once: bool, tty: bool) -> (Attachable, Option<Arc<Term<AsyncStdinStream>>>) {
        let stdout = Taps::default();
        let stderr = if tty { stdout.clone() } else { Taps::default() };
        let (writer, guest) = if stdin {
            let (w, r) = tokio::io::duplex(STDIN_BUFFER);
            (Some(Arc::new(tokio::sync::Mutex::new(Some(w)))), Some(Arc::new(Term::new(AsyncStdinStream::new(r), tty))))
        } else {
            (None, None)
        };
        (Attachable { stdout, stderr, stdin: writer, stdin_once, tty }, guest)
    }
}

impl Runtime {
    /// Connects a session's streams to a running container's until it ends (or the caller
    /// drops the future: the client left).
    pub async fn attach_session(&self, id: &str, io: wasmlet_streaming::Stdio) -> Result<()> {
        let (streams, mut done) = {
            let state = self.state();
            let entry = state.containers.get(id).ok_or_else(|| Error::container_not_found(id))?;
            match (&entry.live, entry.record.state) {
                (Some(live), ContainerState::Running) => (live.attach.clone(), live.done.clone()),
                _ => return Err(Error::FailedPrecondition(format!("container {id} is not running"))),
            }
        };
        if io.stdin.is_some() && streams.stdin.is_none() {
            tracing::info!(container = id, "attach with stdin to a container without stdin: input is dropped");
        }
        let wasmlet_streaming::Stdio { stdin, stdout, stderr, .. } = io;
        // Subscribed before anything else, so nothing written after the session began is lost.
        let out = stdout.map(|w| pump(streams.stdout.subscribe(), w));
        let err = match stderr {
            Some(w) if !streams.tty => Some(pump(streams.stderr.subscribe(), w)),
            _ => None,
        };
        let input = async {
            let (Some(mut client), Some(pipe)) = (stdin, streams.stdin.clone()) else { return };
            let mut buf = vec![0u8; 16 * 1024];
            loop {
                let n = match tokio::io::AsyncReadExt::read(&mut client, &mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => n,
                };
                let mut guard = pipe.lock().await;
                let Some(w) = guard.as_mut() else { return };
                if w.write_all(&buf[..n]).await.is_err() {
                    return;
                }
            }
            if streams.stdin_once {
                // The first session's end closes the container's stdin for good.
                pipe.lock().await.take();
            }
        };
        let output = async {
            tokio::join!(
                async {
                    if let Some(o) = out {
                        o.await
                    }
                },
                async {
                    if let Some(e) = err {
                        e.await
                    }
                }
            )
        };
        let ended = async {
            let _ = done.wait_for(|ended| *ended).await;
        };
        // The session lasts as long as the container: input is read meanwhile, output drained
        // to its end.
        tokio::select! {
            _ = async { tokio::join!(output, ended) } => {}
            _ = async { input.await; std::future::pending::<()>().await } => {}
        }
        Ok(())
    }
}

/// Copies a tap to a client's stream until the guest ends or the client stops reading.
async fn pump(mut rx: tokio::sync::mpsc::Receiver<bytes::Bytes>, mut w: impl AsyncWrite + Unpin) {
    while let Some(chunk) = rx.recv().await {
        if w.write_all(&chunk).await.is_err() {
            return;
        }
    }
    let _ = w.shutdown().await;
}
