//! A minimal QMP (QEMU Machine Protocol) client over a node's unix socket: connect, negotiate
//! capabilities, run one command and return its `return` value. Asynchronous events that arrive
//! in between are skipped. Every step has a timeout, so a wedged QEMU cannot hang the caller.
//!
//! To use another command, call [`Qmp::execute`] with its name and arguments; see QEMU's
//! `qapi` reference for the shapes.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::UnixStream;

#[derive(Debug, thiserror::Error)]
pub enum QmpError {
    #[error("connecting to qmp socket {path}")]
    Connect {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("talking to qmp socket {path}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("qmp socket {path}: no answer within {timeout:?}")]
    Timeout { path: PathBuf, timeout: Duration },
    #[error("qmp socket {path} closed the connection")]
    Closed { path: PathBuf },
    #[error("qmp socket {path}: unreadable message {line:?}")]
    Protocol { path: PathBuf, line: String },
    #[error("qmp command `{command}` on {path} failed: {desc}")]
    Command {
        path: PathBuf,
        command: String,
        desc: String,
    },
}

/// One negotiated QMP connection.
pub struct Qmp {
    path: PathBuf,
    reader: BufReader<OwnedReadHalf>,
    writer: OwnedWriteHalf,
    timeout: Duration,
}

impl Qmp {
    /// Connects, reads the greeting and leaves capabilities negotiation mode.
    pub async fn connect(path: &Path, timeout: Duration) -> Result<Qmp, QmpError> {
        let stream = tokio::time::timeout(timeout, UnixStream::connect(path))
            .await
            .map_err(|_| QmpError::Timeout {
                path: path.into(),
                timeout,
            })?
            .map_err(|source| QmpError::Connect {
                path: path.into(),
                source,
            })?;
        let (r, w) = stream.into_split();
        let mut qmp = Qmp {
            path: path.into(),
            reader: BufReader::new(r),
            writer: w,
            timeout,
        };
        let greeting = qmp.read_message().await?;
        if greeting.get("QMP").is_none() {
            return Err(QmpError::Protocol {
                path: qmp.path.clone(),
                line: greeting.to_string(),
            });
        }
        qmp.execute("qmp_capabilities", None).await?;
        Ok(qmp)
    }

    /// Runs `command` and returns its `return` value.
    pub async fn execute(&mut self, command: &str, args: Option<Value>) -> Result<Value, QmpError> {
        let mut msg = json!({ "execute": command });
        if let Some(args) = args {
            msg["arguments"] = args;
        }
        let mut line = msg.to_string();
        line.push('\n');
        let io = |source| QmpError::Io {
            path: self.path.clone(),
            source,
        };
        self.writer.write_all(line.as_bytes()).await.map_err(io)?;
        loop {
            let m = self.read_message().await?;
            if m.get("event").is_some() {
                continue;
            }
            if let Some(ret) = m.get("return") {
                return Ok(ret.clone());
            }
            if let Some(err) = m.get("error") {
                return Err(QmpError::Command {
                    path: self.path.clone(),
                    command: command.into(),
                    desc: err
                        .get("desc")
                        .and_then(Value::as_str)
                        .unwrap_or("unknown error")
                        .into(),
                });
            }
            return Err(QmpError::Protocol {
                path: self.path.clone(),
                line: m.to_string(),
            });
        }
    }

    async fn read_message(&mut self) -> Result<Value, QmpError> {
        let mut line = String::new();
        let n = tokio::time::timeout(self.timeout, self.reader.read_line(&mut line))
            .await
            .map_err(|_| QmpError::Timeout {
                path: self.path.clone(),
                timeout: self.timeout,
            })?
            .map_err(|source| QmpError::Io {
                path: self.path.clone(),
                source,
            })?;
        if n == 0 {
            return Err(QmpError::Closed {
                path: self.path.clone(),
            });
        }
        serde_json::from_str(&line).map_err(|_| QmpError::Protocol {
            path: self.path.clone(),
            line: line.trim_end().into(),
        })
    }
}

/// Connects and runs one command.
pub async fn qmp_execute(
    path: &Path,
    command: &str,
    args: Option<Value>,
    timeout: Duration,
) -> Result<Value, QmpError> {
    Qmp::connect(path, timeout)
        .await?
        .execute(command, args)
        .await
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::UnixListener;

    /// A QMP server speaking the protocol as QEMU does, with an event before the reply.
    async fn fake_server(listener: UnixListener, reply: &'static str) {
        let (s, _) = listener.accept().await.unwrap();
        let (r, mut w) = s.into_split();
        let mut r = BufReader::new(r);
        w.write_all(b"{\"QMP\": {\"version\": {}, \"capabilities\": []}}\r\n")
            .await
            .unwrap();
        let mut line = String::new();
        r.read_line(&mut line).await.unwrap();
        assert!(line.contains("qmp_capabilities"), "{line}");
        w.write_all(b"{\"return\": {}}\r\n").await.unwrap();
        line.clear();
        r.read_line(&mut line).await.unwrap();
        w.write_all(b"{\"timestamp\": {}, \"event\": \"POWERDOWN\"}\r\n")
            .await
            .unwrap();
        w.write_all(reply.as_bytes()).await.unwrap();
    }

    #[tokio::test]
    async fn skips_events_and_returns_the_reply() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("qmp");
        let srv = tokio::spawn(fake_server(
            UnixListener::bind(&path).unwrap(),
            "{\"return\": {\"status\": \"running\"}}\r\n",
        ));
        let v = qmp_execute(&path, "query-status", None, Duration::from_secs(5))
            .await
            .unwrap();
        assert_eq!(v["status"], "running");
        srv.await.unwrap();
    }

    #[tokio::test]
    async fn command_errors_name_command_and_description() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("qmp");
        let srv = tokio::spawn(fake_server(
            UnixListener::bind(&path).unwrap(),
            "{\"error\": {\"class\": \"GenericError\", \"desc\": \"nope\"}}\r\n",
        ));
        let e = qmp_execute(&path, "system_powerdown", None, Duration::from_secs(5))
            .await
            .unwrap_err();
        assert!(matches!(e, QmpError::Command { .. }), "{e}");
        assert!(e.to_string().contains("system_powerdown"), "{e}");
        assert!(e.to_string().contains("nope"), "{e}");
        srv.await.unwrap();
    }

    #[tokio::test]
    async fn silent_server_times_out() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("qmp");
        let listener = UnixListener::bind(&path).unwrap();
        let hold = tokio::spawn(async move {
            let (s, _) = listener.accept().await.unwrap();
            tokio::time::sleep(Duration::from_secs(5)).await;
            drop(s);
        });
        let e = qmp_execute(&path, "quit", None, Duration::from_millis(200))
            .await
            .unwrap_err();
        assert!(matches!(e, QmpError::Timeout { .. }), "{e}");
        hold.abort();
    }
}
