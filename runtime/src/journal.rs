//! The runtime's state on disk: an append-only journal of record changes, one JSON line each.
//!
//! Creating a file or a directory costs far more than appending to an open one (on the test
//! machines here, 15 to 350 us against 1.5 us), and a pod start changes its records four times,
//! so every change is one `write` of one line to a file kept open. The page cache has it once the
//! call returns, so a `kill -9` of wasmlet loses nothing; a crash of the machine may lose the last
//! changes (no fsync), never corrupt earlier ones: replay stops trusting nothing but the lines
//! that parse. When the journal has grown well past the live state it is compacted: the live
//! records are written to a new file (fsynced) that replaces it atomically.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use serde::{Deserialize, Serialize};
use wasmlet_images::fsutil;

use crate::model::{ContainerRecord, SandboxRecord};
use crate::{Error, Result};

/// One change.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Change {
    /// A sandbox as it now is.
    Sandbox(Box<SandboxRecord>),
    /// A sandbox is gone.
    SandboxRemoved(String),
    /// A container as it now is (boxed: records are large, removals are small).
    Container(Box<ContainerRecord>),
    /// A container is gone.
    ContainerRemoved(String),
}

/// The live records a journal describes.
#[derive(Debug, Default)]
pub struct Snapshot {
    pub sandboxes: HashMap<String, SandboxRecord>,
    pub containers: HashMap<String, ContainerRecord>,
}

impl Snapshot {
    fn apply(&mut self, change: Change) {
        match change {
            Change::Sandbox(s) => {
                self.sandboxes.insert(s.id.clone(), *s);
            }
            Change::SandboxRemoved(id) => {
                self.sandboxes.remove(&id);
            }
            Change::Container(c) => {
                self.containers.insert(c.id.clone(), *c);
            }
            Change::ContainerRemoved(id) => {
                self.containers.remove(&id);
            }
        }
    }

    fn changes(&self) -> impl Iterator<Item = Change> + '_ {
        let sandboxes = self.sandboxes.values().map(|s| Change::Sandbox(Box::new(s.clone())));
        sandboxes.chain(self.containers.values().map(|c| Change::Container(Box::new(c.clone()))))
    }

    fn len(&self) -> usize {
        self.sandboxes.len() + self.containers.len()
    }
}

/// The open journal.
pub struct Journal {
    path: PathBuf,
    inner: Mutex<Inner>,
}

struct Inner {
    file: File,
    /// Lines in the file, and what the state would take compacted.
    lines: usize,
    live: usize,
}

/// Compact when the journal has this many lines more than the live records (and 4 times them).
const COMPACT_SLACK: usize = 4096;

impl Journal {
    /// Opens the journal at `path`, replays it, and compacts it. Lines that do not parse are
    /// skipped and reported (a torn last line after a crash is expected); the raw file is kept
    /// beside as `<path>.corrupt` when any line in the middle was bad, so nothing is thrown away.
    pub fn open(path: &Path) -> Result<(Journal, Snapshot)> {
        let mut snapshot = Snapshot::default();
        let io = |what: &str, e: std::io::Error| Error::Internal(format!("{what} {}: {e}", path.display()));
        match File::open(path) {
            Ok(f) => {
                let mut lines = BufReader::new(f).split(b'\n').peekable();
                let mut bad_in_middle = false;
                let mut n = 0;
                while let Some(line) = lines.next() {
                    n += 1;
                    let line = line.map_err(|e| io("read", e))?;
                    match serde_json::from_slice::<Change>(&line) {
                        Ok(change) => snapshot.apply(change),
                        Err(e) => {
                            let last = lines.peek().is_none();
                            tracing::warn!(journal = %path.display(), line = n, last, error = %e, "skipping unreadable journal line");
                            bad_in_middle |= !last;
                        }
                    }
                }
                if bad_in_middle {
                    let aside = path.with_extension("journal.corrupt");
                    std::fs::copy(path, &aside).map_err(|e| io("keep a copy of", e))?;
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io("open", e)),
        }
        let journal = Journal::rewrite(path, &snapshot)?;
        Ok((journal, snapshot))
    }

    fn rewrite(path: &Path, snapshot: &Snapshot) -> Result<Journal> {
        let mut buf = Vec::new();
        for change in snapshot.changes() {
            push_line(&mut buf, &change);
        }
        fsutil::write_atomic(path, &buf)
            .map_err(|e| Error::Internal(format!("write journal {}: {e}", path.display())))?;
        let file = OpenOptions::new()
            .append(true)
            .open(path)
            .map_err(|e| Error::Internal(format!("open journal {}: {e}", path.display())))?;
        let live = snapshot.len();
        Ok(Journal { path: path.to_path_buf(), inner: Mutex::new(Inner { file, lines: live, live }) })
    }

    /// Appends one change. `live` is the number of live records after it, used to decide when
    /// to compact; `snapshot` gives them when that time comes.
    pub fn append(&self, change: &Change, live: usize, snapshot: impl FnOnce() -> Snapshot) -> Result<()> {
        let mut buf = Vec::with_capacity(1024);
        push_line(&mut buf, change);
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        inner
            .file
            .write_all(&buf)
            .map_err(|e| Error::Internal(format!("append to journal {}: {e}", self.path.display())))?;
        inner.lines += 1;
        inner.live = live;
        if inner.lines > COMPACT_SLACK + 4 * inner.live {
            let fresh = Journal::rewrite(&self.path, &snapshot())?;
            *inner = fresh.inner.into_inner().unwrap_or_else(|e| e.into_inner());
            tracing::debug!(journal = %self.path.display(), live, "journal compacted");
        }
        Ok(())
    }
}

fn push_line(buf: &mut Vec<u8>, change: &Change) {
    serde_json::to_writer(&mut *buf, change).expect("records serialize");
    buf.push(b'\n');
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::*;

    fn sandbox(id: &str) -> SandboxRecord {
        SandboxRecord {
            id: id.into(),
            spec: SandboxSpec::default(),
            state: SandboxState::Ready,
            created_at: 1,
            ip: String::new(),
        }
    }

    #[test]
    fn replays_last_state_and_survives_a_torn_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.journal");
        let (j, snap) = Journal::open(&path).unwrap();
        assert_eq!(snap.len(), 0);
        let mut a = sandbox("a");
        j.append(&Change::Sandbox(Box::new(a.clone())), 1, Snapshot::default).unwrap();
        j.append(&Change::Sandbox(Box::new(sandbox("b"))), 2, Snapshot::default).unwrap();
        a.stop();
        j.append(&Change::Sandbox(Box::new(a.clone())), 2, Snapshot::default).unwrap();
        j.append(&Change::SandboxRemoved("b".into()), 1, Snapshot::default).unwrap();
        drop(j);
        // A crash in the middle of the next write leaves half a line.
        let mut f = OpenOptions::new().append(true).open(&path).unwrap();
        f.write_all(b"{\"sandbox\":{\"id\":\"c\",\"spe").unwrap();
        drop(f);
        let (_j, snap) = Journal::open(&path).unwrap();
        assert_eq!(snap.sandboxes.len(), 1);
        assert_eq!(snap.sandboxes["a"].state, SandboxState::NotReady);
        assert!(!path.with_extension("journal.corrupt").exists(), "a torn last line is not corruption");
        // Reopening compacted it to the live records.
        assert_eq!(std::fs::read_to_string(&path).unwrap().lines().count(), 1);
    }

    #[test]
    fn a_bad_line_in_the_middle_is_skipped_and_the_file_kept() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.journal");
        let good = |id: &str| serde_json::to_string(&Change::Sandbox(Box::new(sandbox(id)))).unwrap();
        std::fs::write(&path, format!("{}\nnot json\n{}\n", good("x"), good("y"))).unwrap();
        let (_j, snap) = Journal::open(&path).unwrap();
        assert_eq!(snap.sandboxes.len(), 2);
        let kept = std::fs::read_to_string(path.with_extension("journal.corrupt")).unwrap();
        assert!(kept.contains("not json"));
    }

    #[test]
    fn compacts_when_it_grows() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.journal");
        let (j, _) = Journal::open(&path).unwrap();
        let a = sandbox("a");
        let snap = || {
            let mut s = Snapshot::default();
            s.sandboxes.insert("a".into(), sandbox("a"));
            s
        };
        for _ in 0..COMPACT_SLACK + 10 {
            j.append(&Change::Sandbox(Box::new(a.clone())), 1, snap).unwrap();
        }
        let lines = std::fs::read_to_string(&path).unwrap().lines().count();
        assert!(lines < 20, "compacted to {lines} lines");
        drop(j);
        let (_j, s) = Journal::open(&path).unwrap();
        assert_eq!(s.sandboxes.len(), 1);
    }
}
