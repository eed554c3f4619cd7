//! SPDY/3.1 as Kubernetes speaks it (moby/spdystream under client-go): the frames, header blocks
//! compressed with the protocol's zlib dictionary, and a connection that carries many streams.
//!
//! There is no flow control: spdystream neither sends nor honours WINDOW_UPDATE, so neither do
//! we. Inbound data goes into a small bounded queue per stream; when a stream's reader is slow the
//! connection's reader waits for it, so memory stays bounded whatever the peer sends.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use bytes::{Buf, BufMut, Bytes, BytesMut};
use flate2::{Compress, Compression, Decompress, FlushCompress, FlushDecompress};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{mpsc, watch};

use crate::Error;

/// Header names, lower-case as SPDY sends them, with their values (several values of one name are
/// joined with NUL on the wire).
pub type Headers = Vec<(String, String)>;

/// The value of header `name` (lower-case).
pub fn header<'a>(headers: &'a Headers, name: &str) -> Option<&'a str> {
    headers.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_str())
}

const VERSION: u16 = 3;
/// The largest frame we accept. Header blocks are small; data frames from client-go are at most
/// 32 KiB. Anything bigger is a broken or hostile peer.
const MAX_FRAME: usize = 1 << 20;
/// The largest header block once inflated.
const MAX_HEADER_BLOCK: usize = 256 * 1024;
/// How much we put in one DATA frame.
pub const MAX_DATA: usize = 32 * 1024;
/// Inbound frames queued per stream before the connection's reader waits.
const STREAM_QUEUE: usize = 16;

const SYN_STREAM: u16 = 1;
const SYN_REPLY: u16 = 2;
const RST_STREAM: u16 = 3;
const SETTINGS: u16 = 4;
const PING: u16 = 6;
const GOAWAY: u16 = 7;
const HEADERS: u16 = 8;
const WINDOW_UPDATE: u16 = 9;
const FLAG_FIN: u8 = 1;

/// RST_STREAM status codes used here.
pub const PROTOCOL_ERROR: u32 = 1;
/// The stream was refused (the connection is going away, or nobody takes new streams).
pub const REFUSED_STREAM: u32 = 3;
/// The stream was cancelled by its owner.
pub const CANCEL: u32 = 5;

/// One decoded frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    SynStream {
        id: u32,
        headers: Headers,
        fin: bool,
    },
    SynReply {
        id: u32,
        headers: Headers,
        fin: bool,
    },
    RstStream {
        id: u32,
        status: u32,
    },
    Ping(u32),
    GoAway {
        last_id: u32,
        status: u32,
    },
    Headers {
        id: u32,
        headers: Headers,
    },
    Data {
        id: u32,
        data: Bytes,
        fin: bool,
    },
    /// SETTINGS, WINDOW_UPDATE and unknown control frames: read and dropped.
    Ignored(u16),
}

/// The SPDY/3 header dictionary (draft 3, section 2.6.10.1): these words, each behind its 32-bit
/// length, then the tail as is.
const DICT_WORDS: &[&str] = &[
    "options",
    "head",
    "post",
    "put",
    "delete",
    "trace",
    "accept",
    "accept-charset",
    "accept-encoding",
    "accept-language",
    "accept-ranges",
    "age",
    "allow",
    "authorization",
    "cache-control",
    "connection",
    "content-base",
    "content-encoding",
    "content-language",
    "content-length",
    "content-location",
    "content-md5",
    "content-range",
    "content-type",
    "date",
    "etag",
    "expect",
    "expires",
    "from",
    "host",
    "if-match",
    "if-modified-since",
    "if-none-match",
    "if-range",
    "if-unmodified-since",
    "last-modified",
    "location",
    "max-forwards",
    "pragma",
    "proxy-authenticate",
    "proxy-authorization",
    "range",
    "referer",
    "retry-after",
    "server",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "user-agent",
    "vary",
    "via",
    "warning",
    "www-authenticate",
    "method",
    "get",
    "status",
    "200 OK",
    "version",
    "HTTP/1.1",
    "url",
    "public",
    "set-cookie",
    "keep-alive",
    "origin",
];
const DICT_TAIL: &str = concat!(
    "100101201202205206300302303304305306307402405406407408409410411412413414415416417502504505",
    "203 Non-Authoritative Information204 No Content301 Moved Permanently400 Bad Request",
    "401 Unauthorized403 Forbidden404 Not Found500 Internal Server Error501 Not Implemented",
    "503 Service UnavailableJan Feb Mar Apr May Jun Jul Aug Sept Oct Nov Dec 00:00:00 ",
    "Mon, Tue, Wed, Thu, Fri, Sat, Sun, GMTchunked,text/html,image/png,image/jpg,image/gif,",
    "application/xml,application/xhtml+xml,text/plain,text/javascript,publicprivatemax-age=",
    "gzip,deflate,sdchcharset=utf-8charset=iso-8859-1,utf-,*,enq=0.",
);

/// The dictionary's bytes.
pub fn dictionary() -> Vec<u8> {
    let mut d = Vec::with_capacity(1423);
    for w in DICT_WORDS {
        d.extend_from_slice(&(w.len() as u32).to_be_bytes());
        d.extend_from_slice(w.as_bytes());
    }
    d.extend_from_slice(DICT_TAIL.as_bytes());
    d
}

/// Inflates header blocks: one zlib stream for a direction of a connection.
pub struct Inflater {
    z: Decompress,
    dict: Vec<u8>,
}

impl Default for Inflater {
    fn default() -> Self {
        Inflater { z: Decompress::new(true), dict: dictionary() }
    }
}

impl Inflater {
    fn inflate(&mut self, input: &[u8]) -> Result<Vec<u8>, Error> {
        let mut out = Vec::with_capacity(input.len() * 4 + 256);
        let mut pos = 0;
        loop {
            if out.capacity() - out.len() < 256 {
                out.reserve(4096);
            }
            let before = self.z.total_in();
            match self.z.decompress_vec(&input[pos..], &mut out, FlushDecompress::Sync) {
                Ok(_) => {}
                Err(e) if e.needs_dictionary().is_some() => {
                    self.z
                        .set_dictionary(&self.dict)
                        .map_err(|e| Error::Protocol(format!("SPDY header dictionary: {e}")))?;
                }
                Err(e) => return Err(Error::Protocol(format!("SPDY header block does not inflate: {e}"))),
            }
            pos += (self.z.total_in() - before) as usize;
            if out.len() > MAX_HEADER_BLOCK {
                return Err(Error::Protocol(format!("SPDY header block over {MAX_HEADER_BLOCK} bytes")));
            }
            if pos >= input.len() && out.len() < out.capacity() {
                return Ok(out);
            }
        }
    }

    /// Inflates and parses one name/value block.
    pub fn headers(&mut self, block: &[u8]) -> Result<Headers, Error> {
        let raw = self.inflate(block)?;
        parse_headers(&raw)
    }
}

fn parse_headers(mut raw: &[u8]) -> Result<Headers, Error> {
    let bad = || Error::Protocol("SPDY header block is cut short".into());
    let take = |raw: &mut &[u8]| -> Result<String, Error> {
        if raw.len() < 4 {
            return Err(bad());
        }
        let n = raw.get_u32() as usize;
        if raw.len() < n {
            return Err(bad());
        }
        let s = String::from_utf8_lossy(&raw[..n]).into_owned();
        raw.advance(n);
        Ok(s)
    };
    if raw.len() < 4 {
        return Err(bad());
    }
    let count = raw.get_u32() as usize;
    let mut headers = Vec::with_capacity(count.min(64));
    for _ in 0..count {
        let name = take(&mut raw)?.to_ascii_lowercase();
        let value = take(&mut raw)?;
        headers.push((name, value));
    }
    Ok(headers)
}

/// Deflates header blocks for the other direction.
pub struct Deflater {
    z: Compress,
}

impl Default for Deflater {
    fn default() -> Self {
        let mut z = Compress::new(Compression::best(), true);
        z.set_dictionary(&dictionary()).expect("a fresh deflate stream takes a dictionary");
        Deflater { z }
    }
}

impl Deflater {
    /// Serializes and deflates one name/value block (sync-flushed, as SPDY requires).
    pub fn headers(&mut self, headers: &Headers) -> Vec<u8> {
        let mut raw = BytesMut::new();
        raw.put_u32(headers.len() as u32);
        for (n, v) in headers {
            raw.put_u32(n.len() as u32);
            raw.put_slice(n.to_ascii_lowercase().as_bytes());
            raw.put_u32(v.len() as u32);
            raw.put_slice(v.as_bytes());
        }
        let mut out = Vec::with_capacity(raw.len() + 64);
        let mut pos = 0;
        loop {
            if out.capacity() - out.len() < 64 {
                out.reserve(1024);
            }
            let before = self.z.total_in();
            self.z.compress_vec(&raw[pos..], &mut out, FlushCompress::Sync).expect("deflating into a Vec cannot fail");
            pos += (self.z.total_in() - before) as usize;
            if pos >= raw.len() && out.len() < out.capacity() {
                return out;
            }
        }
    }
}

fn control(out: &mut BytesMut, kind: u16, flags: u8, payload: &[u8]) {
    out.put_u16(0x8000 | VERSION);
    out.put_u16(kind);
    out.put_u32(((flags as u32) << 24) | payload.len() as u32);
    out.put_slice(payload);
}

/// Appends `frame`'s bytes to `out`.
pub fn encode(frame: &Frame, z: &mut Deflater, out: &mut BytesMut) {
    let fin = |f: bool| if f { FLAG_FIN } else { 0 };
    match frame {
        Frame::SynStream { id, headers, fin: f } => {
            let mut p = BytesMut::new();
            p.put_u32(*id & 0x7fff_ffff);
            p.put_u32(0);
            p.put_u16(0);
            p.put_slice(&z.headers(headers));
            control(out, SYN_STREAM, fin(*f), &p);
        }
        Frame::SynReply { id, headers, fin: f } => {
            let mut p = BytesMut::new();
            p.put_u32(*id & 0x7fff_ffff);
            p.put_slice(&z.headers(headers));
            control(out, SYN_REPLY, fin(*f), &p);
        }
        Frame::Headers { id, headers } => {
            let mut p = BytesMut::new();
            p.put_u32(*id & 0x7fff_ffff);
            p.put_slice(&z.headers(headers));
            control(out, HEADERS, 0, &p);
        }
        Frame::RstStream { id, status } => {
            let mut p = [0u8; 8];
            p[..4].copy_from_slice(&(id & 0x7fff_ffff).to_be_bytes());
            p[4..].copy_from_slice(&status.to_be_bytes());
            control(out, RST_STREAM, 0, &p);
        }
        Frame::Ping(id) => control(out, PING, 0, &id.to_be_bytes()),
        Frame::GoAway { last_id, status } => {
            let mut p = [0u8; 8];
            p[..4].copy_from_slice(&(last_id & 0x7fff_ffff).to_be_bytes());
            p[4..].copy_from_slice(&status.to_be_bytes());
            control(out, GOAWAY, 0, &p);
        }
        Frame::Data { id, data, fin: f } => {
            encode_data_head(*id, data.len(), *f, out);
            out.put_slice(data);
        }
        Frame::Ignored(_) => {}
    }
}

/// Appends the 8-byte head of a DATA frame of `len` bytes.
fn encode_data_head(id: u32, len: usize, fin: bool, out: &mut BytesMut) {
    out.put_u32(id & 0x7fff_ffff);
    out.put_u32((u32::from(if fin { FLAG_FIN } else { 0 }) << 24) | len as u32);
}

/// Reads frames from a byte stream into one buffer: a data frame's payload is a slice of it,
/// not a copy.
pub struct FrameReader<R> {
    r: R,
    buf: BytesMut,
}

/// How much is read at once (a frame that is larger gets room for all of it).
const READ_CHUNK: usize = 128 * 1024;

impl<R: AsyncRead + Unpin> FrameReader<R> {
    pub fn new(r: R) -> FrameReader<R> {
        FrameReader { r, buf: BytesMut::with_capacity(READ_CHUNK) }
    }

    /// The next frame; `None` at a clean end of the connection.
    pub async fn next(&mut self, z: &mut Inflater) -> Result<Option<Frame>, Error> {
        loop {
            if self.buf.len() >= 8 {
                let len = u32::from_be_bytes([0, self.buf[5], self.buf[6], self.buf[7]]) as usize;
                if len > MAX_FRAME {
                    return Err(Error::Protocol(format!("SPDY frame of {len} bytes is over the {MAX_FRAME} limit")));
                }
                if self.buf.len() >= 8 + len {
                    let mut frame = self.buf.split_to(8 + len);
                    let head = frame.split_to(8);
                    return decode(&head, frame.freeze(), z).map(Some);
                }
                self.buf.reserve((8 + len - self.buf.len()).max(READ_CHUNK));
            } else {
                self.buf.reserve(READ_CHUNK);
            }
            if self.r.read_buf(&mut self.buf).await? == 0 {
                if self.buf.is_empty() {
                    return Ok(None);
                }
                return Err(Error::Protocol(format!("the connection ended inside a frame ({} bytes)", self.buf.len())));
            }
        }
    }
}

/// A frame from its 8-byte head and its payload.
fn decode(head: &[u8], payload: Bytes, z: &mut Inflater) -> Result<Frame, Error> {
    let word = u32::from_be_bytes([head[0], head[1], head[2], head[3]]);
    let flags = head[4];
    let fin = flags & FLAG_FIN != 0;
    if word & 0x8000_0000 == 0 {
        return Ok(Frame::Data { id: word & 0x7fff_ffff, data: payload, fin });
    }
    let version = ((word >> 16) & 0x7fff) as u16;
    if version != VERSION {
        return Err(Error::Protocol(format!("SPDY version {version} (only 3 is spoken)")));
    }
    let kind = (word & 0xffff) as u16;
    let short = |need: usize| {
        if payload.len() < need {
            Err(Error::Protocol(format!("SPDY control frame {kind} of {} bytes is too short", payload.len())))
        } else {
            Ok(())
        }
    };
    let id_at = |p: &[u8], at: usize| u32::from_be_bytes([p[at], p[at + 1], p[at + 2], p[at + 3]]) & 0x7fff_ffff;
    let frame = match kind {
        SYN_STREAM => {
            short(10)?;
            Frame::SynStream { id: id_at(&payload, 0), headers: z.headers(&payload[10..])?, fin }
        }
        SYN_REPLY => {
            short(4)?;
            Frame::SynReply { id: id_at(&payload, 0), headers: z.headers(&payload[4..])?, fin }
        }
        HEADERS => {
            short(4)?;
            Frame::Headers { id: id_at(&payload, 0), headers: z.headers(&payload[4..])? }
        }
        RST_STREAM => {
            short(8)?;
            Frame::RstStream { id: id_at(&payload, 0), status: id_at(&payload, 4) }
        }
        PING => {
            short(4)?;
            Frame::Ping(u32::from_be_bytes([payload[0], payload[1], payload[2], payload[3]]))
        }
        GOAWAY => {
            short(8)?;
            Frame::GoAway { last_id: id_at(&payload, 0), status: id_at(&payload, 4) }
        }
        SETTINGS | WINDOW_UPDATE => Frame::Ignored(kind),
        other => Frame::Ignored(other),
    };
    Ok(frame)
}

/// Which end of the connection we are: it decides the parity of the stream and ping ids we own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Accepts streams (odd ids, made by the client).
    Server,
    /// Opens streams.
    Client,
}

enum Out {
    Frame(Frame),
    /// Send GOAWAY, flush and close the write side.
    Close,
}

/// A stream of a connection: what the peer sends on it and a handle to send on it.
pub struct Stream {
    pub id: u32,
    pub headers: Headers,
    /// Data the peer sends; `None` once it finished or reset the stream.
    pub rx: mpsc::Receiver<Bytes>,
    pub tx: StreamSender,
}

/// Sends on one stream. Cheap to clone.
#[derive(Clone)]
pub struct StreamSender {
    id: u32,
    out: mpsc::Sender<Out>,
}

impl StreamSender {
    /// The stream's id.
    pub fn id(&self) -> u32 {
        self.id
    }

    /// Sends `data` in DATA frames.
    pub async fn send(&self, mut data: Bytes) -> Result<(), Error> {
        while !data.is_empty() {
            let piece = data.split_to(data.len().min(MAX_DATA));
            self.frame(Frame::Data { id: self.id, data: piece, fin: false }).await?;
        }
        Ok(())
    }

    /// Ends our side of the stream (an empty DATA frame with FIN).
    pub async fn finish(&self) -> Result<(), Error> {
        self.frame(Frame::Data { id: self.id, data: Bytes::new(), fin: true }).await
    }

    /// Resets the stream.
    pub async fn reset(&self, status: u32) -> Result<(), Error> {
        self.frame(Frame::RstStream { id: self.id, status }).await
    }

    async fn frame(&self, f: Frame) -> Result<(), Error> {
        self.out.send(Out::Frame(f)).await.map_err(|_| Error::Closed)
    }
}

struct Shared {
    /// Where each open stream's inbound data goes.
    routes: Mutex<HashMap<u32, mpsc::Sender<Bytes>>>,
    /// Replies we wait for (client role).
    pending: Mutex<HashMap<u32, tokio::sync::oneshot::Sender<Result<(), Error>>>>,
}

/// A SPDY connection: a reader task and a writer task over one upgraded HTTP connection.
#[derive(Clone)]
pub struct Connection {
    out: mpsc::Sender<Out>,
    shared: Arc<Shared>,
    closed: watch::Receiver<bool>,
    next_id: Arc<Mutex<u32>>,
}

impl Connection {
    /// Starts the tasks. Streams the peer opens arrive on the returned receiver; each must be
    /// answered with [`Connection::accept`] or [`Connection::refuse`].
    pub fn start<IO>(io: IO, role: Role) -> (Connection, mpsc::Receiver<Stream>)
    where
        IO: AsyncRead + AsyncWrite + Send + 'static,
    {
        let (read, write) = tokio::io::split(io);
        let (out_tx, out_rx) = mpsc::channel(64);
        let (streams_tx, streams_rx) = mpsc::channel(64);
        let (closed_tx, closed_rx) = watch::channel(false);
        let shared = Arc::new(Shared { routes: Mutex::default(), pending: Mutex::default() });
        let closed_tx = Arc::new(closed_tx);
        tokio::spawn(write_loop(write, out_rx, closed_tx.clone()));
        tokio::spawn(read_loop(read, role, shared.clone(), out_tx.clone(), streams_tx, closed_tx));
        let first = if role == Role::Client { 1 } else { 2 };
        let conn = Connection { out: out_tx, shared, closed: closed_rx, next_id: Arc::new(Mutex::new(first)) };
        (conn, streams_rx)
    }

    /// Answers a stream the peer opened (SYN_REPLY), after which both sides may send on it.
    pub async fn accept(&self, stream: &Stream) -> Result<(), Error> {
        self.out
            .send(Out::Frame(Frame::SynReply { id: stream.id, headers: Vec::new(), fin: false }))
            .await
            .map_err(|_| Error::Closed)
    }

    /// Refuses a stream the peer opened.
    pub async fn refuse(&self, stream: Stream, status: u32) {
        self.shared.routes.lock().unwrap_or_else(|e| e.into_inner()).remove(&stream.id);
        let _ = stream.tx.reset(status).await;
    }

    /// Opens a stream (client role) and waits for the peer's reply.
    pub async fn open(&self, headers: Headers) -> Result<Stream, Error> {
        let id = {
            let mut next = self.next_id.lock().unwrap_or_else(|e| e.into_inner());
            let id = *next;
            *next += 2;
            id
        };
        let (tx, rx) = mpsc::channel(STREAM_QUEUE);
        let (reply_tx, reply_rx) = tokio::sync::oneshot::channel();
        self.shared.routes.lock().unwrap_or_else(|e| e.into_inner()).insert(id, tx);
        self.shared.pending.lock().unwrap_or_else(|e| e.into_inner()).insert(id, reply_tx);
        self.out
            .send(Out::Frame(Frame::SynStream { id, headers: headers.clone(), fin: false }))
            .await
            .map_err(|_| Error::Closed)?;
        reply_rx.await.map_err(|_| Error::Closed)??;
        Ok(Stream { id, headers, rx, tx: StreamSender { id, out: self.out.clone() } })
    }

    /// Sends GOAWAY after everything queued, then closes our side of the connection.
    pub async fn close(&self) {
        let _ = self.out.send(Out::Close).await;
    }

    /// Resolves when the connection is gone (the peer closed it, or it broke).
    pub async fn closed(&self) {
        let mut c = self.closed.clone();
        let _ = c.wait_for(|closed| *closed).await;
    }

    /// Whether the connection is gone.
    pub fn is_closed(&self) -> bool {
        *self.closed.borrow()
    }
}

async fn write_loop<W: AsyncWrite>(
    write: tokio::io::WriteHalf<W>,
    mut rx: mpsc::Receiver<Out>,
    closed: Arc<watch::Sender<bool>>,
) {
    let mut write = write;
    let mut z = Deflater::default();
    // Control frames and data-frame heads are encoded into `buf`; where the connection takes
    // vectored writes, large payloads go out as they came, between them, not copied again.
    let vectored = write.is_write_vectored();
    let mut buf = BytesMut::with_capacity(64 * 1024);
    let mut parts: Vec<Bytes> = Vec::new();
    let mut last_seen = 0u32;
    'outer: while let Some(first) = rx.recv().await {
        let mut next = Some(first);
        let mut batched = 0;
        // Batch what is already queued into one write.
        while let Some(item) = next.take() {
            match item {
                Out::Frame(Frame::Data { id, data, fin }) if vectored && data.len() >= SEPARATE_PAYLOAD => {
                    encode_data_head(id, data.len(), fin, &mut buf);
                    parts.push(buf.split().freeze());
                    batched += data.len();
                    parts.push(data);
                }
                Out::Frame(f) => {
                    if let Frame::SynReply { id, .. } = f {
                        last_seen = last_seen.max(id);
                    }
                    encode(&f, &mut z, &mut buf);
                }
                Out::Close => {
                    encode(&Frame::GoAway { last_id: last_seen, status: 0 }, &mut z, &mut buf);
                    parts.push(buf.split().freeze());
                    let _ = write_parts(&mut write, &mut parts).await;
                    let _ = write.flush().await;
                    let _ = write.shutdown().await;
                    break 'outer;
                }
            }
            if batched + buf.len() < 256 * 1024 && parts.len() < MAX_PARTS {
                next = rx.try_recv().ok();
            }
        }
        if !buf.is_empty() {
            parts.push(buf.split().freeze());
        }
        if let Err(e) = write_parts(&mut write, &mut parts).await {
            tracing::debug!(error = %e, "SPDY connection write failed");
            break;
        }
        if write.flush().await.is_err() {
            break;
        }
    }
    let _ = closed.send(true);
}

/// Payloads this large are written from where they are rather than copied behind their head.
const SEPARATE_PAYLOAD: usize = 4096;
/// The most pieces one vectored write is given (well under the kernel's IOV_MAX of 1024).
pub(crate) const MAX_PARTS: usize = 64;

/// Writes every piece of `parts`, in order, in as few calls as the writer allows, and empties
/// it.
pub(crate) async fn write_parts<W: AsyncWrite + Unpin>(w: &mut W, parts: &mut Vec<Bytes>) -> std::io::Result<()> {
    let mut done = 0;
    loop {
        // An empty piece left first would make the write return 0.
        while done < parts.len() && parts[done].is_empty() {
            done += 1;
        }
        if done == parts.len() {
            break;
        }
        let slices: Vec<std::io::IoSlice<'_>> =
            parts[done..].iter().take(MAX_PARTS).map(|b| std::io::IoSlice::new(b)).collect();
        let mut n = w.write_vectored(&slices).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        while n > 0 {
            let first = &mut parts[done];
            if n >= first.len() {
                n -= first.len();
                done += 1;
            } else {
                first.advance(n);
                n = 0;
            }
        }
    }
    parts.clear();
    Ok(())
}

/// Reads what `r` has (up to 64 KiB) as an owned chunk to send on a stream, without copying
/// it again; `None` at the end. `buf` is the reader's, reused while it has room.
pub async fn read_chunk<R: AsyncRead + Unpin>(r: &mut R, buf: &mut BytesMut) -> std::io::Result<Option<Bytes>> {
    if buf.capacity() - buf.len() < 16 * 1024 {
        buf.reserve(64 * 1024);
    }
    buf.clear();
    match r.read_buf(buf).await? {
        0 => Ok(None),
        _ => Ok(Some(buf.split().freeze())),
    }
}

async fn read_loop<R: AsyncRead>(
    read: tokio::io::ReadHalf<R>,
    role: Role,
    shared: Arc<Shared>,
    out: mpsc::Sender<Out>,
    streams: mpsc::Sender<Stream>,
    closed: Arc<watch::Sender<bool>>,
) {
    let mut read = FrameReader::new(read);
    let mut z = Inflater::default();
    let mut last_peer_id = 0u32;
    let peer_parity = if role == Role::Server { 1 } else { 0 };
    let mut going_away = false;
    loop {
        let frame = match read.next(&mut z).await {
            Ok(Some(f)) => f,
            Ok(None) => break,
            Err(e) => {
                tracing::debug!(error = %e, "SPDY connection read failed");
                break;
            }
        };
        match frame {
            Frame::SynStream { id, headers, fin } => {
                let valid = id % 2 == peer_parity && id > last_peer_id;
                if !valid {
                    let _ = out.send(Out::Frame(Frame::RstStream { id, status: PROTOCOL_ERROR })).await;
                    continue;
                }
                last_peer_id = id;
                if going_away {
                    let _ = out.send(Out::Frame(Frame::RstStream { id, status: REFUSED_STREAM })).await;
                    continue;
                }
                let (tx, rx) = mpsc::channel(STREAM_QUEUE);
                if !fin {
                    shared.routes.lock().unwrap_or_else(|e| e.into_inner()).insert(id, tx);
                }
                let stream = Stream { id, headers, rx, tx: StreamSender { id, out: out.clone() } };
                if streams.send(stream).await.is_err() {
                    shared.routes.lock().unwrap_or_else(|e| e.into_inner()).remove(&id);
                    let _ = out.send(Out::Frame(Frame::RstStream { id, status: REFUSED_STREAM })).await;
                }
            }
            Frame::SynReply { id, fin, .. } => {
                if let Some(p) = shared.pending.lock().unwrap_or_else(|e| e.into_inner()).remove(&id) {
                    let _ = p.send(Ok(()));
                }
                if fin {
                    shared.routes.lock().unwrap_or_else(|e| e.into_inner()).remove(&id);
                }
            }
            Frame::Data { id, data, fin } => {
                let route = shared.routes.lock().unwrap_or_else(|e| e.into_inner()).get(&id).cloned();
                if let Some(route) = route {
                    if !data.is_empty() && route.send(data).await.is_err() {
                        // The stream's owner stopped reading: drop what it would have read.
                        shared.routes.lock().unwrap_or_else(|e| e.into_inner()).remove(&id);
                    }
                    if fin {
                        shared.routes.lock().unwrap_or_else(|e| e.into_inner()).remove(&id);
                    }
                }
            }
            Frame::RstStream { id, .. } => {
                shared.routes.lock().unwrap_or_else(|e| e.into_inner()).remove(&id);
                if let Some(p) = shared.pending.lock().unwrap_or_else(|e| e.into_inner()).remove(&id) {
                    let _ = p.send(Err(Error::Protocol(format!("stream {id} was reset"))));
                }
            }
            Frame::Ping(pid) => {
                // Echo the peer's pings; ours coming back need nothing.
                if pid % 2 == peer_parity {
                    let _ = out.send(Out::Frame(Frame::Ping(pid))).await;
                }
            }
            Frame::GoAway { .. } => going_away = true,
            Frame::Headers { .. } | Frame::Ignored(_) => {}
        }
    }
    // Every stream's reader sees its end; writers see the connection gone.
    shared.routes.lock().unwrap_or_else(|e| e.into_inner()).clear();
    shared.pending.lock().unwrap_or_else(|e| e.into_inner()).clear();
    let _ = closed.send(true);
}

/// Sends an HTTP/1.1 request for the streaming URL `url` (`http://host:port/path`) with
/// `headers` (an upgrade's) and reads the answer's head; the head, status line first, and the
/// connection, whatever the status.
pub async fn request_upgrade(url: &str, headers: &[(&str, &str)]) -> Result<(String, tokio::net::TcpStream), Error> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let rest = url
        .strip_prefix("http://")
        .ok_or_else(|| Error::InvalidRequest(format!("{url}: not an http:// streaming URL")))?;
    let (host, path) = rest.split_once('/').unwrap_or((rest, ""));
    let mut tcp = tokio::net::TcpStream::connect(host).await?;
    tcp.set_nodelay(true)?;
    let mut req = format!("POST /{path} HTTP/1.1\r\nHost: {host}\r\nContent-Length: 0\r\n");
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    tcp.write_all(req.as_bytes()).await?;
    // Byte by byte: what follows the head is the new protocol's.
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if tcp.read(&mut b).await? == 0 || head.len() > 16 * 1024 {
            return Err(Error::Closed);
        }
        head.push(b[0]);
    }
    Ok((String::from_utf8_lossy(&head).into_owned(), tcp))
}

/// Dials the streaming URL `url` and upgrades to SPDY/3.1 with the subprotocol `protocol`
/// (`v4.channel.k8s.io`, `portforward.k8s.io`): a client connection and the streams the
/// server opens.
pub async fn dial(url: &str, protocol: &str) -> Result<(Connection, mpsc::Receiver<Stream>), Error> {
    let headers = [("Connection", "Upgrade"), ("Upgrade", "SPDY/3.1"), ("X-Stream-Protocol-Version", protocol)];
    let (head, tcp) = request_upgrade(url, &headers).await?;
    if !head.starts_with("HTTP/1.1 101") {
        let status = head.lines().next().unwrap_or_default();
        return Err(Error::Protocol(format!("the streaming server refused the upgrade: {status}")));
    }
    Ok(Connection::start(tcp, Role::Client))
}

#[cfg(test)]
mod tests {
    use super::*;
    use sha2::Digest;

    /// A writer that takes vectored writes but at most 5 bytes a call, as a full socket may.
    struct Trickle(Vec<u8>);

    impl AsyncWrite for Trickle {
        fn poll_write(
            self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
            buf: &[u8],
        ) -> std::task::Poll<std::io::Result<usize>> {
            let n = buf.len().min(5);
            self.get_mut().0.extend_from_slice(&buf[..n]);
            std::task::Poll::Ready(Ok(n))
        }
        fn poll_write_vectored(
            self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
            bufs: &[std::io::IoSlice<'_>],
        ) -> std::task::Poll<std::io::Result<usize>> {
            let me = self.get_mut();
            let mut room = 5;
            for b in bufs {
                let n = b.len().min(room);
                me.0.extend_from_slice(&b[..n]);
                room -= n;
            }
            std::task::Poll::Ready(Ok(5 - room))
        }
        fn is_write_vectored(&self) -> bool {
            true
        }
        fn poll_flush(
            self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<std::io::Result<()>> {
            std::task::Poll::Ready(Ok(()))
        }
        fn poll_shutdown(
            self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<std::io::Result<()>> {
            std::task::Poll::Ready(Ok(()))
        }
    }

    #[tokio::test]
    async fn pieces_are_written_whole_and_in_order_through_short_writes() {
        let pieces = ["", "head", "", "a payload longer than one write", "x", ""];
        let mut parts: Vec<Bytes> = pieces.iter().map(|p| Bytes::from_static(p.as_bytes())).collect();
        let mut w = Trickle(Vec::new());
        write_parts(&mut w, &mut parts).await.unwrap();
        assert_eq!(w.0, pieces.concat().as_bytes());
        assert!(parts.is_empty());
        // Only empty pieces: nothing to write, and no WriteZero.
        let mut parts = vec![Bytes::new(), Bytes::new()];
        write_parts(&mut w, &mut parts).await.unwrap();
        assert_eq!(w.0, pieces.concat().as_bytes());
    }

    #[tokio::test]
    async fn chunks_read_are_whole_and_the_buffer_is_reused() {
        let (mut a, mut b) = tokio::io::duplex(256 * 1024);
        let data: Vec<u8> = (0..200_000u32).map(|i| i as u8).collect();
        let sent = data.clone();
        let writer = tokio::spawn(async move {
            a.write_all(&sent).await.unwrap();
        });
        let mut buf = BytesMut::new();
        let mut got = Vec::new();
        let mut chunks = Vec::new();
        while let Some(c) = read_chunk(&mut b, &mut buf).await.unwrap() {
            assert!(!c.is_empty() && c.len() <= 64 * 1024, "{}", c.len());
            got.extend_from_slice(&c);
            // Chunks handed out stay as they were while the next ones are read.
            chunks.push(c);
        }
        writer.await.unwrap();
        assert_eq!(got, data);
        assert_eq!(chunks.concat(), data);
    }

    #[test]
    fn the_dictionary_is_the_protocols() {
        let d = dictionary();
        assert_eq!(d.len(), 1423);
        assert_eq!(&d[..11], b"\0\0\0\x07options");
        assert!(d.ends_with(b"enq=0."));
        // The digest of the bytes spdystream compresses against: one byte off and no Go peer
        // could read our headers.
        assert_eq!(
            hex::encode(sha2::Sha256::digest(&d)),
            "51d27341373f923f3cd88e1eb7162aeaa3723d7585ff2399201dc06498407f02"
        );
    }

    #[tokio::test]
    async fn frames_round_trip_with_one_compression_context() {
        let frames = vec![
            Frame::SynStream { id: 1, headers: vec![("streamtype".into(), "error".into())], fin: false },
            Frame::SynStream { id: 3, headers: vec![("streamtype".into(), "stdout".into())], fin: true },
            Frame::SynReply { id: 1, headers: vec![], fin: false },
            Frame::Headers { id: 1, headers: vec![("a".into(), "b".into())] },
            Frame::Data { id: 3, data: Bytes::from_static(b"hello"), fin: false },
            Frame::Data { id: 3, data: Bytes::new(), fin: true },
            Frame::RstStream { id: 5, status: CANCEL },
            Frame::Ping(7),
            Frame::GoAway { last_id: 3, status: 0 },
        ];
        let mut z = Deflater::default();
        let mut buf = BytesMut::new();
        for f in &frames {
            encode(f, &mut z, &mut buf);
        }
        let mut r = FrameReader::new(&buf[..]);
        let mut inflate = Inflater::default();
        let mut back = Vec::new();
        while let Some(f) = r.next(&mut inflate).await.unwrap() {
            back.push(f);
        }
        assert_eq!(back, frames);
    }

    #[tokio::test]
    async fn bad_frames_are_errors_not_panics() {
        let mut z = Inflater::default();
        // A control frame of version 2.
        let mut next = async |bytes: &'static [u8]| FrameReader::new(bytes).next(&mut z).await;
        assert!(matches!(next(&[0x80, 2, 0, 1, 0, 0, 0, 0]).await, Err(Error::Protocol(_))));
        // A frame longer than the limit.
        assert!(matches!(next(&[0, 0, 0, 1, 0, 0xff, 0xff, 0xff]).await, Err(Error::Protocol(_))));
        // A SYN_STREAM whose header block is not zlib.
        let not_zlib = &[0x80, 3, 0, 1, 0, 0, 0, 14, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 1, 2, 3, 4];
        assert!(matches!(next(not_zlib).await, Err(Error::Protocol(_))));
        // Cut short mid-frame, and mid-head.
        assert!(next(&[0, 0, 0, 1, 0, 0, 0, 9, 1]).await.is_err());
        assert!(next(&[0, 0, 0]).await.is_err());
        // A clean end.
        assert!(matches!(next(&[]).await, Ok(None)));
    }

    #[tokio::test]
    async fn a_connection_carries_streams_both_ways() {
        let (a, b) = tokio::io::duplex(1024);
        let (server, mut incoming) = Connection::start(a, Role::Server);
        let (client, _none) = Connection::start(b, Role::Client);
        let opened = tokio::spawn(async move {
            let mut s = client.open(vec![("streamtype".into(), "stdin".into())]).await.unwrap();
            s.tx.send(Bytes::from(vec![7u8; 100_000])).await.unwrap();
            s.tx.finish().await.unwrap();
            let mut echoed = 0;
            while let Some(d) = s.rx.recv().await {
                echoed += d.len();
            }
            (client, echoed)
        });
        let mut s = incoming.recv().await.unwrap();
        assert_eq!(header(&s.headers, "streamtype"), Some("stdin"));
        server.accept(&s).await.unwrap();
        let mut got = 0;
        while let Some(d) = s.rx.recv().await {
            got += d.len();
            s.tx.send(d).await.unwrap();
        }
        s.tx.finish().await.unwrap();
        assert_eq!(got, 100_000);
        let (client, echoed) = opened.await.unwrap();
        assert_eq!(echoed, 100_000);
        server.close().await;
        client.closed().await;
        assert!(client.is_closed());
    }
}
