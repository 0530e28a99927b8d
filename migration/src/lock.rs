//! One migration run at a time per PostgreSQL database. sea-orm-migration
//! takes no lock, so two replicas (or two `engram migrate` jobs) starting
//! together would both try to apply the same migration.
//!
//! The lock is a session-level advisory lock on a connection of its own,
//! outside the pool: it holds for the whole run whatever the pool size (the
//! `engram migrate` pool has one connection), and PostgreSQL releases it by
//! itself when a killed process's connection drops.

use sea_orm_migration::sea_orm::sqlx::postgres::PgConnection;
use sea_orm_migration::sea_orm::sqlx::{self, ConnectOptions, Connection};
use sea_orm_migration::sea_orm::{DatabaseConnection, DbBackend, DbErr};

/// Hashed by `hashtextextended` into the advisory lock key, as the store
/// names its per-session locks `engram/session/{id}`.
pub const MIGRATION_LOCK_NAME: &str = "engram/migrate";

/// Held from [`MigrationLock::acquire`] to [`MigrationLock::release`];
/// nothing to hold on SQLite.
pub(crate) struct MigrationLock {
    connection: Option<PgConnection>,
}

impl MigrationLock {
    /// Waits for any other migration run on the same database to finish.
    pub async fn acquire(db: &DatabaseConnection) -> Result<Self, DbErr> {
        if db.get_database_backend() != DbBackend::Postgres {
            return Ok(Self { connection: None });
        }
        let options = db.get_postgres_connection_pool().connect_options();
        let mut connection = options.connect().await.map_err(lock_error)?;
        let acquired: bool =
            sqlx::query_scalar("SELECT pg_try_advisory_lock(hashtextextended($1, 0))")
                .bind(MIGRATION_LOCK_NAME)
                .fetch_one(&mut connection)
                .await
                .map_err(lock_error)?;
        if !acquired {
            tracing::info!("another process is migrating this database; waiting for it to finish");
            sqlx::query("SELECT pg_advisory_lock(hashtextextended($1, 0))")
                .bind(MIGRATION_LOCK_NAME)
                .execute(&mut connection)
                .await
                .map_err(lock_error)?;
        }
        Ok(Self {
            connection: Some(connection),
        })
    }

    /// Releases the lock and passes on `outcome`, the result of the run it guarded.
    pub async fn release(self, outcome: Result<(), DbErr>) -> Result<(), DbErr> {
        let Some(mut connection) = self.connection else {
            return outcome;
        };
        let unlocked = sqlx::query("SELECT pg_advisory_unlock(hashtextextended($1, 0))")
            .bind(MIGRATION_LOCK_NAME)
            .execute(&mut connection)
            .await;
        // Closing the session releases the lock even if the unlock failed.
        let closed = connection.close().await;
        outcome?;
        unlocked.map_err(lock_error)?;
        closed.map_err(lock_error)
    }
}

fn lock_error(error: sqlx::Error) -> DbErr {
    DbErr::Migration(format!("migration lock: {error}"))
}
