//! The memory's vocabulary: content types and what a store request carries once validated.

use chrono::{DateTime, Utc};

/// What kind of knowledge a memory holds; stored as the seed's lowercase strings.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ContentType {
    UserInfo,
    Preference,
    Fact,
    Context,
}

impl ContentType {
    pub const ALL: [ContentType; 4] = [
        ContentType::UserInfo,
        ContentType::Preference,
        ContentType::Fact,
        ContentType::Context,
    ];

    /// The value in the `content_type` column (the seed's names).
    pub fn as_str(self) -> &'static str {
        match self {
            ContentType::UserInfo => "user_info",
            ContentType::Preference => "preference",
            ContentType::Fact => "fact",
            ContentType::Context => "context",
        }
    }

    pub fn from_column(value: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|kind| kind.as_str() == value)
    }

    /// The enum name without prefix, as written in filters: `USER_INFO`, `FACT`, ...
    pub fn filter_name(self) -> &'static str {
        match self {
            ContentType::UserInfo => "USER_INFO",
            ContentType::Preference => "PREFERENCE",
            ContentType::Fact => "FACT",
            ContentType::Context => "CONTEXT",
        }
    }
}

/// A validated, sanitized memory ready to be stored.
#[derive(Debug, Clone, PartialEq)]
pub struct NewMemory {
    pub content_type: ContentType,
    pub content: String,
    pub content_hash: String,
    pub semantic_hash: u64,
    pub metadata: serde_json::Map<String, serde_json::Value>,
    pub importance: f64,
    pub expires_at: DateTime<Utc>,
}

/// Importance of a memory stored without one (the seed's default).
pub const DEFAULT_IMPORTANCE: f64 = 0.5;

/// A deduplicated store merges into the existing twin: the higher importance wins, newer
/// metadata keys win, the later expiry wins (a twin that never expires stays so), and a
/// soft-deleted twin is restored. Content and creation time stay the twin's.
pub fn merge_into_twin(
    twin: crate::entity::memory::Model,
    memory: &NewMemory,
    now: DateTime<Utc>,
) -> crate::entity::memory::Model {
    let existing_metadata = twin.metadata.as_object().cloned().unwrap_or_default();
    crate::entity::memory::Model {
        importance: twin.importance.max(memory.importance),
        metadata: serde_json::Value::Object(crate::validate::merge_metadata(
            &existing_metadata,
            &memory.metadata,
        )),
        expires_at: twin.expires_at.map(|at| at.max(memory.expires_at)),
        deleted_at: None,
        updated_at: now,
        ..twin
    }
}
