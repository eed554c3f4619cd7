//! Small filesystem helpers shared by the image store and the runtime's state files.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::path::Path;

/// Writes `bytes` to `path` atomically: a temporary file in the same directory, fsync, rename,
/// then fsync of the directory, so a crash, even of the machine, leaves either the old or the
/// new content.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    write_replace(path, bytes, true)
}

/// Like [`write_atomic`] but without the fsyncs: readers never see a torn file and a crash of
/// the process loses nothing, but a crash of the machine may lose the latest writes. For state
/// that changes on every container start, where an fsync would cost more than the start.
pub fn write_atomic_nosync(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    write_replace(path, bytes, false)
}

/// Moves the finished file `from` to `to` (same filesystem) durably: fsync of the file, rename,
/// fsync of the target directory.
pub fn place_durable(from: &Path, to: &Path) -> std::io::Result<()> {
    File::open(from)?.sync_all()?;
    let dir = to.parent().unwrap_or(Path::new("."));
    fs::rename(from, to)?;
    File::open(dir)?.sync_all()
}

fn write_replace(path: &Path, bytes: &[u8], durable: bool) -> std::io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    fs::create_dir_all(dir)?;
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("file");
    let tmp = dir.join(format!(".{name}.{}.tmp", rand::random::<u64>()));
    let result = (|| {
        let mut f = OpenOptions::new().write(true).create_new(true).open(&tmp)?;
        f.write_all(bytes)?;
        if durable {
            f.sync_all()?;
        }
        fs::rename(&tmp, path)?;
        if durable {
            File::open(dir)?.sync_all()?;
        }
        Ok(())
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

/// Bytes and inodes used below `path` (files, directories and links each count one inode).
pub fn disk_usage(path: &Path) -> (u64, u64) {
    let mut bytes = 0;
    let mut inodes = 0;
    let mut stack = vec![path.to_path_buf()];
    while let Some(p) = stack.pop() {
        let Ok(meta) = fs::symlink_metadata(&p) else { continue };
        inodes += 1;
        if meta.is_dir() {
            if let Ok(entries) = fs::read_dir(&p) {
                stack.extend(entries.flatten().map(|e| e.path()));
            }
        } else {
            bytes += meta.len();
        }
    }
    (bytes, inodes)
}
