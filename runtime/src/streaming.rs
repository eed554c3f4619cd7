//! The runtime behind the CRI streaming server: exec sessions as new instances in a
//! container's context, attach to a container's own streams, port forwarding from inside a
//! pod's network.

use wasmlet_streaming::{AttachRequest, Backend, ExecRequest, Stdio};

use crate::Runtime;

/// [`Backend`] over a [`Runtime`].
pub struct StreamBackend(pub Runtime);

#[async_trait::async_trait]
impl Backend for StreamBackend {
    async fn exec(&self, req: &ExecRequest, io: Stdio) -> Result<i32, String> {
        self.0.exec_session(&req.container_id, &req.cmd, io).await.map_err(|e| e.to_string())
    }

    async fn attach(&self, req: &AttachRequest, io: Stdio) -> Result<(), String> {
        self.0.attach_session(&req.container_id, io).await.map_err(|e| e.to_string())
    }

    async fn port_forward(&self, sandbox_id: &str, port: u16) -> Result<tokio::net::TcpStream, String> {
        self.0.connect_in_pod(sandbox_id, port).await.map_err(|e| e.to_string())
    }
}
