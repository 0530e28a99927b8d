//! Everything a ToolConfigService call can fail with, and its one mapping to a gRPC status
//! (AIP-193: canonical code, ErrorInfo always, BadRequest for bad input).

use std::collections::HashMap;

use engram_domain::error::FieldViolation;
use tonic::{Code, Status};

#[derive(Debug, thiserror::Error)]
pub enum ToolConfigError {
    #[error("invalid request")]
    InvalidArgument(Vec<FieldViolation>),
    #[error("tool {name} not found")]
    NotFound { name: String },
}

impl From<ToolConfigError> for Status {
    fn from(error: ToolConfigError) -> Status {
        let message = error.to_string();
        let (code, reason, metadata, violations) = match error {
            ToolConfigError::InvalidArgument(violations) => (
                Code::InvalidArgument,
                "INVALID_ARGUMENT",
                HashMap::new(),
                violations,
            ),
            ToolConfigError::NotFound { name } => (
                Code::NotFound,
                "TOOL_NOT_FOUND",
                crate::error::resource(name),
                Vec::new(),
            ),
        };
        crate::error::status(code, message, reason, metadata, violations)
    }
}
