//! The drill's probe: one round a second (a round that takes longer delays the next), each
//! round at once
//! - a write: create ConfigMap `rackseed-drill-<run>-<counter>` (the counter goes up every
//!   round) on the first of [`ProbePlan::write_to`] that acknowledges it (`201`);
//! - quorum: `GET /readyz` on every control-plane node; up when any answers 200;
//! - the LoadBalancer: `GET` of `--lb-url`; up on any HTTP answer. On a QEMU test cluster
//!   booted with `qemu up --lb-forward ADDRESS:PORT` and no `--lb-url`, `GET` of every VM's
//!   forward of that address instead ([`ProbePlan::lb_forwards`]); up when any VM's forward
//!   gives an HTTP answer, which it does only while that VM holds the address (see
//!   `qemu::node::LbForward`);
//! - on a QEMU test cluster ([`HolderProbe`]), the floating API address: up when some live
//!   node's agent reports holding it (its `/status.json` through the management forward),
//!   since the address itself cannot be reached from the workstation there.
//!
//! The kill happens after `baseline` (at least one acknowledged write first: without a
//! working API there is nothing to measure). The probe then runs until every probe has been
//! up for [`SETTLE`] rounds running and `min_observe` has passed, or `timeout`. Finally it
//! lists the ConfigMaps to find acknowledged counters that are gone (RPO) and deletes its own.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Result};

use super::api::ApiClient;
use super::killer::{Killer, Victim};
use super::report::{self, Measure, Report, Rpo, Sample};

/// Rounds every probe must be up, running, before the drill ends.
pub const SETTLE: usize = 3;
const ROUND: Duration = Duration::from_secs(1);

/// What to probe.
#[derive(Debug, Clone)]
pub struct ProbePlan {
    pub run_id: String,
    /// Where writes go, in order of preference.
    pub write_to: Vec<SocketAddr>,
    /// Control-plane API endpoints whose `/readyz` tells quorum.
    pub readyz: Vec<SocketAddr>,
    pub lb_url: Option<String>,
    /// Without `lb_url`: 127.0.0.1 forwards, one per VM, to the LoadBalancer address on that
    /// VM (QEMU test clusters); the LoadBalancer is up when any of them answers HTTP.
    pub lb_forwards: Vec<SocketAddr>,
    /// Ask the agents who holds the floating API address (QEMU test clusters).
    pub holder: Option<HolderProbe>,
    pub baseline: Duration,
    pub min_observe: Duration,
    pub timeout: Duration,
}

/// Where to ask the agents whether one of them holds the floating API address: their
/// management forwards on 127.0.0.1.
#[derive(Debug, Clone)]
pub struct HolderProbe {
    pub client: reqwest::Client,
    pub mgmt: Vec<SocketAddr>,
}

async fn holder_once(h: &HolderProbe) -> bool {
    let mut set = tokio::task::JoinSet::new();
    for at in &h.mgmt {
        let (client, at) = (h.client.clone(), *at);
        set.spawn(async move { super::on_qemu::holds_api_address(&client, at).await });
    }
    let mut any = false;
    while let Some(r) = set.join_next().await {
        any |= r.unwrap_or(false);
    }
    any
}

fn probe_name(run: &str, n: u64) -> String {
    format!("rackseed-drill-{run}-{n:06}")
}

/// One round's write: the first endpoint that acknowledges. An attempt that got no answer
/// (e.g. timed out on a slow server) may still have been committed: a later endpoint's `409`
/// (AlreadyExists) for this run's unique name then confirms the write is in the datastore.
async fn write_once(api: &ApiClient, to: &[SocketAddr], run: &str, n: u64) -> bool {
    let data = serde_json::json!({ "counter": n.to_string() });
    let mut unanswered = false;
    for at in to {
        match api.create_configmap(*at, &probe_name(run, n), &data).await {
            Ok((201, _)) => return true,
            Ok((409, _)) if unanswered => return true,
            Ok(_) => {}
            Err(_) => unanswered = true,
        }
    }
    false
}

async fn quorum_once(api: &ApiClient, nodes: &[SocketAddr]) -> bool {
    let mut set = tokio::task::JoinSet::new();
    for at in nodes {
        let (api, at) = (api.clone(), *at);
        set.spawn(async move { matches!(api.readyz(at).await, Ok(200)) });
    }
    let mut any = false;
    while let Some(r) = set.join_next().await {
        any |= r.unwrap_or(false);
    }
    any
}

async fn lb_once(http: &reqwest::Client, url: &str) -> bool {
    http.get(url).send().await.is_ok()
}

/// Whether any of the VMs' LoadBalancer forwards gives an HTTP answer. QEMU accepts the
/// connection on 127.0.0.1 before the guest is asked, so a connection alone says nothing:
/// only a response does (a VM not holding the address never answers; the request times out
/// or the connection is closed). Returns at the first answer (the other requests are
/// dropped), so while the LoadBalancer is up a round does not wait out the other VMs'
/// timeouts.
pub async fn lb_forwards_once(http: &reqwest::Client, forwards: &[SocketAddr]) -> bool {
    let mut set = tokio::task::JoinSet::new();
    for at in forwards {
        let (http, url) = (http.clone(), format!("http://{at}/"));
        set.spawn(async move { lb_once(&http, &url).await });
    }
    while let Some(r) = set.join_next().await {
        if r.unwrap_or(false) {
            return true;
        }
    }
    false
}

/// What the LoadBalancer probe asks each round: `--lb-url`, else the VMs' forwards.
#[derive(Debug, Clone, Copy)]
enum LbTarget<'a> {
    Url(&'a str),
    Forwards(&'a [SocketAddr]),
}

fn lb_target(plan: &ProbePlan) -> Option<LbTarget<'_>> {
    match (&plan.lb_url, plan.lb_forwards.is_empty()) {
        (Some(u), _) => Some(LbTarget::Url(u)),
        (None, false) => Some(LbTarget::Forwards(&plan.lb_forwards)),
        (None, true) => None,
    }
}

/// The LoadBalancer's measure from the rounds (pure).
fn lb_measure(plan: &ProbePlan, samples: &[Sample], kill_at: f64, seen_before: bool) -> Measure {
    match lb_target(plan) {
        None => Measure::NotMeasured {
            why: "no --lb-url given".into(),
        },
        Some(LbTarget::Url(u)) if !seen_before => Measure::NotMeasured {
            why: format!("nothing answered at {u} before the kill"),
        },
        Some(LbTarget::Forwards(f)) if !seen_before => Measure::NotMeasured {
            why: format!(
                "no VM's LoadBalancer forward ({}) answered before the kill: no VM held the address, or nothing serves that port",
                f.iter().map(|a| a.to_string()).collect::<Vec<_>>().join(", ")
            ),
        },
        Some(_) => report::measure(samples, kill_at, |s| s.lb_ok),
    }
}

fn lb_client() -> Result<reqwest::Client> {
    // Any answer counts, so the LoadBalancer's certificate (if https) is not checked: no
    // credential is sent there.
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(rustls::RootCertStore::empty())
        .with_no_client_auth();
    Ok(reqwest::Client::builder()
        .use_preconfigured_tls(tls)
        .timeout(Duration::from_millis(2000))
        .pool_max_idle_per_host(0)
        .build()?)
}

/// Runs the probe around the kill and returns the report's measured part (the caller fills
/// in the target, the SPOF table and the backup age).
pub async fn run(
    plan: &ProbePlan,
    api: Arc<ApiClient>,
    killer: &dyn Killer,
    victim: &Victim,
) -> Result<Report> {
    let start = Instant::now();
    let lb_http = match lb_target(plan) {
        Some(_) => Some(lb_client()?),
        None => None,
    };
    let go = tokio::sync::Notify::new();
    let cancel = tokio::sync::Notify::new();
    let result: std::sync::Mutex<Option<Result<super::killer::Killed>>> =
        std::sync::Mutex::new(None);
    // The kill runs beside the rounds, started by them once the baseline is in.
    let kill_side = async {
        tokio::select! {
            _ = go.notified() => {
                let r = killer.kill(victim).await;
                *result.lock().expect("kill result") = Some(r);
            }
            _ = cancel.notified() => {}
        }
    };
    let probe_side = async {
        let r = rounds(plan, &api, lb_http.as_ref(), start, &go, &result).await;
        cancel.notify_one();
        r
    };
    let ((), rounds_out) = tokio::join!(kill_side, probe_side);
    let Rounds {
        samples,
        acked,
        kill: (kill_at, kill_detail),
        lb_seen_before,
        held_before,
    } = rounds_out?;
    let mut notes = Vec::new();
    if let Some(gap) = widest_gap(&samples, kill_at) {
        notes.push(format!(
            "probe rounds around the kill were up to {gap:.1} s apart (a round waits for its slowest request, each bounded by {:.1} s): the figures have that resolution, not 1 s",
            api.timeout().as_secs_f64()
        ));
    }
    let rto_api = report::measure(&samples, kill_at, |s| Some(s.api_ok));
    let rto_quorum = report::measure(&samples, kill_at, |s| Some(s.quorum_ok));
    let rto_lb = lb_measure(plan, &samples, kill_at, lb_seen_before);
    let rto_address = match &plan.holder {
        None => Measure::NotMeasured {
            why: "not probed apart from the API".into(),
        },
        Some(_) if !held_before => Measure::NotMeasured {
            why: "no node reported holding the API address before the kill".into(),
        },
        Some(_) => report::measure(&samples, kill_at, |s| s.address_held),
    };
    let rpo = check_rpo(&api, plan, &acked, kill_at).await;
    if let Some(e) = &rpo.check_error {
        notes.push(format!("RPO not checked: {e}"));
    }
    let timeline = report::timeline(
        kill_at,
        &samples,
        &rto_api,
        &rto_quorum,
        &rto_lb,
        &rto_address,
    );
    Ok(Report {
        run_id: plan.run_id.clone(),
        target: report::Holdings::default(),
        chosen_because: String::new(),
        killer: killer.name(),
        kill_detail,
        kill_at,
        probe_target: String::new(),
        tls_verified: api.verified,
        timeline,
        rto_api,
        rto_quorum,
        rto_loadbalancer: rto_lb,
        rto_api_address: rto_address,
        rpo,
        spof: vec![],
        samples,
        notes,
    })
}

/// The widest spacing of probe rounds from the last round before the kill on, when wider
/// than 1.5 rounds (a loaded machine, slow answers); pure.
pub fn widest_gap(samples: &[Sample], kill_at: f64) -> Option<f64> {
    let from = samples.iter().rposition(|s| s.t < kill_at).unwrap_or(0);
    samples[from..]
        .windows(2)
        .map(|w| w[1].t - w[0].t)
        .fold(None, |m: Option<f64>, g| Some(m.map_or(g, |m| m.max(g))))
        .filter(|g| *g > ROUND.as_secs_f64() * 1.5)
}

/// What the rounds saw.
struct Rounds {
    samples: Vec<Sample>,
    /// Acknowledged counters and when (seconds since the start).
    acked: BTreeMap<u64, f64>,
    /// When the node died and how.
    kill: (f64, String),
    lb_seen_before: bool,
    held_before: bool,
}

/// The probe rounds: baseline, the kill (through `go`, its outcome in `result`), recovery.
async fn rounds(
    plan: &ProbePlan,
    api: &ApiClient,
    lb_http: Option<&reqwest::Client>,
    start: Instant,
    go: &tokio::sync::Notify,
    result: &std::sync::Mutex<Option<Result<super::killer::Killed>>>,
) -> Result<Rounds> {
    let mut samples: Vec<Sample> = Vec::new();
    let mut acked: BTreeMap<u64, f64> = BTreeMap::new();
    let mut counter = 0u64;
    let mut kill: Option<(f64, String)> = None;
    let mut asked = false;
    let mut lb_seen_before = false;
    let mut held_before = false;
    let mut interval = tokio::time::interval(ROUND);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        interval.tick().await;
        if kill.is_none() {
            match result.lock().expect("kill result").take() {
                Some(Ok(k)) => {
                    let at = k.at.saturating_duration_since(start).as_secs_f64();
                    kill = Some((at, k.detail));
                }
                Some(Err(e)) => {
                    return Err(e.context("the kill failed; the cluster was left as it was"))
                }
                None => {}
            }
        }
        let t = start.elapsed().as_secs_f64();
        counter += 1;
        let n = counter;
        let (api_ok, quorum_ok, lb_ok, address_held) = tokio::join!(
            write_once(api, &plan.write_to, &plan.run_id, n),
            quorum_once(api, &plan.readyz),
            async {
                match (lb_http, lb_target(plan)) {
                    (Some(c), Some(LbTarget::Url(u))) => Some(lb_once(c, u).await),
                    (Some(c), Some(LbTarget::Forwards(f))) => Some(lb_forwards_once(c, f).await),
                    _ => None,
                }
            },
            async {
                match &plan.holder {
                    Some(h) => Some(holder_once(h).await),
                    None => None,
                }
            }
        );
        if api_ok {
            acked.insert(n, t);
        }
        samples.push(Sample {
            t,
            api_ok,
            quorum_ok,
            lb_ok,
            address_held,
        });
        let elapsed = start.elapsed();
        match &kill {
            None if !asked => {
                if elapsed >= plan.baseline {
                    if acked.is_empty() {
                        bail!(
                            "no probe write was acknowledged in the {:?} before the kill ({counter} tried): nothing to measure; the cluster was left as it was",
                            plan.baseline
                        );
                    }
                    lb_seen_before = samples.iter().any(|s| s.lb_ok == Some(true));
                    held_before = samples.iter().any(|s| s.address_held == Some(true));
                    go.notify_one();
                    asked = true;
                }
            }
            None => {
                if elapsed >= plan.baseline + plan.timeout {
                    bail!("the kill did not finish within {:?}", plan.timeout);
                }
            }
            Some((at, _)) => {
                let since = t - at;
                let tail = &samples[samples.len().saturating_sub(SETTLE)..];
                let settled = samples.iter().filter(|s| s.t >= *at).count() >= SETTLE
                    && tail.iter().all(|s| {
                        s.api_ok
                            && s.quorum_ok
                            && (!lb_seen_before || s.lb_ok != Some(false))
                            && (!held_before || s.address_held != Some(false))
                    });
                if (settled && since >= plan.min_observe.as_secs_f64())
                    || since >= plan.timeout.as_secs_f64()
                {
                    let kill = kill.expect("matched");
                    return Ok(Rounds {
                        samples,
                        acked,
                        kill,
                        lb_seen_before,
                        held_before,
                    });
                }
            }
        }
    }
}

/// Lists the probe's objects, finds the acknowledged counters that are gone, and deletes the
/// probe's objects (best effort).
async fn check_rpo(
    api: &ApiClient,
    plan: &ProbePlan,
    acked: &BTreeMap<u64, f64>,
    kill_at: f64,
) -> Rpo {
    let before = acked.values().filter(|t| **t < kill_at).count() as u64;
    let after = acked.len() as u64 - before;
    let mut rpo = Rpo {
        acked_before_kill: before,
        missing_before_kill: vec![],
        acked_after_kill: after,
        missing_after_kill: vec![],
        checked: false,
        check_error: None,
        newest_backup_age_s: None,
        backup_note: String::new(),
    };
    let mut errors = Vec::new();
    let mut listed = None;
    for at in &plan.write_to {
        match api.list_configmaps(*at).await {
            Ok(names) => {
                listed = Some((*at, names));
                break;
            }
            Err(e) => errors.push(format!("{e:#}")),
        }
    }
    let Some((at, names)) = listed else {
        rpo.check_error = Some(errors.join("; "));
        return rpo;
    };
    let prefix = format!("rackseed-drill-{}-", plan.run_id);
    let present: std::collections::BTreeSet<u64> = names
        .iter()
        .filter_map(|n| n.strip_prefix(&prefix)?.parse().ok())
        .collect();
    for (n, t) in acked {
        if !present.contains(n) {
            if *t < kill_at {
                rpo.missing_before_kill.push(*n);
            } else {
                rpo.missing_after_kill.push(*n);
            }
        }
    }
    rpo.checked = true;
    for n in &present {
        let _ = api
            .delete_configmap(at, &probe_name(&plan.run_id, *n))
            .await;
    }
    rpo
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(ts: &[f64]) -> Vec<Sample> {
        ts.iter()
            .map(|t| Sample {
                t: *t,
                api_ok: true,
                quorum_ok: true,
                lb_ok: None,
                address_held: None,
            })
            .collect()
    }

    #[test]
    fn slow_rounds_around_the_kill_are_reported_and_steady_ones_are_not() {
        // The 6 s gap lies before the last round before the kill: not counted.
        let s = at(&[0.0, 6.0, 7.0, 11.0, 12.0, 13.0]);
        assert_eq!(widest_gap(&s, 8.0), Some(4.0));
        assert_eq!(widest_gap(&at(&[0.0, 1.0, 2.0, 3.1, 4.0]), 2.5), None);
        assert_eq!(widest_gap(&at(&[0.0]), 0.5), None);
    }

    fn plan(lb_url: Option<&str>, lb_forwards: &[&str]) -> ProbePlan {
        ProbePlan {
            run_id: "r".into(),
            write_to: vec![],
            readyz: vec![],
            lb_url: lb_url.map(Into::into),
            lb_forwards: lb_forwards.iter().map(|a| a.parse().unwrap()).collect(),
            holder: None,
            baseline: Duration::ZERO,
            min_observe: Duration::ZERO,
            timeout: Duration::ZERO,
        }
    }

    fn lb(points: &[(f64, bool)]) -> Vec<Sample> {
        points
            .iter()
            .map(|(t, ok)| Sample {
                t: *t,
                api_ok: true,
                quorum_ok: true,
                lb_ok: Some(*ok),
                address_held: None,
            })
            .collect()
    }

    #[test]
    fn the_lb_is_measured_through_the_vms_forwards_without_an_lb_url() {
        let fw = ["127.0.0.1:41001", "127.0.0.1:41002"];
        let samples = lb(&[
            (1.0, true),
            (2.0, true),
            (3.0, false),
            (4.0, false),
            (5.0, true),
        ]);
        // Down from the round after the kill (2.5) to 5.0: 2.5 s.
        match lb_measure(&plan(None, &fw), &samples, 2.5, true) {
            Measure::Recovered { seconds, .. } => assert!((seconds - 2.5).abs() < 1e-9),
            other => panic!("{other:?}"),
        }
        // Nothing answered before the kill: no figure, and the forwards are named.
        match lb_measure(&plan(None, &fw), &samples, 2.5, false) {
            Measure::NotMeasured { why } => {
                assert!(why.contains("127.0.0.1:41001, 127.0.0.1:41002"), "{why}")
            }
            other => panic!("{other:?}"),
        }
        // --lb-url wins over the forwards; neither: not measured.
        assert!(matches!(
            lb_target(&plan(Some("http://x/"), &fw)),
            Some(LbTarget::Url("http://x/"))
        ));
        match lb_measure(&plan(Some("http://x/"), &fw), &samples, 2.5, false) {
            Measure::NotMeasured { why } => assert!(why.contains("http://x/"), "{why}"),
            other => panic!("{other:?}"),
        }
        assert!(lb_target(&plan(None, &[])).is_none());
        assert!(matches!(
            lb_measure(&plan(None, &[]), &samples, 2.5, true),
            Measure::NotMeasured { .. }
        ));
    }

    /// A forward as QEMU makes it: the connection is accepted on 127.0.0.1 whatever the guest
    /// does; `answer` decides whether an HTTP response follows (the VM holds the address) or
    /// the connection is held silently, then closed (it does not).
    async fn forward(answer: bool) -> (SocketAddr, tokio::task::JoinHandle<()>) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let at = l.local_addr().unwrap();
        let task = tokio::spawn(async move {
            while let Ok((mut c, _)) = l.accept().await {
                tokio::spawn(async move {
                    let mut buf = [0u8; 1024];
                    let _ = c.read(&mut buf).await;
                    if answer {
                        let _ = c
                            .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\nconnection: close\r\n\r\nnode1")
                            .await;
                    } else {
                        tokio::time::sleep(Duration::from_secs(3)).await;
                    }
                });
            }
        });
        (at, task)
    }

    #[tokio::test]
    async fn the_lb_is_up_when_any_forward_answers_http_and_a_bare_connection_is_not_enough() {
        let http = lb_client().unwrap();
        let (holder, t1) = forward(true).await;
        let (other, t2) = forward(false).await;
        // A port nothing listens on (the killed VM's forward is gone with its QEMU).
        let gone = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap()
        };
        let started = Instant::now();
        assert!(lb_forwards_once(&http, &[other, gone, holder]).await);
        // The answer ends the round: it does not wait for the silent forward's timeout.
        assert!(
            started.elapsed() < Duration::from_millis(1500),
            "{:?}",
            started.elapsed()
        );
        assert!(!lb_forwards_once(&http, &[other, gone]).await);
        assert!(!lb_forwards_once(&http, &[]).await);
        // Bounded by the client's timeout, the forwards asked side by side.
        assert!(
            started.elapsed() < Duration::from_secs(8),
            "{:?}",
            started.elapsed()
        );
        t1.abort();
        t2.abort();
    }
}
