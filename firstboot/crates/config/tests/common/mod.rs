//! What the config tests share: a minimal valid config around the lines under test, the
//! loader under one file name, and the checks that a diagnostic stands at its position.
//!
//! Each test file is a crate of its own and uses part of this, hence `dead_code` allowed.
#![allow(dead_code)]

use std::path::Path;

use rackseed_config::{self as config, ConfigError, Diagnostic};

/// The file every test config is loaded as (it shows in `file:line:col`).
pub const FILE: &str = "/cfg/lab.toml";

/// A valid config: `[cluster]` named "lab" with `extra` from line 3, then an empty line and
/// `[image]`. More sections can follow the returned text.
pub fn cluster(extra: &str) -> String {
    format!(
        "[cluster]\nname = \"lab\"\n{extra}\n[image]\ntarget = \"x86_64-efi\"\nbase = {{ kind = \"bootstrap\", suite = \"bookworm\" }}\n"
    )
}

/// Loads `text` as [`FILE`].
pub fn load(text: &str) -> Result<config::Loaded, ConfigError> {
    config::parse(text, Path::new(FILE))
}

/// Loads `text` as [`FILE`], keeping only the diagnostics of a refusal.
pub fn parse(text: &str) -> Result<config::Loaded, Vec<Diagnostic>> {
    load(text).map_err(|e| e.diagnostics)
}

/// Asserts that `diags` hold one for `field` at `line` whose message contains `needle`: at
/// column `col` when given, else at any column of that line (a position, not 0).
#[track_caller]
pub fn assert_diag(
    diags: &[Diagnostic],
    line: usize,
    col: Option<usize>,
    field: &str,
    needle: &str,
) {
    let at = col.map_or(line.to_string(), |c| format!("{line}:{c}"));
    assert!(
        diags.iter().any(|d| d.line == line
            && col.map_or(d.col > 0, |c| d.col == c)
            && d.field == field
            && d.message.contains(needle)),
        "no {field} error at {at} containing {needle:?}; got:\n{}",
        ConfigError {
            diagnostics: diags.to_vec()
        }
    );
}

/// Asserts that `text` is refused with a diagnostic for `field` at `line:col`, shown as
/// `/cfg/lab.toml:line:col` with `needle` in the error's text.
#[track_caller]
pub fn assert_refused_at(text: &str, field: &str, line: usize, col: usize, needle: &str) {
    let shown = text.lines().nth(line.saturating_sub(1)).unwrap_or_default();
    let e = match load(text) {
        Ok(_) => panic!("{shown:?} was accepted"),
        Err(e) => e,
    };
    let d = e
        .diagnostics
        .iter()
        .find(|d| d.field == field)
        .unwrap_or_else(|| panic!("{shown:?}: no {field} diagnostic: {e}"));
    assert_eq!((d.line, d.col), (line, col), "{shown:?}: {e}");
    let rendered = e.to_string();
    assert!(rendered.contains(needle), "{shown:?}: no {needle:?} in {e}");
    assert!(
        rendered.contains(&format!("{FILE}:{line}:{col}")),
        "{shown:?}: {e}"
    );
}
