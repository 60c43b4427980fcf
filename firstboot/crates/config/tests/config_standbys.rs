//! `cluster.standbys`: full MicroK8s members beyond the control plane. The default fills
//! MicroK8s' six full members (3 voters + 3 standbys); values outside 0–6 are refused at their
//! line; more full members than MicroK8s keeps are warned.

mod common;

use common::{cluster, load};
use rackseed_config::default_standbys;

#[test]
fn the_default_fills_microk8s_six_full_members() {
    assert_eq!(load(&cluster("")).unwrap().config.cluster.standbys, 3);
    for (cp, want) in [(1, 5), (3, 3), (5, 1), (7, 0)] {
        let c = load(&cluster(&format!("control-plane = {cp}")))
            .unwrap()
            .config;
        assert_eq!(c.cluster.standbys, want, "control-plane = {cp}");
        assert_eq!(default_standbys(cp), want);
    }
    let none = load(&cluster("standbys = 0")).unwrap().config;
    assert_eq!(none.cluster.standbys, 0);
}

#[test]
fn out_of_range_is_refused_and_spares_are_warned() {
    let e = load(&cluster("standbys = 7")).unwrap_err();
    assert!(
        e.diagnostics
            .iter()
            .any(|d| d.line == 3 && d.field == "cluster.standbys"),
        "{e}"
    );
    let l = load(&cluster("control-plane = 5\nstandbys = 3")).unwrap();
    assert!(
        l.warnings
            .iter()
            .any(|w| w.field == "cluster.standbys" && w.message.contains("the other 2 are spares")),
        "{:?}",
        l.warnings
    );
    assert!(!load(&cluster("standbys = 3"))
        .unwrap()
        .warnings
        .iter()
        .any(|w| w.field == "cluster.standbys"));
}
