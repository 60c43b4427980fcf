//! Property tests: the loader never panics on any input, every diagnostic points inside the
//! file, and MetalLB overlap detection agrees with a brute-force address check.

use std::path::Path;

use proptest::prelude::*;
use rackseed_config::{self as config, values};

const EXAMPLE: &str = include_str!("../../../../configs/rack.toml");

fn check_diagnostics(text: &str) {
    let lines = text.split('\n').count();
    if let Err(e) = config::parse(text, Path::new("p.toml")) {
        assert!(!e.diagnostics.is_empty());
        for d in &e.diagnostics {
            assert!(
                d.line >= 1 && d.line <= lines,
                "line {} outside 1..={lines}: {d}",
                d.line
            );
            assert!(d.col >= 1, "{d}");
            assert!(!d.message.is_empty());
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn arbitrary_text_never_panics(text in "\\PC{0,200}") {
        check_diagnostics(&text);
    }

    #[test]
    fn mutated_example_never_panics(pos in 0usize..EXAMPLE.len(), len in 0usize..8, insert in "[ -~\\n]{0,6}") {
        let mut start = pos;
        while !EXAMPLE.is_char_boundary(start) { start -= 1; }
        let mut end = (start + len).min(EXAMPLE.len());
        while !EXAMPLE.is_char_boundary(end) { end -= 1; }
        let text = format!("{}{}{}", &EXAMPLE[..start], insert, &EXAMPLE[end..]);
        check_diagnostics(&text);
    }

    #[test]
    fn overlap_detection_matches_brute_force(
        ranges in prop::collection::vec((0u8..=255, 0u8..=40), 1..6)
    ) {
        let texts: Vec<String> = ranges
            .iter()
            .map(|(start, len)| {
                let end = start.saturating_add(*len);
                format!("10.0.0.{start}-10.0.0.{end}")
            })
            .collect();
        let blocks: Vec<_> = texts.iter().map(|t| values::parse_block(t).unwrap()).collect();
        let found = values::find_overlaps(&blocks);
        for j in 0..blocks.len() {
            for i in 0..j {
                let shared = (0u8..=255).any(|x| {
                    let ip = format!("10.0.0.{x}").parse().unwrap();
                    values::block_contains(&blocks[i], ip) && values::block_contains(&blocks[j], ip)
                });
                prop_assert_eq!(shared, found.contains(&(i, j)), "{} vs {}", texts[i], texts[j]);
            }
        }
    }
}
