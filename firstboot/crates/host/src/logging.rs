//! The one tracing setup for both binaries: human-readable logs on stderr.
//!
//! The level comes from the number of `-v` flags (none: warn and info from rackseed crates;
//! `-v`: debug; `-vv`: trace). `RUST_LOG`, when set, overrides it with a full
//! `tracing_subscriber::EnvFilter` directive. Stdout stays free for command output. Under
//! systemd, stderr lands in the journal. To add an output (e.g. journald), add a layer here.

use tracing_subscriber::EnvFilter;

/// The filter directive for `verbosity` `-v` flags.
pub fn directive(verbosity: u8) -> &'static str {
    match verbosity {
        0 => "warn,firstboot=info,imagebuilder=info,qemu=info",
        1 => "info,firstboot=debug,imagebuilder=debug,qemu=debug",
        _ => "trace",
    }
}

/// Installs the global subscriber. Calling it again (e.g. from tests) is harmless.
pub fn init(verbosity: u8) {
    let filter = match std::env::var("RUST_LOG") {
        Ok(v) if !v.trim().is_empty() => {
            EnvFilter::try_new(v).unwrap_or_else(|_| EnvFilter::new(directive(verbosity)))
        }
        _ => EnvFilter::new(directive(verbosity)),
    };
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(verbosity > 0)
        .try_init();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn more_v_means_more_logs() {
        assert!(directive(0).starts_with("warn"));
        assert!(directive(1).contains("firstboot=debug"));
        assert_eq!(directive(2), "trace");
        assert_eq!(directive(9), "trace");
        for v in 0..3 {
            assert!(EnvFilter::try_new(directive(v)).is_ok());
        }
    }
}
