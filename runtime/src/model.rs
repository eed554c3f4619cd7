//! The runtime's own view of sandboxes and containers, persisted as JSON, and their state
//! machines. Protocol types stay in `cri`; these are what the runtime reasons about.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::engine::Outcome;
use crate::{Error, Result};

/// Key-value maps are kept sorted so state files are stable.
pub type Labels = BTreeMap<String, String>;

/// Identity of a pod sandbox, as the kubelet gives it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SandboxMetadata {
    pub name: String,
    pub uid: String,
    pub namespace: String,
    pub attempt: u32,
}

impl SandboxMetadata {
    /// The name reserved for this sandbox until it is removed (containerd's scheme).
    pub fn reserved_name(&self) -> String {
        format!("{}_{}_{}_{}", self.name, self.namespace, self.uid, self.attempt)
    }
}

/// Linux namespace modes, as the CRI names them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum NamespaceMode {
    #[default]
    Pod,
    Container,
    Node,
    Target,
}

/// DNS settings for the pod's resolv.conf.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DnsConfig {
    pub servers: Vec<String>,
    pub searches: Vec<String>,
    pub options: Vec<String>,
}

/// A port the pod exposes on the host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PortMapping {
    /// 0 TCP, 1 UDP, 2 SCTP (the CRI's numbering).
    pub protocol: i32,
    pub container_port: i32,
    pub host_port: i32,
    pub host_ip: String,
}

/// What a sandbox was asked to be.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SandboxSpec {
    pub metadata: SandboxMetadata,
    pub hostname: String,
    pub log_directory: String,
    pub dns: Option<DnsConfig>,
    pub port_mappings: Vec<PortMapping>,
    pub labels: Labels,
    pub annotations: Labels,
    pub network: NamespaceMode,
    pub pid: NamespaceMode,
    pub ipc: NamespaceMode,
    pub runtime_handler: String,
}

/// Sandbox lifecycle: Ready until stopped, then NotReady until removed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum SandboxState {
    Ready,
    NotReady,
}

/// A sandbox as stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SandboxRecord {
    pub id: String,
    pub spec: SandboxSpec,
    pub state: SandboxState,
    pub created_at: i64,
    /// The pod's IP ("" on the host's network).
    #[serde(default)]
    pub ip: String,
}

impl SandboxRecord {
    /// Ready -> NotReady; stopping a stopped sandbox is allowed and changes nothing.
    pub fn stop(&mut self) -> bool {
        let changed = self.state == SandboxState::Ready;
        self.state = SandboxState::NotReady;
        changed
    }
}

/// Name and attempt of a container; unique within its sandbox.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ContainerMetadata {
    pub name: String,
    pub attempt: u32,
}

/// The image a container was asked for.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageSpec {
    pub image: String,
    pub annotations: Labels,
    pub user_specified_image: String,
    pub runtime_handler: String,
}

/// A host path made visible to the container.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Mount {
    pub container_path: String,
    pub host_path: String,
    pub readonly: bool,
    pub selinux_relabel: bool,
    pub propagation: i32,
    pub recursive_read_only: bool,
}

/// Linux resources as the CRI gives them; memory is enforced inside wasm.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Resources {
    pub cpu_period: i64,
    pub cpu_quota: i64,
    pub cpu_shares: i64,
    pub memory_limit_in_bytes: i64,
    pub oom_score_adj: i64,
    pub cpuset_cpus: String,
    pub cpuset_mems: String,
    pub hugepage_limits: Vec<(String, u64)>,
    pub unified: Labels,
    pub memory_swap_limit_in_bytes: i64,
}

impl Resources {
    /// Refuses what the kernel's cgroup controls would refuse, naming the field and the range.
    pub fn check(&self) -> Result<(), String> {
        let r = self;
        if r.cpu_quota < -1 || (1..1000).contains(&r.cpu_quota) {
            return Err(format!("cpu_quota {} us: it must be at least 1000 us, or 0 or -1 for none", r.cpu_quota));
        }
        if r.cpu_period != 0 && !(1000..=1_000_000).contains(&r.cpu_period) {
            return Err(format!("cpu_period {} us: it must be from 1000 to 1000000 us, or 0 for 100000", r.cpu_period));
        }
        if r.cpu_shares < 0 {
            return Err(format!("cpu_shares {}: it cannot be negative", r.cpu_shares));
        }
        if r.memory_limit_in_bytes < -1 {
            return Err(format!(
                "memory_limit_in_bytes {}: it must be positive, or 0 or -1 for none",
                r.memory_limit_in_bytes
            ));
        }
        Ok(())
    }
}

/// What a container was asked to be.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ContainerSpec {
    pub metadata: ContainerMetadata,
    pub image: ImageSpec,
    pub command: Vec<String>,
    pub args: Vec<String>,
    pub working_dir: String,
    pub envs: Vec<(String, String)>,
    pub mounts: Vec<Mount>,
    pub labels: Labels,
    pub annotations: Labels,
    pub log_path: String,
    pub stdin: bool,
    pub stdin_once: bool,
    pub tty: bool,
    pub resources: Option<Resources>,
    pub stop_signal: i32,
}

/// Container lifecycle: Created -> Running -> Exited (or Created -> Exited on a start error).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ContainerState {
    Created,
    Running,
    Exited,
    Unknown,
}

/// How a container ended, in CRI terms.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExitStatus {
    pub code: i32,
    pub reason: String,
    pub message: String,
}

/// Exit code of a guest that trapped: what a shell reports for a process killed by SIGABRT,
/// and what `wasmtime run` exits with on a trap.
pub const TRAP_EXIT_CODE: i32 = 134;
/// Exit code of a guest ended by force (a stop timeout, an OOM): as for SIGKILL.
pub const KILLED_EXIT_CODE: i32 = 137;
/// 128 + SIGTERM: a process killed by SIGTERM.
pub const TERMINATED_EXIT_CODE: i32 = 143;
/// Exit code of a container that could not start, as containerd reports it.
pub const START_ERROR_EXIT_CODE: i32 = 128;
/// Exit code of a container whose end was not seen (wasmlet died while it ran), as containerd.
pub const UNKNOWN_EXIT_CODE: i32 = 255;

impl ExitStatus {
    /// The CRI reading of a guest's outcome.
    pub fn from_outcome(outcome: &Outcome) -> ExitStatus {
        let (code, reason, message) = match outcome {
            Outcome::Exited(0) => (0, "Completed", String::new()),
            Outcome::Exited(code) => (*code, "Error", String::new()),
            Outcome::Trapped(msg) => (TRAP_EXIT_CODE, "Error", msg.clone()),
            Outcome::OutOfMemory { limit } => {
                (KILLED_EXIT_CODE, "OOMKilled", format!("memory limit of {limit} bytes exceeded"))
            }
            Outcome::StartFailed(msg) => (START_ERROR_EXIT_CODE, "StartError", msg.clone()),
        };
        ExitStatus { code, reason: reason.to_string(), message }
    }

    /// A guest ended by force after `StopContainer`'s grace period.
    pub fn killed(timeout_secs: i64) -> ExitStatus {
        ExitStatus {
            code: KILLED_EXIT_CODE,
            reason: "Error".to_string(),
            message: format!("killed: still running {timeout_secs}s after the stop request"),
        }
    }

    /// A guest that cannot observe a stop, ended at the stop request as a process without a
    /// SIGTERM handler is by SIGTERM.
    pub fn terminated() -> ExitStatus {
        ExitStatus {
            code: TERMINATED_EXIT_CODE,
            reason: "Error".to_string(),
            message: "terminated: the guest cannot observe a stop request, so it ended at once".to_string(),
        }
    }

    /// A container that was running when wasmlet died.
    pub fn lost() -> ExitStatus {
        ExitStatus {
            code: UNKNOWN_EXIT_CODE,
            reason: "Unknown".to_string(),
            message: "wasmlet stopped while the container was running; its instance was lost".to_string(),
        }
    }
}

/// A container as stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ContainerRecord {
    pub id: String,
    pub sandbox_id: String,
    pub spec: ContainerSpec,
    /// The store's image id (Image.id, Container.image_id).
    pub image_id: String,
    /// A readable name for the image: its first tag, else what the request named.
    #[serde(default)]
    pub image_name: String,
    /// A digested reference to the image when one is known, else the id.
    pub image_ref: String,
    pub wasm_digest: String,
    pub kind: wasmlet_images::WasmKind,
    /// For compat images: the root filesystem (absolute) and the image config's run settings.
    #[serde(default)]
    pub image_run: Option<wasmlet_images::ImageRun>,
    /// `<log_directory>/<log_path>`, when both are set.
    pub log_file: Option<PathBuf>,
    pub state: ContainerState,
    pub created_at: i64,
    pub started_at: i64,
    pub finished_at: i64,
    pub exit: Option<ExitStatus>,
}

impl ContainerRecord {
    /// Created -> Running.
    pub fn start(&mut self, now: i64) -> Result<()> {
        match self.state {
            ContainerState::Created => {
                self.state = ContainerState::Running;
                self.started_at = now;
                Ok(())
            }
            other => Err(Error::FailedPrecondition(format!(
                "container {} is {}, only a created container can be started",
                self.id,
                state_word(other)
            ))),
        }
    }

    /// Created or Running -> Exited. The first end wins: a later one changes nothing.
    pub fn exit(&mut self, now: i64, status: ExitStatus) -> bool {
        if self.state == ContainerState::Exited {
            return false;
        }
        self.state = ContainerState::Exited;
        self.finished_at = now;
        self.exit = Some(status);
        true
    }
}

fn state_word(s: ContainerState) -> &'static str {
    match s {
        ContainerState::Created => "created",
        ContainerState::Running => "running",
        ContainerState::Exited => "exited",
        ContainerState::Unknown => "in an unknown state",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record() -> ContainerRecord {
        ContainerRecord {
            id: "c1".into(),
            sandbox_id: "s1".into(),
            spec: ContainerSpec::default(),
            image_id: "sha256:00".into(),
            image_name: "x".into(),
            image_ref: "sha256:00".into(),
            wasm_digest: "sha256:00".into(),
            kind: wasmlet_images::WasmKind::Module,
            image_run: None,
            log_file: None,
            state: ContainerState::Created,
            created_at: 1,
            started_at: 0,
            finished_at: 0,
            exit: None,
        }
    }

    #[test]
    fn container_transitions() {
        let mut c = record();
        c.start(5).unwrap();
        assert_eq!((c.state, c.started_at), (ContainerState::Running, 5));
        let err = c.start(6).unwrap_err().to_string();
        assert!(err.contains("is running, only a created container"), "{err}");
        assert!(c.exit(7, ExitStatus::from_outcome(&Outcome::Exited(3))));
        assert!(!c.exit(8, ExitStatus::killed(1)), "first end wins");
        assert_eq!(c.exit.as_ref().unwrap().code, 3);
        assert_eq!(c.finished_at, 7);
        assert!(c.start(9).is_err());
    }

    #[test]
    fn outcomes_map_to_cri_exit_codes_and_reasons() {
        let cases = [
            (Outcome::Exited(0), 0, "Completed"),
            (Outcome::Exited(42), 42, "Error"),
            (Outcome::Trapped("wasm trap: unreachable".into()), 134, "Error"),
            (Outcome::OutOfMemory { limit: 1 << 20 }, 137, "OOMKilled"),
            (Outcome::StartFailed("unknown import".into()), 128, "StartError"),
        ];
        for (outcome, code, reason) in cases {
            let s = ExitStatus::from_outcome(&outcome);
            assert_eq!((s.code, s.reason.as_str()), (code, reason), "{outcome:?}");
        }
        assert_eq!(ExitStatus::killed(2).code, 137);
        assert_eq!(ExitStatus::lost().reason, "Unknown");
    }

    #[test]
    fn sandbox_stop_is_idempotent() {
        let mut s = SandboxRecord {
            id: "s".into(),
            spec: SandboxSpec::default(),
            state: SandboxState::Ready,
            created_at: 1,
            ip: String::new(),
        };
        assert!(s.stop());
        assert!(!s.stop());
        assert_eq!(s.state, SandboxState::NotReady);
    }
}
