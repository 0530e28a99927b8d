//! 005: the indexes the service uses, and no others. The Python system's
//! schema kept ten indexes on `memories`; every insert paid for each of them,
//! several at random keys (content and SimHash digests). Engram finds a
//! session's memories through the unique constraint, which leads with tenant
//! and session, so the session indexes without the tenant and the digest
//! indexes go. The sweeper's expiry and purge lookups keep an index each, on
//! the few rows that have a value.

use sea_orm_migration::prelude::*;

use crate::m20240115_000002_add_content_hashing as hashing;

/// 001's and 002's indexes that no query of Engram uses.
const UNUSED: [&str; 8] = [
    "ix_memories_session_id",
    "ix_memory_content_hash",
    "ix_memory_semantic_hash",
    "ix_memory_expires_at",
    "ix_memory_deleted_at",
    "ix_memory_active_expires",
    "ix_memory_session_type_importance",
    "ix_memory_cleanup",
];

#[derive(DeriveMigrationName)]
pub struct Migration;

#[derive(DeriveIden, Clone, Copy)]
enum Memories {
    Table,
    ExpiresAt,
    DeletedAt,
}

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    fn use_transaction(&self) -> Option<bool> {
        Some(true)
    }

    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        for name in UNUSED {
            manager
                .drop_index(Index::drop().name(name).table(Memories::Table).to_owned())
                .await?;
        }
        for index in sweeper_indexes() {
            manager.create_index(index).await?;
        }
        Ok(())
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        for index in sweeper_indexes() {
            let name = index.get_index_spec().get_name().unwrap_or_default();
            manager
                .drop_index(Index::drop().name(name).table(Memories::Table).to_owned())
                .await?;
        }
        for index in hashing::all_hashed_indexes() {
            if UNUSED.contains(&index.get_index_spec().get_name().unwrap_or_default()) {
                manager.create_index(index).await?;
            }
        }
        Ok(())
    }
}

/// Expiry and purge-after-retention look rows up by time; only rows with an
/// expiry or a deletion time are in these indexes (a comparison implies
/// NOT NULL, so both SQLite and PostgreSQL use them).
fn sweeper_indexes() -> [IndexCreateStatement; 2] {
    [
        (
            ("ix_memory_expiring"),
            Memories::ExpiresAt,
            "expires_at IS NOT NULL",
        ),
        (
            ("ix_memory_deleted"),
            Memories::DeletedAt,
            "deleted_at IS NOT NULL",
        ),
    ]
    .map(|(name, column, predicate)| {
        Index::create()
            .name(name)
            .table(Memories::Table)
            .col(column)
            .and_where(Expr::cust(predicate))
            .to_owned()
    })
}
