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
        .layer(tower::layer::layer_fn(Deadline))
        .add_service(runtime_service)
        .add_service(image_service)
        .serve_with_incoming_shutdown(UnixListenerStream::new(listener), shutdown)
        .await
        .map_err(io::Error::other)
}

/// Ends a call whose client deadline (`grpc-timeout`) passed with DeadlineExceeded, as a Go
/// gRPC server does and critest expects. tonic's own deadline, outside every layer, answers
/// Cancelled; this one fires a millisecond before it, so that it answers first.
#[derive(Clone)]
struct Deadline<S>(S);

/// How much earlier than tonic's this deadline fires.
const DEADLINE_LEAD: std::time::Duration = std::time::Duration::from_millis(1);

impl<S, B> tower::Service<http::Request<B>> for Deadline<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<tonic::body::Body>>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = std::pin::Pin<Box<dyn Future<Output = Result<S::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut std::task::Context<'_>) -> std::task::Poll<Result<(), S::Error>> {
        self.0.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let timeout = req.headers().get("grpc-timeout").and_then(|v| grpc_timeout(v.to_str().ok()?));
        let call = self.0.call(req);
        Box::pin(async move {
            let Some(timeout) = timeout else { return call.await };
            match tokio::time::timeout(timeout.saturating_sub(DEADLINE_LEAD), call).await {
                Ok(r) => r,
                Err(_) => Ok(tonic::Status::deadline_exceeded("the client's deadline passed").into_http()),
            }
        })
    }
}

/// A `grpc-timeout` header's value: up to 8 digits and a unit (H, M, S, m, u, n).
pub(crate) fn grpc_timeout(v: &str) -> Option<std::time::Duration> {
    use std::time::Duration;
    let (digits, unit) = v.split_at(v.len().checked_sub(1)?);
    if digits.is_empty() || digits.len() > 8 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n * 3600),
        "M" => Duration::from_secs(n * 60),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

#[cfg(test)]
mod deadline_tests {
    use super::*;

    #[test]
    fn grpc_timeouts_parse_as_the_spec_writes_them() {
        use std::time::Duration;
        assert_eq!(grpc_timeout("5S"), Some(Duration::from_secs(5)));
        assert_eq!(grpc_timeout("100m"), Some(Duration::from_millis(100)));
        assert_eq!(grpc_timeout("2H"), Some(Duration::from_secs(7200)));
        assert_eq!(grpc_timeout("999999u"), Some(Duration::from_micros(999_999)));
        assert_eq!(grpc_timeout("1n"), Some(Duration::from_nanos(1)));
        for bad in ["", "S", "5", "5x", "123456789S", "-1S", "1.5S"] {
            assert_eq!(grpc_timeout(bad), None, "{bad:?}");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_call_past_its_deadline_ends_with_deadline_exceeded() {
        use tower::{Service, ServiceExt};
        let slow = tower::service_fn(|_: http::Request<()>| async {
            tokio::time::sleep(std::time::Duration::from_secs(10)).await;
            Ok::<_, std::convert::Infallible>(http::Response::new(tonic::body::Body::empty()))
        });
        let mut svc = Deadline(slow);
        let req = http::Request::builder().header("grpc-timeout", "50m").body(()).unwrap();
        let resp = svc.ready().await.unwrap().call(req).await.unwrap();
        let status = tonic::Status::from_header_map(resp.headers()).expect("a status");
        assert_eq!(status.code(), tonic::Code::DeadlineExceeded);
        // Without a deadline the call runs to its end.
        let req = http::Request::builder().body(()).unwrap();
        let resp = svc.ready().await.unwrap().call(req).await.unwrap();
        assert!(tonic::Status::from_header_map(resp.headers()).is_none());
    }
}
