//! Environment variables under the reference design's names (`MEMORY_TTL_HOURS`,
//! `RAG_CHUNK_SIZE`, `ESCALATION_KEYWORDS`, ...), read the way its pydantic-settings reads
//! them, so an existing deployment's environment keeps working.
//!
//! figment's own `Env` provider guesses types from the text: it would turn `{...}`, `[...]`
//! and `a=1` values into dicts and arrays, and `0.3` into an `f32`. Here every variable is
//! read raw and converted by the kind of its setting instead.

use figment::value::{Dict, Map, Value};
use figment::{Error, Metadata, Profile, Provider};

/// How a setting's text is turned into a value, as pydantic's lax mode does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EnvKind {
    /// `true/false`, `1/0`, `yes/no`, `on/off`, `t/f`, `y/n`, any case.
    Flag,
    /// A whole number, surrounding whitespace ignored.
    Integer,
    /// A decimal number, surrounding whitespace ignored.
    Number,
    /// The text exactly as given; the setting's own type parses it.
    Text,
}

impl EnvKind {
    /// Text that does not parse stays text, so the error names the setting and its value.
    fn value(self, raw: String) -> Value {
        let trimmed = raw.trim();
        let parsed = match self {
            EnvKind::Flag => pydantic_bool(trimmed).map(Value::from),
            EnvKind::Integer => (trimmed.parse::<i64>().map(Value::from).ok())
                .or_else(|| trimmed.parse::<u64>().map(Value::from).ok()),
            EnvKind::Number => trimmed.parse::<f64>().map(Value::from).ok(),
            EnvKind::Text => None,
        };
        parsed.unwrap_or_else(|| Value::from(raw))
    }
}

/// pydantic's accepted spellings of a boolean.
fn pydantic_bool(text: &str) -> Option<bool> {
    match text.to_ascii_lowercase().as_str() {
        "1" | "on" | "t" | "true" | "y" | "yes" => Some(true),
        "0" | "off" | "f" | "false" | "n" | "no" => Some(false),
        _ => None,
    }
}

/// A setting read from the environment: its key path in the settings (`tools.rag_chunk_size`)
/// and its kind. The variable is the last key segment in upper case, matched in any case
/// (pydantic-settings is case-insensitive).
#[derive(Debug, Clone)]
pub struct SeedEnv {
    settings: Vec<(String, EnvKind)>,
}

impl SeedEnv {
    pub fn new(settings: impl IntoIterator<Item = (String, EnvKind)>) -> Self {
        Self {
            settings: settings.into_iter().collect(),
        }
    }

    /// The environment variable of a key path.
    pub fn variable(key_path: &str) -> String {
        key_path
            .rsplit_once('.')
            .map_or(key_path, |(_, key)| key)
            .to_ascii_uppercase()
    }
}

impl Provider for SeedEnv {
    fn metadata(&self) -> Metadata {
        Metadata::named("environment variable")
            .interpolater(|_: &Profile, keys: &[&str]| SeedEnv::variable(&keys.join(".")))
    }

    fn data(&self) -> Result<Map<Profile, Dict>, Error> {
        let mut dict = Dict::new();
        for (name, raw) in std::env::vars_os() {
            let name = name.to_string_lossy();
            let Some((key_path, kind)) = self
                .settings
                .iter()
                .find(|(key_path, _)| Self::variable(key_path).eq_ignore_ascii_case(&name))
            else {
                continue;
            };
            let value = kind.value(raw.to_string_lossy().into_owned());
            insert(&mut dict, key_path, value);
        }
        Ok(Profile::Default.collect(dict))
    }
}

/// Inserts `value` at a dotted key path, creating the tables on the way.
fn insert(dict: &mut Dict, key_path: &str, value: Value) {
    match key_path.split_once('.') {
        None => {
            dict.insert(key_path.to_owned(), value);
        }
        Some((table, rest)) => {
            let entry = dict
                .entry(table.to_owned())
                .or_insert_with(|| Value::from(Dict::new()));
            if let Value::Dict(_, inner) = entry {
                insert(inner, rest, value);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_accept_what_pydantic_accepts() {
        for text in ["true", "TRUE", "1", "yes", "Yes", "on", "t", "y", " true "] {
            assert_eq!(
                EnvKind::Flag.value(text.to_owned()).to_bool(),
                Some(true),
                "{text}"
            );
        }
        for text in ["false", "False", "0", "no", "off", "f", "n"] {
            assert_eq!(
                EnvKind::Flag.value(text.to_owned()).to_bool(),
                Some(false),
                "{text}"
            );
        }
        assert_eq!(
            EnvKind::Flag.value("maybe".to_owned()).as_str(),
            Some("maybe")
        );
    }

    #[test]
    fn numbers_keep_full_precision_and_text_stays_raw() {
        assert_eq!(EnvKind::Number.value("0.3".to_owned()).to_f64(), Some(0.3));
        assert_eq!(
            EnvKind::Integer.value(" 500 ".to_owned()).to_i128(),
            Some(500)
        );
        assert_eq!(EnvKind::Integer.value("-5".to_owned()).to_i128(), Some(-5));
        assert_eq!(
            EnvKind::Integer.value("5.5".to_owned()).as_str(),
            Some("5.5")
        );
        assert_eq!(
            EnvKind::Text.value("{\"a\": 1}".to_owned()).as_str(),
            Some("{\"a\": 1}")
        );
        assert_eq!(SeedEnv::variable("tools.rag_chunk_size"), "RAG_CHUNK_SIZE");
    }

    #[test]
    fn nested_key_paths_make_tables() {
        let mut dict = Dict::new();
        insert(&mut dict, "tools.rag_chunk_size", Value::from(800));
        insert(&mut dict, "tools.rag_search_k", Value::from(7));
        insert(&mut dict, "memory_ttl_hours", Value::from(48));
        let tools = dict["tools"].as_dict().unwrap();
        assert_eq!(tools.len(), 2);
        assert_eq!(dict["memory_ttl_hours"].to_i128(), Some(48));
    }
}
