//! Proto <-> domain conversions. Each destructures the whole proto message, so a new
//! field is a compile error here rather than silently dropped.

use chrono::{DateTime, Duration, Utc};
use engram_domain::entity::memory as row;
use engram_domain::error::{FieldViolation, Violations};
use engram_domain::expiry::{self, Expiration};
use engram_domain::memory::{ContentType, DEFAULT_IMPORTANCE, NewMemory};
use engram_domain::names::MemoryName;
use engram_domain::{etag, ranking, text, validate};
use engram_proto::memory::v1 as pb;
use engram_proto::retrieve::MEMORIES_TAG;
use prost::Message;
use prost::encoding::{WireType, encode_key, encode_varint};
use prost_types::value::Kind;
use serde_json::{Map, Number, Value};

/// What the service needs to turn rows into responses.
#[derive(Debug, Clone, Copy)]
pub struct View {
    pub now: DateTime<Utc>,
    pub soft_delete_retention: Duration,
}

impl View {
    pub fn memory(&self, row: &row::Model) -> pb::Memory {
        let row::Model {
            id,
            // The caller's own: the resource name is relative to its tenant.
            tenant_id: _,
            session_id,
            content_type,
            content,
            content_hash,
            semantic_hash,
            metadata,
            importance,
            expires_at,
            // In `tracking`.
            access_count: _,
            last_accessed: _,
            created_at,
            updated_at,
            deleted_at,
        } = row;
        let content_type = ContentType::from_column(content_type)
            .map_or(pb::ContentType::Unspecified, proto_content_type);
        let pb::Memory {
            effective_importance,
            access_count,
            last_access_time,
            ..
        } = self.tracking(row);
        pb::Memory {
            name: MemoryName::format(session_id, id),
            content_type: content_type as i32,
            content: content.clone(),
            content_hash: content_hash.clone(),
            semantic_hash: semantic_hash.clone().unwrap_or_default(),
            metadata: metadata.as_object().map(struct_from_json),
            importance: Some(*importance),
            effective_importance,
            expiration: expires_at.map(|at| pb::memory::Expiration::ExpireTime(timestamp(at))),
            access_count,
            last_access_time,
            create_time: Some(timestamp(*created_at)),
            update_time: Some(timestamp(*updated_at)),
            delete_time: deleted_at.map(timestamp),
            purge_time: deleted_at.map(|at| timestamp(at + self.soft_delete_retention)),
            etag: etag::memory_etag(row),
        }
    }

    /// What every retrieval changes in a memory, its access tracking and the effective
    /// importance that decays with time, as a Memory of those fields alone.
    fn tracking(&self, row: &row::Model) -> pb::Memory {
        let access_count = i64::from(row.access_count);
        pb::Memory {
            effective_importance: ranking::effective_importance(
                row.importance,
                row.created_at,
                access_count,
                self.now,
            ),
            access_count,
            last_access_time: row.last_accessed.map(timestamp),
            ..pb::Memory::default()
        }
    }

    /// The memory's encoding without its `tracking`: what stays the same from turn to turn
    /// until a change replaces the row.
    pub fn untracked_encoding(&self, row: &row::Model) -> Vec<u8> {
        pb::Memory {
            effective_importance: 0.0,
            access_count: 0,
            last_access_time: None,
            ..self.memory(row)
        }
        .encode_to_vec()
    }

    /// Appends the memory to `out` as a whole `memories` field for `RetrieveMemoriesResponse::
    /// from_encoded_memories`: its `untracked` encoding, then its tracking's. Two encodings
    /// of a message one after the other decode as their merge, here of disjoint fields.
    pub fn append_retrieved_memory(&self, row: &row::Model, untracked: &[u8], out: &mut Vec<u8>) {
        let tracking = self.tracking(row);
        let len = untracked.len() + tracking.encoded_len();
        out.reserve(len + MAX_FIELD_HEAD);
        encode_key(MEMORIES_TAG, WireType::LengthDelimited, out);
        encode_varint(len as u64, out);
        out.extend_from_slice(untracked);
        tracking.encode(out).expect("a Vec grows");
    }
}

/// A field's key and length: two varints of at most 5 and 10 bytes.
const MAX_FIELD_HEAD: usize = 15;

impl View {
    /// Near-duplicates with their SimHash distance, nearest first as given.
    pub fn similar(&self, similar: &[(row::Model, u32)]) -> Vec<pb::SimilarMemory> {
        similar
            .iter()
            .map(|(memory, distance)| self.similar_memory(memory, *distance))
            .collect()
    }

    pub fn similar_memory(&self, memory: &row::Model, distance: u32) -> pb::SimilarMemory {
        pb::SimilarMemory {
            memory: Some(self.memory(memory)),
            distance: distance as i32,
        }
    }
}

pub fn proto_content_type(kind: ContentType) -> pb::ContentType {
    match kind {
        ContentType::UserInfo => pb::ContentType::UserInfo,
        ContentType::Preference => pb::ContentType::Preference,
        ContentType::Fact => pb::ContentType::Fact,
        ContentType::Context => pb::ContentType::Context,
    }
}

/// Unspecified means CONTEXT, as in the reference design; unknown numbers are refused.
pub fn content_type(field: &str, value: i32) -> Result<ContentType, FieldViolation> {
    match pb::ContentType::try_from(value) {
        Ok(pb::ContentType::Unspecified | pb::ContentType::Context) => Ok(ContentType::Context),
        Ok(pb::ContentType::UserInfo) => Ok(ContentType::UserInfo),
        Ok(pb::ContentType::Preference) => Ok(ContentType::Preference),
        Ok(pb::ContentType::Fact) => Ok(ContentType::Fact),
        Err(_) => Err(FieldViolation::new(
            field,
            format!("unknown content type {value}"),
        )),
    }
}

/// Validates the memory of a store request (fields under `prefix`, e.g. `memory.`).
pub fn new_memory(
    prefix: &str,
    memory: pb::Memory,
    default_ttl: Duration,
    now: DateTime<Utc>,
) -> Result<NewMemory, Vec<FieldViolation>> {
    // Output-only fields are ignored, as AIP-203 asks.
    let pb::Memory {
        name: _,
        content_type: kind,
        content: raw_content,
        content_hash: _,
        semantic_hash: _,
        metadata: raw_metadata,
        importance: raw_importance,
        effective_importance: _,
        expiration: raw_expiration,
        access_count: _,
        last_access_time: _,
        create_time: _,
        update_time: _,
        delete_time: _,
        purge_time: _,
        etag: _,
    } = memory;
    let field = |name: &str| format!("{prefix}{name}");
    let mut violations = Violations::default();
    let kind = violations.check(content_type(&field("content_type"), kind));
    let content = violations.check(validate::content(&field("content"), &raw_content));
    let metadata = violations.check(metadata(&field("metadata"), raw_metadata));
    let importance = violations.check(validate::importance(
        &field("importance"),
        raw_importance.unwrap_or(DEFAULT_IMPORTANCE),
    ));
    let expires_at = violations.check(
        expiration(prefix, raw_expiration)
            .and_then(|requested| expiry::resolve(prefix, requested, default_ttl, now)),
    );
    violations.into_result()?;
    let (Some(content_type), Some(content), Some(metadata), Some(importance), Some(expires_at)) =
        (kind, content, metadata, importance, expires_at)
    else {
        unreachable!("every field is Some when there are no violations");
    };
    let (content_hash, semantic_hash) = text::content_hashes(&content);
    Ok(NewMemory {
        content_type,
        content_hash,
        semantic_hash,
        content,
        metadata,
        importance,
        expires_at,
    })
}

/// Converts and validates metadata; absent metadata is an empty object.
pub fn metadata(
    field: &str,
    value: Option<prost_types::Struct>,
) -> Result<Map<String, Value>, FieldViolation> {
    let object = match value {
        None => Map::new(),
        Some(value) => json_from_struct(field, value)?,
    };
    validate::metadata(field, object)
}

/// The requested expiration, checked for well-formed timestamps and durations.
pub fn expiration(
    prefix: &str,
    value: Option<pb::memory::Expiration>,
) -> Result<Option<Expiration>, FieldViolation> {
    Ok(match value {
        None => None,
        Some(pb::memory::Expiration::ExpireTime(at)) => Some(Expiration::At(datetime(
            &format!("{prefix}expire_time"),
            at,
        )?)),
        Some(pb::memory::Expiration::Ttl(ttl)) => {
            Some(Expiration::After(duration(&format!("{prefix}ttl"), ttl)?))
        }
    })
}

pub fn timestamp(at: DateTime<Utc>) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: at.timestamp(),
        nanos: at.timestamp_subsec_nanos() as i32,
    }
}

/// A protobuf Timestamp as a UTC time, truncated to the microseconds databases keep.
pub fn datetime(field: &str, at: prost_types::Timestamp) -> Result<DateTime<Utc>, FieldViolation> {
    let prost_types::Timestamp { seconds, nanos } = at;
    u32::try_from(nanos)
        .ok()
        .filter(|nanos| *nanos < 1_000_000_000)
        .and_then(|nanos| DateTime::from_timestamp(seconds, nanos - nanos % 1000))
        .ok_or_else(|| FieldViolation::new(field, "is not a valid timestamp"))
}

fn duration(field: &str, value: prost_types::Duration) -> Result<Duration, FieldViolation> {
    let prost_types::Duration { seconds, nanos } = value;
    let well_formed =
        nanos.abs() < 1_000_000_000 && (seconds == 0 || nanos == 0 || (seconds > 0) == (nanos > 0));
    well_formed
        .then(|| {
            Duration::try_seconds(seconds)
                .map(|whole| whole + Duration::nanoseconds(i64::from(nanos)))
        })
        .flatten()
        .ok_or_else(|| FieldViolation::new(field, "is not a valid duration"))
}

fn json_from_struct(
    field: &str,
    value: prost_types::Struct,
) -> Result<Map<String, Value>, FieldViolation> {
    let prost_types::Struct { fields } = value;
    fields
        .into_iter()
        .map(|(key, value)| Ok((key, json_from_value(field, value)?)))
        .collect()
}

fn json_from_value(field: &str, value: prost_types::Value) -> Result<Value, FieldViolation> {
    let prost_types::Value { kind } = value;
    Ok(match kind {
        None | Some(Kind::NullValue(_)) => Value::Null,
        Some(Kind::BoolValue(flag)) => Value::Bool(flag),
        Some(Kind::StringValue(text)) => Value::String(text),
        Some(Kind::NumberValue(number)) => Value::Number(
            Number::from_f64(number)
                .ok_or_else(|| FieldViolation::new(field, "numbers must be finite"))?,
        ),
        Some(Kind::StructValue(object)) => Value::Object(json_from_struct(field, object)?),
        Some(Kind::ListValue(prost_types::ListValue { values })) => Value::Array(
            values
                .into_iter()
                .map(|item| json_from_value(field, item))
                .collect::<Result<_, _>>()?,
        ),
    })
}

pub fn struct_from_json(object: &Map<String, Value>) -> prost_types::Struct {
    prost_types::Struct {
        fields: object
            .iter()
            .map(|(key, value)| (key.clone(), value_from_json(value)))
            .collect(),
    }
}

fn value_from_json(value: &Value) -> prost_types::Value {
    let kind = match value {
        Value::Null => Kind::NullValue(0),
        Value::Bool(flag) => Kind::BoolValue(*flag),
        Value::Number(number) => Kind::NumberValue(number.as_f64().unwrap_or_default()),
        Value::String(text) => Kind::StringValue(text.clone()),
        Value::Array(items) => Kind::ListValue(prost_types::ListValue {
            values: items.iter().map(value_from_json).collect(),
        }),
        Value::Object(object) => Kind::StructValue(struct_from_json(object)),
    };
    prost_types::Value { kind: Some(kind) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_are_checked_and_truncated_to_microseconds() {
        let at = datetime(
            "t",
            prost_types::Timestamp {
                seconds: 1_700_000_000,
                nanos: 123_456_789,
            },
        )
        .unwrap();
        assert_eq!(at.timestamp_subsec_nanos(), 123_456_000);
        assert!(
            datetime(
                "t",
                prost_types::Timestamp {
                    seconds: 0,
                    nanos: -1
                }
            )
            .is_err()
        );
        assert!(
            datetime(
                "t",
                prost_types::Timestamp {
                    seconds: i64::MAX,
                    nanos: 0
                }
            )
            .is_err()
        );
    }

    #[test]
    fn durations_must_be_consistent() {
        assert_eq!(
            duration(
                "d",
                prost_types::Duration {
                    seconds: 2,
                    nanos: 5
                }
            )
            .unwrap(),
            Duration::seconds(2) + Duration::nanoseconds(5)
        );
        assert!(
            duration(
                "d",
                prost_types::Duration {
                    seconds: 1,
                    nanos: -1
                }
            )
            .is_err()
        );
        assert!(
            duration(
                "d",
                prost_types::Duration {
                    seconds: i64::MAX,
                    nanos: 0
                }
            )
            .is_err()
        );
    }

    #[test]
    fn non_finite_metadata_numbers_are_refused() {
        let value = prost_types::Struct {
            fields: [(
                "x".to_owned(),
                prost_types::Value {
                    kind: Some(Kind::NumberValue(f64::NAN)),
                },
            )]
            .into(),
        };
        assert_eq!(
            metadata("memory.metadata", Some(value)).unwrap_err().field,
            "memory.metadata"
        );
    }

    #[test]
    fn a_retrieved_memory_decodes_as_the_memory_built_whole() {
        let created_at = DateTime::from_timestamp_micros(1_790_000_000_123_456).unwrap();
        let view = View {
            now: created_at + Duration::days(3),
            soft_delete_retention: Duration::days(30),
        };
        let fresh = row::Model {
            id: "0199a1b2-0000-7000-8000-000000000001".to_owned(),
            tenant_id: "default".to_owned(),
            session_id: "s1".to_owned(),
            content_type: "preference".to_owned(),
            content: "customer prefers email updates".to_owned(),
            content_hash: "fc5f1794".to_owned(),
            semantic_hash: Some("482c5aa1105044a2".to_owned()),
            metadata: serde_json::json!({"source": "chat", "turn": 3, "tags": ["a", null]}),
            importance: 0.5,
            expires_at: None,
            access_count: 0,
            last_accessed: None,
            created_at,
            updated_at: created_at,
            deleted_at: None,
        };
        let accessed = row::Model {
            metadata: serde_json::json!({}),
            semantic_hash: None,
            expires_at: Some(created_at + Duration::days(7)),
            access_count: 12,
            last_accessed: Some(created_at + Duration::hours(5)),
            ..fresh.clone()
        };
        for row in [fresh, accessed] {
            // Encoded before the accesses, as the session cache keeps it.
            let untracked = view.untracked_encoding(&row::Model {
                access_count: 0,
                last_accessed: None,
                ..row.clone()
            });
            let mut encoded = Vec::new();
            view.append_retrieved_memory(&row, &untracked, &mut encoded);
            view.append_retrieved_memory(&row, &untracked, &mut encoded);
            let response = pb::RetrieveMemoriesResponse::from_encoded_memories(encoded);
            let decoded = pb::RetrieveMemoriesResponse::decode(response.encode_to_vec().as_slice())
                .expect("decodes");
            assert_eq!(decoded.memories, [view.memory(&row), view.memory(&row)]);
        }
    }
}
