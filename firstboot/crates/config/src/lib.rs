//! The cluster configuration: one TOML file, one schema, used by `imagebuilder` at build time
//! and by `firstboot` at boot.
//!
//! [`load`] / [`parse`] read a file into the typed [`ClusterConfig`] (see [`model`]) and report
//! **every** problem at once, each as `file:line:col: field.path: what was expected`. The file
//! is parsed with spans (`toml_edit`), turned into a small spanned tree (the `tree` module) and
//! walked section by section (the `loader` module, one file per section) with an error
//! accumulator, so serde's stop-at-first-error behaviour never hides the second mistake. Keys
//! are kebab-case; unknown keys are errors. Relative paths resolve against the config file's
//! directory. Files the config points at (secret, Wi-Fi PSK, offline snaps, local base image)
//! are *not* opened here: they are checked where they are used (image build, boot), so a
//! config can be validated on a machine that does not hold the secrets.
//!
//! To add a setting: add the field to [`model`], read and check it in its section's file of
//! the `loader` module (value parsers with unit tests go in [`values`]), and document it in
//! `configs/*.toml` and the README's config reference.

mod diagnostic;
mod loader;
pub mod model;
pub mod node_labels;
mod tree;
pub mod values;

use std::path::{Path, PathBuf};

pub use diagnostic::{ConfigError, Diagnostic};
pub use loader::{
    summary, DEFAULT_CHANNEL, DEFAULT_DISK_SIZE, DEFAULT_FORMATION_TIMEOUT,
    DEFAULT_HOSTNAME_PATTERN, DEFAULT_METALLB_AUTO_COUNT, DEFAULT_SECRET_FILE, MIN_DISK_SIZE,
};
pub use model::*;

/// A valid config and the warnings found while reading it.
#[derive(Debug, Clone, PartialEq)]
pub struct Loaded {
    pub config: ClusterConfig,
    pub warnings: Vec<Diagnostic>,
}

/// Reads and checks the config file at `path`.
pub fn load(path: &Path) -> Result<Loaded, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|e| ConfigError::io(path, &e))?;
    parse(&text, path)
}

/// Checks config text. `origin` names the file in diagnostics, and relative paths in the
/// config resolve against its directory.
pub fn parse(text: &str, origin: &Path) -> Result<Loaded, ConfigError> {
    let mut rep = diagnostic::Report::new(origin, text);
    let doc = match toml_edit::Document::parse(text) {
        Ok(doc) => doc,
        Err(e) => {
            let span = e.span().unwrap_or(0..0);
            rep.error(&span, "", format!("invalid TOML: {}", e.message().trim()));
            return Err(ConfigError {
                diagnostics: rep.errors,
            });
        }
    };
    let root = tree::Node::from_document(&doc);
    let config = loader::read_config(&mut rep, &root, &base_dir(origin));
    // Report in file order (the walk goes section by section). The sort is stable, so
    // findings at one place keep their walk order.
    rep.errors.sort_by_key(|d| (d.line, d.col));
    rep.warnings.sort_by_key(|d| (d.line, d.col));
    match config {
        Some(config) if rep.errors.is_empty() => Ok(Loaded {
            config,
            warnings: rep.warnings,
        }),
        _ => {
            if rep.errors.is_empty() {
                // Every `None` above comes with an error; keep that promise visible if not.
                rep.error(
                    &(0..0),
                    "",
                    "config rejected without a diagnostic (loader bug)",
                );
            }
            Err(ConfigError {
                diagnostics: rep.errors,
            })
        }
    }
}

/// The directory relative paths in the config resolve against: the config file's own
/// directory, made absolute against the current directory.
fn base_dir(origin: &Path) -> PathBuf {
    let dir = origin.parent().unwrap_or(Path::new(""));
    let dir = if dir.as_os_str().is_empty() {
        Path::new(".")
    } else {
        dir
    };
    std::path::absolute(dir).unwrap_or_else(|_| dir.to_path_buf())
}
/// Loads and checks `path`, printing warnings and `ok: <summary>` to stdout, or every error to
/// stderr. Shared by `imagebuilder validate` and `firstboot check-config`.
pub fn check_config(path: &Path) -> std::process::ExitCode {
    match load(path) {
        Ok(loaded) => {
            for w in &loaded.warnings {
                eprintln!("warning: {w}");
            }
            println!("ok: {}", summary(&loaded.config));
            std::process::ExitCode::SUCCESS
        }
        Err(err) => {
            for d in &err.diagnostics {
                eprintln!("error: {d}");
            }
            let n = err.diagnostics.len();
            eprintln!(
                "{}: {n} error{} found",
                path.display(),
                if n == 1 { "" } else { "s" }
            );
            std::process::ExitCode::FAILURE
        }
    }
}
