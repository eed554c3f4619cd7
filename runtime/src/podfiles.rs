//! The files a pod's containers see besides their image and mounts: `/etc/hosts`,
//! `/etc/resolv.conf` and `/etc/hostname`, written once per sandbox under
//! `<root>/pods/<sandbox id>/etc/` and preopened read-only at `/etc` in every container; and
//! file mounts. WASI preopens directories only, so the files mounted into one guest directory
//! are gathered into a directory of their own (`pods/<sandbox>/files/<container>/<n>/`) as hard
//! links to the host files (the same inode: writes go both ways), or, across filesystems, bind
//! mounts (root) or copies (otherwise, with a warning), and that directory is preopened at the
//! guest directory. What else the image had in that guest directory is hidden by it.

use std::collections::BTreeMap;
use std::fs;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use crate::engine::Preopen;
use crate::model::{DnsConfig, Mount};
use crate::{Error, Result};

/// A sandbox's directories: `etc` (its /etc files, on the fast run directory) and `files` (file
/// mount groups, beside the image store so that hard links to host files and to image files
/// stay on one filesystem where they can).
#[derive(Debug, Clone)]
pub struct PodDir {
    pub etc: PathBuf,
    pub files: PathBuf,
}

impl PodDir {
    fn etc_parent(&self) -> &Path {
        self.etc.parent().expect("etc has a parent")
    }
}

/// The sandbox's directories.
pub fn pod_dir(root: &Path, run_dir: &Path, sandbox_id: &str) -> PodDir {
    PodDir {
        etc: run_dir.join("pods").join(sandbox_id).join("etc"),
        files: root.join("pods").join(sandbox_id).join("files"),
    }
}

/// Checks a sandbox's DNS config as the kubelet would have: server addresses, search domains
/// (at most 32, 2048 characters in all) and `name` or `name:value` options.
pub fn check_dns(pod: &str, dns: &DnsConfig) -> Result<()> {
    let bad = |what: String| Err(Error::InvalidArgument(format!("pod sandbox {pod}: DNS config: {what}")));
    for s in &dns.servers {
        if s.parse::<IpAddr>().is_err() {
            return bad(format!("nameserver {s:?} is not an IP address"));
        }
    }
    if dns.searches.len() > 32 || dns.searches.iter().map(|s| s.len() + 1).sum::<usize>() > 2048 {
        return bad("more than 32 search domains or 2048 characters of them".into());
    }
    for s in &dns.searches {
        let ok = !s.is_empty() && s.len() <= 253 && s.bytes().all(|b| b.is_ascii_alphanumeric() || b"-._".contains(&b));
        if !ok {
            return bad(format!("search domain {s:?} is not a domain name"));
        }
    }
    for o in &dns.options {
        let (name, value) = o.split_once(':').map_or((o.as_str(), None), |(n, v)| (n, Some(v)));
        let ok = !name.is_empty()
            && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
            && value.is_none_or(|v| !v.is_empty() && v.bytes().all(|b| b.is_ascii_digit()));
        if !ok {
            return bad(format!("option {o:?} is not NAME or NAME:NUMBER"));
        }
    }
    Ok(())
}

/// `/etc/hosts` as the kubelet writes it: the loopback names, then the pod's own.
pub fn hosts(hostname: &str, ip: &str) -> String {
    let mut s = String::from(
        "# Kubernetes-managed hosts file (written by wasmlet).\n127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\nfe00::0\tip6-localnet\nfe00::0\tip6-mcastprefix\nfe00::1\tip6-allnodes\nfe00::2\tip6-allrouters\n",
    );
    if !ip.is_empty() && !hostname.is_empty() {
        s.push_str(&format!("{ip}\t{hostname}\n"));
    }
    s
}

/// `/etc/resolv.conf` for `dns`; without one, the host's (as containerd does).
pub fn resolv_conf(dns: Option<&DnsConfig>) -> String {
    let Some(dns) = dns else { return fs::read_to_string("/etc/resolv.conf").unwrap_or_default() };
    let mut s = String::new();
    if !dns.searches.is_empty() {
        s.push_str(&format!("search {}\n", dns.searches.join(" ")));
    }
    for n in &dns.servers {
        s.push_str(&format!("nameserver {n}\n"));
    }
    if !dns.options.is_empty() {
        s.push_str(&format!("options {}\n", dns.options.join(" ")));
    }
    s
}

/// Writes the sandbox's `etc/` files.
pub fn write_etc(dir: &PodDir, hostname: &str, ip: &str, dns: Option<&DnsConfig>) -> Result<()> {
    let etc = dir.etc.clone();
    let io = |what: &str| {
        let what = format!("{what} {}", etc.display());
        move |e: std::io::Error| Error::Internal(format!("{what}: {e}"))
    };
    fs::create_dir_all(&etc).map_err(io("create"))?;
    fs::write(etc.join("hosts"), hosts(hostname, ip)).map_err(io("write hosts in"))?;
    fs::write(etc.join("resolv.conf"), resolv_conf(dns)).map_err(io("write resolv.conf in"))?;
    fs::write(etc.join("hostname"), format!("{hostname}\n")).map_err(io("write hostname in"))?;
    Ok(())
}

/// Removes a container's file mount directories, undoing bind mounts first.
pub fn remove_files(files_dir: &Path) {
    for group in fs::read_dir(files_dir).into_iter().flatten().flatten() {
        for f in fs::read_dir(group.path()).into_iter().flatten().flatten() {
            let _ = rustix::mount::unmount(f.path(), rustix::mount::UnmountFlags::DETACH);
        }
    }
    let _ = fs::remove_dir_all(files_dir);
}

/// Removes a sandbox's directories, with its containers' file mounts.
pub fn remove_pod_dir(dir: &PodDir) {
    for c in fs::read_dir(&dir.files).into_iter().flatten().flatten() {
        remove_files(&c.path());
    }
    let _ = fs::remove_dir_all(dir.files.parent().expect("files has a parent"));
    let _ = fs::remove_dir_all(dir.etc_parent());
}

/// A file mount grouped by the guest directory it lands in.
struct FileGroup<'a> {
    guest_dir: String,
    files: Vec<(&'a str, PathBuf, bool)>,
}

/// File mounts of a container by guest directory (sorted, so the numbering is stable); an
/// `/etc` group, even without file mounts there, when the image has an `/etc` of its own.
fn file_groups<'a>(mounts: &'a [(PathBuf, &'a Mount)], image_etc: bool) -> Vec<FileGroup<'a>> {
    let mut by_dir: BTreeMap<String, Vec<(&str, PathBuf, bool)>> = BTreeMap::new();
    if image_etc {
        by_dir.insert("/etc".to_string(), Vec::new());
    }
    for (host, m) in mounts {
        let (dir, name) = m.container_path.rsplit_once('/').unwrap_or(("", &m.container_path));
        let dir = if dir.is_empty() { "/" } else { dir };
        by_dir.entry(dir.to_string()).or_default().push((name, host.clone(), m.readonly || m.recursive_read_only));
    }
    by_dir.into_iter().map(|(guest_dir, files)| FileGroup { guest_dir, files }).collect()
}

/// Places a container's file mounts (resolved host files) into their group directories
/// under `files_dir` (at CreateContainer). The `/etc` group holds the image's own `/etc`
/// (hard links of its files), then the sandbox's `/etc` files, then the file mounts, each
/// replacing what came before.
pub fn place_file_mounts(
    files_dir: &Path,
    etc_dir: &Path,
    image_etc: Option<&Path>,
    mounts: &[(PathBuf, &Mount)],
) -> Result<()> {
    for (n, group) in file_groups(mounts, image_etc.is_some()).iter().enumerate() {
        let dir = files_dir.join(n.to_string());
        fs::create_dir_all(&dir).map_err(|e| Error::Internal(format!("create {}: {e}", dir.display())))?;
        if let (Some(image_etc), "/etc") = (image_etc, group.guest_dir.as_str()) {
            link_tree(image_etc, &dir).map_err(|e| Error::Internal(format!("link the image's /etc: {e}")))?;
        }
        let mut names: Vec<(String, PathBuf)> =
            group.files.iter().map(|(name, host, _)| (name.to_string(), host.clone())).collect();
        if group.guest_dir == "/etc" {
            for own in ["hosts", "resolv.conf", "hostname"] {
                if !names.iter().any(|(n, _)| n == own) {
                    names.push((own.to_string(), etc_dir.join(own)));
                }
            }
        }
        for (name, host) in names {
            let target = dir.join(&name);
            let _ = fs::remove_file(&target);
            place(&host, &target)?;
        }
    }
    Ok(())
}

/// Recreates the tree `from` in `to`: directories made, files hard linked (the image's root
/// filesystem and the pod directory are both under wasmlet's root), symlinks copied.
fn link_tree(from: &Path, to: &Path) -> std::io::Result<()> {
    for entry in fs::read_dir(from)? {
        let entry = entry?;
        let (src, dst) = (entry.path(), to.join(entry.file_name()));
        let kind = entry.file_type()?;
        if kind.is_dir() {
            fs::create_dir_all(&dst)?;
            link_tree(&src, &dst)?;
        } else if kind.is_symlink() {
            std::os::unix::fs::symlink(fs::read_link(&src)?, &dst)?;
        } else if fs::hard_link(&src, &dst).is_err() {
            fs::copy(&src, &dst)?;
        }
    }
    Ok(())
}

/// `target` becomes the same file as `host`: a hard link, else a bind mount, else a copy.
fn place(host: &Path, target: &Path) -> Result<()> {
    if fs::hard_link(host, target).is_ok() {
        return Ok(());
    }
    let bound = fs::File::create(target).and_then(|_| rustix::mount::mount_bind(host, target).map_err(Into::into));
    if bound.is_ok() {
        return Ok(());
    }
    tracing::warn!(host = %host.display(), "file mount copied: the host file is on another filesystem and \
        bind mounts need root; the container's writes will not reach it");
    fs::copy(host, target)
        .map(|_| ())
        .map_err(|e| Error::InvalidArgument(format!("file mount {}: {e}", host.display())))
}

/// The preopens for the sandbox's `/etc` and a container's file mounts (placed earlier by
/// [`place_file_mounts`]).
pub fn preopens(files_dir: &Path, etc_dir: &Path, image_etc: bool, mounts: &[(PathBuf, &Mount)]) -> Vec<Preopen> {
    let groups = file_groups(mounts, image_etc);
    let mut out = Vec::new();
    if !groups.iter().any(|g| g.guest_dir == "/etc") {
        out.push(Preopen { host: etc_dir.to_path_buf(), guest: "/etc".into(), read_only: true });
    }
    for (n, g) in groups.iter().enumerate() {
        // The /etc group without file mounts is the image's and the pod's files: read-only.
        let read_only = g.files.is_empty() || g.files.iter().any(|(_, _, ro)| *ro);
        out.push(Preopen { host: files_dir.join(n.to_string()), guest: g.guest_dir.clone(), read_only });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dns(servers: &[&str], searches: &[&str], options: &[&str]) -> DnsConfig {
        let v = |x: &[&str]| x.iter().map(|s| s.to_string()).collect();
        DnsConfig { servers: v(servers), searches: v(searches), options: v(options) }
    }

    #[test]
    fn resolv_conf_and_hosts_as_asked() {
        let d = dns(&["10.96.0.10"], &["ns.svc.cluster.local", "svc.cluster.local"], &["ndots:5", "edns0"]);
        check_dns("p", &d).unwrap();
        assert_eq!(
            resolv_conf(Some(&d)),
            "search ns.svc.cluster.local svc.cluster.local\nnameserver 10.96.0.10\noptions ndots:5 edns0\n"
        );
        let h = hosts("web-0", "10.88.0.2");
        assert!(h.starts_with("# Kubernetes-managed hosts file") && h.contains("127.0.0.1\tlocalhost\n"));
        assert!(h.ends_with("10.88.0.2\tweb-0\n"));
        for (bad, says) in [
            (dns(&["dns.example"], &[], &[]), "is not an IP address"),
            (dns(&[], &["bad domain"], &[]), "is not a domain name"),
            (dns(&[], &[], &["ndots:x"]), "is not NAME or NAME:NUMBER"),
            (dns(&[], &[], &["ndots:"]), "is not NAME or NAME:NUMBER"),
        ] {
            let e = check_dns("p", &bad).unwrap_err().to_string();
            assert!(e.contains(says) && e.contains("pod sandbox p"), "{e}");
        }
    }

    #[test]
    fn file_mounts_are_grouped_by_directory() {
        let dir = tempfile::tempdir().unwrap();
        let host = dir.path().join("host");
        fs::create_dir_all(&host).unwrap();
        fs::write(host.join("kubelet-hosts"), "1.2.3.4 x\n").unwrap();
        fs::write(host.join("termination-log"), "").unwrap();
        let pod = pod_dir(dir.path(), dir.path(), "s");
        let etc = pod.etc.clone();
        write_etc(&pod, "pod", "10.88.0.2", None).unwrap();
        let m = |path: &str, ro: bool| Mount { container_path: path.into(), readonly: ro, ..Default::default() };
        let (hosts_m, log_m) = (m("/etc/hosts", false), m("/dev/termination-log", false));
        let mounts = vec![(host.join("kubelet-hosts"), &hosts_m), (host.join("termination-log"), &log_m)];
        let files = dir.path().join("files");
        place_file_mounts(&files, &etc, None, &mounts).unwrap();
        let p = preopens(&files, &etc, false, &mounts);
        let guests: Vec<&str> = p.iter().map(|p| p.guest.as_str()).collect();
        assert_eq!(guests, ["/dev", "/etc"]);
        // The kubelet's hosts file wins; the pod's other /etc files are still there.
        let etc_group = &p[1].host;
        assert_eq!(fs::read_to_string(etc_group.join("hosts")).unwrap(), "1.2.3.4 x\n");
        assert_eq!(fs::read_to_string(etc_group.join("hostname")).unwrap(), "pod\n");
        // A write through the mount reaches the host file (same inode).
        fs::write(p[0].host.join("termination-log"), "bye").unwrap();
        assert_eq!(fs::read_to_string(host.join("termination-log")).unwrap(), "bye");
    }
}
