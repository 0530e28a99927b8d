//! Etags (AIP-154): a digest of what a client can change, so a stale copy is detected.

use chrono::{DateTime, Utc};
use sha2::{Digest, Sha256};

use crate::entity::memory;

/// 16 hex digits over the memory's user-visible state; access tracking does not change it.
pub fn memory_etag(memory: &memory::Model) -> String {
    let micros = |at: Option<DateTime<Utc>>| at.map_or(i64::MIN, |at| at.timestamp_micros());
    let mut digest = Sha256::new();
    digest.update(memory.id.as_bytes());
    digest.update([0]);
    digest.update(memory.content_hash.as_bytes());
    digest.update(memory.importance.to_bits().to_be_bytes());
    digest.update(memory.metadata.to_string().as_bytes());
    for at in [
        Some(memory.updated_at),
        memory.expires_at,
        memory.deleted_at,
    ] {
        digest.update(micros(at).to_be_bytes());
    }
    digest.finalize()[..8]
        .iter()
        .map(|byte| format!("{byte:02x}"))
        .collect()
}
