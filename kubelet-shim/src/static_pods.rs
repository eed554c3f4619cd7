//! Static pods: `wasmlet node --pod-manifest-path DIR` runs the Pods of the manifest files in
//! DIR and follows the directory, as the kubelet's file source does. A pod's UID is a hash of
//! its file, its document and the node, so an edited manifest is a new pod: the old one is
//! terminated gracefully and the new one started. A removed file terminates its pods.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Result;
use k8s_openapi::api::core::v1::Pod;

use crate::kubelet::events::{Event, Kind, Recorder};
use crate::kubelet::worker::{self, PodHandle, Update};
use crate::run::LocalNode;

/// Logs events through `tracing` (a node has no terminal to print to).
pub struct TracingRecorder;

impl Recorder for TracingRecorder {
    fn record(&self, e: Event) {
        let object = if e.field_path.is_empty() { e.pod.clone() } else { format!("{} {}", e.pod, e.field_path) };
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
            notes.insert("kubernetes.io/config.source".into(), "file".into());
            notes.insert("kubernetes.io/config.hash".into(), uid.clone());
            if let Some(spec) = pod.spec.as_mut() {
                spec.node_name = Some(node_name.to_string());
            }
            pods.insert(uid, pod);
        }
    }
    (pods, problems)
}

fn log_status(name: &str, pod: &Pod) {
    let (ready, status, restarts) = crate::run::columns(pod);
    tracing::info!(pod = %name, ready = %ready, status = %status, restarts, "pod status");
}

/// Runs the static pods of `dir` until `shutdown`, then deletes them gracefully.
pub async fn run(local: LocalNode, dir: PathBuf, shutdown: impl std::future::Future<Output = ()>) -> Result<()> {
    let node = local.node.clone();
    let events = node.watch_runtime_events();
    let mut workers: BTreeMap<String, (String, PodHandle)> = BTreeMap::new();
    let mut terminating: Vec<(String, PodHandle)> = Vec::new();
    let mut reported: HashMap<(PathBuf, String), ()> = HashMap::new();
    let mut last_status: HashMap<String, (String, String, i32)> = HashMap::new();
    tokio::pin!(shutdown);
    tracing::info!(dir = %dir.display(), "running static pods");
    loop {
        let (desired, problems) = read_dir(&dir, &node.node_name);
        for (file, problem) in problems {
            // Once per problem, not at every look.
            if reported.insert((file.clone(), problem.clone()), ()).is_none() {
                tracing::error!(file = %file.display(), "static pod manifest refused: {problem}");
            }
        }
        let gone: Vec<String> = workers.keys().filter(|uid| !desired.contains_key(*uid)).cloned().collect();
        for uid in gone {
            if let Some((name, h)) = workers.remove(&uid) {
                tracing::info!(pod = %name, uid = %uid, "static pod removed or changed: terminating it");
                let _ = h.updates.send(Update::Delete { grace: None });
                terminating.push((name, h));
            }
        }
        for (uid, pod) in desired {
            if workers.contains_key(&uid) {
                continue;
            }
            let name = pod.metadata.name.clone().unwrap_or_default();
            tracing::info!(pod = %name, uid = %uid, "static pod added");
            workers.insert(uid, (name, worker::spawn(node.clone(), pod)));
        }
        terminating.retain(|(name, h)| {
            let done = h.task.is_finished();
            if done {
                tracing::info!(pod = %name, "static pod terminated");
            }
            !done
        });
        for (name, h) in workers.values() {
            let pod = h.status.borrow().clone();
            let cols = crate::run::columns(&pod);
            if last_status.get(name) != Some(&cols) {
                log_status(name, &pod);
                last_status.insert(name.clone(), cols);
            }
        }
        tokio::select! {
            _ = &mut shutdown => break,
            _ = tokio::time::sleep(Duration::from_millis(500)) => {}
        }
    }
    tracing::info!(pods = workers.len(), "shutting down: deleting the static pods gracefully");
    for (_, h) in workers.values() {
        let _ = h.updates.send(Update::Delete { grace: None });
    }
    for (_, h) in workers.into_values().chain(terminating) {
        let _ = h.task.await;
    }
    events.abort();
    local.stop().await;
    Ok(())
}
