//! Byte-level property tests of the MicroK8s output parsers: whatever a (broken, hostile or
//! future) MicroK8s prints, parsing never panics, and a refusal names what it was parsing.
//! Inputs are arbitrary bytes (lossily decoded, as the command runner does) and mutations of
//! the real-format fixtures. Bounded: 256 cases per property.

use std::path::PathBuf;

use firstboot::system::microk8s::parse::{
    parse_cert_fingerprint, parse_dqlite_cluster_json, parse_join_rejection, parse_kubeconfig,
    parse_nodes_json, parse_status, parse_status_pretty, parse_status_yaml,
};
use proptest::prelude::*;

fn fixture(name: &str) -> String {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/fixtures/microk8s")
        .join(name);
    std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("reading {}: {e}", p.display()))
}

const FIXTURES: [&str; 6] = [
    "status-ha.yaml",
    "status-ha.pretty",
    "status-not-ready.yaml",
    "dqlite-cluster.json",
    "kubectl-nodes.json",
    "server.crt",
];

/// Every parser on `text`: no panic, and each error says what it parsed.
fn parse_everything(text: &str, code: Option<i32>) {
    let named = |r: Result<(), String>| {
        if let Err(e) = r {
            assert!(e.starts_with("unexpected output from `"), "{e}");
        }
    };
    named(
        parse_status(code, text, text)
            .map(drop)
            .map_err(|e| e.to_string()),
    );
    named(parse_status_yaml(text).map(drop).map_err(|e| e.to_string()));
    named(
        parse_status_pretty(text)
            .map(drop)
            .map_err(|e| e.to_string()),
    );
    named(
        parse_dqlite_cluster_json(text)
            .map(drop)
            .map_err(|e| e.to_string()),
    );
    named(parse_nodes_json(text).map(drop).map_err(|e| e.to_string()));
    named(parse_kubeconfig(text).map(drop).map_err(|e| e.to_string()));
    named(
        parse_cert_fingerprint(text)
            .map(drop)
            .map_err(|e| e.to_string()),
    );
    let _ = parse_join_rejection(text);
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, .. ProptestConfig::default() })]

    #[test]
    fn arbitrary_bytes_never_panic(
        bytes in proptest::collection::vec(any::<u8>(), 0..2048),
        code in proptest::option::of(-1i32..256),
    ) {
        parse_everything(&String::from_utf8_lossy(&bytes), code);
    }

    #[test]
    fn mutated_real_outputs_never_panic(
        which in 0..FIXTURES.len(),
        cut in any::<prop::sample::Index>(),
        at in any::<prop::sample::Index>(),
        insert in "[ -~\n\t]{0,40}",
        code in proptest::option::of(0i32..8),
    ) {
        let text = fixture(FIXTURES[which]);
        let chars: Vec<char> = text.chars().collect();
        let cut = cut.index(chars.len() + 1);
        let at = at.index(cut + 1);
        let mutated: String = chars[..at]
            .iter()
            .copied()
            .chain(insert.chars())
            .chain(chars[cut..].iter().copied())
            .collect();
        parse_everything(&mutated, code);
    }
}
