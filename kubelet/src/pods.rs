//! The pod manager: pods from every source (manifest files, a static pod directory, the API
//! server) merged by UID into one set, as the kubelet's `pkg/kubelet/config` does, each pod run
//! by one pod worker. A source says what it has ([`PodUpdate`]); the manager works out which
//! workers to start, update or stop, and tracks each pod's [`Lifecycle`].

use std::collections::BTreeMap;
use std::sync::Arc;

use k8s_openapi::api::core::v1::Pod;
use tokio::sync::watch;

use crate::admission::Refusal;
use crate::model::{finished, full_name, uid};
use crate::worker::{self, Node, PodHandle, Update};

/// Where a pod came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Source {
    /// A manifest file of `wasmlet run`, or a static pod directory.
    File,
    /// The API server: pods bound to this node.
    Api,
}

impl Source {
    /// The value of the `kubernetes.io/config.source` annotation.
    pub fn annotation(self) -> &'static str {
        match self {
            Source::File => "file",
            Source::Api => "api",
        }
    }
}

/// What a source tells the manager.
#[derive(Debug)]
pub enum PodUpdate {
    /// Every pod the source has now (a directory read, an API relist): pods of this source
    /// missing from the list are deleted gracefully.
    Set(Source, Vec<Pod>),
    /// A pod was added or changed: a new spec, or a deletion timestamp.
    Upsert(Source, Box<Pod>),
    /// A pod is gone from its source without a graceful deletion (force-deleted): stopped at
    /// once.
    Remove(Source, String),
    /// The eviction manager ends a pod as Failed (it stays until its source deletes it).
    Evict(crate::eviction::Eviction),
    /// Not an update: asks for the pods running here, not finished (the eviction manager's
    /// candidates).
    Running(tokio::sync::oneshot::Sender<Vec<Pod>>),
}

/// A pod's life as the manager sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lifecycle {
    /// The worker takes the pod to its spec.
    Syncing,
    /// The pod is being deleted: the worker runs preStop, stops the containers and the
    /// sandbox within the grace period, then cleans up.
    Terminating { grace: Option<i64> },
    /// The worker is done and the pod's resources are gone.
    Terminated,
}

impl Lifecycle {
    /// The move a deletion makes; `None` when it changes nothing (already terminating with a
    /// grace no longer than this one: the grace period never increases).
    pub fn delete(self, grace: Option<i64>) -> Option<Lifecycle> {
        match self {
            Lifecycle::Syncing => Some(Lifecycle::Terminating { grace }),
            Lifecycle::Terminating { grace: Some(old) } if grace.is_some_and(|g| g < old) => {
                Some(Lifecycle::Terminating { grace })
            }
            Lifecycle::Terminating { grace: None } if grace.is_some() => Some(Lifecycle::Terminating { grace }),
            Lifecycle::Terminating { .. } | Lifecycle::Terminated => None,
        }
    }

    /// The move when the worker ends.
    pub fn finish(self) -> Lifecycle {
        Lifecycle::Terminated
    }
}

/// Told of each pod worker the manager starts (the API status manager, mirror pods).
pub trait Observer: Send + Sync {
    /// A worker started for `pod`; `status` carries the pod with its status as it changes and
    /// closes when the worker ends.
    fn started(&self, source: Source, pod: &Pod, status: watch::Receiver<Pod>);
    /// Admission refused the pod: it is not run.
    fn rejected(&self, _source: Source, _pod: &Pod, _why: &Refusal) {}
    /// A pod the manager does not run (finished before it was seen, or refused) changed: a
    /// deletion of it needs no worker to finish.
    fn not_running(&self, _source: Source, _pod: &Pod) {}
}

/// Decides whether a new pod may run here (kubelet admission).
pub trait Admitter: Send + Sync {
    /// `others`: the pods running here, not finished.
    fn admit(&self, pod: &Pod, others: &[&Pod]) -> Result<(), Refusal>;
}

/// A pod under the manager.
pub struct Managed {
    pub source: Source,
    pub name: String,
    pub namespace: String,
    pub lifecycle: Lifecycle,
    pub handle: PodHandle,
}

/// Every pod on the node, by UID.
pub struct PodManager {
    node: Arc<Node>,
    observers: Vec<Arc<dyn Observer>>,
    admitter: Option<Arc<dyn Admitter>>,
    pods: BTreeMap<String, Managed>,
    /// Pods admission refused, by UID (they are not looked at again).
    rejected: std::collections::HashSet<String>,
    /// Pods that had finished before they were seen (not run, but still wanted: their dead
    /// containers keep their logs until the pod is deleted).
    finished: std::collections::HashSet<String>,
    /// The sources to hear from before pods not among theirs may be cleaned up, and those
    /// heard from.
    expected: std::collections::HashSet<Source>,
    heard: std::collections::HashSet<Source>,
}

impl PodManager {
    pub fn new(node: Arc<Node>) -> PodManager {
        PodManager {
            node,
            observers: Vec::new(),
            admitter: None,
            pods: BTreeMap::new(),
            rejected: Default::default(),
            finished: Default::default(),
            expected: Default::default(),
            heard: Default::default(),
        }
    }

    /// Adds a source whose first full list must come before any cleanup of unknown pods.
    pub fn expect(&mut self, s: Source) {
        self.expected.insert(s);
    }

    /// Whether every expected source has told its whole set once (as the kubelet's
    /// sourcesReady): only then is a sandbox of a pod nobody mentioned an orphan.
    pub fn sources_ready(&self) -> bool {
        !self.expected.is_empty() && self.expected.is_subset(&self.heard)
    }

    /// Whether a pod UID is one the node knows: run, refused, or finished but not deleted.
    pub fn knows(&self, uid: &str) -> bool {
        self.pods.contains_key(uid) || self.rejected.contains(uid) || self.finished.contains(uid)
    }

    /// Admits new pods with `a` from now on.
    pub fn admit_with(&mut self, a: Arc<dyn Admitter>) {
        self.admitter = Some(a);
    }

    /// The pods running here and not finished, as their workers last showed them.
    fn running(&self) -> Vec<Pod> {
        self.pods.values().map(|m| m.handle.status.borrow().clone()).filter(|p| !finished(p)).collect()
    }

    /// Adds an observer of the workers started from now on.
    pub fn observe(&mut self, o: Arc<dyn Observer>) {
        self.observers.push(o);
    }

    /// The pods, by UID.
    pub fn pods(&self) -> &BTreeMap<String, Managed> {
        &self.pods
    }

    /// Applies what a source said.
    pub fn apply(&mut self, update: PodUpdate) {
        match update {
            PodUpdate::Set(source, pods) => {
                let wanted: std::collections::HashSet<String> = pods.iter().map(uid).collect();
                let gone: Vec<String> = self
                    .pods
                    .iter()
                    .filter(|(u, m)| m.source == source && !wanted.contains(*u))
                    .map(|(u, _)| u.clone())
                    .collect();
                for u in gone {
                    self.delete(&u, None);
                }
                self.rejected.retain(|u| wanted.contains(u));
                self.finished.retain(|u| wanted.contains(u));
                self.heard.insert(source);
                for p in pods {
                    self.upsert(source, p);
                }
            }
            PodUpdate::Upsert(source, pod) => self.upsert(source, *pod),
            PodUpdate::Remove(_, uid) => {
                self.finished.remove(&uid);
                self.rejected.remove(&uid);
                self.delete(&uid, Some(0));
            }
            PodUpdate::Evict(e) => {
                if let Some(m) = self.pods.get(&e.uid).filter(|m| m.lifecycle == Lifecycle::Syncing) {
                    tracing::info!(pod = %format!("{}/{}", m.namespace, m.name), uid = %e.uid, message = %e.message, "evicting the pod");
                    let _ = m.handle.updates.send(Update::Evict(e));
                }
            }
            PodUpdate::Running(reply) => {
                let _ = reply.send(self.running());
            }
        }
    }

    fn upsert(&mut self, source: Source, pod: Pod) {
        let u = uid(&pod);
        if u.is_empty() {
            tracing::warn!(pod = %full_name(&pod), "pod without a UID ignored");
            return;
        }
        let deletion = pod.metadata.deletion_timestamp.is_some();
        let grace = pod.metadata.deletion_grace_period_seconds;
        match self.pods.get_mut(&u) {
            Some(m) => {
                if deletion {
                    self.delete(&u, grace);
                } else if m.lifecycle == Lifecycle::Syncing {
                    let _ = m.handle.updates.send(Update::Spec(Box::new(pod)));
                }
            }
            None => {
                // A pod finished before we saw it (a restart of wasmlet, an API relist), or
                // refused, is not started again.
                if finished(&pod) || self.rejected.contains(&u) {
                    if !self.rejected.contains(&u) {
                        self.finished.insert(u.clone());
                    }
                    for o in &self.observers {
                        o.not_running(source, &pod);
                    }
                    return;
                }
                if let Some(a) = &self.admitter {
                    let running = self.running();
                    let others: Vec<&Pod> = running.iter().collect();
                    if let Err(why) = a.admit(&pod, &others) {
                        tracing::warn!(pod = %full_name(&pod), reason = %why.reason, "pod rejected: {}", why.message);
                        self.rejected.insert(u);
                        for o in &self.observers {
                            o.rejected(source, &pod, &why);
                        }
                        return;
                    }
                }
                tracing::info!(pod = %full_name(&pod), uid = %u, source = source.annotation(), "pod added");
                let handle = worker::spawn(self.node.clone(), pod.clone());
                for o in &self.observers {
                    o.started(source, &pod, handle.status.clone());
                }
                let m = Managed {
                    source,
                    name: pod.metadata.name.clone().unwrap_or_default(),
                    namespace: pod.metadata.namespace.clone().unwrap_or_else(|| "default".into()),
                    lifecycle: Lifecycle::Syncing,
                    handle,
                };
                self.pods.insert(u.clone(), m);
                if deletion {
                    self.delete(&u, grace);
                }
            }
        }
    }

    fn delete(&mut self, uid: &str, grace: Option<i64>) {
        let Some(m) = self.pods.get_mut(uid) else { return };
        if let Some(next) = m.lifecycle.delete(grace) {
            tracing::info!(pod = %format!("{}/{}", m.namespace, m.name), uid, ?grace, "pod deleted: terminating it");
            m.lifecycle = next;
            let _ = m.handle.updates.send(Update::Delete { grace });
        }
    }

    /// Marks the pods whose workers ended as terminated and forgets them.
    pub fn reap(&mut self) {
        let done: Vec<String> =
            self.pods.iter().filter(|(_, m)| m.handle.task.is_finished()).map(|(u, _)| u.clone()).collect();
        for u in done {
            if let Some(mut m) = self.pods.remove(&u) {
                m.lifecycle = m.lifecycle.finish();
                // What it referred to (watches, tokens) is no longer needed for it.
                self.node.objects.forget(&u);
                tracing::info!(pod = %format!("{}/{}", m.namespace, m.name), uid = %u, "pod terminated");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deletion_moves_and_the_grace_never_grows() {
        let s = Lifecycle::Syncing;
        assert_eq!(s.delete(Some(30)), Some(Lifecycle::Terminating { grace: Some(30) }));
        let t = Lifecycle::Terminating { grace: Some(30) };
        assert_eq!(t.delete(Some(40)), None, "a longer grace is ignored");
        assert_eq!(t.delete(Some(30)), None);
        assert_eq!(t.delete(Some(0)), Some(Lifecycle::Terminating { grace: Some(0) }));
        assert_eq!(t.delete(None), None);
        let spec = Lifecycle::Terminating { grace: None };
        assert_eq!(spec.delete(Some(5)), Some(Lifecycle::Terminating { grace: Some(5) }));
        assert_eq!(Lifecycle::Terminated.delete(Some(0)), None);
        assert_eq!(t.finish(), Lifecycle::Terminated);
    }
}
