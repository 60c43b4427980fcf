//! Announcement TXT encoding (round trip, size limits, hostile input) and message JSON.

use std::collections::BTreeMap;

use proptest::prelude::*;
use rackseed_config::Role;
use rackseed_formation::announce::same_phase_class;
use rackseed_formation::{
    Accepted, Announcement, AnnouncementError, Ballot, ClusterId, Message, NodeId, PhaseSummary,
    Record, Slot,
};

fn node_id() -> impl Strategy<Value = NodeId> {
    "[0-9a-f]{1,48}".prop_map(|s| NodeId::new(s).expect("generated hex"))
}

fn phase() -> impl Strategy<Value = PhaseSummary> {
    prop_oneof![
        Just(PhaseSummary::Preparing),
        Just(PhaseSummary::Discovering),
        Just(PhaseSummary::Waiting),
        Just(PhaseSummary::Joining),
        Just(PhaseSummary::Confirming),
        Just(PhaseSummary::Member),
    ]
}

fn announcement() -> impl Strategy<Value = Announcement> {
    (
        node_id(),
        any::<u32>(),
        phase(),
        proptest::option::of(prop_oneof![Just(Role::ControlPlane), Just(Role::Worker)]),
        proptest::option::of((node_id(), any::<u64>())),
        proptest::option::of(node_id()),
        proptest::option::of((any::<u64>(), node_id())),
        any::<u32>(),
        any::<bool>(),
    )
        .prop_map(
            |(id, priority, phase, role, cluster, authority, rb, members, eligible)| Announcement {
                id,
                priority,
                phase,
                role,
                cluster: cluster.map(|(seed, term)| ClusterId { seed, term }),
                authority,
                record_ballot: rb.map(|(n, node)| Ballot { n, node }),
                members,
                eligible,
            },
        )
}

/// The phase steps that may wait for the heartbeat: `Preparing`/`Discovering` and
/// `Joining`/`Confirming`. Every step between "no member" (preparing, discovering, waiting)
/// and "member or joining", and every step into `Member`, is announced at once.
#[test]
fn phase_steps_that_wait_stay_within_their_class() {
    use PhaseSummary::*;
    let all = [Preparing, Discovering, Waiting, Joining, Confirming, Member];
    let no_member = |p: PhaseSummary| matches!(p, Preparing | Discovering | Waiting);
    let mut waiting = Vec::new();
    for a in all {
        for b in all {
            if a != b && same_phase_class(a, b) {
                assert_eq!(
                    no_member(a),
                    no_member(b),
                    "{a:?} -> {b:?} changes the class"
                );
                assert!(b != Member && a != Member, "{a:?} -> {b:?} involves Member");
                waiting.push((a, b));
            }
        }
    }
    assert_eq!(
        waiting,
        vec![
            (Preparing, Discovering),
            (Discovering, Preparing),
            (Joining, Confirming),
            (Confirming, Joining)
        ]
    );
    for p in all {
        assert!(same_phase_class(p, p));
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    #[test]
    fn txt_round_trips_and_stays_small(ann in announcement()) {
        let txt = ann.to_txt();
        let mut total = 0;
        for (k, v) in &txt {
            prop_assert!(k.len() <= 2 && k.is_ascii() && v.is_ascii(), "{k}={v}");
            prop_assert!(k.len() + v.len() < 200, "{k}={v} is too long");
            total += k.len() + v.len() + 2;
        }
        prop_assert!(total < 600, "TXT record of {total} bytes");
        let map: BTreeMap<String, String> = txt.into_iter().collect();
        prop_assert!(!map.contains_key("id"), "the id travels as the signed record's, once");
        prop_assert_eq!(Announcement::from_txt(ann.id.as_str(), &map), Ok(ann));
    }

    /// Only the record ballot, the member count and a phase step within one class
    /// (`same_phase_class`) may wait for the heartbeat; a change of anything a peer routes by
    /// is announced at once.
    #[test]
    fn only_progress_may_wait(a in announcement(), b in announcement()) {
        let progress = Announcement {
            record_ballot: b.record_ballot.clone(),
            members: b.members,
            ..a.clone()
        };
        prop_assert!(a.only_progress_differs(&progress));
        prop_assert!(a.only_progress_differs(&a));
        let routing_same = a.id == b.id
            && a.priority == b.priority
            && same_phase_class(a.phase, b.phase)
            && a.role == b.role
            && a.cluster == b.cluster
            && a.authority == b.authority
            && a.eligible == b.eligible;
        prop_assert_eq!(a.only_progress_differs(&b), routing_same);
        let moved = Announcement { authority: Some(b.id.clone()), ..a.clone() };
        prop_assert_eq!(a.only_progress_differs(&moved), a.authority == moved.authority);
    }

    /// Arbitrary maps, biased towards our keys with near-miss values: never a panic.
    #[test]
    fn from_txt_never_panics(
        id in prop_oneof![Just("0a".to_string()), "[0-9a-z-]{0,50}", "\\PC{0,20}"],
        entries in proptest::collection::vec(
            (
                prop_oneof![
                    Just("v".to_string()), Just("id".to_string()), Just("pr".to_string()),
                    Just("ph".to_string()), Just("ro".to_string()), Just("cl".to_string()),
                    Just("au".to_string()), Just("rb".to_string()), Just("mc".to_string()),
                    Just("el".to_string()), ".{0,4}",
                ],
                prop_oneof![
                    Just("1".to_string()), "[0-9]{0,25}", "[0-9]{0,22}\\.[0-9a-f]{0,70}",
                    "[0-9a-fA-F.]{0,80}", ".{0,300}", "\\PC{0,40}",
                ],
            ),
            0..14,
        )
    ) {
        let map: BTreeMap<String, String> = entries.into_iter().collect();
        let _ = Announcement::from_txt(&id, &map);
    }
}

fn valid() -> BTreeMap<String, String> {
    [
        ("v", "1"),
        ("pr", "3"),
        ("ph", "memb"),
        ("ro", "cp"),
        ("cl", "7.0a"),
        ("au", "0b"),
        ("rb", "9.0b"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect()
}

#[test]
fn from_txt_reports_what_is_wrong() {
    let ann = Announcement::from_txt("0a", &valid()).expect("valid");
    assert_eq!(
        ann.id,
        NodeId::new("0a").expect("id"),
        "the id is the record's"
    );
    assert_eq!(
        ann.cluster,
        Some(ClusterId {
            seed: NodeId::new("0a").expect("id"),
            term: 7
        })
    );
    assert_eq!(ann.members, 0, "absent optional key takes its default");
    assert!(ann.eligible);

    let mut m = valid();
    m.remove("pr");
    assert_eq!(
        Announcement::from_txt("0a", &m),
        Err(AnnouncementError::Missing("pr"))
    );
    // An older agent's own `id` key is ignored: only the signed record's id counts.
    let mut m = valid();
    m.insert("id".into(), "0b".into());
    assert_eq!(
        Announcement::from_txt("0a", &m).map(|a| a.id),
        Ok(NodeId::new("0a").expect("id"))
    );
    assert!(matches!(
        Announcement::from_txt("0A", &valid()),
        Err(AnnouncementError::Id(_))
    ));
    let mut m = valid();
    m.insert("v".into(), "2".into());
    assert!(matches!(
        Announcement::from_txt("0a", &m),
        Err(AnnouncementError::Version(_))
    ));
    for (k, bad) in [
        ("pr", "-1"),
        ("pr", "99999999999"),
        ("ph", "boss"),
        ("ro", "master"),
        ("cl", "7"),
        ("cl", "x.0a"),
        ("rb", "1.XY"),
    ] {
        let mut m = valid();
        m.insert(k.into(), bad.into());
        assert!(
            matches!(
                Announcement::from_txt("0a", &m),
                Err(AnnouncementError::Invalid { .. })
            ),
            "{k}={bad}"
        );
    }
    let mut m = valid();
    m.insert("zz".into(), "from a newer agent".into());
    assert!(
        Announcement::from_txt("0a", &m).is_ok(),
        "unknown keys are ignored"
    );
}

#[test]
fn messages_round_trip_as_json() {
    let a = NodeId::new("0a").expect("id");
    let record = Record {
        cluster: ClusterId {
            seed: a.clone(),
            term: 1,
        },
        electorate: [a.clone()].into_iter().collect(),
        authority: a.clone(),
        members: [(a.clone(), Role::ControlPlane)].into_iter().collect(),
        slots: vec![Slot {
            node: NodeId::new("0b").expect("id"),
            role: Role::Worker,
            seq: 3,
        }],
        tentative: BTreeMap::new(),
        seq: 3,
        addons_by: None,
        addons_done: false,
        electorate_old: None,
        removed: Vec::new(),
        addresses: BTreeMap::new(),
        converting: None,
    };
    let ballot = Ballot {
        n: 2,
        node: a.clone(),
    };
    let msgs = vec![
        Message::Prepare {
            ballot: ballot.clone(),
        },
        Message::Promise {
            ballot: ballot.clone(),
            accepted: Some(Accepted {
                ballot: ballot.clone(),
                record: record.clone(),
            }),
        },
        Message::Accept {
            ballot: ballot.clone(),
            record: record.clone(),
            next: None,
        },
        Message::Accept {
            ballot: ballot.clone(),
            record,
            next: Some(Ballot {
                n: 3,
                node: a.clone(),
            }),
        },
        Message::Accepted {
            ballot: ballot.clone(),
            next: None,
        },
        Message::Accepted {
            ballot: ballot.clone(),
            next: Some(Ballot {
                n: 3,
                node: a.clone(),
            }),
        },
        Message::Nack {
            ballot: ballot.clone(),
            promised: ballot,
        },
        Message::SlotRequest { req: 4 },
        Message::SlotGrant {
            req: 4,
            cluster: ClusterId {
                seed: a.clone(),
                term: 1,
            },
            seq: 3,
            role: Role::Worker,
            via: rackseed_formation::JoinPoint::new(
                "10.0.0.1".parse().unwrap(),
                "0123456789abcdef",
            )
            .unwrap(),
        },
        Message::NotAuthority {
            hint: Some(a.clone()),
        },
        Message::JoinReport {
            cluster: ClusterId {
                seed: a.clone(),
                term: 1,
            },
            seq: 3,
            role: Role::Worker,
            ok: true,
        },
        Message::JoinConfirmed {
            cluster: ClusterId { seed: a, term: 1 },
            role: Role::Worker,
        },
    ];
    for m in msgs {
        let json = serde_json::to_string(&m).expect("serialize");
        assert_eq!(
            serde_json::from_str::<Message>(&json).expect("deserialize"),
            m,
            "{json}"
        );
    }
    assert!(serde_json::from_str::<Message>(
        r#"{"msg":"prepare","ballot":{"n":1,"node":"NOTHEX"}}"#
    )
    .is_err());
    // An agent without the piggybacked promise sends no `next`: read as none.
    assert_eq!(
        serde_json::from_str::<Message>(r#"{"msg":"accepted","ballot":{"n":1,"node":"0a"}}"#)
            .expect("deserialize"),
        Message::Accepted {
            ballot: Ballot {
                n: 1,
                node: NodeId::new("0a").expect("id"),
            },
            next: None,
        }
    );
}
