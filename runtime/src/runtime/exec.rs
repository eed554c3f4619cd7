//! ExecSync: a new instance in a running container's context.

use std::fs;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use crate::engine::{GuestMeter, GuestNet, GuestSpec, Outcome, Program};
use crate::logs::{GuestOutput, Stream};
use crate::model::*;
use crate::podfiles;
use crate::stdio::SessionIo;
use crate::{Error, Result};

use super::spec::*;
use super::{EXEC_OUTPUT_LIMIT, ExecOutput, Runtime};

/// What a shell reports for a command ended by ^C (128 + SIGINT).
const INTERRUPTED_EXIT_CODE: i32 = 130;

/// An exec ready to run in a container's context.
struct Prepared {
    program: Program,
    spec: GuestSpec,
    net: GuestNet,
    memory_limit: u64,
    /// The container's meter (the instance counts there) and its end (which kills it).
    container: Arc<GuestMeter>,
    container_done: Option<tokio::sync::watch::Receiver<bool>>,
}

/// Aborts a spawned guest when dropped: an exec whose caller went away is stopped.
struct AbortOnDrop<T>(tokio::task::JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl Runtime {
    /// Runs `cmd` in a running container's context (its mounts, env and working directory)
    /// as a new instance, and returns its output. `cmd[0]` resolves as a process's would (see
    /// `resolve_command`): a wasm file the container can see, or else, for a name found
    /// nowhere, the container's own program with `argv = cmd`.
    pub async fn exec_sync(&self, id: &str, cmd: Vec<String>, timeout_secs: i64) -> Result<ExecOutput> {
        let stdout = GuestOutput::capture(Stream::Stdout, EXEC_OUTPUT_LIMIT);
        let stderr = GuestOutput::capture(Stream::Stderr, EXEC_OUTPUT_LIMIT);
        let prepared = self.prepare_exec(id, &cmd, stdout.clone(), stderr.clone()).await?;
        let mut task = AbortOnDrop(self.spawn_exec(prepared));
        let outcome = if timeout_secs > 0 {
            match tokio::time::timeout(Duration::from_secs(timeout_secs as u64), wait(&mut task)).await {
                Ok(r) => r,
                Err(_) => {
                    return Err(Error::DeadlineExceeded(format!(
                        "exec {:?} in container {id} timed out after {timeout_secs}s",
                        cmd[0]
                    )));
                }
            }
        } else {
            wait(&mut task).await
        }?;
        let status = ExitStatus::from_outcome(&outcome);
        let mut err = stderr.captured();
        if !status.message.is_empty() {
            err.extend_from_slice(status.message.as_bytes());
            err.push(b'\n');
        }
        Ok(ExecOutput { stdout: stdout.captured(), stderr: err, exit_code: status.code })
    }

    /// Runs `cmd` in a running container's context with a streaming session's streams, and
    /// returns its exit code. Dropping the future stops the instance.
    pub async fn exec_session(&self, id: &str, cmd: &[String], mut io: wasmlet_streaming::Stdio) -> Result<i32> {
        let mut prepared = self
            .prepare_exec(id, cmd, GuestOutput::discard(Stream::Stdout), GuestOutput::discard(Stream::Stderr))
            .await?;
        // A wasm guest cannot ask its terminal's size: it gets the first one the client sends
        // as COLUMNS and LINES, as a shell would set them (later resizes cannot reach it).
        if io.tty
            && let Some(rx) = io.resize.as_mut()
            && let Ok(Some(size)) = tokio::time::timeout(Duration::from_millis(100), rx.recv()).await
        {
            let env = &mut prepared.spec.env;
            env.retain(|(k, _)| k != "COLUMNS" && k != "LINES");
            env.push(("COLUMNS".into(), size.width.to_string()));
            env.push(("LINES".into(), size.height.to_string()));
        }
        let (session, interrupted) = SessionIo::new(io);
        prepared.spec.session = Some(session);
        let mut task = AbortOnDrop(self.spawn_exec(prepared));
        let interrupted = async {
            if let Some(rx) = interrupted
                && rx.await.is_ok()
            {
                return;
            }
            std::future::pending::<()>().await
        };
        let outcome = tokio::select! {
            outcome = wait(&mut task) => outcome?,
            // ^C on the terminal: the command ends as a process killed by SIGINT does.
            _ = interrupted => Outcome::Exited(INTERRUPTED_EXIT_CODE),
        };
        let status = ExitStatus::from_outcome(&outcome);
        if let Outcome::StartFailed(msg) = &outcome {
            return Err(Error::InvalidArgument(format!("exec {:?} in container {id}: {msg}", cmd[0])));
        }
        if !status.message.is_empty() {
            tracing::info!(container = id, command = ?cmd, message = %status.message, "exec ended");
        }
        Ok(status.code)
    }

    async fn prepare_exec(
        &self,
        id: &str,
        cmd: &[String],
        stdout: GuestOutput,
        stderr: GuestOutput,
    ) -> Result<Prepared> {
        if cmd.is_empty() {
            return Err(Error::InvalidArgument(format!("exec in container {id}: empty command")));
        }
        let (record, program, hostname, net, container, container_done) = {
            let state = self.state();
            let entry = state.containers.get(id).ok_or_else(|| Error::container_not_found(id))?;
            if entry.record.state != ContainerState::Running {
                return Err(Error::FailedPrecondition(format!("container {id} is not running")));
            }
            let hostname = state.hostname(&entry.record.sandbox_id);
            let net = state.guest_net(&entry.record.sandbox_id)?;
            let done = entry.live.as_ref().map(|l| l.done.clone());
            (entry.record.clone(), entry.program.clone(), hostname, net, entry.meter.clone(), done)
        };
        let pod_dir = podfiles::pod_dir(&self.inner.root, &self.inner.run_dir, &record.sandbox_id);
        let route = self.net_route(&record.sandbox_id, &net);
        let mut spec = guest_spec(&record, &pod_dir, &route, &hostname, net.clone(), stdout, stderr)?;
        spec.args = cmd.to_vec();
        let found = resolve_command(&spec.preopens, &spec.env, spec.cwd.as_deref(), &cmd[0])
            .map_err(|e| Error::InvalidArgument(format!("exec in container {id}: {e}")))?;
        let program = match found {
            Some(path) => {
                let rt = self.clone();
                let what = format!("{} in container {id}", cmd[0]);
                tokio::task::spawn_blocking(move || rt.program_from_file(&what, &path))
                    .await
                    .map_err(|e| Error::Internal(format!("compile task: {e}")))??
            }
            None => program.ok_or_else(|| Error::Internal(format!("container {id} runs without a program")))?,
        };
        if matches!(program, Program::Http(_)) {
            return Err(Error::InvalidArgument(format!(
                "exec in container {id}: a wasi:http handler is not a command; name a .wasm file the \
                 container can see"
            )));
        }
        let memory_limit = record.spec.resources.as_ref().map_or(0, |r| r.memory_limit_in_bytes.max(0) as u64);
        Ok(Prepared { program, spec, net, memory_limit, container, container_done })
    }

    /// Starts the instance. It ends with its container, killed (137) as a process in a
    /// stopped container is.
    fn spawn_exec(&self, p: Prepared) -> tokio::task::JoinHandle<Outcome> {
        let meter = Arc::new(GuestMeter::exec_in(p.container));
        meter.memory_limit.store(p.memory_limit, Ordering::Relaxed);
        let guest = self.inner.engine.run(&p.program, p.spec, meter);
        let mut done = p.container_done;
        self.inner.engine.spawn_for(&p.net, async move {
            let container_ended = async {
                match done.as_mut() {
                    Some(d) => {
                        let _ = d.wait_for(|ended| *ended).await;
                    }
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                outcome = guest => outcome,
                _ = container_ended => Outcome::Exited(KILLED_EXIT_CODE),
            }
        })
    }

    pub(super) fn program_from_file(&self, what: &str, path: &Path) -> Result<Program> {
        let bytes = fs::read(path).map_err(|e| Error::InvalidArgument(format!("{what}: {e}")))?;
        let kind = wasmlet_images::WasmKind::detect(what, &bytes)?;
        let digest = wasmlet_images::sha256_digest(&bytes);
        self.inner.engine.program(what, &digest, kind, || Ok(bytes))
    }
}

/// The outcome of a spawned exec, waited for through its guard (so a timeout or a dropped
/// caller still aborts it).
async fn wait(task: &mut AbortOnDrop<Outcome>) -> Result<Outcome> {
    (&mut task.0).await.map_err(|e| Error::Internal(format!("exec task: {e}")))
}
