//! An in-memory [`RuntimeClient`] for the pod worker's unit tests: sandboxes and containers
//! as plain records, a script per container name saying how its runs end, and a log of the
//! calls made. Its times come from [`clock::now`], so tests on a paused tokio clock see
//! back-offs and grace periods pass in no time.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use cri_proto::v1 as cri;
use futures_util::StreamExt;
use futures_util::stream::BoxStream;
use tokio::sync::broadcast;

use crate::clock;
use crate::cri::{self as kcri, RuntimeClient, SandboxNetwork};
use crate::model::{Observed, Sandbox};

/// How a container's runs end.
#[derive(Debug, Clone, Copy)]
pub enum Script {
    /// Runs until stopped.
    Serve,
    /// Exits by itself with this code after this long.
    Exit(i32, Duration),
}

/// One call the worker made, as the tests read it back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Call {
    RunSandbox,
    Create(String),
    Start(String),
    /// A container stopped with this grace period (seconds).
    Stop(String, i64),
    Remove(String),
    StopSandbox,
    RemoveSandbox,
    Pull(String),
    Exec(String, Vec<String>),
}

/// A call and when (on the test's clock) it was made.
#[derive(Debug, Clone)]
pub struct Logged {
    pub call: Call,
    pub at: tokio::time::Instant,
}

#[derive(Debug, Clone)]
struct Container {
    id: String,
    sandbox: String,
    name: String,
    config: cri::ContainerConfig,
    state: cri::ContainerState,
    created_at: i64,
    started_at: i64,
    finished_at: i64,
    exit_code: i32,
    reason: String,
}

#[derive(Debug, Clone)]
struct SandboxRecord {
    id: String,
    uid: String,
    attempt: u32,
    ready: bool,
    created_at: i64,
    config: cri::PodSandboxConfig,
}

#[derive(Default)]
struct State {
    next: u64,
    sandboxes: Vec<SandboxRecord>,
    containers: Vec<Container>,
    images: HashSet<String>,
    scripts: HashMap<String, Script>,
    /// Exit codes of exec commands by container name (0 when not set).
    exec_codes: HashMap<String, i32>,
    calls: Vec<Logged>,
}

pub struct FakeRuntime {
    state: Mutex<State>,
    events: broadcast::Sender<String>,
    me: Weak<FakeRuntime>,
}

fn nanos() -> i64 {
    clock::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_nanos() as i64
}

fn not_found(what: &str, id: &str) -> tonic::Status {
    tonic::Status::not_found(format!("{what} {id} not found"))
}

impl FakeRuntime {
    pub fn new() -> Arc<FakeRuntime> {
        Arc::new_cyclic(|me| FakeRuntime {
            state: Mutex::default(),
            events: broadcast::channel(1024).0,
            me: me.clone(),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// How runs of containers named `name` end (default: they serve until stopped).
    pub fn script(&self, name: &str, script: Script) {
        self.lock().scripts.insert(name.to_string(), script);
    }

    /// The exit code exec commands in containers named `name` give.
    pub fn exec_code(&self, name: &str, code: i32) {
        self.lock().exec_codes.insert(name.to_string(), code);
    }

    pub fn add_image(&self, image: &str) {
        self.lock().images.insert(image.to_string());
    }

    pub fn calls(&self) -> Vec<Logged> {
        self.lock().calls.clone()
    }

    /// When each call matching `f` was made.
    pub fn times(&self, f: impl Fn(&Call) -> bool) -> Vec<tokio::time::Instant> {
        self.lock().calls.iter().filter(|l| f(&l.call)).map(|l| l.at).collect()
    }

    pub fn sandbox_count(&self) -> usize {
        self.lock().sandboxes.len()
    }

    pub fn container_count(&self) -> usize {
        self.lock().containers.len()
    }

    fn log(&self, call: Call) {
        self.lock().calls.push(Logged { call, at: tokio::time::Instant::now() });
    }

    /// Ends the container's run (if it still runs) with `code`, and tells the event stream.
    fn exit(&self, id: &str, code: i32, reason: &str) {
        let sandbox = {
            let mut s = self.lock();
            let Some(c) = s.containers.iter_mut().find(|c| c.id == id) else { return };
            if c.state != cri::ContainerState::ContainerRunning {
                return;
            }
            c.state = cri::ContainerState::ContainerExited;
            c.finished_at = nanos();
            c.exit_code = code;
            c.reason = reason.to_string();
            c.sandbox.clone()
        };
        let _ = self.events.send(sandbox);
    }

    fn status(&self, c: &Container) -> cri::ContainerStatus {
        cri::ContainerStatus {
            id: c.id.clone(),
            metadata: c.config.metadata.clone(),
            state: c.state as i32,
            created_at: c.created_at,
            started_at: c.started_at,
            finished_at: c.finished_at,
            exit_code: c.exit_code,
            reason: c.reason.clone(),
            image: c.config.image.clone(),
            image_ref: c.config.image.as_ref().map(|i| i.image.clone()).unwrap_or_default(),
            labels: c.config.labels.clone(),
            annotations: c.config.annotations.clone(),
            ..Default::default()
        }
    }
}

#[async_trait::async_trait]
impl RuntimeClient for FakeRuntime {
    async fn observe(&self, uid: &str) -> Result<Observed, tonic::Status> {
        let s = self.lock();
        let newest = s.sandboxes.iter().filter(|b| b.uid == uid).max_by_key(|b| (b.attempt, b.created_at));
        let sandbox = newest.map(|b| Sandbox {
            id: b.id.clone(),
            ready: b.ready,
            ip: if b.ready { "10.0.0.2".into() } else { String::new() },
            attempt: b.attempt,
        });
        let ids: HashSet<&str> = s.sandboxes.iter().filter(|b| b.uid == uid).map(|b| b.id.as_str()).collect();
        let instances =
            s.containers.iter().filter(|c| ids.contains(c.sandbox.as_str())).map(|c| kcri::instance(&self.status(c)));
        Ok(Observed { sandbox, instances: instances.collect() })
    }

    async fn sandbox_network(&self, id: &str) -> Result<SandboxNetwork, tonic::Status> {
        let s = self.lock();
        let b = s.sandboxes.iter().find(|b| b.id == id).ok_or_else(|| not_found("sandbox", id))?;
        Ok(SandboxNetwork { ip: if b.ready { "10.0.0.2".into() } else { String::new() }, netns: None, inside: None })
    }

    async fn sandboxes(&self, uid: Option<&str>) -> Result<Vec<cri::PodSandbox>, tonic::Status> {
        let s = self.lock();
        let all = s.sandboxes.iter().filter(|b| uid.is_none_or(|u| u == b.uid));
        Ok(all
            .map(|b| cri::PodSandbox {
                id: b.id.clone(),
                metadata: b.config.metadata.clone(),
                state: if b.ready { cri::PodSandboxState::SandboxReady } else { cri::PodSandboxState::SandboxNotready }
                    as i32,
                created_at: b.created_at,
                labels: b.config.labels.clone(),
                ..Default::default()
            })
            .collect())
    }

    async fn run_sandbox(&self, config: cri::PodSandboxConfig) -> Result<String, tonic::Status> {
        self.log(Call::RunSandbox);
        let mut s = self.lock();
        s.next += 1;
        let id = format!("sandbox-{}", s.next);
        let uid = config.metadata.as_ref().map(|m| m.uid.clone()).unwrap_or_default();
        let attempt = config.metadata.as_ref().map_or(0, |m| m.attempt);
        s.sandboxes.push(SandboxRecord { id: id.clone(), uid, attempt, ready: true, created_at: nanos(), config });
        Ok(id)
    }

    async fn stop_sandbox(&self, id: &str) -> Result<(), tonic::Status> {
        self.log(Call::StopSandbox);
        let running: Vec<String> = {
            let mut s = self.lock();
            let b = s.sandboxes.iter_mut().find(|b| b.id == id).ok_or_else(|| not_found("sandbox", id))?;
            b.ready = false;
            s.containers.iter().filter(|c| c.sandbox == id).map(|c| c.id.clone()).collect()
        };
        for c in running {
            self.exit(&c, 137, "Error");
        }
        Ok(())
    }

    async fn remove_sandbox(&self, id: &str) -> Result<(), tonic::Status> {
        self.log(Call::RemoveSandbox);
        let mut s = self.lock();
        s.sandboxes.retain(|b| b.id != id);
        s.containers.retain(|c| c.sandbox != id);
        Ok(())
    }

    async fn create_container(
        &self,
        sandbox_id: &str,
        config: cri::ContainerConfig,
        _sandbox: cri::PodSandboxConfig,
    ) -> Result<String, tonic::Status> {
        let name = config.metadata.as_ref().map(|m| m.name.clone()).unwrap_or_default();
        self.log(Call::Create(name.clone()));
        let mut s = self.lock();
        if !s.sandboxes.iter().any(|b| b.id == sandbox_id && b.ready) {
            return Err(tonic::Status::failed_precondition(format!("sandbox {sandbox_id} is not ready")));
        }
        s.next += 1;
        let id = format!("{name}-{}", s.next);
        s.containers.push(Container {
            id: id.clone(),
            sandbox: sandbox_id.to_string(),
            name,
            config,
            state: cri::ContainerState::ContainerCreated,
            created_at: nanos(),
            started_at: 0,
            finished_at: 0,
            exit_code: 0,
            reason: String::new(),
        });
        Ok(id)
    }

    async fn start_container(&self, id: &str) -> Result<(), tonic::Status> {
        let name = {
            let mut s = self.lock();
            let c = s.containers.iter_mut().find(|c| c.id == id).ok_or_else(|| not_found("container", id))?;
            c.state = cri::ContainerState::ContainerRunning;
            c.started_at = nanos();
            c.name.clone()
        };
        self.log(Call::Start(name.clone()));
        let script = self.lock().scripts.get(&name).copied().unwrap_or(Script::Serve);
        if let Script::Exit(code, after) = script
            && let Some(me) = self.me.upgrade()
        {
            let id = id.to_string();
            tokio::spawn(async move {
                tokio::time::sleep(after).await;
                me.exit(&id, code, if code == 0 { "Completed" } else { "Error" });
            });
        }
        Ok(())
    }

    async fn stop_container(&self, id: &str, grace: i64) -> Result<(), tonic::Status> {
        let name = self.lock().containers.iter().find(|c| c.id == id).map(|c| c.name.clone());
        let name = name.ok_or_else(|| not_found("container", id))?;
        self.log(Call::Stop(name, grace));
        // A plain guest cannot observe SIGTERM: it ends at once, as a process without a
        // handler does.
        self.exit(id, 143, "Error");
        Ok(())
    }

    async fn remove_container(&self, id: &str) -> Result<(), tonic::Status> {
        let name = self.lock().containers.iter().find(|c| c.id == id).map(|c| c.name.clone());
        self.log(Call::Remove(name.unwrap_or_default()));
        self.lock().containers.retain(|c| c.id != id);
        Ok(())
    }

    async fn exec_sync(
        &self,
        id: &str,
        cmd: Vec<String>,
        _timeout: Duration,
    ) -> Result<cri::ExecSyncResponse, tonic::Status> {
        let (name, code) = {
            let s = self.lock();
            let c = s.containers.iter().find(|c| c.id == id).ok_or_else(|| not_found("container", id))?;
            if c.state != cri::ContainerState::ContainerRunning {
                return Err(tonic::Status::failed_precondition(format!("container {id} is not running")));
            }
            (c.name.clone(), s.exec_codes.get(&c.name).copied().unwrap_or(0))
        };
        self.log(Call::Exec(name, cmd));
        Ok(cri::ExecSyncResponse { exit_code: code, ..Default::default() })
    }

    async fn pull(
        &self,
        image: &str,
        _auth: Option<cri::AuthConfig>,
        _sandbox: Option<cri::PodSandboxConfig>,
    ) -> Result<String, tonic::Status> {
        self.log(Call::Pull(image.to_string()));
        self.lock().images.insert(image.to_string());
        Ok(image.to_string())
    }

    async fn image_status(&self, image: &str) -> Result<Option<(String, u64)>, tonic::Status> {
        Ok(self.lock().images.contains(image).then(|| (image.to_string(), 1000)))
    }

    async fn readiness_problem(&self) -> Option<String> {
        None
    }

    async fn container_stats(&self) -> Result<Vec<cri::ContainerStats>, tonic::Status> {
        Ok(Vec::new())
    }

    async fn images(&self) -> Result<Vec<crate::imagegc::Image>, tonic::Status> {
        let st = self.lock();
        Ok(st.images.iter().map(|id| crate::imagegc::Image { id: id.clone(), size: 1000, pinned: false }).collect())
    }

    async fn images_in_use(&self) -> Result<HashSet<String>, tonic::Status> {
        Ok(self.lock().containers.iter().map(|c| c.config.image.clone().unwrap_or_default().image).collect())
    }

    async fn remove_image(&self, id: &str) -> Result<(), tonic::Status> {
        self.lock().images.remove(id);
        Ok(())
    }

    async fn sandbox_events(&self) -> Result<BoxStream<'static, String>, tonic::Status> {
        let rx = self.events.subscribe();
        Ok(futures_util::stream::unfold(rx, |mut rx| async move {
            loop {
                match rx.recv().await {
                    Ok(id) => return Some((id, rx)),
                    Err(broadcast::error::RecvError::Lagged(_)) => continue,
                    Err(broadcast::error::RecvError::Closed) => return None,
                }
            }
        })
        .boxed())
    }
}
