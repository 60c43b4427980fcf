//! Reads the build machine's own apt sources (deb822 `*.sources` and one-line `*.list` /
//! `sources.list`) to find the mirror for a bootstrap when the config names none, so no mirror
//! host name is ever written into the repository.

use std::path::Path;

/// One `deb` source: a mirror URI and the suites it serves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AptSource {
    pub uri: String,
    pub suites: Vec<String>,
}

/// Parses deb822 paragraphs (`Types:`, `URIs:`, `Suites:`), keeping `deb` types only.
pub fn parse_deb822(text: &str) -> Vec<AptSource> {
    let mut out = Vec::new();
    for para in text.split("\n\n") {
        let (mut types, mut uris, mut suites, mut enabled) =
            (Vec::new(), Vec::new(), Vec::new(), true);
        for line in para.lines() {
            if line.starts_with('#') {
                continue;
            }
            let Some((k, v)) = line.split_once(':') else {
                continue;
            };
            let vals: Vec<String> = v.split_whitespace().map(str::to_string).collect();
            match k.trim().to_ascii_lowercase().as_str() {
                "types" => types = vals,
                "uris" => uris = vals,
                "suites" => suites = vals,
                "enabled" => enabled = v.trim() != "no",
                _ => {}
            }
        }
        if enabled && types.iter().any(|t| t == "deb") {
            for u in uris {
                out.push(AptSource {
                    uri: u,
                    suites: suites.clone(),
                });
            }
        }
    }
    out
}

/// Parses one-line style: `deb [opts] URI SUITE COMPONENT...`.
pub fn parse_one_line(text: &str) -> Vec<AptSource> {
    let mut out = Vec::new();
    for line in text.lines() {
        let mut words = line.split_whitespace().peekable();
        if words.next() != Some("deb") {
            continue;
        }
        if words.peek().is_some_and(|w| w.starts_with('[')) {
            for w in words.by_ref() {
                if w.ends_with(']') {
                    break;
                }
            }
        }
        if let (Some(uri), Some(suite)) = (words.next(), words.next()) {
            out.push(AptSource {
                uri: uri.to_string(),
                suites: vec![suite.to_string()],
            });
        }
    }
    out
}

/// All `deb` sources under `etc_apt` (normally `/etc/apt`), files in name order.
pub fn read_sources(etc_apt: &Path) -> Vec<AptSource> {
    let mut out =
        parse_one_line(&std::fs::read_to_string(etc_apt.join("sources.list")).unwrap_or_default());
    let mut files: Vec<_> = std::fs::read_dir(etc_apt.join("sources.list.d"))
        .map(|rd| rd.filter_map(|e| e.ok()).map(|e| e.path()).collect())
        .unwrap_or_default();
    files.sort();
    for f in files {
        let text = std::fs::read_to_string(&f).unwrap_or_default();
        match f.extension().and_then(|e| e.to_str()) {
            Some("sources") => out.extend(parse_deb822(&text)),
            Some("list") => out.extend(parse_one_line(&text)),
            _ => {}
        }
    }
    out
}

/// The first source serving exactly `suite`.
pub fn mirror_for(sources: &[AptSource], suite: &str) -> Option<String> {
    sources
        .iter()
        .find(|s| s.suites.iter().any(|x| x == suite))
        .map(|s| s.uri.clone())
}

/// The first plain release suite (no `-updates`/`-security` suffix) the sources serve, with
/// its mirror: what tests bootstrap when they have no better idea.
pub fn main_suite(sources: &[AptSource]) -> Option<(String, String)> {
    sources.iter().find_map(|s| {
        s.suites
            .iter()
            .find(|x| !x.contains('-') && !x.contains('/'))
            .map(|x| (x.clone(), s.uri.clone()))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deb822_and_one_line() {
        let d = "Types: deb\n# comment\nURIs: http://mirror.example/debian\nSuites: stable stable-updates\nComponents: main\n\nTypes: deb-src\nURIs: http://src.example/\nSuites: stable\n\nTypes: deb\nURIs: http://off.example/\nSuites: other\nEnabled: no\n";
        let s = parse_deb822(d);
        assert_eq!(
            s,
            vec![AptSource {
                uri: "http://mirror.example/debian".into(),
                suites: vec!["stable".into(), "stable-updates".into()]
            }]
        );
        let l = parse_one_line("# x\ndeb [arch=amd64 signed-by=/k.gpg] http://a.example/ubuntu noble main\ndeb-src http://b.example/ noble main\n");
        assert_eq!(
            l,
            vec![AptSource {
                uri: "http://a.example/ubuntu".into(),
                suites: vec!["noble".into()]
            }]
        );
        assert_eq!(
            mirror_for(&s, "stable-updates").as_deref(),
            Some("http://mirror.example/debian")
        );
        assert_eq!(mirror_for(&s, "noble"), None);
        assert_eq!(
            main_suite(&s),
            Some(("stable".into(), "http://mirror.example/debian".into()))
        );
    }
}
