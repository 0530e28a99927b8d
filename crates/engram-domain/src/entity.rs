//! sea-orm entities. The schema itself is owned by the `migration` crate.

pub mod audit_event;
pub mod memory;
pub mod memory_request;
