//! Rejected input, described field by field so clients can point at what to fix.

/// One bad field: `field` is the request path (e.g. `memory.content`), `description` says why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldViolation {
    pub field: String,
    pub description: String,
}

impl FieldViolation {
    pub fn new(field: impl Into<String>, description: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            description: description.into(),
        }
    }

    /// The same violation, reported under a parent path (e.g. `requests[3].` + `memory.content`).
    pub fn under(self, prefix: &str) -> Self {
        Self {
            field: format!("{prefix}{}", self.field),
            description: self.description,
        }
    }
}

impl std::fmt::Display for FieldViolation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.field, self.description)
    }
}

/// Collects every violation of a request instead of stopping at the first.
#[derive(Debug, Default)]
pub struct Violations(Vec<FieldViolation>);

impl Violations {
    /// Keeps the value, or records the violation and gives `None`.
    pub fn check<T>(&mut self, result: Result<T, FieldViolation>) -> Option<T> {
        match result {
            Ok(value) => Some(value),
            Err(violation) => {
                self.0.push(violation);
                None
            }
        }
    }

    /// Keeps the value, or records all its violations and gives `None`.
    pub fn check_all<T>(&mut self, result: Result<T, Vec<FieldViolation>>) -> Option<T> {
        match result {
            Ok(value) => Some(value),
            Err(violations) => {
                self.0.extend(violations);
                None
            }
        }
    }

    pub fn push(&mut self, violation: FieldViolation) {
        self.0.push(violation);
    }

    /// `Ok(())` when nothing was recorded.
    pub fn into_result(self) -> Result<(), Vec<FieldViolation>> {
        if self.0.is_empty() {
            Ok(())
        } else {
            Err(self.0)
        }
    }
}
