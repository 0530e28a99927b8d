//! 002: content hashing, TTL and soft delete (the reference design's
//! `002_add_content_hashing`, made safe).
//!
//! Differences from the reference: hashes are always computed in Rust by
//! `engram_domain::text` (the reference's PostgreSQL SQL did not match its own
//! Python), the backfill pages by primary key instead of loading the table,
//! duplicates under the new constraint and oversized content on downgrade are
//! refused with a clear message, and everything runs in one transaction.

use engram_domain::text;
use sea_orm_migration::prelude::*;
use sea_orm_migration::sea_orm::{DbBackend, Statement};

use crate::m20240101_000001_initial_schema as initial;

/// Rows hashed per keyset page.
const BACKFILL_BATCH: u64 = 500;

/// 001 restores a unique constraint on the full `content`, and a PostgreSQL
/// btree entry cannot exceed about 2.7 KB.
const MAX_INDEXABLE_CONTENT_BYTES: usize = 2600;

/// (name, predicate) of the CHECK constraints 002 adds.
const CHECKS: [(&str, &str); 2] = [
    (
        "ck_memory_importance_range",
        "importance >= 0.0 AND importance <= 1.0",
    ),
    ("ck_memory_access_count_positive", "access_count >= 0"),
];

/// Columns that may hold NULL until the upgrade fills them, NOT NULL after.
const BACKFILLED_COLUMNS: [&str; 2] = ["content_hash", "metadata"];

/// Partial-index predicate: only memories that are not soft-deleted.
const LIVE: &str = "deleted_at IS NULL";

/// (name, columns, partial-index predicate) of the indexes 002 adds. The
/// same predicates are used on SQLite, which supports partial indexes too.
const HASHING_INDEXES: [(&str, &[Memories], Option<&str>); 7] = [
    ("ix_memory_content_hash", &[Memories::ContentHash], None),
    ("ix_memory_semantic_hash", &[Memories::SemanticHash], None),
    ("ix_memory_expires_at", &[Memories::ExpiresAt], None),
    ("ix_memory_deleted_at", &[Memories::DeletedAt], None),
    (
        "ix_memory_active_expires",
        &[Memories::ExpiresAt],
        Some("deleted_at IS NULL AND expires_at IS NOT NULL"),
    ),
    (
        "ix_memory_session_type_importance",
        &[
            Memories::SessionId,
            Memories::ContentType,
            Memories::Importance,
        ],
        Some(LIVE),
    ),
    (
        "ix_memory_cleanup",
        &[
            Memories::SessionId,
            Memories::LastAccessed,
            Memories::Importance,
        ],
        Some(LIVE),
    ),
];

#[derive(DeriveMigrationName)]
pub struct Migration;

#[derive(DeriveIden, Clone, Copy)]
enum Memories {
    Table,
    Id,
    SessionId,
    ContentType,
    Content,
    Importance,
    LastAccessed,
    ContentHash,
    SemanticHash,
    ExpiresAt,
    DeletedAt,
}

/// Scratch name of the new table while SQLite rebuilds `memories`.
#[derive(DeriveIden)]
struct MemoriesRebuild;

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    // Both backends run DDL transactionally, so a refusal or failure at any
    // step (including after the backfill) leaves the database as it was.
    fn use_transaction(&self) -> Option<bool> {
        Some(true)
    }

    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        for column in hashing_columns() {
            manager
                .alter_table(
                    Table::alter()
                        .table(Memories::Table)
                        .add_column(column)
                        .to_owned(),
                )
                .await?;
        }
        backfill_hashes(manager).await?;
        replace_null_metadata(manager).await?;
        refuse_hash_duplicates(manager).await?;
        match manager.get_database_backend() {
            DbBackend::Postgres => constrain_in_place(manager).await,
            DbBackend::Sqlite => {
                rebuild_sqlite_memories(manager, hashed_memories_table(), all_hashed_indexes())
                    .await
            }
            backend => Err(unsupported(backend)),
        }
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        match manager.get_database_backend() {
            DbBackend::Postgres => {
                refuse_unindexable_content(manager).await?;
                unconstrain_in_place(manager).await
            }
            DbBackend::Sqlite => {
                rebuild_sqlite_memories(
                    manager,
                    initial::memories_table(),
                    initial::memories_indexes(),
                )
                .await
            }
            backend => Err(unsupported(backend)),
        }
    }
}

fn unsupported(backend: DbBackend) -> DbErr {
    DbErr::Migration(format!(
        "migration 002 supports postgresql and sqlite, not {backend:?}"
    ))
}

/// The new columns, nullable so they can be added to a filled table.
fn hashing_columns() -> [ColumnDef; 4] {
    [
        ColumnDef::new(Memories::ContentHash)
            .string_len(64)
            .null()
            .to_owned(),
        ColumnDef::new(Memories::SemanticHash)
            .string_len(64)
            .null()
            .to_owned(),
        ColumnDef::new(Memories::ExpiresAt)
            .timestamp_with_time_zone()
            .null()
            .to_owned(),
        ColumnDef::new(Memories::DeletedAt)
            .timestamp_with_time_zone()
            .null()
            .to_owned(),
    ]
}

/// Fills both hashes of every unhashed row, one keyset page at a time.
async fn backfill_hashes(manager: &SchemaManager<'_>) -> Result<(), DbErr> {
    let db = manager.get_connection();
    let pending = count(
        manager,
        "SELECT COUNT(*) FROM memories WHERE content_hash IS NULL",
    )
    .await?;
    tracing::info!(pending, "backfilling memory hashes");
    let mut hashed = 0;
    let mut after_id = None;
    loop {
        let page = db.query_all(&unhashed_page(after_id.as_deref())).await?;
        if page.is_empty() {
            break;
        }
        for row in &page {
            let id: String = row.try_get("", "id")?;
            let content: String = row.try_get("", "content")?;
            db.execute(&hash_update(&id, &content)).await?;
            after_id = Some(id);
        }
        hashed += page.len();
        tracing::info!(hashed, pending, "backfilled memory hashes");
    }
    Ok(())
}

/// The next page of unhashed rows after `after_id`, in primary key order.
/// Starting after the last id keeps each page an index range scan instead of
/// rescanning the rows already hashed.
fn unhashed_page(after_id: Option<&str>) -> SelectStatement {
    Query::select()
        .columns([Memories::Id, Memories::Content])
        .from(Memories::Table)
        .and_where(Expr::col(Memories::ContentHash).is_null())
        .and_where_option(after_id.map(|id| Expr::col(Memories::Id).gt(id)))
        .order_by(Memories::Id, Order::Asc)
        .limit(BACKFILL_BATCH)
        .to_owned()
}

fn hash_update(id: &str, content: &str) -> UpdateStatement {
    Query::update()
        .table(Memories::Table)
        .value(Memories::ContentHash, text::content_hash(content))
        .value(
            Memories::SemanticHash,
            text::format_semantic_hash(text::semantic_hash(content)),
        )
        .and_where(Expr::col(Memories::Id).eq(id))
        .to_owned()
}

/// The v3 model makes `metadata` NOT NULL with `{}` as its empty value.
async fn replace_null_metadata(manager: &SchemaManager<'_>) -> Result<(), DbErr> {
    let result = manager
        .get_connection()
        .execute_unprepared("UPDATE memories SET metadata = '{}' WHERE metadata IS NULL")
        .await?;
    tracing::info!(
        rows = result.rows_affected(),
        "replaced null memory metadata with {{}}"
    );
    Ok(())
}

/// Contents that differ only in case, spacing or trailing punctuation share a
/// hash, and the new unique constraint would reject them with a bare error.
async fn refuse_hash_duplicates(manager: &SchemaManager<'_>) -> Result<(), DbErr> {
    let groups = count(
        manager,
        "SELECT COUNT(*) FROM (SELECT 1 FROM memories \
         GROUP BY session_id, content_type, content_hash HAVING COUNT(*) > 1) AS duplicates",
    )
    .await?;
    if groups == 0 {
        return Ok(());
    }
    Err(DbErr::Migration(format!(
        "cannot add uq_memory_session_content_hash: {groups} group(s) of memories share a session, \
         content_type and normalized content; merge or delete the duplicates, then migrate again"
    )))
}

/// PostgreSQL changes constraints in place.
async fn constrain_in_place(manager: &SchemaManager<'_>) -> Result<(), DbErr> {
    let db = manager.get_connection();
    for column in BACKFILLED_COLUMNS {
        db.execute_unprepared(&format!(
            "ALTER TABLE memories ALTER COLUMN {column} SET NOT NULL"
        ))
        .await?;
    }
    db.execute_unprepared(
        "ALTER TABLE memories \
         DROP CONSTRAINT uq_memory_session_content, \
         ADD CONSTRAINT uq_memory_session_content_hash \
         UNIQUE (session_id, content_type, content_hash)",
    )
    .await?;
    for (name, predicate) in CHECKS {
        db.execute_unprepared(&format!(
            "ALTER TABLE memories ADD CONSTRAINT {name} CHECK ({predicate})"
        ))
        .await?;
    }
    for index in hashing_indexes() {
        manager.create_index(index).await?;
    }
    Ok(())
}

/// Checked before anything changes, so a refusal is clear rather than a
/// btree error halfway through.
async fn refuse_unindexable_content(manager: &SchemaManager<'_>) -> Result<(), DbErr> {
    let oversized = count(
        manager,
        &format!(
            "SELECT COUNT(*) FROM memories WHERE octet_length(content) > {MAX_INDEXABLE_CONTENT_BYTES}"
        ),
    )
    .await?;
    if oversized == 0 {
        return Ok(());
    }
    Err(DbErr::Migration(format!(
        "cannot restore uq_memory_session_content: {oversized} memory row(s) have content over \
         {MAX_INDEXABLE_CONTENT_BYTES} bytes, too long for a postgresql unique index; \
         shorten or delete them, then downgrade again"
    )))
}

/// Reverses [`constrain_in_place`] and drops the new columns.
async fn unconstrain_in_place(manager: &SchemaManager<'_>) -> Result<(), DbErr> {
    let db = manager.get_connection();
    for (name, _, _) in HASHING_INDEXES {
        manager
            .drop_index(Index::drop().name(name).to_owned())
            .await?;
    }
    for (name, _) in CHECKS {
        db.execute_unprepared(&format!("ALTER TABLE memories DROP CONSTRAINT {name}"))
            .await?;
    }
    db.execute_unprepared(
        "ALTER TABLE memories \
         DROP CONSTRAINT uq_memory_session_content_hash, \
         ADD CONSTRAINT uq_memory_session_content UNIQUE (session_id, content_type, content), \
         ALTER COLUMN metadata DROP NOT NULL",
    )
    .await?;
    for column in hashing_columns() {
        let name = Alias::new(column.get_column_name());
        manager
            .alter_table(
                Table::alter()
                    .table(Memories::Table)
                    .drop_column(name)
                    .to_owned(),
            )
            .await?;
    }
    Ok(())
}

/// The indexes 002 adds, see [`HASHING_INDEXES`].
fn hashing_indexes() -> impl Iterator<Item = IndexCreateStatement> {
    HASHING_INDEXES
        .into_iter()
        .map(|(name, columns, predicate)| {
            let mut index = Index::create().name(name).table(Memories::Table).to_owned();
            for &column in columns {
                index.col(column);
            }
            if let Some(predicate) = predicate {
                index.and_where(Expr::cust(predicate));
            }
            index
        })
}

/// Every secondary index of the v3 table: 001's and 002's.
fn all_hashed_indexes() -> Vec<IndexCreateStatement> {
    initial::memories_indexes()
        .into_iter()
        .chain(hashing_indexes())
        .collect()
}

/// The v3 `memories` table, built from the same changes PostgreSQL makes in
/// place so the two backends cannot drift: 001's columns, then the hashing
/// columns (where PostgreSQL's ADD COLUMN puts them), the backfilled columns
/// NOT NULL, the hash-based unique constraint and the checks.
fn hashed_memories_table() -> TableCreateStatement {
    let mut table = Table::create().table(Memories::Table).to_owned();
    let initial_columns = initial::memories_table().get_columns().clone();
    for mut column in initial_columns.into_iter().chain(hashing_columns()) {
        if BACKFILLED_COLUMNS.contains(&column.get_column_name().as_str()) {
            column.not_null();
        }
        table.col(column);
    }
    table.index(
        Index::create()
            .name("uq_memory_session_content_hash")
            .unique()
            .col(Memories::SessionId)
            .col(Memories::ContentType)
            .col(Memories::ContentHash),
    );
    for (name, predicate) in CHECKS {
        table.check((Alias::new(name), Expr::cust(predicate)));
    }
    table
}

/// SQLite cannot add or drop constraints in place, so both directions rebuild
/// `memories` (https://www.sqlite.org/lang_altertable.html#otheralter): create
/// `target` under a scratch name, copy the columns it declares, swap it in and
/// recreate `indexes` (dropping the old table dropped its indexes).
async fn rebuild_sqlite_memories(
    manager: &SchemaManager<'_>,
    mut target: TableCreateStatement,
    indexes: Vec<IndexCreateStatement>,
) -> Result<(), DbErr> {
    let columns: Vec<Alias> = target
        .get_columns()
        .iter()
        .map(|column| Alias::new(column.get_column_name()))
        .collect();
    manager
        .create_table(target.table(MemoriesRebuild).to_owned())
        .await?;
    let copy = Query::insert()
        .into_table(MemoriesRebuild)
        .columns(columns.clone())
        .select_from(
            Query::select()
                .columns(columns)
                .from(Memories::Table)
                .to_owned(),
        )
        .map_err(|error| DbErr::Migration(format!("cannot build the memories copy: {error}")))?
        .to_owned();
    manager.execute(copy).await?;
    manager
        .drop_table(Table::drop().table(Memories::Table).to_owned())
        .await?;
    manager
        .rename_table(
            Table::rename()
                .table(MemoriesRebuild, Memories::Table)
                .to_owned(),
        )
        .await?;
    for index in indexes {
        manager.create_index(index).await?;
    }
    Ok(())
}

/// The single integer a `SELECT COUNT(*) ...` returns.
async fn count(manager: &SchemaManager<'_>, sql: &str) -> Result<i64, DbErr> {
    let statement = Statement::from_string(manager.get_database_backend(), sql);
    manager
        .get_connection()
        .query_one_raw(statement)
        .await?
        .ok_or_else(|| DbErr::Migration(format!("no row from {sql}")))?
        .try_get_by_index(0)
}
