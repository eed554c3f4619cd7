//! Wire compatibility with upstream kubernetes/cri-api (runtime.v1): representative messages
//! are encoded by a hand-written protobuf writer that uses the upstream field numbers and wire
//! types directly, and must be byte-identical to (and decode back from) what cri-proto makes.

use cri_proto::v1 as cri;
use prost::Message;

/// Minimal protobuf writer: field by field, in field-number order, as prost emits them.
#[derive(Default)]
struct W(Vec<u8>);

impl W {
    fn varint(&mut self, mut v: u64) -> &mut Self {
        loop {
            let b = (v & 0x7f) as u8;
            v >>= 7;
            if v == 0 {
                self.0.push(b);
                return self;
            }
            self.0.push(b | 0x80);
        }
    }
    fn key(&mut self, field: u32, wire: u8) -> &mut Self {
        self.varint(u64::from(field << 3 | u32::from(wire)))
    }
    fn int(&mut self, field: u32, v: u64) -> &mut Self {
        self.key(field, 0).varint(v)
    }
    fn bytes(&mut self, field: u32, b: &[u8]) -> &mut Self {
        self.key(field, 2).varint(b.len() as u64);
        self.0.extend_from_slice(b);
        self
    }
    fn str(&mut self, field: u32, s: &str) -> &mut Self {
        self.bytes(field, s.as_bytes())
    }
    fn msg(&mut self, field: u32, inner: &W) -> &mut Self {
        self.bytes(field, &inner.0)
    }
    fn map_entry(&mut self, field: u32, k: &str, v: &str) -> &mut Self {
        let mut e = W::default();
        e.str(1, k).str(2, v);
        self.msg(field, &e)
    }
    fn done(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.0)
    }
}

fn w() -> W {
    W::default()
}

#[test]
fn pod_sandbox_config() {
    let ours = cri::PodSandboxConfig {
        metadata: Some(cri::PodSandboxMetadata {
            name: "nginx".into(),
            uid: "u1".into(),
            namespace: "default".into(),
            attempt: 2,
        }),
        hostname: "web".into(),
        log_directory: "/var/log/pods/x".into(),
        dns_config: Some(cri::DnsConfig {
            servers: vec!["10.0.0.10".into()],
            searches: vec!["svc.cluster.local".into()],
            options: vec!["ndots:5".into()],
        }),
        port_mappings: vec![cri::PortMapping {
            protocol: cri::Protocol::Udp as i32,
            container_port: 53,
            host_port: 5353,
            host_ip: "127.0.0.1".into(),
        }],
        labels: [("app".to_string(), "web".to_string())].into(),
        annotations: [("a".to_string(), "b".to_string())].into(),
        linux: Some(cri::LinuxPodSandboxConfig {
            cgroup_parent: "/kubepods".into(),
            security_context: Some(cri::LinuxSandboxSecurityContext {
                namespace_options: Some(cri::NamespaceOption {
                    network: cri::NamespaceMode::Node as i32,
                    pid: cri::NamespaceMode::Container as i32,
                    ..Default::default()
                }),
                run_as_group: Some(cri::Int64Value { value: 7 }),
                ..Default::default()
            }),
            ..Default::default()
        }),
        windows: None,
    };
    let upstream = w()
        .msg(1, w().str(1, "nginx").str(2, "u1").str(3, "default").int(4, 2))
        .str(2, "web")
        .str(3, "/var/log/pods/x")
        .msg(4, w().str(1, "10.0.0.10").str(2, "svc.cluster.local").str(3, "ndots:5"))
        .msg(5, w().int(1, 1).int(2, 53).int(3, 5353).str(4, "127.0.0.1"))
        .map_entry(6, "app", "web")
        .map_entry(7, "a", "b")
        .msg(8, w().str(1, "/kubepods").msg(2, w().msg(1, w().int(1, 2).int(2, 1)).msg(8, w().int(1, 7))))
        .done();
    assert_eq!(ours.encode_to_vec(), upstream);
    assert_eq!(cri::PodSandboxConfig::decode(&upstream[..]).unwrap(), ours);
}

#[test]
fn container_config() {
    let ours = cri::ContainerConfig {
        metadata: Some(cri::ContainerMetadata { name: "app".into(), attempt: 3 }),
        image: Some(cri::ImageSpec {
            image: "sha256:abc".into(),
            user_specified_image: "app:1".into(),
            runtime_handler: "wasmlet".into(),
            ..Default::default()
        }),
        command: vec!["/app.wasm".into()],
        args: vec!["--port".into(), "8080".into()],
        working_dir: "/data".into(),
        envs: vec![cri::KeyValue { key: "A".into(), value: "1".into() }],
        mounts: vec![cri::Mount {
            container_path: "/data".into(),
            host_path: "/srv/data".into(),
            readonly: true,
            propagation: cri::MountPropagation::PropagationHostToContainer as i32,
            recursive_read_only: true,
            image_sub_path: "sub".into(),
            ..Default::default()
        }],
        log_path: "app/3.log".into(),
        stdin: true,
        tty: true,
        linux: Some(cri::LinuxContainerConfig {
            resources: Some(cri::LinuxContainerResources {
                cpu_quota: 50_000,
                memory_limit_in_bytes: 64 << 20,
                memory_swap_limit_in_bytes: 1,
                ..Default::default()
            }),
            security_context: None,
        }),
        stop_signal: cri::Signal::Sigterm as i32,
        cdi_devices: vec![cri::CdiDevice { name: "vendor.com/gpu=0".into() }],
        ..Default::default()
    };
    let upstream = w()
        .msg(1, w().str(1, "app").int(2, 3))
        .msg(2, w().str(1, "sha256:abc").str(18, "app:1").str(19, "wasmlet"))
        .str(3, "/app.wasm")
        .str(4, "--port")
        .str(4, "8080")
        .str(5, "/data")
        .msg(6, w().str(1, "A").str(2, "1"))
        .msg(7, w().str(1, "/data").str(2, "/srv/data").int(3, 1).int(5, 1).int(8, 1).str(10, "sub"))
        .str(11, "app/3.log")
        .int(12, 1)
        .int(14, 1)
        .msg(15, w().msg(1, w().int(2, 50_000).int(4, 64 << 20).int(10, 1)))
        .msg(17, w().str(1, "vendor.com/gpu=0"))
        .int(18, 23)
        .done();
    assert_eq!(ours.encode_to_vec(), upstream);
    assert_eq!(cri::ContainerConfig::decode(&upstream[..]).unwrap(), ours);
}

#[test]
fn list_containers_with_filters_and_the_answer() {
    let ours = cri::ListContainersRequest {
        filter: Some(cri::ContainerFilter {
            id: "c1".into(),
            state: Some(cri::ContainerStateValue { state: cri::ContainerState::ContainerExited as i32 }),
            pod_sandbox_id: "s1".into(),
            label_selector: [("io.kubernetes.pod.uid".to_string(), "u".to_string())].into(),
        }),
    };
    let upstream = w()
        .msg(1, w().str(1, "c1").msg(2, w().int(1, 2)).str(3, "s1").map_entry(4, "io.kubernetes.pod.uid", "u"))
        .done();
    assert_eq!(ours.encode_to_vec(), upstream);
    assert_eq!(cri::ListContainersRequest::decode(&upstream[..]).unwrap(), ours);

    // A container in the answer, with the 1.36 image_id field (10).
    let c = cri::Container {
        id: "c1".into(),
        pod_sandbox_id: "s1".into(),
        image_ref: "r".into(),
        state: cri::ContainerState::ContainerRunning as i32,
        created_at: 1_700_000_000_000_000_000,
        image_id: "sha256:i".into(),
        ..Default::default()
    };
    let upstream = w()
        .str(1, "c1")
        .str(2, "s1")
        .str(5, "r")
        .int(6, 1)
        .int(7, 1_700_000_000_000_000_000)
        .str(10, "sha256:i")
        .done();
    assert_eq!(c.encode_to_vec(), upstream);
}

#[test]
fn status_and_pull_answers() {
    let s = cri::ContainerStatus {
        id: "c".into(),
        state: cri::ContainerState::ContainerExited as i32,
        finished_at: 5,
        exit_code: -1,
        reason: "OOMKilled".into(),
        log_path: "/l".into(),
        image_id: "sha256:i".into(),
        stop_signal: cri::Signal::Sigkill as i32,
        ..Default::default()
    };
    let upstream = w()
        .str(1, "c")
        .int(3, 2)
        .int(6, 5)
        .int(7, u64::MAX) // int32 -1 is a 10-byte varint
        .str(10, "OOMKilled")
        .str(15, "/l")
        .str(17, "sha256:i")
        .int(19, 13)
        .done();
    assert_eq!(s.encode_to_vec(), upstream);
    let pull = cri::PullImageResponse { image_ref: "sha256:i".into() };
    assert_eq!(pull.encode_to_vec(), w().str(1, "sha256:i").done());
    let fs = cri::ImageFsInfoResponse {
        image_filesystems: vec![cri::FilesystemUsage {
            timestamp: 9,
            fs_id: Some(cri::FilesystemIdentifier { mountpoint: "/m".into() }),
            used_bytes: Some(cri::UInt64Value { value: 100 }),
            inodes_used: Some(cri::UInt64Value { value: 3 }),
        }],
        container_filesystems: vec![],
    };
    let upstream =
        w().msg(1, w().int(1, 9).msg(2, w().str(1, "/m")).msg(3, w().int(1, 100)).msg(4, w().int(1, 3))).done();
    assert_eq!(fs.encode_to_vec(), upstream);
}

#[test]
fn enum_numbers() {
    assert_eq!(cri::ContainerState::ContainerUnknown as i32, 3);
    assert_eq!(cri::PodSandboxState::SandboxNotready as i32, 1);
    assert_eq!(cri::CgroupDriver::Systemd as i32, 0);
    assert_eq!(cri::ContainerEventType::ContainerDeletedEvent as i32, 3);
    assert_eq!(cri::Signal::Sigrtmax as i32, 65);
    assert_eq!(cri::NamespaceMode::Target as i32, 3);
    assert_eq!(cri::security_profile::ProfileType::Localhost as i32, 2);
    assert_eq!(cri::MetricType::Gauge as i32, 1);
}
