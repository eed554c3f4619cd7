//! Serving the CRI on a unix socket.

use std::future::Future;
use std::io;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::Path;

use cri_proto::v1::image_service_server::ImageServiceServer;
use cri_proto::v1::runtime_service_server::RuntimeServiceServer;
use tokio::net::{UnixListener, UnixStream};
use tokio_stream::wrappers::UnixListenerStream;

use crate::Runtime;
use crate::cri::CriServer;

pub use cri_proto::MAX_MESSAGE_BYTES;

/// Binds the CRI socket at `path`: its directory is created, the socket gets mode 0600 before
/// anyone can connect, a stale socket is replaced, and a live one (another server) is refused.
pub async fn bind(path: &Path) -> io::Result<UnixListener> {
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir)?;
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => {
            if UnixStream::connect(path).await.is_ok() {
                return Err(io::Error::new(
                    io::ErrorKind::AddrInUse,
                    format!("{}: another server is listening on this socket", path.display()),
                ));
            }
            tracing::info!(socket = %path.display(), "replacing stale socket");
            std::fs::remove_file(path)?;
        }
        Ok(_) => {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                format!("{}: exists and is not a socket; not replacing it", path.display()),
            ));
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    // Bind under a temporary name, restrict it, then move it into place: the socket is never
    // reachable with looser permissions.
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("cri.sock");
    let tmp = dir.join(format!(".{name}.{}.tmp", rand::random::<u32>()));
    let listener = UnixListener::bind(&tmp)?;
    let placed = std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600))
        .and_then(|()| std::fs::rename(&tmp, path));
    if let Err(e) = placed {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    Ok(listener)
}

/// Serves RuntimeService and ImageService on `listener` until `shutdown` resolves, and the
/// streaming server (exec, attach, port-forward) on the runtime's stream address.
pub async fn serve(
    runtime: Runtime,
    listener: UnixListener,
    shutdown: impl Future<Output = ()> + Send,
) -> io::Result<()> {
    let cfg = wasmlet_streaming::Config { addr: runtime.stream_address(), ..Default::default() };
    let backend = std::sync::Arc::new(crate::streaming::StreamBackend(runtime.clone()));
    let streaming = wasmlet_streaming::Server::start(cfg.clone(), backend)
        .await
        .map_err(|e| io::Error::new(e.kind(), format!("streaming server on {}: {e}", cfg.addr)))?;
    let server = CriServer::new(runtime, streaming);
    let runtime_service = RuntimeServiceServer::new(server.clone())
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES);
    let image_service = ImageServiceServer::new(server)
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES);
    tonic::transport::Server::builder()
        .add_service(runtime_service)
        .add_service(image_service)
        .serve_with_incoming_shutdown(UnixListenerStream::new(listener), shutdown)
        .await
        .map_err(io::Error::other)
}
