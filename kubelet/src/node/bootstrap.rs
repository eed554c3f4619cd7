//! TLS bootstrapping, as an edge node joins: with only a bootstrap kubeconfig (a bootstrap
//! token), the node makes a key, asks for a client certificate through a
//! CertificateSigningRequest for `kubernetes.io/kube-apiserver-client-kubelet` (approved and
//! signed by the controller-manager), stores it, and writes the kubeconfig it runs with from
//! then on (the kubelet's `--bootstrap-kubeconfig`).

use std::path::{Path, PathBuf};
use std::time::Duration;

use k8s_openapi::ByteString;
use k8s_openapi::api::certificates::v1::{CertificateSigningRequest, CertificateSigningRequestSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::Api;
use kube::api::PostParams;

use super::{Complaint, Error, Retry};

/// The signer of kubelet client certificates.
pub const SIGNER: &str = "kubernetes.io/kube-apiserver-client-kubelet";
/// The signer of kubelet serving certificates (serverTLSBootstrap).
pub const SERVING_SIGNER: &str = "kubernetes.io/kubelet-serving";

/// What a certificate is for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Purpose {
    /// The node's client certificate, to the API server.
    Client,
    /// The node API's serving certificate, for these addresses and names.
    Serving { ips: Vec<std::net::IpAddr>, names: Vec<String> },
}

impl Purpose {
    fn signer(&self) -> &'static str {
        match self {
            Purpose::Client => SIGNER,
            Purpose::Serving { .. } => SERVING_SIGNER,
        }
    }

    /// The usages the signer allows (the key is ECDSA: no key encipherment).
    fn usages(&self) -> Vec<String> {
        let last = if *self == Purpose::Client { "client auth" } else { "server auth" };
        vec!["digital signature".into(), last.into()]
    }
}

/// Where the client certificate and key are stored (one PEM file, mode 0600).
pub fn client_pem(cert_dir: &Path) -> PathBuf {
    cert_dir.join("kubelet-client-current.pem")
}

/// A new key and the PEM CSR for node `name` (CN system:node:NAME, O system:nodes), with the
/// subject alternative names a serving certificate needs.
pub fn request(name: &str, purpose: &Purpose) -> Result<(String, String), Error> {
    let bad = |e: rcgen::Error| Error::Config(format!("make the certificate request: {e}"));
    let key = rcgen::KeyPair::generate().map_err(bad)?;
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).map_err(bad)?;
    if let Purpose::Serving { ips, names } = purpose {
        for ip in ips {
            params.subject_alt_names.push(rcgen::SanType::IpAddress(*ip));
        }
        for n in names {
            params.subject_alt_names.push(rcgen::SanType::DnsName(n.clone().try_into().map_err(bad)?));
        }
    }
    params.distinguished_name = rcgen::DistinguishedName::new();
    params.distinguished_name.push(rcgen::DnType::OrganizationName, "system:nodes");
    params.distinguished_name.push(rcgen::DnType::CommonName, format!("system:node:{name}"));
    let csr = params.serialize_request(&key).map_err(bad)?;
    Ok((key.serialize_pem(), csr.pem().map_err(bad)?))
}

/// The kubeconfig of the node's own credentials: the bootstrap kubeconfig's cluster, and the
/// client certificate in `pem`.
pub fn node_kubeconfig(bootstrap: &kube::config::Kubeconfig, pem: &Path) -> Result<String, Error> {
    let context = bootstrap.current_context.as_deref();
    let cluster_name = bootstrap
        .contexts
        .iter()
        .find(|c| Some(c.name.as_str()) == context)
        .and_then(|c| c.context.as_ref())
        .map(|c| c.cluster.clone());
    let cluster = bootstrap
        .clusters
        .iter()
        .find(|c| cluster_name.as_deref().is_none_or(|n| n == c.name))
        .and_then(|c| c.cluster.clone())
        .ok_or_else(|| Error::Config("the bootstrap kubeconfig names no cluster".into()))?;
    let server =
        cluster.server.ok_or_else(|| Error::Config("the bootstrap kubeconfig's cluster has no server".into()))?;
    let ca = match (&cluster.certificate_authority, &cluster.certificate_authority_data) {
        (Some(file), _) => format!("certificate-authority: {file:?}"),
        (None, Some(data)) => format!("certificate-authority-data: {data}"),
        (None, None) => String::new(),
    };
    let pem = pem.display();
    Ok(format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: default-cluster\n  cluster:\n    server: {server:?}\n    {ca}\nusers:\n- name: default-auth\n  user:\n    client-certificate: {pem:?}\n    client-key: {pem:?}\ncontexts:\n- name: default-context\n  context: {{cluster: default-cluster, user: default-auth}}\ncurrent-context: default-context\n"
    ))
}

/// Writes `text` to `path` (mode 0600) through a temporary file and a rename.
pub(crate) fn write_private(path: &Path, text: &str) -> Result<(), Error> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let io = |e: std::io::Error| Error::Config(format!("write {}: {e}", path.display()));
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(io)?;
    }
    let tmp = path.with_extension("tmp");
    let mut f =
        std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(&tmp).map_err(io)?;
    f.write_all(text.as_bytes()).and_then(|_| f.sync_all()).map_err(io)?;
    std::fs::rename(&tmp, path).map_err(io)
}

/// Makes sure `kubeconfig` holds node credentials: if it does not exist yet, asks for a
/// client certificate with the bootstrap kubeconfig's credentials (retrying until the API
/// server answers and the request is approved and signed) and writes it.
pub async fn bootstrap(bootstrap_path: &Path, kubeconfig: &Path, cert_dir: &Path, name: &str) -> Result<(), Error> {
    if kubeconfig.exists() {
        return Ok(());
    }
    let (file, config) = super::client::load(bootstrap_path, "bootstrap kubeconfig").await?;
    let client = kube::Client::try_from(config)
        .map_err(|e| Error::Config(format!("bootstrap kubeconfig {}: {e}", bootstrap_path.display())))?;
    let text = issue(&client, name, &Purpose::Client).await?;
    let pem = client_pem(cert_dir);
    write_private(&pem, &text)?;
    write_private(kubeconfig, &node_kubeconfig(&file, &pem)?)?;
    tracing::info!(kubeconfig = %kubeconfig.display(), certificate = %pem.display(), "client certificate issued");
    Ok(())
}

/// Asks for a certificate for node `name` through `client` (bootstrap credentials, or the
/// node's own when it rotates or wants a serving certificate): a new key, a CSR for the
/// purpose's signer, and the wait until it is approved and signed (retrying while the API
/// server does not answer). The certificate and key, as PEM.
pub async fn issue(client: &kube::Client, name: &str, purpose: &Purpose) -> Result<String, Error> {
    let (key, csr) = request(name, purpose)?;
    let signer = purpose.signer();
    let csrs: Api<CertificateSigningRequest> = Api::all(client.clone());
    let object = CertificateSigningRequest {
        metadata: ObjectMeta { generate_name: Some("node-csr-".into()), ..Default::default() },
        spec: CertificateSigningRequestSpec {
            request: ByteString(csr.into_bytes()),
            signer_name: signer.into(),
            usages: Some(purpose.usages()),
            ..Default::default()
        },
        status: None,
    };
    let mut retry = Retry::default();
    let mut complaint = Complaint::default();
    let created = loop {
        match csrs.create(&PostParams::default(), &object).await {
            Ok(c) => break c,
            Err(e) => complaint.failed(&format!("request a certificate from {signer}"), &e),
        }
        tokio::time::sleep(retry.delay()).await;
    };
    let csr_name = created.metadata.name.clone().unwrap_or_default();
    tracing::info!(csr = %csr_name, signer, "asked for a certificate; waiting for it to be approved and signed");
    let certificate = loop {
        match csrs.get(&csr_name).await {
            Ok(c) => {
                let status = c.status.unwrap_or_default();
                if let Some(denied) = status
                    .conditions
                    .iter()
                    .flatten()
                    .find(|c| (c.type_ == "Denied" || c.type_ == "Failed") && c.status == "True")
                {
                    return Err(Error::Config(format!(
                        "certificate request {csr_name} {}: {}",
                        denied.type_.to_lowercase(),
                        denied.message.clone().unwrap_or_default()
                    )));
                }
                if let Some(cert) = status.certificate.filter(|c| !c.0.is_empty()) {
                    break cert.0;
                }
            }
            Err(e) => complaint.failed(&format!("read certificate request {csr_name}"), &e),
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    Ok(format!("{}{key}", String::from_utf8_lossy(&certificate)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_request_names_the_node_and_the_kubeconfig_its_certificate() {
        let (key, csr) = request("edge-1", &Purpose::Client).unwrap();
        assert!(key.contains("PRIVATE KEY"));
        assert!(csr.starts_with("-----BEGIN CERTIFICATE REQUEST-----"));
        // A serving request names the node's addresses and names.
        let serving = Purpose::Serving { ips: vec!["10.0.0.7".parse().unwrap()], names: vec!["edge-1".into()] };
        let (_, csr) = request("edge-1", &serving).unwrap();
        use rustls::pki_types::pem::PemObject;
        use x509_parser::prelude::FromDer;
        let der = rustls::pki_types::CertificateSigningRequestDer::from_pem_slice(csr.as_bytes()).unwrap();
        let (_, parsed) = x509_parser::certification_request::X509CertificationRequest::from_der(der.as_ref()).unwrap();
        let sans: Vec<String> = parsed
            .requested_extensions()
            .into_iter()
            .flatten()
            .filter_map(|e| match e {
                x509_parser::extensions::ParsedExtension::SubjectAlternativeName(s) => Some(s),
                _ => None,
            })
            .flat_map(|s| s.general_names.iter().map(|n| n.to_string()))
            .collect();
        assert_eq!(sans, ["IPAddress(0a:00:00:07)", "DNSName(edge-1)"], "10.0.0.7 and the name");
        assert_eq!(serving.usages(), ["digital signature", "server auth"]);
        assert_eq!(serving.signer(), "kubernetes.io/kubelet-serving");
        let bootstrap: kube::config::Kubeconfig = serde_yaml::from_str(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: c\n  cluster: {server: \"https://10.0.0.1:6443\", certificate-authority: /etc/ca.crt}\nusers:\n- name: u\n  user: {token: abcdef.0123456789abcdef}\ncontexts:\n- name: x\n  context: {cluster: c, user: u}\ncurrent-context: x\n",
        )
        .unwrap();
        let text = node_kubeconfig(&bootstrap, Path::new("/var/lib/wasmlet/pki/kubelet-client-current.pem")).unwrap();
        let parsed: kube::config::Kubeconfig = serde_yaml::from_str(&text).unwrap();
        let cluster = parsed.clusters[0].cluster.clone().unwrap();
        assert_eq!(cluster.server.as_deref(), Some("https://10.0.0.1:6443"));
        assert_eq!(cluster.certificate_authority.as_deref(), Some("/etc/ca.crt"));
        let user = parsed.auth_infos[0].auth_info.clone().unwrap();
        assert_eq!(user.client_certificate.as_deref(), Some("/var/lib/wasmlet/pki/kubelet-client-current.pem"));
        assert!(user.token.is_none(), "no bootstrap token in the node's kubeconfig");
    }
}
