//! 003: `memory_requests`, the log of answered mutating requests that makes a
//! retry with the same `request_id` return the first result (AIP-155).

use sea_orm_migration::prelude::*;

#[derive(DeriveMigrationName)]
pub struct Migration;

#[derive(DeriveIden)]
enum MemoryRequests {
    Table,
    RequestId,
    RequestDigest,
    Response,
    CreatedAt,
}

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    // Both backends run DDL transactionally: a failure leaves no half-made table.
    fn use_transaction(&self) -> Option<bool> {
        Some(true)
    }

    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager.create_table(memory_requests_table()).await?;
        for index in memory_requests_indexes() {
            manager.create_index(index).await?;
        }
        Ok(())
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .drop_table(Table::drop().table(MemoryRequests::Table).to_owned())
            .await
    }
}

/// The 003 `memory_requests` table; 004 rebuilds this shape when rolled back on SQLite.
pub(crate) fn memory_requests_table() -> TableCreateStatement {
    let mut table = Table::create().table(MemoryRequests::Table).to_owned();
    for column in memory_requests_columns() {
        table.col(column);
    }
    table.primary_key(Index::create().col(MemoryRequests::RequestId));
    table
}

/// The columns of `memory_requests`; 004 adds the tenant to them and to the key.
pub(crate) fn memory_requests_columns() -> [ColumnDef; 4] {
    [
        ColumnDef::new(MemoryRequests::RequestId)
            .string_len(36)
            .not_null()
            .to_owned(),
        // Digest of the request, to reject a reused request_id with a different body.
        ColumnDef::new(MemoryRequests::RequestDigest)
            .string_len(64)
            .not_null()
            .to_owned(),
        // The encoded response returned to the first call (bytea on PostgreSQL).
        ColumnDef::new(MemoryRequests::Response)
            .blob()
            .not_null()
            .to_owned(),
        ColumnDef::new(MemoryRequests::CreatedAt)
            .timestamp_with_time_zone()
            .not_null()
            .to_owned(),
    ]
}

/// Expired entries are purged by age.
pub(crate) fn memory_requests_indexes() -> Vec<IndexCreateStatement> {
    vec![
        Index::create()
            .name("ix_memory_requests_created_at")
            .table(MemoryRequests::Table)
            .col(MemoryRequests::CreatedAt)
            .to_owned(),
    ]
}
