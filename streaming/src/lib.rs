//! The CRI streaming server, as the kubelet's streaming package defines it: Exec, Attach and
//! PortForward answer a single-use URL on this server; a client (crictl, the kubelet, a proxy
//! for kubectl) upgrades a request for that URL to SPDY/3.1 or WebSocket and speaks the remote
//! command or port-forward protocol over it.
//!
//! What runs is behind [`Backend`]: the runtime implements it; this crate only knows the
//! protocols. Layout: `spdy.rs` and `channels.rs` are the two transports, `remotecommand.rs`
//! exec/attach sessions over either, `portforward.rs` port forwarding, `server.rs` the HTTP
//! server and the request cache.

mod channels;
mod error;
mod portforward;
mod remotecommand;
mod server;
pub mod spdy;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::mpsc;

pub use channels::{EXEC_PROTOCOLS as WEBSOCKET_EXEC_PROTOCOLS, Framing, negotiate};
pub use error::Error;
pub use remotecommand::{SPDY_EXEC_PROTOCOLS, Status};
pub use server::{Config, Server};

/// Run a command in a container.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExecRequest {
    pub container_id: String,
    pub cmd: Vec<String>,
    pub tty: bool,
    pub stdin: bool,
    pub stdout: bool,
    pub stderr: bool,
}

/// Attach to a running container's streams.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AttachRequest {
    pub container_id: String,
    pub tty: bool,
    pub stdin: bool,
    pub stdout: bool,
    pub stderr: bool,
}

/// Forward connections to ports in a pod's network.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PortForwardRequest {
    pub sandbox_id: String,
    /// The ports the CRI request named (WebSocket clients name them again in the URL).
    pub ports: Vec<u16>,
}

/// A terminal size, as the resize stream carries it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize)]
pub struct TermSize {
    #[serde(rename = "Width")]
    pub width: u16,
    #[serde(rename = "Height")]
    pub height: u16,
}

/// A reader the backend gets (the client's stdin).
pub type Reader = Box<dyn AsyncRead + Send + Sync + Unpin>;
/// A writer the backend gets (to the client's stdout or stderr). Dropping it ends the stream.
pub type Writer = Box<dyn AsyncWrite + Send + Sync + Unpin>;

/// The client's side of a session, as the backend sees it. A stream the client did not ask for
/// is `None`.
pub struct Stdio {
    pub stdin: Option<Reader>,
    pub stdout: Option<Writer>,
    pub stderr: Option<Writer>,
    pub tty: bool,
    /// Terminal sizes, when `tty` (the first one usually comes at once).
    pub resize: Option<mpsc::Receiver<TermSize>>,
}

/// Where a stream's output goes: a SPDY stream or a WebSocket channel.
#[derive(Clone)]
enum Out {
    Spdy(spdy::StreamSender),
    Ws(channels::ChannelSender),
}

impl Out {
    async fn send(&self, b: bytes::Bytes) -> Result<(), Error> {
        match self {
            Out::Spdy(s) => s.send(b).await,
            Out::Ws(s) => s.send(b).await,
        }
    }

    async fn finish(&self) -> Result<(), Error> {
        match self {
            Out::Spdy(s) => s.finish().await,
            Out::Ws(s) => s.finish().await,
        }
    }
}

/// A failed TCP dial in Go's words (`dial tcp4 127.0.0.1:80: connect: connection refused`),
/// which is what clients of a kubelet read (port-forward errors, probe output). `network` is
/// Go's: `tcp`, `tcp4`.
pub fn go_dial_error(network: &str, addr: std::net::SocketAddr, e: &std::io::Error) -> String {
    use std::io::ErrorKind as K;
    let what = match e.kind() {
        K::ConnectionRefused => "connect: connection refused".to_string(),
        K::TimedOut => "i/o timeout".to_string(),
        K::HostUnreachable => "connect: no route to host".to_string(),
        K::NetworkUnreachable => "connect: network is unreachable".to_string(),
        _ => {
            let text = e.to_string();
            text.split(" (os error").next().unwrap_or(&text).to_lowercase()
        }
    };
    format!("dial {network} {addr}: {what}")
}

/// What the streaming server asks of the runtime. A session's future is dropped when its client
/// goes away: dropping must stop what it started.
#[async_trait::async_trait]
pub trait Backend: Send + Sync + 'static {
    /// Runs `req.cmd` in the container and returns its exit code. `Err` is a failure to run it
    /// at all, worded for the user.
    async fn exec(&self, req: &ExecRequest, io: Stdio) -> Result<i32, String>;
    /// Connects the client to the container's streams until the container ends or the client
    /// leaves.
    async fn attach(&self, req: &AttachRequest, io: Stdio) -> Result<(), String>;
    /// A connection to `port` on the pod's loopback, from inside its network.
    async fn port_forward(&self, sandbox_id: &str, port: u16) -> Result<tokio::net::TcpStream, String>;
}
