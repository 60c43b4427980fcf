//! The one command runner: every external program rackseed starts goes through [`Cmd`].
//!
//! It logs the argv at debug level (arguments marked secret are shown as `<redacted>`), sets
//! stdin to null unless bytes are given, requires a timeout, kills the child on timeout or when
//! the future is dropped, and returns a [`CmdError`] that names the command, its exit status and
//! the tail of its stderr. clippy's `disallowed-methods` (see `clippy.toml`) refuses direct use
//! of `std::process::Command::new` / `tokio::process::Command::new` everywhere else.
//!
//! Synchronous callers (the image builder) use [`Cmd::run_blocking`]; long-running children
//! (test daemons) use [`Cmd::spawn`].

use std::ffi::{OsStr, OsString};
use std::path::PathBuf;
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use tokio::io::AsyncWriteExt;

/// How much of stderr an error keeps.
const STDERR_TAIL_BYTES: usize = 2048;

/// A command to run. Build it, then call [`Cmd::run`] (non-zero exit is an error) or
/// [`Cmd::output`] (the caller interprets the exit status).
#[derive(Clone)]
pub struct Cmd {
    program: OsString,
    args: Vec<(OsString, bool)>,
    timeout: Duration,
    envs: Vec<(OsString, OsString)>,
    cwd: Option<PathBuf>,
    stdin: Option<Vec<u8>>,
}

/// What a finished command produced.
#[derive(Debug, Clone)]
pub struct Output {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

impl Output {
    /// The exit code, or `None` when killed by a signal.
    pub fn code(&self) -> Option<i32> {
        self.status.code()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CmdError {
    #[error("starting `{cmd}`")]
    Spawn { cmd: String, source: std::io::Error },
    #[error("`{cmd}` did not finish within {timeout:?} and was killed")]
    Timeout { cmd: String, timeout: Duration },
    #[error("`{cmd}` failed ({status}){}", tail_suffix(stderr_tail))]
    Failed {
        cmd: String,
        status: ExitStatus,
        stderr_tail: String,
    },
    #[error("talking to `{cmd}`")]
    Io { cmd: String, source: std::io::Error },
}

fn tail_suffix(tail: &str) -> String {
    if tail.trim().is_empty() {
        String::new()
    } else {
        format!(": {}", tail.trim())
    }
}

impl CmdError {
    /// The exit code for `Failed`, if the program exited normally.
    pub fn exit_code(&self) -> Option<i32> {
        match self {
            CmdError::Failed { status, .. } => status.code(),
            _ => None,
        }
    }
}

impl Cmd {
    /// A command with a mandatory timeout; stdin is null unless [`Cmd::stdin_bytes`] is used.
    pub fn new(program: impl AsRef<OsStr>, timeout: Duration) -> Self {
        Cmd {
            program: program.as_ref().to_owned(),
            args: Vec::new(),
            timeout,
            envs: Vec::new(),
            cwd: None,
            stdin: None,
        }
    }

    pub fn arg(mut self, a: impl AsRef<OsStr>) -> Self {
        self.args.push((a.as_ref().to_owned(), false));
        self
    }

    pub fn args<I, S>(mut self, args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        self.args
            .extend(args.into_iter().map(|a| (a.as_ref().to_owned(), false)));
        self
    }

    /// An argument that must never be logged or appear in errors (tokens, join URLs).
    pub fn secret_arg(mut self, a: impl AsRef<OsStr>) -> Self {
        self.args.push((a.as_ref().to_owned(), true));
        self
    }

    pub fn env(mut self, k: impl AsRef<OsStr>, v: impl AsRef<OsStr>) -> Self {
        self.envs
            .push((k.as_ref().to_owned(), v.as_ref().to_owned()));
        self
    }

    pub fn current_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.cwd = Some(dir.into());
        self
    }

    /// Feed these bytes on stdin instead of null.
    pub fn stdin_bytes(mut self, bytes: impl Into<Vec<u8>>) -> Self {
        self.stdin = Some(bytes.into());
        self
    }

    /// The command line for logs and errors, with secret arguments redacted.
    pub fn display(&self) -> String {
        let mut s = self.program.to_string_lossy().into_owned();
        for (a, secret) in &self.args {
            s.push(' ');
            if *secret {
                s.push_str("<redacted>");
            } else {
                s.push_str(&a.to_string_lossy());
            }
        }
        s
    }

    #[allow(clippy::disallowed_methods)] // this is the one place allowed to build a Command
    fn tokio_command(&self) -> tokio::process::Command {
        let mut c = tokio::process::Command::new(&self.program);
        c.args(self.args.iter().map(|(a, _)| a));
        for (k, v) in &self.envs {
            c.env(k, v);
        }
        if let Some(d) = &self.cwd {
            c.current_dir(d);
        }
        c.stdin(if self.stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        });
        c.kill_on_drop(true);
        c
    }

    /// Runs to completion; a non-zero exit is [`CmdError::Failed`].
    pub async fn run(self) -> Result<Output, CmdError> {
        let cmd = self.display();
        let out = self.output().await?;
        if out.status.success() {
            Ok(out)
        } else {
            Err(CmdError::Failed {
                cmd,
                status: out.status,
                stderr_tail: stderr_tail(&out.stderr),
            })
        }
    }

    /// Runs to completion and returns whatever exit status it had. Errors only when it could not
    /// be started, timed out (then it is killed), or its pipes failed.
    pub async fn output(self) -> Result<Output, CmdError> {
        let cmd = self.display();
        tracing::debug!(command = %cmd, timeout = ?self.timeout, "running");
        let mut c = self.tokio_command();
        c.stdout(Stdio::piped()).stderr(Stdio::piped());
        let mut child = c.spawn().map_err(|source| CmdError::Spawn {
            cmd: cmd.clone(),
            source,
        })?;
        if let Some(bytes) = self.stdin {
            let mut stdin = child.stdin.take().expect("stdin was piped");
            // A child may exit without reading stdin; that is its business, not an error here.
            let _ = stdin.write_all(&bytes).await;
            drop(stdin);
        }
        match tokio::time::timeout(self.timeout, child.wait_with_output()).await {
            Err(_) => Err(CmdError::Timeout {
                cmd,
                timeout: self.timeout,
            }),
            Ok(Err(source)) => Err(CmdError::Io { cmd, source }),
            Ok(Ok(o)) => {
                let out = Output {
                    status: o.status,
                    stdout: String::from_utf8_lossy(&o.stdout).into_owned(),
                    stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
                };
                tracing::debug!(command = %cmd, status = %out.status, "finished");
                Ok(out)
            }
        }
    }

    /// [`Cmd::run`] for synchronous code. Must not be called from inside a tokio runtime.
    pub fn run_blocking(self) -> Result<Output, CmdError> {
        blocking_runtime(&self.display())?.block_on(self.run())
    }

    /// [`Cmd::output`] for synchronous code. Must not be called from inside a tokio runtime.
    pub fn output_blocking(self) -> Result<Output, CmdError> {
        blocking_runtime(&self.display())?.block_on(self.output())
    }

    /// Starts a long-running child (daemons in tests, QEMU). It is killed when the returned
    /// handle is dropped; the timeout does not apply. stdout/stderr are inherited unless
    /// redirected with [`Cmd::spawn_with`].
    pub fn spawn(self) -> Result<tokio::process::Child, CmdError> {
        self.spawn_with(Stdio::inherit(), Stdio::inherit())
    }

    /// [`Cmd::spawn`] with explicit stdout/stderr (e.g. a log file).
    pub fn spawn_with(
        self,
        stdout: impl Into<Stdio>,
        stderr: impl Into<Stdio>,
    ) -> Result<tokio::process::Child, CmdError> {
        let cmd = self.display();
        tracing::debug!(command = %cmd, "spawning");
        let mut c = self.tokio_command();
        c.stdin(Stdio::null()).stdout(stdout).stderr(stderr);
        c.spawn().map_err(|source| CmdError::Spawn { cmd, source })
    }
}

fn blocking_runtime(cmd: &str) -> Result<tokio::runtime::Runtime, CmdError> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|source| CmdError::Io {
            cmd: cmd.to_owned(),
            source,
        })
}

/// The last [`STDERR_TAIL_BYTES`] of stderr, cut at a character boundary.
fn stderr_tail(stderr: &str) -> String {
    if stderr.len() <= STDERR_TAIL_BYTES {
        return stderr.to_owned();
    }
    let mut start = stderr.len() - STDERR_TAIL_BYTES;
    while !stderr.is_char_boundary(start) {
        start += 1;
    }
    format!("...{}", &stderr[start..])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn success_captures_stdout() {
        let out = Cmd::new("sh", Duration::from_secs(10))
            .args(["-c", "echo hello; echo oops >&2"])
            .run()
            .await
            .unwrap();
        assert_eq!(out.stdout, "hello\n");
        assert_eq!(out.stderr, "oops\n");
    }

    #[tokio::test]
    async fn failure_names_command_status_and_stderr_tail() {
        let err = Cmd::new("sh", Duration::from_secs(10))
            .args(["-c", "echo first >&2; echo last words >&2; exit 3"])
            .run()
            .await
            .unwrap_err();
        assert_eq!(err.exit_code(), Some(3));
        let msg = err.to_string();
        assert!(msg.contains("`sh -c"), "{msg}");
        assert!(msg.contains("last words"), "{msg}");
        assert!(msg.contains("exit status: 3"), "{msg}");
    }

    #[tokio::test]
    async fn long_stderr_keeps_only_the_tail() {
        let err = Cmd::new("sh", Duration::from_secs(10))
            .args([
                "-c",
                "head -c 100000 /dev/zero | tr '\\0' a >&2; echo END >&2; exit 1",
            ])
            .run()
            .await
            .unwrap_err();
        let msg = err.to_string();
        assert!(msg.len() < STDERR_TAIL_BYTES + 200, "{}", msg.len());
        assert!(msg.contains("END"));
    }

    #[tokio::test]
    async fn timeout_kills_the_child() {
        let dir = tempfile::tempdir().unwrap();
        let marker = dir.path().join("survived");
        let script = format!("sleep 2; touch {}", marker.display());
        let err = Cmd::new("sh", Duration::from_millis(200))
            .args(["-c", &script])
            .run()
            .await
            .unwrap_err();
        assert!(matches!(err, CmdError::Timeout { .. }), "{err}");
        tokio::time::sleep(Duration::from_millis(2500)).await;
        assert!(!marker.exists(), "the timed-out child kept running");
    }

    #[tokio::test]
    async fn stdin_is_null_by_default_and_bytes_when_given() {
        let out = Cmd::new("cat", Duration::from_secs(5)).run().await.unwrap();
        assert_eq!(out.stdout, "");
        let out = Cmd::new("cat", Duration::from_secs(5))
            .stdin_bytes("fed")
            .run()
            .await
            .unwrap();
        assert_eq!(out.stdout, "fed");
    }

    #[tokio::test]
    async fn secret_args_are_redacted_in_errors() {
        let err = Cmd::new("sh", Duration::from_secs(5))
            .args(["-c", "exit 1", "x"])
            .secret_arg("TOPSECRETTOKEN")
            .run()
            .await
            .unwrap_err();
        let msg = err.to_string();
        assert!(!msg.contains("TOPSECRETTOKEN"), "{msg}");
        assert!(msg.contains("<redacted>"), "{msg}");
    }

    #[test]
    fn missing_program_is_a_spawn_error_naming_it() {
        let err = Cmd::new("/nonexistent/rackseed-no-such-tool", Duration::from_secs(5))
            .run_blocking()
            .unwrap_err();
        assert!(matches!(err, CmdError::Spawn { .. }));
        assert!(err.to_string().contains("rackseed-no-such-tool"));
    }
}
