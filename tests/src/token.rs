//! A Docker registry token server for the bearer flow tests: the registry answers 401 with a
//! `Bearer realm=...` challenge, the client asks this server for a token with its user name and
//! password, and presents the token. Tokens are ES256 JWTs carrying the signing certificate in
//! `x5c`; the registry trusts that certificate (`auth.token.rootcertbundle`). The key and the
//! self-signed certificate come from the `openssl` command.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail};
use base64::Engine;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use ring::rand::SystemRandom;
use ring::signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair};

/// The `service` and `issuer` the registry is configured with.
pub const SERVICE: &str = "wasmlet-test-registry";
pub const ISSUER: &str = "wasmlet-test-issuer";

/// A running token server.
pub struct TokenServer {
    /// `http://127.0.0.1:PORT/token`.
    pub realm: String,
    /// Tokens issued so far.
    pub issued: Arc<AtomicUsize>,
    /// Requests refused (wrong or missing credentials).
    pub refused: Arc<AtomicUsize>,
    signer: Arc<Signer>,
    stop: Arc<AtomicBool>,
    addr: std::net::SocketAddr,
}

struct Signer {
    key: EcdsaKeyPair,
    cert_der: Vec<u8>,
    user: String,
    password: String,
}

fn openssl(args: &[&str]) -> Result<()> {
    let out = Command::new("openssl").args(args).output().context("run openssl (apt-get install openssl)")?;
    if !out.status.success() {
        bail!("openssl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(())
}

impl TokenServer {
    /// Makes a key and certificate in `dir` (the registry reads `dir/token-cert.pem`) and starts
    /// serving tokens to `user` with `password`.
    pub async fn start(dir: &Path, user: &str, password: &str) -> Result<TokenServer> {
        let key_pem = dir.join("token-key.pem");
        let cert_pem = dir.join("token-cert.pem");
        let key_der = dir.join("token-key.der");
        let cert_der = dir.join("token-cert.der");
        let s = |p: &Path| p.to_str().expect("utf-8 path").to_string();
        openssl(&[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-days",
            "2",
            "-subj",
            "/CN=wasmlet test token issuer",
            "-keyout",
            &s(&key_pem),
            "-out",
            &s(&cert_pem),
        ])?;
        openssl(&["pkcs8", "-topk8", "-nocrypt", "-in", &s(&key_pem), "-outform", "DER", "-out", &s(&key_der)])?;
        openssl(&["x509", "-in", &s(&cert_pem), "-outform", "DER", "-out", &s(&cert_der)])?;
        let key =
            EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &std::fs::read(&key_der)?, &SystemRandom::new())
                .map_err(|e| anyhow::anyhow!("token key: {e}"))?;
        let signer = Arc::new(Signer {
            key,
            cert_der: std::fs::read(&cert_der)?,
            user: user.to_string(),
            password: password.to_string(),
        });
        // Its own thread with blocking I/O: a test may block its runtime on a `wasmlet` command
        // that is waiting for a token.
        let listener = TcpListener::bind("127.0.0.1:0")?;
        let addr = listener.local_addr()?;
        let realm = format!("http://{addr}/token");
        let issued = Arc::new(AtomicUsize::new(0));
        let refused = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (sg, is, rf, st) = (signer.clone(), issued.clone(), refused.clone(), stop.clone());
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                if st.load(Ordering::SeqCst) {
                    return;
                }
                if let Ok(conn) = conn {
                    sg.serve(conn, &is, &rf);
                }
            }
        });
        Ok(TokenServer { realm, issued, refused, signer, stop, addr })
    }

    /// The registry config lines that make it send clients here.
    pub fn registry_auth_config(&self, dir: &Path) -> String {
        format!(
            "auth:\n  token:\n    realm: {}\n    service: {SERVICE}\n    issuer: {ISSUER}\n    rootcertbundle: {}\n",
            self.realm,
            dir.join("token-cert.pem").display()
        )
    }

    /// A token granting `actions` on `repository`, as a client that already has one would
    /// present it (the CRI AuthConfig's registry_token).
    pub fn mint(&self, repository: &str, actions: &[&str]) -> String {
        self.signer.sign(&[(repository.to_string(), actions.iter().map(|a| a.to_string()).collect())])
    }
}

impl Drop for TokenServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wake the accept loop so it sees the flag.
        let _ = TcpStream::connect(self.addr);
    }
}

impl Signer {
    /// Answers one HTTP request on `conn`.
    fn serve(&self, mut conn: TcpStream, issued: &AtomicUsize, refused: &AtomicUsize) {
        let _ = conn.set_read_timeout(Some(std::time::Duration::from_secs(10)));
        let mut buf = Vec::new();
        let mut chunk = [0u8; 4096];
        while !buf.windows(4).any(|w| w == b"\r\n\r\n") && buf.len() < 65536 {
            match conn.read(&mut chunk) {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
        let (status, body) = match self.answer(&String::from_utf8_lossy(&buf)) {
            Some(token) => {
                issued.fetch_add(1, Ordering::SeqCst);
                ("200 OK", format!(r#"{{"token":"{token}","access_token":"{token}","expires_in":300}}"#))
            }
            None => {
                refused.fetch_add(1, Ordering::SeqCst);
                ("401 Unauthorized", r#"{"errors":[{"code":"UNAUTHORIZED","message":"bad credentials"}]}"#.to_string())
            }
        };
        let response = format!(
            "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
        let _ = conn.write_all(response.as_bytes());
    }

    /// The token for a `GET /token?service=..&scope=..` request with the right basic
    /// credentials; `None` to refuse it.
    fn answer(&self, request: &str) -> Option<String> {
        let target = request.lines().next()?.split(' ').nth(1)?;
        let expected = format!("Basic {}", STANDARD.encode(format!("{}:{}", self.user, self.password)));
        let authorized = request.lines().any(|l| {
            l.split_once(':').is_some_and(|(k, v)| k.eq_ignore_ascii_case("authorization") && v.trim() == expected)
        });
        if !authorized {
            return None;
        }
        let query = target.split_once('?').map(|(_, q)| q).unwrap_or("");
        let mut grants = Vec::new();
        for (k, v) in query.split('&').filter_map(|kv| kv.split_once('=')) {
            if k != "scope" {
                continue;
            }
            // repository:NAME:ACTION[,ACTION] (NAME may itself hold no colons here).
            let scope = percent_decode(v);
            let mut parts = scope.splitn(3, ':');
            let (Some("repository"), Some(name), Some(actions)) = (parts.next(), parts.next(), parts.next()) else {
                continue;
            };
            grants.push((name.to_string(), actions.split(',').map(str::to_string).collect()));
        }
        Some(self.sign(&grants))
    }

    fn sign(&self, grants: &[(String, Vec<String>)]) -> String {
        let now = SystemTime::now().duration_since(UNIX_EPOCH).expect("clock").as_secs();
        let header = serde_json::json!({"typ": "JWT", "alg": "ES256", "x5c": [STANDARD.encode(&self.cert_der)]});
        let access: Vec<_> = grants
            .iter()
            .map(|(name, actions)| serde_json::json!({"type": "repository", "name": name, "actions": actions}))
            .collect();
        let claims = serde_json::json!({
            "iss": ISSUER, "sub": self.user, "aud": SERVICE,
            "exp": now + 300, "nbf": now - 10, "iat": now,
            "jti": format!("{:x}", rand_u64()), "access": access,
        });
        let signing_input = format!(
            "{}.{}",
            URL_SAFE_NO_PAD.encode(serde_json::to_vec(&header).expect("json")),
            URL_SAFE_NO_PAD.encode(serde_json::to_vec(&claims).expect("json"))
        );
        let sig = self.key.sign(&SystemRandom::new(), signing_input.as_bytes()).expect("sign");
        format!("{signing_input}.{}", URL_SAFE_NO_PAD.encode(sig.as_ref()))
    }
}

fn rand_u64() -> u64 {
    let mut b = [0u8; 8];
    ring::rand::SecureRandom::fill(&SystemRandom::new(), &mut b).expect("random");
    u64::from_le_bytes(b)
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' if i + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).ok().and_then(|h| u8::from_str_radix(h, 16).ok());
                match hex {
                    Some(b) => {
                        out.push(b);
                        i += 3;
                        continue;
                    }
                    None => out.push(b'%'),
                }
            }
            b'+' => out.push(b' '),
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}
