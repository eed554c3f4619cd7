//! The kubelet's job, for pods whose containers are wasm: pure logic (back-off, probes,
//! status, environment, DNS) and the pod workers that carry it out through the CRI.

pub mod actions;
pub mod backoff;
pub mod credentials;
pub mod env;
pub mod images;
pub mod model;
pub mod probe;
pub mod quantity;
pub mod status;

pub mod cri;
pub mod dns;
pub mod events;
pub mod http1;
pub mod prober;
#[cfg(test)]
mod testutil;
pub mod validate;
pub mod volumes;
pub mod worker;
