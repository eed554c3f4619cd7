//! Image pull policy as the kubelet applies it (the runtime never sees the policy).

use k8s_openapi::api::core::v1::Container;

/// `imagePullPolicy`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PullPolicy {
    Always,
    IfNotPresent,
    Never,
}

/// The tag and digest of a reference, if any (`host:5000/a/b:tag@sha256:..`).
fn tag_and_digest(image: &str) -> (Option<&str>, Option<&str>) {
    let (name, digest) = match image.split_once('@') {
        Some((n, d)) => (n, Some(d)),
        None => (image, None),
    };
    // A ':' after the last '/' is a tag; one before it belongs to a registry port.
    let last = name.rsplit('/').next().unwrap_or(name);
    (last.split_once(':').map(|(_, t)| t), digest)
}

/// The reference the runtime is given: ":latest" appended when there is no tag and no digest.
pub fn with_default_tag(image: &str) -> String {
    match tag_and_digest(image) {
        (None, None) => format!("{image}:latest"),
        _ => image.to_string(),
    }
}

/// The API server's default: Always for `:latest` or no tag (and no digest), else IfNotPresent.
pub fn default_policy(image: &str) -> PullPolicy {
    match tag_and_digest(image) {
        (Some("latest"), _) | (None, None) => PullPolicy::Always,
        _ => PullPolicy::IfNotPresent,
    }
}

/// The container's policy, defaulted.
pub fn policy_of(c: &Container) -> PullPolicy {
    match c.image_pull_policy.as_deref() {
        Some("Always") => PullPolicy::Always,
        Some("Never") => PullPolicy::Never,
        Some("IfNotPresent") => PullPolicy::IfNotPresent,
        _ => default_policy(c.image.as_deref().unwrap_or_default()),
    }
}

/// What the image manager does for a container whose image is or is not present.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PullDecision {
    /// Present and no pull is needed: `Pulled` "already present on machine".
    Present,
    Pull,
    /// Absent under Never: `ErrImageNeverPull`.
    NeverPull,
}

/// The image manager's `shouldPullImage`.
pub fn decide(policy: PullPolicy, present: bool) -> PullDecision {
    match (policy, present) {
        (PullPolicy::Always, _) | (PullPolicy::IfNotPresent, false) => PullDecision::Pull,
        (PullPolicy::IfNotPresent, true) | (PullPolicy::Never, true) => PullDecision::Present,
        (PullPolicy::Never, false) => PullDecision::NeverPull,
    }
}

/// The kubelet's pull rate limit (registryPullQPS 5, registryBurst 10): a token bucket that
/// starts full. A pull without a token fails at once with "pull QPS exceeded" (ErrImagePull,
/// then pull back-off), as the kubelet's throttled image service does; it does not wait.
#[derive(Debug, Clone)]
pub struct PullLimiter {
    qps: f64,
    burst: f64,
    tokens: f64,
    last: std::time::Instant,
}

impl PullLimiter {
    pub const QPS: f64 = 5.0;
    pub const BURST: f64 = 10.0;

    pub fn new(qps: f64, burst: f64, now: std::time::Instant) -> PullLimiter {
        PullLimiter { qps, burst, tokens: burst, last: now }
    }

    /// Takes a token if there is one.
    pub fn try_accept(&mut self, now: std::time::Instant) -> bool {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.tokens = (self.tokens + elapsed * self.qps).min(self.burst);
        self.last = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// What a pull from the serialized puller took: the pull itself, and with the wait for the
/// pulls queued before it (the two durations of the `Pulled` event).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PullTimes {
    pub pulling: std::time::Duration,
    pub including_waiting: std::time::Duration,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pulls_are_limited_to_5_qps_with_a_burst_of_10() {
        let t0 = std::time::Instant::now();
        let mut l = PullLimiter::new(PullLimiter::QPS, PullLimiter::BURST, t0);
        assert_eq!((0..12).filter(|_| l.try_accept(t0)).count(), 10, "the burst");
        // A token every 200 ms after that.
        assert!(!l.try_accept(t0 + std::time::Duration::from_millis(150)));
        assert!(l.try_accept(t0 + std::time::Duration::from_millis(210)));
        assert!(!l.try_accept(t0 + std::time::Duration::from_millis(300)));
        // Idle time refills the bucket up to the burst, no further.
        let later = t0 + std::time::Duration::from_secs(60);
        assert_eq!((0..20).filter(|_| l.try_accept(later)).count(), 10);
    }

    #[test]
    fn defaults_follow_the_tag() {
        assert_eq!(default_policy("nginx"), PullPolicy::Always);
        assert_eq!(default_policy("nginx:latest"), PullPolicy::Always);
        assert_eq!(default_policy("registry.example:5000/app"), PullPolicy::Always);
        assert_eq!(default_policy("registry.example:5000/app:1.0"), PullPolicy::IfNotPresent);
        assert_eq!(default_policy("app@sha256:abcd"), PullPolicy::IfNotPresent);
        assert_eq!(default_policy("app:latest@sha256:abcd"), PullPolicy::Always);
        let c =
            Container { image: Some("app:1".into()), image_pull_policy: Some("Never".into()), ..Default::default() };
        assert_eq!(policy_of(&c), PullPolicy::Never);
        let c = Container { image: Some("app".into()), ..Default::default() };
        assert_eq!(policy_of(&c), PullPolicy::Always);
    }

    #[test]
    fn latest_is_appended_only_without_tag_or_digest() {
        assert_eq!(with_default_tag("app"), "app:latest");
        assert_eq!(with_default_tag("127.0.0.1:5000/a/app"), "127.0.0.1:5000/a/app:latest");
        assert_eq!(with_default_tag("app:v1"), "app:v1");
        assert_eq!(with_default_tag("app@sha256:ab"), "app@sha256:ab");
    }

    #[test]
    fn decisions() {
        assert_eq!(decide(PullPolicy::Always, true), PullDecision::Pull);
        assert_eq!(decide(PullPolicy::IfNotPresent, true), PullDecision::Present);
        assert_eq!(decide(PullPolicy::IfNotPresent, false), PullDecision::Pull);
        assert_eq!(decide(PullPolicy::Never, true), PullDecision::Present);
        assert_eq!(decide(PullPolicy::Never, false), PullDecision::NeverPull);
    }
}
