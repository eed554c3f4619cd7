use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::ingest::{Ingest, Observer, StagedBlob};
use crate::reference::looks_like_id;
use crate::{Error, Reference, Result, WasmKind, fsutil, sha256_digest};

/// One image in the local store.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageRecord {
    /// `sha256:<hex>`; the same string everywhere the CRI names this image.
    pub id: String,
    /// Normalized `registry/repo:tag` names.
    pub repo_tags: Vec<String>,
    /// Normalized `registry/repo@sha256:..` names.
    pub repo_digests: Vec<String>,
    /// Bytes the image takes in the store.
    pub size: u64,
    /// Digest of the wasm blob that runs.
    pub wasm_digest: String,
    /// Module or component.
    pub kind: WasmKind,
    /// Every blob the image keeps in the store (manifest, config, layers), the wasm included.
    #[serde(default)]
    pub blobs: Vec<String>,
    /// For compat images: the unpacked root filesystem and how the image config says to run.
    #[serde(default)]
    pub run: Option<ImageRun>,
    /// OCI annotations kept from the image.
    #[serde(default)]
    pub annotations: BTreeMap<String, String>,
    /// Numeric user from the image config, if it names one.
    #[serde(default)]
    pub uid: Option<i64>,
    /// User name from the image config, if it names one that is not numeric.
    #[serde(default)]
    pub username: String,
    /// When the image entered the store, in nanoseconds since the epoch.
    pub created_at: i64,
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct Index {
    version: u32,
    images: Vec<ImageRecord>,
}

/// How a compat image runs: its root filesystem (relative to the store's root) and the
/// entrypoint, cmd, env and working directory of its config.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageRun {
    pub rootfs: String,
    pub entrypoint: Vec<String>,
    pub cmd: Vec<String>,
    pub env: Vec<String>,
    pub working_dir: String,
}

/// An image to add to the store.
#[derive(Debug)]
pub struct NewImage<'a> {
    /// Its id (`sha256:..`): the config digest of a pulled image, the wasm digest of an import.
    pub id: String,
    /// Digest of the blob that runs.
    pub wasm_digest: String,
    /// Module or component.
    pub kind: WasmKind,
    /// Normalized `registry/repo:tag`, if it has one.
    pub tag: Option<String>,
    /// Normalized `registry/repo@digest`, if known.
    pub repo_digest: Option<String>,
    /// Every blob to keep (the wasm among them), stored under its digest.
    pub blobs: Vec<BlobSource<'a>>,
    /// Annotations to show.
    pub annotations: BTreeMap<String, String>,
    /// The image config's user (`uid`, `name` or `uid:gid`).
    pub user: Option<String>,
    /// For compat images.
    pub run: Option<ImageRun>,
}

/// Where a blob of a [`NewImage`] comes from.
#[derive(Debug)]
pub enum BlobSource<'a> {
    /// Bytes in memory (hashed here).
    Bytes(&'a [u8]),
    /// A downloaded file, already checked against its digest: moved into the store.
    Staged(&'a StagedBlob),
    /// A blob the store already has (a pull skipped downloading it).
    Stored(String),
}

/// Bytes and inodes used by the image store, for ImageFsInfo.
#[derive(Debug, Clone)]
pub struct FsUsage {
    /// The store's directory.
    pub mountpoint: PathBuf,
    /// Bytes used.
    pub used_bytes: u64,
    /// Inodes used.
    pub inodes_used: u64,
}

/// Identity of one version of a file: (inode, mtime seconds, mtime nanoseconds, length).
type FileStamp = (u64, i64, i64, u64);

/// The content-addressed store under `<root>`: `blobs/sha256/<hex>`, `index.json`, `lock`.
pub struct ImageStore {
    root: PathBuf,
    /// The last index read, with the (inode, mtime, len) of the file it came from, so that an
    /// unchanged index is not parsed again but a change by another process is seen.
    cached: Mutex<Option<(FileStamp, Arc<Vec<ImageRecord>>)>>,
}

impl ImageStore {
    /// Opens (creating if needed) the store at `root`.
    pub fn open(root: impl Into<PathBuf>) -> Result<ImageStore> {
        let root = root.into();
        fs::create_dir_all(root.join("blobs/sha256"))
            .map_err(Error::io(format!("create image store {}", root.display())))?;
        crate::ingest::remove_abandoned(&root);
        Ok(ImageStore { root, cached: Mutex::new(None) })
    }

    /// The store's directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    fn index_path(&self) -> PathBuf {
        self.root.join("index.json")
    }

    /// Path of the blob with `digest` (`sha256:<hex>`).
    pub fn blob_path(&self, digest: &str) -> PathBuf {
        let hex = digest.strip_prefix("sha256:").unwrap_or(digest);
        self.root.join("blobs/sha256").join(hex)
    }

    /// Takes the store's file lock, which writers hold across read-modify-write of the index
    /// (other processes, e.g. `wasmlet image import` beside a server, take it too).
    fn lock(&self) -> Result<File> {
        let path = self.root.join("lock");
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(Error::io(format!("open {}", path.display())))?;
        file.lock().map_err(Error::io(format!("lock {}", path.display())))?;
        Ok(file)
    }

    fn read_index(&self) -> Result<Arc<Vec<ImageRecord>>> {
        let path = self.index_path();
        let meta = match fs::metadata(&path) {
            Ok(m) => m,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Arc::default()),
            Err(e) => return Err(Error::io(format!("stat {}", path.display()))(e)),
        };
        let stamp = (meta.ino(), meta.mtime(), meta.mtime_nsec(), meta.len());
        let mut cached = self.cached.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((s, images)) = cached.as_ref()
            && *s == stamp
        {
            return Ok(images.clone());
        }
        let bytes = fs::read(&path).map_err(Error::io(format!("read {}", path.display())))?;
        let index: Index = serde_json::from_slice(&bytes)
            .map_err(|e| Error::CorruptIndex { path: path.clone(), reason: e.to_string() })?;
        let images = Arc::new(index.images);
        *cached = Some((stamp, images.clone()));
        Ok(images)
    }

    fn write_index(&self, images: Vec<ImageRecord>) -> Result<()> {
        let path = self.index_path();
        let index = Index { version: 1, images };
        let bytes = serde_json::to_vec_pretty(&index).expect("index serializes");
        fsutil::write_atomic(&path, &bytes).map_err(Error::io(format!("write {}", path.display())))
    }

    /// Every image in the store.
    ///
    /// Readers take no lock: the index is only ever replaced by a rename, so a reader sees
    /// either the old or the new version, and the cache is checked against the file each time.
    pub fn list(&self) -> Result<Vec<ImageRecord>> {
        Ok(self.read_index()?.as_ref().clone())
    }

    /// Finds the image that `image` names: an id (with or without `sha256:`), a tag or a
    /// digest reference. `Ok(None)` when nothing matches.
    pub fn resolve(&self, image: &str) -> Result<Option<ImageRecord>> {
        let images = self.read_index()?;
        Ok(find(&images, image)?.map(|i| images[i].clone()))
    }

    /// Puts a wasm binary into the store, tagged `tag` if given, and returns its record.
    /// The bytes must be a wasm module or component.
    pub fn import(&self, bytes: &[u8], tag: Option<&str>) -> Result<ImageRecord> {
        let reference = tag.map(Reference::parse).transpose()?;
        let kind = WasmKind::detect(tag.unwrap_or("imported image"), bytes)?;
        let digest = sha256_digest(bytes);
        self.add(NewImage {
            id: digest.clone(),
            wasm_digest: digest.clone(),
            kind,
            tag: reference.as_ref().and_then(Reference::tagged),
            repo_digest: reference.as_ref().map(|r| r.with_digest(&digest)),
            blobs: vec![BlobSource::Bytes(bytes)],
            annotations: BTreeMap::new(),
            user: None,
            run: None,
        })
    }

    /// Stores the blobs of an image (each under its digest) and adds or updates its record:
    /// a new tag moves off any other image that had it.
    pub fn add(&self, new: NewImage<'_>) -> Result<ImageRecord> {
        // Under the lock: a concurrent remove must not delete a blob this image is about to use.
        let _lock = self.lock()?;
        let mut size = 0;
        let mut digests = Vec::new();
        for blob in &new.blobs {
            let (digest, len) = match blob {
                BlobSource::Bytes(bytes) => {
                    let digest = sha256_digest(bytes);
                    let path = self.blob_path(&digest);
                    if !path.exists() {
                        fsutil::write_atomic(&path, bytes).map_err(Error::io(format!("write {}", path.display())))?;
                    }
                    (digest, bytes.len() as u64)
                }
                BlobSource::Staged(staged) => {
                    let path = self.blob_path(&staged.digest);
                    if !path.exists() {
                        fsutil::place_durable(&staged.path, &path)
                            .map_err(Error::io(format!("store blob {}", staged.digest)))?;
                    }
                    (staged.digest.clone(), staged.size)
                }
                BlobSource::Stored(digest) => {
                    // Removed since the pull looked? Then this pull cannot finish as planned.
                    let meta = fs::metadata(self.blob_path(digest)).map_err(|_| Error::Registry {
                        context: format!("store image {}", new.id),
                        reason: format!("blob {digest} was removed during the pull; pull again"),
                    })?;
                    (digest.clone(), meta.len())
                }
            };
            size += len;
            digests.push(digest);
        }
        let mut images = self.read_index()?.as_ref().clone();
        if let Some(t) = &new.tag {
            for other in images.iter_mut().filter(|i| i.id != new.id) {
                other.repo_tags.retain(|x| x != t);
            }
        }
        let (uid, username) = match new.user.as_deref().map(|u| u.split(':').next().unwrap_or(u)) {
            Some(u) if !u.is_empty() => match u.parse::<i64>() {
                Ok(n) => (Some(n), String::new()),
                Err(_) => (None, u.to_string()),
            },
            _ => (None, String::new()),
        };
        let record = match images.iter().position(|i| i.id == new.id) {
            Some(i) => &mut images[i],
            None => {
                images.push(ImageRecord {
                    id: new.id.clone(),
                    repo_tags: Vec::new(),
                    repo_digests: Vec::new(),
                    size,
                    wasm_digest: new.wasm_digest.clone(),
                    kind: new.kind,
                    blobs: digests,
                    run: new.run.clone(),
                    annotations: new.annotations.clone(),
                    uid,
                    username,
                    created_at: now_nanos(),
                });
                images.last_mut().expect("just pushed")
            }
        };
        if let Some(t) = new.tag
            && !record.repo_tags.contains(&t)
        {
            record.repo_tags.push(t);
        }
        if let Some(d) = new.repo_digest
            && !record.repo_digests.contains(&d)
        {
            record.repo_digests.push(d);
        }
        let record = record.clone();
        self.write_index(images)?;
        tracing::info!(image = %record.id, tags = ?record.repo_tags, "stored image");
        Ok(record)
    }

    /// Removes the image `image` names, with all its tags, and its blob when no other image
    /// uses it. Returns the removed record; `Ok(None)` if there was none (not an error).
    pub fn remove(&self, image: &str) -> Result<Option<ImageRecord>> {
        let _lock = self.lock()?;
        let mut images = self.read_index()?.as_ref().clone();
        let Some(i) = find(&images, image)? else { return Ok(None) };
        let removed = images.remove(i);
        let in_use = |d: &String| images.iter().any(|o| o.wasm_digest == *d || o.blobs.contains(d));
        for digest in removed.blobs.iter().chain(std::iter::once(&removed.wasm_digest)) {
            if !in_use(digest) {
                let _ = fs::remove_file(self.blob_path(digest));
            }
        }
        if let Some(run) = &removed.run
            && !images.iter().any(|o| o.run.as_ref().is_some_and(|r| r.rootfs == run.rootfs))
        {
            let _ = fs::remove_dir_all(self.root.join(&run.rootfs));
        }
        self.write_index(images)?;
        tracing::info!(image = %removed.id, "removed image");
        Ok(Some(removed))
    }

    /// Checks, reading it as a stream, that the blob `digest` still hashes to its digest.
    pub fn verify_blob(&self, digest: &str) -> Result<()> {
        use sha2::Digest;
        let path = self.blob_path(digest);
        let mut file = File::open(&path).map_err(Error::io(format!("read blob {digest}")))?;
        let mut hasher = sha2::Sha256::new();
        std::io::copy(&mut file, &mut hasher).map_err(Error::io(format!("read blob {digest}")))?;
        let actual = format!("sha256:{}", hex::encode(hasher.finalize()));
        if actual != digest {
            return Err(Error::DigestMismatch { digest: digest.to_string(), actual });
        }
        Ok(())
    }

    /// Whether the store has the blob `digest`.
    pub fn has_blob(&self, digest: &str) -> bool {
        self.blob_path(digest).exists()
    }

    /// A staging directory for a pull's downloads; see [`Ingest`].
    pub fn ingest(&self, observer: Option<Observer>) -> Result<Ingest> {
        Ingest::new(&self.root, observer)
    }

    /// Reads a blob and checks that its bytes still hash to `digest`.
    pub fn read_blob(&self, digest: &str) -> Result<Vec<u8>> {
        let path = self.blob_path(digest);
        let bytes = fs::read(&path).map_err(Error::io(format!("read blob {digest}")))?;
        let actual = sha256_digest(&bytes);
        if actual != digest {
            return Err(Error::DigestMismatch { digest: digest.to_string(), actual });
        }
        Ok(bytes)
    }

    /// Bytes and inodes under the store's root.
    pub fn fs_usage(&self) -> FsUsage {
        let (used_bytes, inodes_used) = fsutil::disk_usage(&self.root);
        FsUsage { mountpoint: self.root.clone(), used_bytes, inodes_used }
    }
}

fn find(images: &[ImageRecord], image: &str) -> Result<Option<usize>> {
    if looks_like_id(image) {
        let id = if image.starts_with("sha256:") { image.to_string() } else { format!("sha256:{image}") };
        return Ok(images.iter().position(|i| i.id == id));
    }
    let reference = Reference::parse(image)?;
    Ok(match (&reference.digest, reference.tagged()) {
        (Some(digest), _) => {
            let wanted = reference.with_digest(digest);
            images.iter().position(|i| i.repo_digests.contains(&wanted))
        }
        (None, Some(tagged)) => images.iter().position(|i| i.repo_tags.contains(&tagged)),
        (None, None) => None,
    })
}

fn now_nanos() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos() as i64).unwrap_or(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn module(n: u32) -> Vec<u8> {
        wat::parse_str(format!("(module (global i32 (i32.const {n})))")).unwrap()
    }

    #[test]
    fn import_resolve_by_id_tag_and_digest() {
        let dir = tempfile::tempdir().unwrap();
        let store = ImageStore::open(dir.path()).unwrap();
        let rec = store.import(&module(1), Some("hello")).unwrap();
        assert_eq!(rec.repo_tags, vec!["docker.io/library/hello:latest"]);
        assert_eq!(rec.repo_digests, vec![format!("docker.io/library/hello@{}", rec.id)]);
        for name in [
            rec.id.clone(),
            rec.id.trim_start_matches("sha256:").to_string(),
            "hello".to_string(),
            "docker.io/library/hello:latest".to_string(),
            rec.repo_digests[0].clone(),
        ] {
            assert_eq!(store.resolve(&name).unwrap().as_ref(), Some(&rec), "{name}");
        }
        assert_eq!(store.resolve("other").unwrap(), None);
        assert_eq!(store.read_blob(&rec.wasm_digest).unwrap(), module(1));
    }

    #[test]
    fn a_tag_moves_and_remove_takes_all_tags() {
        let dir = tempfile::tempdir().unwrap();
        let store = ImageStore::open(dir.path()).unwrap();
        let a = store.import(&module(1), Some("x:1")).unwrap();
        store.import(&module(1), Some("y:2")).unwrap();
        let b = store.import(&module(2), Some("x:1")).unwrap();
        let a_now = store.resolve(&a.id).unwrap().unwrap();
        assert_eq!(a_now.repo_tags, vec!["docker.io/library/y:2"]);
        assert_eq!(store.resolve("x:1").unwrap().unwrap().id, b.id);
        assert_eq!(store.remove("y:2").unwrap().unwrap().id, a.id);
        assert!(store.remove("y:2").unwrap().is_none(), "second remove is a no-op");
        assert!(!store.blob_path(&a.wasm_digest).exists());
        assert_eq!(store.list().unwrap().len(), 1);
    }

    #[test]
    fn refuses_non_wasm_and_detects_corrupt_blobs() {
        let dir = tempfile::tempdir().unwrap();
        let store = ImageStore::open(dir.path()).unwrap();
        let err = store.import(b"GIF89a......", Some("pic")).unwrap_err();
        assert!(err.to_string().contains("pic: not a wasm module or component"), "{err}");
        assert!(store.list().unwrap().is_empty());
        let rec = store.import(&module(3), None).unwrap();
        fs::write(store.blob_path(&rec.wasm_digest), module(4)).unwrap();
        let err = store.read_blob(&rec.wasm_digest).unwrap_err();
        assert!(matches!(err, Error::DigestMismatch { .. }), "{err}");
    }

    #[test]
    fn a_second_store_on_the_same_root_sees_changes() {
        let dir = tempfile::tempdir().unwrap();
        let a = ImageStore::open(dir.path()).unwrap();
        let b = ImageStore::open(dir.path()).unwrap();
        assert!(b.list().unwrap().is_empty());
        a.import(&module(5), Some("seen")).unwrap();
        assert!(b.resolve("seen").unwrap().is_some());
    }
}
