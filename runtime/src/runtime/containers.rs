//! Containers: create (image, files, compiled code), start, the exit record, stop (the
//! StopContainer rule), remove, usage and resources.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};
use std::time::Duration;

use tokio::sync::{oneshot, watch};

use crate::engine::{GuestMeter, GuestNet, GuestSpec, Outcome, Program};
use crate::journal::Change;
use crate::logs::{GuestOutput, LogFile, Stream};
use crate::model::*;
use crate::podfiles;
use crate::{Error, Result};

use super::attach::Attachable;
use super::spec::*;
use super::{Entry, EventKind, Inner, Live, Runtime, START_ERROR_EXIT_CODE, Usage, new_id, now_nanos};

impl Runtime {
    /// Creates a container in a ready sandbox: resolves its image, checks its log path and
    /// mounts, and has its code compiled (or found in the cache) so the start is quick.
    pub async fn create_container(&self, sandbox_id: &str, spec: ContainerSpec) -> Result<String> {
        let sandbox = self.sandbox(sandbox_id)?;
        if sandbox.state != SandboxState::Ready {
            return Err(Error::FailedPrecondition(format!(
                "pod sandbox {sandbox_id} is not ready: containers cannot be created in it"
            )));
        }
        let name = &spec.metadata.name;
        if name.is_empty() {
            return Err(Error::InvalidArgument("container metadata needs a name".to_string()));
        }
        if let Some(r) = &spec.resources {
            r.check().map_err(|e| Error::InvalidArgument(format!("container {name:?}: resources: {e}")))?;
        }
        let image = self.find_image(&spec.image.image)?;
        let log_file = log_file(&sandbox.spec, &spec)?;
        let id = new_id();
        let pod_dir = podfiles::pod_dir(&self.inner.root, &self.inner.run_dir, sandbox_id);
        let files = file_mounts(&spec)?;
        let etc =
            image.run.as_ref().map(|r| self.inner.images.root().join(&r.rootfs).join("etc")).filter(|e| e.is_dir());
        if !files.is_empty() || etc.is_some() {
            podfiles::place_file_mounts(&pod_dir.files.join(&id), &pod_dir.etc, etc.as_deref(), &files)?;
        }
        // Compiling (or loading from disk) blocks: off the executor, unless already in memory.
        let program = match self.inner.engine.cached_program(&image.wasm_digest) {
            Some(p) => p,
            None => {
                let rt = self.clone();
                let image = image.clone();
                tokio::task::spawn_blocking(move || rt.program_for(&image))
                    .await
                    .map_err(|e| Error::Internal(format!("compile task: {e}")))??
            }
        };
        let mut state = self.state();
        if !state.sandboxes.contains_key(sandbox_id) {
            return Err(Error::sandbox_not_found(sandbox_id));
        }
        let taken = state.containers.values().any(|e| {
            e.record.sandbox_id == sandbox_id
                && e.record.spec.metadata.name == spec.metadata.name
                && e.record.spec.metadata.attempt == spec.metadata.attempt
        });
        if taken {
            return Err(Error::AlreadyExists(format!(
                "container {name:?} attempt {} already exists in pod sandbox {sandbox_id}",
                spec.metadata.attempt
            )));
        }
        let record = ContainerRecord {
            id,
            sandbox_id: sandbox_id.to_string(),
            image_ref: image.repo_digests.first().cloned().unwrap_or_else(|| image.id.clone()),
            image_id: image.id.clone(),
            image_name: image.repo_tags.first().cloned().unwrap_or_else(|| spec.image.image.clone()),
            wasm_digest: image.wasm_digest.clone(),
            kind: image.kind,
            image_run: image.run.clone().map(|mut r| {
                r.rootfs = self.inner.images.root().join(&r.rootfs).display().to_string();
                r
            }),
            spec,
            log_file,
            state: ContainerState::Created,
            created_at: now_nanos(),
            started_at: 0,
            finished_at: 0,
            exit: None,
        };
        let id = record.id.clone();
        let meter = Arc::new(GuestMeter::default());
        if let Some(r) = &record.spec.resources {
            meter.set_resources(r);
        }
        let change = Change::Container(Box::new(record.clone()));
        state.containers.insert(
            id.clone(),
            Entry { record, meter, program: Some(program), live: None, cpu_window: Default::default() },
        );
        if let Err(e) = self.journal(&state, change) {
            state.containers.remove(&id);
            return Err(e);
        }
        let record = &state.containers[&id].record;
        tracing::info!(container = %id, sandbox = %sandbox_id, name = %record.spec.metadata.name, "container created");
        self.emit(record, EventKind::Created);
        Ok(id)
    }

    /// Starts a created container.
    pub fn start_container(&self, id: &str) -> Result<()> {
        // Moved to Running under the state lock (a second start is refused), prepared without
        // it (compiled code may load from disk, the log file opens, a wasi:http listener binds
        // inside the pod's namespace), then spawned under it again.
        let (record, program, hostname, net) = {
            let mut state = self.state();
            let entry = state.containers.get(id).ok_or_else(|| Error::container_not_found(id))?;
            let (hostname, net) = (state.hostname(&entry.record.sandbox_id), state.guest_net(&entry.record.sandbox_id));
            let entry = state.containers.get_mut(id).ok_or_else(|| Error::container_not_found(id))?;
            entry.record.start(now_nanos())?;
            (entry.record.clone(), entry.program.clone(), hostname, net)
        };
        let prepared = net.and_then(|net| self.prepare_start(&record, program, &hostname, net)).and_then(
            |(program, mut spec, log, attach)| {
                if matches!(program, Program::Http(_)) {
                    spec.http_listener = crate::http::bind(&spec)?;
                }
                Ok((program, spec, log, attach))
            },
        );
        let mut state = self.state();
        // Removed meanwhile: nothing to start. Stopped meanwhile: it ended before it ran.
        let entry = state.containers.get_mut(id).ok_or_else(|| Error::container_not_found(id))?;
        if entry.record.state != ContainerState::Running {
            return Ok(());
        }
        let (program, spec, log, attach) = match prepared {
            Ok(p) => p,
            Err(e) => {
                let status = ExitStatus {
                    code: START_ERROR_EXIT_CODE,
                    reason: "StartError".to_string(),
                    message: e.to_string(),
                };
                entry.record.exit(now_nanos(), status);
                let record = entry.record.clone();
                self.journal(&state, Change::Container(Box::new(record.clone())))?;
                self.emit(&record, EventKind::Stopped);
                return Err(e);
            }
        };
        entry.program = Some(program.clone());
        let meter = entry.meter.clone();
        let record = entry.record.clone();
        if let Err(e) = self.journal(&state, Change::Container(Box::new(record.clone()))) {
            if let Some(entry) = state.containers.get_mut(id) {
                entry.record.exit(now_nanos(), ExitStatus::from_outcome(&Outcome::StartFailed(e.to_string())));
            }
            return Err(e);
        }
        let (kill_tx, kill_rx) = oneshot::channel::<ExitStatus>();
        let (done_tx, done_rx) = watch::channel(false);
        let (stop_tx, stop_rx) = watch::channel(false);
        let mut spec = spec;
        spec.stop = Some(stop_rx);
        let (stdout, stderr) = (spec.stdout.clone(), spec.stderr.clone());
        let net = spec.net.clone();
        let guest = self.inner.engine.run(&program, spec, meter);
        let weak: Weak<Inner> = Arc::downgrade(&self.inner);
        let cid = id.to_string();
        self.inner.engine.spawn_for(&net, async move {
            let status = tokio::select! {
                outcome = guest => ExitStatus::from_outcome(&outcome),
                Ok(status) = kill_rx => status,
            };
            stdout.finish();
            stderr.finish();
            if let Some(inner) = weak.upgrade() {
                Runtime { inner }.record_exit(&cid, status);
            }
            let _ = done_tx.send(true);
        });
        if let Some(entry) = state.containers.get_mut(id) {
            entry.live = Some(Live { kill: Some(kill_tx), stop: stop_tx, done: done_rx, log, attach });
        }
        tracing::info!(container = %id, "container started");
        self.emit(&record, EventKind::Started);
        Ok(())
    }

    /// Everything a start needs; an error here is a StartError.
    pub(super) fn prepare_start(
        &self,
        rec: &ContainerRecord,
        program: Option<Program>,
        hostname: &str,
        net: GuestNet,
    ) -> Result<(Program, GuestSpec, Option<Arc<LogFile>>, Attachable)> {
        let program = match program {
            Some(p) => p,
            // After a restart: the compiled-code cache has it, so this does not compile.
            None => self.program_for(&self.find_image(&rec.image_id)?)?,
        };
        let log = match &rec.log_file {
            Some(path) => Some(
                LogFile::open_bounded(path, self.inner.options.log_bound)
                    .map_err(|e| Error::FailedPrecondition(format!("open log file {}: {e}", path.display())))?,
            ),
            None => None,
        };
        let output = |stream| match &log {
            Some(l) => GuestOutput::log(stream, l.clone()),
            None => GuestOutput::discard(stream),
        };
        let pod_dir = podfiles::pod_dir(&self.inner.root, &self.inner.run_dir, &rec.sandbox_id);
        let route = self.net_route(&rec.sandbox_id, &net);
        let (attach, stdin) = Attachable::new(rec.spec.stdin, rec.spec.stdin_once, rec.spec.tty);
        let tty = rec.spec.tty;
        let stdout = output(Stream::Stdout).tapped(attach.stdout.clone()).terminal(tty);
        let stderr = output(Stream::Stderr).tapped(attach.stderr.clone()).terminal(tty);
        let mut spec = guest_spec(rec, &pod_dir, &route, hostname, net, stdout, stderr)?;
        spec.stdin = stdin;
        if spec.args.is_empty() {
            spec.args.push(rec.spec.metadata.name.clone());
        }
        Ok((program, spec, log, attach))
    }

    pub(super) fn record_exit(&self, id: &str, status: ExitStatus) {
        let mut state = self.state();
        let Some(entry) = state.containers.get_mut(id) else { return };
        if let Some(live) = entry.live.as_mut() {
            live.kill = None;
        }
        tracing::info!(container = %id, code = status.code, reason = %status.reason, "container exited");
        if entry.record.exit(now_nanos(), status) {
            let record = entry.record.clone();
            if let Err(e) = self.journal(&state, Change::Container(Box::new(record.clone()))) {
                tracing::error!(container = %id, error = %e, "cannot record the exit");
            }
            self.emit(&record, EventKind::Stopped);
        }
    }

    /// Stops a running container: it has `timeout_secs` to end by itself, then it is killed
    /// (exit code 137). Stopping a container that is not running succeeds and changes nothing.
    pub async fn stop_container(&self, id: &str, timeout_secs: i64) -> Result<()> {
        // Wasm has no signals: a guest is like a process without a SIGTERM handler, which dies
        // at once on SIGTERM (143), unless it can observe the stop: a wasi:http handler drains,
        // a guest that listens on a socket has its listeners closed. Those get the timeout,
        // counted from the request.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(timeout_secs.max(0) as u64);
        let mut listeners = None;
        let mut done = {
            let mut state = self.state();
            let sandbox =
                state.containers.get(id).ok_or_else(|| Error::container_not_found(id))?.record.sandbox_id.clone();
            let ns = state.nets.get(&sandbox).and_then(|n| n.ns.clone());
            let entry = state.containers.get_mut(id).ok_or_else(|| Error::container_not_found(id))?;
            let http = matches!(entry.program, Some(Program::Http(_)));
            let listening = !http && entry.meter.listening.load(Ordering::Relaxed);
            let observes = http || listening;
            match &mut entry.live {
                Some(live) if entry.record.state == ContainerState::Running => {
                    if !live.stop.send_replace(true) && listening && timeout_secs > 0 {
                        let ports = entry.meter.listen_ports.lock().unwrap_or_else(|e| e.into_inner()).clone();
                        listeners = Some((ns, ports));
                    }
                    if !observes
                        && timeout_secs > 0
                        && let Some(kill) = live.kill.take()
                    {
                        let _ = kill.send(ExitStatus::terminated());
                    }
                    live.done.clone()
                }
                // Being started (prepared without the lock): it ends before it runs.
                None if entry.record.state == ContainerState::Running => {
                    let status = if timeout_secs > 0 { ExitStatus::terminated() } else { ExitStatus::killed(0) };
                    if entry.record.exit(now_nanos(), status) {
                        let record = entry.record.clone();
                        self.journal(&state, Change::Container(Box::new(record.clone())))?;
                        self.emit(&record, EventKind::Stopped);
                    }
                    return Ok(());
                }
                _ => return Ok(()),
            }
        };
        // A server's listeners close, as a process's do when it is asked to stop: its accept
        // fails, and one that handles that can finish within the timeout.
        if let Some((ns, ports)) = listeners {
            let closed = tokio::task::spawn_blocking(move || crate::net::listeners::close(ns.as_ref(), ports)).await;
            match closed {
                Ok(Ok(n)) => tracing::info!(container = %id, listeners = n, "listeners closed at the stop"),
                Ok(Err(e)) => tracing::warn!(container = %id, error = %e, "close the listeners at the stop"),
                Err(e) => tracing::warn!(container = %id, error = %e, "close the listeners at the stop"),
            }
        }
        let ended = timeout_secs > 0 && tokio::time::timeout_at(deadline, done.wait_for(|d| *d)).await.is_ok();
        if !ended {
            // Whichever stop runs out of time first kills; a shorter later stop is not held up
            // by a longer earlier one.
            let kill = self.state().containers.get_mut(id).and_then(|e| e.live.as_mut()).and_then(|l| l.kill.take());
            if let Some(kill) = kill {
                let _ = kill.send(ExitStatus::killed(timeout_secs.max(0)));
            }
            let _ = done.wait_for(|d| *d).await;
        }
        Ok(())
    }

    /// Removes a container, ending it first if it runs. Idempotent.
    pub async fn remove_container(&self, id: &str) -> Result<()> {
        match self.stop_container(id, 0).await {
            Err(Error::NotFound { .. }) => return Ok(()),
            other => other?,
        }
        let mut state = self.state();
        if let Some(entry) = state.containers.remove(id) {
            let files =
                podfiles::pod_dir(&self.inner.root, &self.inner.run_dir, &entry.record.sandbox_id).files.join(id);
            podfiles::remove_files(&files);
            self.journal(&state, Change::ContainerRemoved(id.to_string()))?;
            tracing::info!(container = %id, "container removed");
            self.emit(&entry.record, EventKind::Deleted);
        }
        Ok(())
    }

    /// One container.
    pub fn container(&self, id: &str) -> Result<ContainerRecord> {
        self.state().containers.get(id).map(|e| e.record.clone()).ok_or_else(|| Error::container_not_found(id))
    }

    /// Every container.
    pub fn containers(&self) -> Vec<ContainerRecord> {
        self.containers_where(|_| true)
    }

    /// The containers `keep` accepts, filtered before they are copied.
    pub fn containers_where(&self, keep: impl Fn(&ContainerRecord) -> bool) -> Vec<ContainerRecord> {
        self.state().containers.values().filter(|e| keep(&e.record)).map(|e| e.record.clone()).collect()
    }

    /// Resource use of a container now.
    pub fn usage(&self, id: &str) -> Result<Usage> {
        let mut state = self.state();
        let entry = state.containers.get_mut(id).ok_or_else(|| Error::container_not_found(id))?;
        let now = now_nanos();
        let cpu = entry.meter.cpu_nanos.load(Ordering::Relaxed);
        let nano_cores = entry.cpu_window.rate(now, cpu);
        let running = entry.record.state == ContainerState::Running;
        let limit = entry.meter.memory_limit.load(Ordering::Relaxed);
        Ok(Usage {
            timestamp: now,
            cpu_nanos: cpu,
            nano_cores,
            // Its sockets' queues count, as a cgroup charges them (read by the stats calls,
            // Runtime::sample_socket_queues).
            memory_bytes: if running {
                entry.meter.memory_bytes.load(Ordering::Relaxed) + entry.meter.socket_bytes.load(Ordering::Relaxed)
            } else {
                0
            },
            memory_limit: (limit > 0).then_some(limit),
        })
    }

    /// Changes a container's resources: a new CPU quota or shares apply from the running
    /// guest's next poll, a new memory limit from its next memory growth.
    pub fn update_resources(&self, id: &str, resources: Resources) -> Result<()> {
        resources.check().map_err(|e| Error::InvalidArgument(format!("container {id}: resources: {e}")))?;
        let mut state = self.state();
        let entry = state.containers.get_mut(id).ok_or_else(|| Error::container_not_found(id))?;
        if entry.record.state == ContainerState::Exited {
            return Err(Error::FailedPrecondition(format!("container {id} has exited: its resources cannot change")));
        }
        entry.meter.set_resources(&resources);
        entry.record.spec.resources = Some(resources);
        let change = Change::Container(Box::new(entry.record.clone()));
        self.journal(&state, change)
    }

    /// Reopens a running container's log file after the kubelet rotated it.
    pub fn reopen_log(&self, id: &str) -> Result<()> {
        let state = self.state();
        let entry = state.containers.get(id).ok_or_else(|| Error::container_not_found(id))?;
        match (&entry.live, entry.record.state) {
            (Some(Live { log: Some(log), .. }), ContainerState::Running) => {
                log.reopen().map_err(|e| Error::Internal(format!("reopen log of container {id}: {e}")))
            }
            (_, ContainerState::Running) => Ok(()),
            _ => Err(Error::FailedPrecondition(format!("container {id} is not running: its log is closed"))),
        }
    }
}
