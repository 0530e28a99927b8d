//! The small filter languages (AIP-160 subsets) of ListMemories and PurgeMemories.

use crate::limits::FILTER_MAX_LEN;
use crate::memory::ContentType;

/// What PurgeMemories removes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PurgeScope {
    /// `state = EXPIRED`: memories past their expire_time.
    Expired,
    /// `state = DELETED`: soft-deleted memories, whatever their purge_time.
    Deleted,
    /// `*`: everything, live or not (erasure).
    Everything,
}

impl PurgeScope {
    /// The filter in its canonical spelling, as audit records keep it.
    pub fn filter(self) -> &'static str {
        match self {
            Self::Expired => "state = EXPIRED",
            Self::Deleted => "state = DELETED",
            Self::Everything => "*",
        }
    }
}

/// Parses `content_type = FACT OR content_type = "PREFERENCE"`; empty means every type.
/// Values may also be written as the proto enum names (`CONTENT_TYPE_FACT`).
pub fn parse_content_type_filter(filter: &str) -> Result<Vec<ContentType>, String> {
    let tokens = tokenize(filter)?;
    if tokens.is_empty() {
        return Ok(Vec::new());
    }
    let mut types = Vec::new();
    for (index, term) in tokens.split(|token| token == "OR").enumerate() {
        match term {
            [field, eq, value] if field == "content_type" && eq == "=" => {
                let kind = parse_content_type(value).ok_or_else(|| {
                    format!(
                        "unknown content type {value:?}; use USER_INFO, PREFERENCE, FACT or CONTEXT"
                    )
                })?;
                types.push(kind);
            }
            _ => {
                return Err(format!(
                    "term {} must read `content_type = TYPE`, joined by OR",
                    index + 1
                ));
            }
        }
    }
    types.sort();
    types.dedup();
    Ok(types)
}

/// Parses `state = EXPIRED`, `state = DELETED` or `*`.
pub fn parse_purge_filter(filter: &str) -> Result<PurgeScope, String> {
    let tokens = tokenize(filter)?;
    match tokens.iter().map(String::as_str).collect::<Vec<_>>()[..] {
        ["*"] => Ok(PurgeScope::Everything),
        ["state", "=", "EXPIRED"] => Ok(PurgeScope::Expired),
        ["state", "=", "DELETED"] => Ok(PurgeScope::Deleted),
        [] => Err("is required: `state = EXPIRED`, `state = DELETED` or `*`".to_owned()),
        _ => Err("must be `state = EXPIRED`, `state = DELETED` or `*`".to_owned()),
    }
}

fn parse_content_type(value: &str) -> Option<ContentType> {
    let bare = value.trim_matches('"');
    let bare = bare.strip_prefix("CONTENT_TYPE_").unwrap_or(bare);
    ContentType::ALL
        .into_iter()
        .find(|kind| kind.filter_name() == bare)
}

/// Splits on whitespace and keeps `=` as its own token.
fn tokenize(filter: &str) -> Result<Vec<String>, String> {
    if filter.len() > FILTER_MAX_LEN {
        return Err(format!("must be at most {FILTER_MAX_LEN} bytes"));
    }
    Ok(filter
        .replace('=', " = ")
        .split_whitespace()
        .map(str::to_owned)
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_type_filters() {
        assert_eq!(parse_content_type_filter("  "), Ok(vec![]));
        assert_eq!(
            parse_content_type_filter("content_type=FACT"),
            Ok(vec![ContentType::Fact])
        );
        assert_eq!(
            parse_content_type_filter(
                "content_type = \"PREFERENCE\" OR content_type = CONTENT_TYPE_USER_INFO OR content_type = FACT"
            ),
            Ok(vec![
                ContentType::UserInfo,
                ContentType::Preference,
                ContentType::Fact
            ])
        );
        for bad in [
            "content_type = SECRET",
            "content_type FACT",
            "importance > 0.5",
            "content_type = FACT AND",
            "OR",
        ] {
            assert!(parse_content_type_filter(bad).is_err(), "{bad}");
        }
        assert!(parse_content_type_filter(&"x".repeat(FILTER_MAX_LEN + 1)).is_err());
    }

    #[test]
    fn purge_filters() {
        assert_eq!(parse_purge_filter("*"), Ok(PurgeScope::Everything));
        for scope in [
            PurgeScope::Expired,
            PurgeScope::Deleted,
            PurgeScope::Everything,
        ] {
            assert_eq!(parse_purge_filter(scope.filter()), Ok(scope));
        }
        assert_eq!(parse_purge_filter("state=EXPIRED"), Ok(PurgeScope::Expired));
        assert_eq!(
            parse_purge_filter("state = DELETED"),
            Ok(PurgeScope::Deleted)
        );
        for bad in [
            "",
            "state = LIVE",
            "* OR state = DELETED",
            "'; DROP TABLE memories;--",
        ] {
            assert!(parse_purge_filter(bad).is_err(), "{bad}");
        }
    }
}
