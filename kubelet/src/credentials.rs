//! imagePullSecrets as the kubelet's keyring reads them: the credentials of
//! `kubernetes.io/dockerconfigjson` and `kubernetes.io/dockercfg` Secrets, matched to an image
//! by registry host (with `*` globs per dot-separated part, and the port) and path prefix, most
//! specific first. The pull tries each match in turn, then fails with all their errors.

use cri_proto::v1::AuthConfig;
use k8s_openapi::api::core::v1::{Pod, Secret};
use serde_json::Value;

use super::env::secret_data;

/// Credentials, as the CRI's AuthConfig carries them, keyed by the registry they are for
/// (`host[:port][/path]`).
#[derive(Debug, Clone, Default)]
pub struct Keyring {
    entries: Vec<(Key, AuthConfig)>,
}

/// A keyring key: host parts (each may hold `*`), port, path prefix.
#[derive(Debug, Clone)]
struct Key {
    host: Vec<String>,
    port: Option<String>,
    path: String,
}

/// Docker Hub's names, which all mean the same registry.
const DOCKER_HUB: [&str; 4] = ["index.docker.io", "docker.io", "registry-1.docker.io", "registry.hub.docker.com"];

impl Key {
    fn parse(text: &str) -> Key {
        let rest = text.split_once("://").map_or(text, |(_, r)| r);
        let (hostport, path) = rest.split_once('/').map_or((rest, ""), |(h, p)| (h, p));
        let (host, port) = match hostport.rsplit_once(':') {
            Some((h, p)) if !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()) => (h, Some(p.to_string())),
            _ => (hostport, None),
        };
        let host = if DOCKER_HUB.contains(&host) { "docker.io" } else { host };
        // The Docker Hub key "https://index.docker.io/v1/" names the whole registry.
        let path = if host == "docker.io" && path.trim_end_matches('/') == "v1" { "" } else { path };
        Key {
            host: host.to_ascii_lowercase().split('.').map(str::to_string).collect(),
            port,
            path: path.trim_end_matches('/').to_string(),
        }
    }

    /// How specific the key is: longer paths, then more host parts, win.
    fn weight(&self) -> (usize, usize) {
        (self.path.len(), self.host.len())
    }

    fn matches(&self, image: &Key) -> bool {
        self.host.len() == image.host.len()
            && self.host.iter().zip(&image.host).all(|(k, i)| glob(k, i))
            && self.port == image.port
            && (self.path.is_empty() || image.path == self.path || image.path.starts_with(&format!("{}/", self.path)))
    }
}

/// Whether `text` matches `pattern`, where `*` stands for any run of characters.
fn glob(pattern: &str, text: &str) -> bool {
    match pattern.split_once('*') {
        None => pattern == text,
        Some((head, tail)) => {
            let Some(rest) = text.strip_prefix(head) else { return false };
            (0..=rest.len()).filter(|i| rest.is_char_boundary(*i)).any(|i| glob(tail, &rest[i..]))
        }
    }
}

/// The registry and repository path of an image reference (Docker Hub when it names none).
fn image_key(image: &str) -> Key {
    let name = image.split('@').next().unwrap_or(image);
    let (first, rest) = name.split_once('/').unwrap_or(("", name));
    let registry = first.contains('.') || first.contains(':') || first == "localhost";
    let (host, repo) = if registry { (first, rest) } else { ("docker.io", name) };
    // Without the tag: a ':' after the last '/'.
    let repo = match repo.rsplit_once('/') {
        Some((dir, last)) => format!("{dir}/{}", last.split(':').next().unwrap_or(last)),
        None => repo.split(':').next().unwrap_or(repo).to_string(),
    };
    let repo = if host == "docker.io" && !repo.contains('/') { format!("library/{repo}") } else { repo };
    Key::parse(&format!("{host}/{repo}"))
}

impl Keyring {
    /// Reads a pull secret into the keyring; the reason when it holds no docker config.
    pub fn add_secret(&mut self, secret: &Secret) -> Result<(), String> {
        let data = secret_data(secret);
        let (config, auths) = match secret.type_.as_deref() {
            Some("kubernetes.io/dockerconfigjson") => (data.get(".dockerconfigjson"), true),
            Some("kubernetes.io/dockercfg") => (data.get(".dockercfg"), false),
            other => return Err(format!("secret type {:?} is not a docker config", other.unwrap_or_default())),
        };
        let config = config.ok_or("the secret has no docker config key")?;
        let value: Value = serde_json::from_slice(config).map_err(|e| format!("invalid docker config: {e}"))?;
        let registries = if auths { value.get("auths").cloned().unwrap_or_default() } else { value };
        let Value::Object(registries) = registries else { return Err("invalid docker config: no registries".into()) };
        for (registry, entry) in registries {
            let text = |k: &str| entry.get(k).and_then(Value::as_str).unwrap_or_default().to_string();
            let mut c = AuthConfig {
                username: text("username"),
                password: text("password"),
                auth: text("auth"),
                server_address: registry.clone(),
                identity_token: text("identitytoken"),
                registry_token: text("registrytoken"),
            };
            // "auth" is base64 of user:password; the kubelet sends the decoded pair.
            if c.username.is_empty()
                && let Some((u, p)) = decode_auth(&c.auth)
            {
                (c.username, c.password) = (u, p);
            }
            self.entries.push((Key::parse(&registry), c));
        }
        Ok(())
    }

    /// The credentials for `image`, most specific registry key first.
    pub fn lookup(&self, image: &str) -> Vec<AuthConfig> {
        let key = image_key(image);
        let mut found: Vec<&(Key, AuthConfig)> = self.entries.iter().filter(|(k, _)| k.matches(&key)).collect();
        found.sort_by_key(|(k, _)| std::cmp::Reverse(k.weight()));
        found.into_iter().map(|(_, c)| c.clone()).collect()
    }
}

/// The keyring of a pod's imagePullSecrets (`secret` finds one by name in the pod's
/// namespace), and the names of those that are missing.
pub fn pod_keyring(pod: &Pod, secret: &dyn Fn(&str) -> Option<Secret>) -> (Keyring, Vec<String>) {
    let mut keyring = Keyring::default();
    let mut missing = Vec::new();
    for reference in pod.spec.iter().flat_map(|s| s.image_pull_secrets.iter().flatten()) {
        match secret(&reference.name) {
            Some(s) => {
                if let Err(e) = keyring.add_secret(&s) {
                    tracing::warn!(secret = %reference.name, error = %e, "image pull secret skipped");
                }
            }
            None => missing.push(reference.name.clone()),
        }
    }
    (keyring, missing)
}

fn decode_auth(auth: &str) -> Option<(String, String)> {
    use base64::Engine;
    let bytes = base64::engine::general_purpose::STANDARD.decode(auth.trim()).ok()?;
    let text = String::from_utf8(bytes).ok()?;
    text.split_once(':').map(|(u, p)| (u.to_string(), p.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::ByteString;

    fn secret(type_: &str, key: &str, json: &str) -> Secret {
        Secret {
            type_: Some(type_.into()),
            data: Some([(key.to_string(), ByteString(json.as_bytes().to_vec()))].into()),
            ..Default::default()
        }
    }

    #[test]
    fn dockerconfigjson_and_dockercfg_by_host_port_path_and_glob() {
        let mut k = Keyring::default();
        k.add_secret(&secret(
            "kubernetes.io/dockerconfigjson",
            ".dockerconfigjson",
            r#"{"auths": {
                "127.0.0.1:5000": {"username": "ada", "password": "pw"},
                "https://registry.example/team": {"auth": "Ym9iOnMzY3JldA=="},
                "*.mirror.example": {"username": "any", "password": "x"},
                "https://index.docker.io/v1/": {"username": "hub", "password": "h"}
            }}"#,
        ))
        .unwrap();
        k.add_secret(&secret("kubernetes.io/dockercfg", ".dockercfg", r#"{"registry.example": {"username": "all"}}"#))
            .unwrap();
        let users = |image: &str| k.lookup(image).into_iter().map(|c| c.username).collect::<Vec<_>>();
        assert_eq!(users("127.0.0.1:5000/demo/tool:1"), ["ada"]);
        assert!(users("127.0.0.1:5001/demo/tool:1").is_empty(), "the port is part of the key");
        // The path prefix is more specific than the bare host; "auth" is decoded.
        assert_eq!(users("registry.example/team/app:2"), ["bob", "all"]);
        assert_eq!(k.lookup("registry.example/team/app:2")[0].password, "s3cret");
        assert_eq!(users("registry.example/teamwork/app"), ["all"]);
        assert_eq!(users("eu.mirror.example/app@sha256:abcd"), ["any"]);
        assert!(users("a.b.mirror.example/app").is_empty(), "a glob covers one part");
        assert_eq!(users("nginx"), ["hub"]);
        assert_eq!(users("docker.io/library/nginx:1"), ["hub"]);
        assert!(users("quay.io/app").is_empty());
    }

    #[test]
    fn secrets_that_are_not_docker_configs_are_refused() {
        let mut k = Keyring::default();
        assert!(k.add_secret(&secret("Opaque", "x", "{}")).unwrap_err().contains("not a docker config"));
        assert!(k.add_secret(&secret("kubernetes.io/dockerconfigjson", ".dockerconfigjson", "{")).is_err());
        assert!(k.lookup("anything").is_empty());
    }
}
