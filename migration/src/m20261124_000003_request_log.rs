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
        manager
            .create_table(
                Table::create()
                    .table(MemoryRequests::Table)
                    .col(
                        ColumnDef::new(MemoryRequests::RequestId)
                            .string_len(36)
                            .not_null()
                            .primary_key(),
                    )
                    // Digest of the request, to reject a reused request_id with a different body.
                    .col(
                        ColumnDef::new(MemoryRequests::RequestDigest)
                            .string_len(64)
                            .not_null(),
                    )
                    // The encoded response returned to the first call (bytea on PostgreSQL).
                    .col(ColumnDef::new(MemoryRequests::Response).blob().not_null())
                    .col(
                        ColumnDef::new(MemoryRequests::CreatedAt)
                            .timestamp_with_time_zone()
                            .not_null(),
                    )
                    .to_owned(),
            )
            .await?;
        // Expired entries are purged by age.
        manager
            .create_index(
                Index::create()
                    .name("ix_memory_requests_created_at")
                    .table(MemoryRequests::Table)
                    .col(MemoryRequests::CreatedAt)
                    .to_owned(),
            )
            .await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .drop_table(Table::drop().table(MemoryRequests::Table).to_owned())
            .await
    }
}
