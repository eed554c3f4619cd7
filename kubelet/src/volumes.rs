//! Pod volumes on the node as the kubelet lays them out: emptyDir, hostPath (with its type
//! checks), and configMap, secret, downwardAPI and projected volumes written atomically
//! (`..data` pointing at a timestamped directory, one symlink per key).

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};

use k8s_openapi::api::core::v1::{ConfigMap, DownwardAPIVolumeFile, KeyToPath, Pod, Secret, Volume};

use super::env::{config_map_data, field_value, resource_value, secret_data};
use super::quantity::Quantity;

/// Why a volume cannot be set up (a `FailedMount` event; the pod stays ContainerCreating).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct MountError(pub String);

/// What the volumes are made from besides the spec.
pub struct Sources<'a> {
    pub config_maps: &'a dyn Fn(&str) -> Option<ConfigMap>,
    pub secrets: &'a dyn Fn(&str) -> Option<Secret>,
    /// A token of the pod's service account for (audience, expirationSeconds); None
    /// without a cluster.
    pub tokens: &'a dyn Fn(&str, i64) -> Option<String>,
    /// The directory of the PersistentVolume bound to a claim of the pod's namespace.
    pub claims: &'a dyn Fn(&str) -> Result<PathBuf, String>,
    pub pod_ips: &'a [String],
    pub host_ips: &'a [String],
    pub node_name: &'a str,
    pub allocatable_cpu: Quantity,
    pub allocatable_memory: Quantity,
    /// The pod's directory on a tmpfs, for `medium: Memory` emptyDirs.
    pub memory_dir: &'a Path,
}

/// A file of a projected volume: relative path, bytes and mode.
type Payload = BTreeMap<String, (Vec<u8>, u32)>;

/// A volume ready on the node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ready {
    pub host_path: PathBuf,
    /// configMap, secret, downwardAPI and projected volumes are always mounted read-only.
    pub read_only: bool,
}

/// `<pod dir>/volumes/kubernetes.io~<plugin>/<name>`.
pub fn volume_dir(pod_dir: &Path, plugin: &str, name: &str) -> PathBuf {
    pod_dir.join("volumes").join(format!("kubernetes.io~{plugin}")).join(name)
}

fn io(what: &str, path: &Path, e: std::io::Error) -> MountError {
    MountError(format!("{what} {}: {e}", path.display()))
}

/// Where a volume lives on the node, and whether it is mounted read-only: the one mapping
/// from a volume's source to its directory, for setting it up and for mounting it.
pub fn location(pod_dir: &Path, v: &Volume) -> Ready {
    if let Some(h) = &v.host_path {
        return Ready { host_path: PathBuf::from(&h.path), read_only: false };
    }
    if let Some(c) = &v.persistent_volume_claim {
        // A link to the PersistentVolume's directory (the runtime resolves it when it mounts).
        return Ready { host_path: volume_dir(pod_dir, "pvc", &v.name), read_only: c.read_only == Some(true) };
    }
    let plugin = if v.config_map.is_some() {
        "configmap"
    } else if v.secret.is_some() {
        "secret"
    } else if v.downward_api.is_some() {
        "downward-api"
    } else if v.projected.is_some() {
        "projected"
    } else {
        "empty-dir"
    };
    Ready { host_path: volume_dir(pod_dir, plugin, &v.name), read_only: plugin != "empty-dir" }
}

/// Sets up (or refreshes) one volume of the pod.
pub fn setup(pod: &Pod, pod_dir: &Path, v: &Volume, s: &Sources<'_>) -> Result<Ready, MountError> {
    let name = v.name.as_str();
    let fail = |m: String| MountError(format!("MountVolume.SetUp failed for volume \"{name}\" : {m}"));
    if let Some(h) = &v.host_path {
        return host_path(&h.path, h.type_.as_deref().unwrap_or(""))
            .map_err(fail)
            .map(|p| Ready { host_path: p, read_only: false });
    }
    let projected = |payload: Result<Payload, String>| {
        let here = location(pod_dir, v);
        write_atomic(&here.host_path, &payload.map_err(fail)?).map_err(|e| fail(e.0))?;
        Ok(here)
    };
    if let Some(c) = &v.config_map {
        let payload = config_map_payload(&c.name, c.items.as_deref(), c.default_mode, c.optional, s);
        return projected(payload);
    }
    if let Some(c) = &v.secret {
        let payload = secret_payload(
            c.secret_name.as_deref().unwrap_or_default(),
            c.items.as_deref(),
            c.default_mode,
            c.optional,
            s,
        );
        return projected(payload);
    }
    if let Some(c) = &v.persistent_volume_claim {
        let target = (s.claims)(&c.claim_name).map_err(fail)?;
        if !target.is_dir() {
            return Err(fail(format!("the volume's directory {} does not exist", target.display())));
        }
        let here = location(pod_dir, v);
        if fs::read_link(&here.host_path).ok().as_deref() != Some(target.as_path()) {
            if let Some(dir) = here.host_path.parent() {
                fs::create_dir_all(dir).map_err(|e| fail(io("create", dir, e).0))?;
            }
            let _ = fs::remove_file(&here.host_path);
            std::os::unix::fs::symlink(&target, &here.host_path).map_err(|e| fail(io("link", &here.host_path, e).0))?;
        }
        return Ok(here);
    }
    if let Some(d) = &v.downward_api {
        return projected(downward_payload(pod, d.items.as_deref().unwrap_or_default(), d.default_mode, s));
    }
    if let Some(p) = &v.projected {
        let result = (|| {
            let mut all = Payload::new();
            for src in p.sources.iter().flatten() {
                if let Some(c) = &src.config_map {
                    all.extend(config_map_payload(&c.name, c.items.as_deref(), p.default_mode, c.optional, s)?);
                }
                if let Some(c) = &src.secret {
                    all.extend(secret_payload(&c.name, c.items.as_deref(), p.default_mode, c.optional, s)?);
                }
                if let Some(d) = &src.downward_api {
                    all.extend(downward_payload(pod, d.items.as_deref().unwrap_or_default(), p.default_mode, s)?);
                }
                if let Some(t) = &src.service_account_token {
                    let expiration = t.expiration_seconds.unwrap_or(3600);
                    let audience = t.audience.as_deref().unwrap_or_default();
                    let token = (s.tokens)(audience, expiration).ok_or_else(|| {
                        "failed to fetch token: serviceAccountToken sources need a cluster".to_string()
                    })?;
                    all.insert(t.path.clone(), (token.into_bytes(), mode(None, p.default_mode)));
                }
                if src.cluster_trust_bundle.is_some() {
                    return Err("clusterTrustBundle sources are not supported by wasmlet".to_string());
                }
            }
            Ok(all)
        })();
        return projected(result);
    }
    // emptyDir, or no source at all; any other source (PVCs, CSI, NFS...) needs a cluster.
    let json = serde_json::to_value(v).unwrap_or_default();
    let other = json.as_object().into_iter().flatten().find(|(k, _)| *k != "name" && *k != "emptyDir");
    if let Some((kind, _)) = other {
        return Err(fail(format!("volume type {kind} is not supported by wasmlet")));
    }
    // emptyDir, or a volume with no source: a 0777 directory that lives as long as the pod.
    // `medium: Memory` puts it on a tmpfs (the node's memory directory), linked from the usual
    // place; the runtime resolves the link when it mounts it. (Its sizeLimit is not enforced:
    // the tmpfs is shared, not one mount per volume.)
    let dir = volume_dir(pod_dir, "empty-dir", name);
    let memory = v.empty_dir.as_ref().and_then(|e| e.medium.as_deref()) == Some("Memory");
    let real = if memory { s.memory_dir.join(name) } else { dir.clone() };
    fs::create_dir_all(&real).map_err(|e| fail(io("create", &real, e).0))?;
    fs::set_permissions(&real, fs::Permissions::from_mode(0o777)).map_err(|e| fail(io("chmod", &real, e).0))?;
    if memory && fs::symlink_metadata(&dir).is_err() {
        let parent = dir.parent().unwrap_or(pod_dir);
        fs::create_dir_all(parent).map_err(|e| fail(io("create", parent, e).0))?;
        std::os::unix::fs::symlink(&real, &dir).map_err(|e| fail(io("link", &dir, e).0))?;
    }
    Ok(Ready { host_path: dir, read_only: false })
}

/// Checks (or creates) a hostPath by its type.
pub fn host_path(path: &str, kind: &str) -> Result<PathBuf, String> {
    let p = PathBuf::from(path);
    let meta = fs::metadata(&p);
    let is = |f: &dyn Fn(&fs::Metadata) -> bool| meta.as_ref().is_ok_and(f);
    match kind {
        "" => {}
        "DirectoryOrCreate" => {
            if meta.is_err() {
                fs::create_dir_all(&p).map_err(|e| format!("create {path}: {e}"))?;
                fs::set_permissions(&p, fs::Permissions::from_mode(0o755)).map_err(|e| format!("chmod {path}: {e}"))?;
            } else if !is(&|m| m.is_dir()) {
                return Err(format!("hostPath type check failed: {path} is not a directory"));
            }
        }
        "Directory" if !is(&|m| m.is_dir()) => {
            return Err(format!("hostPath type check failed: {path} is not a directory"));
        }
        "FileOrCreate" => {
            if meta.is_err() {
                if let Some(parent) = p.parent() {
                    fs::create_dir_all(parent).map_err(|e| format!("create {}: {e}", parent.display()))?;
                }
                fs::write(&p, b"").map_err(|e| format!("create {path}: {e}"))?;
                fs::set_permissions(&p, fs::Permissions::from_mode(0o644)).map_err(|e| format!("chmod {path}: {e}"))?;
            } else if !is(&|m| m.is_file()) {
                return Err(format!("hostPath type check failed: {path} is not a file"));
            }
        }
        "File" if !is(&|m| m.is_file()) => return Err(format!("hostPath type check failed: {path} is not a file")),
        "Socket" if !is(&|m| m.file_type().is_socket()) => {
            return Err(format!("hostPath type check failed: {path} is not a socket file"));
        }
        "CharDevice" if !is(&|m| m.file_type().is_char_device()) => {
            return Err(format!("hostPath type check failed: {path} is not a character device"));
        }
        "BlockDevice" if !is(&|m| m.file_type().is_block_device()) => {
            return Err(format!("hostPath type check failed: {path} is not a block device"));
        }
        "Directory" | "File" | "Socket" | "CharDevice" | "BlockDevice" => {}
        other => return Err(format!("hostPath type {other:?} is not one of the known types")),
    }
    Ok(p)
}

fn mode(item: Option<i32>, default: Option<i32>) -> u32 {
    item.or(default).unwrap_or(0o644) as u32 & 0o777
}

fn keyed(
    kind: &str,
    name: &str,
    data: BTreeMap<String, Vec<u8>>,
    items: Option<&[KeyToPath]>,
    default_mode: Option<i32>,
) -> Result<Payload, String> {
    let mut out = Payload::new();
    match items {
        None => {
            for (k, v) in data {
                out.insert(k, (v, mode(None, default_mode)));
            }
        }
        Some(items) => {
            for it in items {
                let Some(v) = data.get(&it.key) else {
                    return Err(format!("configuration of {kind} \"{name}\" has no key \"{}\"", it.key));
                };
                out.insert(it.path.clone(), (v.clone(), mode(it.mode, default_mode)));
            }
        }
    }
    Ok(out)
}

fn config_map_payload(
    name: &str,
    items: Option<&[KeyToPath]>,
    default_mode: Option<i32>,
    optional: Option<bool>,
    s: &Sources<'_>,
) -> Result<Payload, String> {
    let Some(cm) = (s.config_maps)(name) else {
        return if optional == Some(true) {
            Ok(Payload::new())
        } else {
            Err(format!("configmap \"{name}\" not found"))
        };
    };
    keyed("configmap", name, config_map_data(&cm), items, default_mode)
}

fn secret_payload(
    name: &str,
    items: Option<&[KeyToPath]>,
    default_mode: Option<i32>,
    optional: Option<bool>,
    s: &Sources<'_>,
) -> Result<Payload, String> {
    let Some(secret) = (s.secrets)(name) else {
        return if optional == Some(true) { Ok(Payload::new()) } else { Err(format!("secret \"{name}\" not found")) };
    };
    keyed("secret", name, secret_data(&secret), items, default_mode)
}

fn downward_payload(
    pod: &Pod,
    items: &[DownwardAPIVolumeFile],
    default_mode: Option<i32>,
    s: &Sources<'_>,
) -> Result<Payload, String> {
    let mut out = Payload::new();
    for it in items {
        let value = if let Some(f) = &it.field_ref {
            // In files, labels and annotations are all of them, one `k="v"` per line.
            match f.field_path.as_str() {
                "metadata.labels" | "metadata.annotations" => {
                    let m = if f.field_path == "metadata.labels" {
                        &pod.metadata.labels
                    } else {
                        &pod.metadata.annotations
                    };
                    m.iter().flatten().map(|(k, v)| format!("{k}={v:?}\n")).collect::<String>()
                }
                path => field_value(pod, path, s.pod_ips, s.host_ips, s.node_name)
                    .ok_or_else(|| format!("unsupported fieldPath: {path}"))?,
            }
        } else if let Some(r) = &it.resource_field_ref {
            let spec = pod.spec.as_ref();
            let c = spec
                .into_iter()
                .flat_map(|s| s.containers.iter().chain(s.init_containers.iter().flatten()))
                .find(|c| Some(&c.name) == r.container_name.as_ref())
                .ok_or_else(|| format!("resourceFieldRef: container {:?} not found", r.container_name))?;
            let divisor = r.divisor.as_ref().map(|d| Quantity::parse(&d.0)).transpose()?;
            resource_value(
                c.resources.as_ref(),
                &r.resource,
                divisor.as_ref(),
                &s.allocatable_cpu,
                &s.allocatable_memory,
            )
            .map_err(|e| e.0)?
        } else {
            String::new()
        };
        out.insert(it.path.clone(), (value.into_bytes(), mode(it.mode, default_mode)));
    }
    Ok(out)
}

/// A relative path with no `..` (item paths, subPath).
pub fn check_relative(p: &str) -> Result<(), String> {
    let path = Path::new(p);
    if path.is_absolute() {
        return Err(format!("{p:?} must be a relative path"));
    }
    if path.components().any(|c| matches!(c, Component::ParentDir)) {
        return Err(format!("{p:?} must not contain '..'"));
    }
    Ok(())
}

/// Writes the payload into `dir` the way the kubelet's atomic writer does: the files go into
/// a new `..<timestamp>.<n>` directory, `..data_tmp` is pointed at it and renamed over
/// `..data` in one step, each top-level entry is a symlink through `..data`, and the old data
/// directory is removed. Readers always see one whole version.
pub fn write_atomic(dir: &Path, payload: &Payload) -> Result<(), MountError> {
    for p in payload.keys() {
        check_relative(p).map_err(MountError)?;
        if p.starts_with("..") {
            return Err(MountError(format!("{p:?} must not start with '..'")));
        }
    }
    fs::create_dir_all(dir).map_err(|e| io("create", dir, e))?;
    let data_link = dir.join("..data");
    let old = fs::read_link(&data_link).ok();
    if let Some(old) = &old
        && same_payload(&dir.join(old), payload)
    {
        return Ok(());
    }
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_nanos();
    let now = k8s_openapi::jiff::Timestamp::from_nanosecond(nanos as i128).unwrap_or_default();
    let stamp = now.strftime("..%Y_%m_%d_%H_%M_%S").to_string();
    let ts_name = format!("{stamp}.{:09}", now.subsec_nanosecond().unsigned_abs());
    let ts_dir = dir.join(&ts_name);
    fs::create_dir(&ts_dir).map_err(|e| io("create", &ts_dir, e))?;
    for (p, (bytes, m)) in payload {
        let file = ts_dir.join(p);
        if let Some(parent) = file.parent() {
            fs::create_dir_all(parent).map_err(|e| io("create", parent, e))?;
        }
        fs::write(&file, bytes).map_err(|e| io("write", &file, e))?;
        fs::set_permissions(&file, fs::Permissions::from_mode(*m)).map_err(|e| io("chmod", &file, e))?;
    }
    let tmp = dir.join("..data_tmp");
    let _ = fs::remove_file(&tmp);
    std::os::unix::fs::symlink(&ts_name, &tmp).map_err(|e| io("symlink", &tmp, e))?;
    fs::rename(&tmp, &data_link).map_err(|e| io("rename", &data_link, e))?;
    // One symlink per top-level entry, through ..data.
    let top: std::collections::BTreeSet<String> =
        payload.keys().filter_map(|p| p.split('/').next().map(str::to_string)).collect();
    for t in &top {
        let link = dir.join(t);
        if fs::read_link(&link).is_err() {
            std::os::unix::fs::symlink(Path::new("..data").join(t), &link).map_err(|e| io("symlink", &link, e))?;
        }
    }
    // Entries gone from the payload, and the old version.
    for entry in fs::read_dir(dir).map_err(|e| io("read", dir, e))?.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if !name.starts_with("..") && !top.contains(&name) {
            let _ = fs::remove_file(entry.path());
        }
    }
    if let Some(old) = old {
        let _ = fs::remove_dir_all(dir.join(old));
    }
    Ok(())
}

fn same_payload(current: &Path, payload: &Payload) -> bool {
    payload.iter().all(|(p, (bytes, m))| {
        let f = current.join(p);
        fs::read(&f).is_ok_and(|b| &b == bytes)
            && fs::metadata(&f).is_ok_and(|md| md.permissions().mode() & 0o777 == *m)
    }) && count_files(current) == payload.len()
}

fn count_files(dir: &Path) -> usize {
    fs::read_dir(dir)
        .map(|rd| rd.flatten().map(|e| if e.path().is_dir() { count_files(&e.path()) } else { 1 }).sum())
        .unwrap_or(usize::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn payload(pairs: &[(&str, &str, u32)]) -> Payload {
        pairs.iter().map(|(k, v, m)| (k.to_string(), (v.as_bytes().to_vec(), *m))).collect()
    }

    #[test]
    fn atomic_writes_swap_data_and_keep_key_links() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("cfg");
        write_atomic(&dir, &payload(&[("a", "1", 0o644), ("sub/b", "2", 0o600)])).unwrap();
        assert_eq!(fs::read_to_string(dir.join("a")).unwrap(), "1");
        assert_eq!(fs::read_to_string(dir.join("sub/b")).unwrap(), "2");
        assert_eq!(fs::read_link(dir.join("a")).unwrap(), Path::new("..data/a"));
        let first = fs::read_link(dir.join("..data")).unwrap();
        assert!(first.to_string_lossy().starts_with("..20"), "{first:?}");
        assert_eq!(fs::metadata(dir.join("sub/b")).unwrap().permissions().mode() & 0o777, 0o600);
        // The same payload changes nothing; a new one swaps ..data and drops removed keys.
        write_atomic(&dir, &payload(&[("a", "1", 0o644), ("sub/b", "2", 0o600)])).unwrap();
        assert_eq!(fs::read_link(dir.join("..data")).unwrap(), first);
        write_atomic(&dir, &payload(&[("a", "changed", 0o644)])).unwrap();
        assert_eq!(fs::read_to_string(dir.join("a")).unwrap(), "changed");
        assert!(!dir.join("sub").exists());
        assert!(!dir.join(&first).exists(), "the old version is removed");
        assert!(!dir.join("..data_tmp").exists());
        assert!(write_atomic(&dir, &payload(&[("../x", "", 0o644)])).is_err());
    }

    #[test]
    fn memory_empty_dirs_live_in_the_memory_directory() {
        let tmp = tempfile::tempdir().unwrap();
        let (pod_dir, memory_dir) = (tmp.path().join("pod"), tmp.path().join("shm/uid"));
        let (no_maps, no_secrets, no_tokens) = (|_: &str| None, |_: &str| None, |_: &str, _: i64| None);
        let claims = |c: &str| -> Result<PathBuf, String> {
            if c == "data" {
                Ok(tmp.path().join("pv"))
            } else {
                Err(format!("persistentvolumeclaim \"{c}\" not found"))
            }
        };
        let s = Sources {
            config_maps: &no_maps,
            secrets: &no_secrets,
            tokens: &no_tokens,
            claims: &claims,
            pod_ips: &[],
            host_ips: &[],
            node_name: "n",
            allocatable_cpu: Quantity::from_units(1),
            allocatable_memory: Quantity::from_units(1),
            memory_dir: &memory_dir,
        };
        let volume = |medium: Option<&str>| Volume {
            name: "cache".into(),
            empty_dir: Some(k8s_openapi::api::core::v1::EmptyDirVolumeSource {
                medium: medium.map(str::to_string),
                ..Default::default()
            }),
            ..Default::default()
        };
        let pod = Pod::default();
        let ready = setup(&pod, &pod_dir, &volume(Some("Memory")), &s).unwrap();
        assert_eq!(ready, location(&pod_dir, &volume(Some("Memory"))));
        assert_eq!(fs::read_link(&ready.host_path).unwrap(), memory_dir.join("cache"));
        fs::write(ready.host_path.join("f"), "x").unwrap();
        assert_eq!(fs::read_to_string(memory_dir.join("cache/f")).unwrap(), "x");
        // Set up again (every sync does): the same link, the contents kept.
        assert_eq!(setup(&pod, &pod_dir, &volume(Some("Memory")), &s).unwrap(), ready);
        assert!(memory_dir.join("cache/f").exists());
        // The default medium is a plain directory in the pod's.
        let disk = setup(&pod, &tmp.path().join("pod2"), &volume(None), &s).unwrap();
        assert!(fs::symlink_metadata(&disk.host_path).unwrap().is_dir());

        // A claim: a link to its PersistentVolume's directory, which must exist.
        let claim = |name: &str, read_only: bool| Volume {
            name: "state".into(),
            persistent_volume_claim: Some(k8s_openapi::api::core::v1::PersistentVolumeClaimVolumeSource {
                claim_name: name.into(),
                read_only: Some(read_only),
            }),
            ..Default::default()
        };
        let e = setup(&pod, &pod_dir, &claim("data", false), &s).unwrap_err();
        assert!(e.0.contains("does not exist"), "{e}");
        fs::create_dir_all(tmp.path().join("pv")).unwrap();
        let ready = setup(&pod, &pod_dir, &claim("data", true), &s).unwrap();
        assert!(ready.read_only);
        assert_eq!(ready, location(&pod_dir, &claim("data", true)));
        assert_eq!(fs::read_link(&ready.host_path).unwrap(), tmp.path().join("pv"));
        assert_eq!(setup(&pod, &pod_dir, &claim("data", true), &s).unwrap(), ready, "set up again");
        let e = setup(&pod, &pod_dir, &claim("other", false), &s).unwrap_err();
        assert!(
            e.0.contains("MountVolume.SetUp failed for volume \"state\" : persistentvolumeclaim \"other\" not found"),
            "{e}"
        );
    }

    #[test]
    fn host_path_types() {
        let tmp = tempfile::tempdir().unwrap();
        let d = tmp.path().join("d");
        let f = tmp.path().join("f");
        let s = |p: &Path| p.to_str().unwrap().to_string();
        assert!(host_path(&s(&d), "Directory").is_err());
        host_path(&s(&d), "DirectoryOrCreate").unwrap();
        assert_eq!(fs::metadata(&d).unwrap().permissions().mode() & 0o777, 0o755);
        host_path(&s(&d), "Directory").unwrap();
        assert_eq!(
            host_path(&s(&d), "File").unwrap_err(),
            format!("hostPath type check failed: {} is not a file", s(&d))
        );
        host_path(&s(&f), "FileOrCreate").unwrap();
        host_path(&s(&f), "File").unwrap();
        assert!(host_path(&s(&f), "DirectoryOrCreate").is_err());
        assert!(host_path(&s(&f), "Socket").is_err());
        assert!(host_path("/nonexistent/x", "").is_ok(), "no type: no check");
        assert!(host_path(&s(&f), "Whatever").is_err());
    }

    #[test]
    fn relative_paths_only() {
        assert!(check_relative("a/b").is_ok());
        assert!(check_relative("/a").is_err());
        assert!(check_relative("a/../../b").is_err());
    }
}
