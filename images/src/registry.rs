//! Talking to OCI registries: a narrow [`Registry`] trait (what a pull and a push need) and its
//! real implementation on `oci-client`. Digests are checked here for every byte that comes in.

use std::future::Future;

use futures_util::StreamExt;
use oci_client::client::{ClientConfig, ClientProtocol};
use oci_client::secrets::RegistryAuth;
use oci_client::{Client, RegistryOperation};

use crate::{BlobWriter, Error, Reference, Result, sha256_digest};

/// Largest manifest or index accepted (containerd's limit).
pub const MAX_MANIFEST_BYTES: usize = 4 << 20;
/// Largest image config accepted.
pub const MAX_CONFIG_BYTES: u64 = 4 << 20;

/// Credentials for one registry, from the CRI AuthConfig or the command line.
#[derive(Clone, Default, PartialEq, Eq)]
pub enum Auth {
    /// No credentials.
    #[default]
    Anonymous,
    /// User name and password (the token flow, if the registry asks for one, uses them too).
    Basic { username: String, password: String },
    /// A bearer token sent as it is.
    Bearer(String),
}

impl std::fmt::Debug for Auth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print secrets.
        match self {
            Auth::Anonymous => f.write_str("Anonymous"),
            Auth::Basic { username, .. } => write!(f, "Basic({username}, ***)"),
            Auth::Bearer(_) => f.write_str("Bearer(***)"),
        }
    }
}

/// What pulling and pushing need from a registry.
pub trait Registry: Send + Sync {
    /// The manifest (or index) `reference` names, its bytes checked against its digest.
    fn manifest(&self, reference: &Reference, accept: &[&str]) -> impl Future<Output = Result<Vec<u8>>> + Send;
    /// Streams a blob of the repository into `out` (which enforces its size limit); the
    /// caller checks the digest with [`BlobWriter::finish`].
    fn blob(
        &self,
        reference: &Reference,
        digest: &str,
        out: &mut BlobWriter,
    ) -> impl Future<Output = Result<()>> + Send;
    /// Uploads a blob unless the registry has it.
    fn push_blob(&self, reference: &Reference, bytes: Vec<u8>) -> impl Future<Output = Result<String>> + Send;
    /// Uploads a manifest under the reference's tag (or digest); returns its digest.
    fn push_manifest(
        &self,
        reference: &Reference,
        bytes: Vec<u8>,
        media_type: &str,
    ) -> impl Future<Output = Result<String>> + Send;
}

/// A registry reached with oci-client.
pub struct OciRegistry {
    client: Client,
    auth: RegistryAuth,
    host: String,
}

impl OciRegistry {
    /// A client for the registry `host` (as in a reference, with its port), over plain HTTP when
    /// `insecure`, with `auth`.
    pub fn new(host: &str, insecure: bool, auth: Auth) -> OciRegistry {
        let protocol =
            if insecure { ClientProtocol::HttpsExcept(vec![host.to_string()]) } else { ClientProtocol::Https };
        let config = ClientConfig {
            protocol,
            connect_timeout: Some(std::time::Duration::from_secs(10)),
            user_agent: concat!("wasmlet/", env!("CARGO_PKG_VERSION")),
            ..Default::default()
        };
        let auth = match auth {
            Auth::Anonymous => RegistryAuth::Anonymous,
            Auth::Basic { username, password } => RegistryAuth::Basic(username, password),
            Auth::Bearer(token) => RegistryAuth::Bearer(token),
        };
        OciRegistry { client: Client::new(config), auth, host: host.to_string() }
    }

    fn oci_ref(&self, reference: &Reference) -> oci_client::Reference {
        match (&reference.digest, &reference.tag) {
            (Some(d), _) => {
                oci_client::Reference::with_digest(self.host.clone(), reference.repository.clone(), d.clone())
            }
            (None, Some(t)) => {
                oci_client::Reference::with_tag(self.host.clone(), reference.repository.clone(), t.clone())
            }
            (None, None) => {
                oci_client::Reference::with_tag(self.host.clone(), reference.repository.clone(), "latest".into())
            }
        }
    }

    fn failed(&self, reference: &Reference, what: &str) -> impl Fn(oci_client::errors::OciDistributionError) -> Error {
        let context = format!("{what} {reference} from {}", self.host);
        move |e| Error::Registry { context: context.clone(), reason: e.to_string() }
    }
}

impl Registry for OciRegistry {
    async fn manifest(&self, reference: &Reference, accept: &[&str]) -> Result<Vec<u8>> {
        let r = self.oci_ref(reference);
        self.client.store_auth_if_needed(r.resolve_registry(), &self.auth).await;
        let (body, _) = self
            .client
            .pull_manifest_raw(&r, &self.auth, accept)
            .await
            .map_err(self.failed(reference, "pull manifest"))?;
        let actual = sha256_digest(&body);
        if let Some(expected) = &reference.digest
            && *expected != actual
        {
            return Err(Error::DigestMismatch { digest: expected.clone(), actual });
        }
        Ok(body.to_vec())
    }

    async fn blob(&self, reference: &Reference, digest: &str, out: &mut BlobWriter) -> Result<()> {
        let r = self.oci_ref(reference);
        self.client.store_auth_if_needed(r.resolve_registry(), &self.auth).await;
        self.client
            .auth(&r, &self.auth, RegistryOperation::Pull)
            .await
            .map_err(self.failed(reference, "authenticate to"))?;
        let mut stream =
            self.client.pull_blob_stream(&r, digest).await.map_err(self.failed(reference, "pull blob of"))?;
        if let Some(n) = stream.content_length {
            out.expect(n)?;
        }
        while let Some(chunk) = stream.stream.next().await {
            let chunk = chunk.map_err(|e| Error::Registry {
                context: format!("pull blob {digest} of {reference}"),
                reason: e.to_string(),
            })?;
            out.write(&chunk)?;
        }
        Ok(())
    }

    async fn push_blob(&self, reference: &Reference, bytes: Vec<u8>) -> Result<String> {
        let r = self.oci_ref(reference);
        self.client
            .auth(&r, &self.auth, RegistryOperation::Push)
            .await
            .map_err(self.failed(reference, "authenticate to"))?;
        let digest = sha256_digest(&bytes);
        if self.client.blob_exists(&r, &digest).await.unwrap_or(false) {
            return Ok(digest);
        }
        self.client.push_blob(&r, bytes, &digest).await.map_err(self.failed(reference, "push blob of"))?;
        Ok(digest)
    }

    async fn push_manifest(&self, reference: &Reference, bytes: Vec<u8>, media_type: &str) -> Result<String> {
        let r = self.oci_ref(reference);
        self.client
            .auth(&r, &self.auth, RegistryOperation::Push)
            .await
            .map_err(self.failed(reference, "authenticate to"))?;
        let content_type = http::HeaderValue::from_str(media_type)
            .map_err(|e| Error::Registry { context: format!("push {reference}"), reason: e.to_string() })?;
        let digest = sha256_digest(&bytes);
        self.client
            .push_manifest_raw(&r, bytes, content_type)
            .await
            .map_err(self.failed(reference, "push manifest"))?;
        Ok(digest)
    }
}
