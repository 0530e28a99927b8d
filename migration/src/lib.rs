//! Engram's schema migrations, applied in order by [`Migrator`].
//!
//! Each migration describes the schema with its own `DeriveIden` enums rather
//! than the entity models: models follow the current code, a migration must
//! keep producing the schema of its own day.
//!
//! Run them with [`migrate_up`] and [`migrate_down`] rather than the bare
//! [`Migrator`]: those take the PostgreSQL migration lock and adopt databases
//! written by the Python system.

pub use sea_orm_migration::prelude::*;
use sea_orm_migration::sea_orm::DatabaseConnection;

mod adoption;
mod lock;
mod m20240101_000001_initial_schema;
mod m20240115_000002_add_content_hashing;
mod m20261124_000003_request_log;
mod m20261124_000004_tenancy;
mod m20261124_000005_lean_indexes;
mod sqlite_rebuild;

pub use adoption::ALEMBIC_REVISIONS;
pub use lock::MIGRATION_LOCK_NAME;
pub use m20261124_000004_tenancy::DEFAULT_TENANT;

use adoption::Bookkeeping;
use lock::MigrationLock;

pub struct Migrator;

#[async_trait::async_trait]
impl MigratorTrait for Migrator {
    fn migrations() -> Vec<Box<dyn MigrationTrait>> {
        vec![
            Box::new(m20240101_000001_initial_schema::Migration),
            Box::new(m20240115_000002_add_content_hashing::Migration),
            Box::new(m20261124_000003_request_log::Migration),
            Box::new(m20261124_000004_tenancy::Migration),
            Box::new(m20261124_000005_lean_indexes::Migration),
        ]
    }
}

/// Applies every pending migration, one process at a time (PostgreSQL
/// advisory lock). A database of the Python system (Alembic at
/// `001_initial_schema` or `002_add_content_hashing`) is adopted first: the
/// migrations it already has are recorded as applied. A database Engram
/// cannot place is refused untouched.
pub async fn migrate_up(db: &DatabaseConnection) -> Result<(), DbErr> {
    let lock = MigrationLock::acquire(db).await?;
    let outcome = async {
        if let Bookkeeping::Alembic { revision, applied } = adoption::inspect(db).await? {
            adoption::adopt(db, &revision, applied).await?;
        }
        Migrator::up(db, None).await
    }
    .await;
    lock.release(outcome).await
}

/// Reverts the last applied migration under the same lock. A database not
/// yet adopted is refused: it has no Engram migration to revert.
pub async fn migrate_down(db: &DatabaseConnection) -> Result<(), DbErr> {
    let lock = MigrationLock::acquire(db).await?;
    let outcome = async {
        if let Bookkeeping::Alembic { revision, .. } = adoption::inspect(db).await? {
            return Err(DbErr::Migration(format!(
                "refusing to downgrade: this database is still at the python system's alembic \
                 revision {revision:?}; nothing was changed"
            )));
        }
        Migrator::down(db, Some(1)).await
    }
    .await;
    lock.release(outcome).await
}
