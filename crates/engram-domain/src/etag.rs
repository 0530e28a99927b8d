//! Etags (AIP-154): a digest of what a client can change, so a stale copy is detected.

use chrono::{DateTime, Utc};
use sha2::{Digest, Sha256};

use crate::entity::memory;

/// The length of an etag.
pub const ETAG_LEN: usize = 16;

/// 16 hex digits over the memory's user-visible state; access tracking does not change it.
pub fn memory_etag(memory: &memory::Model) -> String {
    let micros = |at: Option<DateTime<Utc>>| at.map_or(i64::MIN, |at| at.timestamp_micros());
    let mut digest = Sha256::new();
    digest.update(memory.id.as_bytes());
    digest.update([0]);
    digest.update(memory.content_hash.as_bytes());
    digest.update(memory.importance.to_bits().to_be_bytes());
    // The same compact JSON as `to_string`, written straight into the digest.
    serde_json::to_writer(&mut digest, &memory.metadata).expect("a digest accepts every write");
    for at in [
        Some(memory.updated_at),
        memory.expires_at,
        memory.deleted_at,
    ] {
        digest.update(micros(at).to_be_bytes());
    }
    let head: [u8; 8] = digest.finalize()[..8].try_into().expect("8 of 32 bytes");
    format!("{:0ETAG_LEN$x}", u64::from_be_bytes(head))
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    fn memory() -> memory::Model {
        let at = Utc.with_ymd_and_hms(2026, 11, 24, 12, 0, 0).unwrap();
        memory::Model {
            id: "0193a1b2-0000-7000-8000-000000000000".to_owned(),
            tenant_id: "default".to_owned(),
            session_id: "s".to_owned(),
            content_type: "fact".to_owned(),
            content: "likes green tea".to_owned(),
            content_hash: "ab".repeat(32),
            semantic_hash: None,
            metadata: serde_json::json!({"source": "chat"}),
            importance: 0.5,
            expires_at: None,
            access_count: 0,
            last_accessed: None,
            created_at: at,
            updated_at: at,
            deleted_at: None,
        }
    }

    #[test]
    fn an_etag_is_16_hex_digits_that_follow_changes_but_not_accesses() {
        let original = memory_etag(&memory());
        // Pinned: a client's stored etag must still match after an upgrade.
        assert_eq!(original, "3a89df8b4882a5cc");
        let accessed = memory::Model {
            access_count: 7,
            ..memory()
        };
        assert_eq!(
            memory_etag(&accessed),
            original,
            "accesses do not change it"
        );
        let changed = memory::Model {
            importance: 0.6,
            ..memory()
        };
        assert_ne!(memory_etag(&changed), original);
    }
}
