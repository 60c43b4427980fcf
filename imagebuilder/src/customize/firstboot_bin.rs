//! The `firstboot` binary to bake in: its architecture read from the ELF header (a binary for
//! the wrong architecture is refused before anything is written) and its version from
//! `firstboot --version` when it runs on this machine.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use serde::Serialize;

use crate::tool::Tool;

/// Machine of a 64-bit little-endian ELF executable.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ElfArch {
    X86_64,
    Aarch64,
}

impl ElfArch {
    pub fn as_str(self) -> &'static str {
        match self {
            ElfArch::X86_64 => "x86_64",
            ElfArch::Aarch64 => "aarch64",
        }
    }
}

/// Reads the ELF header's class, data encoding and `e_machine`.
pub fn elf_arch(header: &[u8]) -> Result<ElfArch> {
    if header.len() < 20 || &header[..4] != b"\x7fELF" {
        bail!("not an ELF executable");
    }
    if header[4] != 2 || header[5] != 1 {
        bail!("not a 64-bit little-endian ELF executable");
    }
    match u16::from_le_bytes([header[18], header[19]]) {
        0x3E => Ok(ElfArch::X86_64),
        0xB7 => Ok(ElfArch::Aarch64),
        m => bail!("unsupported ELF machine {m:#x} (expected x86_64 or aarch64)"),
    }
}

/// The binary and what is known about it.
#[derive(Debug, Clone, Serialize)]
pub struct FirstbootBin {
    pub path: PathBuf,
    pub arch: ElfArch,
    pub sha256: String,
    /// From `firstboot --version` when the binary runs here; `None` otherwise.
    pub version: Option<String>,
}

/// The architecture a target needs.
pub fn arch_for(triple: &str) -> ElfArch {
    if triple.starts_with("aarch64") {
        ElfArch::Aarch64
    } else {
        ElfArch::X86_64
    }
}

/// Where to look when no `--firstboot-bin` is given: next to the running imagebuilder.
pub fn default_path() -> Option<PathBuf> {
    let exe = std::env::current_exe().ok()?;
    let p = exe.parent()?.join("firstboot");
    p.is_file().then_some(p)
}

/// Inspects `path` and checks it is built for `want`.
pub async fn inspect(path: &Path, want: ElfArch) -> Result<FirstbootBin> {
    let mut head = [0u8; 64];
    let mut f = std::fs::File::open(path)
        .with_context(|| format!("opening firstboot binary {}", path.display()))?;
    let n = f.read(&mut head)?;
    let arch = elf_arch(&head[..n])
        .with_context(|| format!("checking firstboot binary {}", path.display()))?;
    if arch != want {
        bail!(
            "firstboot binary {} is built for {}, but the target needs {}; pass --firstboot-bin with a {} build",
            path.display(),
            arch.as_str(),
            want.as_str(),
            want.as_str()
        );
    }
    let sha256 = crate::outputs::sparse::sha256_file(path)?;
    let runs_here = arch == arch_for(std::env::consts::ARCH);
    let version = if runs_here {
        match Tool::new(&path.to_string_lossy())
            .arg("--version")
            .timeout(Duration::from_secs(10))
            .run()
            .await
        {
            Ok(out) => parse_version(&out),
            Err(_) => None,
        }
    } else {
        None
    };
    Ok(FirstbootBin {
        path: path.to_path_buf(),
        arch,
        sha256,
        version,
    })
}

/// `firstboot 0.1.0` -> `0.1.0`.
pub fn parse_version(out: &str) -> Option<String> {
    let line = out.lines().next()?.trim();
    let v = line.split_whitespace().last()?;
    v.chars().next()?.is_ascii_digit().then(|| v.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_machine_from_header() {
        let mut h = vec![0u8; 64];
        h[..4].copy_from_slice(b"\x7fELF");
        h[4] = 2;
        h[5] = 1;
        h[18] = 0xB7;
        assert_eq!(elf_arch(&h).unwrap(), ElfArch::Aarch64);
        h[18] = 0x3E;
        assert_eq!(elf_arch(&h).unwrap(), ElfArch::X86_64);
        h[4] = 1;
        assert!(elf_arch(&h).is_err());
        assert!(elf_arch(b"#!/bin/sh\n").is_err());
    }

    #[test]
    fn version_parsing() {
        assert_eq!(parse_version("firstboot 0.1.0\n").as_deref(), Some("0.1.0"));
        assert_eq!(parse_version(""), None);
        assert_eq!(parse_version("usage: firstboot"), None);
    }
}
