//! Mirror pods: the API's read-only copy of each static pod, so that `kubectl get pods` shows
//! it (as the kubelet's mirror client makes them): the static pod's spec and labels, the
//! `kubernetes.io/config.mirror` annotation holding its hash, owned by the Node; its status
//! follows the static pod's; it is deleted when the static pod goes.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use kube::Api;
use kube::api::{Patch, PatchParams, PostParams};
use tokio::sync::watch;

use super::api::for_good;
use super::{Complaint, Retry, api_code};
use crate::pods::{Observer, Source};

/// The annotation of a mirror pod: the hash of its static pod.
pub const MIRROR: &str = "kubernetes.io/config.mirror";
/// The annotation of a static pod: its hash.
pub const HASH: &str = "kubernetes.io/config.hash";

/// Makes and keeps the mirror pods of the static pods.
pub struct MirrorPods {
    pub client: kube::Client,
    /// The mirror pods bound to this node, as the pod watch shows them (a node may read only
    /// pods bound to it, and finds its mirrors there), by namespace/name.
    pub mirrors: super::api::ApiPods,
    pub node_name: String,
    /// The Node's UID (the owner of mirror pods), once registered.
    pub node_uid: Arc<Mutex<String>>,
}

/// The mirror of a static pod: its metadata (the mirror annotation added, the UID and the
/// resource version dropped) and spec, owned by the Node.
pub fn mirror_of(pod: &Pod, node_name: &str, node_uid: &str) -> Pod {
    let mut m = Pod { metadata: pod.metadata.clone(), spec: pod.spec.clone(), status: None };
    m.metadata.uid = None;
    m.metadata.resource_version = None;
    let notes = m.metadata.annotations.get_or_insert_with(Default::default);
    let hash = notes.get(HASH).cloned().unwrap_or_default();
    notes.insert(MIRROR.into(), hash);
    m.metadata.owner_references = Some(vec![OwnerReference {
        api_version: "v1".into(),
        kind: "Node".into(),
        name: node_name.into(),
        uid: node_uid.into(),
        controller: Some(true),
        ..Default::default()
    }]);
    m
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Observer for MirrorPods {
    fn started(&self, source: Source, pod: &Pod, status: watch::Receiver<Pod>) {
        if source != Source::File {
            return;
        }
        let (client, node_name, node_uid, pod) =
            (self.client.clone(), self.node_name.clone(), self.node_uid.clone(), pod.clone());
        let mirrors = self.mirrors.clone();
        tokio::spawn(async move {
            let uid = lock(&node_uid).clone();
            keep_mirror(client, mirrors, node_name, uid, pod, status).await;
        });
    }
}

/// How many looks (2 s apart) may miss the mirror before it is made again.
const UNSEEN_LOOKS: u32 = 3;

/// Creates the mirror (replacing one of another hash), posts the static pod's status to it
/// as it changes, and deletes it when the static pod's worker ends.
async fn keep_mirror(
    client: kube::Client,
    mirrors: super::api::ApiPods,
    node_name: String,
    node_uid: String,
    pod: Pod,
    mut rx: watch::Receiver<Pod>,
) {
    let ns = pod.metadata.namespace.clone().unwrap_or_else(|| "default".into());
    let name = pod.metadata.name.clone().unwrap_or_default();
    let api: Api<Pod> = Api::namespaced(client, &ns);
    let want = mirror_of(&pod, &node_name, &node_uid);
    let hash = want.metadata.annotations.as_ref().and_then(|a| a.get(MIRROR)).cloned().unwrap_or_default();
    let mut complaint = Complaint::default();
    let what = format!("mirror pod {ns}/{name}");
    let key = format!("{ns}/{name}");
    let mirror_uid = 'mirror: loop {
        let Some(mirror_uid) = ensure_mirror(&api, &mirrors, &key, &want, &hash, &what, &mut complaint, &mut rx).await
        else {
            return;
        };
        complaint.succeeded(&what);
        let mut sent = None;
        // Looks at which the API's view did not show the mirror: right after it is made the
        // watch may not have it yet; past a few, it is gone (its deletion may have been seen
        // before it was).
        let mut unseen = 0;
        let mut look = tokio::time::interval(Duration::from_secs(2));
        loop {
            let ended = tokio::select! {
                r = rx.changed() => r.is_err(),
                _ = look.tick() => {
                    // Deleted by someone else: made again. A graceful deletion of a mirror is
                    // finished at once by `ensure_mirror` (nothing of it runs), as the kubelet
                    // does.
                    let current = lock(&mirrors).get(&key).filter(|p| p.metadata.uid.as_deref() == Some(mirror_uid.as_str())).cloned();
                    match current {
                        Some(m) if m.metadata.deletion_timestamp.is_some() => {
                            tracing::info!(pod = %key, "mirror pod deleted: making it again");
                            continue 'mirror;
                        }
                        Some(_) => unseen = 0,
                        None => {
                            unseen += 1;
                            if unseen >= UNSEEN_LOOKS {
                                tracing::info!(pod = %key, "mirror pod deleted: making it again");
                                continue 'mirror;
                            }
                        }
                    }
                    false
                }
            };
            let latest = rx.borrow_and_update().clone();
            if !ended && let Some(status) = latest.status.filter(|s| sent.as_ref() != Some(s)) {
                let patch = serde_json::json!({ "metadata": { "uid": mirror_uid }, "status": status });
                match api.patch_status(&name, &PatchParams::default(), &Patch::Merge(&patch)).await {
                    Ok(_) => sent = Some(status),
                    Err(e) => complaint.failed(&format!("update the status of {what}"), &e),
                }
            }
            if ended {
                break 'mirror mirror_uid;
            }
        }
    };
    // The static pod is gone: so is its mirror.
    let dp = for_good(&mirror_uid);
    match api.delete(&name, &dp).await {
        Ok(_) => tracing::info!(pod = %format!("{ns}/{name}"), "mirror pod deleted"),
        Err(e) if matches!(api_code(&e), Some(404) | Some(409)) => {}
        Err(e) => complaint.failed(&format!("delete {what}"), &e),
    }
}

/// The mirror's UID once it exists with the static pod's hash (one of another hash is
/// replaced); None when the static pod ended first.
#[allow(clippy::too_many_arguments)]
async fn ensure_mirror(
    api: &Api<Pod>,
    mirrors: &super::api::ApiPods,
    key: &str,
    want: &Pod,
    hash: &str,
    what: &str,
    complaint: &mut Complaint,
    rx: &mut watch::Receiver<Pod>,
) -> Option<String> {
    let name = want.metadata.name.as_deref().unwrap_or_default();
    let (ns, _) = key.split_once('/').unwrap_or_default();
    let mut retry = Retry::default();
    loop {
        let known = lock(mirrors).get(key).cloned();
        match known {
            Some(old) => {
                let old_hash = old.metadata.annotations.as_ref().and_then(|a| a.get(MIRROR)).cloned();
                // A terminating mirror is finished and made again, whatever its hash.
                if old_hash.as_deref() == Some(hash) && old.metadata.deletion_timestamp.is_none() {
                    return Some(old.metadata.uid.unwrap_or_default());
                }
                // A mirror of an older version of the static pod (or not a mirror): replaced.
                // Once it is gone it leaves the view at once (not when the watch says so) and
                // the new one is made without waiting.
                let dp = for_good(old.metadata.uid.as_deref().unwrap_or_default());
                match api.delete(name, &dp).await {
                    Err(e) if api_code(&e) == Some(409) => {}
                    Err(e) if api_code(&e) != Some(404) => complaint.failed(&format!("replace {what}"), &e),
                    _ => {
                        lock(mirrors).remove(key);
                        continue;
                    }
                }
            }
            None => match api.create(&PostParams::default(), want).await {
                Ok(created) => {
                    tracing::info!(pod = %format!("{ns}/{name}"), "mirror pod created");
                    return Some(created.metadata.uid.unwrap_or_default());
                }
                // There already: the watch shows it soon.
                Err(e) if api_code(&e) == Some(409) => {}
                Err(e) => complaint.failed(&format!("create {what}"), &e),
            },
        }
        if rx.has_changed().is_err() {
            return None;
        }
        tokio::time::sleep(retry.delay()).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_mirror_is_owned_by_the_node_and_carries_the_hash() {
        let mut p = Pod::default();
        p.metadata.name = Some("web-edge".into());
        p.metadata.uid = Some("static-uid".into());
        p.metadata.annotations = Some([(HASH.to_string(), "h1".to_string())].into());
        let m = mirror_of(&p, "edge", "node-uid");
        assert_eq!(m.metadata.uid, None);
        assert_eq!(m.metadata.annotations.unwrap()[MIRROR], "h1");
        let owner = &m.metadata.owner_references.unwrap()[0];
        assert_eq!((owner.kind.as_str(), owner.name.as_str(), owner.uid.as_str()), ("Node", "edge", "node-uid"));
        assert_eq!(owner.controller, Some(true));
    }
}
