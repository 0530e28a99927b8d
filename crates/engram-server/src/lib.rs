//! Engram's gRPC server: settings, storage, the MemoryService and the process around them.

pub mod access;
pub mod auth;
mod batched_log;
pub mod convert;
pub mod error;
pub mod group_commit;
pub mod live_sets;
pub mod readiness;
pub mod secrets;
pub mod server;
pub mod service;
pub mod session_cache;
pub mod settings;
mod sqlite_writer;
pub mod store;
pub mod sweeper;
pub mod telemetry;
pub mod toolconfig;
pub mod write_behind;
