//! `addons.dns.upstream` reaches MicroK8s through the launch configuration the agent writes
//! before `snap install` (the only place it can: a later `enable dns X` on the enabled addon
//! changes nothing), and the simulator does not pretend otherwise: it records each addon's
//! arguments, from the launch configuration or from `enable`, shows them in `status --format
//! yaml` (`args:`, a simulator-only line), and keeps them when an enabled addon is enabled
//! again with other arguments. Needs root (network namespaces); fails loudly otherwise.
//!
//! Run: `cargo test -p microk8s-sim --test launch_dns` (as root).

mod support;

use std::path::Path;
use std::time::Duration;

use firstboot::system::microk8s::{EnableOutcome, LaunchSettings, Microk8s, Status};
use netns_lab::Lab;
use rackseed_host::command::Cmd;
use support::*;

const CONFIG: &str = r#"
[cluster]
name = "dns-test"
secret-file = "dns-test.secret"

[addons]
storage = "none"
dns = { upstream = ["192.0.2.53", "2001:db8::53"] }

[image]
target = "x86_64-efi"

[image.base]
kind = "local"
path = "base.img"
"#;

/// The raw `microk8s status --format yaml`, as the CLI prints it.
fn status_yaml(n: &SimNode) -> String {
    let bin = n.dir.join("bin/microk8s");
    n.run(move |_| async move {
        Cmd::new(&bin, Duration::from_secs(15))
            .args(["status", "--format", "yaml"])
            .output()
            .await
            .map(|o| o.stdout)
    })
    .expect("microk8s status --format yaml")
}

/// The `args` of `addon`'s entry in `status --format yaml`, if any.
fn addon_args(yaml: &str, addon: &str) -> Option<Vec<String>> {
    let v: serde_yaml::Value = serde_yaml::from_str(yaml).expect("status is YAML");
    let entry = v["addons"]
        .as_sequence()?
        .iter()
        .find(|a| a["name"].as_str() == Some(addon))?
        .clone();
    entry
        .get("args")
        .map(|a| serde_yaml::from_value(a.clone()).expect("args is a list of strings"))
}

#[test]
fn the_dns_upstream_from_the_config_is_what_microk8s_runs_with() {
    let lab = Lab::new(1).expect("creating the network lab (this test must run as root)");
    let root = tempfile::tempdir().unwrap();
    let log = root.path().join("commands.jsonl");
    let rt = runtime();
    let _g = rt.enter();
    let cfg = rackseed_config::parse(CONFIG, Path::new("dns-test.toml"))
        .expect("the test config is valid")
        .config;
    let mut n = SimNode::new(&lab, 0, root.path(), &log, &[]);
    // What `firstboot run` configures its adapter with.
    n.adapter.config.launch_settings = LaunchSettings::from_config(&cfg);
    n.install_and_start();

    let want = vec!["192.0.2.53,2001:db8::53".to_owned()];
    eventually(
        Duration::from_secs(5),
        "dns enabled from the launch config with its upstreams",
        || (addon_args(&status_yaml(&n), "dns") == Some(want.clone())).then_some(()),
    );
    // The adapter's parser still reads the document (the extra line is skipped).
    match n.status() {
        Status::Running(s) => assert!(s.addon_enabled("dns")),
        other => panic!("expected a running node, got {other:?}"),
    }

    // Enabling the enabled addon with other upstreams changes nothing, as in MicroK8s.
    let out = n
        .run(|a| async move { a.enable("dns", &["8.8.8.8".to_owned()]).await })
        .unwrap();
    assert_eq!(out, EnableOutcome::AlreadyEnabled);
    assert_eq!(addon_args(&status_yaml(&n), "dns"), Some(want));

    // An addon enabled by `enable` shows its arguments too.
    let out = n
        .run(|a| async move {
            a.enable("metallb", &["10.0.0.200-10.0.0.210".to_owned()])
                .await
        })
        .unwrap();
    assert_eq!(out, EnableOutcome::Enabled);
    assert_eq!(
        addon_args(&status_yaml(&n), "metallb"),
        Some(vec!["10.0.0.200-10.0.0.210".to_owned()])
    );
}

#[test]
fn without_upstreams_dns_runs_with_no_arguments() {
    let lab = Lab::new(1).expect("creating the network lab (this test must run as root)");
    let root = tempfile::tempdir().unwrap();
    let log = root.path().join("commands.jsonl");
    let rt = runtime();
    let _g = rt.enter();
    let mut n = SimNode::new(&lab, 0, root.path(), &log, &[]);
    n.install_and_start();
    eventually(Duration::from_secs(5), "dns enabled", || match n.status() {
        Status::Running(s) if s.addon_enabled("dns") => Some(()),
        _ => None,
    });
    assert_eq!(addon_args(&status_yaml(&n), "dns"), None);
}
