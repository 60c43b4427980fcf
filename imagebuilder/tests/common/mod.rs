//! Shared helpers for the image tests: tool checks that fail loudly, a sample config, the
//! bootstrapped bases (cached under the rackseed cache, so the suite pays debootstrap once),
//! fixtures shaped like Ubuntu's official images, and a loopback HTTP server that can break a
//! transfer or corrupt it.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use imagebuilder::base::{apt_sources, bootstrap};
use imagebuilder::disk::compose::{self, Shape};
use rackseed_config::*;
use rackseed_host::command::Cmd;
use rackseed_protocol::secret::ClusterSecret;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

pub fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// Panics (the test fails) naming what to install when a tool is missing or we are not root.
pub fn require_tools(tools: &[(&str, &str)]) {
    let missing: Vec<String> = tools
        .iter()
        .filter(|(t, _)| !imagebuilder::tool::on_path(t))
        .map(|(t, p)| format!("{t} (apt-get install {p})"))
        .collect();
    assert!(
        missing.is_empty(),
        "image tests need these tools: {}",
        missing.join(", ")
    );
    assert!(
        nix::unistd::geteuid().is_root(),
        "image tests bootstrap bases with debootstrap and need root"
    );
}

pub fn require_all_tools() {
    let _ = tracing_subscriber::fmt()
        .with_test_writer()
        .with_env_filter("imagebuilder=info")
        .try_init();
    require_tools(&[
        ("debootstrap", "debootstrap"),
        ("mke2fs", "e2fsprogs"),
        ("debugfs", "e2fsprogs"),
        ("e2fsck", "e2fsprogs"),
        ("sfdisk", "fdisk"),
        ("sgdisk", "gdisk"),
        ("fsck.vfat", "dosfstools"),
        ("bmaptool", "bmap-tools"),
        ("qemu-img", "qemu-utils"),
        ("cloud-init", "cloud-init"),
        ("zstd", "zstd"),
        ("xz", "xz-utils"),
    ]);
}

/// The rackseed cache the tests share (bootstrap tarballs survive between runs).
pub fn shared_cache() -> PathBuf {
    std::env::var_os("RACKSEED_TEST_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(imagebuilder::build::default_cache_dir)
}

/// The suite and mirror the build machine's apt sources name.
pub fn host_suite() -> (String, String) {
    apt_sources::main_suite(&apt_sources::read_sources(Path::new("/etc/apt")))
        .expect("the build machine's apt sources name no release suite")
}

pub fn bootstrap_base(target: Target) -> Base {
    let (suite, _) = host_suite();
    Base::Bootstrap {
        suite,
        mirror: None,
        arch: target.deb_arch().into(),
        packages: vec![],
    }
}

static BOOTSTRAP_LOCK: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// The cached bootstrap tarball for `target`'s arch (bootstrapping it on first use).
pub async fn bootstrap_tarball(target: Target) -> PathBuf {
    let _g = BOOTSTRAP_LOCK.lock().await;
    let (suite, _) = host_suite();
    let spec =
        bootstrap::BootstrapSpec::new(&suite, None, target.deb_arch(), &[], Path::new("/etc/apt"))
            .unwrap();
    bootstrap::ensure_tarball(&spec, &shared_cache())
        .await
        .expect("bootstrapping the test base")
}

static FIXTURE_LOCK: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// An image shaped like Ubuntu's official one for `target`, made from the bootstrapped tree
/// (cached next to the bootstrap tarball; tests copy it before changing it).
pub async fn official_fixture(target: Target) -> PathBuf {
    let tar = bootstrap_tarball(target).await;
    let _g = FIXTURE_LOCK.lock().await;
    let img = tar.with_extension(format!("{}.official.img", target.as_str()));
    if img.is_file() {
        return img;
    }
    let work = tempfile::tempdir_in(tar.parent().unwrap()).unwrap();
    let tree = work.path().join("tree");
    bootstrap::unpack(&tar, &tree).await.unwrap();
    let partial = work.path().join("fixture.img");
    compose::compose(&tree, target, Shape::Official, &partial)
        .await
        .expect("composing the official-shaped fixture");
    std::fs::rename(&partial, &img).unwrap();
    img
}

/// The rpi fixture as `.img.xz`, like the published preinstalled image (cached).
pub async fn official_rpi_xz() -> PathBuf {
    let raw = official_fixture(Target::Rpi4).await;
    let _g = FIXTURE_LOCK.lock().await;
    let xz = raw.with_extension("img.xz");
    if !xz.is_file() {
        // The xz tool (optimised C, fastest preset) keeps this quick in debug test builds; the
        // builder's own xz output is covered by outputs' unit tests.
        let partial = raw.with_extension("xz.partial");
        let data = run(
            "sh",
            &[
                "-c",
                &format!("xz -T0 -0 -c '{}' > '{}'", raw.display(), partial.display()),
            ],
        )
        .await;
        assert!(data.is_empty());
        std::fs::rename(&partial, &xz).unwrap();
    }
    xz
}

/// An aarch64 stand-in for the firstboot binary: a real arm64 executable from the arm64
/// bootstrap (rustup here has no aarch64 target). The builder never runs it; it only checks
/// its ELF machine and copies it.
pub async fn aarch64_stand_in(dir: &Path) -> PathBuf {
    let tar = bootstrap_tarball(Target::Rpi4).await;
    let out = dir.join("firstboot-aarch64");
    let x = dir.join("arm64-true");
    std::fs::create_dir_all(&x).unwrap();
    run(
        "tar",
        &[
            "-xf",
            tar.to_str().unwrap(),
            "-C",
            x.to_str().unwrap(),
            "./usr/bin/true",
        ],
    )
    .await;
    std::fs::copy(x.join("usr/bin/true"), &out).unwrap();
    out
}

/// The workspace's own x86_64 firstboot build.
pub fn x86_firstboot() -> PathBuf {
    let p = workspace().join("target/debug/firstboot");
    assert!(
        p.is_file(),
        "{} is missing: run `cargo build -p firstboot` first",
        p.display()
    );
    p
}

/// Runs a program, panicking with its stderr on failure; returns stdout.
pub async fn run(program: &str, args: &[&str]) -> String {
    match Cmd::new(program, Duration::from_secs(600))
        .args(args)
        .run()
        .await
    {
        Ok(o) => o.stdout,
        Err(e) => panic!("{:#}", anyhow::Error::from(e)),
    }
}

/// Exit code and combined output, for checks that must fail.
pub async fn output(program: &str, args: &[&str]) -> (Option<i32>, String) {
    let o = Cmd::new(program, Duration::from_secs(600))
        .args(args)
        .output()
        .await
        .unwrap();
    (o.code(), format!("{}{}", o.stdout, o.stderr))
}

pub struct Sample {
    pub config: ClusterConfig,
    pub toml: String,
    pub secret: ClusterSecret,
    pub psk: &'static str,
}

/// A config for `target` with Wi-Fi, a user with an SSH key, and the secret written in `dir`.
pub fn sample(dir: &Path, target: Target, base: Base) -> Sample {
    let secret = ClusterSecret::from_bytes([7u8; 32]);
    let secret_file = dir.join("lab.secret");
    if !secret_file.exists() {
        secret.write_new(&secret_file).unwrap();
    }
    let psk = "correct horse battery";
    let psk_file = dir.join("wifi.psk");
    std::fs::write(&psk_file, format!("{psk}\n")).unwrap();
    let config = ClusterConfig {
        cluster: Cluster {
            name: "lab".into(),
            control_plane: 3,
            expected_nodes: 3,
            formation_timeout: Duration::from_secs(600),
            join_parallelism: 8,
            secret_file: secret_file.clone(),
            api_address: None,
            standbys: 3,
            replace_after: rackseed_config::DEFAULT_REPLACE_AFTER,
            api_check_interval: rackseed_config::DEFAULT_API_CHECK_INTERVAL,
        },
        microk8s: Microk8s {
            channel: "1.32/stable".into(),
            offline_snaps: None,
        },
        addons: Addons {
            dns: Dns {
                enabled: true,
                upstream: vec![],
            },
            metallb: None,
            storage: Storage::None,
            longhorn: Default::default(),
            offline: None,
        },
        network: Network {
            interface: None,
            addressing: Addressing::Dhcp,
            wifi: Some(Wifi {
                ssid: "homelab".into(),
                psk_file: psk_file.clone(),
                country: "GB".into(),
            }),
        },
        nodes: vec![],
        image: Image {
            target,
            base,
            disk_size: 2 << 30,
            users: vec![User {
                name: "ops".into(),
                ssh_keys: vec!["ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIJ6a ops@lab".into()],
                sudo: true,
            }],
            hostname_pattern: "{cluster}-{id}".into(),
        },
        backup: Default::default(),
    };
    let toml = format!(
        "# test cluster\n[cluster]\nname = \"lab\"\ncontrol-plane = 3\nsecret-file = \"{}\"\n\n[network.wifi]\nssid = \"homelab\"\npsk-file = \"{}\"\ncountry = \"GB\"\n\n[image]\ntarget = \"{}\"\n# Builds take the base from `config`; this line only makes the text a valid config.\nbase = {{ kind = \"bootstrap\", suite = \"bookworm\" }}\n",
        secret_file.display(),
        psk_file.display(),
        target.as_str()
    );
    Sample {
        config,
        toml,
        secret,
        psk,
    }
}

/// A request writing to `out` with the shared cache.
pub fn request(s: &Sample, out: &Path, firstboot: PathBuf) -> imagebuilder::build::BuildRequest {
    let mut r = imagebuilder::build::BuildRequest::new(
        s.config.clone(),
        s.toml.clone(),
        out.to_path_buf(),
        workspace().join("overlays"),
    );
    r.firstboot_bin = Some(firstboot);
    r.cache_dir = Some(shared_cache());
    r
}

/// Names in `dir` (sorted), hidden ones included.
pub fn listing(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = match std::fs::read_dir(dir) {
        Ok(rd) => rd
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect(),
        Err(_) => vec![],
    };
    v.sort();
    v
}

/// How the loopback server misbehaves.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Serve {
    Good,
    /// The first response sends half the body then closes the connection.
    BreakFirst,
    /// Every response has one byte flipped.
    Corrupt,
}

pub struct Server {
    pub url: String,
    pub requests: Arc<AtomicUsize>,
    pub ranged: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Server {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Serves `file` at `http://127.0.0.1:PORT/NAME` (GET with optional `Range: bytes=N-`).
pub async fn serve(file: PathBuf, mode: Serve) -> Server {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let name = file.file_name().unwrap().to_string_lossy().into_owned();
    let requests = Arc::new(AtomicUsize::new(0));
    let ranged = Arc::new(AtomicUsize::new(0));
    let (rq, rg) = (requests.clone(), ranged.clone());
    let task = tokio::spawn(async move {
        loop {
            let Ok((mut sock, _)) = listener.accept().await else {
                return;
            };
            let n = rq.fetch_add(1, Ordering::SeqCst);
            let file = file.clone();
            let rg = rg.clone();
            tokio::spawn(async move {
                let mut req = Vec::new();
                let mut buf = [0u8; 1024];
                while !req.windows(4).any(|w| w == b"\r\n\r\n") {
                    let Ok(k) = sock.read(&mut buf).await else {
                        return;
                    };
                    if k == 0 || req.len() > 16384 {
                        return;
                    }
                    req.extend_from_slice(&buf[..k]);
                }
                let text = String::from_utf8_lossy(&req).to_ascii_lowercase();
                let from: u64 = text
                    .lines()
                    .find_map(|l| l.strip_prefix("range: bytes="))
                    .and_then(|r| r.trim().trim_end_matches('-').parse().ok())
                    .unwrap_or(0);
                let mut data = tokio::fs::read(&file).await.unwrap();
                if mode == Serve::Corrupt {
                    let mid = data.len() / 2;
                    data[mid] ^= 0xff;
                }
                let body = &data[from as usize..];
                let head = if from > 0 {
                    rg.fetch_add(1, Ordering::SeqCst);
                    format!(
                        "HTTP/1.1 206 Partial Content\r\nContent-Length: {}\r\nContent-Range: bytes {}-{}/{}\r\nConnection: close\r\n\r\n",
                        body.len(),
                        from,
                        data.len() - 1,
                        data.len()
                    )
                } else {
                    format!(
                        "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                        body.len()
                    )
                };
                let _ = sock.write_all(head.as_bytes()).await;
                let send = if mode == Serve::BreakFirst && n == 0 {
                    &body[..body.len() / 2]
                } else {
                    body
                };
                let _ = sock.write_all(send).await;
                let _ = sock.shutdown().await;
            });
        }
    });
    Server {
        url: format!("http://127.0.0.1:{port}/{name}"),
        requests,
        ranged,
        task,
    }
}

/// Extracts partition bytes `[start, start+size)` of `image` to `dest` (for fsck.vfat).
pub fn extract(image: &Path, start: u64, size: u64, dest: &Path) {
    use std::io::{Read, Seek, SeekFrom, Write};
    let mut f = std::fs::File::open(image).unwrap();
    f.seek(SeekFrom::Start(start)).unwrap();
    let mut out = std::fs::File::create(dest).unwrap();
    let mut left = size;
    let mut buf = vec![0u8; 1 << 20];
    while left > 0 {
        let k = left.min(buf.len() as u64) as usize;
        f.read_exact(&mut buf[..k]).unwrap();
        out.write_all(&buf[..k]).unwrap();
        left -= k as u64;
    }
}
