//! The node-preparation verdict across agent restarts, and the packages of the other features
//! on an official base: the verdict is kept in the state folder (atomically, 0600), a restarted
//! member shows it and checks again (a failed Longhorn prerequisite is neither forgotten nor
//! kept once fixed), a damaged file is a clear error; keepalived, curl and iputils' arping are
//! installed from the image's staged folder in one offline `dpkg -i`, and when they cannot be
//! had the verdict names the setting and what the node lacks. Fake root and kernel
//! (`addons::fakes`), no root needed.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use firstboot::addons::fakes::{member_doc, FakeKernel, FakeRoot, FAKE_DEB};
use firstboot::addons::longhorn::{verdict_from_doc, Verdict};
use firstboot::addons::prep::{
    installed_packages, load_verdict, prepare_and_record, prepare_for_config, store_verdict,
    PrepError, Readiness, VERDICT_FILE,
};
use rackseed_config::ClusterConfig;

fn run<F: std::future::Future>(f: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(f)
}

fn config(cluster: &str, addons: &str) -> ClusterConfig {
    let text = format!(
        "[cluster]\nname = \"lab\"\n{cluster}\n[addons]\n{addons}\n[image]\ntarget = \"x86_64-efi\"\n\n[image.base]\nkind = \"local\"\npath = \"base.img\"\n"
    );
    rackseed_config::parse(&text, Path::new("/tmp/lab/cluster.toml"))
        .unwrap_or_else(|e| panic!("{e}"))
        .config
}

fn root_with(dir: &Path, pkgs: &[&str]) -> PathBuf {
    let root = dir.join("root");
    FakeRoot {
        dpkg_installed: Some(pkgs.iter().map(|p| p.to_string()).collect()),
        ..Default::default()
    }
    .write(&root)
    .unwrap();
    root
}

const STAGED: &str = "/var/lib/rackseed/storage";

fn stage(root: &Path, files: &[&str]) {
    let dir = root.join(STAGED.trim_start_matches('/'));
    std::fs::create_dir_all(&dir).unwrap();
    for name in files {
        std::fs::write(dir.join(name), FAKE_DEB).unwrap();
    }
}

#[test]
fn a_failed_prerequisite_survives_a_restart_and_clears_once_fixed() {
    let dir = tempfile::tempdir().unwrap();
    let root = root_with(dir.path(), &["systemd", "open-iscsi", "nfs-common"]);
    let state = dir.path().join("state");
    std::fs::create_dir_all(&state).unwrap();
    let cfg = config("", "storage = \"longhorn\"");

    // First boot: iscsid will not start.
    let broken = FakeKernel::new(&root).with_failing_unit("iscsid");
    let r = run(prepare_and_record(&root, &cfg, true, &state, &broken)).unwrap();
    assert!(!r.ok);
    assert!(
        r.problems[0].starts_with("longhorn: iscsid is not running on this node"),
        "{r:?}"
    );
    let file = state.join(VERDICT_FILE);
    assert_eq!(
        std::fs::metadata(&file).unwrap().permissions().mode() & 0o777,
        0o600
    );

    // The agent restarts: before it has checked again, it reports the same verdict, which the
    // node installing Longhorn reads from its status document as unmet.
    let kept = load_verdict(&state).unwrap().expect("a kept verdict");
    assert_eq!(kept, r);
    let problems: Vec<&str> = kept.problems.iter().map(String::as_str).collect();
    let doc = member_doc("b", "member", &problems);
    let seen = verdict_from_doc(&doc).unwrap();
    assert!(
        matches!(&seen.verdict, Verdict::Unmet(p) if p.iter().any(|p| p.contains("iscsid is not running"))),
        "{seen:?}"
    );

    // Its check after the restart, with iscsid fixed: the kept verdict clears.
    let fixed = FakeKernel::new(&root);
    let r = run(prepare_and_record(&root, &cfg, true, &state, &fixed)).unwrap();
    assert_eq!(r, Readiness::default(), "{r:?}");
    assert_eq!(load_verdict(&state).unwrap(), Some(Readiness::default()));
}

#[test]
fn no_verdict_yet_is_none_and_a_damaged_one_is_an_error_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    assert_eq!(load_verdict(dir.path()).unwrap(), None);
    std::fs::write(dir.path().join(VERDICT_FILE), "{\"ok\": tru").unwrap();
    let e = load_verdict(dir.path()).unwrap_err();
    assert!(matches!(e, PrepError::Malformed { .. }), "{e:?}");
    assert!(e.to_string().contains(VERDICT_FILE), "{e}");
    // Nothing was overwritten; the next check replaces it.
    assert_eq!(
        std::fs::read_to_string(dir.path().join(VERDICT_FILE)).unwrap(),
        "{\"ok\": tru"
    );
    store_verdict(dir.path(), &Readiness::default()).unwrap();
    assert_eq!(
        load_verdict(dir.path()).unwrap(),
        Some(Readiness::default())
    );
}

#[test]
fn an_official_base_installs_keepalived_curl_and_arping_from_the_staged_folder() {
    let dir = tempfile::tempdir().unwrap();
    let root = root_with(dir.path(), &["systemd"]);
    stage(
        &root,
        &[
            "keepalived_1%3a2.2.8-1build2_amd64.deb",
            "curl_8.5.0-2ubuntu10_amd64.deb",
            "libcurl4t64_8.5.0-2ubuntu10_amd64.deb",
            "iputils-arping_3%3a20240117-1build1_amd64.deb",
        ],
    );
    let cfg = config(
        "api-address = \"10.0.0.100\"",
        &format!(
            "storage = \"none\"\noffline = \"{STAGED}\"\n\n[addons.metallb]\naddresses = \"auto\""
        ),
    );
    let kernel = FakeKernel::new(&root);
    let r = run(prepare_for_config(&root, &cfg, true, &kernel)).unwrap();
    assert_eq!(r, Readiness::default(), "{r:?}");
    let calls = kernel.calls();
    assert_eq!(calls.len(), 1, "one offline dpkg call: {calls:?}");
    assert!(
        calls[0].starts_with("dpkg -i curl_") && calls[0].contains("keepalived_"),
        "{calls:?}"
    );
    let installed = installed_packages(&root).unwrap().unwrap();
    for p in ["keepalived", "curl", "iputils-arping"] {
        assert!(installed.contains(p), "{p}: {installed:?}");
    }
    assert!(root.join("usr/sbin/keepalived").exists());
    // Installed now: a second run runs nothing.
    let r = run(prepare_for_config(&root, &cfg, true, &kernel)).unwrap();
    assert!(r.ok, "{r:?}");
    assert_eq!(kernel.calls().len(), 1, "{:?}", kernel.calls());
}

#[test]
fn keepalived_that_cannot_be_had_is_a_verdict_naming_the_setting_and_the_consequence() {
    let dir = tempfile::tempdir().unwrap();
    let root = root_with(dir.path(), &["systemd", "curl"]);
    // Not staged at all (an official base built without addons.offline).
    let cfg = config("api-address = \"10.0.0.100\"", "storage = \"none\"");
    let kernel = FakeKernel::new(&root);
    let r = run(prepare_for_config(&root, &cfg, true, &kernel)).unwrap();
    assert_eq!(r.problems.len(), 1, "{r:?}");
    assert_eq!(
        r.problems[0],
        "api-address: keepalived not installed on this node (every api-address node needs \
         them): the node cannot hold the floating API address (it forms without it)"
    );
    assert!(
        r.fixes[0].contains("apt-get install -y keepalived"),
        "{r:?}"
    );
    assert!(kernel.calls().is_empty(), "{:?}", kernel.calls());
    // Staged folder without keepalived: says so, installs nothing.
    stage(&root, &["curl_8.5.0-2ubuntu10_amd64.deb"]);
    let cfg = config(
        "api-address = \"10.0.0.100\"",
        &format!("storage = \"none\"\noffline = \"{STAGED}\""),
    );
    let r = run(prepare_for_config(&root, &cfg, true, &kernel)).unwrap();
    assert!(
        r.problems[0].starts_with(&format!(
            "api-address: keepalived not installed on this node and not staged in {}",
            root.join(STAGED.trim_start_matches('/')).display()
        )),
        "{r:?}"
    );
    assert!(kernel.calls().is_empty(), "{:?}", kernel.calls());
    // A storage-only check (the agent's own keepalived in tests) leaves them out.
    let r = run(prepare_for_config(&root, &cfg, false, &kernel)).unwrap();
    assert!(r.ok, "{r:?}");
}
