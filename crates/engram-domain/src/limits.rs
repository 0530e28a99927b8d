//! Input limits, documented in the README ("Input rules"). Each one is named in its error.

/// Session ids: 1 to 255 ASCII letters, digits, `_` or `-`, starting with a letter or digit
/// (the legacy column is VARCHAR(255); `-` alone is the "every session" wildcard).
pub const SESSION_ID_MAX_LEN: usize = 255;
/// Raw content before sanitizing, in bytes: bounds the work a single request can cause.
pub const CONTENT_MAX_INPUT_BYTES: usize = 64 * 1024;
/// Stored content after sanitizing, in characters.
pub const CONTENT_MAX_CHARS: usize = 10_000;
/// Metadata serialized as JSON, in bytes.
pub const METADATA_MAX_BYTES: usize = 16 * 1024;
/// Nesting depth of metadata objects and lists (the top-level object is depth 1).
pub const METADATA_MAX_DEPTH: usize = 8;
/// Metadata keys: 1 to 128 ASCII letters, digits, `_`, `-`, `.` or `:`.
pub const METADATA_KEY_MAX_LEN: usize = 128;
/// Furthest expiry a client may ask for, in days from now.
pub const EXPIRATION_MAX_DAYS: i64 = 3650;
/// Memories in one BatchStoreMemories call.
pub const BATCH_MAX_REQUESTS: usize = 100;
/// ListMemories page size: default and the size larger requests are coerced to.
pub const LIST_DEFAULT_PAGE_SIZE: usize = 50;
pub const LIST_MAX_PAGE_SIZE: usize = 1000;
/// RetrieveMemories result size: default and maximum.
pub const RETRIEVE_DEFAULT_PAGE_SIZE: usize = 10;
pub const RETRIEVE_MAX_PAGE_SIZE: usize = 100;
/// SimHash fingerprints have 64 bits, so no distance exceeds this.
pub const SIMHASH_MAX_DISTANCE: u32 = 64;
/// Filters are short expressions; longer ones are rejected unparsed.
pub const FILTER_MAX_LEN: usize = 512;
/// Names of purged memories returned as a sample.
pub const PURGE_SAMPLE_SIZE: usize = 100;
