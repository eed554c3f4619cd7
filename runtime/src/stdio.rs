//! A streaming session's streams as a guest's stdio (exec and attach): stdin from the client,
//! stdout and stderr to it, with backpressure, and a terminal when the session has a tty (the
//! guest's `isatty` is true through WASI, and its stderr goes where its stdout goes, as on a
//! terminal).
//!
//! With a tty, what a pseudo-terminal's line discipline does for a process is done here, as
//! the client's terminal is in raw mode: output newlines become CR LF; input is cooked a
//! line at a time (CR read as a newline, typed characters echoed, erase and kill handled,
//! ^D at the start of a line the end of input, ^C the end of the command).

use std::sync::Arc;

use tokio::io::AsyncWrite;

use wasmtime_wasi::cli::{AsyncStdinStream, AsyncStdoutStream, IsTerminal, StdinStream, StdoutStream};
use wasmtime_wasi::p2::{InputStream, OutputStream};

/// How much a guest's output may get ahead of the client before its writes wait.
const OUTPUT_BUDGET: usize = 64 * 1024;

/// A stream that says whether it is a terminal.
pub struct Term<S> {
    inner: S,
    tty: bool,
}

impl<S> Term<S> {
    pub fn new(inner: S, tty: bool) -> Term<S> {
        Term { inner, tty }
    }
}

impl<S> IsTerminal for Term<S> {
    fn is_terminal(&self) -> bool {
        self.tty
    }
}

impl<S: StdinStream> StdinStream for Term<S> {
    fn async_stream(&self) -> Box<dyn tokio::io::AsyncRead + Send + Sync> {
        self.inner.async_stream()
    }
    fn p2_stream(&self) -> Box<dyn InputStream> {
        self.inner.p2_stream()
    }
}

impl<S: StdoutStream> StdoutStream for Term<S> {
    fn async_stream(&self) -> Box<dyn tokio::io::AsyncWrite + Send + Sync> {
        self.inner.async_stream()
    }
    fn p2_stream(&self) -> Box<dyn OutputStream> {
        self.inner.p2_stream()
    }
}

/// The byte a terminal's ^C sends.
const INTERRUPT: u8 = 0x03;

/// What the client typed, cooked: the lines the guest reads, and the echo the client sees.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Cooked {
    /// Whole lines (and, at ^D, what was typed so far) for the guest.
    pub input: Vec<u8>,
    /// What the client's terminal shows of its typing.
    pub echo: Vec<u8>,
    /// ^D at the start of a line: no more input.
    pub eof: bool,
    /// ^C: the command is to be interrupted.
    pub interrupt: bool,
}

/// A pseudo-terminal's canonical mode, over the bytes a raw-mode client sends.
#[derive(Debug, Default)]
pub struct LineDiscipline {
    line: Vec<u8>,
}

impl LineDiscipline {
    pub fn feed(&mut self, bytes: &[u8]) -> Cooked {
        let mut c = Cooked::default();
        for &b in bytes {
            match b {
                b'\r' | b'\n' => {
                    self.line.push(b'\n');
                    c.input.append(&mut self.line);
                    c.echo.extend_from_slice(b"\r\n");
                }
                // Erase (DEL or BS): the last character typed.
                0x7f | 0x08 => {
                    if self.line.pop().is_some() {
                        c.echo.extend_from_slice(b"\x08 \x08");
                    }
                }
                // Kill (^U): the whole line.
                0x15 => {
                    for _ in 0..self.line.len() {
                        c.echo.extend_from_slice(b"\x08 \x08");
                    }
                    self.line.clear();
                }
                0x04 => {
                    if self.line.is_empty() {
                        c.eof = true;
                        return c;
                    }
                    c.input.append(&mut self.line);
                }
                INTERRUPT => {
                    c.echo.extend_from_slice(b"^C\r\n");
                    c.interrupt = true;
                    self.line.clear();
                    return c;
                }
                _ => {
                    self.line.push(b);
                    c.echo.push(b);
                }
            }
        }
        c
    }
}

/// A pseudo-terminal's output processing: every LF goes out as CR LF.
pub fn crlf(bytes: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(bytes.len() + bytes.len() / 16);
    for &b in bytes {
        if b == b'\n' {
            out.push(b'\r');
        }
        out.push(b);
    }
    out
}

/// A writer shared by the guest's output and the terminal's echo.
type SharedWriter = Arc<tokio::sync::Mutex<wasmlet_streaming::Writer>>;

/// The guest's side of a tty session's output: through [`crlf`] to the shared writer.
struct TtyOut {
    to: SharedWriter,
    /// Processed bytes not yet written.
    pending: Vec<u8>,
}

impl AsyncWrite for TtyOut {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        // One write at a time: what an earlier call took goes out first.
        if !self.pending.is_empty() {
            match self.as_mut().poll_drain(cx) {
                std::task::Poll::Ready(Ok(())) => {}
                other => return other.map(|r| r.map(|_| 0)),
            }
        }
        self.pending = crlf(buf);
        let _ = self.as_mut().poll_drain(cx);
        std::task::Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        self.as_mut().poll_drain(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::task::ready!(self.as_mut().poll_drain(cx))?;
        let Ok(mut w) = self.to.try_lock() else {
            cx.waker().wake_by_ref();
            return std::task::Poll::Pending;
        };
        std::pin::Pin::new(&mut *w).poll_shutdown(cx)
    }
}

impl TtyOut {
    fn poll_drain(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let this = self.get_mut();
        while !this.pending.is_empty() {
            // The echo task holds the lock only for a write: try again soon.
            let Ok(mut w) = this.to.try_lock() else {
                cx.waker().wake_by_ref();
                return std::task::Poll::Pending;
            };
            let n = std::task::ready!(std::pin::Pin::new(&mut *w).poll_write(cx, &this.pending))?;
            if n == 0 {
                return std::task::Poll::Ready(Err(std::io::ErrorKind::WriteZero.into()));
            }
            this.pending.drain(..n);
        }
        let Ok(mut w) = this.to.try_lock() else {
            cx.waker().wake_by_ref();
            return std::task::Poll::Pending;
        };
        std::pin::Pin::new(&mut *w).poll_flush(cx)
    }
}

/// Cooks a tty session's input: lines to `to_guest`, the echo to `out`; ^C fires `interrupt`.
/// It holds the output weakly: when the guest's side goes, the client's stream ends, whether
/// or not the client still types.
async fn cook(
    mut from: wasmlet_streaming::Reader,
    mut to_guest: tokio::io::DuplexStream,
    out: std::sync::Weak<tokio::sync::Mutex<wasmlet_streaming::Writer>>,
    interrupt: tokio::sync::oneshot::Sender<()>,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut ld = LineDiscipline::default();
    let mut buf = vec![0u8; 4096];
    let mut interrupt = Some(interrupt);
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        let c = ld.feed(&buf[..n]);
        if !c.echo.is_empty() {
            let Some(out) = out.upgrade() else { return };
            let mut w = out.lock().await;
            let _ = w.write_all(&c.echo).await;
            let _ = w.flush().await;
        }
        if !c.input.is_empty() && to_guest.write_all(&c.input).await.is_err() {
            return;
        }
        if c.interrupt {
            if let Some(i) = interrupt.take() {
                let _ = i.send(());
            }
            return;
        }
        if c.eof {
            return;
        }
    }
}

/// The stdio of a guest in a session. A stream the client did not ask for is `None` (stdin
/// then reads as empty, output is dropped).
#[derive(Clone, Default)]
pub struct SessionIo {
    pub stdin: Option<Arc<Term<AsyncStdinStream>>>,
    pub stdout: Option<Arc<Term<AsyncStdoutStream>>>,
    pub stderr: Option<Arc<Term<AsyncStdoutStream>>>,
}

impl SessionIo {
    /// The guest's side of a session's streams. With a tty, the line discipline runs on a
    /// task of its own, and the returned receiver fires at ^C.
    pub fn new(io: wasmlet_streaming::Stdio) -> (SessionIo, Option<tokio::sync::oneshot::Receiver<()>>) {
        let tty = io.tty;
        if !tty {
            let stdin = io.stdin.map(|r| Arc::new(Term { inner: AsyncStdinStream::new(r), tty }));
            let stdout = io.stdout.map(|w| Arc::new(Term { inner: AsyncStdoutStream::new(OUTPUT_BUDGET, w), tty }));
            let stderr = io.stderr.map(|w| Arc::new(Term { inner: AsyncStdoutStream::new(OUTPUT_BUDGET, w), tty }));
            return (SessionIo { stdin, stdout, stderr }, None);
        }
        // A terminal: stderr goes where stdout goes; input is cooked, and echoed there too.
        let Some(w) = io.stdout.or(io.stderr) else {
            let stdin = io.stdin.map(|r| Arc::new(Term { inner: AsyncStdinStream::new(r), tty }));
            return (SessionIo { stdin, stdout: None, stderr: None }, None);
        };
        let shared: SharedWriter = Arc::new(tokio::sync::Mutex::new(w));
        let out = TtyOut { to: shared.clone(), pending: Vec::new() };
        let stdout = Some(Arc::new(Term { inner: AsyncStdoutStream::new(OUTPUT_BUDGET, out), tty }));
        let (stdin, interrupted) = match io.stdin {
            Some(r) => {
                let (to_guest, guest) = tokio::io::duplex(64 * 1024);
                let (tx, rx) = tokio::sync::oneshot::channel();
                tokio::spawn(cook(r, to_guest, Arc::downgrade(&shared), tx));
                (Some(Arc::new(Term { inner: AsyncStdinStream::new(guest), tty })), Some(rx))
            }
            None => (None, None),
        };
        (SessionIo { stdin, stderr: stdout.clone(), stdout }, interrupted)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_line_discipline_cooks_raw_input() {
        let mut ld = LineDiscipline::default();
        let c = ld.feed(b"echo hx\x7fi\r");
        assert_eq!(c.input, b"echo hi\n");
        assert_eq!(c.echo, b"echo hx\x08 \x08i\r\n");
        // A line waits for its end; ^U kills it.
        assert!(ld.feed(b"par").input.is_empty());
        assert_eq!(ld.feed(b"tial\n").input, b"partial\n");
        let c = ld.feed(b"gone\x15ok\n");
        assert_eq!(c.input, b"ok\n");
        // ^D: what was typed goes as it is; on an empty line, the end of input.
        assert_eq!(ld.feed(b"no newline\x04").input, b"no newline");
        assert!(ld.feed(b"\x04").eof);
        let c = ld.feed(b"sleep 9\x03");
        assert!(c.interrupt && c.input.is_empty() && c.echo.ends_with(b"^C\r\n"));
    }

    #[test]
    fn terminal_output_ends_lines_with_cr_lf() {
        assert_eq!(crlf(b"a\nb\n"), b"a\r\nb\r\n");
        assert_eq!(crlf(b"no newline"), b"no newline");
    }
}
