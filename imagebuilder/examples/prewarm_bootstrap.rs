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
//! Usage: `cargo run -p imagebuilder --example prewarm_bootstrap -- rpi4 x86_64-efi`

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
    let targets: Vec<Target> = std::env::args()
        .skip(1)
        .map(|a| a.parse().map_err(|e: String| anyhow::anyhow!(e)))
        .collect::<Result<_>>()?;
    anyhow::ensure!(
        !targets.is_empty(),
        "usage: prewarm_bootstrap TARGET... (x86_64-efi, rpi4, rpi5)"
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
    Ok(())
}
