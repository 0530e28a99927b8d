//! Everything a ToolConfigService call can fail with, and its one mapping to a gRPC status
//! (AIP-193: canonical code, ErrorInfo always, BadRequest for bad input).

use std::collections::HashMap;

use engram_domain::error::FieldViolation;
use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};

use crate::error::ERROR_DOMAIN;

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
                HashMap::from([("resource".to_owned(), name)]),
                Vec::new(),
            ),
        };
        let fields: Vec<&str> = violations.iter().map(|v| v.field.as_str()).collect();
        let message = if fields.is_empty() {
            message
        } else {
            format!("{message}: {}", fields.join(", "))
        };
        let mut details = ErrorDetails::with_error_info(reason, ERROR_DOMAIN, metadata);
        if !violations.is_empty() {
            details.set_bad_request(
                violations
                    .into_iter()
                    .map(|v| tonic_types::FieldViolation::new(v.field, v.description))
                    .collect::<Vec<_>>(),
            );
        }
        Status::with_error_details(code, message, details)
    }
}
