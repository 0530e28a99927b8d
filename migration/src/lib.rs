//! Engram's schema migrations, applied in order by [`Migrator`].
//!
//! Each migration describes the schema with its own `DeriveIden` enums rather
//! than the entity models: models follow the current code, a migration must
//! keep producing the schema of its own day.

pub use sea_orm_migration::prelude::*;

mod m20240101_000001_initial_schema;
mod m20240115_000002_add_content_hashing;
mod m20261124_000003_request_log;

pub struct Migrator;

#[async_trait::async_trait]
impl MigratorTrait for Migrator {
    fn migrations() -> Vec<Box<dyn MigrationTrait>> {
        vec![
            Box::new(m20240101_000001_initial_schema::Migration),
            Box::new(m20240115_000002_add_content_hashing::Migration),
            Box::new(m20261124_000003_request_log::Migration),
        ]
    }
}
