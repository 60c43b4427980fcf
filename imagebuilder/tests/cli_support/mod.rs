//! What the tests that run the built `imagebuilder` as a user would share: the binary and one
//! bounded way to run it, its exit status and output captured.
//!
//! Each test file is a crate of its own and uses part of this, hence `dead_code` allowed.
#![allow(dead_code)]

use std::path::Path;
use std::time::Duration;

use rackseed_host::command::{Cmd, Output};

/// The `imagebuilder` binary cargo built for these tests.
pub const BIN: &str = env!("CARGO_BIN_EXE_imagebuilder");

/// How long one run may take before it is killed (the test then fails).
pub const RUN_BOUND: Duration = Duration::from_secs(60);

/// Runs `imagebuilder args` from the test's working folder.
pub fn imagebuilder(args: &[&str]) -> Output {
    Cmd::new(BIN, RUN_BOUND)
        .args(args)
        .output_blocking()
        .expect("running imagebuilder")
}

/// Runs `imagebuilder args` from `dir` (relative paths in `args` are read from there).
pub fn imagebuilder_in(dir: &Path, args: &[&str]) -> Output {
    Cmd::new(BIN, RUN_BOUND)
        .args(args)
        .current_dir(dir)
        .output_blocking()
        .expect("running imagebuilder")
}
