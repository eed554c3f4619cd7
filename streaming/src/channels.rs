//! Kubernetes' channel protocols over WebSocket (`channel.k8s.io` and its versions): every
//! message starts with the number of the channel it belongs to. In the base64 variants that
//! number is an ASCII digit and the rest is base64 text; `v5.channel.k8s.io` adds a close signal,
//! a message `[255, channel]` from the client, which half-closes a channel (its stdin reaching
//! its end).

use std::collections::HashMap;

use base64::Engine;
use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::{mpsc, watch};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;

use crate::Error;

/// The protocols the remote command channels are spoken in, best first.
pub const EXEC_PROTOCOLS: &[&str] =
    &["v5.channel.k8s.io", "v4.channel.k8s.io", "v4.base64.channel.k8s.io", "channel.k8s.io", "base64.channel.k8s.io"];
/// SPDY tunnelled through WebSocket binary messages (client-go's port forwarding over
/// WebSocket, KEP-4006).
pub const SPDY_TUNNEL: &str = "SPDY/3.1+portforward.k8s.io";
/// The protocols of port forwarding over WebSocket.
pub const PORT_FORWARD_PROTOCOLS: &[&str] =
    &[SPDY_TUNNEL, "v4.channel.k8s.io", "v4.base64.channel.k8s.io", "channel.k8s.io"];

/// The message number that means "close the channel named by the next byte" (v5).
const CLOSE_SIGNAL: u8 = 255;
/// How much one message carries.
const MAX_MESSAGE: usize = 32 * 1024;

/// How a negotiated protocol frames its messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Framing {
    /// Text messages: a digit, then base64.
    pub base64: bool,
    /// The v5 close signal is understood.
    pub close_signal: bool,
    /// The error channel carries a JSON Status (v4 and later) rather than plain text.
    pub json_status: bool,
}

impl Framing {
    /// The framing of a protocol name ("" when the client asked for none: the oldest).
    pub fn of(protocol: &str) -> Framing {
        Framing {
            base64: protocol.contains("base64"),
            close_signal: protocol.starts_with("v5."),
            json_status: protocol.starts_with("v4.") || protocol.starts_with("v5."),
        }
    }
}

/// Picks the first of the client's protocols that we speak (`""` when it offered none), as
/// apimachinery's wsstream does; `None` when it offered some and we speak none of them.
pub fn negotiate(offered: &[String], supported: &[&str]) -> Option<String> {
    if offered.is_empty() {
        return Some(String::new());
    }
    offered.iter().find(|p| supported.contains(&p.as_str())).cloned()
}

enum Out {
    Message(Message),
    Close,
}

/// Sends on one channel.
#[derive(Clone)]
pub struct ChannelSender {
    channel: u8,
    framing: Framing,
    out: mpsc::Sender<Out>,
}

impl ChannelSender {
    /// Sends `data` on the channel, in messages of at most 32 KiB.
    pub async fn send(&self, data: Bytes) -> Result<(), Error> {
        if data.is_empty() {
            return self.message(&[]).await;
        }
        for piece in data.chunks(MAX_MESSAGE) {
            self.message(piece).await?;
        }
        Ok(())
    }

    async fn message(&self, data: &[u8]) -> Result<(), Error> {
        let m = if self.framing.base64 {
            let mut text = String::with_capacity(1 + data.len() * 4 / 3 + 4);
            text.push((b'0' + self.channel) as char);
            base64::engine::general_purpose::STANDARD.encode_string(data, &mut text);
            Message::text(text)
        } else {
            let mut b = Vec::with_capacity(1 + data.len());
            b.push(self.channel);
            b.extend_from_slice(data);
            Message::binary(b)
        };
        self.out.send(Out::Message(m)).await.map_err(|_| Error::Closed)
    }

    /// Ends the channel. Nothing goes on the wire: the close signal is the client's (its stdin
    /// ending), client-go reads one from a server as an unknown channel, and a server's
    /// channels end with the connection.
    pub async fn finish(&self) -> Result<(), Error> {
        Ok(())
    }
}

/// A WebSocket connection speaking a channel protocol.
#[derive(Clone)]
pub struct Channels {
    framing: Framing,
    out: mpsc::Sender<Out>,
    closed: watch::Receiver<bool>,
}

impl Channels {
    /// Starts reading and writing `ws`. The returned map holds a receiver for each channel in
    /// `readable`: what the client sends on it, ending when it closes the channel or the
    /// connection.
    pub fn start<IO>(
        ws: WebSocketStream<IO>,
        framing: Framing,
        readable: &[u8],
    ) -> (Channels, HashMap<u8, mpsc::Receiver<Bytes>>)
    where
        IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let (mut sink, mut stream) = ws.split();
        let (out_tx, mut out_rx) = mpsc::channel::<Out>(64);
        let (closed_tx, closed_rx) = watch::channel(false);
        let mut routes = HashMap::new();
        let mut receivers = HashMap::new();
        for &ch in readable {
            let (tx, rx) = mpsc::channel(16);
            routes.insert(ch, tx);
            receivers.insert(ch, rx);
        }
        let closed_w = closed_tx.clone();
        tokio::spawn(async move {
            while let Some(item) = out_rx.recv().await {
                match item {
                    Out::Message(m) => {
                        if sink.send(m).await.is_err() {
                            break;
                        }
                    }
                    Out::Close => {
                        // A normal closure: client-go reads any other code as an error.
                        let frame = CloseFrame { code: CloseCode::Normal, reason: "".into() };
                        let _ = sink.send(Message::Close(Some(frame))).await;
                        let _ = sink.close().await;
                        break;
                    }
                }
            }
            let _ = closed_w.send(true);
        });
        tokio::spawn(async move {
            while let Some(msg) = stream.next().await {
                let (ch, data) = match msg {
                    Ok(Message::Binary(b)) if !b.is_empty() => (b[0], b.slice(1..)),
                    Ok(Message::Text(t)) if framing.base64 && !t.is_empty() => {
                        let t = t.as_str();
                        let ch = t.as_bytes()[0].wrapping_sub(b'0');
                        match base64::engine::general_purpose::STANDARD.decode(&t[1..]) {
                            Ok(d) => (ch, Bytes::from(d)),
                            Err(e) => {
                                tracing::debug!(error = %e, "a channel message is not base64; closing");
                                break;
                            }
                        }
                    }
                    Ok(Message::Close(_)) | Err(_) => break,
                    Ok(_) => continue,
                };
                if ch == CLOSE_SIGNAL && framing.close_signal {
                    if let Some(&target) = data.first() {
                        routes.remove(&target);
                    }
                    continue;
                }
                // Messages on channels that are not read (or are closed) are dropped, as
                // wsstream ignores them.
                if let Some(route) = routes.get(&ch)
                    && !data.is_empty()
                    && route.send(data).await.is_err()
                {
                    routes.remove(&ch);
                }
            }
            let _ = closed_tx.send(true);
        });
        (Channels { framing, out: out_tx, closed: closed_rx }, receivers)
    }

    /// A sender for `channel`.
    pub fn sender(&self, channel: u8) -> ChannelSender {
        ChannelSender { channel, framing: self.framing, out: self.out.clone() }
    }

    /// Sends a close frame after everything queued.
    pub async fn close(&self) {
        let _ = self.out.send(Out::Close).await;
    }

    /// Resolves when the connection is gone.
    pub async fn closed(&self) {
        let mut c = self.closed.clone();
        let _ = c.wait_for(|closed| *closed).await;
    }
}

/// A WebSocket as a byte stream: what is written goes out as binary messages, and the payloads
/// of binary messages are what is read (SPDY tunnelled through WebSocket).
pub struct Tunnel<IO> {
    ws: WebSocketStream<IO>,
    pending: Bytes,
}

impl<IO> Tunnel<IO> {
    pub fn new(ws: WebSocketStream<IO>) -> Tunnel<IO> {
        Tunnel { ws, pending: Bytes::new() }
    }
}

impl<IO: AsyncRead + AsyncWrite + Unpin> AsyncRead for Tunnel<IO> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        use std::task::Poll;
        loop {
            if !self.pending.is_empty() {
                let n = self.pending.len().min(buf.remaining());
                let piece = self.pending.split_to(n);
                buf.put_slice(&piece);
                return Poll::Ready(Ok(()));
            }
            match futures_util::ready!(self.ws.poll_next_unpin(cx)) {
                Some(Ok(Message::Binary(b))) => self.pending = b,
                Some(Ok(Message::Close(_))) | None => return Poll::Ready(Ok(())),
                Some(Ok(_)) => {}
                Some(Err(e)) => return Poll::Ready(Err(std::io::Error::other(e))),
            }
        }
    }
}

impl<IO: AsyncRead + AsyncWrite + Unpin> AsyncWrite for Tunnel<IO> {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        use std::task::Poll;
        futures_util::ready!(self.ws.poll_ready_unpin(cx)).map_err(std::io::Error::other)?;
        self.ws.start_send_unpin(Message::binary(buf.to_vec())).map_err(std::io::Error::other)?;
        Poll::Ready(Ok(buf.len()))
    }
    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        self.ws.poll_flush_unpin(cx).map_err(std::io::Error::other)
    }
    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        self.ws.poll_close_unpin(cx).map_err(std::io::Error::other)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn negotiation_takes_the_clients_first_supported_protocol() {
        let offered = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(
            negotiate(&offered(&["v5.channel.k8s.io", "v4.channel.k8s.io"]), EXEC_PROTOCOLS).unwrap(),
            "v5.channel.k8s.io"
        );
        assert_eq!(
            negotiate(&offered(&["bogus", "base64.channel.k8s.io"]), EXEC_PROTOCOLS).unwrap(),
            "base64.channel.k8s.io"
        );
        assert_eq!(negotiate(&offered(&[]), EXEC_PROTOCOLS).unwrap(), "");
        assert_eq!(negotiate(&offered(&["bogus"]), EXEC_PROTOCOLS), None);
        assert_eq!(
            Framing::of("v4.base64.channel.k8s.io"),
            Framing { base64: true, close_signal: false, json_status: true }
        );
        assert_eq!(Framing::of(""), Framing { base64: false, close_signal: false, json_status: false });
    }
}
