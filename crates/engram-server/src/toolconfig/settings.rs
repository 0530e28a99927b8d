//! The reference design's tool settings (its `ToolSettings`): a feature flag per tool and each
//! tool's settings, with its defaults, bounds and parsing rules. They live in the `[tools]`
//! table of the settings file and in environment variables under the reference design's names
//! (`ENABLE_RAG_TOOL`, `RAG_CHUNK_SIZE`, ...). Its memory settings are Engram's own memory
//! settings (`Settings::memory_*`), so the memory tool and the MemoryService agree.

use std::collections::BTreeMap;
use std::fmt;

use serde::Deserialize;
use serde::de::{self, Deserializer, MapAccess, SeqAccess, Visitor};

use super::seed_env::EnvKind;
use crate::secrets::SecretReference;

/// The settings table and the prefix of every tool setting's key path.
pub const TOOLS_TABLE: &str = "tools";

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ToolSettings {
    pub enable_rag_tool: bool,
    pub enable_memory_tool: bool,
    pub enable_escalation_tool: bool,
    pub enable_attachment_tool: bool,
    pub enable_crm_tool: bool,
    pub enable_billing_tool: bool,
    pub enable_inventory_tool: bool,

    /// RAG document chunk size in words.
    pub rag_chunk_size: u32,
    /// Overlap between chunks in words.
    pub rag_chunk_overlap: u32,
    /// Default number of RAG search results.
    pub rag_search_k: u32,
    /// Minimum similarity score of RAG results.
    pub rag_similarity_threshold: f64,
    pub rag_cache_enabled: bool,
    /// RAG cache time to live in seconds.
    pub rag_cache_ttl: u64,

    pub escalation_confidence_threshold: f64,
    pub escalation_keywords: EscalationKeywords,
    pub escalation_notification_enabled: bool,
    pub escalation_notification_email: Option<String>,
    pub escalation_notification_webhook: Option<String>,

    /// Largest attachment in bytes.
    pub attachment_max_file_size: u64,
    pub attachment_allowed_extensions: AllowedExtensions,
    /// Chunk attachments for RAG indexing.
    pub attachment_chunk_for_rag: bool,
    /// Hours before temporary attachment files are cleaned up.
    pub attachment_temp_cleanup_hours: u64,

    pub crm_api_endpoint: Option<String>,
    #[serde(deserialize_with = "SecretReference::deserialize_optional")]
    pub crm_api_key: Option<SecretReference>,
    /// CRM API timeout in seconds.
    pub crm_timeout: u64,
    pub crm_max_retries: u64,

    pub billing_api_endpoint: Option<String>,
    #[serde(deserialize_with = "SecretReference::deserialize_optional")]
    pub billing_api_key: Option<SecretReference>,

    pub inventory_api_endpoint: Option<String>,
    #[serde(deserialize_with = "SecretReference::deserialize_optional")]
    pub inventory_api_key: Option<SecretReference>,
}

impl Default for ToolSettings {
    fn default() -> Self {
        Self {
            enable_rag_tool: true,
            enable_memory_tool: true,
            enable_escalation_tool: true,
            enable_attachment_tool: true,
            enable_crm_tool: false,
            enable_billing_tool: false,
            enable_inventory_tool: false,
            rag_chunk_size: 500,
            rag_chunk_overlap: 50,
            rag_search_k: 5,
            rag_similarity_threshold: 0.7,
            rag_cache_enabled: true,
            rag_cache_ttl: 3600,
            escalation_confidence_threshold: 0.7,
            escalation_keywords: EscalationKeywords::default(),
            escalation_notification_enabled: false,
            escalation_notification_email: None,
            escalation_notification_webhook: None,
            attachment_max_file_size: 10 * 1024 * 1024,
            attachment_allowed_extensions: AllowedExtensions::default(),
            attachment_chunk_for_rag: true,
            attachment_temp_cleanup_hours: 24,
            crm_api_endpoint: None,
            crm_api_key: None,
            crm_timeout: 10,
            crm_max_retries: 3,
            billing_api_endpoint: None,
            billing_api_key: None,
            inventory_api_endpoint: None,
            inventory_api_key: None,
        }
    }
}

/// The reference design's bound of a number setting.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Bound {
    Between(f64, f64),
    AtLeast(f64),
}

impl Bound {
    /// NaN is in no bound.
    pub fn contains(self, value: f64) -> bool {
        match self {
            Bound::Between(min, max) => min <= value && value <= max,
            Bound::AtLeast(min) => min <= value,
        }
    }
}

impl fmt::Display for Bound {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Bound::Between(min, max) => write!(f, "between {min} and {max}"),
            Bound::AtLeast(min) => write!(f, "at least {min}"),
        }
    }
}

/// Every bounded tool setting: its key, bound and value (the reference design bounds them all).
type BoundedSetting = (&'static str, Bound, fn(&ToolSettings) -> f64);

const BOUNDED: [BoundedSetting; 10] = [
    ("rag_chunk_size", Bound::Between(100.0, 2000.0), |s| {
        f64::from(s.rag_chunk_size)
    }),
    ("rag_chunk_overlap", Bound::Between(0.0, 500.0), |s| {
        f64::from(s.rag_chunk_overlap)
    }),
    ("rag_search_k", Bound::Between(1.0, 20.0), |s| {
        f64::from(s.rag_search_k)
    }),
    ("rag_similarity_threshold", Bound::Between(0.0, 1.0), |s| {
        s.rag_similarity_threshold
    }),
    ("rag_cache_ttl", Bound::AtLeast(60.0), |s| {
        s.rag_cache_ttl as f64
    }),
    (
        "escalation_confidence_threshold",
        Bound::Between(0.0, 1.0),
        |s| s.escalation_confidence_threshold,
    ),
    ("attachment_max_file_size", Bound::AtLeast(1024.0), |s| {
        s.attachment_max_file_size as f64
    }),
    ("attachment_temp_cleanup_hours", Bound::AtLeast(1.0), |s| {
        s.attachment_temp_cleanup_hours as f64
    }),
    ("crm_timeout", Bound::AtLeast(1.0), |s| s.crm_timeout as f64),
    ("crm_max_retries", Bound::AtLeast(0.0), |s| {
        s.crm_max_retries as f64
    }),
];

/// What a tool setting holds, for reading it from the environment and explaining a bad value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SettingKind {
    Flag,
    Integer,
    Number,
    /// Text with its expected form.
    Text(&'static str),
    /// An API key or a reference to one: an error never repeats what was given.
    Secret,
}

const API_KEY_FORMS: &str = "must be a string: the key itself (development only), env://VAR, file:///path or secretsmanager://aws/NAME";

const SETTINGS: [(&str, SettingKind); 30] = [
    ("enable_rag_tool", SettingKind::Flag),
    ("enable_memory_tool", SettingKind::Flag),
    ("enable_escalation_tool", SettingKind::Flag),
    ("enable_attachment_tool", SettingKind::Flag),
    ("enable_crm_tool", SettingKind::Flag),
    ("enable_billing_tool", SettingKind::Flag),
    ("enable_inventory_tool", SettingKind::Flag),
    ("rag_chunk_size", SettingKind::Integer),
    ("rag_chunk_overlap", SettingKind::Integer),
    ("rag_search_k", SettingKind::Integer),
    ("rag_similarity_threshold", SettingKind::Number),
    ("rag_cache_enabled", SettingKind::Flag),
    ("rag_cache_ttl", SettingKind::Integer),
    ("escalation_confidence_threshold", SettingKind::Number),
    (
        "escalation_keywords",
        SettingKind::Text(
            "must be a JSON object of keyword weights or keyword=weight pairs separated by commas",
        ),
    ),
    ("escalation_notification_enabled", SettingKind::Flag),
    (
        "escalation_notification_email",
        SettingKind::Text("must be a string"),
    ),
    (
        "escalation_notification_webhook",
        SettingKind::Text("must be a string"),
    ),
    ("attachment_max_file_size", SettingKind::Integer),
    (
        "attachment_allowed_extensions",
        SettingKind::Text("must be a JSON list of strings or a list separated by commas"),
    ),
    ("attachment_chunk_for_rag", SettingKind::Flag),
    ("attachment_temp_cleanup_hours", SettingKind::Integer),
    ("crm_api_endpoint", SettingKind::Text("must be a string")),
    ("crm_api_key", SettingKind::Secret),
    ("crm_timeout", SettingKind::Integer),
    ("crm_max_retries", SettingKind::Integer),
    (
        "billing_api_endpoint",
        SettingKind::Text("must be a string"),
    ),
    ("billing_api_key", SettingKind::Secret),
    (
        "inventory_api_endpoint",
        SettingKind::Text("must be a string"),
    ),
    ("inventory_api_key", SettingKind::Secret),
];

impl ToolSettings {
    /// Every tool setting's key path and how its environment variable is read.
    pub fn env_settings() -> impl Iterator<Item = (String, EnvKind)> {
        SETTINGS.iter().map(|(key, kind)| {
            let env_kind = match kind {
                SettingKind::Flag => EnvKind::Flag,
                SettingKind::Integer => EnvKind::Integer,
                SettingKind::Number => EnvKind::Number,
                SettingKind::Text(_) | SettingKind::Secret => EnvKind::Text,
            };
            (format!("{TOOLS_TABLE}.{key}"), env_kind)
        })
    }

    /// Explains a value of the setting at `key_path` that did not parse, given the parser's
    /// `problem`; `None` when the key is not a tool setting. A secret's problem is left out
    /// unless it is our own message: the parser's would quote the value.
    pub fn explain(key_path: &str, problem: &figment::error::Kind) -> Option<String> {
        let key = key_path.strip_prefix(TOOLS_TABLE)?.strip_prefix('.')?;
        let (_, kind) = SETTINGS.iter().find(|(name, _)| *name == key)?;
        let bound = BOUNDED
            .iter()
            .find(|(name, _, _)| *name == key)
            .map(|(_, bound, _)| *bound);
        let expected = match (kind, bound) {
            (SettingKind::Flag, _) => "must be true or false (also 1/0, yes/no, on/off)".to_owned(),
            (SettingKind::Integer, Some(bound)) => format!("must be an integer {bound}"),
            (SettingKind::Integer, None) => "must be an integer".to_owned(),
            (SettingKind::Number, Some(bound)) => format!("must be a number {bound}"),
            (SettingKind::Number, None) => "must be a number".to_owned(),
            (SettingKind::Text(expected), _) => (*expected).to_owned(),
            (SettingKind::Secret, _) => {
                return Some(match problem {
                    figment::error::Kind::Message(message) => message.clone(),
                    _ => API_KEY_FORMS.to_owned(),
                });
            }
        };
        Some(format!("{problem}; {expected}"))
    }

    /// The reference design's bounds, and its production rule: no literal API keys.
    pub fn validate(&self, production: bool) -> Result<(), String> {
        for (key, bound, value) in BOUNDED {
            let value = value(self);
            if !bound.contains(value) {
                return Err(format!(
                    "invalid setting {TOOLS_TABLE}.{key} ({}): {value} is out of range, must be {bound}",
                    key.to_ascii_uppercase()
                ));
            }
        }
        if production {
            for (key, reference) in self.api_keys() {
                if matches!(reference, Some(SecretReference::Literal(_))) {
                    return Err(format!(
                        "invalid setting {TOOLS_TABLE}.{key} ({}): a literal API key is refused when ENVIRONMENT=production; use env://VAR, file:///path or secretsmanager://aws/NAME",
                        key.to_ascii_uppercase()
                    ));
                }
            }
        }
        Ok(())
    }

    /// The API key settings by key.
    pub fn api_keys(&self) -> [(&'static str, Option<&SecretReference>); 3] {
        [
            ("crm_api_key", self.crm_api_key.as_ref()),
            ("billing_api_key", self.billing_api_key.as_ref()),
            ("inventory_api_key", self.inventory_api_key.as_ref()),
        ]
    }
}

/// Weight of a keyword given without one, or with one that is not a number.
pub const DEFAULT_KEYWORD_WEIGHT: f64 = 0.8;

const DEFAULT_ESCALATION_KEYWORDS: [(&str, f64); 7] = [
    ("urgent", 1.0),
    ("emergency", 1.0),
    ("complaint", 0.9),
    ("legal", 0.9),
    ("lawsuit", 1.0),
    ("manager", 0.8),
    ("supervisor", 0.8),
];

const DEFAULT_ALLOWED_EXTENSIONS: [&str; 13] = [
    ".pdf", ".docx", ".doc", ".txt", ".md", ".csv", ".xlsx", ".xls", ".json", ".xml", ".jpg",
    ".jpeg", ".png",
];

/// Escalation keywords and their weights (`ESCALATION_KEYWORDS`).
#[derive(Debug, Clone, PartialEq)]
pub struct EscalationKeywords(pub BTreeMap<String, f64>);

impl Default for EscalationKeywords {
    fn default() -> Self {
        Self(
            DEFAULT_ESCALATION_KEYWORDS
                .iter()
                .map(|(keyword, weight)| ((*keyword).to_owned(), *weight))
                .collect(),
        )
    }
}

/// The reference design's rules for keywords given as text: a JSON object when the text
/// starts with `{` and parses; otherwise `keyword=weight` pairs separated by commas, where a
/// missing or unparsable weight is 0.8. Empty items are skipped (the reference design would
/// make a keyword `""` of them, which matches every message), and no keywords at all means
/// the defaults. Keywords and weights are trimmed; a non-finite weight counts as unparsable.
pub fn parse_escalation_keywords(text: &str) -> Result<EscalationKeywords, String> {
    if text.starts_with('{')
        && let Ok(object) = serde_json::from_str::<serde_json::Map<String, serde_json::Value>>(text)
    {
        return object
            .into_iter()
            .map(|(keyword, weight)| match json_weight(&weight) {
                Some(weight) => Ok((keyword, weight)),
                None => Err(format!("the weight of keyword {keyword:?} is not a number")),
            })
            .collect::<Result<_, _>>()
            .map(EscalationKeywords);
    }
    let keywords: BTreeMap<String, f64> = text
        .split(',')
        .filter_map(|item| {
            let (keyword, weight) = match item.split_once('=') {
                Some((keyword, weight)) => (keyword.trim(), text_weight(weight)),
                None => (item.trim(), None),
            };
            (!keyword.is_empty())
                .then(|| (keyword.to_owned(), weight.unwrap_or(DEFAULT_KEYWORD_WEIGHT)))
        })
        .collect();
    if keywords.is_empty() {
        return Ok(EscalationKeywords::default());
    }
    Ok(EscalationKeywords(keywords))
}

fn text_weight(text: &str) -> Option<f64> {
    text.trim()
        .parse::<f64>()
        .ok()
        .filter(|weight| weight.is_finite())
}

/// A JSON weight: a number, or text holding one (pydantic's lax float).
fn json_weight(value: &serde_json::Value) -> Option<f64> {
    match value {
        serde_json::Value::Number(number) => number.as_f64(),
        serde_json::Value::String(text) => text_weight(text),
        _ => None,
    }
}

impl<'de> Deserialize<'de> for EscalationKeywords {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct KeywordsVisitor;
        impl<'de> Visitor<'de> for KeywordsVisitor {
            type Value = EscalationKeywords;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a table of keyword weights or text")
            }

            fn visit_str<E: de::Error>(self, text: &str) -> Result<Self::Value, E> {
                parse_escalation_keywords(text).map_err(E::custom)
            }

            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                let mut keywords = BTreeMap::new();
                while let Some((keyword, weight)) = map.next_entry::<String, f64>()? {
                    if !weight.is_finite() {
                        return Err(de::Error::custom(format!(
                            "the weight of keyword {keyword:?} is not a finite number"
                        )));
                    }
                    keywords.insert(keyword, weight);
                }
                Ok(EscalationKeywords(keywords))
            }
        }
        deserializer.deserialize_any(KeywordsVisitor)
    }
}

/// File extensions attachments may have (`ATTACHMENT_ALLOWED_EXTENSIONS`).
#[derive(Debug, Clone, PartialEq)]
pub struct AllowedExtensions(pub Vec<String>);

impl Default for AllowedExtensions {
    fn default() -> Self {
        Self(
            DEFAULT_ALLOWED_EXTENSIONS
                .iter()
                .map(|extension| (*extension).to_owned())
                .collect(),
        )
    }
}

/// The reference design's rules for extensions given as text: a JSON list of strings when the
/// text starts with `[` and parses; otherwise a list separated by commas, items trimmed and
/// empty ones dropped (so empty text allows no extension, as in the reference design).
pub fn parse_allowed_extensions(text: &str) -> Result<AllowedExtensions, String> {
    if text.starts_with('[')
        && let Ok(items) = serde_json::from_str::<Vec<serde_json::Value>>(text)
    {
        return items
            .into_iter()
            .map(|item| match item {
                serde_json::Value::String(extension) => Ok(extension),
                _ => Err("every extension must be a string".to_owned()),
            })
            .collect::<Result<_, _>>()
            .map(AllowedExtensions);
    }
    Ok(AllowedExtensions(
        text.split(',')
            .map(str::trim)
            .filter(|extension| !extension.is_empty())
            .map(str::to_owned)
            .collect(),
    ))
}

impl<'de> Deserialize<'de> for AllowedExtensions {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct ExtensionsVisitor;
        impl<'de> Visitor<'de> for ExtensionsVisitor {
            type Value = AllowedExtensions;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a list of extensions or text")
            }

            fn visit_str<E: de::Error>(self, text: &str) -> Result<Self::Value, E> {
                parse_allowed_extensions(text).map_err(E::custom)
            }

            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
                let mut extensions = Vec::new();
                while let Some(extension) = seq.next_element::<String>()? {
                    extensions.push(extension);
                }
                Ok(AllowedExtensions(extensions))
            }
        }
        deserializer.deserialize_any(ExtensionsVisitor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keywords(pairs: &[(&str, f64)]) -> EscalationKeywords {
        EscalationKeywords(
            pairs
                .iter()
                .map(|(keyword, weight)| ((*keyword).to_owned(), *weight))
                .collect(),
        )
    }

    #[test]
    fn keywords_follow_the_reference_design() {
        assert_eq!(
            parse_escalation_keywords(r#"{"refund": 0.6, "fraud": 1}"#).unwrap(),
            keywords(&[("refund", 0.6), ("fraud", 1.0)])
        );
        assert_eq!(
            parse_escalation_keywords("refund=0.6, fraud ,angry=loud").unwrap(),
            keywords(&[("refund", 0.6), ("fraud", 0.8), ("angry", 0.8)])
        );
        // Text starting with `{` that is not JSON falls back to pairs, as in the reference.
        assert_eq!(
            parse_escalation_keywords("{refund=0.5").unwrap(),
            keywords(&[("{refund", 0.5)])
        );
        assert_eq!(
            parse_escalation_keywords("").unwrap(),
            EscalationKeywords::default()
        );
        assert_eq!(
            parse_escalation_keywords(" , ,").unwrap(),
            EscalationKeywords::default()
        );
        assert_eq!(
            parse_escalation_keywords("a=inf,b=NaN").unwrap(),
            keywords(&[("a", 0.8), ("b", 0.8)])
        );
        assert!(
            parse_escalation_keywords(r#"{"refund": "lots"}"#)
                .unwrap_err()
                .contains("refund")
        );
        assert_eq!(EscalationKeywords::default().0.len(), 7);
    }

    #[test]
    fn extensions_follow_the_reference_design() {
        assert_eq!(
            parse_allowed_extensions(r#"[".pdf", ".png"]"#).unwrap().0,
            vec![".pdf", ".png"]
        );
        assert_eq!(
            parse_allowed_extensions(" .pdf, .png ,,").unwrap().0,
            vec![".pdf", ".png"]
        );
        assert_eq!(parse_allowed_extensions("[.pdf").unwrap().0, vec!["[.pdf"]);
        assert!(parse_allowed_extensions("").unwrap().0.is_empty());
        assert!(parse_allowed_extensions("[1, 2]").is_err());
        assert_eq!(AllowedExtensions::default().0.len(), 13);
    }

    #[test]
    fn every_number_setting_is_bounded() {
        for (key, kind) in SETTINGS {
            let bounded = BOUNDED.iter().any(|(name, _, _)| *name == key);
            let numeric = matches!(kind, SettingKind::Integer | SettingKind::Number);
            assert_eq!(bounded, numeric, "{key}");
        }
    }

    #[test]
    fn defaults_are_within_bounds_and_out_of_range_names_the_variable() {
        ToolSettings::default().validate(true).unwrap();
        let settings = ToolSettings {
            rag_chunk_size: 99,
            ..ToolSettings::default()
        };
        assert_eq!(
            settings.validate(false).unwrap_err(),
            "invalid setting tools.rag_chunk_size (RAG_CHUNK_SIZE): 99 is out of range, must be between 100 and 2000"
        );
        let settings = ToolSettings {
            rag_similarity_threshold: f64::NAN,
            ..ToolSettings::default()
        };
        assert!(
            settings
                .validate(false)
                .unwrap_err()
                .contains("RAG_SIMILARITY_THRESHOLD")
        );
    }
}
