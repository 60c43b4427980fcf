//! Fills the bootstrap cache the test suites share, so `scripts/test` can bootstrap the bases
//! (the arm64 one under user-mode emulation, the long pole of a cold run) in the background
//! while the workspace compiles, instead of inside the first test that needs them.
//!
//! For each target given it bootstraps the base exactly as the end-to-end and image tests ask
//! for it (the build machine's suite and mirror, no extra packages, storage `none`) and composes
//! it in the target's layout, both cached under `$RACKSEED_TEST_CACHE` or the default cache
//! (`$XDG_CACHE_HOME/rackseed`, `~/.cache/rackseed`), the folders the tests read. A cached
//! base is reused, so a warm run costs nothing. Needs root (debootstrap).
//!
//! With `--fixtures` it then makes the image suites' own cached inputs, through the very
//! functions those suites call (`tests/common`): the official-shaped x86_64-efi and rpi4 images
//! and the rpi4 one as `.img.xz` (composing them and compressing ~1.9 GB with xz costs minutes
//! on 2 cores, which would otherwise fall inside the first test that asks).
//!
//! Usage: `cargo run -p imagebuilder --example prewarm_bootstrap -- rpi4 rpi5 x86_64-efi --fixtures`

// The image suites' helpers, so the fixtures are made by the same code with the same names.
#[path = "../tests/common/mod.rs"]
mod common;

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result};
use imagebuilder::base::{apt_sources, bootstrap};
use rackseed_config::{Storage, Target};

#[tokio::main]
async fn main() -> Result<()> {
    // The bootstrap's progress (each stage's end, with its time) on stderr.
    tracing_subscriber::fmt()
        .with_max_level(tracing::Level::INFO)
        .with_writer(std::io::stderr)
        .init();
    let mut fixtures = false;
    let mut targets = Vec::new();
    for a in std::env::args().skip(1) {
        if a == "--fixtures" {
            fixtures = true;
        } else {
            targets.push(
                a.parse::<Target>()
                    .map_err(|e: String| anyhow::anyhow!(e))?,
            );
        }
    }
    anyhow::ensure!(
        !targets.is_empty(),
        "usage: prewarm_bootstrap TARGET... [--fixtures] (targets: x86_64-efi, rpi4, rpi5)"
    );
    let cache = std::env::var_os("RACKSEED_TEST_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(imagebuilder::build::default_cache_dir);
    let etc_apt = Path::new("/etc/apt");
    let (suite, _) = apt_sources::main_suite(&apt_sources::read_sources(etc_apt))
        .context("the build machine's apt sources name no release suite")?;
    let packages = imagebuilder::customize::storage::bootstrap_packages(&[], Storage::None);
    for target in targets {
        let t = Instant::now();
        let spec =
            bootstrap::BootstrapSpec::new(&suite, None, target.deb_arch(), &packages, etc_apt)?;
        let img = bootstrap::ensure_composed(&spec, target, &cache)
            .await
            .with_context(|| format!("bootstrapping the {} base", target.as_str()))?;
        println!(
            "{} {} base ready in {:.1} s: {}",
            spec.suite,
            target.as_str(),
            t.elapsed().as_secs_f64(),
            img.display()
        );
    }
    if fixtures {
        // The suites read RACKSEED_TEST_CACHE (or the default cache) like this program.
        for target in [Target::X86_64Efi, Target::Rpi4] {
            let t = Instant::now();
            let img = common::official_fixture(target).await;
            println!(
                "official-shaped {} fixture ready in {:.1} s: {}",
                target.as_str(),
                t.elapsed().as_secs_f64(),
                img.display()
            );
        }
        let t = Instant::now();
        let xz = common::official_rpi_xz().await;
        println!(
            "rpi4 fixture as .img.xz ready in {:.1} s: {}",
            t.elapsed().as_secs_f64(),
            xz.display()
        );
    }
    Ok(())
}
