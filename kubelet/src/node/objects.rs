//! What pods read from the API server: the ConfigMaps and Secrets their env, volumes and pull
//! secrets name, and their service account tokens (TokenRequest, bound to the pod). Each
//! ConfigMap and Secret is watched by name while a pod refers to it (the kubelet's Watch
//! change-detection strategy; the Node authorizer lets a node list and watch what its pods
//! refer to, with a `metadata.name` field selector), so a changed ConfigMap reaches a mounted
//! volume at the next sync and a steady node sends no reads.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use futures_util::future::BoxFuture;
use k8s_openapi::api::authentication::v1::{BoundObjectReference, TokenRequest, TokenRequestSpec};
use k8s_openapi::api::core::v1::{
    ConfigMap, PersistentVolume, PersistentVolumeClaim, Pod, Secret, Service, ServiceAccount,
};
use kube::Api;
use kube::api::PostParams;
use kube::runtime::{WatchStreamExt, reflector, watcher};
use tokio::sync::watch;

use crate::worker::Objects;

/// How long a sync waits for a new watch's first listing (a watch refused until the Node
/// authorizer has the pod's edge to the object is retried; the pod sees it missing meanwhile).
const FIRST_LISTING: Duration = Duration::from_secs(2);

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Kind {
    ConfigMap,
    Secret,
}

#[derive(Clone)]
enum Obj {
    ConfigMap(ConfigMap),
    Secret(Secret),
}

/// (kind, namespace, name).
type ObjectKey = (Kind, String, String);

/// A watched object as last seen: None until the first listing, then the object if it exists.
type Seen = Option<Option<Obj>>;

/// One ConfigMap or Secret watched for the pods that refer to it.
struct Watched {
    pods: HashSet<String>,
    seen: watch::Receiver<Seen>,
    task: tokio::task::JoinHandle<()>,
}

struct Token {
    token: String,
    refresh_at: Instant,
}

/// ConfigMaps, Secrets and tokens fetched from the API server for the pods that use them.
pub struct ApiObjects {
    client: kube::Client,
    /// Every Service (watched), for the pods' Service variables and the node's Service routes.
    services: reflector::Store<Service>,
    /// Bumped at every event of that watch.
    services_changed: watch::Receiver<()>,
    watched: Mutex<HashMap<ObjectKey, Watched>>,
    /// (pod UID, audience, expirationSeconds) -> token.
    tokens: Mutex<HashMap<(String, String, i64), Token>>,
    /// (namespace, claim) -> the bound volume's directory, or why there is none.
    claims: Mutex<HashMap<(String, String), Result<PathBuf, String>>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// What a pod refers to: ConfigMap names, Secret names, and (audience, expirationSeconds) of
/// its projected service account tokens.
pub fn references(pod: &Pod) -> (BTreeSet<String>, BTreeSet<String>, BTreeSet<(String, i64)>) {
    let (mut cms, mut secrets, mut tokens) = (BTreeSet::new(), BTreeSet::new(), BTreeSet::new());
    let Some(spec) = pod.spec.as_ref() else { return (cms, secrets, tokens) };
    for v in spec.volumes.iter().flatten() {
        if let Some(c) = &v.config_map {
            cms.insert(c.name.clone());
        }
        if let Some(s) = v.secret.as_ref().and_then(|s| s.secret_name.clone()) {
            secrets.insert(s);
        }
        for src in v.projected.iter().flat_map(|p| p.sources.iter().flatten()) {
            if let Some(c) = &src.config_map {
                cms.insert(c.name.clone());
            }
            if let Some(s) = &src.secret {
                secrets.insert(s.name.clone());
            }
            if let Some(t) = &src.service_account_token {
                tokens.insert((t.audience.clone().unwrap_or_default(), t.expiration_seconds.unwrap_or(3600)));
            }
        }
    }
    let containers = spec.init_containers.iter().flatten().chain(spec.containers.iter());
    for c in containers {
        for e in c.env_from.iter().flatten() {
            if let Some(r) = &e.config_map_ref {
                cms.insert(r.name.clone());
            }
            if let Some(r) = &e.secret_ref {
                secrets.insert(r.name.clone());
            }
        }
        for e in c.env.iter().flatten().filter_map(|e| e.value_from.as_ref()) {
            if let Some(r) = &e.config_map_key_ref {
                cms.insert(r.name.clone());
            }
            if let Some(r) = &e.secret_key_ref {
                secrets.insert(r.name.clone());
            }
        }
    }
    for s in spec.image_pull_secrets.iter().flatten() {
        secrets.insert(s.name.clone());
    }
    (cms, secrets, tokens)
}

impl ApiObjects {
    /// Starts the watch of Services; [`ApiObjects::synced`] waits for its first listing.
    pub fn new(client: kube::Client) -> ApiObjects {
        let (services, writer) = reflector::store();
        let api: Api<Service> = Api::all(client.clone());
        let stream = reflector(writer, watcher(api, watcher::Config::default())).default_backoff();
        let (changed, services_changed) = watch::channel(());
        tokio::spawn(stream.for_each(move |_| {
            changed.send_replace(());
            std::future::ready(())
        }));
        ApiObjects {
            client,
            services,
            services_changed,
            watched: Mutex::default(),
            tokens: Mutex::default(),
            claims: Mutex::default(),
        }
    }

    /// The watched Services, and a signal that fires at each change of them (one watch serves
    /// the pods' environments and the Service routes).
    pub fn services_watch(&self) -> (reflector::Store<Service>, watch::Receiver<()>) {
        (self.services.clone(), self.services_changed.clone())
    }

    /// Waits until the Services have been listed once: the kubelet builds no pod's
    /// environment before (its variables would be missing).
    pub async fn synced(&self) {
        let _ = self.services.wait_until_ready().await;
    }

    /// The watch of an object for pod `uid`, started if it is the first to refer to it.
    fn watch(&self, kind: Kind, ns: &str, name: &str, uid: &str) -> watch::Receiver<Seen> {
        let key = (kind, ns.to_string(), name.to_string());
        let mut watched = lock(&self.watched);
        let w = watched.entry(key).or_insert_with(|| {
            let (tx, seen) = watch::channel(None);
            let task = match kind {
                Kind::ConfigMap => tokio::spawn(watch_one(
                    Api::namespaced(self.client.clone(), ns),
                    name.to_string(),
                    tx,
                    Obj::ConfigMap,
                )),
                Kind::Secret => {
                    tokio::spawn(watch_one(Api::namespaced(self.client.clone(), ns), name.to_string(), tx, Obj::Secret))
                }
            };
            Watched { pods: HashSet::new(), seen, task }
        });
        w.pods.insert(uid.to_string());
        w.seen.clone()
    }

    fn seen(&self, kind: Kind, ns: &str, name: &str) -> Option<Obj> {
        let watched = lock(&self.watched);
        let w = watched.get(&(kind, ns.to_string(), name.to_string()))?;
        w.seen.borrow().clone().flatten()
    }

    async fn fetch_token(&self, pod: &Pod, audience: &str, expiration: i64) {
        let uid = pod.metadata.uid.clone().unwrap_or_default();
        let key = (uid.clone(), audience.to_string(), expiration);
        if lock(&self.tokens).get(&key).is_some_and(|t| Instant::now() < t.refresh_at) {
            return;
        }
        let ns = pod.metadata.namespace.as_deref().unwrap_or("default");
        let sa = pod.spec.as_ref().and_then(|s| s.service_account_name.clone()).unwrap_or_else(|| "default".into());
        let request = TokenRequest {
            metadata: Default::default(),
            spec: Some(TokenRequestSpec {
                audiences: (!audience.is_empty()).then(|| vec![audience.to_string()]),
                expiration_seconds: Some(expiration),
                bound_object_ref: Some(BoundObjectReference {
                    api_version: Some("v1".into()),
                    kind: Some("Pod".into()),
                    name: pod.metadata.name.clone(),
                    uid: Some(uid),
                }),
            }),
            status: None,
        };
        let api: Api<ServiceAccount> = Api::namespaced(self.client.clone(), ns);
        match api.create_subresource::<_, TokenRequest>("token", &sa, &PostParams::default(), &request).await {
            Ok(r) => {
                let Some(token) = r.status.and_then(|s| s.token) else { return };
                // Refreshed at 80% of its life, or after 24 hours, as the kubelet's token manager.
                let granted = r.spec.and_then(|s| s.expiration_seconds).unwrap_or(expiration).max(1) as u64;
                let life = Duration::from_secs(granted).mul_f64(0.8).min(Duration::from_secs(24 * 3600));
                lock(&self.tokens).insert(key, Token { token, refresh_at: Instant::now() + life });
            }
            Err(e) => {
                tracing::warn!(pod = %format!("{ns}/{}", pod.metadata.name.as_deref().unwrap_or_default()), service_account = %sa, error = %e, "token request failed")
            }
        }
    }

    /// Resolves a claim to its PersistentVolume's directory: a local or hostPath volume.
    async fn fetch_claim(&self, ns: &str, name: &str) {
        let key = (ns.to_string(), name.to_string());
        // Bound claims do not move: resolved once.
        if lock(&self.claims).get(&key).is_some_and(|r| r.is_ok()) {
            return;
        }
        let claims: Api<PersistentVolumeClaim> = Api::namespaced(self.client.clone(), ns);
        let result = async {
            let claim = claims
                .get_opt(name)
                .await
                .map_err(|e| format!("get persistentvolumeclaim \"{name}\": {e}"))?
                .ok_or_else(|| format!("persistentvolumeclaim \"{name}\" not found"))?;
            let volume = claim
                .spec
                .and_then(|s| s.volume_name)
                .filter(|v| !v.is_empty())
                .ok_or_else(|| format!("persistentvolumeclaim \"{name}\" is not bound"))?;
            let pv = Api::<PersistentVolume>::all(self.client.clone())
                .get(&volume)
                .await
                .map_err(|e| format!("get persistentvolume \"{volume}\": {e}"))?;
            let spec = pv.spec.unwrap_or_default();
            match (spec.local, spec.host_path) {
                (Some(l), _) => Ok(PathBuf::from(l.path)),
                (None, Some(h)) => Ok(PathBuf::from(h.path)),
                _ => Err(format!(
                    "persistentvolume \"{volume}\" is neither a local nor a hostPath volume: wasmlet mounts only those"
                )),
            }
        }
        .await;
        lock(&self.claims).insert(key, result);
    }
}

/// Follows one object: its listing, changes and deletion, into `seen`. Errors (a watch the
/// Node authorizer refuses for now, an API server outage) are retried with back-off, the copy
/// last seen kept meanwhile.
async fn watch_one<K>(api: Api<K>, name: String, seen: watch::Sender<Seen>, wrap: fn(K) -> Obj)
where
    K: kube::Resource + Clone + std::fmt::Debug + serde::de::DeserializeOwned + Send + 'static,
{
    let config = watcher::Config::default().fields(&format!("metadata.name={name}"));
    let mut events = watcher(api, config).default_backoff().boxed();
    let mut listing = None;
    while let Some(event) = events.next().await {
        match event {
            Ok(watcher::Event::Init) => listing = None,
            Ok(watcher::Event::InitApply(o)) => listing = Some(wrap(o)),
            Ok(watcher::Event::InitDone) => {
                seen.send_replace(Some(listing.take()));
            }
            Ok(watcher::Event::Apply(o)) => {
                seen.send_replace(Some(Some(wrap(o))));
            }
            Ok(watcher::Event::Delete(_)) => {
                seen.send_replace(Some(None));
            }
            Err(e) => tracing::debug!(object = %name, error = %e, "watch failed (retrying)"),
        }
    }
}

impl Objects for ApiObjects {
    fn config_map(&self, ns: &str, name: &str) -> Option<ConfigMap> {
        match self.seen(Kind::ConfigMap, ns, name) {
            Some(Obj::ConfigMap(c)) => Some(c),
            _ => None,
        }
    }

    fn secret(&self, ns: &str, name: &str) -> Option<Secret> {
        match self.seen(Kind::Secret, ns, name) {
            Some(Obj::Secret(s)) => Some(s),
            _ => None,
        }
    }

    fn service_account_token(&self, pod: &Pod, audience: &str, expiration: i64) -> Option<String> {
        let uid = pod.metadata.uid.clone().unwrap_or_default();
        lock(&self.tokens).get(&(uid, audience.to_string(), expiration)).map(|t| t.token.clone())
    }

    fn claim(&self, ns: &str, name: &str) -> Result<PathBuf, String> {
        lock(&self.claims)
            .get(&(ns.to_string(), name.to_string()))
            .cloned()
            .unwrap_or_else(|| Err(format!("persistentvolumeclaim \"{name}\" not looked up yet")))
    }

    fn services(&self) -> Vec<Service> {
        self.services.state().iter().map(|s| (**s).clone()).collect()
    }

    fn refresh<'a>(&'a self, pod: &'a Pod) -> BoxFuture<'a, ()> {
        Box::pin(async move {
            let ns = pod.metadata.namespace.as_deref().unwrap_or("default");
            let uid = pod.metadata.uid.as_deref().unwrap_or_default();
            let (cms, secrets, tokens) = references(pod);
            let objects = cms.iter().map(|c| (Kind::ConfigMap, c)).chain(secrets.iter().map(|s| (Kind::Secret, s)));
            for (kind, name) in objects {
                let mut seen = self.watch(kind, ns, name, uid);
                let _ = tokio::time::timeout(FIRST_LISTING, seen.wait_for(Option::is_some)).await;
            }
            for (audience, expiration) in &tokens {
                self.fetch_token(pod, audience, *expiration).await;
            }
            for v in pod.spec.iter().flat_map(|s| s.volumes.iter().flatten()) {
                if let Some(c) = &v.persistent_volume_claim {
                    self.fetch_claim(ns, &c.claim_name).await;
                }
            }
        })
    }

    fn forget(&self, uid: &str) {
        lock(&self.tokens).retain(|(u, _, _), _| u != uid);
        lock(&self.watched).retain(|_, w| {
            w.pods.remove(uid);
            if w.pods.is_empty() {
                w.task.abort();
            }
            !w.pods.is_empty()
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn references_cover_volumes_env_and_pull_secrets() {
        let pod: Pod = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "p"},
            "spec": {
                "imagePullSecrets": [{"name": "pull"}],
                "volumes": [
                    {"name": "a", "configMap": {"name": "cm-vol"}},
                    {"name": "b", "secret": {"secretName": "s-vol"}},
                    {"name": "c", "projected": {"sources": [
                        {"serviceAccountToken": {"path": "token", "expirationSeconds": 3607}},
                        {"configMap": {"name": "kube-root-ca.crt"}},
                        {"serviceAccountToken": {"path": "vault", "audience": "vault"}}
                    ]}}
                ],
                "containers": [{"name": "app", "image": "a",
                    "envFrom": [{"configMapRef": {"name": "cm-env"}}],
                    "env": [{"name": "X", "valueFrom": {"secretKeyRef": {"name": "s-env", "key": "k"}}}]}]
            }
        }))
        .unwrap();
        let (cms, secrets, tokens) = references(&pod);
        assert_eq!(cms.into_iter().collect::<Vec<_>>(), ["cm-env", "cm-vol", "kube-root-ca.crt"]);
        assert_eq!(secrets.into_iter().collect::<Vec<_>>(), ["pull", "s-env", "s-vol"]);
        assert_eq!(tokens.into_iter().collect::<Vec<_>>(), [(String::new(), 3607), ("vault".to_string(), 3600)]);
    }
}
