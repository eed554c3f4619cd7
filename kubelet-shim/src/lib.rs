//! wasmlet's kubelet: pod workers that take Kubernetes Pods to their desired state through
//! the CRI, and the pure logic they follow.

pub mod kubelet;
pub mod run;
pub mod static_pods;
