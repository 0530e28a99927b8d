//! 004: tenants and the audit log. Every memory and every kept request belongs
//! to a tenant, and session ids are scoped by tenant: the unique constraint
//! behind exact deduplication and the request log's key both lead with the
//! tenant. Rows written before 004 belong to the `default` tenant. Deletes and
//! purges leave a record in `audit_events` (who, when, what, how many; never
//! content).

use sea_orm_migration::prelude::*;
use sea_orm_migration::sea_orm::DbBackend;

use crate::m20240115_000002_add_content_hashing as hashing;
use crate::m20261124_000003_request_log as request_log;
use crate::sqlite_rebuild::{rebuild_sqlite_table, with_large_page_cache};

/// The tenant of every row written before tenants existed.
pub const DEFAULT_TENANT: &str = "default";

const TENANT_UNIQUE: &str = "uq_memory_tenant_session_content_hash";
const SESSION_UNIQUE: &str = "uq_memory_session_content_hash";

#[derive(DeriveMigrationName)]
pub struct Migration;

#[derive(DeriveIden, Clone, Copy)]
enum Memories {
    Table,
    TenantId,
    SessionId,
    ContentType,
    ContentHash,
}

#[derive(DeriveIden, Clone, Copy)]
enum MemoryRequests {
    Table,
    TenantId,
    RequestId,
}

#[derive(DeriveIden, Clone, Copy)]
enum AuditEvents {
    Table,
    Id,
    TenantId,
    Principal,
    Action,
    Resource,
    Filter,
    Affected,
    CreatedAt,
}

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    // Both backends run DDL transactionally: a refusal or a failure changes nothing.
    fn use_transaction(&self) -> Option<bool> {
        Some(true)
    }

    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        for table in [Alias::new("memories"), Alias::new("memory_requests")] {
            manager
                .alter_table(
                    Table::alter()
                        .table(table)
                        .add_column(tenant_column())
                        .to_owned(),
                )
                .await?;
        }
        match manager.get_database_backend() {
            DbBackend::Postgres => {
                manager
                    .get_connection()
                    .execute_unprepared(&format!(
                        "ALTER TABLE memories DROP CONSTRAINT {SESSION_UNIQUE}, \
                         ADD CONSTRAINT {TENANT_UNIQUE} \
                         UNIQUE (tenant_id, session_id, content_type, content_hash); \
                         ALTER TABLE memory_requests DROP CONSTRAINT memory_requests_pkey, \
                         ADD CONSTRAINT memory_requests_pkey PRIMARY KEY (tenant_id, request_id)"
                    ))
                    .await?;
            }
            DbBackend::Sqlite => {
                let rebuilds = async {
                    rebuild_sqlite_table(
                        manager,
                        tenant_memories_table(),
                        hashing::all_hashed_indexes(),
                    )
                    .await?;
                    rebuild_sqlite_table(
                        manager,
                        tenant_requests_table(),
                        request_log::memory_requests_indexes(),
                    )
                    .await
                };
                with_large_page_cache(manager, rebuilds).await?;
            }
            backend => return Err(unsupported(backend)),
        }
        manager.create_table(audit_events_table()).await?;
        manager
            .create_index(
                Index::create()
                    .name("ix_audit_events_tenant_created")
                    .table(AuditEvents::Table)
                    .col(AuditEvents::TenantId)
                    .col(AuditEvents::CreatedAt)
                    .to_owned(),
            )
            .await
    }

    /// Refuses while memories of other tenants exist: folded into one space they
    /// could break the unique constraint, and would be readable across tenants.
    /// Kept requests of other tenants (retry records of a day) and the audit log go.
    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        let foreign = hashing::count(
            manager,
            &format!("SELECT COUNT(*) FROM memories WHERE tenant_id <> '{DEFAULT_TENANT}'"),
        )
        .await?;
        if foreign > 0 {
            return Err(DbErr::Migration(format!(
                "cannot remove tenants: {foreign} memory row(s) belong to tenants other than \
                 {DEFAULT_TENANT:?}; purge them, then downgrade again"
            )));
        }
        let db = manager.get_connection();
        db.execute_unprepared(&format!(
            "DELETE FROM memory_requests WHERE tenant_id <> '{DEFAULT_TENANT}'"
        ))
        .await?;
        manager
            .drop_table(Table::drop().table(AuditEvents::Table).to_owned())
            .await?;
        match manager.get_database_backend() {
            DbBackend::Postgres => {
                db.execute_unprepared(&format!(
                    "ALTER TABLE memories DROP CONSTRAINT {TENANT_UNIQUE}, \
                     ADD CONSTRAINT {SESSION_UNIQUE} UNIQUE (session_id, content_type, content_hash), \
                     DROP COLUMN tenant_id; \
                     ALTER TABLE memory_requests DROP CONSTRAINT memory_requests_pkey, \
                     ADD CONSTRAINT memory_requests_pkey PRIMARY KEY (request_id), \
                     DROP COLUMN tenant_id"
                ))
                .await?;
                Ok(())
            }
            DbBackend::Sqlite => {
                rebuild_sqlite_table(
                    manager,
                    hashing::hashed_memories_table(),
                    hashing::all_hashed_indexes(),
                )
                .await?;
                rebuild_sqlite_table(
                    manager,
                    request_log::memory_requests_table(),
                    request_log::memory_requests_indexes(),
                )
                .await
            }
            backend => Err(unsupported(backend)),
        }
    }
}

fn unsupported(backend: DbBackend) -> DbErr {
    DbErr::Migration(format!(
        "migration 004 supports postgresql and sqlite, not {backend:?}"
    ))
}

/// Filled with the default tenant for the rows already there.
fn tenant_column() -> ColumnDef {
    ColumnDef::new(Memories::TenantId)
        .string_len(64)
        .not_null()
        .default(DEFAULT_TENANT)
        .to_owned()
}

/// The 002 table with the tenant column (last, where ADD COLUMN puts it on
/// PostgreSQL) and the tenant leading the unique constraint.
fn tenant_memories_table() -> TableCreateStatement {
    let mut table = Table::create().table(Memories::Table).to_owned();
    for column in hashing::hashed_memories_table().get_columns() {
        table.col(column.clone());
    }
    table.col(tenant_column());
    table.index(
        Index::create()
            .name(TENANT_UNIQUE)
            .unique()
            .col(Memories::TenantId)
            .col(Memories::SessionId)
            .col(Memories::ContentType)
            .col(Memories::ContentHash),
    );
    for (name, predicate) in hashing::CHECKS {
        table.check((Alias::new(name), Expr::cust(predicate)));
    }
    table
}

/// The 003 table keyed by tenant and request id.
fn tenant_requests_table() -> TableCreateStatement {
    let mut table = Table::create().table(MemoryRequests::Table).to_owned();
    for column in request_log::memory_requests_columns() {
        table.col(column);
    }
    table.col(tenant_column());
    table.primary_key(
        Index::create()
            .col(MemoryRequests::TenantId)
            .col(MemoryRequests::RequestId),
    );
    table
}

fn audit_events_table() -> TableCreateStatement {
    Table::create()
        .table(AuditEvents::Table)
        .col(
            ColumnDef::new(AuditEvents::Id)
                .string_len(36)
                .not_null()
                .primary_key(),
        )
        .col(
            ColumnDef::new(AuditEvents::TenantId)
                .string_len(64)
                .not_null(),
        )
        // Who: the token fingerprint or client certificate that made the call.
        .col(
            ColumnDef::new(AuditEvents::Principal)
                .string_len(255)
                .not_null(),
        )
        .col(
            ColumnDef::new(AuditEvents::Action)
                .string_len(64)
                .not_null(),
        )
        // What: the resource name or the parent the call named.
        .col(ColumnDef::new(AuditEvents::Resource).text().not_null())
        .col(ColumnDef::new(AuditEvents::Filter).text().not_null())
        // How many memories it removed.
        .col(
            ColumnDef::new(AuditEvents::Affected)
                .big_integer()
                .not_null(),
        )
        .col(
            ColumnDef::new(AuditEvents::CreatedAt)
                .timestamp_with_time_zone()
                .not_null(),
        )
        .to_owned()
}
