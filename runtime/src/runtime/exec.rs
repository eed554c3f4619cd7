//! ExecSync: a new instance in a running container's context.

use std::fs;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use crate::engine::{GuestMeter, Program};
use crate::logs::{GuestOutput, Stream};
use crate::model::*;
use crate::podfiles;
use crate::{Error, Result};

use super::spec::*;
use super::{EXEC_OUTPUT_LIMIT, ExecOutput, Runtime};

impl Runtime {
    /// Runs `cmd` in a running container's context (its mounts, env and working directory)
    /// as a new instance, and returns its output. `cmd[0]` names a `.wasm` file the container
    /// can see, or else the container's own program runs with `argv = cmd`.
    pub async fn exec_sync(&self, id: &str, cmd: Vec<String>, timeout_secs: i64) -> Result<ExecOutput> {
        if cmd.is_empty() {
            return Err(Error::InvalidArgument(format!("exec in container {id}: empty command")));
        }
        let (record, program, hostname, net) = {
            let state = self.state();
            let entry = state.containers.get(id).ok_or_else(|| Error::container_not_found(id))?;
            if entry.record.state != ContainerState::Running {
                return Err(Error::FailedPrecondition(format!("container {id} is not running")));
            }
            let hostname = state.hostname(&entry.record.sandbox_id);
            let net = state.guest_net(&entry.record.sandbox_id)?;
            (entry.record.clone(), entry.program.clone(), hostname, net)
        };
        let stdout = GuestOutput::capture(Stream::Stdout, EXEC_OUTPUT_LIMIT);
        let stderr = GuestOutput::capture(Stream::Stderr, EXEC_OUTPUT_LIMIT);
        let pod_dir = podfiles::pod_dir(&self.inner.root, &self.inner.run_dir, &record.sandbox_id);
        let dns = self.dns_route(&net);
        let mut spec = guest_spec(&record, &pod_dir, &dns, &hostname, net.clone(), stdout.clone(), stderr.clone())?;
        spec.args = cmd.clone();
        let program = match wasm_in_container(&spec.preopens, &cmd[0]) {
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
        let meter = Arc::new(GuestMeter::default());
        meter.memory_limit.store(
            record.spec.resources.as_ref().map_or(0, |r| r.memory_limit_in_bytes.max(0) as u64),
            Ordering::Relaxed,
        );
        let task = self.inner.engine.spawn_for(&net, self.inner.engine.run(&program, spec, meter));
        let abort = task.abort_handle();
        let outcome = if timeout_secs > 0 {
            match tokio::time::timeout(Duration::from_secs(timeout_secs as u64), task).await {
                Ok(r) => r,
                Err(_) => {
                    abort.abort();
                    return Err(Error::DeadlineExceeded(format!(
                        "exec {:?} in container {id} timed out after {timeout_secs}s",
                        cmd[0]
                    )));
                }
            }
        } else {
            task.await
        }
        .map_err(|e| Error::Internal(format!("exec task: {e}")))?;
        let status = ExitStatus::from_outcome(&outcome);
        let mut err = stderr.captured();
        if !status.message.is_empty() {
            err.extend_from_slice(status.message.as_bytes());
            err.push(b'\n');
        }
        Ok(ExecOutput { stdout: stdout.captured(), stderr: err, exit_code: status.code })
    }

    pub(super) fn program_from_file(&self, what: &str, path: &Path) -> Result<Program> {
        let bytes = fs::read(path).map_err(|e| Error::InvalidArgument(format!("{what}: {e}")))?;
        let kind = wasmlet_images::WasmKind::detect(what, &bytes)?;
        let digest = wasmlet_images::sha256_digest(&bytes);
        self.inner.engine.program(what, &digest, kind, || Ok(bytes))
    }
}
