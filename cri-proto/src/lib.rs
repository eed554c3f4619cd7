//! The CRI v1 contract (`runtime.v1`) as prost messages and tonic services.
//!
//! `proto/api.proto` is wasmlet's own statement of the upstream contract, wire-compatible with
//! kubernetes/cri-api at the Kubernetes 1.36 level. This crate holds no logic.

#![allow(missing_docs, clippy::all)]

/// Generated messages, enums, `runtime_service_{client,server}` and `image_service_{client,server}`.
pub mod v1 {
    tonic::include_proto!("runtime.v1");
}

pub use v1::*;

/// Largest gRPC message a CRI client or server takes or sends: the kubelet's own limit
/// (tonic's default of 4 MiB is too small for the stats of 10,000 containers).
pub const MAX_MESSAGE_BYTES: usize = 16 * 1024 * 1024;

/// Connects a tonic channel to a CRI server listening on the unix socket at `path`.
pub async fn connect_unix(
    path: impl AsRef<std::path::Path>,
) -> Result<tonic::transport::Channel, tonic::transport::Error> {
    let path = path.as_ref().to_path_buf();
    // The URI is required by the API but unused: every connection goes to the socket.
    tonic::transport::Endpoint::from_static("http://localhost")
        .connect_with_connector(tower::service_fn(move |_: tonic::transport::Uri| {
            let path = path.clone();
            async move {
                let stream = tokio::net::UnixStream::connect(path).await?;
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(stream))
            }
        }))
        .await
}
