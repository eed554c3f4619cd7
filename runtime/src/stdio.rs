//! A streaming session's streams as a guest's stdio (exec and attach): stdin from the client,
//! stdout and stderr to it, with backpressure, and a terminal when the session has a tty (the
//! guest's `isatty` is true through WASI, and its stderr goes where its stdout goes, as on a
//! terminal).

use std::sync::Arc;

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

/// The stdio of a guest in a session. A stream the client did not ask for is `None` (stdin
/// then reads as empty, output is dropped).
#[derive(Clone, Default)]
pub struct SessionIo {
    pub stdin: Option<Arc<Term<AsyncStdinStream>>>,
    pub stdout: Option<Arc<Term<AsyncStdoutStream>>>,
    pub stderr: Option<Arc<Term<AsyncStdoutStream>>>,
}

impl SessionIo {
    /// The guest's side of a session's streams.
    pub fn new(io: wasmlet_streaming::Stdio) -> SessionIo {
        let tty = io.tty;
        let stdin = io.stdin.map(|r| Arc::new(Term { inner: AsyncStdinStream::new(r), tty }));
        let stdout = io.stdout.map(|w| Arc::new(Term { inner: AsyncStdoutStream::new(OUTPUT_BUDGET, w), tty }));
        let stderr = match io.stderr {
            Some(w) => Some(Arc::new(Term { inner: AsyncStdoutStream::new(OUTPUT_BUDGET, w), tty })),
            None if tty => stdout.clone(),
            None => None,
        };
        SessionIo { stdin, stdout, stderr }
    }
}
