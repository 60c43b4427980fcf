//! `[image]`: the target board, the base image (`[image.base]`, official, local or
//! bootstrapped), disk size, hostname pattern and the login users (`[[image.users]]`).

use std::path::Path;

use super::{
    refuse_inline_secret, resolve, Spans, DEFAULT_DISK_SIZE, DEFAULT_HOSTNAME_PATTERN,
    MIN_DISK_SIZE,
};
use crate::diagnostic::Report;
use crate::model::*;
use crate::tree::{Kind, Node, TableReader};
use crate::values;

pub(super) fn read_image(
    rep: &mut Report<'_>,
    node: &Node,
    base_dir: &Path,
    cluster_name: &str,
    spans: &mut Spans,
) -> Option<Image> {
    let mut t = TableReader::open(rep, node, "image")?;
    let target = t.parsed(rep, "target", |s| s.parse::<Target>());
    if !t.has("target") {
        t.missing(rep, "target", "one of x86_64-efi, rpi4, rpi5");
    }
    let base = match t.get("base") {
        None => {
            t.missing(
                rep,
                "base",
                "a table with kind = \"official\" (url, sha256), \"local\" (path) or \"bootstrap\" (suite)",
            );
            None
        }
        Some(e) => read_base(rep, &e.value, base_dir, target),
    };
    let disk_size = match t.str(rep, "disk-size") {
        None if t.has("disk-size") => None,
        None => Some(DEFAULT_DISK_SIZE),
        Some((s, span)) => match values::parse_size(s) {
            Ok(n) if n < MIN_DISK_SIZE => {
                rep.error(
                    span,
                    "image.disk-size",
                    format!("expected at least 2GiB, got {s:?}"),
                );
                None
            }
            Ok(n) if n % (1 << 20) != 0 => {
                rep.error(
                    span,
                    "image.disk-size",
                    format!("expected a whole number of MiB, got {s:?}"),
                );
                None
            }
            Ok(n) => Some(n),
            Err(m) => {
                rep.error(span, "image.disk-size", m);
                None
            }
        },
    };
    spans.users = t.span.clone();
    let users = match t.get("users") {
        None => Some(Vec::new()),
        Some(e) => {
            spans.users = e.value.span.clone();
            read_users(rep, &e.value)
        }
    };
    let pattern = match t.parsed(rep, "hostname-pattern", |s| {
        values::check_hostname_pattern(s, cluster_name).map(|()| s.to_string())
    }) {
        Some(p) => Some(p),
        None if t.has("hostname-pattern") => None,
        None => {
            // The default pattern must also give valid hostnames (a long cluster name breaks it).
            if let Err(m) = values::check_hostname_pattern(DEFAULT_HOSTNAME_PATTERN, cluster_name) {
                rep.error(
                    &t.span,
                    "image.hostname-pattern",
                    format!("the default {m}; shorten cluster.name or set hostname-pattern"),
                );
            }
            Some(DEFAULT_HOSTNAME_PATTERN.to_string())
        }
    };
    t.finish(rep);
    Some(Image {
        target: target?,
        base: base?,
        disk_size: disk_size?,
        users: users?,
        hostname_pattern: pattern?,
    })
}

fn read_base(
    rep: &mut Report<'_>,
    node: &Node,
    base_dir: &Path,
    target: Option<Target>,
) -> Option<Base> {
    let mut t = TableReader::open(rep, node, "image.base")?;
    let kind = t.str(rep, "kind");
    let result = match kind {
        None => {
            if !t.has("kind") {
                t.missing(rep, "kind", "\"official\", \"local\" or \"bootstrap\"");
            }
            None
        }
        Some(("official", _)) => read_official(rep, &mut t),
        Some(("local", _)) => read_local(rep, &mut t, base_dir),
        Some(("bootstrap", _)) => read_bootstrap(rep, &mut t, target),
        Some((other, span)) => {
            rep.error(
                span,
                "image.base.kind",
                format!("expected \"official\", \"local\" or \"bootstrap\", got {other:?}"),
            );
            // Take the other keys so they are not also reported as unknown.
            for k in [
                "url", "sha256", "path", "suite", "mirror", "arch", "packages",
            ] {
                t.get(k);
            }
            None
        }
    };
    t.finish(rep);
    result
}

/// `kind = "official"`: a download URL and its SHA-256.
fn read_official(rep: &mut Report<'_>, t: &mut TableReader<'_>) -> Option<Base> {
    let url = t.parsed(rep, "url", |s| {
        values::check_http_url(s).map(|()| s.to_string())
    });
    if !t.has("url") {
        t.missing(rep, "url", "the image's download URL");
    }
    let sha = t.parsed(rep, "sha256", values::parse_sha256);
    if !t.has("sha256") {
        t.missing(
            rep,
            "sha256",
            "the image's SHA-256 (64 hex digits); official images are always verified",
        );
    }
    match (url, sha) {
        (Some(url), Some(sha256)) => Some(Base::Official { url, sha256 }),
        _ => None,
    }
}

/// `kind = "local"`: an image file, with an optional SHA-256.
fn read_local(rep: &mut Report<'_>, t: &mut TableReader<'_>, base_dir: &Path) -> Option<Base> {
    let path = t.parsed(rep, "path", |s| resolve(base_dir, s));
    if !t.has("path") {
        t.missing(rep, "path", "the path of an image file");
    }
    let sha = t.parsed(rep, "sha256", values::parse_sha256);
    let bad_sha = t.has("sha256") && sha.is_none();
    match path {
        Some(path) if !bad_sha => Some(Base::Local { path, sha256: sha }),
        _ => None,
    }
}

/// `kind = "bootstrap"`: a Debian-family suite built with debootstrap.
fn read_bootstrap(
    rep: &mut Report<'_>,
    t: &mut TableReader<'_>,
    target: Option<Target>,
) -> Option<Base> {
    let suite = t.parsed(rep, "suite", |s| {
        values::check_debian_name(s).map(|()| s.to_string())
    });
    if !t.has("suite") {
        t.missing(
            rep,
            "suite",
            "a distribution suite like \"noble\" or \"bookworm\"",
        );
    }
    let mirror = t.parsed(rep, "mirror", |s| {
        if s.starts_with("file:///") {
            Ok(s.to_string())
        } else {
            values::check_http_url(s).map(|()| s.to_string())
        }
    });
    let bad_mirror = t.has("mirror") && mirror.is_none();
    let want = target.map(Target::deb_arch);
    let arch = match t.str(rep, "arch") {
        None if t.has("arch") => None,
        None => Some(want.unwrap_or("amd64").to_string()),
        Some((s, span)) => match (want, target) {
            (Some(w), Some(tg)) if w != s => {
                rep.error(
                    span,
                    "image.base.arch",
                    format!(
                        "expected {w:?} for target {} (or leave it out), got {s:?}",
                        tg.as_str()
                    ),
                );
                None
            }
            _ => Some(s.to_string()),
        },
    };
    let packages = t.list(rep, "packages", |s| {
        values::check_debian_name(s).map(|()| s.to_string())
    });
    let n_pk = t.get("packages").map(|e| match &e.value.kind {
        Kind::Array(a) => a.len(),
        _ => usize::MAX,
    });
    let packages: Option<Vec<String>> = match (packages, n_pk) {
        (None, None) => Some(Vec::new()),
        (Some(p), Some(n)) if p.len() == n => Some(p.into_iter().map(|(s, _)| s).collect()),
        _ => None,
    };
    match (suite, arch, packages) {
        (Some(suite), Some(arch), Some(packages)) if !bad_mirror => Some(Base::Bootstrap {
            suite,
            mirror,
            arch,
            packages,
        }),
        _ => None,
    }
}

fn read_users(rep: &mut Report<'_>, node: &Node) -> Option<Vec<User>> {
    let Kind::Array(items) = &node.kind else {
        rep.error(
            &node.span,
            "image.users",
            format!(
                "expected an array of tables ([[image.users]]), found {}",
                node.type_name()
            ),
        );
        return None;
    };
    let mut out: Vec<User> = Vec::new();
    // Every name that parsed, with its position, for the duplicate check.
    let mut seen: Vec<(String, usize)> = Vec::new();
    let mut ok = true;
    for (i, item) in items.iter().enumerate() {
        let path = format!("image.users[{i}]");
        let Some(mut t) = TableReader::open(rep, item, &path) else {
            ok = false;
            continue;
        };
        let name = t.parsed(rep, "name", |s| {
            values::check_username(s).map(|()| s.to_string())
        });
        if !t.has("name") {
            t.missing(rep, "name", "a login name like \"ubuntu\"");
        }
        if let Some(n) = &name {
            if let Some((_, prev)) = seen.iter().find(|(s, _)| s == n) {
                let span = t.get("name").map_or(&item.span, |e| &e.value.span);
                rep.error(
                    span,
                    &format!("{path}.name"),
                    format!("duplicate user {n:?}: image.users[{prev}] has it too"),
                );
                ok = false;
            }
            seen.push((n.clone(), i));
        }
        let keys = t.list(rep, "ssh-keys", |s| {
            values::check_ssh_key(s).map(|()| s.trim().to_string())
        });
        let n_keys = t.get("ssh-keys").map(|e| match &e.value.kind {
            Kind::Array(a) => a.len(),
            _ => usize::MAX,
        });
        let keys = match (keys, n_keys) {
            (Some(k), Some(n)) if k.len() == n && n > 0 => {
                Some(k.into_iter().map(|(s, _)| s).collect())
            }
            (Some(k), Some(0)) if k.is_empty() => {
                rep.error(
                    &item.span,
                    &format!("{path}.ssh-keys"),
                    "expected at least one SSH public key (images have no password login)",
                );
                None
            }
            (None, None) => {
                t.missing(
                    rep,
                    "ssh-keys",
                    "a list of SSH public keys (images have no password login)",
                );
                None
            }
            _ => None,
        };
        let sudo = t.bool(rep, "sudo");
        let bad_sudo = t.has("sudo") && sudo.is_none();
        refuse_inline_secret(
            rep,
            &mut t,
            &["password", "passwd"],
            "images have no password login; use `ssh-keys`",
        );
        t.finish(rep);
        match (name, keys) {
            (Some(name), Some(ssh_keys)) if !bad_sudo => out.push(User {
                name,
                ssh_keys,
                sudo: sudo.unwrap_or(true),
            }),
            _ => ok = false,
        }
    }
    ok.then_some(out)
}
