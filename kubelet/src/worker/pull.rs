//! Images: the node's serialized, rate-limited puller, and a container's image as its pull
//! policy says.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use cri_proto::v1 as cri;
use k8s_openapi::api::core::v1::Container;

use super::{Worker, lock};
use crate::actions;
use crate::clock;
use crate::credentials;
use crate::cri::RuntimeClient;
use crate::events::Kind;
use crate::images::{self, PullDecision};
use crate::model::SyncError;

/// The node's image puller: pulls go one at a time, as with the kubelet's default
/// serializeImagePulls, and each takes a token of the rate limit first.
pub struct Puller {
    queue: tokio::sync::Mutex<()>,
    limiter: Mutex<images::PullLimiter>,
}

impl Default for Puller {
    fn default() -> Self {
        let limiter = images::PullLimiter::new(images::PullLimiter::QPS, images::PullLimiter::BURST, Instant::now());
        Puller { queue: tokio::sync::Mutex::new(()), limiter: Mutex::new(limiter) }
    }
}

impl Puller {
    /// Pulls `image` through `cri` after the pulls queued before it, with each of `creds` in
    /// turn (none: anonymously) until one works; the image reference and how long it took, or
    /// every attempt's error.
    pub async fn pull(
        &self,
        cri: &dyn RuntimeClient,
        image: &str,
        creds: Vec<cri::AuthConfig>,
    ) -> Result<(String, images::PullTimes), String> {
        let queued = Instant::now();
        let _turn = self.queue.lock().await;
        if !lock(&self.limiter).try_accept(Instant::now()) {
            return Err("pull QPS exceeded".into());
        }
        let started = Instant::now();
        let auths: Vec<Option<cri::AuthConfig>> =
            if creds.is_empty() { vec![None] } else { creds.into_iter().map(Some).collect() };
        let mut errors = Vec::new();
        for auth in auths {
            match cri.pull(image, auth, None).await {
                Ok(image_ref) => {
                    let times = images::PullTimes { pulling: started.elapsed(), including_waiting: queued.elapsed() };
                    return Ok((image_ref, times));
                }
                Err(e) => errors.push(e.message().to_string()),
            }
        }
        // As Go's aggregate error reads: one error alone, else them all in brackets.
        Err(if errors.len() == 1 { errors.remove(0) } else { format!("[{}]", errors.join(", ")) })
    }
}

impl Worker {
    /// Pulls the image as the policy says; returns the image reference.
    pub(super) async fn ensure_image(&mut self, c: &Container) -> Result<String, SyncError> {
        // The pod's pull secrets are read before anything is pulled, as the kubelet's sync does.
        let (keyring, missing) = credentials::pod_keyring(&self.pod, &|n| self.node.objects.secret(self.ns(), n));
        if !missing.is_empty() && missing != self.missing_pull_secrets {
            self.event(
                None,
                Kind::Warning,
                "FailedToRetrieveImagePullSecret",
                format!(
                    "Unable to retrieve some image pull secrets ({}); attempting to pull the image may not succeed.",
                    missing.join(", ")
                ),
            );
        }
        self.missing_pull_secrets = missing;
        let image = images::with_default_tag(c.image.as_deref().unwrap_or_default());
        let shown = c.image.clone().unwrap_or_default();
        let present = self
            .node
            .cri
            .image_status(&image)
            .await
            .map_err(|s| SyncError { reason: "ErrImagePull".into(), message: s.message().to_string() })?;
        match images::decide(images::policy_of(c), present.is_some()) {
            PullDecision::Present => {
                self.event(
                    Some(&c.name),
                    Kind::Normal,
                    "Pulled",
                    format!("Container image \"{shown}\" already present on machine"),
                );
                Ok(present.map(|p| p.0).unwrap_or(image))
            }
            PullDecision::NeverPull => {
                let message = format!("Container image \"{shown}\" is not present with pull policy of Never");
                self.event(Some(&c.name), Kind::Warning, "ErrImageNeverPull", message.clone());
                Err(SyncError { reason: "ErrImageNeverPull".into(), message })
            }
            PullDecision::Pull => {
                let key = format!("{}_{image}", self.uid);
                let now = clock::now();
                if self.pull_backoff.in_backoff_since_update(&key, now) {
                    let message = format!("Back-off pulling image \"{shown}\"");
                    self.event(Some(&c.name), Kind::Normal, "BackOff", message.clone());
                    self.event(Some(&c.name), Kind::Warning, "Failed", "Error: ImagePullBackOff".into());
                    return Err(SyncError { reason: "ImagePullBackOff".into(), message });
                }
                self.event(Some(&c.name), Kind::Normal, "Pulling", format!("Pulling image \"{shown}\""));
                match self.node.pulls.pull(self.node.cri.as_ref(), &image, keyring.lookup(&image)).await {
                    Ok((r, times)) => {
                        if let Some((_, pulling)) = self.first_seen.as_mut() {
                            *pulling += times.including_waiting;
                        }
                        let size = self.node.cri.image_status(&image).await.ok().flatten().map_or(0, |p| p.1);
                        // Go's durations, truncated to the millisecond.
                        let ms = |d: Duration| actions::go_duration(Duration::from_millis(d.as_millis() as u64));
                        self.event(
                            Some(&c.name),
                            Kind::Normal,
                            "Pulled",
                            format!(
                                "Successfully pulled image \"{shown}\" in {} ({} including waiting). Image size: {size} bytes.",
                                ms(times.pulling),
                                ms(times.including_waiting)
                            ),
                        );
                        Ok(r)
                    }
                    Err(message) => {
                        self.pull_backoff.next(&key, now, now);
                        self.event(
                            Some(&c.name),
                            Kind::Warning,
                            "Failed",
                            format!("Failed to pull image \"{shown}\": {message}"),
                        );
                        self.event(Some(&c.name), Kind::Warning, "Failed", "Error: ErrImagePull".into());
                        Err(SyncError { reason: "ErrImagePull".into(), message })
                    }
                }
            }
        }
    }
}
