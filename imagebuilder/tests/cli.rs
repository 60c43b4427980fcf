//! The `imagebuilder build` and `inspect` commands as a user runs them, including Ctrl-C.

mod common;

use std::time::{Duration, Instant};

use common::*;
use rackseed_config::Target;
use rackseed_host::command::Cmd;

fn write_config(dir: &std::path::Path, base_path: &std::path::Path) -> std::path::PathBuf {
    rackseed_protocol::secret::ClusterSecret::from_bytes([9u8; 32])
        .write_new(&dir.join("lab.secret"))
        .unwrap();
    let cfg = dir.join("lab.toml");
    std::fs::write(
        &cfg,
        format!(
            "[cluster]\nname = \"lab\"\nsecret-file = \"lab.secret\"\n\n[network]\naddressing = \"dhcp\"\n\n\
             [image]\ntarget = \"x86_64-efi\"\ndisk-size = \"2GiB\"\n\n[image.base]\nkind = \"local\"\npath = \"{}\"\n\n\
             [[image.users]]\nname = \"ops\"\nssh-keys = [\"ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIJ6a ops@lab\"]\n",
            base_path.display()
        ),
    )
    .unwrap();
    cfg
}

fn imagebuilder() -> std::path::PathBuf {
    std::path::PathBuf::from(env!("CARGO_BIN_EXE_imagebuilder"))
}

#[tokio::test(flavor = "multi_thread")]
async fn build_then_inspect_from_the_command_line() {
    require_all_tools();
    let dir = tempfile::tempdir().unwrap();
    let base = official_fixture(Target::X86_64Efi).await;
    let cfg = write_config(dir.path(), &base);
    let out = dir.path().join("out");
    let ib = imagebuilder();
    let o = Cmd::new(&ib, Duration::from_secs(900))
        .arg("build")
        .arg("--config")
        .arg(&cfg)
        .arg("--out")
        .arg(&out)
        .arg("--firstboot-bin")
        .arg(x86_firstboot())
        .arg("--overlays")
        .arg(workspace().join("overlays"))
        .arg("--compress")
        .arg("zstd")
        .run()
        .await
        .unwrap();
    assert!(o.stdout.contains("sha256:"), "{}", o.stdout);
    let names = listing(&out);
    for n in [
        "rackseed-lab-x86_64-efi.img",
        "rackseed-lab-x86_64-efi.img.zst",
        "rackseed-lab-x86_64-efi.bmap",
        "SHA256SUMS",
        "manifest.json",
    ] {
        assert!(names.contains(&n.to_string()), "{n} missing: {names:?}");
    }
    let img = out.join("rackseed-lab-x86_64-efi.img");
    let o = Cmd::new(&ib, Duration::from_secs(120))
        .arg("inspect")
        .arg(&img)
        .run()
        .await
        .unwrap();
    assert!(
        o.stdout.contains("cluster: lab")
            && o.stdout.contains("cluster secret: present, mode 0600"),
        "{}",
        o.stdout
    );
    assert!(
        o.stdout.contains("root=PARTUUID="),
        "cmdline shown: {}",
        o.stdout
    );
    let secret = std::fs::read_to_string(dir.path().join("lab.secret")).unwrap();
    assert!(!o.stdout.contains(secret.trim()));
}

#[tokio::test(flavor = "multi_thread")]
async fn ctrl_c_leaves_no_file_under_a_final_name() {
    require_all_tools();
    let dir = tempfile::tempdir().unwrap();
    let base = official_fixture(Target::X86_64Efi).await;
    let cfg = write_config(dir.path(), &base);
    let out = dir.path().join("out");
    let mut child = Cmd::new(imagebuilder(), Duration::from_secs(900))
        .arg("build")
        .arg("--config")
        .arg(&cfg)
        .arg("--out")
        .arg(&out)
        .arg("--firstboot-bin")
        .arg(x86_firstboot())
        .arg("--overlays")
        .arg(workspace().join("overlays"))
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(120);
    while !listing(&out).iter().any(|n| n.contains(".img.partial-")) {
        assert!(
            Instant::now() < deadline,
            "the build never started writing the image"
        );
        assert!(
            child.try_wait().unwrap().is_none(),
            "the build ended before it could be interrupted"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let pid = nix::unistd::Pid::from_raw(child.id().unwrap() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGINT).unwrap();
    let status = tokio::time::timeout(Duration::from_secs(60), child.wait())
        .await
        .expect("exits after SIGINT")
        .unwrap();
    assert!(!status.success(), "an interrupted build must fail");
    let names = listing(&out);
    assert!(names.is_empty(), "Ctrl-C left files behind: {names:?}");
}
