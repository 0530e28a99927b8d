//! 001: the `memories` table as the reference design's v2 model had it,
//! before content hashing.

use sea_orm_migration::prelude::*;

#[derive(DeriveMigrationName)]
pub struct Migration;

#[derive(DeriveIden)]
enum Memories {
    Table,
    Id,
    SessionId,
    ContentType,
    Content,
    Metadata,
    Importance,
    AccessCount,
    LastAccessed,
    CreatedAt,
    UpdatedAt,
}

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    // Both backends run DDL transactionally: a failure leaves no half-made table.
    fn use_transaction(&self) -> Option<bool> {
        Some(true)
    }

    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager.create_table(memories_table()).await?;
        for index in memories_indexes() {
            manager.create_index(index).await?;
        }
        Ok(())
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .drop_table(Table::drop().table(Memories::Table).to_owned())
            .await
    }
}

/// The 001 `memories` table. Migration 002 rebuilds this exact shape when it
/// is rolled back on SQLite, so the two can never drift apart.
pub(crate) fn memories_table() -> TableCreateStatement {
    Table::create()
        .table(Memories::Table)
        .col(
            ColumnDef::new(Memories::Id)
                .string_len(36)
                .not_null()
                .primary_key(),
        )
        .col(
            ColumnDef::new(Memories::SessionId)
                .string_len(255)
                .not_null(),
        )
        .col(
            ColumnDef::new(Memories::ContentType)
                .string_len(50)
                .not_null()
                .default("context"),
        )
        .col(ColumnDef::new(Memories::Content).text().not_null())
        // Legacy rows may hold NULL; 002 replaces those with '{}'.
        .col(ColumnDef::new(Memories::Metadata).json().null())
        .col(
            ColumnDef::new(Memories::Importance)
                .double()
                .not_null()
                .default(0.5),
        )
        .col(
            ColumnDef::new(Memories::AccessCount)
                .integer()
                .not_null()
                .default(0),
        )
        .col(
            ColumnDef::new(Memories::LastAccessed)
                .timestamp_with_time_zone()
                .null(),
        )
        .col(
            ColumnDef::new(Memories::CreatedAt)
                .timestamp_with_time_zone()
                .not_null()
                .default(Expr::current_timestamp()),
        )
        .col(
            ColumnDef::new(Memories::UpdatedAt)
                .timestamp_with_time_zone()
                .not_null()
                .default(Expr::current_timestamp()),
        )
        .index(
            Index::create()
                .name("uq_memory_session_content")
                .unique()
                .col(Memories::SessionId)
                .col(Memories::ContentType)
                .col(Memories::Content),
        )
        .to_owned()
}

/// The secondary indexes of the 001 `memories` table.
pub(crate) fn memories_indexes() -> Vec<IndexCreateStatement> {
    vec![
        Index::create()
            .name("ix_memories_session_id")
            .table(Memories::Table)
            .col(Memories::SessionId)
            .to_owned(),
        Index::create()
            .name("ix_memory_created_at")
            .table(Memories::Table)
            .col(Memories::CreatedAt)
            .to_owned(),
    ]
}
