//! Tool configuration: the reference design's per-tool feature flags and settings, and the
//! tools' API keys (literal in development, `env://`, `file://` or `secretsmanager://aws/`),
//! served read only by engram.toolconfig.v1.ToolConfigService.

mod catalog;
mod error;
pub mod secrets;
pub mod seed_env;
mod service;
pub mod settings;

pub use crate::secrets::SecretError;
pub use service::ToolConfigApi;
