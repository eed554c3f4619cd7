//! The objects pods refer to (ConfigMaps, Secrets, tokens, claims, Services), as the workers
//! read them.

use std::path::PathBuf;

use k8s_openapi::api::core::v1::{ConfigMap, Pod, Secret};

/// The ConfigMaps, Secrets and service account tokens pods read (from manifests, or an API
/// server).
pub trait Objects: Send + Sync {
    fn config_map(&self, namespace: &str, name: &str) -> Option<ConfigMap>;
    fn secret(&self, namespace: &str, name: &str) -> Option<Secret>;
    /// A token of the pod's service account for the audience ("" for the API server's),
    /// valid for about `expiration` seconds; None when there is no cluster to ask.
    fn service_account_token(&self, _pod: &Pod, _audience: &str, _expiration: i64) -> Option<String> {
        None
    }
    /// The directory of the PersistentVolume bound to claim `name` in `namespace`.
    fn claim(&self, _namespace: &str, name: &str) -> Result<PathBuf, String> {
        Err(format!("persistentvolumeclaim \"{name}\": claims need a cluster"))
    }
    /// The cluster's Services (for the pods' Service environment variables).
    fn services(&self) -> Vec<k8s_openapi::api::core::v1::Service> {
        Vec::new()
    }
    /// Brings what `pod` refers to up to date before the calls above read it (a cache of an
    /// API server's objects); nothing to do for fixed objects.
    fn refresh<'a>(&'a self, _pod: &'a Pod) -> futures_util::future::BoxFuture<'a, ()> {
        Box::pin(async {})
    }
    /// The pod with this UID is gone: what was kept for it alone can go.
    fn forget(&self, _pod_uid: &str) {}
}

/// Objects from a fixed list (`wasmlet run`'s manifests).
#[derive(Default)]
pub struct StaticObjects {
    pub config_maps: Vec<ConfigMap>,
    pub secrets: Vec<Secret>,
}

fn same(meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta, ns: &str, name: &str) -> bool {
    meta.name.as_deref() == Some(name) && meta.namespace.as_deref().unwrap_or("default") == ns
}

impl Objects for StaticObjects {
    fn config_map(&self, ns: &str, name: &str) -> Option<ConfigMap> {
        self.config_maps.iter().find(|c| same(&c.metadata, ns, name)).cloned()
    }
    fn secret(&self, ns: &str, name: &str) -> Option<Secret> {
        self.secrets.iter().find(|c| same(&c.metadata, ns, name)).cloned()
    }
}
