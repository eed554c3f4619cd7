//! The node API's serving certificate from the cluster (`serverTLSBootstrap`): the node asks
//! for one through a CertificateSigningRequest for `kubernetes.io/kubelet-serving` (someone,
//! or an approver, approves it; the controller-manager signs it), keeps it in the cert
//! directory, serves with it, and asks for the next one at 70-90% of its lifetime. Until the
//! first is issued, TLS handshakes fail: there is nothing to serve with, as with the kubelet.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::SystemTime;

use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;

use super::bootstrap::{self, Purpose};
use super::client::{Current, keep_fresh, parse};

/// Where the serving certificate and key are stored (one PEM file, mode 0600).
pub fn serving_pem(cert_dir: &Path) -> PathBuf {
    cert_dir.join("kubelet-server-current.pem")
}

/// The serving certificate in use, if one has been issued.
pub struct ServingCertificate {
    pem: PathBuf,
    current: RwLock<Option<Current>>,
}

impl std::fmt::Debug for ServingCertificate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServingCertificate").field("pem", &self.pem).finish()
    }
}

impl ServingCertificate {
    /// The one stored at `pem` if it is there, still valid and readable; else none yet.
    pub fn load(pem: &Path) -> ServingCertificate {
        let stored =
            std::fs::read(pem).ok().and_then(|t| parse(pem, &t).ok()).filter(|c| c.not_after > SystemTime::now());
        ServingCertificate { pem: pem.to_path_buf(), current: RwLock::new(stored) }
    }

    fn validity(&self) -> Option<(SystemTime, SystemTime)> {
        self.current.read().unwrap_or_else(|e| e.into_inner()).as_ref().map(|c| (c.not_before, c.not_after))
    }

    /// Puts a newly issued certificate and key (PEM) in place: on disk, then in use (new
    /// handshakes present it).
    fn replace(&self, text: &str) -> Result<(), super::Error> {
        let next = parse(&self.pem, text.as_bytes())?;
        bootstrap::write_private(&self.pem, text)?;
        *self.current.write().unwrap_or_else(|e| e.into_inner()) = Some(next);
        Ok(())
    }
}

impl ResolvesServerCert for ServingCertificate {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.current.read().unwrap_or_else(|e| e.into_inner()).as_ref().map(|c| c.key.clone())
    }
}

/// Keeps `certificate` issued and fresh for as long as the node runs: asks at once when there
/// is none, then again at 70-90% of each one's lifetime. `client` has the node's credentials.
pub async fn keep(certificate: Arc<ServingCertificate>, client: kube::Client, node_name: String, purpose: Purpose) {
    keep_fresh(
        "serving certificate",
        || certificate.validity(),
        || async { certificate.replace(&bootstrap::issue(&client, &node_name, &purpose).await?) },
    )
    .await
}
