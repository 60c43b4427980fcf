//! Kubernetes node label syntax, for `[[nodes]] labels = { key = "value" }`.
//!
//! The rules are Kubernetes' own (kubernetes/apimachinery `pkg/util/validation/validation.go`:
//! `IsQualifiedName` for keys, `IsValidLabelValue` for values, `IsDNS1123Subdomain` for a key's
//! prefix), so a label the config accepts is one `kubectl label` accepts:
//! - key: `[prefix/]name`; name 1 to 63 characters of `[A-Za-z0-9]([-_.A-Za-z0-9]*[A-Za-z0-9])?`;
//!   prefix a DNS subdomain (lowercase RFC 1123 labels joined by `.`, at most 253 characters);
//! - value: empty, or up to 63 characters of the same form as a name.
//!
//! Reserved prefixes (rackseed's rule, stricter than the API server, which lets an admin set
//! anything): `kubernetes.io` and `k8s.io`, and their subdomains, "are reserved for Kubernetes
//! core components" (Kubernetes documentation, "Well-Known Labels, Annotations and Taints";
//! the original labels design, `docs/labels.md`, already reserved `kubernetes.io/`). MicroK8s
//! and the kubelet set several of them on every node (`kubernetes.io/hostname`,
//! `node.kubernetes.io/microk8s-controlplane`, `…-worker`, reference A5), and overwriting those
//! breaks what reads them. Three documented exceptions are meant to be set on nodes by whoever
//! runs the cluster and are allowed: `node-role.kubernetes.io/<role>` (the `ROLES` column of
//! `kubectl get nodes`; the kubelet may not set it itself, so an admin does, as kubeadm does),
//! and `topology.kubernetes.io/zone` / `topology.kubernetes.io/region` (failure domains).
//!
//! To allow another reserved label, add it to [`ALLOWED_RESERVED`] (or the prefix rule in
//! [`check_label_key`]) with the document that says users set it.

/// The most characters in a label name or value.
pub const NAME_MAX: usize = 63;
/// The most characters in a label key's prefix (a DNS subdomain).
pub const PREFIX_MAX: usize = 253;

/// Reserved keys that are documented as set on nodes by the cluster's operator.
pub const ALLOWED_RESERVED: &[&str] = &[
    "topology.kubernetes.io/zone",
    "topology.kubernetes.io/region",
];

fn is_alnum(c: char) -> bool {
    c.is_ascii_alphanumeric()
}

/// A label name or non-empty value: `[A-Za-z0-9]([-_.A-Za-z0-9]*[A-Za-z0-9])?`, at most 63.
fn check_name_form(s: &str, what: &str) -> Result<(), String> {
    if s.len() > NAME_MAX {
        return Err(format!(
            "{what} {s:?} has {} characters; at most {NAME_MAX} are allowed",
            s.len()
        ));
    }
    if let Some(c) = s
        .chars()
        .find(|c| !(is_alnum(*c) || matches!(c, '-' | '_' | '.')))
    {
        return Err(format!(
            "{what} {s:?} has {c:?}; only letters, digits, '-', '_' and '.' are allowed"
        ));
    }
    let first = s.chars().next();
    let last = s.chars().last();
    if !first.is_some_and(is_alnum) || !last.is_some_and(is_alnum) {
        return Err(format!(
            "{what} {s:?} must start and end with a letter or digit"
        ));
    }
    Ok(())
}

/// A DNS subdomain (the key's prefix): lowercase RFC 1123 labels joined by `.`, at most 253.
fn check_prefix(p: &str) -> Result<(), String> {
    if p.len() > PREFIX_MAX {
        return Err(format!(
            "label prefix {p:?} has {} characters; at most {PREFIX_MAX} are allowed",
            p.len()
        ));
    }
    for part in p.split('.') {
        let ok = !part.is_empty()
            && part.len() <= 63
            && part
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
            && !part.starts_with('-')
            && !part.ends_with('-');
        if !ok {
            return Err(format!(
                "label prefix {p:?} is not a DNS subdomain (lowercase letters, digits and '-' in \
                 dot-separated parts, each starting and ending with a letter or digit)"
            ));
        }
    }
    Ok(())
}

/// Whether `prefix` is `domain` or one of its subdomains.
fn under(prefix: &str, domain: &str) -> bool {
    prefix == domain || prefix.ends_with(&format!(".{domain}"))
}

/// Checks a label key: Kubernetes' syntax, then rackseed's reserved-prefix rule (module docs).
pub fn check_label_key(key: &str) -> Result<(), String> {
    let (prefix, name) = match key.split_once('/') {
        Some((p, n)) => (Some(p), n),
        None => (None, key),
    };
    if name.is_empty() {
        return Err(format!("label key {key:?} has an empty name"));
    }
    if name.contains('/') {
        return Err(format!(
            "label key {key:?} has more than one '/'; expected [prefix/]name"
        ));
    }
    check_name_form(name, "label name")?;
    let Some(prefix) = prefix else {
        return Ok(());
    };
    if prefix.is_empty() {
        return Err(format!("label key {key:?} has an empty prefix before '/'"));
    }
    check_prefix(prefix)?;
    if under(prefix, "kubernetes.io") || under(prefix, "k8s.io") {
        if prefix == "node-role.kubernetes.io" || ALLOWED_RESERVED.contains(&key) {
            return Ok(());
        }
        return Err(format!(
            "label key {key:?} uses the prefix {prefix:?}, reserved for Kubernetes and MicroK8s \
             themselves; use your own prefix (e.g. \"example.com/{name}\") or none. Allowed \
             exceptions: node-role.kubernetes.io/<role>, {}",
            ALLOWED_RESERVED.join(", ")
        ));
    }
    Ok(())
}

/// Checks a label value: empty, or a name's form (at most 63 characters).
pub fn check_label_value(value: &str) -> Result<(), String> {
    if value.is_empty() {
        return Ok(());
    }
    check_name_form(value, "label value")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_follow_kubernetes_qualified_names() {
        for ok in [
            "zone",
            "disk",
            "Disk_Type.v2",
            "example.com/rack",
            "a.b-c.example/x",
            "node-role.kubernetes.io/storage",
            "topology.kubernetes.io/zone",
            &"a".repeat(63),
            &format!(
                "{}/n",
                [
                    "a".repeat(63),
                    "b".repeat(63),
                    "c".repeat(63),
                    "d".repeat(61)
                ]
                .join(".")
            ),
        ] {
            assert!(
                check_label_key(ok).is_ok(),
                "{ok}: {:?}",
                check_label_key(ok)
            );
        }
        for (bad, why) in [
            ("", "empty name"),
            ("-zone", "start and end"),
            ("zone-", "start and end"),
            ("zo ne", "' '"),
            ("Example.com/x", "DNS subdomain"),
            ("example..com/x", "DNS subdomain"),
            ("/x", "empty prefix"),
            ("example.com/", "empty name"),
            ("a/b/c", "more than one"),
            (&"a".repeat(64), "64 characters"),
            (&format!("{}/n", "a.".repeat(127) + "a"), "255 characters"),
            ("kubernetes.io/hostname", "reserved"),
            ("node.kubernetes.io/microk8s-worker", "reserved"),
            ("k8s.io/x", "reserved"),
            ("sub.k8s.io/x", "reserved"),
            ("topology.kubernetes.io/rack", "reserved"),
        ] {
            let e = check_label_key(bad).unwrap_err();
            assert!(e.contains(why), "{bad}: {e}");
        }
        // A look-alike domain is not reserved.
        assert!(check_label_key("notkubernetes.io/x").is_ok());
    }

    #[test]
    fn values_are_empty_or_a_name() {
        for ok in ["", "a", "ssd", "Fast_1.x-y", &"v".repeat(63)] {
            assert!(check_label_value(ok).is_ok(), "{ok}");
        }
        for bad in ["-a", "a-", "a b", "a/b", &"v".repeat(64), "é"] {
            assert!(check_label_value(bad).is_err(), "{bad}");
        }
    }
}
