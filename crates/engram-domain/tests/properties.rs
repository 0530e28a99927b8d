//! Property tests over arbitrary input for the parsers and hashes every request reaches:
//! none panics, and each keeps its invariants.

use engram_domain::filter::{parse_content_type_filter, parse_purge_filter};
use engram_domain::names::{SessionId, parse_memory_name, parse_session_name};
use engram_domain::text::{
    content_hash, format_semantic_hash, hamming_distance, normalize_content, parse_semantic_hash,
    semantic_hash,
};
use proptest::prelude::*;

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn session_names_accept_only_safe_ids(raw in "\\PC{0,40}|[A-Za-z0-9_./\\\\'-]{0,40}") {
        if let Ok(session) = parse_session_name("parent", &format!("sessions/{raw}")) {
            let id = session.as_str();
            prop_assert!(id.len() <= 255 && !id.is_empty());
            prop_assert!(id.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-'));
            prop_assert!(!id.contains(".."));
            prop_assert_eq!(SessionId::parse(id).ok(), Some(session.clone()));
        }
    }

    #[test]
    fn memory_names_round_trip(session in "[a-z0-9][a-z0-9_-]{0,20}", id in proptest::array::uniform16(any::<u8>()), junk in "\\PC{0,20}") {
        let uuid = uuid::Uuid::from_bytes(id).to_string();
        let name = format!("sessions/{session}/memories/{uuid}");
        let parsed = parse_memory_name("name", &name).unwrap();
        prop_assert_eq!(parsed.to_string(), name.clone());
        // Anything appended makes it another, invalid name.
        if !junk.is_empty() {
            let longer = format!("{name}{junk}");
            prop_assert!(parse_memory_name("name", &longer).is_err());
        }
    }

    #[test]
    fn arbitrary_names_and_filters_never_panic(raw in "\\PC{0,80}") {
        let _ = parse_memory_name("name", &raw);
        let _ = parse_session_name("parent", &raw);
        let _ = parse_content_type_filter(&raw);
        let _ = parse_purge_filter(&raw);
    }

    #[test]
    fn content_hash_is_hex_and_ignores_case_and_spacing(words in proptest::collection::vec("[a-zA-Z]{1,8}", 1..8), gaps in proptest::collection::vec("[ \\t\\n\u{3000}\u{1c}]{1,3}", 8)) {
        let spaced: String = words.iter().zip(&gaps).map(|(word, gap)| format!("{gap}{word}")).collect();
        let plain = words.join(" ").to_lowercase();
        let hash = content_hash(&spaced);
        prop_assert_eq!(hash.len(), 64);
        prop_assert!(hash.chars().all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase()));
        prop_assert_eq!(hash, content_hash(&format!("{}!?", plain.to_uppercase())));
        prop_assert_eq!(normalize_content(&spaced), plain);
    }

    #[test]
    fn semantic_hashes_format_parse_and_measure(a in "\\PC{0,60}", b in "\\PC{0,60}") {
        let (left, right) = (semantic_hash(&a), semantic_hash(&b));
        prop_assert_eq!(parse_semantic_hash(&format_semantic_hash(left)), Some(left));
        prop_assert_eq!(hamming_distance(left, right), hamming_distance(right, left));
        prop_assert!(hamming_distance(left, right) <= 64);
        prop_assert_eq!(hamming_distance(left, left), 0);
    }
}
