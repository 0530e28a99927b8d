//! Field rules for memory input. Each check names its field in the violation it returns.

use serde_json::{Map, Value};

use crate::error::FieldViolation;
use crate::limits::{
    CONTENT_MAX_CHARS, CONTENT_MAX_INPUT_BYTES, METADATA_KEY_MAX_LEN, METADATA_MAX_BYTES,
    METADATA_MAX_DEPTH,
};
use crate::sanitize::sanitize_text;

/// Sanitizes content and checks it is neither oversized nor empty afterwards.
pub fn content(field: &str, raw: &str) -> Result<String, FieldViolation> {
    if raw.len() > CONTENT_MAX_INPUT_BYTES {
        return Err(FieldViolation::new(
            field,
            format!("must be at most {CONTENT_MAX_INPUT_BYTES} bytes"),
        ));
    }
    let clean = sanitize_text(raw);
    if clean.is_empty() {
        return Err(FieldViolation::new(
            field,
            "is empty once markup and control characters are removed",
        ));
    }
    if clean.chars().count() > CONTENT_MAX_CHARS {
        return Err(FieldViolation::new(
            field,
            format!("must be at most {CONTENT_MAX_CHARS} characters"),
        ));
    }
    Ok(clean)
}

/// Importance is a finite number in [0, 1].
pub fn importance(field: &str, value: f64) -> Result<f64, FieldViolation> {
    if (0.0..=1.0).contains(&value) {
        Ok(value)
    } else {
        Err(FieldViolation::new(
            field,
            "must be a number between 0 and 1",
        ))
    }
}

/// Metadata: a JSON object within the size and depth limits, with plain keys and
/// sanitized string values.
pub fn metadata(
    field: &str,
    value: Map<String, Value>,
) -> Result<Map<String, Value>, FieldViolation> {
    let clean = sanitize_object(field, value, 1)?;
    let size = serde_json::to_vec(&clean)
        .map(|bytes| bytes.len())
        .unwrap_or(usize::MAX);
    if size > METADATA_MAX_BYTES {
        return Err(FieldViolation::new(
            field,
            format!("must be at most {METADATA_MAX_BYTES} bytes as JSON"),
        ));
    }
    Ok(clean)
}

fn sanitize_object(
    field: &str,
    object: Map<String, Value>,
    depth: usize,
) -> Result<Map<String, Value>, FieldViolation> {
    object
        .into_iter()
        .map(|(key, value)| {
            if !is_plain_key(&key) {
                return Err(FieldViolation::new(
                    field,
                    format!(
                        "keys must be 1 to {METADATA_KEY_MAX_LEN} ASCII letters, digits, '_', '-', '.' or ':'"
                    ),
                ));
            }
            Ok((key, sanitize_value(field, value, depth)?))
        })
        .collect()
}

fn sanitize_value(field: &str, value: Value, depth: usize) -> Result<Value, FieldViolation> {
    let nested = |depth: usize| {
        if depth >= METADATA_MAX_DEPTH {
            Err(FieldViolation::new(
                field,
                format!("must nest at most {METADATA_MAX_DEPTH} levels"),
            ))
        } else {
            Ok(depth + 1)
        }
    };
    Ok(match value {
        Value::String(text) => Value::String(sanitize_text(&text)),
        Value::Object(object) => Value::Object(sanitize_object(field, object, nested(depth)?)?),
        Value::Array(items) => {
            let depth = nested(depth)?;
            Value::Array(
                items
                    .into_iter()
                    .map(|item| sanitize_value(field, item, depth))
                    .collect::<Result<_, _>>()?,
            )
        }
        scalar => scalar,
    })
}

fn is_plain_key(key: &str) -> bool {
    (1..=METADATA_KEY_MAX_LEN).contains(&key.len())
        && key
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.' | ':'))
}

/// Shallow merge for deduplicated stores: the newer value of a key wins.
pub fn merge_metadata(
    existing: &Map<String, Value>,
    newer: &Map<String, Value>,
) -> Map<String, Value> {
    let mut merged = existing.clone();
    merged.extend(
        newer
            .iter()
            .map(|(key, value)| (key.clone(), value.clone())),
    );
    merged
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn object(value: Value) -> Map<String, Value> {
        value.as_object().cloned().unwrap()
    }

    #[test]
    fn content_is_sanitized_or_rejected_with_its_field() {
        assert_eq!(
            content("memory.content", "  likes <b>tea</b>  ").unwrap(),
            "likes tea"
        );
        let empty = content("memory.content", "<script>x</script> \u{0}").unwrap_err();
        assert_eq!(empty.field, "memory.content");
        assert!(content("memory.content", &"a".repeat(CONTENT_MAX_INPUT_BYTES + 1)).is_err());
        assert!(content("memory.content", &"ab ".repeat(4000)).is_err());
        assert!(content("memory.content", &"a".repeat(CONTENT_MAX_CHARS)).is_ok());
    }

    #[test]
    fn importance_must_be_a_number_in_range() {
        assert_eq!(importance("memory.importance", 0.0), Ok(0.0));
        assert_eq!(importance("memory.importance", 1.0), Ok(1.0));
        for bad in [f64::NAN, f64::INFINITY, -0.01, 1.01] {
            assert_eq!(
                importance("memory.importance", bad).unwrap_err().field,
                "memory.importance"
            );
        }
    }

    #[test]
    fn metadata_strings_are_sanitized_deeply() {
        let clean = metadata(
            "memory.metadata",
            object(json!({"note": "<b>vip</b>", "tags": ["<i>a</i>", 1]})),
        )
        .unwrap();
        assert_eq!(
            Value::Object(clean),
            json!({"note": "vip", "tags": ["a", 1]})
        );
    }

    #[test]
    fn metadata_limits_hold() {
        assert!(metadata("m", object(json!({"bad key": 1}))).is_err());
        assert!(metadata("m", object(json!({"": 1}))).is_err());
        assert!(metadata("m", object(json!({"k": "x".repeat(METADATA_MAX_BYTES)}))).is_err());
        let mut deep = json!(1);
        for _ in 0..METADATA_MAX_DEPTH {
            deep = json!({ "k": deep });
        }
        // `deep` nests exactly the maximum number of objects; one more is refused.
        assert!(metadata("m", object(deep.clone())).is_ok());
        assert!(metadata("m", object(json!({ "k": deep }))).is_err());
    }

    #[test]
    fn merge_prefers_the_newer_value() {
        let merged = merge_metadata(
            &object(json!({"a": 1, "b": 1})),
            &object(json!({"b": 2, "c": 3})),
        );
        assert_eq!(Value::Object(merged), json!({"a": 1, "b": 2, "c": 3}));
    }
}
