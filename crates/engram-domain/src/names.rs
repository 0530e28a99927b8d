//! Resource names: `sessions/{session_id}` and `sessions/{session_id}/memories/{memory_id}`.

use crate::error::FieldViolation;
use crate::limits::SESSION_ID_MAX_LEN;

/// A session id that passed validation (safe in names, logs and SQL parameters).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct SessionId(String);

impl SessionId {
    pub fn parse(id: &str) -> Result<Self, String> {
        let mut chars = id.chars();
        let starts_well = chars.next().is_some_and(|c| c.is_ascii_alphanumeric());
        if id.is_empty() || id.len() > SESSION_ID_MAX_LEN {
            return Err(format!(
                "session id must be 1 to {SESSION_ID_MAX_LEN} characters"
            ));
        }
        if !starts_well || !chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-') {
            return Err(
                "session id may hold only ASCII letters, digits, '_' and '-', starting with a letter or digit"
                    .to_owned(),
            );
        }
        Ok(Self(id.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    pub fn name(&self) -> String {
        format!("sessions/{}", self.0)
    }
}

/// Which sessions a request addresses: one, or every session (`sessions/-`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SessionScope {
    One(SessionId),
    All,
}

impl SessionScope {
    /// The parent as a request names it.
    pub fn name(&self) -> String {
        match self {
            Self::One(session) => session.name(),
            Self::All => "sessions/-".to_owned(),
        }
    }
}

/// A memory's full name, split and validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemoryName {
    pub session_id: SessionId,
    pub memory_id: String,
}

impl MemoryName {
    pub fn new(session_id: SessionId, memory_id: String) -> Self {
        Self {
            session_id,
            memory_id,
        }
    }

    pub fn format(session_id: &str, memory_id: &str) -> String {
        format!("sessions/{session_id}/memories/{memory_id}")
    }
}

impl std::fmt::Display for MemoryName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&Self::format(self.session_id.as_str(), &self.memory_id))
    }
}

/// Parses `sessions/{session_id}`, reporting problems against `field`.
pub fn parse_session_name(field: &str, name: &str) -> Result<SessionId, FieldViolation> {
    let id = name
        .strip_prefix("sessions/")
        .ok_or_else(|| FieldViolation::new(field, "must have the form sessions/{session_id}"))?;
    SessionId::parse(id).map_err(|why| FieldViolation::new(field, why))
}

/// Parses `sessions/{session_id}` or `sessions/-` (every session).
pub fn parse_session_scope(field: &str, name: &str) -> Result<SessionScope, FieldViolation> {
    if name == "sessions/-" {
        return Ok(SessionScope::All);
    }
    parse_session_name(field, name).map(SessionScope::One)
}

/// Parses `sessions/{session_id}/memories/{memory_id}`; memory ids are UUIDs.
pub fn parse_memory_name(field: &str, name: &str) -> Result<MemoryName, FieldViolation> {
    let shape = || {
        FieldViolation::new(
            field,
            "must have the form sessions/{session_id}/memories/{memory_id}",
        )
    };
    let rest = name.strip_prefix("sessions/").ok_or_else(shape)?;
    let (session, memory_id) = rest.split_once("/memories/").ok_or_else(shape)?;
    let session_id = SessionId::parse(session).map_err(|why| FieldViolation::new(field, why))?;
    if uuid::Uuid::try_parse(memory_id).is_err() || memory_id.len() != 36 {
        return Err(FieldViolation::new(field, "memory id must be a UUID"));
    }
    Ok(MemoryName::new(session_id, memory_id.to_ascii_lowercase()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_ordinary_names() {
        let session = parse_session_name("parent", "sessions/user-123_a").unwrap();
        assert_eq!(session.as_str(), "user-123_a");
        let name = parse_memory_name(
            "name",
            "sessions/s1/memories/0A1B2C3D-0000-4000-8000-000000000000",
        )
        .unwrap();
        assert_eq!(
            name.to_string(),
            "sessions/s1/memories/0a1b2c3d-0000-4000-8000-000000000000"
        );
    }

    #[test]
    fn rejects_the_seed_injection_and_traversal_payloads() {
        for payload in [
            "user'; DROP TABLE memories;--",
            "1' OR '1'='1",
            "admin'--",
            "' UNION SELECT * FROM users--",
            "../../../etc/passwd",
            "..\\..\\..\\windows\\system32",
            "~/../../etc/shadow",
            "",
            "-",
            "a b",
            "ünïcode",
        ] {
            let violation =
                parse_session_name("parent", &format!("sessions/{payload}")).unwrap_err();
            assert_eq!(violation.field, "parent", "{payload}");
        }
        assert!(SessionId::parse(&"a".repeat(256)).is_err());
        assert!(SessionId::parse(&"a".repeat(255)).is_ok());
    }

    #[test]
    fn rejects_malformed_memory_names() {
        for name in [
            "sessions/s1/memories/not-a-uuid",
            "sessions/s1/memories/",
            "sessions/s1",
            "memories/0a1b2c3d-0000-4000-8000-000000000000",
            "sessions/s1/memories/0a1b2c3d000040008000000000000000",
            "sessions/../memories/0a1b2c3d-0000-4000-8000-000000000000",
        ] {
            assert!(parse_memory_name("name", name).is_err(), "{name}");
        }
    }

    #[test]
    fn wildcard_scope_only_where_asked() {
        assert_eq!(
            parse_session_scope("parent", "sessions/-").unwrap(),
            SessionScope::All
        );
        assert_eq!(SessionScope::All.name(), "sessions/-");
        assert!(parse_session_name("parent", "sessions/-").is_err());
    }
}
