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

#[cfg(test)]
mod tests {
    use super::*;

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
