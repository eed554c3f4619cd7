//! Static pods: `wasmlet node --pod-manifest-path DIR` runs the Pods of the manifest files in
//! DIR and follows the directory, as the kubelet's file source does. A pod's UID is a hash of
//! its file, its document and the node, so an edited manifest is a new pod: the old one is
//! terminated gracefully and the new one started. A removed file terminates its pods.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Result;
use k8s_openapi::api::core::v1::Pod;

use crate::events::{Event, Kind, Recorder};
use tokio::sync::mpsc;

use crate::pods::{PodManager, PodUpdate, Source};
use crate::worker::Node;

/// Logs events through `tracing` (a node has no terminal to print to).
pub struct TracingRecorder;

impl Recorder for TracingRecorder {
    fn record(&self, e: Event) {
        let object = match (e.is_about_node(), e.field_path.is_empty()) {
            (true, _) => "the node".to_string(),
            (false, true) => e.pod.clone(),
            (false, false) => format!("{} {}", e.pod, e.field_path),
        };
        match e.kind {
            Kind::Normal => {
                tracing::info!(namespace = %e.namespace, object = %object, reason = %e.reason, "{}", e.message)
            }
            Kind::Warning => {
                tracing::warn!(namespace = %e.namespace, object = %object, reason = %e.reason, "{}", e.message)
            }
        }
    }
}

fn hash(parts: &[&[u8]]) -> u64 {
    // FNV-1a: stable across builds and restarts, so a pod keeps its UID.
    let mut h = 0xcbf2_9ce4_8422_2325u64;
    for p in parts {
        for b in p.iter().chain([0u8].iter()) {
            h = (h ^ u64::from(*b)).wrapping_mul(0x100_0000_01b3);
        }
    }
    h
}

/// The Pods of the manifest files in `dir`, by UID; problems are returned by file.
pub fn read_dir(dir: &Path, node_name: &str) -> (BTreeMap<String, Pod>, Vec<(PathBuf, String)>) {
    let mut pods = BTreeMap::new();
    let mut problems = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        problems.push((dir.to_path_buf(), "cannot read the directory".into()));
        return (pods, problems);
    };
    let mut files: Vec<PathBuf> = entries
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            let name = p.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
            !name.starts_with('.') && (name.ends_with(".yaml") || name.ends_with(".yml") || name.ends_with(".json"))
        })
        .collect();
    files.sort();
    for file in files {
        let Ok(text) = std::fs::read_to_string(&file) else { continue };
        for (n, value) in crate::run::documents(&text) {
            let value = match value {
                Ok(v) if v.get("kind").and_then(|k| k.as_str()) == Some("Pod") => v,
                Ok(_) => {
                    problems.push((file.clone(), format!("document {n}: static pod files hold Pods only")));
                    continue;
                }
                Err(e) => {
                    problems.push((file.clone(), format!("document {n}: {e}")));
                    continue;
                }
            };
            let mut pod = match crate::run::pod_from(&value) {
                Ok(p) => p,
                Err(e) => {
                    problems.push((file.clone(), format!("document {n}: {e}")));
                    continue;
                }
            };
            let h = hash(&[node_name.as_bytes(), file.to_string_lossy().as_bytes(), value.to_string().as_bytes()]);
            let uid = format!("{:016x}{:016x}", h, hash(&[&h.to_le_bytes()]));
            let uid = format!("{}-{}-{}-{}-{}", &uid[..8], &uid[8..12], &uid[12..16], &uid[16..20], &uid[20..]);
            let m = &mut pod.metadata;
            // The kubelet suffixes static pods with the node's name.
            m.name = Some(format!("{}-{node_name}", m.name.clone().unwrap_or_default()));
            m.namespace.get_or_insert_with(|| "default".into());
            m.uid = Some(uid.clone());
            let notes = m.annotations.get_or_insert_with(Default::default);
            notes.insert("kubernetes.io/config.source".into(), Source::File.annotation().into());
            notes.insert(crate::node::mirror::HASH.into(), uid.clone());
            if let Some(spec) = pod.spec.as_mut() {
                spec.node_name = Some(node_name.to_string());
            }
            pods.insert(uid, pod);
        }
    }
    (pods, problems)
}

/// Follows the manifest directory: reads it every 500 ms and tells the pod manager the pods
/// it holds whenever they change; a refused manifest is logged once per problem.
pub async fn follow(dir: PathBuf, node_name: String, tx: mpsc::UnboundedSender<PodUpdate>) {
    let mut reported: HashMap<(PathBuf, String), ()> = HashMap::new();
    let mut last: Option<Vec<String>> = None;
    tracing::info!(dir = %dir.display(), "running static pods");
    loop {
        let (desired, problems) = read_dir(&dir, &node_name);
        for (file, problem) in problems {
            // Once per problem, not at every look.
            if reported.insert((file.clone(), problem.clone()), ()).is_none() {
                tracing::error!(file = %file.display(), "static pod manifest refused: {problem}");
            }
        }
        let uids: Vec<String> = desired.keys().cloned().collect();
        if last.as_ref() != Some(&uids) {
            last = Some(uids);
            if tx.send(PodUpdate::Set(Source::File, desired.into_values().collect())).is_err() {
                return;
            }
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Runs the pod manager for `node` on the updates of its sources until `shutdown`: starts,
/// updates and stops pod workers, and logs each pod's status when it changes. At shutdown the
/// pods from files are deleted gracefully; the API's are left to the next start to adopt (a
/// kubelet that stops does not delete its pods). Returns the manager: dropping it ends the
/// workers left, so the caller stops the runtime first.
pub async fn manage(
    node: Arc<Node>,
    mut manager: PodManager,
    mut rx: mpsc::UnboundedReceiver<PodUpdate>,
    shutdown: impl std::future::Future<Output = ()>,
) -> PodManager {
    let events = node.watch_runtime_events();
    let mut last_status: HashMap<String, (String, String, i32)> = HashMap::new();
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    let mut housekeeping = tokio::time::interval(Duration::from_secs(10));
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            _ = &mut shutdown => break,
            u = rx.recv() => match u {
                Some(u) => manager.apply(u),
                None => break,
            },
            _ = tick.tick() => {}
            _ = housekeeping.tick(), if manager.sources_ready() => remove_orphans(&node, &manager).await,
        }
        manager.reap();
        for (uid, m) in manager.pods() {
            let pod = m.handle.status.borrow().clone();
            let cols = crate::run::columns(&pod);
            if last_status.get(uid) != Some(&cols) {
                tracing::info!(pod = %format!("{}/{}", m.namespace, m.name), ready = %cols.0, status = %cols.1, restarts = cols.2, "pod status");
                last_status.insert(uid.clone(), cols);
            }
        }
        last_status.retain(|uid, _| manager.pods().contains_key(uid));
    }
    let files: Vec<String> =
        manager.pods().iter().filter(|(_, m)| m.source == Source::File).map(|(u, _)| u.clone()).collect();
    tracing::info!(pods = files.len(), "shutting down: deleting the static pods gracefully");
    manager.apply(PodUpdate::Set(Source::File, Vec::new()));
    for uid in files {
        if let Some(m) = manager.pods().get(&uid) {
            while !m.handle.task.is_finished() {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
    events.abort();
    manager
}

/// Removes the sandboxes (and their containers) of pods no source has: pods deleted while
/// wasmlet was down, as the kubelet's HandlePodCleanups does.
async fn remove_orphans(node: &Node, manager: &PodManager) {
    let Ok(list) = node.cri.sandboxes(None).await else { return };
    for s in list {
        let Some(uid) = s.labels.get(crate::cri::POD_UID) else { continue };
        if manager.knows(uid) {
            continue;
        }
        let name = s.metadata.as_ref().map(|m| format!("{}/{}", m.namespace, m.name)).unwrap_or_default();
        tracing::info!(pod = %name, uid = %uid, sandbox = %s.id, "removing the sandbox of a pod no longer on this node");
        let _ = node.cri.stop_sandbox(&s.id).await;
        let _ = node.cri.remove_sandbox(&s.id).await;
        let _ = std::fs::remove_dir_all(node.pod_dir(uid));
    }
}

/// Runs the static pods of `dir` until `shutdown`, then deletes them gracefully.
pub async fn run(node: Arc<Node>, dir: PathBuf, shutdown: impl std::future::Future<Output = ()>) -> Result<()> {
    let (tx, rx) = mpsc::unbounded_channel();
    let follower = tokio::spawn(follow(dir, node.node_name.clone(), tx));
    manage(node.clone(), PodManager::new(node), rx, shutdown).await;
    follower.abort();
    Ok(())
}
