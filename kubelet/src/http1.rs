//! The probes' and hooks' HTTP/1.1 client: one request over a fresh connection, plain or
//! TLS, and the answer read by hand (one buffer, no connection task), for the thousands of
//! probes a second a node sends. TLS is the kubelet's: no certificate verification.

use std::net::IpAddr;
use std::sync::Arc;

/// The most of a body read (the kubelet's limit; also the most of a probe's output kept).
pub const MAX_OUTPUT: usize = 10 * 1024;

/// What a server answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    pub status: u16,
    pub location: Option<String>,
    /// Up to MAX_OUTPUT bytes, lossily UTF-8.
    pub body: String,
}

/// Sends `request` on `stream` (inside TLS to `tls` when given) and reads the answer. A TLS
/// handshake answered in plain HTTP fails with Go's words for it, which the kubelet's HTTPS
/// hooks look for to fall back to HTTP.
pub async fn send(stream: tokio::net::TcpStream, tls: Option<IpAddr>, request: &[u8]) -> std::io::Result<Answer> {
    let Some(ip) = tls else { return exchange(stream, request).await };
    let mut peek = FirstBytes { inner: stream, first: Vec::new() };
    let name = rustls::pki_types::ServerName::IpAddress(ip.into());
    let answered = match tls_connector().connect(name, &mut peek).await {
        Ok(tls) => Ok(exchange(tls, request).await),
        Err(e) => Err(e),
    };
    match answered {
        Ok(answer) => answer,
        Err(_) if peek.first.starts_with(b"HTTP/") => {
            Err(std::io::Error::other("http: server gave HTTP response to HTTPS client"))
        }
        Err(e) => Err(std::io::Error::new(e.kind(), format!("tls: {e}"))),
    }
}

/// Sends one request on a fresh connection and reads the answer: its status, its Location
/// and up to MAX_OUTPUT bytes of its body (by Content-Length, chunks, or until the close).
async fn exchange(
    mut stream: impl tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    request: &[u8],
) -> std::io::Result<Answer> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let broken = |what: String| std::io::Error::new(std::io::ErrorKind::InvalidData, what);
    stream.write_all(request).await?;
    let mut buf: Vec<u8> = Vec::with_capacity(960);
    // The head (1xx answers skipped).
    let (status, location, framing, head_len) = loop {
        let mut fields = [httparse::EMPTY_HEADER; 64];
        let mut head = httparse::Response::new(&mut fields);
        let len = match head.parse(&buf) {
            Ok(httparse::Status::Complete(len)) => len,
            Ok(httparse::Status::Partial) if buf.len() < 64 * 1024 => {
                if stream.read_buf(&mut buf).await? == 0 {
                    return Err(std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "EOF"));
                }
                continue;
            }
            Ok(httparse::Status::Partial) => return Err(broken("server response headers exceeded 65536 bytes".into())),
            Err(e) => return Err(broken(format!("malformed HTTP response: {e}"))),
        };
        let status = head.code.unwrap_or(0);
        if (100..200).contains(&status) && status != 101 {
            buf.drain(..len);
            continue;
        }
        let field = |name: &str| {
            head.headers
                .iter()
                .find(|h| h.name.eq_ignore_ascii_case(name))
                .map(|h| String::from_utf8_lossy(h.value).trim().to_string())
        };
        let framing = if field("transfer-encoding").is_some_and(|t| t.to_ascii_lowercase().ends_with("chunked")) {
            Framing::Chunked
        } else if let Some(n) = field("content-length") {
            Framing::Length(n.parse().map_err(|_| broken(format!("bad Content-Length {n:?}")))?)
        } else {
            Framing::UntilClose
        };
        break (status, field("location"), framing, len);
    };
    buf.drain(..head_len);
    let mut body = Vec::new();
    match framing {
        Framing::Length(n) => {
            let want = n.min(MAX_OUTPUT);
            while buf.len() < want && stream.read_buf(&mut buf).await? > 0 {}
            buf.truncate(want);
            body = buf;
        }
        Framing::UntilClose => {
            while buf.len() < MAX_OUTPUT && stream.read_buf(&mut buf).await? > 0 {}
            buf.truncate(MAX_OUTPUT);
            body = buf;
        }
        Framing::Chunked => {
            // Each chunk: its size in hex, CRLF, the data, CRLF; a size of 0 ends the body.
            'chunks: while body.len() < MAX_OUTPUT {
                let (start, size) = loop {
                    match httparse::parse_chunk_size(&buf) {
                        Ok(httparse::Status::Complete((start, size))) => break (start, size as usize),
                        Ok(httparse::Status::Partial) => {
                            if stream.read_buf(&mut buf).await? == 0 {
                                break 'chunks;
                            }
                        }
                        Err(_) => return Err(broken("malformed chunked encoding".into())),
                    }
                };
                if size == 0 {
                    break;
                }
                // No more than the body still has room for: a server may announce any size.
                let wanted = start + size.min(MAX_OUTPUT - body.len());
                while buf.len() < wanted && stream.read_buf(&mut buf).await? > 0 {}
                let end = wanted.min(buf.len());
                body.extend_from_slice(&buf[start..end]);
                if end - start < size {
                    break;
                }
                while buf.len() < end + 2 && stream.read_buf(&mut buf).await? > 0 {}
                buf.drain(..(end + 2).min(buf.len()));
            }
            body.truncate(MAX_OUTPUT);
        }
    }
    Ok(Answer { status, location, body: String::from_utf8_lossy(&body).into_owned() })
}

/// How a response's body is delimited.
enum Framing {
    Length(usize),
    Chunked,
    UntilClose,
}

/// TLS as the kubelet's probe and hook clients use it: the server's certificate is not
/// verified (the handshake's signatures still are), and an IP address gets no SNI.
fn tls_connector() -> tokio_rustls::TlsConnector {
    static CONNECTOR: std::sync::OnceLock<tokio_rustls::TlsConnector> = std::sync::OnceLock::new();
    CONNECTOR
        .get_or_init(|| {
            let provider = Arc::new(rustls::crypto::ring::default_provider());
            let config = rustls::ClientConfig::builder_with_provider(provider.clone())
                .with_safe_default_protocol_versions()
                .expect("rustls protocol versions")
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(AnyCertificate(provider)))
                .with_no_client_auth();
            tokio_rustls::TlsConnector::from(Arc::new(config))
        })
        .clone()
}

/// Accepts any certificate (Go's InsecureSkipVerify); checks the handshake's signatures.
#[derive(Debug)]
struct AnyCertificate(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for AnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &rustls::pki_types::CertificateDer<'_>,
        _intermediates: &[rustls::pki_types::CertificateDer<'_>],
        _server_name: &rustls::pki_types::ServerName<'_>,
        _ocsp_response: &[u8],
        _now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// A stream that keeps the first bytes read from it: what the server sent, when a TLS
/// handshake fails.
struct FirstBytes<S> {
    inner: S,
    first: Vec<u8>,
}

impl<S: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for FirstBytes<S> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let r = std::pin::Pin::new(&mut self.inner).poll_read(cx, buf);
        let new = &buf.filled()[before..];
        let take = new.len().min(8usize.saturating_sub(self.first.len()));
        let head = new[..take].to_vec();
        self.first.extend_from_slice(&head);
        r
    }
}

impl<S: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for FirstBytes<S> {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        data: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.inner).poll_write(cx, data)
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::SocketAddr;
    use std::time::Duration;

    /// Answers one connection with `answer`, its first 256 bytes written in pieces of `piece`
    /// bytes; returns the address and what the client sent.
    async fn raw_server(answer: Vec<u8>, piece: usize) -> (SocketAddr, tokio::task::JoinHandle<String>) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let task = tokio::spawn(async move {
            let (mut s, _) = l.accept().await.unwrap();
            let mut got = Vec::new();
            while !got.ends_with(b"\r\n\r\n") {
                let mut b = [0u8; 512];
                let n = s.read(&mut b).await.unwrap();
                got.extend_from_slice(&b[..n]);
            }
            // The first 256 bytes in pieces, then the rest; the client may close early.
            let (first, rest) = answer.split_at(answer.len().min(256));
            for part in first.chunks(piece).chain([rest]) {
                if s.write_all(part).await.is_err() || s.flush().await.is_err() {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            String::from_utf8(got).unwrap()
        });
        (addr, task)
    }

    #[tokio::test]
    async fn http_exchange_reads_every_framing() {
        let long = "x".repeat(MAX_OUTPUT + 100);
        let cases: Vec<(String, u16, &str)> = vec![
            ("HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello".into(), 200, "hello"),
            (
                "HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 201 Created\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n7;x=y\r\n, world\r\n0\r\n\r\n"
                    .into(),
                201,
                "hello, world",
            ),
            ("HTTP/1.0 503 Service Unavailable\r\n\r\ndown until close".into(), 503, "down until close"),
            (format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{long}", long.len()), 200, &long[..MAX_OUTPUT]),
            (format!("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n{:x}\r\n{long}\r\n0\r\n\r\n", long.len()), 200, &long[..MAX_OUTPUT]),
        ];
        for (answer, status, body) in cases {
            // In pieces of 3 bytes: every boundary falls inside something.
            let (addr, sent) = raw_server(answer.clone().into_bytes(), 3).await;
            let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
            let got = exchange(stream, b"GET /x HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n").await.unwrap();
            assert_eq!((got.status, got.body.as_str()), (status, body), "{answer:.80}");
            assert!(sent.await.unwrap().starts_with("GET /x HTTP/1.1\r\nHost: h\r\n"));
        }
        // A 1xx head and the answer in one piece: the answer is parsed from what was read.
        let (addr, _) = raw_server(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 204 No Content\r\n\r\n".to_vec(), 256).await;
        let got =
            exchange(tokio::net::TcpStream::connect(addr).await.unwrap(), b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
        assert_eq!(got.status, 204);
        // A chunk announced larger than anything: read up to the limit, no further.
        let answer = format!("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nffffffffffffffff\r\n{long}");
        let (addr, _) = raw_server(answer.into_bytes(), 256).await;
        let got =
            exchange(tokio::net::TcpStream::connect(addr).await.unwrap(), b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
        assert_eq!(got.body, long[..MAX_OUTPUT]);
        let (addr, _) =
            raw_server(b"HTTP/1.1 302 Found\r\nLocation: /next\r\nContent-Length: 0\r\n\r\n".to_vec(), 64).await;
        let got =
            exchange(tokio::net::TcpStream::connect(addr).await.unwrap(), b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
        assert_eq!((got.status, got.location.as_deref()), (302, Some("/next")));
        let (addr, _) = raw_server(b"SSH-2.0-OpenSSH\r\n\r\n".to_vec(), 64).await;
        let err =
            exchange(tokio::net::TcpStream::connect(addr).await.unwrap(), b"GET / HTTP/1.1\r\n\r\n").await.unwrap_err();
        assert!(err.to_string().starts_with("malformed HTTP response"), "{err}");
        let (addr, _) = raw_server(Vec::new(), 1).await;
        let err =
            exchange(tokio::net::TcpStream::connect(addr).await.unwrap(), b"GET / HTTP/1.1\r\n\r\n").await.unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::UnexpectedEof);
    }
}
