//! The drill's Kubernetes API client: just enough of the API to write, list and delete the
//! probe's ConfigMaps and to ask `/readyz`, with the credentials of the cluster's admin
//! kubeconfig (`imagebuilder kubeconfig`, fetched over the authenticated coordinator).
//!
//! Credentials, as the kubeconfig gives them:
//! - `token:` is sent as `Authorization: Bearer`;
//! - `client-certificate-data` + `client-key-data` (what `microk8s config` hands out) are
//!   presented as the TLS client certificate;
//! - the MicroK8s simulator's kubeconfig holds placeholder PEM blocks that are no X.509
//!   certificate: its `client-certificate-data` value is then sent as the bearer token, which
//!   is what the simulator's API takes instead (tests/microk8s-sim `daemon/api_server.rs`).
//!
//! The server certificate is checked against the kubeconfig's `certificate-authority-data`
//! when that is a certificate (a real cluster). The simulator's is a placeholder: the server
//! certificate is then not checked ([`ApiClient::verified`] is false and the report says so),
//! and only the simulator's placeholder credential is sent over that connection.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use base64::Engine as _;
use rackseed_protocol::tls::PeerCertVerifier;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

/// Namespace of the probe's objects.
pub const PROBE_NAMESPACE: &str = "default";

/// What the kubeconfig says about the server and the user.
#[derive(Clone)]
pub struct Credentials {
    /// `certificate-authority-data`, decoded.
    pub ca_pem: Option<Vec<u8>>,
    pub token: Option<String>,
    pub client_cert_b64: Option<String>,
    pub client_cert_pem: Option<Vec<u8>>,
    pub client_key_pem: Option<Vec<u8>>,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Credentials(<redacted>)")
    }
}

impl Credentials {
    /// Reads the current context's cluster CA and user credentials (the first of each when
    /// there is no current context).
    pub fn from_kubeconfig(text: &str) -> Result<Credentials> {
        let doc: serde_yaml::Value =
            serde_yaml::from_str(text).context("the kubeconfig is not valid YAML")?;
        let first = |list: &str, inner: &str| -> Option<serde_yaml::Value> {
            doc.get(list)?.as_sequence()?.first()?.get(inner).cloned()
        };
        let cluster = first("clusters", "cluster").context("the kubeconfig has no cluster")?;
        let user = first("users", "user").context("the kubeconfig has no user")?;
        let b64 = |v: Option<&serde_yaml::Value>| -> Result<Option<Vec<u8>>> {
            match v.and_then(|v| v.as_str()) {
                None => Ok(None),
                Some(s) => Ok(Some(
                    base64::engine::general_purpose::STANDARD
                        .decode(s.trim())
                        .context("a kubeconfig *-data field is not base64")?,
                )),
            }
        };
        let creds = Credentials {
            ca_pem: b64(cluster.get("certificate-authority-data"))?,
            token: user
                .get("token")
                .and_then(|t| t.as_str())
                .map(str::to_owned),
            client_cert_b64: user
                .get("client-certificate-data")
                .and_then(|t| t.as_str())
                .map(|s| s.trim().to_owned()),
            client_cert_pem: b64(user.get("client-certificate-data"))?,
            client_key_pem: b64(user.get("client-key-data"))?,
        };
        if creds.token.is_none() && creds.client_cert_pem.is_none() {
            bail!("the kubeconfig's user has neither a token nor a client certificate");
        }
        Ok(creds)
    }
}

/// One API server endpoint and how to talk to it.
#[derive(Clone)]
pub struct ApiClient {
    http: reqwest::Client,
    bearer: Option<String>,
    /// Whether the server certificate is checked against the kubeconfig's CA.
    pub verified: bool,
    timeout: Duration,
}

impl std::fmt::Debug for ApiClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApiClient")
            .field("verified", &self.verified)
            .finish_non_exhaustive()
    }
}

/// An answer: status code and JSON body (`Null` when the body was not JSON).
pub type Answer = (u16, serde_json::Value);

impl ApiClient {
    /// A client for `creds`, each request bounded by `timeout`.
    pub fn new(creds: &Credentials, timeout: Duration) -> Result<ApiClient> {
        let builder = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .context("TLS protocol versions")?;
        let ca = pem_certificates(creds.ca_pem.as_deref());
        // A placeholder (the simulator's) decodes to bytes that are no certificate.
        let mut roots = rustls::RootCertStore::empty();
        for c in ca {
            let _ = roots.add(c);
        }
        let verified = !roots.is_empty();
        let builder = if verified {
            builder.with_root_certificates(roots)
        } else {
            // Any server certificate, its handshake signature still checked: only for the
            // simulator's placeholder CA (module docs).
            builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(PeerCertVerifier::accepting_any()))
        };
        let client_chain = pem_certificates(creds.client_cert_pem.as_deref());
        let key = creds
            .client_key_pem
            .as_deref()
            .and_then(|pem| PrivateKeyDer::from_pem_slice(pem).ok());
        let with_cert = match (client_chain.is_empty(), key) {
            (false, Some(key)) => builder
                .clone()
                .with_client_auth_cert(client_chain, key)
                .ok(),
            _ => None,
        };
        let (config, bearer) = match with_cert {
            Some(config) => (config, creds.token.clone()),
            None => {
                // No usable certificate: a token, or the simulator's placeholder (module docs),
                // sent only where the CA is a placeholder too.
                let bearer = creds
                    .token
                    .clone()
                    .or_else(|| (!verified).then(|| creds.client_cert_b64.clone()).flatten());
                if bearer.is_none() {
                    bail!("the kubeconfig's client certificate or key cannot be read");
                }
                (builder.with_no_client_auth(), bearer)
            }
        };
        let http = reqwest::Client::builder()
            .use_preconfigured_tls(config)
            .timeout(timeout)
            .connect_timeout(timeout)
            .pool_max_idle_per_host(0)
            .build()
            .context("building the API client")?;
        Ok(ApiClient {
            http,
            bearer,
            verified,
            timeout,
        })
    }

    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    async fn call(
        &self,
        method: reqwest::Method,
        at: SocketAddr,
        path: &str,
        body: Option<&serde_json::Value>,
    ) -> Result<Answer> {
        let url = match at.ip() {
            IpAddr::V4(v4) => format!("https://{v4}:{}{path}", at.port()),
            IpAddr::V6(v6) => format!("https://[{v6}]:{}{path}", at.port()),
        };
        let mut req = self.http.request(method, &url);
        if let Some(b) = &self.bearer {
            req = req.bearer_auth(b);
        }
        if let Some(body) = body {
            req = req
                .header("Content-Type", "application/json")
                .body(body.to_string());
        }
        let resp = req.send().await.with_context(|| format!("{at}"))?;
        let status = resp.status().as_u16();
        let bytes = resp
            .bytes()
            .await
            .with_context(|| format!("{at}: reading"))?;
        Ok((
            status,
            serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::Null),
        ))
    }

    /// `GET /readyz` (anonymous in kube-apiserver; sent with the credentials anyway).
    pub async fn readyz(&self, at: SocketAddr) -> Result<u16> {
        Ok(self
            .call(reqwest::Method::GET, at, "/readyz", None)
            .await?
            .0)
    }

    /// Creates ConfigMap `name` with `data`.
    pub async fn create_configmap(
        &self,
        at: SocketAddr,
        name: &str,
        data: &serde_json::Value,
    ) -> Result<Answer> {
        let body = serde_json::json!({
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {"name": name, "namespace": PROBE_NAMESPACE},
            "data": data,
        });
        self.call(
            reqwest::Method::POST,
            at,
            &format!("/api/v1/namespaces/{PROBE_NAMESPACE}/configmaps"),
            Some(&body),
        )
        .await
    }

    /// The names of the ConfigMaps in the probe's namespace.
    pub async fn list_configmaps(&self, at: SocketAddr) -> Result<Vec<String>> {
        let (status, body) = self
            .call(
                reqwest::Method::GET,
                at,
                &format!("/api/v1/namespaces/{PROBE_NAMESPACE}/configmaps"),
                None,
            )
            .await?;
        if status != 200 {
            bail!(
                "{at}: listing ConfigMaps answered {status}: {}",
                body["message"]
            );
        }
        Ok(body["items"]
            .as_array()
            .map(|items| {
                items
                    .iter()
                    .filter_map(|i| i["metadata"]["name"].as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default())
    }

    /// Deletes ConfigMap `name`.
    pub async fn delete_configmap(&self, at: SocketAddr, name: &str) -> Result<u16> {
        Ok(self
            .call(
                reqwest::Method::DELETE,
                at,
                &format!("/api/v1/namespaces/{PROBE_NAMESPACE}/configmaps/{name}"),
                None,
            )
            .await?
            .0)
    }
}

/// The certificates in a kubeconfig's PEM field (none when it is absent or holds none).
fn pem_certificates(pem: Option<&[u8]>) -> Vec<CertificateDer<'static>> {
    pem.map(|pem| {
        CertificateDer::pem_slice_iter(pem)
            .filter_map(Result::ok)
            .collect()
    })
    .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    const SIM: &str = "apiVersion: v1
clusters:
- cluster:
    certificate-authority-data: LS0tLS1CRUdJTiBDRVJUSUZJQ0FURS0tLS0tCnNpbXVsYXRlZCBDQQotLS0tLUVORCBDRVJUSUZJQ0FURS0tLS0tCg==
    server: https://10.0.0.1:16443
  name: microk8s-cluster
users:
- name: admin
  user:
    client-certificate-data: LS0tLS1CRUdJTiBDRVJUSUZJQ0FURS0tLS0tCnNpbXVsYXRlZCBhZG1pbgotLS0tLUVORCBDRVJUSUZJQ0FURS0tLS0tCg==
    client-key-data: LS0tLS1CRUdJTiBSU0EgUFJJVkFURSBLRVktLS0tLQpzaW0KLS0tLS1FTkQgUlNBIFBSSVZBVEUgS0VZLS0tLS0K
";

    #[test]
    fn the_simulators_placeholder_credential_goes_as_a_bearer_over_an_unverified_connection() {
        let c = Credentials::from_kubeconfig(SIM).unwrap();
        assert!(!format!("{c:?}").contains("LS0t"));
        let api = ApiClient::new(&c, Duration::from_secs(1)).unwrap();
        assert!(!api.verified);
        assert_eq!(api.bearer.as_deref(), c.client_cert_b64.as_deref());
    }

    #[test]
    fn a_token_is_the_bearer_and_bad_kubeconfigs_are_errors() {
        let k = SIM.replace(
            "    client-certificate-data: LS0tLS1CRUdJTiBDRVJUSUZJQ0FURS0tLS0tCnNpbXVsYXRlZCBhZG1pbgotLS0tLUVORCBDRVJUSUZJQ0FURS0tLS0tCg==\n    client-key-data: LS0tLS1CRUdJTiBSU0EgUFJJVkFURSBLRVktLS0tLQpzaW0KLS0tLS1FTkQgUlNBIFBSSVZBVEUgS0VZLS0tLS0K\n",
            "    token: abc\n",
        );
        let c = Credentials::from_kubeconfig(&k).unwrap();
        let api = ApiClient::new(&c, Duration::from_secs(1)).unwrap();
        assert_eq!(api.bearer.as_deref(), Some("abc"));
        assert!(Credentials::from_kubeconfig("users: [").is_err());
        assert!(
            Credentials::from_kubeconfig(&k.replace("    token: abc\n", "    x: 1\n")).is_err()
        );
    }
}
