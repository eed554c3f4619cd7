use std::fmt;

use crate::{Error, Result};

const DEFAULT_REGISTRY: &str = "docker.io";
const DEFAULT_TAG: &str = "latest";

/// A normalized image reference, as the kubelet and containerd spell it:
/// `hello` is `docker.io/library/hello:latest`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reference {
    /// Registry host, with its port if any (`docker.io`, `127.0.0.1:5000`).
    pub registry: String,
    /// Repository path inside the registry (`library/hello`).
    pub repository: String,
    /// Tag, if any; `latest` when neither tag nor digest was given.
    pub tag: Option<String>,
    /// `sha256:<hex>` digest, if any.
    pub digest: Option<String>,
}

impl Reference {
    /// Parses and normalizes `input`.
    pub fn parse(input: &str) -> Result<Reference> {
        let bad = |reason: &str| Error::InvalidReference { reference: input.to_string(), reason: reason.to_string() };
        if input.is_empty() {
            return Err(bad("empty reference"));
        }
        if input.len() > 4096 {
            return Err(bad("longer than 4096 bytes"));
        }
        let (rest, digest) = match input.split_once('@') {
            Some((rest, digest)) => {
                validate_digest(digest).map_err(|r| bad(&r))?;
                (rest, Some(digest.to_string()))
            }
            None => (input, None),
        };
        // A tag is the part after the last ':' when that ':' comes after the last '/'.
        let (name, tag) = match rest.rfind(':') {
            Some(i) if !rest[i..].contains('/') => (&rest[..i], Some(rest[i + 1..].to_string())),
            _ => (rest, None),
        };
        if let Some(tag) = &tag {
            let ok = !tag.is_empty()
                && tag.len() <= 128
                && tag.chars().all(|c| c.is_ascii_alphanumeric() || "_.-".contains(c))
                && !tag.starts_with(['.', '-']);
            if !ok {
                return Err(bad("invalid tag"));
            }
        }
        let (registry, repository) = match name.split_once('/') {
            Some((first, path)) if first.contains('.') || first.contains(':') || first == "localhost" => {
                (first.to_string(), path.to_string())
            }
            _ => (DEFAULT_REGISTRY.to_string(), name.to_string()),
        };
        let repository = if registry == DEFAULT_REGISTRY && !repository.contains('/') {
            format!("library/{repository}")
        } else {
            repository
        };
        let component_ok = |c: &str| {
            !c.is_empty()
                && c.chars().all(|ch| ch.is_ascii_lowercase() || ch.is_ascii_digit() || "._-".contains(ch))
                && c.starts_with(|ch: char| ch.is_ascii_alphanumeric())
                && c.ends_with(|ch: char| ch.is_ascii_alphanumeric())
        };
        if !repository.split('/').all(component_ok) {
            return Err(bad("repository must be lower-case path components of [a-z0-9._-]"));
        }
        let tag = match (&tag, &digest) {
            (None, None) => Some(DEFAULT_TAG.to_string()),
            _ => tag,
        };
        Ok(Reference { registry, repository, tag, digest })
    }

    /// `registry/repository` without tag or digest.
    pub fn name(&self) -> String {
        format!("{}/{}", self.registry, self.repository)
    }

    /// `registry/repository:tag`, if the reference has a tag.
    pub fn tagged(&self) -> Option<String> {
        self.tag.as_ref().map(|t| format!("{}:{t}", self.name()))
    }

    /// `registry/repository@digest` for `digest`.
    pub fn with_digest(&self, digest: &str) -> String {
        format!("{}@{digest}", self.name())
    }
}

impl fmt::Display for Reference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.name())?;
        if let Some(tag) = &self.tag {
            write!(f, ":{tag}")?;
        }
        if let Some(digest) = &self.digest {
            write!(f, "@{digest}")?;
        }
        Ok(())
    }
}

fn validate_digest(digest: &str) -> std::result::Result<(), String> {
    let hex = digest.strip_prefix("sha256:").ok_or_else(|| "digest must start with sha256:".to_string())?;
    if hex.len() != 64 || !hex.chars().all(|c| c.is_ascii_digit() || ('a'..='f').contains(&c)) {
        return Err("digest must be 64 lower-case hex characters".to_string());
    }
    Ok(())
}

/// True for `sha256:<64 hex>` or a bare 64-hex image id.
pub(crate) fn looks_like_id(s: &str) -> bool {
    let hex = s.strip_prefix("sha256:").unwrap_or(s);
    hex.len() == 64 && hex.chars().all(|c| c.is_ascii_digit() || ('a'..='f').contains(&c))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn norm(s: &str) -> String {
        Reference::parse(s).unwrap().to_string()
    }

    #[test]
    fn normalizes_like_the_kubelet() {
        assert_eq!(norm("hello"), "docker.io/library/hello:latest");
        assert_eq!(norm("hello:1.0"), "docker.io/library/hello:1.0");
        assert_eq!(norm("user/app"), "docker.io/user/app:latest");
        assert_eq!(norm("ghcr.io/a/b/c:v2"), "ghcr.io/a/b/c:v2");
        assert_eq!(norm("127.0.0.1:5000/x"), "127.0.0.1:5000/x:latest");
        assert_eq!(norm("localhost/x:y"), "localhost/x:y");
        let d = format!("sha256:{}", "a".repeat(64));
        assert_eq!(norm(&format!("x@{d}")), format!("docker.io/library/x@{d}"));
        assert_eq!(norm(&format!("x:1@{d}")), format!("docker.io/library/x:1@{d}"));
    }

    #[test]
    fn refuses_bad_references() {
        for bad in ["", "UPPER", "x:", "x@sha256:zz", "a//b", "x:-bad", "/abs"] {
            let err = Reference::parse(bad).unwrap_err().to_string();
            assert!(err.starts_with("invalid image reference"), "{bad}: {err}");
        }
    }

    #[test]
    fn ids() {
        assert!(looks_like_id(&"f".repeat(64)));
        assert!(looks_like_id(&format!("sha256:{}", "0".repeat(64))));
        assert!(!looks_like_id("hello"));
    }
}
