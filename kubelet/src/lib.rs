//! wasmlet's kubelet: pod workers that take Kubernetes Pods to their desired state through
//! the CRI, the pure logic they follow (back-off, probes, status, environment, DNS), and the
//! node's side of the Kubernetes API. It knows the runtime only as a CRI client: this crate
//! does not depend on `wasmlet-runtime`.

pub mod actions;
pub mod admission;
pub mod backoff;
pub mod credentials;
pub mod env;
pub mod eviction;
pub mod imagegc;
pub mod images;
pub mod logrotate;
pub mod logs;
pub mod metrics;
pub mod model;
pub mod probe;
pub mod quantity;
pub mod status;

pub mod clock;
pub mod cri;
pub mod dns;
pub mod events;
#[cfg(test)]
mod fake;
pub mod http1;
pub mod prober;
#[cfg(test)]
mod testutil;
pub mod validate;
pub mod volumes;
pub mod worker;

pub mod node;
pub mod pods;
pub mod run;
pub mod static_pods;
