//! How a container record becomes a guest: argv, env, mounts, log paths, exec lookups.

use std::fs;
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;

use crate::engine::{GuestNet, GuestSpec, Preopen};
use crate::logs::GuestOutput;
use crate::model::*;
use crate::net::NetNs;
use crate::net::dns::PodDns;
use crate::net::egress::{Egress, Inside};
use crate::net::services::ServiceTable;
use crate::podfiles;
use crate::{Error, Result};

/// How a pod's guests reach out (see `Runtime::net_route`).
pub(super) struct NetRoute {
    /// Where its DNS queries run, and the namespace they are sent from (None: the executor's).
    pub dns: (tokio::runtime::Handle, Option<Arc<NetNs>>),
    /// The pod's namespace, the executor that may enter it, and what is dialled from inside.
    pub egress: Option<(tokio::runtime::Handle, Arc<NetNs>, Inside)>,
    /// The executor that stays in the host's namespace.
    pub host: tokio::runtime::Handle,
    pub services: Arc<ServiceTable>,
    /// The pod's address (Service affinity).
    pub client: std::net::IpAddr,
}

/// The guest's view of a container: argv, env, directories, working directory. The CRI's
/// command replaces a compat image's entrypoint and its args replace the image's cmd (as
/// Kubernetes defines them); the CRI's env wins over the image's; mounts lie over the image's
/// read-only root filesystem.
pub(super) fn guest_spec(
    rec: &ContainerRecord,
    pod_dir: &podfiles::PodDir,
    route: &NetRoute,
    hostname: &str,
    net: GuestNet,
    stdout: GuestOutput,
    stderr: GuestOutput,
) -> Result<GuestSpec> {
    let spec = &rec.spec;
    let image = rec.image_run.as_ref();
    let mut args: Vec<String> = match image {
        Some(run) if spec.command.is_empty() => {
            let rest = if spec.args.is_empty() { &run.cmd } else { &spec.args };
            run.entrypoint.iter().chain(rest).cloned().collect()
        }
        _ => spec.command.iter().chain(&spec.args).cloned().collect(),
    };
    if image.is_none() && spec.command.is_empty() && !args.is_empty() {
        args.insert(0, spec.metadata.name.clone());
    }
    let mut env: Vec<(String, String)> = image
        .map(|run| {
            run.env
                .iter()
                .filter_map(|kv| kv.split_once('=').map(|(k, v)| (k.to_string(), v.to_string())))
                .filter(|(k, _)| !spec.envs.iter().any(|(ck, _)| ck == k))
                .collect()
        })
        .unwrap_or_default();
    env.extend(spec.envs.iter().cloned());
    if !hostname.is_empty() && !env.iter().any(|(k, _)| k == "HOSTNAME") {
        env.push(("HOSTNAME".to_string(), hostname.to_string()));
    }
    let mut preopens = Vec::new();
    if let Some(run) = image {
        preopens.push(Preopen { host: PathBuf::from(&run.rootfs), guest: "/".to_string(), read_only: true });
    }
    let mut dirs = Vec::new();
    for m in &spec.mounts {
        if let Resolved::Dir(p) = resolve_mount(m)? {
            dirs.push(p);
        }
    }
    // The pod's /etc files and the file mounts, unless a directory is mounted at their place.
    let files = file_mounts(spec)?;
    let image_etc = image_etc(image).is_some();
    let pod_files = podfiles::preopens(&pod_dir.files.join(&rec.id), &pod_dir.etc, image_etc, &files);
    preopens.extend(pod_files.into_iter().filter(|p| !dirs.iter().any(|d| d.guest == p.guest)));
    preopens.extend(dirs);
    let working_dir =
        if spec.working_dir.is_empty() { image.map_or("", |r| r.working_dir.as_str()) } else { &spec.working_dir };
    let cwd = (!working_dir.is_empty()).then(|| working_dir.to_string());
    // Name lookups follow the pod's files as this container sees them (a kubelet's hosts
    // file mount included).
    let etc = preopens.iter().rev().find(|p| p.guest == "/etc").map(|p| p.host.clone());
    let read = |name: &str| etc.as_ref().and_then(|e| fs::read_to_string(e.join(name)).ok()).unwrap_or_default();
    let dns = (rec.kind == wasmlet_images::WasmKind::Component && !matches!(net, GuestNet::None)).then(|| {
        let mut dns = PodDns::parse(&read("resolv.conf"), &read("hosts"), route.dns.0.clone());
        dns.netns = route.dns.1.clone();
        dns.services = Some((route.services.clone(), route.client));
        Arc::new(dns)
    });
    let egress = dns.as_ref().map(|dns| {
        Arc::new(Egress {
            dns: dns.clone(),
            pod: route.egress.clone(),
            host: route.host.clone(),
            services: route.services.clone(),
            client: route.client,
        })
    });
    Ok(GuestSpec {
        args,
        env,
        preopens,
        cwd,
        stdout,
        stderr,
        net,
        dns,
        egress,
        stop: None,
        http_listener: None,
        stdin: None,
        session: None,
    })
}

/// A mount with its host path resolved.
pub(super) enum Resolved {
    /// A directory: preopened as it is.
    Dir(Preopen),
    /// A file: placed in a directory of its own (see [`podfiles`]).
    File(PathBuf),
}

/// Checks a mount and resolves its host path (a symlink is followed, as the CRI asks).
pub(super) fn resolve_mount(m: &Mount) -> Result<Resolved> {
    if !m.container_path.starts_with('/') || m.container_path.split('/').any(|c| c == "..") {
        return Err(Error::InvalidArgument(format!(
            "mount {:?}: container path must be absolute, without ..",
            m.container_path
        )));
    }
    let host = fs::canonicalize(&m.host_path)
        .map_err(|e| Error::InvalidArgument(format!("mount {}: host path {:?}: {e}", m.container_path, m.host_path)))?;
    if host.is_dir() {
        let guest = m.container_path.trim_end_matches('/');
        let guest = if guest.is_empty() { "/" } else { guest };
        return Ok(Resolved::Dir(Preopen {
            host,
            guest: guest.to_string(),
            read_only: m.readonly || m.recursive_read_only,
        }));
    }
    if m.container_path.ends_with('/') {
        return Err(Error::InvalidArgument(format!(
            "mount {}: host path {:?} is a file",
            m.container_path, m.host_path
        )));
    }
    Ok(Resolved::File(host))
}

/// Who a pod is, for CNI plugins.
pub(super) fn pod_identity(spec: &SandboxSpec) -> crate::net::cni::PodIdentity {
    let m = &spec.metadata;
    crate::net::cni::PodIdentity { namespace: m.namespace.clone(), name: m.name.clone(), uid: m.uid.clone() }
}

/// The image's own `/etc` directory, if it has one (compat images).
pub(super) fn image_etc(image: Option<&wasmlet_images::ImageRun>) -> Option<PathBuf> {
    let etc = PathBuf::from(&image?.rootfs).join("etc");
    etc.is_dir().then_some(etc)
}

/// A container's file mounts, resolved.
pub(super) fn file_mounts(spec: &ContainerSpec) -> Result<Vec<(PathBuf, &Mount)>> {
    let mut out = Vec::new();
    for m in &spec.mounts {
        if let Resolved::File(host) = resolve_mount(m)? {
            out.push((host, m));
        }
    }
    Ok(out)
}

/// The container's log file: `<log_directory>/<log_path>`, refusing a path that leaves the
/// log directory.
pub(super) fn log_file(sandbox: &SandboxSpec, spec: &ContainerSpec) -> Result<Option<PathBuf>> {
    if spec.log_path.is_empty() {
        return Ok(None);
    }
    let name = &spec.metadata.name;
    if sandbox.log_directory.is_empty() {
        return Err(Error::InvalidArgument(format!(
            "container {name}: log path {:?} given but the pod sandbox has no log directory",
            spec.log_path
        )));
    }
    let mut rel = PathBuf::new();
    for c in Path::new(&spec.log_path).components() {
        match c {
            Component::Normal(part) => rel.push(part),
            Component::CurDir => {}
            Component::ParentDir if rel.pop() => {}
            _ => {
                return Err(Error::InvalidArgument(format!(
                    "container {name}: log path {:?} escapes the log directory {:?}",
                    spec.log_path, sandbox.log_directory
                )));
            }
        }
    }
    if rel.as_os_str().is_empty() {
        return Err(Error::InvalidArgument(format!("container {name}: log path {:?} names no file", spec.log_path)));
    }
    Ok(Some(Path::new(&sandbox.log_directory).join(rel)))
}

/// PATH when the container sets none (the kubelet's and runc's default).
const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// The host file behind an absolute guest path, if it is inside one of the preopens (a symlink
/// that leads out of its mount does not count).
fn host_file(preopens: &[Preopen], guest_path: &str) -> Option<PathBuf> {
    let guest = Path::new(guest_path);
    let best = preopens.iter().filter(|p| guest.starts_with(&p.guest)).max_by_key(|p| p.guest.len())?;
    let rel = guest.strip_prefix(&best.guest).ok()?;
    let root = fs::canonicalize(&best.host).ok()?;
    let host = fs::canonicalize(best.host.join(rel)).ok()?;
    host.starts_with(&root).then_some(host)
}

fn is_wasm(path: &Path) -> bool {
    let mut magic = [0u8; 4];
    fs::File::open(path).and_then(|mut f| std::io::Read::read_exact(&mut f, &mut magic)).is_ok() && magic == *b"\0asm"
}

/// What an exec's `cmd[0]` names, resolved as a process's would be in the container's
/// filesystem (its image and mounts): a path (with a `/`, relative ones from the working
/// directory) must be a wasm module or component there; a name is looked for along the
/// container's PATH, as NAME or NAME.wasm. `Ok(None)`: a name found nowhere, so the container's
/// own program runs with `argv = cmd` (how a multi-call binary sees its name).
pub(super) fn resolve_command(
    preopens: &[Preopen],
    env: &[(String, String)],
    cwd: Option<&str>,
    cmd0: &str,
) -> std::result::Result<Option<PathBuf>, String> {
    if cmd0.contains('/') {
        let guest = if cmd0.starts_with('/') {
            cmd0.to_string()
        } else {
            format!("{}/{cmd0}", cwd.unwrap_or("/").trim_end_matches('/'))
        };
        let Some(host) = host_file(preopens, &guest) else {
            return Err(format!("{cmd0:?}: no such file or directory"));
        };
        if !host.is_file() {
            return Err(format!("{cmd0:?} is not a file (cannot execute it)"));
        }
        if !is_wasm(&host) {
            return Err(format!("{cmd0:?} is not a wasm module or component (cannot execute it)"));
        }
        return Ok(Some(host));
    }
    let path = env.iter().rev().find(|(k, _)| k == "PATH").map_or(DEFAULT_PATH, |(_, v)| v.as_str());
    for dir in path.split(':').filter(|d| d.starts_with('/')) {
        for name in [cmd0.to_string(), format!("{cmd0}.wasm")] {
            let guest = format!("{}/{name}", dir.trim_end_matches('/'));
            if let Some(host) = host_file(preopens, &guest).filter(|h| h.is_file() && is_wasm(h)) {
                return Ok(Some(host));
            }
        }
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sandbox(dir: &str) -> SandboxSpec {
        SandboxSpec { log_directory: dir.to_string(), ..Default::default() }
    }

    fn container(log_path: &str) -> ContainerSpec {
        ContainerSpec {
            metadata: ContainerMetadata { name: "c".into(), attempt: 0 },
            log_path: log_path.to_string(),
            ..Default::default()
        }
    }

    #[test]
    fn log_paths_stay_inside_the_log_directory() {
        let ok = log_file(&sandbox("/logs"), &container("c/0.log")).unwrap();
        assert_eq!(ok, Some(PathBuf::from("/logs/c/0.log")));
        let ok = log_file(&sandbox("/logs"), &container("c/../d/./1.log")).unwrap();
        assert_eq!(ok, Some(PathBuf::from("/logs/d/1.log")));
        assert_eq!(log_file(&sandbox(""), &container("")).unwrap(), None);
        for bad in ["../x.log", "/etc/passwd", "c/../../x", ".."] {
            let err = log_file(&sandbox("/logs"), &container(bad)).unwrap_err().to_string();
            assert!(err.contains("escapes the log directory") || err.contains("names no file"), "{bad}: {err}");
        }
        assert!(log_file(&sandbox(""), &container("x.log")).is_err());
    }

    #[test]
    fn exec_commands_resolve_as_a_process_would() {
        let dir = tempfile::tempdir().unwrap();
        let mount = dir.path().join("m");
        fs::create_dir_all(mount.join("bin")).unwrap();
        fs::write(mount.join("tool.wasm"), b"\0asm\x01\0\0\0").unwrap();
        fs::write(mount.join("bin/sh"), b"\0asm\x01\0\0\0").unwrap();
        fs::write(mount.join("bin/ls.wasm"), b"\0asm\x01\0\0\0").unwrap();
        fs::write(mount.join("bin/script"), b"#!/bin/sh\n").unwrap();
        fs::write(dir.path().join("outside.wasm"), b"\0asm\x01\0\0\0").unwrap();
        std::os::unix::fs::symlink(dir.path().join("outside.wasm"), mount.join("link.wasm")).unwrap();
        let preopens = vec![Preopen { host: mount.clone(), guest: "/".into(), read_only: true }];
        let r = |cmd: &str| resolve_command(&preopens, &[], Some("/bin"), cmd);
        let host = |p: &str| Some(fs::canonicalize(mount.join(p)).unwrap());
        assert_eq!(r("/tool.wasm").unwrap(), host("tool.wasm"));
        assert_eq!(r("/bin/sh").unwrap(), host("bin/sh"), "a wasm file needs no suffix");
        assert_eq!(r("sh").unwrap(), host("bin/sh"), "names are looked for along PATH");
        assert_eq!(r("ls").unwrap(), host("bin/ls.wasm"), "as NAME or NAME.wasm");
        assert_eq!(r("./sh").unwrap(), host("bin/sh"), "relative paths from the working directory");
        assert_eq!(r("tool").unwrap(), None, "a name found nowhere runs the container's own program");
        assert_eq!(r("script").unwrap(), None, "what is not wasm is not a command");
        assert!(r("/bin/script").unwrap_err().contains("is not a wasm module or component"));
        assert!(r("/no/such").unwrap_err().contains("no such file or directory"));
        assert!(r("/link.wasm").unwrap_err().contains("no such file"), "a symlink out of the mount");
        assert!(r("/../outside.wasm").unwrap_err().contains("no such file"));
        assert!(r("/bin").unwrap_err().contains("is not a file"));
        let env = vec![("PATH".to_string(), "/nowhere".to_string())];
        assert_eq!(resolve_command(&preopens, &env, None, "sh").unwrap(), None, "the container's PATH is used");
    }
}
