//! `microk8s join`, the joiner's side (A3, A4): the connection string, the certificate
//! fingerprint check, the join request, a worker's two certificate signings, the modelled
//! `update_dqlite` delay and the view the seed answers with. Errors print what join.py prints,
//! with its exit codes.
//!
//! A worker (join.py `join_dqlite_worker_node`) has the seed sign its kubelet and kube-proxy
//! certificates (`get_client_cert`: `POST /cluster/api/v1.0/sign-cert` with the token
//! `<token>-kubelet` or `<token>-proxy`); a refusal prints `Failed to sign <name> certificate
//! (<status>). <error>` and exits 1, as join.py does.
//!
//! As join.py's `join_request`, the fingerprint is checked on the connection that carries the
//! join request, after the TLS handshake and before the request (and so the token) is written:
//! a peer whose certificate does not match receives nothing (exit 4). A failed handshake is
//! join.py's `ssl.SSLError` (exit 4) whether or not a fingerprint was given.

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use serde_json::json;

use super::{Daemon, Out, FINGERPRINT_MIN_LEN, TOKEN_MIN_LEN};
use crate::agent_cert::sha256_hex;
use crate::http::{self, ClientError};
use crate::model::View;

impl Daemon {
    pub(super) async fn cmd_join(&self, args: &[&str]) -> Out {
        let opts = match JoinOptions::parse(args) {
            Ok(o) => o,
            Err(usage) => return usage,
        };
        let (ip, port, token, fp) = match valid_connection_parts(opts.connection) {
            Ok(p) => p,
            Err(e) => return Out::fail(1, format!("Invalid connection: {e}\n")),
        };
        let connect = self.env.connect_timeout;
        let seed = Seed {
            ip,
            addr: SocketAddr::new(ip, port),
            connect,
            total: connect + Duration::from_secs(30),
        };
        let mut stdout = format!("Contacting cluster at {ip}\n");
        match self
            .join_via(&seed, &opts, &token, fp.as_deref(), &mut stdout)
            .await
        {
            Ok(()) => Out::ok(stdout),
            Err(failed) => failed,
        }
    }

    /// The join after the connection string was parsed; `stdout` is what join.py printed so
    /// far, and is part of every failure's output.
    async fn join_via(
        &self,
        seed: &Seed,
        opts: &JoinOptions<'_>,
        token: &str,
        fingerprint: Option<&str>,
        stdout: &mut String,
    ) -> Result<(), Out> {
        let fingerprint = fingerprint.filter(|_| !opts.skip_verify);
        let answer = self
            .request_join(seed, opts, token, fingerprint, stdout)
            .await?;
        if opts.controlplane {
            // join.py takes the worker path ("as-master" is truthy), sees ca_key and gives up
            // after the token was consumed (A3).
            let _ = seed
                .call("POST", "/sim/v1/join-abort", Some(&json!({})))
                .await;
            stdout
                .push_str("Make sure the cluster you connect to supports joining worker nodes.\n");
            return Err(Out::fail(1, stdout.clone()));
        }
        if opts.worker {
            for name in ["kubelet", "proxy"] {
                sign_certificate(seed, token, name, stdout).await?;
            }
        }
        // update_dqlite / worker configuration (A4), modelled as a delay.
        tokio::time::sleep(self.env.join_delay).await;
        let view = self.finish_join(seed, opts.worker, stdout).await?;
        self.adopt_view(&answer, opts.worker, view, seed.ip);
        if opts.worker {
            stdout.push_str("The node has joined the cluster and will appear in the nodes list in a few seconds.\n\nThis worker node gets automatically configured with the API server endpoints.\nIf the API servers are behind a loadbalancer please set the '--refresh-interval' to '0s' in:\n    /var/snap/microk8s/current/args/apiserver-proxy\n");
        } else {
            stdout.push_str("Successfully joined the cluster.\n");
        }
        Ok(())
    }

    /// `POST /cluster/api/v2.0/join`, sent only to a peer whose certificate matches
    /// `fingerprint` (when given); returns the seed's answer.
    async fn request_join(
        &self,
        seed: &Seed,
        opts: &JoinOptions<'_>,
        token: &str,
        fingerprint: Option<&str>,
        stdout: &str,
    ) -> Result<serde_json::Value, Out> {
        let worker_field = if opts.worker {
            json!(true)
        } else if opts.controlplane {
            json!("as-master")
        } else {
            json!(false)
        };
        let req = json!({
            "token": token,
            "hostname": self.name().to_lowercase(),
            "port": self.env.port.to_string(),
            "worker": worker_field,
            "can_handle_x509_auth": true,
            "can_handle_custom_etcd": true,
        });
        match seed
            .call_verified(fingerprint, "POST", "/cluster/api/v2.0/join", Some(&req))
            .await
        {
            Ok((200, r)) => Ok(r),
            Ok((status, r)) => {
                let msg = match r["error"].as_str() {
                    Some(e) => format!("Connection failed. {e}"),
                    None => "Connection failed.".to_owned(),
                };
                Err(Out::fail(6, format!("{stdout}{msg} ({status}).\n")))
            }
            Err(ClientError::Unverified { .. }) => Err(Out::fail(
                4,
                format!(
                    "{stdout}Joining cluster failed. Could not verify the identity of {}. Use '--skip-verify' to skip server certificate check.\n",
                    seed.ip
                ),
            )),
            Err(e) => Err(unreachable(e, stdout.to_owned())),
        }
    }

    /// Tells the seed the joiner is done; returns the cluster's view with it as a member.
    async fn finish_join(&self, seed: &Seed, worker: bool, stdout: &str) -> Result<View, Out> {
        let done = json!({"name": self.name(), "worker": worker});
        match seed.call("POST", "/sim/v1/join-done", Some(&done)).await {
            Ok((200, v)) => serde_json::from_value::<View>(v)
                .map_err(|e| Out::fail(1, format!("{stdout}Joining the cluster failed: {e}\n"))),
            Ok((s, r)) => Err(Out::fail(
                1,
                format!(
                    "{stdout}Waiting for node to join the cluster failed ({s}): {}\n",
                    r["error"]
                ),
            )),
            Err(e) => Err(unreachable(e, stdout.to_owned())),
        }
    }

    /// Takes the joined cluster's view as this node's, with the address the seed saw; the seed
    /// is the one peer known alive.
    fn adopt_view(&self, answer: &serde_json::Value, worker: bool, view: View, seed: IpAddr) {
        {
            let mut st = self.lock();
            st.my_ip = answer["hostname_override"]
                .as_str()
                .and_then(|s| s.parse().ok());
            st.worker = worker;
            st.view = view;
            self.persist(&st);
        }
        // The seed just answered. (Lock order: state before last_seen, never the reverse.)
        let seed_name = self
            .lock()
            .view
            .entries
            .iter()
            .find(|e| e.ip == Some(seed))
            .map(|e| e.name.clone());
        let mut seen = self.last_seen.lock().unwrap_or_else(|p| p.into_inner());
        seen.clear();
        if let Some(n) = seed_name {
            seen.insert(n, Instant::now());
        }
    }
}

/// join.py's `get_client_cert` for certificate `name`: the seed signs a request with the token
/// the join issued for it.
async fn sign_certificate(
    seed: &Seed,
    token: &str,
    name: &str,
    stdout: &mut String,
) -> Result<(), Out> {
    let req = json!({
        "token": format!("{token}-{name}"),
        "request": format!("-----BEGIN CERTIFICATE REQUEST-----\nsimulated {name}\n-----END CERTIFICATE REQUEST-----\n"),
    });
    match seed
        .call("POST", "/cluster/api/v1.0/sign-cert", Some(&req))
        .await
    {
        Ok((200, _)) => Ok(()),
        Ok((status, r)) => {
            let mut line = format!("Failed to sign {name} certificate ({status}).");
            if let Some(e) = r["error"].as_str() {
                line = format!("{line} {e}");
            }
            stdout.push_str(&line);
            stdout.push('\n');
            Err(Out::fail(1, stdout.clone()))
        }
        Err(e) => Err(unreachable(e, stdout.clone())),
    }
}

/// `microk8s join CONNECTION [--worker] [--controlplane] [--skip-verify]`.
struct JoinOptions<'a> {
    connection: &'a str,
    worker: bool,
    controlplane: bool,
    skip_verify: bool,
}

impl<'a> JoinOptions<'a> {
    /// The options, or the usage error join.py's click parser prints.
    fn parse(args: &[&'a str]) -> Result<Self, Out> {
        let mut url: Option<&str> = None;
        let (mut worker, mut controlplane, mut skip_verify) = (false, false, false);
        for a in args {
            match *a {
                "--worker" => worker = true,
                "--controlplane" => controlplane = true,
                "--skip-verify" => skip_verify = true,
                "--disable-low-memory-guard" => {}
                s if !s.starts_with('-') && url.is_none() => url = Some(s),
                other => return Err(Out::err(2, format!("Error: No such option: {other}\n"))),
            }
        }
        let Some(connection) = url else {
            return Err(Out::err(2, "Error: Missing argument 'CONNECTION'.\n"));
        };
        Ok(JoinOptions {
            connection,
            worker,
            controlplane,
            skip_verify,
        })
    }
}

/// The node being joined, and the joiner's timeouts for talking to it.
struct Seed {
    ip: IpAddr,
    addr: SocketAddr,
    connect: Duration,
    total: Duration,
}

impl Seed {
    /// A request to the seed's agent, over TLS without a certificate check.
    async fn call(
        &self,
        method: &str,
        path: &str,
        body: Option<&serde_json::Value>,
    ) -> Result<(u16, serde_json::Value), ClientError> {
        self.call_verified(None, method, path, body).await
    }

    /// A request written only after the seed's certificate matched `fingerprint` (when given).
    async fn call_verified(
        &self,
        fingerprint: Option<&str>,
        method: &str,
        path: &str,
        body: Option<&serde_json::Value>,
    ) -> Result<(u16, serde_json::Value), ClientError> {
        http::request(
            self.addr,
            fingerprint,
            method,
            path,
            body,
            self.connect,
            self.total,
        )
        .await
    }
}

/// The traceback join.py dies with when the seed cannot be reached (exit 1), its message when
/// the TLS handshake failed (`ssl.SSLError`, exit 4), or when the exchange broke after
/// connecting (exit 5).
fn unreachable(e: ClientError, stdout: String) -> Out {
    let line = match e {
        ClientError::Tls(t) => {
            return Out::fail(
                4,
                format!("{stdout}Peer node verification failed with {t}.\n"),
            )
        }
        ClientError::Unverified { sha256 } => {
            return Out::fail(
                4,
                format!("{stdout}Peer node verification failed with certificate {sha256}.\n"),
            )
        }
        ClientError::ConnectTimeout => "TimeoutError: [Errno 110] Connection timed out".to_owned(),
        ClientError::Connect(e) => match e.kind() {
            std::io::ErrorKind::ConnectionRefused => {
                "ConnectionRefusedError: [Errno 111] Connection refused".to_owned()
            }
            _ => format!("OSError: [Errno {}] {e}", e.raw_os_error().unwrap_or(0)),
        },
        ClientError::Protocol(p) => {
            return Out {
                code: 5,
                stdout: format!("{stdout}Connecting to cluster failed with {p}.\n"),
                stderr: String::new(),
            }
        }
    };
    Out {
        code: 1,
        stdout,
        stderr: format!("Traceback (most recent call last):\n  File \"/snap/microk8s/current/scripts/wrappers/join.py\", in get_connection_info\n    conn.connect()\n{line}\n"),
    }
}

/// The first 12 hex digits of the SHA-256 of the agent's DER certificate (given as hex), as
/// `server_cert_check` prints it (A1).
pub fn fingerprint_of(cert_hex: &str) -> String {
    let der = hex::decode(cert_hex).unwrap_or_default();
    sha256_hex(&der)[..FINGERPRINT_MIN_LEN].to_owned()
}

/// join.py's `get_valid_connection_parts` (A3): `IP:PORT/TOKEN[/FINGERPRINT]`, IP literal only
/// (the host part is split on ':', so IPv6 never passes), port 1–65535, token >= 32, fingerprint
/// >= 12. Errors carry join.py's messages.
pub fn valid_connection_parts(
    connection: &str,
) -> Result<(IpAddr, u16, String, Option<String>), String> {
    const FORMAT: &str = "Expected format: <master_IP>:<master_PORT>/<token>[/<fingerprint>]";
    let parts: Vec<&str> = connection.split('/').collect();
    if !(2..=3).contains(&parts.len()) {
        return Err(FORMAT.into());
    }
    let ep: Vec<&str> = parts[0].split(':').collect();
    if ep.len() != 2 {
        return Err(FORMAT.into());
    }
    let ip: IpAddr = ep[0].parse().map_err(|_| "Invalid master IP".to_owned())?;
    let port: i64 = ep[1]
        .parse()
        .map_err(|_| "Master PORT not a number".to_owned())?;
    if !(1..=65535).contains(&port) {
        return Err("Master PORT not in range 1:65535".into());
    }
    if parts[1].len() < TOKEN_MIN_LEN {
        return Err(format!(
            "Cluster token size should be at least {TOKEN_MIN_LEN} bytes"
        ));
    }
    if parts.len() == 3 && parts[2].len() < FINGERPRINT_MIN_LEN {
        return Err(format!(
            "Fingerprint should be at least {FINGERPRINT_MIN_LEN} bytes"
        ));
    }
    Ok((
        ip,
        port as u16,
        parts[1].to_owned(),
        parts.get(2).map(|s| s.to_string()),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connection_parts_follow_join_py() {
        let t = "a".repeat(32);
        assert!(valid_connection_parts(&format!("10.0.0.1:25000/{t}")).is_ok());
        assert_eq!(
            valid_connection_parts(&format!("node-a.local:25000/{t}")).unwrap_err(),
            "Invalid master IP"
        );
        assert!(valid_connection_parts(&format!("[fd00::1]:25000/{t}")).is_err());
        assert!(valid_connection_parts(&format!("fd00::1:25000/{t}")).is_err());
        assert_eq!(
            valid_connection_parts(&format!("10.0.0.1:0/{t}")).unwrap_err(),
            "Master PORT not in range 1:65535"
        );
        assert_eq!(
            valid_connection_parts(&format!("10.0.0.1:x/{t}")).unwrap_err(),
            "Master PORT not a number"
        );
        assert!(valid_connection_parts("10.0.0.1:25000/short")
            .unwrap_err()
            .contains("at least 32"));
        assert!(valid_connection_parts(&format!("10.0.0.1:25000/{t}/abc"))
            .unwrap_err()
            .contains("Fingerprint"));
        assert!(valid_connection_parts(&format!("10.0.0.1:25000/{t}/0123456789ab")).is_ok());
        assert!(valid_connection_parts(&format!("10.0.0.1:25000/{t}/a/b")).is_err());
    }
}
