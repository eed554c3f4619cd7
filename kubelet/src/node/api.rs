//! Pods from the API server, and what goes back to it: a watch of the pods bound to this node
//! (`spec.nodeName`) feeding the pod manager, the status manager that posts each pod's status
//! through the status subresource and makes the final delete, and events.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use futures_util::StreamExt;
use k8s_openapi::api::core::v1::{Event as ApiEvent, EventSource, ObjectReference, Pod, PodStatus};
use k8s_openapi::api::node::v1::RuntimeClass;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::Api;
use kube::api::{DeleteParams, Patch, PatchParams, PostParams, Preconditions};
use kube::runtime::{WatchStreamExt, reflector, watcher};
use tokio::sync::{mpsc, watch};

use super::{Complaint, Facts, NodeConfig, Retry, api_code};
use crate::admission::{self, Refusal};
use crate::events::{self, Kind, Recorder};
use crate::model::{self, full_name, uid};
use crate::pods::{Admitter, Observer, PodUpdate, Source};
use crate::status::time;

/// The pods bound to this node as the API server last showed them, by UID.
pub type ApiPods = Arc<Mutex<HashMap<String, Pod>>>;

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// A mirror pod (the API's copy of a static pod) is not run again from the API.
pub fn is_mirror(pod: &Pod) -> bool {
    pod.metadata.annotations.as_ref().is_some_and(|a| a.contains_key(super::mirror::MIRROR))
}

/// Watches the pods with `spec.nodeName=NODE` and tells the pod manager: each relist as the
/// whole set, then every change. Reconnects with back-off for as long as it runs.
pub async fn watch_pods(
    client: kube::Client,
    node_name: String,
    pods: ApiPods,
    mirrors: ApiPods,
    tx: mpsc::UnboundedSender<PodUpdate>,
) {
    let api: Api<Pod> = Api::all(client);
    let config = watcher::Config::default().fields(&format!("spec.nodeName={node_name}"));
    let mut stream = std::pin::pin!(watcher(api, config));
    let mut listing: Vec<Pod> = Vec::new();
    let mut complaint = Complaint::default();
    let mut retry = Retry::default();
    while let Some(event) = stream.next().await {
        let event = match event {
            Ok(e) => {
                complaint.succeeded("watch the pods bound to this node");
                retry = Retry::default();
                e
            }
            Err(e) => {
                complaint.failed("watch the pods bound to this node", &e);
                tokio::time::sleep(retry.delay()).await;
                continue;
            }
        };
        let update = match event {
            watcher::Event::Init => {
                listing.clear();
                continue;
            }
            watcher::Event::InitApply(p) => {
                listing.push(p);
                continue;
            }
            watcher::Event::InitDone => {
                let (mirrored, all): (Vec<Pod>, Vec<Pod>) =
                    std::mem::take(&mut listing).into_iter().partition(is_mirror);
                {
                    let mut m = lock(&mirrors);
                    m.clear();
                    m.extend(mirrored.into_iter().map(|p| (full_name(&p), p)));
                }
                {
                    let mut known = lock(&pods);
                    known.clear();
                    known.extend(all.iter().map(|p| (uid(p), p.clone())));
                }
                PodUpdate::Set(Source::Api, all)
            }
            watcher::Event::Apply(p) if is_mirror(&p) => {
                lock(&mirrors).insert(full_name(&p), p);
                continue;
            }
            watcher::Event::Delete(p) if is_mirror(&p) => {
                // Only that mirror: one made since under the same name stays.
                let mut m = lock(&mirrors);
                let name = full_name(&p);
                if m.get(&name).is_some_and(|known| known.metadata.uid == p.metadata.uid) {
                    m.remove(&name);
                }
                continue;
            }
            watcher::Event::Apply(p) if !is_mirror(&p) => {
                lock(&pods).insert(uid(&p), p.clone());
                PodUpdate::Upsert(Source::Api, Box::new(p))
            }
            watcher::Event::Delete(p) if !is_mirror(&p) => {
                lock(&pods).remove(&uid(&p));
                PodUpdate::Remove(Source::Api, uid(&p))
            }
            _ => continue,
        };
        if tx.send(update).is_err() {
            return;
        }
    }
}

/// Admission on a node of a cluster: the node as registered, and the cluster's RuntimeClasses
/// (watched) to resolve a pod's runtimeClassName to its handler.
pub struct NodeAdmitter {
    pub info: admission::NodeInfo,
    pub classes: reflector::Store<RuntimeClass>,
    /// The eviction manager's pressure conditions (pods are refused under pressure).
    pub pressure: tokio::sync::watch::Receiver<crate::eviction::NodePressure>,
}

impl NodeAdmitter {
    /// The admitter of a node with these settings and facts; waits until the RuntimeClasses
    /// have been listed once (a pod must not be refused for a class not yet seen).
    pub async fn start(client: kube::Client, cfg: &NodeConfig, facts: &Facts) -> NodeAdmitter {
        let (reader, writer) = reflector::store();
        let api: Api<RuntimeClass> = Api::all(client);
        let stream = reflector(writer, watcher(api, watcher::Config::default())).default_backoff();
        tokio::spawn(stream.for_each(|_| std::future::ready(())));
        let _ = reader.wait_until_ready().await;
        let info = admission::NodeInfo {
            name: facts.name.clone(),
            labels: super::status::labels(cfg, facts),
            no_execute_taints: cfg
                .register_with_taints
                .iter()
                .filter(|t| t.effect == "NoExecute")
                .map(|t| (t.key.clone(), t.value.clone()))
                .collect(),
            allocatable_millicpu: i128::from(facts.cpus) * 1000,
            allocatable_memory: i128::from(super::status::allocatable_memory(cfg, facts)),
            max_pods: cfg.max_pods as usize,
        };
        NodeAdmitter { info, classes: reader, pressure: tokio::sync::watch::channel(Default::default()).1 }
    }
}

impl Admitter for NodeAdmitter {
    fn admit(&self, pod: &Pod, others: &[&Pod]) -> Result<(), Refusal> {
        crate::eviction::admit(pod, *self.pressure.borrow())?;
        let class = model::spec(pod).runtime_class_name.clone().filter(|c| !c.is_empty());
        let handler = match class {
            None => admission::Handler::Default,
            Some(class) => match self.classes.get(&reflector::ObjectRef::new(&class)) {
                Some(rc) => admission::Handler::Named { class, handler: rc.handler.clone() },
                None => admission::Handler::Unresolved { why: format!("RuntimeClass \"{class}\" not found"), class },
            },
        };
        admission::admit(pod, &self.info, others, &handler)
    }
}

/// The pod conditions the kubelet owns; others (readiness gates, DisruptionTarget) are kept
/// as the API has them.
const KUBELET_CONDITIONS: [&str; 5] =
    ["PodReadyToStartContainers", "Initialized", "Ready", "ContainersReady", "PodScheduled"];

/// The status to send: ours, with the conditions others own kept from the API's copy.
pub fn merged_status(ours: &PodStatus, api: Option<&Pod>) -> PodStatus {
    let mut s = ours.clone();
    let foreign = api
        .and_then(|p| p.status.as_ref())
        .and_then(|st| st.conditions.as_ref())
        .into_iter()
        .flatten()
        .filter(|c| !KUBELET_CONDITIONS.contains(&c.type_.as_str()))
        .filter(|c| !ours.conditions.iter().flatten().any(|o| o.type_ == c.type_))
        .cloned();
    let mut conditions = s.conditions.take().unwrap_or_default();
    conditions.extend(foreign);
    s.conditions = (!conditions.is_empty()).then_some(conditions);
    s
}

/// How often a pod's status is compared with the API's copy.
const RESYNC: Duration = Duration::from_secs(10);

/// Whether the API's copy of a pod shows another phase or other conditions than `ours`.
pub fn api_differs(ours: &PodStatus, api: &Pod) -> bool {
    let Some(theirs) = api.status.as_ref() else { return true };
    let conditions = |s: &PodStatus| -> Vec<(String, String)> {
        let mut c: Vec<(String, String)> = s
            .conditions
            .iter()
            .flatten()
            .filter(|c| KUBELET_CONDITIONS.contains(&c.type_.as_str()))
            .map(|c| (c.type_.clone(), c.status.clone()))
            .collect();
        c.sort();
        c
    };
    ours.phase != theirs.phase || conditions(ours) != conditions(theirs)
}

/// Posts the status of every API pod as its worker publishes it, and deletes the pod object
/// (grace 0, UID precondition) once a deleted pod's worker has finished, as the kubelet's
/// status manager does.
pub struct StatusManager {
    pub client: kube::Client,
    pub pods: ApiPods,
    /// Where the refusals' events go.
    pub events: Arc<dyn Recorder>,
}

impl Observer for StatusManager {
    fn started(&self, source: Source, pod: &Pod, status: watch::Receiver<Pod>) {
        if source != Source::Api {
            return;
        }
        let client = self.client.clone();
        let pods = self.pods.clone();
        let pod = pod.clone();
        tokio::spawn(sync_status(client, pods, pod, status));
    }

    fn rejected(&self, source: Source, pod: &Pod, why: &Refusal) {
        if source != Source::Api {
            return;
        }
        // As the kubelet's rejectPod: a Warning event and a Failed status.
        self.events.record(events::Event {
            namespace: pod.metadata.namespace.clone().unwrap_or_else(|| "default".into()),
            pod: pod.metadata.name.clone().unwrap_or_default(),
            uid: uid(pod),
            field_path: String::new(),
            kind: Kind::Warning,
            reason: why.reason.clone(),
            message: why.message.clone(),
            time: SystemTime::now(),
        });
        let status = PodStatus {
            phase: Some("Failed".into()),
            reason: Some(why.reason.clone()),
            message: Some(format!("Pod was rejected: {}", why.message)),
            qos_class: Some(crate::status::qos_class(model::spec(pod)).to_string()),
            ..Default::default()
        };
        let mut shown = pod.clone();
        shown.status = Some(status);
        let (tx, rx) = watch::channel(shown);
        // The status task posts it once and, the "worker" being done already, deletes the
        // pod if the API is deleting it.
        drop(tx);
        tokio::spawn(sync_status(self.client.clone(), self.pods.clone(), pod.clone(), rx));
    }

    fn not_running(&self, source: Source, pod: &Pod) {
        if source != Source::Api || pod.metadata.deletion_timestamp.is_none() {
            return;
        }
        let api: Api<Pod> =
            Api::namespaced(self.client.clone(), pod.metadata.namespace.as_deref().unwrap_or("default"));
        let (name, u) = (pod.metadata.name.clone().unwrap_or_default(), uid(pod));
        tokio::spawn(async move { delete_for_good(&api, &name, &u).await });
    }
}

enum Sent {
    Ok,
    /// The pod is gone, or is another pod of the same name now.
    Gone,
    Failed(kube::Error),
}

async fn send_status(api: &Api<Pod>, pods: &ApiPods, pod: &Pod, status: &PodStatus) -> Sent {
    let u = uid(pod);
    let merged = merged_status(status, lock(pods).get(&u));
    let patch = serde_json::json!({ "metadata": { "uid": u }, "status": merged });
    let name = pod.metadata.name.as_deref().unwrap_or_default();
    match api.patch_status(name, &PatchParams::default(), &Patch::Merge(&patch)).await {
        Ok(_) => Sent::Ok,
        // 404: deleted; 409: the UID precondition failed (a new pod of that name).
        Err(e) if matches!(api_code(&e), Some(404) | Some(409)) => Sent::Gone,
        Err(e) => Sent::Failed(e),
    }
}

async fn sync_status(client: kube::Client, pods: ApiPods, pod: Pod, mut rx: watch::Receiver<Pod>) {
    let ns = pod.metadata.namespace.clone().unwrap_or_else(|| "default".into());
    let name = pod.metadata.name.clone().unwrap_or_default();
    let u = uid(&pod);
    let api: Api<Pod> = Api::namespaced(client, &ns);
    let mut sent: Option<PodStatus> = None;
    let mut ended = false;
    let mut retry_at: Option<tokio::time::Instant> = None;
    let mut retry = Retry::default();
    let mut complaint = Complaint::default();
    let what = format!("update the status of pod {ns}/{name}");
    // As the kubelet's status manager's periodic sync: a status another component changed
    // (the node-lifecycle controller marks pods not Ready while the node is unreachable) is
    // set right again.
    let mut resync = tokio::time::interval(RESYNC);
    resync.tick().await;
    loop {
        let mut check_api = false;
        if !ended {
            tokio::select! {
                r = rx.changed() => ended = r.is_err(),
                _ = async { match retry_at { Some(t) => tokio::time::sleep_until(t).await, None => std::future::pending().await } } => {}
                _ = resync.tick() => check_api = true,
            }
        }
        let latest = rx.borrow_and_update().clone();
        let differs = |s: &PodStatus| {
            sent.as_ref() != Some(s) || (check_api && lock(&pods).get(&u).is_some_and(|p| api_differs(s, p)))
        };
        if let Some(status) = latest.status.as_ref().filter(|s| differs(s)) {
            match send_status(&api, &pods, &latest, status).await {
                Sent::Ok => {
                    complaint.succeeded(&what);
                    sent = Some(status.clone());
                    retry_at = None;
                    retry = Retry::default();
                }
                Sent::Gone => {
                    tracing::debug!(pod = %format!("{ns}/{name}"), "pod gone from the API: no more status");
                    return;
                }
                Sent::Failed(e) => {
                    complaint.failed(&what, &e);
                    let delay = retry.delay();
                    retry_at = Some(tokio::time::Instant::now() + delay);
                    if ended {
                        tokio::time::sleep(delay).await;
                    }
                    continue;
                }
            }
        }
        if ended {
            break;
        }
    }
    // The worker is done. If the API asked for the pod's deletion, the pod's resources are
    // gone now: remove the object for good.
    let deleting = lock(&pods).get(&u).is_some_and(|p| p.metadata.deletion_timestamp.is_some());
    if !deleting {
        return;
    }
    delete_for_good(&api, &name, &u).await;
}

/// The delete of a pod object whose resources are gone: grace 0, with its UID as
/// precondition (a new pod of the same name is left alone).
pub fn for_good(uid: &str) -> DeleteParams {
    DeleteParams {
        grace_period_seconds: Some(0),
        preconditions: Some(Preconditions { uid: Some(uid.to_string()), resource_version: None }),
        ..Default::default()
    }
}

/// Deletes a pod object whose resources are gone ([`for_good`]), retried with back-off.
async fn delete_for_good(api: &Api<Pod>, name: &str, uid: &str) {
    let params = for_good(uid);
    let mut retry = Retry::default();
    let mut complaint = Complaint::default();
    loop {
        match api.delete(name, &params).await {
            Ok(_) => {
                tracing::info!(pod = %name, "pod deleted from the API");
                return;
            }
            Err(e) if matches!(api_code(&e), Some(404) | Some(409)) => return,
            Err(e) => complaint.failed(&format!("delete pod {name}"), &e),
        }
        tokio::time::sleep(retry.delay()).await;
    }
}

/// Sends events to the API server (core/v1 Events from the kubelet, as `kubectl describe`
/// and `kubectl get events` show them) and logs them. A repeat of an event within 10 minutes
/// bumps its count, as the kubelet's event correlator does.
pub struct ApiRecorder {
    tx: mpsc::UnboundedSender<events::Event>,
}

impl Recorder for ApiRecorder {
    fn record(&self, e: events::Event) {
        crate::static_pods::TracingRecorder.record(e.clone());
        let _ = self.tx.send(e);
    }
}

impl ApiRecorder {
    pub fn start(client: kube::Client, node_name: String) -> ApiRecorder {
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(post_events(client, node_name, rx));
        ApiRecorder { tx }
    }
}

/// (namespace, object name) of an event: a node's events are in "default".
fn placement(e: &events::Event, node_name: &str) -> (String, String) {
    if e.is_about_node() { ("default".into(), node_name.into()) } else { (e.namespace.clone(), e.pod.clone()) }
}

/// The Event object for one of ours.
pub fn api_event(e: &events::Event, node_name: &str, name: String) -> ApiEvent {
    let t = time(e.time);
    // A node's events are in "default", about the Node whose UID the kubelet gives as its name.
    let involved_object = if e.is_about_node() {
        ObjectReference {
            kind: Some("Node".into()),
            name: Some(node_name.into()),
            uid: Some(node_name.into()),
            ..Default::default()
        }
    } else {
        ObjectReference {
            api_version: Some("v1".into()),
            kind: Some("Pod".into()),
            name: Some(e.pod.clone()),
            namespace: Some(e.namespace.clone()),
            uid: Some(e.uid.clone()),
            field_path: (!e.field_path.is_empty()).then(|| e.field_path.clone()),
            ..Default::default()
        }
    };
    ApiEvent {
        metadata: ObjectMeta { name: Some(name), namespace: Some(placement(e, node_name).0), ..Default::default() },
        involved_object,
        reason: Some(e.reason.clone()),
        message: Some(e.message.clone()),
        type_: Some(match e.kind {
            Kind::Normal => "Normal".into(),
            Kind::Warning => "Warning".into(),
        }),
        source: Some(EventSource { component: Some("kubelet".into()), host: Some(node_name.into()) }),
        reporting_component: Some("kubelet".into()),
        reporting_instance: Some(node_name.into()),
        first_timestamp: Some(t.clone()),
        last_timestamp: Some(t),
        count: Some(1),
        ..Default::default()
    }
}

/// An event's identity for the correlator: (pod UID, field path, reason, message).
type EventKey = (String, String, String, String);

async fn post_events(client: kube::Client, node_name: String, mut rx: mpsc::UnboundedReceiver<events::Event>) {
    // -> (event name, count, first seen)
    let mut seen: HashMap<EventKey, (String, i32, SystemTime)> = HashMap::new();
    let mut complaint = Complaint::default();
    while let Some(e) = rx.recv().await {
        let (namespace, about) = placement(&e, &node_name);
        let api: Api<ApiEvent> = Api::namespaced(client.clone(), &namespace);
        let key = (e.uid.clone(), e.field_path.clone(), e.reason.clone(), e.message.clone());
        seen.retain(|_, (_, _, first)| first.elapsed().unwrap_or_default() < Duration::from_secs(600));
        let result = match seen.get_mut(&key) {
            Some((name, count, _)) => {
                *count += 1;
                let patch = serde_json::json!({ "count": *count, "lastTimestamp": time(e.time) });
                api.patch(name, &PatchParams::default(), &Patch::Merge(&patch)).await.map(|_| ())
            }
            None => {
                let nanos = e.time.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default().as_nanos();
                let name = format!("{about}.{nanos:x}");
                let r = api.create(&PostParams::default(), &api_event(&e, &node_name, name.clone())).await.map(|_| ());
                if r.is_ok() {
                    seen.insert(key, (name, 1, SystemTime::now()));
                }
                r
            }
        };
        match result {
            Ok(()) => complaint.succeeded("post events"),
            Err(err) => complaint.failed(&format!("post event {} for {namespace}/{about}", e.reason), &err),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::PodCondition;

    fn cond(t: &str, s: &str) -> PodCondition {
        PodCondition { type_: t.into(), status: s.into(), ..Default::default() }
    }

    #[test]
    fn foreign_conditions_are_kept_and_ours_win() {
        let ours = PodStatus {
            conditions: Some(vec![cond("Ready", "False"), cond("PodScheduled", "True")]),
            ..Default::default()
        };
        let api = Pod {
            status: Some(PodStatus {
                conditions: Some(vec![
                    cond("Ready", "True"),
                    cond("example.com/gate", "True"),
                    cond("DisruptionTarget", "True"),
                ]),
                ..Default::default()
            }),
            ..Default::default()
        };
        let m = merged_status(&ours, Some(&api));
        let got: Vec<(String, String)> = m.conditions.unwrap().into_iter().map(|c| (c.type_, c.status)).collect();
        assert_eq!(
            got,
            [("Ready", "False"), ("PodScheduled", "True"), ("example.com/gate", "True"), ("DisruptionTarget", "True")]
                .map(|(a, b)| (a.to_string(), b.to_string()))
        );
        assert_eq!(merged_status(&ours, None).conditions.unwrap().len(), 2);
    }

    #[test]
    fn events_name_the_pod_and_the_kubelet() {
        let e = events::Event {
            namespace: "ns".into(),
            pod: "web".into(),
            uid: "u1".into(),
            field_path: "spec.containers{app}".into(),
            kind: Kind::Warning,
            reason: "BackOff".into(),
            message: "Back-off restarting failed container".into(),
            time: SystemTime::UNIX_EPOCH,
        };
        let a = api_event(&e, "edge-1", "web.1".into());
        assert_eq!(a.involved_object.field_path.as_deref(), Some("spec.containers{app}"));
        assert_eq!(a.involved_object.uid.as_deref(), Some("u1"));
        assert_eq!(a.type_.as_deref(), Some("Warning"));
        assert_eq!(a.source.unwrap().host.as_deref(), Some("edge-1"));
        assert_eq!(a.count, Some(1));
    }

    #[test]
    fn mirror_pods_are_recognised() {
        let mut p = Pod::default();
        assert!(!is_mirror(&p));
        p.metadata.annotations = Some([("kubernetes.io/config.mirror".to_string(), "h".to_string())].into());
        assert!(is_mirror(&p));
    }
}
