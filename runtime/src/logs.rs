//! Guest stdout/stderr: CRI log files and capped in-memory capture (for ExecSync), and the
//! taps attached clients read a container's output from.
//!
//! A CRI log record is `<RFC3339Nano UTC> <stdout|stderr> <P|F> <text>\n`. A guest's output is
//! cut at newlines; a line longer than [`MAX_LINE`] is written as `P` pieces followed by an `F`
//! piece, as containerd does, and a last line without a newline is written as `F` when the
//! guest ends.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Poll};

use bytes::Bytes;

use crate::descriptors;
pub use wasmlet_images::timefmt::{now_rfc3339, rfc3339_nanos};
use wasmtime_wasi::cli::{IsTerminal, StdoutStream};
use wasmtime_wasi::p2::{OutputStream, Pollable, StreamResult};

/// Longest text in one log record (containerd's default `max_container_log_line_size`).
pub const MAX_LINE: usize = 16 * 1024;

/// Which guest stream a record came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stream {
    /// File descriptor 1.
    Stdout,
    /// File descriptor 2.
    Stderr,
}

impl Stream {
    fn name(self) -> &'static str {
        match self {
            Stream::Stdout => "stdout",
            Stream::Stderr => "stderr",
        }
    }
}

/// A container's CRI log file, shared by its stdout and stderr; reopened on log rotation.
///
/// With a bound, the file may grow to it between rotations; past it the guest's writes wait
/// (its output streams report no room) until the kubelet rotates the file and asks for a
/// reopen: a guest printing at full speed fills no disk, and only it waits.
///
/// Its descriptor counts against the log files' budget (`descriptors::LOGS`): closed while others are written to, and
/// reopened by path on the next write, so idle containers hold none.
pub struct LogFile {
    path: PathBuf,
    /// None while closed to save the descriptor.
    file: Mutex<Option<File>>,
    /// Bytes in the file now (appended since it was opened, and what it held then).
    size: AtomicU64,
    bound: Option<u64>,
    /// Wakes writers waiting for room: the file was reopened.
    reopened: tokio::sync::Notify,
    me: Weak<LogFile>,
}

impl LogFile {
    /// Opens (creating it and its directory if needed) the log file at `path` for appending.
    pub fn open(path: &Path) -> io::Result<Arc<LogFile>> {
        LogFile::open_bounded(path, None)
    }

    /// Like [`LogFile::open`]; writes wait while the file holds `bound` bytes or more.
    pub fn open_bounded(path: &Path, bound: Option<u64>) -> io::Result<Arc<LogFile>> {
        let file = open_append(path)?;
        let size = file.metadata()?.len();
        let log = Arc::new_cyclic(|me| LogFile {
            path: path.to_path_buf(),
            file: Mutex::new(Some(file)),
            size: AtomicU64::new(size),
            bound,
            reopened: tokio::sync::Notify::new(),
            me: me.clone(),
        });
        log.opened();
        Ok(log)
    }

    fn opened(&self) {
        descriptors::LOGS.opened(self.me.clone());
    }

    /// Closes and reopens the file by path, after the kubelet renamed it for rotation.
    pub fn reopen(&self) -> io::Result<()> {
        let fresh = open_append(&self.path)?;
        let size = fresh.metadata()?.len();
        let was_closed = self.file.lock().unwrap_or_else(|e| e.into_inner()).replace(fresh).is_none();
        self.size.store(size, Ordering::Relaxed);
        self.reopened.notify_waiters();
        if was_closed {
            self.opened();
        }
        Ok(())
    }

    /// The file holds its bound: writers wait for a rotation.
    pub fn full(&self) -> bool {
        self.bound.is_some_and(|b| self.size.load(Ordering::Relaxed) >= b)
    }

    /// Returns once the file has room.
    async fn room(&self) {
        loop {
            let reopened = self.reopened.notified();
            tokio::pin!(reopened);
            reopened.as_mut().enable();
            if !self.full() {
                return;
            }
            reopened.await;
        }
    }

    fn append(&self, bytes: &[u8]) {
        let mut reopened = false;
        let written = {
            let mut f = self.file.lock().unwrap_or_else(|e| e.into_inner());
            if f.is_none() {
                // By path: after a rotation that did not reach us yet this starts the new file.
                let fresh = open_append(&self.path).and_then(|file| Ok((file.metadata()?.len(), file)));
                match fresh {
                    Ok((size, file)) => {
                        self.size.store(size, Ordering::Relaxed);
                        *f = Some(file);
                        reopened = true;
                    }
                    Err(e) => {
                        tracing::warn!(path = %self.path.display(), error = %e, "cannot reopen container log");
                        return;
                    }
                }
            }
            f.as_mut().expect("opened above").write_all(bytes)
        };
        match written {
            Ok(()) => {
                self.size.fetch_add(bytes.len() as u64, Ordering::Relaxed);
            }
            Err(e) => tracing::warn!(path = %self.path.display(), error = %e, "cannot write container log"),
        }
        if reopened {
            self.opened();
        }
    }
}

impl descriptors::Reopens for LogFile {
    fn close_idle(&self) {
        self.file.lock().unwrap_or_else(|e| e.into_inner()).take();
    }
}

fn open_append(path: &Path) -> io::Result<File> {
    if let Some(dir) = path.parent() {
        fs::create_dir_all(dir)?;
    }
    OpenOptions::new().create(true).append(true).open(path)
}

/// Where a guest stream's bytes end up.
#[derive(Clone)]
enum Target {
    Log(Arc<LogFile>),
    /// Capture up to a byte limit; what goes past it is dropped without an error to the guest.
    Capture(Arc<Mutex<Vec<u8>>>, usize),
    Discard,
}

/// One guest output stream. Cloned handles share the pending partial line, so every stream
/// object WASI makes for fd 1 (or 2) writes through the same line buffer.
#[derive(Clone)]
pub struct GuestOutput {
    stream: Stream,
    target: Target,
    pending: Arc<Mutex<Vec<u8>>>,
    /// Attached clients (a container's output; none for exec).
    taps: Option<Taps>,
    /// The guest sees a terminal (a container with `tty`).
    terminal: bool,
}

impl GuestOutput {
    /// Writes records into `log`.
    pub fn log(stream: Stream, log: Arc<LogFile>) -> GuestOutput {
        GuestOutput::new(stream, Target::Log(log))
    }

    /// Keeps at most `limit` bytes in memory, readable with [`GuestOutput::captured`].
    pub fn capture(stream: Stream, limit: usize) -> GuestOutput {
        GuestOutput::new(stream, Target::Capture(Arc::new(Mutex::new(Vec::new())), limit))
    }

    /// Drops everything (a container without a log path).
    pub fn discard(stream: Stream) -> GuestOutput {
        GuestOutput::new(stream, Target::Discard)
    }

    fn new(stream: Stream, target: Target) -> GuestOutput {
        GuestOutput { stream, target, pending: Arc::new(Mutex::new(Vec::new())), taps: None, terminal: false }
    }

    /// Also hands every write to the clients attached to `taps`.
    pub fn tapped(mut self, taps: Taps) -> GuestOutput {
        self.taps = Some(taps);
        self
    }

    /// Tells the guest whether this stream is a terminal.
    pub fn terminal(mut self, tty: bool) -> GuestOutput {
        self.terminal = tty;
        self
    }

    /// The bytes captured so far (empty for other targets).
    pub fn captured(&self) -> Vec<u8> {
        match &self.target {
            Target::Capture(buf, _) => buf.lock().unwrap_or_else(|e| e.into_inner()).clone(),
            _ => Vec::new(),
        }
    }

    fn write(&self, bytes: &[u8]) {
        if let Some(taps) = &self.taps {
            taps.send(bytes);
        }
        match &self.target {
            Target::Discard => {}
            Target::Capture(buf, limit) => {
                let mut buf = buf.lock().unwrap_or_else(|e| e.into_inner());
                let room = limit.saturating_sub(buf.len());
                buf.extend_from_slice(&bytes[..bytes.len().min(room)]);
            }
            Target::Log(log) => {
                let mut pending = self.pending.lock().unwrap_or_else(|e| e.into_inner());
                let records = cut_records(&mut pending, bytes, self.stream, &now_rfc3339());
                if !records.is_empty() {
                    log.append(&records);
                }
            }
        }
    }

    /// Writes out a pending unterminated line as a full record and lets attached clients go:
    /// the guest has ended.
    pub fn finish(&self) {
        if let Some(taps) = &self.taps {
            taps.close();
        }
        if let Target::Log(log) = &self.target {
            let mut pending = self.pending.lock().unwrap_or_else(|e| e.into_inner());
            if !pending.is_empty() {
                let mut out = Vec::new();
                push_record(&mut out, &now_rfc3339(), self.stream, 'F', &pending);
                pending.clear();
                log.append(&out);
            }
        }
    }
}

/// Appends `input` to the partial line in `pending` and returns the finished records: one `F`
/// record per newline, and `P` records for every `MAX_LINE` bytes without one.
fn cut_records(pending: &mut Vec<u8>, input: &[u8], stream: Stream, ts: &str) -> Vec<u8> {
    let mut out = Vec::new();
    let mut rest = input;
    while !rest.is_empty() {
        let room = MAX_LINE - pending.len();
        match rest.iter().position(|&b| b == b'\n') {
            Some(i) if i <= room => {
                pending.extend_from_slice(&rest[..i]);
                push_record(&mut out, ts, stream, 'F', pending);
                pending.clear();
                rest = &rest[i + 1..];
            }
            // No newline within reach, and all of it fits: wait for the rest of the line.
            _ if rest.len() <= room => {
                pending.extend_from_slice(rest);
                rest = &[];
            }
            _ => {
                pending.extend_from_slice(&rest[..room]);
                push_record(&mut out, ts, stream, 'P', pending);
                pending.clear();
                rest = &rest[room..];
            }
        }
    }
    out
}

fn push_record(out: &mut Vec<u8>, ts: &str, stream: Stream, tag: char, text: &[u8]) {
    out.extend_from_slice(ts.as_bytes());
    out.push(b' ');
    out.extend_from_slice(stream.name().as_bytes());
    out.push(b' ');
    out.push(tag as u8);
    out.push(b' ');
    out.extend_from_slice(text);
    out.push(b'\n');
}

impl IsTerminal for GuestOutput {
    fn is_terminal(&self) -> bool {
        self.terminal
    }
}

/// How many chunks an attached client may fall behind before it misses output. A slow client
/// never holds the guest up (its output still reaches the log in full).
const TAP_QUEUE: usize = 256;

/// The clients attached to one container stream. Clones share them.
#[derive(Clone, Default)]
pub struct Taps(Arc<Mutex<Vec<tokio::sync::mpsc::Sender<Bytes>>>>);

impl Taps {
    /// A new client: it gets what is written from now on, and `None` once the guest has ended.
    pub fn subscribe(&self) -> tokio::sync::mpsc::Receiver<Bytes> {
        let (tx, rx) = tokio::sync::mpsc::channel(TAP_QUEUE);
        self.0.lock().unwrap_or_else(|e| e.into_inner()).push(tx);
        rx
    }

    fn send(&self, bytes: &[u8]) {
        let mut taps = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if taps.is_empty() {
            return;
        }
        let chunk = Bytes::copy_from_slice(bytes);
        taps.retain(|tx| match tx.try_send(chunk.clone()) {
            Ok(()) => true,
            Err(tokio::sync::mpsc::error::TrySendError::Full(_)) => {
                tracing::warn!(bytes = chunk.len(), "an attached client falls behind: output dropped for it");
                true
            }
            Err(tokio::sync::mpsc::error::TrySendError::Closed(_)) => false,
        });
    }

    fn close(&self) {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).clear();
    }
}

impl StdoutStream for GuestOutput {
    fn p2_stream(&self) -> Box<dyn OutputStream> {
        Box::new(self.clone())
    }
    fn async_stream(&self) -> Box<dyn tokio::io::AsyncWrite + Send + Sync> {
        Box::new(self.clone())
    }
}

impl OutputStream for GuestOutput {
    fn write(&mut self, bytes: Bytes) -> StreamResult<()> {
        GuestOutput::write(self, &bytes);
        Ok(())
    }
    fn flush(&mut self) -> StreamResult<()> {
        Ok(())
    }
    fn check_write(&mut self) -> StreamResult<usize> {
        match &self.target {
            Target::Log(log) if log.full() => Ok(0),
            _ => Ok(1024 * 1024),
        }
    }
}

#[wasmtime_wasi::async_trait]
impl Pollable for GuestOutput {
    async fn ready(&mut self) {
        if let Target::Log(log) = &self.target {
            log.room().await;
        }
    }
}

impl tokio::io::AsyncWrite for GuestOutput {
    fn poll_write(self: Pin<&mut Self>, _: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        GuestOutput::write(&self, buf);
        Poll::Ready(Ok(buf.len()))
    }
    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn records(chunks: &[&[u8]]) -> Vec<String> {
        let mut pending = Vec::new();
        let mut out = Vec::new();
        for c in chunks {
            out.extend(cut_records(&mut pending, c, Stream::Stdout, "T"));
        }
        String::from_utf8(out).unwrap().lines().map(str::to_string).collect()
    }

    #[test]
    fn lines_and_partials() {
        assert_eq!(records(&[b"a\nb\n"]), ["T stdout F a", "T stdout F b"]);
        assert_eq!(records(&[b"he", b"llo\n"]), ["T stdout F hello"]);
        assert_eq!(records(&[b"\n"]), ["T stdout F "]);
        assert!(records(&[b"no newline yet"]).is_empty());
    }

    #[test]
    fn long_lines_are_cut_into_partials() {
        let long = vec![b'x'; MAX_LINE * 2 + 5];
        let mut input = long.clone();
        input.push(b'\n');
        let r = records(&[&input]);
        assert_eq!(r.len(), 3);
        assert_eq!(r[0], format!("T stdout P {}", "x".repeat(MAX_LINE)));
        assert_eq!(r[1], format!("T stdout P {}", "x".repeat(MAX_LINE)));
        assert_eq!(r[2], "T stdout F xxxxx");
        // Exactly MAX_LINE then newline is one full record.
        let mut exact = vec![b'y'; MAX_LINE];
        exact.push(b'\n');
        assert_eq!(records(&[&exact]), [format!("T stdout F {}", "y".repeat(MAX_LINE))]);
        // Written in small pieces, the result is the same.
        let pieces: Vec<&[u8]> = input.chunks(1000).collect();
        assert_eq!(records(&pieces), r);
    }

    #[tokio::test]
    async fn a_full_log_makes_writers_wait_for_its_rotation() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("0.log");
        let log = LogFile::open_bounded(&path, Some(100)).unwrap();
        let mut out = GuestOutput::log(Stream::Stdout, log.clone());
        assert!(OutputStream::check_write(&mut out).unwrap() > 0);
        OutputStream::write(&mut out, Bytes::from(vec![b'a'; 200])).unwrap();
        OutputStream::write(&mut out, Bytes::from_static(b"\n")).unwrap();
        assert!(log.full());
        assert_eq!(OutputStream::check_write(&mut out).unwrap(), 0, "no room until a rotation");
        let mut waiter = out.clone();
        let waiting = tokio::spawn(async move { Pollable::ready(&mut waiter).await });
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        assert!(!waiting.is_finished(), "the writer waits");
        std::fs::rename(&path, dir.path().join("0.log.1")).unwrap();
        log.reopen().unwrap();
        tokio::time::timeout(std::time::Duration::from_secs(5), waiting).await.unwrap().unwrap();
        assert!(OutputStream::check_write(&mut out).unwrap() > 0);
        // Unbounded logs never wait.
        let free = LogFile::open(&dir.path().join("1.log")).unwrap();
        let mut out = GuestOutput::log(Stream::Stdout, free.clone());
        OutputStream::write(&mut out, Bytes::from(vec![b'b'; 4096])).unwrap();
        assert!(!free.full() && OutputStream::check_write(&mut out).unwrap() > 0);
    }

    #[test]
    fn a_closed_log_reopens_on_the_next_write() {
        use crate::descriptors::Reopens;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("0.log");
        let log = LogFile::open_bounded(&path, Some(1000)).unwrap();
        log.append(b"one\n");
        log.close_idle();
        assert!(log.file.lock().unwrap().is_none());
        log.append(b"two\n");
        assert_eq!(fs::read_to_string(&path).unwrap(), "one\ntwo\n");
        // Rotated while closed: the next write starts the new file, and its size is counted
        // from there.
        log.close_idle();
        fs::rename(&path, dir.path().join("0.log.1")).unwrap();
        log.append(b"three\n");
        assert_eq!(fs::read_to_string(&path).unwrap(), "three\n");
        assert_eq!(log.size.load(Ordering::Relaxed), 6);
    }

    #[test]
    fn capture_is_capped_and_log_finish_flushes() {
        let c = GuestOutput::capture(Stream::Stderr, 4);
        c.write(b"abcdef");
        assert_eq!(c.captured(), b"abcd");
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c/0.log");
        let log = LogFile::open(&path).unwrap();
        let out = GuestOutput::log(Stream::Stdout, log.clone());
        let err = GuestOutput::log(Stream::Stderr, log);
        out.write(b"one\ntw");
        err.write(b"oops\n");
        out.finish();
        let text = fs::read_to_string(&path).unwrap();
        let lines: Vec<&str> = text.lines().map(|l| l.split_once(' ').unwrap().1).collect();
        assert_eq!(lines, ["stdout F one", "stderr F oops", "stdout F tw"]);
    }
}
