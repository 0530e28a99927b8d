//! Bit-identity with the reference Python implementation, over the corpus
//! produced by `python3 scripts/gen_hash_fixtures.py` (CPython 3.11).

use engram_domain::text::{
    content_hash, content_hashes, format_semantic_hash, hamming_distance, normalize_content,
    parse_semantic_hash, semantic_hash,
};
use serde_json::Value;

const FIXTURES: &str = include_str!("fixtures/python_hashes.jsonl");

/// Printable ASCII as is, everything else as `\u{..}`, so failures are unambiguous.
fn escaped(text: &str) -> String {
    text.chars()
        .map(|c| match c {
            ' '..='~' if c != '\\' && c != '"' => c.to_string(),
            _ => c.escape_unicode().to_string(),
        })
        .collect()
}

#[test]
fn matches_python_for_every_fixture() {
    let mut failures = Vec::new();
    let mut count = 0;
    for line in FIXTURES.lines() {
        let record: Value = serde_json::from_str(line).expect("fixture line is JSON");
        let field = |name: &str| record[name].as_str().expect("fixture field is a string");
        let input = field("input");
        let semantic = semantic_hash(input);
        // What a store computes: both at once, from one normalization.
        let (both_content, both_semantic) = content_hashes(input);
        let checks = [
            ("normalized", normalize_content(input), field("normalized")),
            ("content_hash", content_hash(input), field("content_hash")),
            (
                "semantic_hash",
                format_semantic_hash(semantic),
                field("semantic_hash"),
            ),
            ("content_hashes.0", both_content, field("content_hash")),
            (
                "content_hashes.1",
                format_semantic_hash(both_semantic),
                field("semantic_hash"),
            ),
        ];
        for (name, actual, expected) in checks {
            if actual != expected {
                failures.push(format!(
                    "{name} of \"{}\": got \"{}\", python \"{}\"",
                    escaped(input),
                    escaped(&actual),
                    escaped(expected),
                ));
            }
        }
        if parse_semantic_hash(field("semantic_hash")) != Some(semantic) {
            failures.push(format!("parsing semantic_hash of \"{}\"", escaped(input)));
        }
        count += 1;
    }
    assert!(count > 3000, "fixture file looks truncated: {count} lines");
    assert!(
        failures.is_empty(),
        "{} mismatches with Python:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

#[test]
fn hamming_distance_matches_hand_checked_values() {
    assert_eq!(hamming_distance(0, 0), 0);
    assert_eq!(hamming_distance(0, u64::MAX), 64);
    assert_eq!(hamming_distance(0b1011, 0b0001), 2);
    assert_eq!(hamming_distance(0xf0f0, 0x0ff0), 8);
    assert_eq!(hamming_distance(1 << 63, 1), 2);
    let (a, b) = (
        parse_semantic_hash("8000000000000001").unwrap(),
        parse_semantic_hash("0000000000000003").unwrap(),
    );
    assert_eq!(hamming_distance(a, b), 2);
}
