//! Compat images: ordinary OCI images whose tar layers carry a `.wasm` entrypoint. Layers are
//! unpacked in order into a root filesystem the container sees read-only, safely: no entry may
//! leave the root (`..`, absolute paths, links pointing out), devices and fifos are skipped,
//! and whiteouts (`.wh.<name>`, `.wh..wh..opq`) are honoured.

use std::fs;
use std::io::Read;
use std::path::{Component, Path, PathBuf};

use crate::{Error, Result};

/// Unpacks one layer read from `layer` (`gzip` when `gzipped`) into `root`. `image` names the
/// image in errors.
pub fn unpack_layer(image: &str, layer: impl Read, gzipped: bool, root: &Path) -> Result<()> {
    let reader: Box<dyn Read> = if gzipped { Box::new(flate2::read::GzDecoder::new(layer)) } else { Box::new(layer) };
    let bad = |reason: String| Error::BadImage { image: image.to_string(), reason };
    let io = |what: String| {
        move |e: std::io::Error| Error::BadImage { image: image.to_string(), reason: format!("{what}: {e}") }
    };
    let mut archive = tar::Archive::new(reader);
    for entry in archive.entries().map_err(io("read layer".into()))? {
        let mut entry = entry.map_err(io("read layer".into()))?;
        let raw = entry.path().map_err(io("entry path".into()))?.into_owned();
        let rel =
            inside(&raw).ok_or_else(|| bad(format!("layer entry {} leaves the root filesystem", raw.display())))?;
        let Some(name) = rel.file_name().map(|n| n.to_string_lossy().into_owned()) else { continue };
        let parent = rel.parent().unwrap_or(Path::new(""));
        if name == ".wh..wh..opq" {
            // Opaque directory: what lower layers put here is hidden.
            let dir = root.join(parent);
            if let Ok(entries) = fs::read_dir(&dir) {
                for e in entries.flatten() {
                    remove_any(&e.path());
                }
            }
            continue;
        }
        if let Some(hidden) = name.strip_prefix(".wh.") {
            remove_any(&root.join(parent).join(hidden));
            continue;
        }
        let dest = root.join(&rel);
        // Never write through a symlink an earlier entry made.
        if let Some(p) = dest.parent() {
            ensure_dir_inside(root, p).map_err(|reason| bad(format!("entry {}: {reason}", raw.display())))?;
        }
        let kind = entry.header().entry_type();
        if kind.is_dir() {
            if !dest.is_dir() {
                remove_any(&dest);
                fs::create_dir(&dest).map_err(io(format!("create {}", rel.display())))?;
            }
        } else if kind.is_file() {
            remove_any(&dest);
            let mut out = fs::File::create(&dest).map_err(io(format!("create {}", rel.display())))?;
            std::io::copy(&mut entry, &mut out).map_err(io(format!("write {}", rel.display())))?;
        } else if kind.is_symlink() {
            let target = entry.link_name().map_err(io("link target".into()))?.unwrap_or_default().into_owned();
            // Resolve the target as the container would (absolute = from the root) and refuse
            // anything that would point out of it.
            let resolved =
                if target.is_absolute() { target.clone() } else { Path::new("/").join(parent).join(&target) };
            if inside(&resolved).is_none() {
                return Err(bad(format!(
                    "symlink {} -> {} points out of the root filesystem",
                    rel.display(),
                    target.display()
                )));
            }
            remove_any(&dest);
            std::os::unix::fs::symlink(&target, &dest).map_err(io(format!("symlink {}", rel.display())))?;
        } else if kind.is_hard_link() {
            let target = entry.link_name().map_err(io("link target".into()))?.unwrap_or_default().into_owned();
            let t = inside(&target).ok_or_else(|| {
                bad(format!("hard link {} -> {} points out of the root filesystem", rel.display(), target.display()))
            })?;
            let source = root.join(&t);
            ensure_dir_inside(root, &source).map_err(|reason| bad(format!("hard link {}: {reason}", rel.display())))?;
            remove_any(&dest);
            fs::hard_link(&source, &dest).map_err(io(format!("hard link {}", rel.display())))?;
        }
        // Devices, fifos and the like mean nothing to wasm: skipped.
    }
    Ok(())
}

/// `path` as a path relative to the root, or None when `..` climbs out of it. A leading `/` is
/// dropped, as Docker does: `/etc/x` in a layer is the image's `/etc/x`.
fn inside(path: &Path) -> Option<PathBuf> {
    let mut out = PathBuf::new();
    for c in path.components() {
        match c {
            Component::Normal(p) => out.push(p),
            Component::CurDir => {}
            Component::RootDir => {}
            Component::ParentDir => {
                if !out.pop() {
                    return None;
                }
            }
            Component::Prefix(_) => return None,
        }
    }
    Some(out)
}

/// Makes sure `dir` is a real directory below `root` with no symlink on the way.
fn ensure_dir_inside(root: &Path, dir: &Path) -> std::result::Result<(), String> {
    let rel = dir.strip_prefix(root).map_err(|_| "outside the root".to_string())?;
    let mut cur = root.to_path_buf();
    for part in rel.components() {
        cur.push(part);
        match fs::symlink_metadata(&cur) {
            Ok(m) if m.file_type().is_symlink() => return Err(format!("{} is a symlink", cur.display())),
            Ok(m) if m.is_dir() => {}
            Ok(_) => {
                fs::remove_file(&cur).map_err(|e| e.to_string())?;
                fs::create_dir(&cur).map_err(|e| e.to_string())?;
            }
            Err(_) => fs::create_dir(&cur).map_err(|e| e.to_string())?,
        }
    }
    Ok(())
}

fn remove_any(path: &Path) {
    match fs::symlink_metadata(path) {
        Ok(m) if m.is_dir() => {
            let _ = fs::remove_dir_all(path);
        }
        Ok(_) => {
            let _ = fs::remove_file(path);
        }
        Err(_) => {}
    }
}

/// The host path of `guest` (an absolute path in the image) inside `root`, following symlinks
/// as the container would without leaving the root. None when it is missing or escapes.
pub fn resolve_in_root(root: &Path, guest: &str) -> Option<PathBuf> {
    let rel = inside(Path::new(guest))?;
    let host = fs::canonicalize(root.join(rel)).ok()?;
    let root = fs::canonicalize(root).ok()?;
    host.starts_with(&root).then_some(host)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layer(build: impl FnOnce(&mut tar::Builder<Vec<u8>>)) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        build(&mut b);
        b.into_inner().unwrap()
    }

    fn file(b: &mut tar::Builder<Vec<u8>>, path: &str, data: &[u8]) {
        let mut h = tar::Header::new_gnu();
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        h.set_entry_type(tar::EntryType::Regular);
        // set_path refuses `..`; write the raw name to test what hostile archives hold.
        let name = &mut h.as_old_mut().name;
        name[..path.len()].copy_from_slice(path.as_bytes());
        h.set_cksum();
        b.append(&h, data).unwrap();
    }

    fn link(b: &mut tar::Builder<Vec<u8>>, kind: tar::EntryType, path: &str, target: &str) {
        let mut h = tar::Header::new_gnu();
        h.set_size(0);
        h.set_entry_type(kind);
        h.set_path(path).unwrap();
        h.set_link_name(target).unwrap();
        h.set_cksum();
        b.append(&h, &[][..]).unwrap();
    }

    #[test]
    fn unpacks_layers_with_whiteouts() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("rootfs");
        fs::create_dir(&root).unwrap();
        let l1 = layer(|b| {
            file(b, "app/tool.wasm", b"\0asm");
            file(b, "etc/motd", b"hi");
            file(b, "data/a", b"a");
            file(b, "data/b", b"b");
            link(b, tar::EntryType::Symlink, "app/current", "tool.wasm");
        });
        unpack_layer("img", &l1[..], false, &root).unwrap();
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        std::io::Write::write_all(
            &mut gz,
            &layer(|b| {
                file(b, "etc/.wh.motd", b"");
                file(b, "data/.wh..wh..opq", b"");
                file(b, "data/c", b"c");
            }),
        )
        .unwrap();
        unpack_layer("img", &gz.finish().unwrap()[..], true, &root).unwrap();
        assert!(!root.join("etc/motd").exists());
        assert!(!root.join("data/a").exists() && root.join("data/c").exists());
        assert_eq!(resolve_in_root(&root, "/app/current"), Some(fs::canonicalize(root.join("app/tool.wasm")).unwrap()));
        assert_eq!(resolve_in_root(&root, "/../../etc/passwd"), None);
    }

    #[test]
    fn refuses_escapes() {
        let dir = tempfile::tempdir().unwrap();
        let cases: Vec<(&str, Vec<u8>)> = vec![
            ("dotdot", layer(|b| file(b, "../evil", b"x"))),
            ("deep dotdot", layer(|b| file(b, "a/../../evil", b"x"))),
            ("symlink out", layer(|b| link(b, tar::EntryType::Symlink, "out", "../../../etc"))),
            ("absolute symlink out", layer(|b| link(b, tar::EntryType::Symlink, "abs", "/../etc/passwd"))),
            ("hard link out", layer(|b| link(b, tar::EntryType::Link, "h", "../../etc/passwd"))),
            (
                "write through a symlink",
                layer(|b| {
                    link(b, tar::EntryType::Symlink, "d", "/");
                    file(b, "d/x", b"x");
                }),
            ),
        ];
        for (what, l) in cases {
            let root = dir.path().join(what.replace(' ', "_"));
            fs::create_dir(&root).unwrap();
            let err = unpack_layer("img", &l[..], false, &root).unwrap_err().to_string();
            assert!(err.starts_with("img: "), "{what}: {err}");
            assert!(!dir.path().join("evil").exists(), "{what}");
        }
    }
}
