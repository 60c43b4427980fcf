//! [`Announcement`]: the non-secret facts a node advertises over mDNS, and their TXT form.
//!
//! Discovery signs the TXT map and hands back only verified announcements, each with the id of
//! the node that signed it: the id travels once, as the signed record's own (the mDNS instance
//! name), never inside the announcement's fields. Announcements are
//! *hints* (who exists, who is the seed or slot authority, which cluster is visible); every
//! decision that matters is taken by a Paxos round (see [`super`]), never by an announcement.
//! To add a field: pick a short new key, write it in [`Announcement::to_txt`], read it
//! leniently (absent = default) in [`Announcement::from_txt`], and extend the round-trip test.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::types::{Ballot, ClusterId, NodeId, NodeIdError, PhaseSummary};
use rackseed_config::Role;

/// Format version written under key `v`.
pub const ANNOUNCEMENT_VERSION: u32 = 1;

/// What one node tells everybody about itself.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Announcement {
    /// The announcing node: the verified record's id, not a TXT field.
    pub id: NodeId,
    /// Seed preference: higher wins.
    pub priority: u32,
    pub phase: PhaseSummary,
    /// Role once joining or a member.
    pub role: Option<Role>,
    /// The cluster this node belongs to or waits for.
    pub cluster: Option<ClusterId>,
    /// Slot authority according to the newest record this node knows.
    pub authority: Option<NodeId>,
    /// Ballot of that record (newer wins when hints disagree).
    pub record_ballot: Option<Ballot>,
    /// Members in that record.
    pub members: u32,
    /// The node may be elected seed (not pinned to worker).
    pub eligible: bool,
}

/// Why a TXT map is not an [`Announcement`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AnnouncementError {
    #[error("announcement lacks key {0:?}")]
    Missing(&'static str),
    #[error("announcement key {key:?} has invalid value {value:?}")]
    Invalid { key: &'static str, value: String },
    #[error("announcement format version {0} is not supported (this agent speaks {ANNOUNCEMENT_VERSION})")]
    Version(String),
    #[error("announcing node: {0}")]
    Id(#[from] NodeIdError),
}

/// Whether a peer's formation core acts alike on announced phases `a` and `b`: the same
/// phase, or `Preparing` and `Discovering` (both "no member, no cluster yet"; a peer counts
/// either as a participant), or `Joining` and `Confirming` (both "joined or joining": a peer
/// that tells a node acting as a member it was removed (`node/removed.rs`) checks its
/// `Member`/`Confirming` phase only for a node the record removed while it was away, which
/// announces its phase when it comes back). Every other step is announced at once, above all
/// the steps between "no member" and "member or joining" (`node::not_member`: the slot
/// authority readmits a recorded member only while it announces that it is none) and into
/// `Member`. Measured at N = 50: the `Discovering` and `Confirming` announcements were two
/// of each joiner's six, and every peer's mdns-sd thread (the largest share of the agents'
/// CPU during formation) pays for each announcement twice.
pub fn same_phase_class(a: PhaseSummary, b: PhaseSummary) -> bool {
    use PhaseSummary::*;
    a == b
        || matches!(
            (a, b),
            (Preparing, Discovering)
                | (Discovering, Preparing)
                | (Joining, Confirming)
                | (Confirming, Joining)
        )
}

fn role_str(r: Role) -> &'static str {
    match r {
        Role::ControlPlane => "cp",
        Role::Worker => "w",
    }
}

/// Longest value we accept for any key; keeps key+value under 200 bytes.
const MAX_VALUE: usize = 190;

impl Announcement {
    /// The TXT record entries: short ASCII keys, each key+value under 200 bytes. The id is
    /// not among them: discovery sends it as the record's own, signed with the rest.
    pub fn to_txt(&self) -> Vec<(String, String)> {
        let mut out = vec![
            ("v".to_string(), ANNOUNCEMENT_VERSION.to_string()),
            ("pr".to_string(), self.priority.to_string()),
            ("ph".to_string(), self.phase.as_str().to_string()),
            (
                "el".to_string(),
                if self.eligible { "1" } else { "0" }.to_string(),
            ),
            ("mc".to_string(), self.members.to_string()),
        ];
        if let Some(r) = self.role {
            out.push(("ro".to_string(), role_str(r).to_string()));
        }
        if let Some(c) = &self.cluster {
            out.push(("cl".to_string(), format!("{}.{}", c.term, c.seed)));
        }
        if let Some(a) = &self.authority {
            out.push(("au".to_string(), a.to_string()));
        }
        if let Some(b) = &self.record_ballot {
            out.push(("rb".to_string(), format!("{}.{}", b.n, b.node)));
        }
        out
    }

    /// True when `newer` differs from `self` at most in the fields that change with every
    /// chosen round (the record ballot and the member count) and in a phase step no peer acts
    /// on ([`same_phase_class`]). Such a change need not go out at once. With 50 nodes,
    /// re-announcing it would make every acceptor multicast a new record at every join, and
    /// every peer would verify each one: O(N²) packets per join. It goes out with the next
    /// heartbeat, or with the next change that is announced at once, whichever comes first.
    /// Routing changes (role, cluster, authority, eligibility, and a phase step a peer acts
    /// on) are still announced at once.
    pub fn only_progress_differs(&self, newer: &Announcement) -> bool {
        self.id == newer.id
            && self.priority == newer.priority
            && same_phase_class(self.phase, newer.phase)
            && self.role == newer.role
            && self.cluster == newer.cluster
            && self.authority == newer.authority
            && self.eligible == newer.eligible
    }

    /// Parses the verified TXT map of node `id` (the id of the record discovery verified).
    /// Never panics; unknown keys are ignored (newer agents may add some; older ones sent an
    /// `id` key of their own), missing optional keys take their default.
    pub fn from_txt(
        id: &str,
        txt: &BTreeMap<String, String>,
    ) -> Result<Announcement, AnnouncementError> {
        fn get<'a>(
            txt: &'a BTreeMap<String, String>,
            key: &'static str,
        ) -> Result<Option<&'a str>, AnnouncementError> {
            match txt.get(key) {
                None => Ok(None),
                Some(v) if v.len() > MAX_VALUE => Err(AnnouncementError::Invalid {
                    key,
                    value: v.chars().take(40).collect(),
                }),
                Some(v) => Ok(Some(v.as_str())),
            }
        }
        fn need<'a>(
            txt: &'a BTreeMap<String, String>,
            key: &'static str,
        ) -> Result<&'a str, AnnouncementError> {
            get(txt, key)?.ok_or(AnnouncementError::Missing(key))
        }
        fn invalid(key: &'static str, value: &str) -> AnnouncementError {
            AnnouncementError::Invalid {
                key,
                value: value.chars().take(40).collect(),
            }
        }
        fn num<T: std::str::FromStr>(key: &'static str, v: &str) -> Result<T, AnnouncementError> {
            if v.is_empty() || !v.bytes().all(|b| b.is_ascii_digit()) {
                return Err(invalid(key, v));
            }
            v.parse().map_err(|_| invalid(key, v))
        }
        fn pair(key: &'static str, v: &str) -> Result<(u64, NodeId), AnnouncementError> {
            let (n, id) = v.split_once('.').ok_or_else(|| invalid(key, v))?;
            Ok((num(key, n)?, NodeId::new(id).map_err(|_| invalid(key, v))?))
        }

        let v = need(txt, "v")?;
        if v != ANNOUNCEMENT_VERSION.to_string() {
            return Err(AnnouncementError::Version(v.chars().take(20).collect()));
        }
        let id = NodeId::new(id)?;
        let priority = num("pr", need(txt, "pr")?)?;
        let ph = need(txt, "ph")?;
        let phase = PhaseSummary::parse(ph).ok_or_else(|| invalid("ph", ph))?;
        let eligible = match get(txt, "el")? {
            None | Some("1") => true,
            Some("0") => false,
            Some(o) => return Err(invalid("el", o)),
        };
        let members = match get(txt, "mc")? {
            None => 0,
            Some(m) => num("mc", m)?,
        };
        let role = match get(txt, "ro")? {
            None => None,
            Some("cp") => Some(Role::ControlPlane),
            Some("w") => Some(Role::Worker),
            Some(o) => return Err(invalid("ro", o)),
        };
        let cluster = match get(txt, "cl")? {
            None => None,
            Some(c) => {
                let (term, seed) = pair("cl", c)?;
                Some(ClusterId { seed, term })
            }
        };
        let authority = match get(txt, "au")? {
            None => None,
            Some(a) => Some(NodeId::new(a).map_err(|_| invalid("au", a))?),
        };
        let record_ballot = match get(txt, "rb")? {
            None => None,
            Some(b) => {
                let (n, node) = pair("rb", b)?;
                Some(Ballot { n, node })
            }
        };
        Ok(Announcement {
            id,
            priority,
            phase,
            role,
            cluster,
            authority,
            record_ballot,
            members,
            eligible,
        })
    }
}
