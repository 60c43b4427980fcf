//! The drill's findings and how they are shown: what the probe saw ([`Sample`]), the figures
//! computed from it ([`measure`], pure), the single points of failure ([`spof_table`], pure),
//! and the report as Markdown, JSON and an SVG timeline.
//!
//! Recovery times are measured from the kill: a probe that never failed after it reports
//! "no outage seen" (at the probe's one-second resolution), one that never came back
//! "not recovered within" the drill's timeout, and a probe that was not run (no LoadBalancer
//! address, or nothing answered there before the kill) "not measured", never a number.

use serde::Serialize;

/// One probe round, `t` seconds after the probe started.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Sample {
    pub t: f64,
    /// A probe write was acknowledged this round.
    pub api_ok: bool,
    /// Some control-plane node's `/readyz` answered 200 (it has dqlite quorum).
    pub quorum_ok: bool,
    /// The LoadBalancer address answered (`None`: not probed).
    pub lb_ok: Option<bool>,
    /// Some live node's agent reports holding the floating API address (`None`: not probed;
    /// a QEMU test cluster, where the address itself cannot be reached from the workstation).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub address_held: Option<bool>,
}

/// A recovery time, or why there is none.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "state", rename_all = "kebab-case")]
pub enum Measure {
    /// Down at `down_at`, back at `back_at` (seconds since the probe started); `seconds` is
    /// `back_at - kill`.
    Recovered {
        seconds: f64,
        down_at: f64,
        back_at: f64,
    },
    /// Never failed after the kill.
    NoOutage,
    /// Still down when the drill ended.
    NotRecovered {
        down_at: f64,
        waited: f64,
    },
    NotMeasured {
        why: String,
    },
}

impl Measure {
    /// The recovery time to compare with `--max-rto`: no outage is 0, never back is infinite.
    pub fn seconds_for_bound(&self) -> Option<f64> {
        match self {
            Measure::Recovered { seconds, .. } => Some(*seconds),
            Measure::NoOutage => Some(0.0),
            Measure::NotRecovered { .. } => Some(f64::INFINITY),
            Measure::NotMeasured { .. } => None,
        }
    }

    pub fn words(&self) -> String {
        match self {
            Measure::Recovered { seconds, .. } => format!("{seconds:.1} s"),
            Measure::NoOutage => "0 s (no outage seen at 1 s resolution)".into(),
            Measure::NotRecovered { waited, .. } => {
                format!("not recovered within {waited:.0} s")
            }
            Measure::NotMeasured { why } => format!("not measured ({why})"),
        }
    }
}

/// The recovery of one probe from the samples (pure). `pick` reads the probe's outcome,
/// `None` when it was not probed that round.
pub fn measure(samples: &[Sample], kill: f64, pick: impl Fn(&Sample) -> Option<bool>) -> Measure {
    let after: Vec<(f64, bool)> = samples
        .iter()
        .filter(|s| s.t >= kill)
        .filter_map(|s| pick(s).map(|ok| (s.t, ok)))
        .collect();
    if after.is_empty() {
        return Measure::NotMeasured {
            why: "no probe round after the kill".into(),
        };
    }
    let Some(down) = after.iter().position(|(_, ok)| !ok) else {
        return Measure::NoOutage;
    };
    let down_at = after[down].0;
    match after[down..].iter().find(|(_, ok)| *ok) {
        Some((back_at, _)) => Measure::Recovered {
            seconds: back_at - kill,
            down_at,
            back_at: *back_at,
        },
        None => Measure::NotRecovered {
            down_at,
            waited: after.last().map(|l| l.0 - kill).unwrap_or(0.0),
        },
    }
}

/// What one node holds, as the status documents say.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Holdings {
    pub node_id: String,
    pub hostname: String,
    pub address: Option<String>,
    /// `voter`, `standby`, `control-plane` (a member MicroK8s did not list), `worker`.
    pub role: String,
    pub api_address: bool,
    /// Copies of the newest backup this node holds (`None`: not reported).
    pub backup_copies: Option<u32>,
    /// MetalLB runs a speaker on every node; which one announces an address is not reported.
    pub metallb_speaker: bool,
    /// Longhorn replicas on the node: not reported by the status documents.
    pub storage_replicas: Option<u32>,
}

/// One row of the single-points-of-failure table.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SpofRow {
    #[serde(flatten)]
    pub holds: Holdings,
    /// What losing this node costs, in words.
    pub cost: Vec<String>,
    /// Losing it alone stops the API, the datastore or loses the only backup.
    pub single_point: bool,
}

/// What losing each node costs (pure).
pub fn spof_table(nodes: &[Holdings], api_address: bool, metallb: bool) -> Vec<SpofRow> {
    let voters = nodes.iter().filter(|n| n.role == "voter").count();
    let standbys = nodes.iter().filter(|n| n.role == "standby").count();
    let keepalived_peers = nodes
        .iter()
        .filter(|n| matches!(n.role.as_str(), "voter" | "standby" | "control-plane"))
        .count();
    let copies_total: u32 = nodes.iter().filter_map(|n| n.backup_copies).sum();
    nodes
        .iter()
        .map(|n| {
            let mut cost = Vec::new();
            let mut single = false;
            match n.role.as_str() {
                "voter" => {
                    let left = voters - 1;
                    if voters == 1 {
                        cost.push("the only dqlite voter: the datastore and the API stop".into());
                        single = true;
                    } else if left * 2 > voters {
                        let promo = if standbys > 0 {
                            "; MicroK8s promotes a standby"
                        } else {
                            "; no standby to promote"
                        };
                        cost.push(format!(
                            "one of {voters} voters: quorum holds with {left}{promo}"
                        ));
                    } else {
                        cost.push(format!(
                            "one of {voters} voters: quorum is LOST with {left} (API read-only to nothing)"
                        ));
                        single = true;
                    }
                }
                "standby" => cost.push("a dqlite standby: none, one fewer to promote".into()),
                "control-plane" => cost.push("a control-plane node: its API endpoint".into()),
                _ => cost.push("a worker: its pods are rescheduled elsewhere".into()),
            }
            if n.api_address {
                if keepalived_peers > 1 {
                    cost.push(
                        "the API address moves to another control-plane node (keepalived, 4.4-6.5 s)"
                            .into(),
                    );
                } else {
                    cost.push("the API address: no other node can take it".into());
                    single = true;
                }
            }
            match n.backup_copies {
                Some(c) if c > 0 && c == copies_total => {
                    cost.push("the only copies of the newest backup".into());
                    single = true;
                }
                Some(c) if c > 0 => cost.push(format!("{c} of {copies_total} backup copies")),
                _ => {}
            }
            if metallb && n.metallb_speaker {
                cost.push(
                    "a MetalLB speaker: addresses it announced move to another node (L2 failover)"
                        .into(),
                );
            }
            if !api_address && matches!(n.role.as_str(), "voter" | "standby" | "control-plane") {
                cost.push("kubeconfigs pointing at this node stop working (no API address)".into());
            }
            SpofRow {
                holds: n.clone(),
                cost,
                single_point: single,
            }
        })
        .collect()
}

/// The report of one drill.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Report {
    pub run_id: String,
    pub target: Holdings,
    /// Why this node (`--kill` and the rule applied).
    pub chosen_because: String,
    pub killer: String,
    /// What the killer did, in words.
    pub kill_detail: String,
    /// Seconds since the probe started.
    pub kill_at: f64,
    pub probe_target: String,
    pub tls_verified: bool,
    pub timeline: Vec<Event>,
    pub rto_api: Measure,
    pub rto_quorum: Measure,
    pub rto_loadbalancer: Measure,
    /// Until a live node's agent reports holding the floating API address again (measured
    /// where the address cannot be probed directly: a QEMU test cluster).
    pub rto_api_address: Measure,
    pub rpo: Rpo,
    pub spof: Vec<SpofRow>,
    pub samples: Vec<Sample>,
    pub notes: Vec<String>,
}

/// Data lost.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Rpo {
    pub acked_before_kill: u64,
    /// Counters acknowledged before the kill and missing after recovery.
    pub missing_before_kill: Vec<u64>,
    pub acked_after_kill: u64,
    pub missing_after_kill: Vec<u64>,
    /// `None` when it could not be checked (the API never came back), with `check_error`.
    pub checked: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub check_error: Option<String>,
    /// Age of the newest datastore backup, seconds (`None`: unknown, see `backup_note`).
    pub newest_backup_age_s: Option<u64>,
    pub backup_note: String,
}

/// A moment on the timeline.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Event {
    pub t: f64,
    pub what: String,
}

/// The timeline's events from the figures (pure): kill, detection, API/quorum/LB back.
pub fn timeline(
    kill: f64,
    samples: &[Sample],
    api: &Measure,
    quorum: &Measure,
    lb: &Measure,
    address: &Measure,
) -> Vec<Event> {
    let mut ev = vec![Event {
        t: kill,
        what: "kill".into(),
    }];
    let detected = samples.iter().filter(|s| s.t >= kill).find(|s| {
        !s.api_ok || !s.quorum_ok || s.lb_ok == Some(false) || s.address_held == Some(false)
    });
    if let Some(d) = detected {
        ev.push(Event {
            t: d.t,
            what: "detection".into(),
        });
    }
    for (name, m) in [
        ("API back", api),
        ("quorum back", quorum),
        ("LoadBalancer back", lb),
        ("API address held again", address),
    ] {
        if let Measure::Recovered { back_at, .. } = m {
            ev.push(Event {
                t: *back_at,
                what: name.into(),
            });
        }
    }
    ev.sort_by(|a, b| a.t.total_cmp(&b.t));
    ev
}

fn md_escape(s: &str) -> String {
    crate::status::terminal_safe(s).replace('|', "\\|")
}

/// The report as Markdown.
pub fn render_markdown(r: &Report) -> String {
    let mut s = String::new();
    let t = &r.target;
    s.push_str(&format!("# Failover drill {}\n\n", md_escape(&r.run_id)));
    s.push_str(&format!(
        "Killed **{}** ({}, {}) with {}: {}. Chosen because {}.\n\n",
        md_escape(&t.node_id),
        md_escape(&t.hostname),
        md_escape(t.address.as_deref().unwrap_or("no address")),
        md_escape(&r.killer),
        md_escape(&r.kill_detail),
        md_escape(&r.chosen_because)
    ));
    s.push_str("| figure | value |\n|---|---|\n");
    s.push_str(&format!(
        "| RTO, API ({}) | {} |\n",
        md_escape(&r.probe_target),
        r.rto_api.words()
    ));
    s.push_str(&format!("| RTO, quorum | {} |\n", r.rto_quorum.words()));
    s.push_str(&format!(
        "| RTO, LoadBalancer | {} |\n",
        r.rto_loadbalancer.words()
    ));
    if !matches!(r.rto_api_address, Measure::NotMeasured { .. }) {
        s.push_str(&format!(
            "| API address held by a live node again (the agents' status) | {} |\n",
            r.rto_api_address.words()
        ));
    }
    let rpo = &r.rpo;
    if rpo.checked {
        s.push_str(&format!(
            "| RPO, probe writes | {} of {} acknowledged before the kill missing after recovery ({} of {} after the kill) |\n",
            rpo.missing_before_kill.len(),
            rpo.acked_before_kill,
            rpo.missing_after_kill.len(),
            rpo.acked_after_kill
        ));
    } else {
        s.push_str(&format!(
            "| RPO, probe writes | not checked: {} |\n",
            md_escape(
                rpo.check_error
                    .as_deref()
                    .unwrap_or("the API did not come back")
            )
        ));
    }
    s.push_str(&format!(
        "| RPO, newest backup's age | {} |\n\n",
        match rpo.newest_backup_age_s {
            Some(a) => format!("{a} s ({})", md_escape(&rpo.backup_note)),
            None => format!("unknown ({})", md_escape(&rpo.backup_note)),
        }
    ));
    s.push_str("## Timeline\n\n| t (s) | event |\n|---|---|\n");
    for e in &r.timeline {
        s.push_str(&format!("| {:.1} | {} |\n", e.t, md_escape(&e.what)));
    }
    s.push_str("\n## Single points of failure\n\n| node | role | API address | backup copies | MetalLB | storage replicas | losing it costs |\n|---|---|---|---|---|---|---|\n");
    for row in &r.spof {
        let h = &row.holds;
        s.push_str(&format!(
            "| {}{} | {} | {} | {} | {} | {} | {} |\n",
            md_escape(&h.node_id),
            if row.single_point { " **(SPOF)**" } else { "" },
            md_escape(&h.role),
            if h.api_address { "holds it" } else { "" },
            h.backup_copies
                .map(|c| c.to_string())
                .unwrap_or_else(|| "not reported".into()),
            if h.metallb_speaker {
                "speaker (announcer not reported)"
            } else {
                ""
            },
            h.storage_replicas
                .map(|c| c.to_string())
                .unwrap_or_else(|| "not reported".into()),
            md_escape(&row.cost.join("; "))
        ));
    }
    if !r.notes.is_empty() {
        s.push_str("\n## Notes\n\n");
        for n in &r.notes {
            s.push_str(&format!("- {}\n", md_escape(n)));
        }
    }
    s
}

fn xml(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// The timeline as an SVG: one lane per probe (green up, red down, grey not probed), the
/// kill and recovery moments as labelled vertical lines.
pub fn render_svg(r: &Report) -> String {
    let end = r.samples.last().map(|s| s.t).unwrap_or(1.0).max(1.0) + 1.0;
    let (left, width, lane_h) = (140.0, 760.0, 26.0);
    let x = |t: f64| left + t / end * width;
    type Lane = fn(&Sample) -> Option<bool>;
    let lanes: [(&str, Lane); 4] = [
        ("API", |s| Some(s.api_ok)),
        ("quorum", |s| Some(s.quorum_ok)),
        ("LoadBalancer", |s| s.lb_ok),
        ("API address held", |s| s.address_held),
    ];
    let top = 40.0;
    let height = top + lanes.len() as f64 * (lane_h + 10.0) + 30.0 + r.timeline.len() as f64 * 14.0;
    let mut s = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{height}\" font-family=\"sans-serif\" font-size=\"12\">\n<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n<text x=\"10\" y=\"20\" font-size=\"14\">Failover drill {id}: {node} killed at {k:.1} s</text>\n",
        w = left + width + 20.0,
        id = xml(&r.run_id),
        node = xml(&r.target.node_id),
        k = r.kill_at,
    );
    for (i, (name, pick)) in lanes.iter().enumerate() {
        let y = top + i as f64 * (lane_h + 10.0);
        s.push_str(&format!(
            "<text x=\"10\" y=\"{}\">{name}</text>\n",
            y + lane_h * 0.65
        ));
        for (j, smp) in r.samples.iter().enumerate() {
            let next = r.samples.get(j + 1).map(|n| n.t).unwrap_or(smp.t + 1.0);
            let color = match pick(smp) {
                Some(true) => "#2e9e44",
                Some(false) => "#d43c3c",
                None => "#c8c8c8",
            };
            s.push_str(&format!(
                "<rect x=\"{:.1}\" y=\"{y}\" width=\"{:.1}\" height=\"{lane_h}\" fill=\"{color}\"/>\n",
                x(smp.t),
                (x(next) - x(smp.t)).max(0.5)
            ));
        }
    }
    let bottom = top + lanes.len() as f64 * (lane_h + 10.0);
    for (i, e) in r.timeline.iter().enumerate() {
        let color = if e.what == "kill" { "black" } else { "#1f5fbf" };
        s.push_str(&format!(
            "<line x1=\"{x:.1}\" y1=\"{top0}\" x2=\"{x:.1}\" y2=\"{bottom}\" stroke=\"{color}\" stroke-dasharray=\"4 3\"/>\n<text x=\"{x:.1}\" y=\"{ty}\" fill=\"{color}\">{t:.1} s {what}</text>\n",
            x = x(e.t),
            top0 = top - 6.0,
            ty = bottom + 16.0 + i as f64 * 14.0,
            t = e.t,
            what = xml(&e.what),
        ));
    }
    s.push_str("</svg>\n");
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn samples(api: &str) -> Vec<Sample> {
        api.chars()
            .enumerate()
            .map(|(i, c)| Sample {
                t: i as f64,
                api_ok: c == '1',
                quorum_ok: true,
                lb_ok: None,
                address_held: None,
            })
            .collect()
    }

    #[test]
    fn recovery_is_measured_from_the_kill() {
        let s = samples("11111000000111");
        let m = measure(&s, 4.5, |s| Some(s.api_ok));
        assert_eq!(
            m,
            Measure::Recovered {
                seconds: 6.5,
                down_at: 5.0,
                back_at: 11.0
            }
        );
        assert_eq!(measure(&s, 11.0, |s| Some(s.api_ok)), Measure::NoOutage);
        assert!(matches!(
            measure(&samples("1110000"), 2.5, |s| Some(s.api_ok)),
            Measure::NotRecovered { waited, .. } if (waited - 3.5).abs() < 1e-9
        ));
        assert!(matches!(
            measure(&s, 0.0, |s| s.lb_ok),
            Measure::NotMeasured { .. }
        ));
        assert_eq!(Measure::NoOutage.seconds_for_bound(), Some(0.0));
        assert_eq!(
            Measure::NotMeasured { why: "x".into() }.seconds_for_bound(),
            None
        );
    }

    #[test]
    fn the_address_holder_lane_is_measured_shown_and_left_out_when_not_probed() {
        let mut s = samples("1111111111");
        for (smp, held) in s.iter_mut().zip("1111000011".chars()) {
            smp.address_held = Some(held == '1');
        }
        let addr = measure(&s, 3.5, |s| s.address_held);
        assert_eq!(
            addr,
            Measure::Recovered {
                seconds: 4.5,
                down_at: 4.0,
                back_at: 8.0
            }
        );
        let ok = measure(&s, 3.5, |s| Some(s.api_ok));
        let lb = measure(&s, 3.5, |s| s.lb_ok);
        let t = timeline(3.5, &s, &ok, &ok, &lb, &addr);
        let what: Vec<&str> = t.iter().map(|e| e.what.as_str()).collect();
        assert_eq!(what, ["kill", "detection", "API address held again"]);
        assert_eq!(t[1].t, 4.0);
        let json = serde_json::to_value(&s[0]).unwrap();
        assert_eq!(json["address_held"], true);
        let json = serde_json::to_value(&samples("1")[0]).unwrap();
        assert!(json.get("address_held").is_none(), "{json}");
    }

    fn h(id: &str, role: &str, api: bool, copies: Option<u32>) -> Holdings {
        Holdings {
            node_id: id.into(),
            hostname: id.into(),
            address: None,
            role: role.into(),
            api_address: api,
            backup_copies: copies,
            metallb_speaker: true,
            storage_replicas: None,
        }
    }

    #[test]
    fn the_spof_table_names_what_each_loss_costs() {
        let nodes = [
            h("a", "voter", true, Some(1)),
            h("b", "voter", false, Some(1)),
            h("c", "voter", false, Some(1)),
            h("w", "worker", false, None),
        ];
        let t = spof_table(&nodes, true, true);
        assert!(t.iter().all(|r| !r.single_point), "{t:#?}");
        assert!(t[0].cost.iter().any(|c| c.contains("quorum holds with 2")));
        assert!(t[0].cost.iter().any(|c| c.contains("API address moves")));
        assert!(t[0].cost.iter().any(|c| c.contains("1 of 3 backup copies")));
        assert!(t[3].cost[0].contains("worker"));
        // Two voters: losing either loses quorum; one node with every copy is a SPOF.
        let two = [h("a", "voter", true, Some(2)), h("b", "voter", false, None)];
        let t = spof_table(&two, false, false);
        assert!(t[0].single_point && t[1].single_point);
        assert!(t[0].cost.iter().any(|c| c.contains("only copies")));
        assert!(t[1].cost.iter().any(|c| c.contains("quorum is LOST")));
        let one = [h("a", "voter", true, None)];
        let t = spof_table(&one, true, false);
        assert!(t[0].single_point);
        assert!(t[0]
            .cost
            .iter()
            .any(|c| c.contains("no other node can take it")));
    }

    #[test]
    fn markdown_and_svg_show_the_figures_and_escape_node_strings() {
        let s = samples("1111100011111");
        let api = measure(&s, 4.2, |s| Some(s.api_ok));
        let q = measure(&s, 4.2, |s| Some(s.quorum_ok));
        let lb = Measure::NotMeasured {
            why: "no --lb-url".into(),
        };
        let not_probed = Measure::NotMeasured {
            why: "probed through the address".into(),
        };
        let r = Report {
            run_id: "r1".into(),
            target: h("a|<b>", "voter", true, None),
            chosen_because: "it holds the API address".into(),
            killer: "test".into(),
            kill_detail: "killed".into(),
            kill_at: 4.2,
            probe_target: "10.0.0.100:16443".into(),
            tls_verified: false,
            timeline: timeline(4.2, &s, &api, &q, &lb, &not_probed),
            rto_api: api,
            rto_quorum: q,
            rto_loadbalancer: lb,
            rto_api_address: not_probed,
            rpo: Rpo {
                acked_before_kill: 5,
                missing_before_kill: vec![],
                acked_after_kill: 5,
                missing_after_kill: vec![],
                checked: true,
                check_error: None,
                newest_backup_age_s: None,
                backup_note: "no node reports backups".into(),
            },
            spof: spof_table(&[h("a|<b>", "voter", true, None)], true, false),
            samples: s,
            notes: vec![],
        };
        let md = render_markdown(&r);
        assert!(
            md.contains("| RTO, API (10.0.0.100:16443) | 3.8 s |"),
            "{md}"
        );
        assert!(md.contains("0 s (no outage"), "{md}");
        assert!(md.contains("not measured (no --lb-url)"), "{md}");
        assert!(!md.contains("API address held"), "{md}");
        assert!(
            md.contains("0 of 5 acknowledged before the kill missing"),
            "{md}"
        );
        assert!(md.contains("a\\|<b>"), "{md}");
        let svg = render_svg(&r);
        assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
        assert!(svg.contains("a|&lt;b&gt;") && !svg.contains("<b>"));
        assert!(svg.contains("API back") && svg.contains("detection"));
        let json = serde_json::to_value(&r).unwrap();
        assert_eq!(json["rto_api"]["state"], "recovered");
        assert_eq!(json["rto_loadbalancer"]["state"], "not-measured");
    }
}
