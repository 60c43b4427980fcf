//! Keeping the floating API address (`cluster.api-address`): on every MicroK8s poll of a
//! control-plane member, the keepalived instance is brought in line with the members MicroK8s
//! lists ([`crate::system::keepalived`] renders, writes and reloads it), and the node's
//! [`ApiAddressView`] for the status document is rebuilt.
//!
//! The member list comes from `microk8s status` (every datastore node: voters, standbys and
//! spares run an API server). While MicroK8s is not ready (quorum lost) the last list is kept:
//! keepalived keeps running with it, and its health check, not the agent, releases the address.
//! With `"auto"`, the address is chosen once ([`super::api_auto`]) and kept in the state folder.
//! The VRRP router id and password come from the keyring's current secret ([`vrrp_key`]), so a
//! secret rotation moves keepalived along at the next poll.
//!
//! To change what the status shows, change [`ApiAddressKeeper::maintain`].

use std::net::IpAddr;
use std::sync::Mutex;

use rackseed_config::ApiAddress;
use rackseed_protocol::status::ApiAddressView;

use super::api_auto::PeerDocs;
use super::Agent;
use crate::system::keepalived::{self, Applied, Keepalived, VrrpSettings};
use crate::system::microk8s::Status;

/// The agent's side of the floating address: the keepalived process and what it last knew.
pub(super) struct ApiAddressKeeper {
    keepalived: tokio::sync::Mutex<Keepalived>,
    /// The control-plane members MicroK8s last listed.
    members: Mutex<Vec<IpAddr>>,
}

impl ApiAddressKeeper {
    /// `None` when the cluster has no floating address.
    pub(super) fn new(agent: &Agent) -> Option<ApiAddressKeeper> {
        agent.config.cluster.api_address?;
        Some(ApiAddressKeeper {
            keepalived: tokio::sync::Mutex::new(Keepalived::new(
                agent.keepalived.clone(),
                &agent.root,
            )),
            members: Mutex::new(Vec::new()),
        })
    }

    /// Brings keepalived in line and says how the address stands on this node.
    /// `control_plane_member`: the formation phase is member with the control-plane role.
    pub(super) async fn maintain(
        &self,
        agent: &Agent,
        control_plane_member: bool,
        status: Option<&Status>,
        peers: &[IpAddr],
        docs: &PeerDocs,
    ) -> ApiAddressView {
        let address = match agent.config.cluster.api_address {
            Some(ApiAddress::Fixed(ip)) => Ok(ip),
            Some(ApiAddress::Auto) => {
                super::api_auto::address(agent, docs, control_plane_member, peers).await
            }
            None => Err("no api-address configured".to_string()),
        };
        let mut view = ApiAddressView::default();
        let ip = match address {
            Ok(ip) => ip,
            Err(why) => {
                view.state = "no address yet".into();
                view.problem = Some(why);
                return view;
            }
        };
        view.address = Some(ip.to_string());
        view.in_certificate =
            matches!(agent.config.cluster.api_address, Some(ApiAddress::Fixed(_)));
        view.held_here = keepalived::holds(ip);
        if !control_plane_member {
            view.state = "not a control-plane member: never holds the address".into();
            return view;
        }
        // keepalived (or its health check's curl) missing is said at once, not only once
        // MicroK8s lists members: the node forms without holding the address.
        if let Some(why) = self.keepalived.lock().await.missing() {
            view.state = "cannot hold the address".into();
            view.problem = Some(why);
            return view;
        }
        let members = self.members(status);
        if members.is_empty() {
            view.state = "waiting for MicroK8s' member list".into();
            return view;
        }
        let local = super::effects::local_addresses(&agent.interfaces);
        let settings = match VrrpSettings::new(&vrrp_key(&agent.keyring), ip, &local, &members) {
            Ok(mut s) => {
                s.check_interval_s =
                    u32::try_from(agent.config.cluster.api_check_interval.as_secs().max(1))
                        .unwrap_or(1);
                s
            }
            Err(why) => {
                view.state = "cannot hold the address".into();
                view.problem = Some(why);
                return view;
            }
        };
        view.peers = settings.peers.iter().map(IpAddr::to_string).collect();
        let config = keepalived::render(
            &settings,
            &keepalived::health_check(settings.check_interval_s),
        );
        let mut k = self.keepalived.lock().await;
        match k.apply(&config).await {
            Ok(applied) => {
                if applied != Applied::Unchanged {
                    tracing::info!(
                        address = %ip,
                        peers = ?settings.peers,
                        priority = settings.priority,
                        ?applied,
                        "keepalived configured for the API address"
                    );
                }
            }
            Err(e) => {
                let why = format!("{e:#}");
                tracing::warn!(error = %why, "keepalived");
                view.state = "keepalived not running".into();
                view.problem = Some(why);
                return view;
            }
        }
        view.held_here = keepalived::holds(ip);
        view.state = if view.held_here {
            "holding (keepalived master)".into()
        } else {
            "standing by (keepalived backup, or fault while the local API is not ready)".into()
        };
        view
    }

    /// The datastore members' addresses from `status`, or the last ones known.
    fn members(&self, status: Option<&Status>) -> Vec<IpAddr> {
        let mut last = self.members.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(Status::Running(s)) = status {
            let now: Vec<IpAddr> = s
                .datastore
                .iter()
                .filter_map(|n| n.address.rsplit_once(':')?.0.parse().ok())
                .filter(|ip: &IpAddr| !ip.is_loopback())
                .collect();
            if !now.is_empty() {
                *last = now;
            }
        }
        last.clone()
    }
}

/// The VRRP key of the secret this node signs with *now*: the keyring's current one, not the
/// one the agent started with, so that after a secret rotation every member (restarted or not,
/// and a node flashed with the new secret) derives the same router id and password. A member
/// deriving them from another secret would form a VRRP group of its own and claim the address
/// beside the holder. While a rotation's commit reaches the members one by one, their
/// instances differ for at most a MicroK8s poll or two (the address may move once then).
pub(super) fn vrrp_key(keyring: &rackseed_protocol::secret::Keyring) -> [u8; 32] {
    keyring.current().secret().keepalived_key()
}

impl super::Runtime {
    /// What the MicroK8s poll needs to keep the address: the keeper, whether this node is a
    /// control-plane member now, and how to ask the peers' documents (for `"auto"`).
    pub(super) fn api_address_job(
        &self,
    ) -> Option<(std::sync::Arc<ApiAddressKeeper>, bool, PeerDocs)> {
        let keeper = self.api_address.clone()?;
        let control_plane_member =
            self.doc.phase == "member" && self.doc.role.as_deref() == Some("control-plane");
        let peers = self
            .discovery
            .peers()
            .iter()
            .filter_map(|p| {
                let addr = std::net::SocketAddr::new(p.preferred_addr()?, p.port);
                Some((p.node_id.clone(), addr, p.fingerprint.clone()))
            })
            .collect();
        let docs = PeerDocs {
            client: self.client.clone(),
            peers,
        };
        Some((keeper, control_plane_member, docs))
    }
}
