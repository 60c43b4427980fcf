//! Runs the external programs the image builder needs (mke2fs, debugfs, sgdisk, sfdisk,
//! qemu-img, debootstrap, tar, e2fsck) through the workspace's one command runner,
//! `rackseed_host::command::Cmd`, so each call has a timeout, is killed when the build is
//! dropped (Ctrl-C) and reports the program's stderr tail on failure.
//!
//! To add a program: call [`Tool::run`] with its argv and a timeout sized for the slowest legitimate
//! run; parse its output in the module that owns the format, not here.

use std::ffi::OsString;
use std::time::Duration;

use anyhow::Result;
use rackseed_host::command::Cmd;

/// One external program invocation.
#[derive(Debug, Clone)]
pub struct Tool {
    program: String,
    args: Vec<OsString>,
    envs: Vec<(String, String)>,
    timeout: Duration,
}

impl Tool {
    pub fn new(program: &str) -> Self {
        Tool {
            program: program.to_string(),
            args: Vec::new(),
            envs: Vec::new(),
            timeout: Duration::from_secs(120),
        }
    }

    pub fn arg(mut self, a: impl Into<OsString>) -> Self {
        self.args.push(a.into());
        self
    }

    pub fn args<I, A>(mut self, args: I) -> Self
    where
        I: IntoIterator<Item = A>,
        A: Into<OsString>,
    {
        self.args.extend(args.into_iter().map(Into::into));
        self
    }

    pub fn env(mut self, k: &str, v: &str) -> Self {
        self.envs.push((k.to_string(), v.to_string()));
        self
    }

    pub fn timeout(mut self, t: Duration) -> Self {
        self.timeout = t;
        self
    }

    /// Runs the program to completion; returns its stdout. A non-zero exit, a timeout or a
    /// missing program is an error naming the program.
    pub async fn run(self) -> Result<String> {
        Ok(self.cmd().run().await?.stdout)
    }

    /// Runs the program and returns its output whatever the exit status (the caller decides).
    pub async fn output(self) -> Result<rackseed_host::command::Output> {
        Ok(self.cmd().output().await?)
    }

    fn cmd(self) -> Cmd {
        let mut c = Cmd::new(&self.program, self.timeout).args(self.args);
        for (k, v) in self.envs {
            c = c.env(k, v);
        }
        c
    }
}

/// Whether `program` is on `PATH` (used to fail loudly up front, naming the Debian package).
pub fn on_path(program: &str) -> bool {
    std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(program).is_file()))
        .unwrap_or(false)
}

/// Fails with the Debian package to install when one of `programs` is missing.
pub fn require(programs: &[(&str, &str)]) -> Result<()> {
    let missing: Vec<String> = programs
        .iter()
        .filter(|(p, _)| !on_path(p))
        .map(|(p, pkg)| format!("{p} (Debian package {pkg})"))
        .collect();
    if missing.is_empty() {
        Ok(())
    } else {
        anyhow::bail!(
            "missing build tools: {}; install them with apt-get install",
            missing.join(", ")
        )
    }
}
