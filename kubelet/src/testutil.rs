//! Builders for the unit tests of the pure logic.

use std::time::{Duration, SystemTime};

use k8s_openapi::api::core::v1::{Container, Pod, PodSpec, Probe};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

use super::model::{Instance, Observed, Sandbox, State, container_hash};

pub fn t(secs: u64) -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000 + secs)
}

pub fn container(name: &str) -> Container {
    Container { name: name.into(), image: Some(format!("{name}:1")), ..Default::default() }
}

pub fn sidecar(name: &str) -> Container {
    Container { restart_policy: Some("Always".into()), ..container(name) }
}

pub fn with_probe(mut c: Container, kind: &str) -> Container {
    let p = Some(Probe::default());
    match kind {
        "liveness" => c.liveness_probe = p,
        "readiness" => c.readiness_probe = p,
        _ => c.startup_probe = p,
    }
    c
}

pub fn pod(policy: &str, init: Vec<Container>, app: Vec<Container>) -> Pod {
    Pod {
        metadata: ObjectMeta {
            name: Some("web".into()),
            namespace: Some("default".into()),
            uid: Some("uid-1".into()),
            ..Default::default()
        },
        spec: Some(PodSpec {
            restart_policy: Some(policy.into()),
            init_containers: (!init.is_empty()).then_some(init),
            containers: app,
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// An instance of `c`: running since `at`, or exited with `code` at `at + 1`.
pub fn inst(c: &Container, n: i32, state: State, code: i32, at: u64) -> Instance {
    let exited = state == State::Exited;
    Instance {
        id: format!("{}-{n}", c.name),
        name: c.name.clone(),
        restart_count: n,
        state,
        created_at: t(at),
        started_at: (state != State::Created).then(|| t(at)),
        finished_at: exited.then(|| t(at + 1)),
        exit_code: code,
        reason: if !exited {
            String::new()
        } else if code == 0 {
            "Completed".into()
        } else {
            "Error".into()
        },
        message: String::new(),
        image: c.image.clone().unwrap_or_default(),
        image_ref: "sha256:00".into(),
        hash: container_hash(c),
    }
}

pub fn observed(instances: Vec<Instance>) -> Observed {
    Observed { sandbox: Some(Sandbox { id: "sb".into(), ready: true, ip: "10.88.0.2".into(), attempt: 0 }), instances }
}
