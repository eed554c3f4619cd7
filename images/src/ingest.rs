//! Downloads in progress. A pull streams each blob into a file of its own staging directory
//! (`<root>/ingest/<random>/`), hashing and counting as it goes, so a large layer never sits
//! in memory and a blob over its limit is cut off as soon as it passes it. The store moves the
//! staged files into `blobs/` only when the whole image checks out; a failed or cancelled pull
//! drops its staging directory and the store is as it was.

use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

use crate::{Error, Result};

/// Staging directories untouched this long belong to pulls that died with their process.
const ABANDONED_AFTER: Duration = Duration::from_secs(24 * 3600);

/// Removes staging directories left by pulls whose process was killed. Another process may be
/// pulling into the same store right now, so only old ones go.
pub(crate) fn remove_abandoned(store_root: &Path) {
    let Ok(entries) = fs::read_dir(store_root.join("ingest")) else { return };
    for e in entries.flatten() {
        let old = e.metadata().and_then(|m| m.modified()).is_ok_and(|t| t.elapsed().is_ok_and(|a| a > ABANDONED_AFTER));
        if old {
            tracing::info!(dir = %e.path().display(), "removing an abandoned download");
            let _ = fs::remove_dir_all(e.path());
        }
    }
}

/// How far one blob of a pull or push has got.
#[derive(Debug, Clone, Copy)]
pub struct Progress<'a> {
    /// What the blob is: `manifest`, `config`, `wasm`, `layer`.
    pub what: &'a str,
    /// Its digest.
    pub digest: &'a str,
    /// Bytes moved so far.
    pub done: u64,
    /// Its size, when the manifest says.
    pub total: Option<u64>,
    /// The last report for this blob; `skipped` when it was already there.
    pub finished: bool,
    /// The blob was already in the store (or the registry, for a push) and was not moved.
    pub skipped: bool,
}

/// Receives [`Progress`] reports (a CLI prints them, the server logs them).
pub type Observer = Arc<dyn Fn(Progress<'_>) + Send + Sync>;

/// Reports are at most this often per blob, besides the first and the last.
const REPORT_EVERY: Duration = Duration::from_millis(200);

/// A staging directory for one pull. Dropping it removes what was not taken into the store.
pub struct Ingest {
    dir: PathBuf,
    observer: Option<Observer>,
}

impl Ingest {
    /// A new staging directory under `<store root>/ingest`.
    pub(crate) fn new(store_root: &Path, observer: Option<Observer>) -> Result<Ingest> {
        let dir = store_root.join("ingest").join(format!("{:016x}", rand::random::<u64>()));
        fs::create_dir_all(&dir).map_err(Error::io(format!("create {}", dir.display())))?;
        Ok(Ingest { dir, observer })
    }

    /// A writer for the blob `digest`, refusing more than `limit` bytes. `total` is the size
    /// the manifest gives, for progress reports.
    pub fn writer(&self, what: &str, digest: &str, total: Option<u64>, limit: u64) -> Result<BlobWriter> {
        let hex = digest.strip_prefix("sha256:").filter(|h| h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit()));
        let hex = hex.ok_or_else(|| Error::Registry {
            context: format!("{what} blob {digest:?}"),
            reason: "not a sha256 digest".into(),
        })?;
        let path = self.dir.join(hex);
        let file = File::create(&path).map_err(Error::io(format!("create {}", path.display())))?;
        let w = BlobWriter {
            file,
            path,
            hasher: Sha256::new(),
            done: 0,
            limit,
            total,
            what: what.to_string(),
            digest: digest.to_string(),
            observer: self.observer.clone(),
            last_report: Some(Instant::now()),
        };
        w.report(false, false);
        Ok(w)
    }

    /// Reports a blob that was not downloaded because the store has it.
    pub fn skipped(&self, what: &str, digest: &str, size: u64) {
        if let Some(o) = &self.observer {
            o(Progress { what, digest, done: size, total: Some(size), finished: true, skipped: true });
        }
    }
}

impl Drop for Ingest {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// One blob being downloaded: bytes go to a file while their hash and count are kept.
pub struct BlobWriter {
    file: File,
    path: PathBuf,
    hasher: Sha256,
    done: u64,
    limit: u64,
    total: Option<u64>,
    what: String,
    digest: String,
    observer: Option<Observer>,
    last_report: Option<Instant>,
}

impl BlobWriter {
    /// The size announced by the sender (Content-Length); refused at once when over the limit.
    pub fn expect(&mut self, len: u64) -> Result<()> {
        if len > self.limit {
            return Err(self.too_large());
        }
        self.total.get_or_insert(len);
        Ok(())
    }

    /// Appends a chunk.
    pub fn write(&mut self, chunk: &[u8]) -> Result<()> {
        if self.done + chunk.len() as u64 > self.limit {
            return Err(self.too_large());
        }
        self.file.write_all(chunk).map_err(Error::io(format!("write {}", self.path.display())))?;
        self.hasher.update(chunk);
        self.done += chunk.len() as u64;
        if self.last_report.is_none_or(|t| t.elapsed() >= REPORT_EVERY) {
            self.report(false, false);
            self.last_report = Some(Instant::now());
        }
        Ok(())
    }

    /// Checks the bytes against the digest and returns the staged blob.
    pub fn finish(mut self) -> Result<StagedBlob> {
        let actual = format!("sha256:{}", hex::encode(self.hasher.finalize_reset()));
        if actual != self.digest {
            return Err(Error::DigestMismatch { digest: self.digest.clone(), actual });
        }
        self.file.flush().map_err(Error::io(format!("write {}", self.path.display())))?;
        self.report(true, false);
        Ok(StagedBlob { digest: self.digest.clone(), path: self.path.clone(), size: self.done })
    }

    fn too_large(&self) -> Error {
        Error::TooLarge { what: format!("{} blob {}", self.what, self.digest), limit: self.limit }
    }

    fn report(&self, finished: bool, skipped: bool) {
        if let Some(o) = &self.observer {
            o(Progress {
                what: &self.what,
                digest: &self.digest,
                done: self.done,
                total: self.total,
                finished,
                skipped,
            });
        }
    }
}

/// A downloaded blob whose bytes match its digest, waiting in a staging directory.
#[derive(Debug, Clone)]
pub struct StagedBlob {
    /// Its digest.
    pub digest: String,
    /// Where it waits.
    pub path: PathBuf,
    /// Its size in bytes.
    pub size: u64,
}

impl StagedBlob {
    /// Reads it whole (for configs and wasm, which are needed in memory anyway).
    pub fn read(&self) -> Result<Vec<u8>> {
        fs::read(&self.path).map_err(Error::io(format!("read staged blob {}", self.digest)))
    }
}
