//! Measures `imagebuilder build` customising a base image of more than 2 GiB of data, next to
//! `cp --sparse=always` of the same file (the floor: reading and writing every data byte once),
//! and the builder's peak RSS. Prints figures and PASS/FAIL against the targets (within 1.5x of
//! the copy, RSS under 200 MB); asserts nothing. Run with `scripts/bench-image`. Needs root and
//! the image tools (it bootstraps/uses the cached x86_64 base like the tests).
//!
//! Both sides end with the data on disk (`sync`). The builder's figure includes everything a
//! build writes: the raw image, the `.bmap` (SHA-256 per mapped range), the whole-image SHA-256
//! for `SHA256SUMS`, the manifest, and the `e2fsck -n` check; the copy does none of that. The
//! firstboot binary baked in is the workspace's debug build with its debug info stripped
//! (`objcopy --strip-debug`), about the size of a release build (whose profile strips debug
//! info), rather than the ~200 MB unstripped debug binary.

#[path = "../tests/common/mod.rs"]
mod common;

use std::path::Path;
use std::time::Instant;

use rackseed_config::{Base, Target};
use rand::{RngCore, SeedableRng};

const FILLER: u64 = 1400 << 20;

fn vm_hwm_kib() -> u64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    s.lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// CPU seconds used so far by this process and by its waited-for children (`/proc/self/stat`).
fn cpu_seconds(tick: f64) -> (f64, f64) {
    let s = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let rest = s.rsplit_once(") ").map(|(_, r)| r).unwrap_or("");
    let f: Vec<f64> = rest
        .split_whitespace()
        .map(|x| x.parse().unwrap_or(0.0))
        .collect();
    let get = |i: usize| f.get(i).copied().unwrap_or(0.0) / tick;
    // Fields 14-17 of stat(5): utime, stime, cutime, cstime; `rest` starts at field 3.
    (get(11) + get(12), get(13) + get(14))
}

fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split_whitespace()
        .next()
        .unwrap_or("?")
        .to_string()
}

async fn base_image(dir: &Path) -> std::path::PathBuf {
    let tar = common::bootstrap_tarball(Target::X86_64Efi).await;
    let img = dir.join("bench-base.img");
    let work = tempfile::tempdir_in(dir).unwrap();
    let tree = work.path().join("tree");
    imagebuilder::base::bootstrap::unpack(&tar, &tree)
        .await
        .unwrap();
    // Incompressible data so the base holds more than 2 GiB like a real Ubuntu image.
    std::fs::create_dir_all(tree.join("var/lib/bench")).unwrap();
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let mut f =
        std::io::BufWriter::new(std::fs::File::create(tree.join("var/lib/bench/filler")).unwrap());
    let mut buf = vec![0u8; 1 << 20];
    for _ in 0..(FILLER >> 20) {
        rng.fill_bytes(&mut buf);
        std::io::Write::write_all(&mut f, &buf).unwrap();
    }
    drop(f);
    let partial = work.path().join("base.img");
    imagebuilder::disk::compose::compose(
        &tree,
        Target::X86_64Efi,
        imagebuilder::disk::compose::Shape::Official,
        &partial,
    )
    .await
    .unwrap();
    std::fs::rename(&partial, &img).unwrap();
    img
}

fn data_bytes(p: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(p).unwrap().blocks() * 512
}

#[tokio::main]
async fn main() {
    common::require_all_tools();
    let dir =
        tempfile::tempdir_in(std::env::var_os("BENCH_DIR").unwrap_or_else(|| "/var/tmp".into()))
            .unwrap();
    let base = base_image(dir.path()).await;
    let size = std::fs::metadata(&base).unwrap().len();
    println!(
        "base image: {} ({:.2} GiB, {:.2} GiB of data)",
        base.display(),
        size as f64 / (1u64 << 30) as f64,
        data_bytes(&base) as f64 / (1u64 << 30) as f64
    );
    let firstboot = dir.path().join("firstboot");
    common::run(
        "objcopy",
        &[
            "--strip-debug",
            common::x86_firstboot().to_str().unwrap(),
            firstboot.to_str().unwrap(),
        ],
    )
    .await;
    println!(
        "firstboot binary baked in: {:.1} MiB (debug build, debug info stripped)",
        std::fs::metadata(&firstboot).unwrap().len() as f64 / (1u64 << 20) as f64
    );
    let hwm_before = vm_hwm_kib();

    let tick: f64 = common::run("getconf", &["CLK_TCK"])
        .await
        .trim()
        .parse()
        .expect("getconf CLK_TCK prints a number");
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    // CPU-bound work the copy does not do: SHA-256 of every byte of the image (holes as zeros)
    // and of every mapped byte again for the .bmap.
    println!(
        "hashing the build must do: {:.2} GiB (whole image) + {:.2} GiB (mapped ranges)",
        size as f64 / (1u64 << 30) as f64,
        data_bytes(&base) as f64 / (1u64 << 30) as f64
    );
    let mut best_cp = f64::MAX;
    let mut best_build = f64::MAX;
    for round in 1..=2 {
        let floor = dir.path().join("floor.img");
        let load = load_average();
        let (_, kids0) = cpu_seconds(tick);
        let t = Instant::now();
        common::run(
            "cp",
            &[
                "--sparse=always",
                base.to_str().unwrap(),
                floor.to_str().unwrap(),
            ],
        )
        .await;
        common::run("sync", &[]).await;
        let cp = t.elapsed().as_secs_f64();
        let cp_cpu = cpu_seconds(tick).1 - kids0;
        std::fs::remove_file(&floor).unwrap();

        let mut s = common::sample(
            dir.path(),
            Target::X86_64Efi,
            Base::Local {
                path: base.clone(),
                sha256: None,
            },
        );
        s.config.image.disk_size = size;
        s.config.network.wifi = None;
        let out = dir.path().join(format!("out{round}"));
        // Cold start for both: the base is read from the page cache by each (it was just
        // written or copied), so neither pays disk reads the other does not.
        let req = common::request(&s, &out, firstboot.clone());
        let (me0, kids0) = cpu_seconds(tick);
        let t = Instant::now();
        let o = imagebuilder::build::run(req).await.expect("bench build");
        common::run("sync", &[]).await;
        let build = t.elapsed().as_secs_f64();
        let (me1, kids1) = cpu_seconds(tick);
        let build_cpu = (me1 - me0) + (kids1 - kids0);
        let phases: Vec<String> = o
            .timings
            .iter()
            .map(|(n, t)| format!("{n} {t:.2} s"))
            .collect();
        let ready: f64 = o
            .timings
            .iter()
            .filter(|(n, _)| *n != "outputs")
            .map(|(_, t)| t)
            .sum();
        println!(
            "round {round}: customised image ready after {ready:.2} s; steps: {}",
            phases.join(", ")
        );
        println!(
            "round {round} (load average {load} on {cores} cores): cp --sparse=always {cp:.2} s ({cp_cpu:.1} s CPU), imagebuilder build {build:.2} s ({build_cpu:.1} s CPU), ratio {:.2}",
            build / cp
        );
        std::fs::remove_dir_all(o.image.parent().unwrap()).unwrap();
        best_cp = best_cp.min(cp);
        best_build = best_build.min(build);
    }
    let hwm = vm_hwm_kib();
    let ratio = best_build / best_cp;
    let verdict = |ok: bool| if ok { "PASS" } else { "FAIL" };
    println!(
        "best: cp --sparse=always {best_cp:.2} s; imagebuilder build (raw + bmap + SHA256SUMS + manifest) {best_build:.2} s; ratio {ratio:.2} (target <= 1.5: {})",
        verdict(ratio <= 1.5)
    );
    // VmHWM covers the whole process, which also made the base; the builder runs after.
    let rss_mb = hwm as f64 * 1024.0 / 1e6;
    println!(
        "peak RSS of the process: {rss_mb:.0} MB (before building: {} MiB; target < 200 MB: {})",
        hwm_before / 1024,
        verdict(rss_mb < 200.0)
    );
}
