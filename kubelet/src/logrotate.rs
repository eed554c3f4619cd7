//! Container log rotation, as the kubelet's container log manager does it: every 10 s, each
//! running container's CRI log that has grown to `containerLogMaxSize` is renamed to
//! `<log>.<YYYYmmdd-HHMMSS>` and the runtime is told to reopen it (ReopenContainerLog); rotated
//! files beyond `containerLogMaxFiles` (the live log counted) are removed, oldest first.
//! Upstream gzips the rotated files but the newest; they are left plain here.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use crate::cri::Cri;
use cri_proto::v1 as cri;

/// How often logs are looked at by default (the kubelet's containerLogMonitorInterval).
pub const PERIOD: Duration = Duration::from_secs(10);

/// containerLogMaxSize, containerLogMaxFiles and containerLogMonitorInterval.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Policy {
    pub max_size: u64,
    pub max_files: usize,
    pub period: Duration,
}

impl Default for Policy {
    fn default() -> Policy {
        Policy { max_size: 10 << 20, max_files: 5, period: PERIOD }
    }
}

/// The rotated files of `log`, oldest first (their suffixes sort by time).
fn rotated(log: &Path) -> std::io::Result<Vec<PathBuf>> {
    let (Some(dir), Some(name)) = (log.parent(), log.file_name().and_then(|n| n.to_str())) else {
        return Ok(Vec::new());
    };
    let prefix = format!("{name}.");
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)?
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_str().is_some_and(|n| n.starts_with(&prefix) && !n.ends_with(".tmp")))
        .map(|e| e.path())
        .collect();
    files.sort();
    Ok(files)
}

/// The suffix of a file rotated at `at` (UTC, the kubelet's "20060102-150405").
fn suffix(at: SystemTime) -> String {
    let t = k8s_openapi::jiff::Timestamp::try_from(at).unwrap_or_default();
    t.strftime("%Y%m%d-%H%M%S").to_string()
}

/// Rotates `log` if it has reached the policy's size: true when it did. `reopen` asks the
/// runtime to write to a new file at `log`; when it fails, the rename is undone.
pub async fn rotate_if_needed<F, Fut>(log: &Path, policy: Policy, now: SystemTime, reopen: F) -> std::io::Result<bool>
where
    F: FnOnce() -> Fut,
    Fut: std::future::Future<Output = Result<(), String>>,
{
    let size = match std::fs::metadata(log) {
        Ok(m) => m.len(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(e),
    };
    if size < policy.max_size {
        return Ok(false);
    }
    // Room for the file about to be rotated: the live log and max_files - 1 rotated ones.
    let old = rotated(log)?;
    let keep = policy.max_files.saturating_sub(2);
    for f in &old[..old.len().saturating_sub(keep)] {
        std::fs::remove_file(f)?;
    }
    let mut target = PathBuf::from(format!("{}.{}", log.display(), suffix(now)));
    if target.exists() {
        // Two rotations within a second.
        target = PathBuf::from(format!("{}.{}-{}", log.display(), suffix(now), old.len()));
    }
    std::fs::rename(log, &target)?;
    if let Err(e) = reopen().await {
        std::fs::rename(&target, log)?;
        return Err(std::io::Error::other(format!("reopen {}: {e}", log.display())));
    }
    tracing::info!(log = %log.display(), size, rotated = %target.display(), "container log rotated");
    Ok(true)
}

/// Rotates the logs of the runtime's running containers every `policy.period`, for good.
pub async fn run(cri: Cri, policy: Policy) {
    let mut tick = tokio::time::interval(policy.period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        if let Err(e) = rotate_all(&cri, policy).await {
            tracing::warn!(error = %e, "container log rotation");
        }
    }
}

async fn rotate_all(cri: &Cri, policy: Policy) -> Result<(), tonic::Status> {
    let mut rt = cri.rt.clone();
    let running = cri::ContainerFilter {
        state: Some(cri::ContainerStateValue { state: cri::ContainerState::ContainerRunning as i32 }),
        ..Default::default()
    };
    let list = rt.list_containers(cri::ListContainersRequest { filter: Some(running) }).await?.into_inner();
    for c in list.containers {
        let status =
            match rt.container_status(cri::ContainerStatusRequest { container_id: c.id.clone(), verbose: false }).await
            {
                Ok(s) => s.into_inner().status,
                Err(_) => continue, // gone meanwhile
            };
        let Some(log) = status.map(|s| s.log_path).filter(|p| !p.is_empty()) else { continue };
        let mut reopener = rt.clone();
        let id = c.id.clone();
        let reopen = || async move {
            reopener
                .reopen_container_log(cri::ReopenContainerLogRequest { container_id: id })
                .await
                .map(|_| ())
                .map_err(|e| e.message().to_string())
        };
        if let Err(e) = rotate_if_needed(Path::new(&log), policy, SystemTime::now(), reopen).await {
            tracing::warn!(container = %c.id, error = %e, "container log rotation");
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn suffixes_are_the_kubelets_utc_time_format() {
        let at = SystemTime::UNIX_EPOCH + Duration::from_secs(1_764_626_645);
        assert_eq!(suffix(at), "20251201-220405");
        assert_eq!(suffix(SystemTime::UNIX_EPOCH), "19700101-000000");
    }

    #[tokio::test]
    async fn a_full_log_is_rotated_and_the_oldest_removed() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("0.log");
        let policy = Policy { max_size: 100, max_files: 3, period: PERIOD };
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_764_626_645);
        let reopen = |log: PathBuf| move || async move { std::fs::write(log, b"").map_err(|e| e.to_string()) };
        std::fs::write(&log, [b'a'; 99]).unwrap();
        assert!(!rotate_if_needed(&log, policy, t0, reopen(log.clone())).await.unwrap());
        for (i, c) in [b'a', b'b', b'c'].into_iter().enumerate() {
            std::fs::write(&log, [c; 100]).unwrap();
            let at = t0 + Duration::from_secs(i as u64);
            assert!(rotate_if_needed(&log, policy, at, reopen(log.clone())).await.unwrap());
            assert_eq!(std::fs::metadata(&log).unwrap().len(), 0, "reopened");
        }
        // The live log and two rotated ones: "a" went.
        let names: Vec<String> = rotated(&log).unwrap().iter().map(|p| std::fs::read_to_string(p).unwrap()).collect();
        assert_eq!(names, ["b".repeat(100), "c".repeat(100)]);
        // A failed reopen puts the log back.
        std::fs::write(&log, [b'd'; 100]).unwrap();
        let fail = || async { Err("container is not running".to_string()) };
        let e = rotate_if_needed(&log, policy, t0 + Duration::from_secs(9), fail).await.unwrap_err();
        assert!(e.to_string().contains("container is not running"), "{e}");
        assert_eq!(std::fs::read(&log).unwrap(), [b'd'; 100]);
    }
}
