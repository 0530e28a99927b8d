//! Engram's memory model: the sea-orm entities and the pure rules that decide what is
//! stored, how it is hashed, ranked, expired and paged. No I/O lives here.

pub mod entity;
pub mod error;
pub mod etag;
pub mod expiry;
pub mod filter;
pub mod limits;
pub mod memory;
pub mod names;
pub mod paging;
pub mod ranking;
pub mod sanitize;
pub mod text;
pub mod validate;
