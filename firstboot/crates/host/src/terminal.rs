//! Talking to the person at the terminal: the confirmation asked before anything destructive
//! (`firstboot reset`, `imagebuilder flash`), and the man pages both binaries install.

use std::path::{Path, PathBuf};

use anyhow::Context as _;

/// Asks for "yes" on the terminal before something destructive (`firstboot reset`,
/// `imagebuilder flash`). Without a terminal it refuses, so scripts must pass `--yes`.
pub fn confirm(prompt: &str) -> anyhow::Result<bool> {
    use std::io::{BufRead, IsTerminal, Write};
    if !std::io::stdin().is_terminal() {
        anyhow::bail!("{prompt} Refusing without a terminal to confirm on; pass --yes");
    }
    eprint!("{prompt}\nType 'yes' to continue: ");
    std::io::stderr().flush().ok();
    let mut line = String::new();
    std::io::stdin().lock().read_line(&mut line)?;
    Ok(line.trim() == "yes")
}

/// Writes `<name>.1` for the command and `<name>-<sub>.1` for every subcommand (recursively,
/// e.g. `imagebuilder-qemu-up.1`) into `dir`; returns the pages there, sorted.
pub fn write_manpages(cmd: clap::Command, dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let name = cmd.get_name().to_string();
    clap_mangen::generate_to(cmd, dir)
        .with_context(|| format!("writing man pages into {}", dir.display()))?;
    let mut pages = Vec::new();
    for entry in std::fs::read_dir(dir).with_context(|| format!("listing {}", dir.display()))? {
        let path = entry?.path();
        let file = path.file_name().and_then(|f| f.to_str()).unwrap_or("");
        if file.starts_with(&name) && file.ends_with(".1") {
            pages.push(path);
        }
    }
    pages.sort();
    Ok(pages)
}
