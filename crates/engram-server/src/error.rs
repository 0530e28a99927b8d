//! Everything a MemoryService call can fail with, and its one mapping to a gRPC status
//! (AIP-193: canonical code, ErrorInfo always, BadRequest for bad input).

use std::collections::HashMap;

use engram_domain::error::FieldViolation;
use sea_orm::DbErr;
use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};

/// The ErrorInfo domain of every Engram error.
pub const ERROR_DOMAIN: &str = "engram.dev";

#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    #[error("invalid request")]
    InvalidArgument(Vec<FieldViolation>),
    #[error("memory {name} not found")]
    NotFound { name: String },
    #[error("memory {name} is not deleted")]
    NotDeleted { name: String },
    #[error("memory {name} is deleted; undelete it first")]
    Deleted { name: String },
    #[error("another memory of the session already has this content: {existing}")]
    ContentConflict { existing: String },
    #[error("etag does not match the current memory; read it again")]
    EtagMismatch { name: String },
    #[error("request_id was already used for a different request")]
    RequestIdReused,
    #[error("database unavailable")]
    Unavailable(#[source] DbErr),
    #[error("internal error")]
    Internal(#[source] DbErr),
}

impl MemoryError {
    pub fn invalid(field: impl Into<String>, description: impl Into<String>) -> Self {
        MemoryError::InvalidArgument(vec![FieldViolation::new(field, description)])
    }
}

impl From<FieldViolation> for MemoryError {
    fn from(violation: FieldViolation) -> Self {
        MemoryError::InvalidArgument(vec![violation])
    }
}

impl From<DbErr> for MemoryError {
    fn from(error: DbErr) -> Self {
        if is_unavailable(&error) {
            MemoryError::Unavailable(error)
        } else {
            MemoryError::Internal(error)
        }
    }
}

/// Errors a retry can cure: the database is down, restarting, overloaded or busy.
pub fn is_unavailable(error: &DbErr) -> bool {
    use sea_orm::RuntimeErr;
    use sea_orm::sqlx::Error as Sqlx;
    let sqlx = match error {
        DbErr::ConnectionAcquire(_) | DbErr::Conn(_) => return true,
        DbErr::Exec(RuntimeErr::SqlxError(sqlx)) | DbErr::Query(RuntimeErr::SqlxError(sqlx)) => {
            sqlx
        }
        _ => return false,
    };
    match sqlx.as_ref() {
        Sqlx::Io(_)
        | Sqlx::Tls(_)
        | Sqlx::Protocol(_)
        | Sqlx::PoolTimedOut
        | Sqlx::PoolClosed
        | Sqlx::WorkerCrashed => true,
        Sqlx::Database(database) => database.code().is_some_and(|code| {
            // PostgreSQL: connection exceptions (08), shutdown and restart (57P), no resources
            // (53). SQLite: SQLITE_BUSY (5) and SQLITE_LOCKED (6), with extended codes.
            code.starts_with("08")
                || code.starts_with("57P")
                || code.starts_with("53")
                || sqlite_busy(&code)
        }),
        _ => false,
    }
}

fn sqlite_busy(code: &str) -> bool {
    code.parse::<u32>()
        .is_ok_and(|code| matches!(code & 0xff, 5 | 6))
}

impl From<MemoryError> for Status {
    fn from(error: MemoryError) -> Status {
        let message = error.to_string();
        let (code, reason, metadata, violations) = match error {
            MemoryError::InvalidArgument(violations) => (
                Code::InvalidArgument,
                "INVALID_ARGUMENT",
                HashMap::new(),
                violations,
            ),
            MemoryError::NotFound { name } => {
                (Code::NotFound, "MEMORY_NOT_FOUND", resource(name), vec![])
            }
            MemoryError::NotDeleted { name } => (
                Code::AlreadyExists,
                "MEMORY_NOT_DELETED",
                resource(name),
                vec![],
            ),
            MemoryError::Deleted { name } => (
                Code::FailedPrecondition,
                "MEMORY_DELETED",
                resource(name),
                vec![],
            ),
            MemoryError::ContentConflict { existing } => (
                Code::AlreadyExists,
                "MEMORY_CONTENT_EXISTS",
                resource(existing),
                vec![],
            ),
            MemoryError::EtagMismatch { name } => {
                (Code::Aborted, "ETAG_MISMATCH", resource(name), vec![])
            }
            MemoryError::RequestIdReused => (
                Code::InvalidArgument,
                "REQUEST_ID_REUSED",
                HashMap::new(),
                vec![FieldViolation::new(
                    "request_id",
                    "was already used for a different request",
                )],
            ),
            MemoryError::Unavailable(source) => {
                tracing::warn!(error = %source, "database unavailable");
                (
                    Code::Unavailable,
                    "DATABASE_UNAVAILABLE",
                    HashMap::new(),
                    vec![],
                )
            }
            MemoryError::Internal(source) => {
                // The database's text stays in the log; clients get no SQL.
                tracing::error!(error = %source, "database error");
                (Code::Internal, "INTERNAL", HashMap::new(), vec![])
            }
        };
        status(code, message, reason, metadata, violations)
    }
}

/// The one shape of every Engram error (AIP-193): the canonical code, a message that names the
/// bad fields (never their values), ErrorInfo with the reason, and BadRequest for bad fields.
pub fn status(
    code: Code,
    message: String,
    reason: &str,
    metadata: HashMap<String, String>,
    violations: Vec<FieldViolation>,
) -> Status {
    let message = match violations.as_slice() {
        [] => message,
        all => format!(
            "{message}: {}",
            all.iter()
                .map(|v| v.field.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        ),
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

/// ErrorInfo metadata naming the resource an error is about.
pub fn resource(name: String) -> HashMap<String, String> {
    HashMap::from([("resource".to_owned(), name)])
}
