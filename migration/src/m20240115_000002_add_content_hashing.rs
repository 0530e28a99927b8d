//! 002: content hashing, TTL and soft delete (the reference design's
//! `002_add_content_hashing`, made safe on real data).
//!
//! Differences from the reference: hashes are always computed in Rust by
//! `engram_domain::text` (the reference's PostgreSQL SQL did not match its own
//! Python); the backfill pages by primary key and writes a page per statement
//! instead of loading the table; on SQLite the legacy timestamps are rewritten
//! into the text the service writes and compares; legacy rows that normalize
//! alike are merged (see [`merge`]) instead of failing the new unique
//! constraint; rows breaking the new checks and oversized content on downgrade
//! are refused with a clear message; and everything runs in one transaction,
//! so an interrupted run leaves the database as it was.

mod merge;

use chrono::{DateTime, Utc};
use engram_domain::text;
use sea_orm_migration::prelude::*;
use sea_orm_migration::sea_orm::{ConnectionTrait, DbBackend, QueryResult, Statement};

use crate::m20240101_000001_initial_schema as initial;

/// Rows read and written per keyset page.
const BACKFILL_BATCH: u64 = 1000;

/// Rows between two progress lines of the backfill.
const PROGRESS_EVERY: usize = 50_000;

/// 001 restores a unique constraint on the full `content`, and a PostgreSQL
/// btree entry cannot exceed about 2.7 KB.
const MAX_INDEXABLE_CONTENT_BYTES: usize = 2600;

/// (name, predicate) of the CHECK constraints 002 adds.
pub(crate) const CHECKS: [(&str, &str); 2] = [
    (
        "ck_memory_importance_range",
        "importance >= 0.0 AND importance <= 1.0",
    ),
    ("ck_memory_access_count_positive", "access_count >= 0"),
];

/// Columns that may hold NULL until the upgrade fills them, NOT NULL after.
const BACKFILLED_COLUMNS: [&str; 2] = ["content_hash", "metadata"];

/// 001's timestamp columns. SQLite keeps them as text, compared as text.
const LEGACY_TIMESTAMPS: [&str; 3] = ["created_at", "updated_at", "last_accessed"];

/// How the Python system (SQLAlchemy's SQLite `DateTime`) writes a timestamp:
/// naive, always with microseconds.
const PYTHON_SQLITE_TIMESTAMP: &str = "%Y-%m-%d %H:%M:%S%.6f";

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
    CreatedAt,
    UpdatedAt,
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
    // Both backends run DDL transactionally, so a refusal, a failure or a kill
    // at any step (including mid-backfill) leaves the database as it was.
    fn use_transaction(&self) -> Option<bool> {
        Some(true)
    }

    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        refuse_rows_failing_checks(manager).await?;
        drop_initial_indexes(manager).await?;
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
        backfill(manager).await?;
        replace_null_metadata(manager).await?;
        merge::merge_rows_that_normalize_alike(manager).await?;
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
                rewrite_sqlite_timestamps_for_python(manager).await?;
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

pub(crate) fn unsupported(backend: DbBackend) -> DbErr {
    DbErr::Migration(format!(
        "migration 002 supports postgresql and sqlite, not {backend:?}"
    ))
}

/// A legacy importance of 1.5 would otherwise stop the upgrade at the very
/// end with a bare constraint error; say which check and how many rows.
async fn refuse_rows_failing_checks(manager: &SchemaManager<'_>) -> Result<(), DbErr> {
    for (name, predicate) in CHECKS {
        let failing = count(
            manager,
            &format!("SELECT COUNT(*) FROM memories WHERE NOT ({predicate})"),
        )
        .await?;
        if failing > 0 {
            return Err(DbErr::Migration(format!(
                "cannot add {name}: {failing} memory row(s) fail `{predicate}`; \
                 correct or delete them, then migrate again"
            )));
        }
    }
    Ok(())
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

/// Fills both hashes of every unhashed row, one keyset page at a time. On
/// SQLite it also rewrites the row's legacy timestamps: the Python system
/// wrote naive `2024-01-15 10:00:00.123456` (or `2024-01-15 10:00:00` from
/// the `CURRENT_TIMESTAMP` default) while the service writes and compares
/// RFC 3339 UTC text, and SQLite compares both as plain text. Each value is
/// read by the same sqlx decoder the service reads with (naive = UTC) and
/// written back by the same encoder it writes with, so the text is exactly
/// the service's.
async fn backfill(manager: &SchemaManager<'_>) -> Result<(), DbErr> {
    let db = manager.get_connection();
    let rewrites_timestamps = manager.get_database_backend() == DbBackend::Sqlite;
    let mut read_columns = vec![Memories::Id, Memories::Content];
    let mut written_columns = vec!["content_hash", "semantic_hash"];
    if rewrites_timestamps {
        read_columns.extend([
            Memories::CreatedAt,
            Memories::UpdatedAt,
            Memories::LastAccessed,
        ]);
        written_columns.extend(LEGACY_TIMESTAMPS);
    }
    let pending = count(
        manager,
        "SELECT COUNT(*) FROM memories WHERE content_hash IS NULL",
    )
    .await?;
    tracing::info!(pending, rewrites_timestamps, "backfilling memory hashes");
    let mut hashed = 0;
    let mut after_id = None;
    loop {
        let page = db
            .query_all(&unhashed_page(&read_columns, after_id.as_deref()))
            .await?;
        let Some(last) = page.last() else { break };
        after_id = Some(last.try_get::<String>("", "id")?);
        let mut updates = Vec::with_capacity(page.len());
        for row in &page {
            let mut values = hashed_values(row)?;
            if rewrites_timestamps {
                for column in LEGACY_TIMESTAMPS {
                    values.push(legacy_timestamp(row, column)?.into());
                }
            }
            updates.push(values);
        }
        update_rows(db, &written_columns, updates, Ids::KeysetPage).await?;
        let before = hashed;
        hashed += page.len();
        if before / PROGRESS_EVERY != hashed / PROGRESS_EVERY {
            tracing::info!(hashed, pending, "backfilled memory hashes");
        }
    }
    tracing::info!(hashed, "backfill done");
    Ok(())
}

/// The next page of unhashed rows after `after_id`, in primary key order.
/// Starting after the last id keeps each page an index range scan instead of
/// rescanning the rows already hashed.
fn unhashed_page(columns: &[Memories], after_id: Option<&str>) -> SelectStatement {
    Query::select()
        .columns(columns.iter().copied())
        .from(Memories::Table)
        .and_where(Expr::col(Memories::ContentHash).is_null())
        .and_where_option(after_id.map(|id| Expr::col(Memories::Id).gt(id)))
        .order_by(Memories::Id, Order::Asc)
        .limit(BACKFILL_BATCH)
        .to_owned()
}

/// `[id, content_hash, semantic_hash]` of a row holding `id` and `content`.
fn hashed_values(row: &QueryResult) -> Result<Vec<Value>, DbErr> {
    let id: String = row.try_get("", "id")?;
    let content: String = row.try_get("", "content")?;
    Ok(vec![
        id.into(),
        text::content_hash(&content).into(),
        text::format_semantic_hash(text::semantic_hash(&content)).into(),
    ])
}

/// A timestamp column of `row` as the service's sqlx decoder reads it,
/// with an error naming the column and the row (never the content).
fn legacy_timestamp(row: &QueryResult, column: &str) -> Result<Option<DateTime<Utc>>, DbErr> {
    row.try_get("", column).map_err(|error| {
        let id: String = row.try_get("", "id").unwrap_or_default();
        DbErr::Migration(format!(
            "memories.{column} of memory {id} is not a readable timestamp: {error}"
        ))
    })
}

/// How the ids of the rows given to [`update_rows`] lie.
enum Ids {
    /// A keyset page: in id order, every row between the first and the last.
    KeysetPage,
    /// Anywhere in the table.
    Scattered,
}

/// The `n`th (from 1) bind parameter of a raw statement.
pub(crate) fn placeholder(backend: DbBackend, n: usize) -> String {
    match backend {
        DbBackend::Postgres => format!("${n}"),
        _ => "?".to_owned(),
    }
}

/// Sets `columns` of many rows in one statement. Each entry of `rows` is the
/// row's id followed by one value per column. A keyset page's id range bounds
/// the join: without it PostgreSQL may hash-join the page against a scan of
/// the whole table, once per page.
async fn update_rows(
    db: &impl ConnectionTrait,
    columns: &[&str],
    rows: Vec<Vec<Value>>,
    ids: Ids,
) -> Result<(), DbErr> {
    let (Some(first), Some(last)) = (rows.first(), rows.last()) else {
        return Ok(());
    };
    let id_range = match ids {
        Ids::KeysetPage => vec![first[0].clone(), last[0].clone()],
        Ids::Scattered => vec![],
    };
    let backend = db.get_database_backend();
    let mut placeholders = (1..).map(|n| placeholder(backend, n));
    let tuples: Vec<String> = rows
        .iter()
        .map(|values| {
            let row: Vec<String> = placeholders.by_ref().take(values.len()).collect();
            format!("({})", row.join(", "))
        })
        .collect();
    let assignments: Vec<String> = columns
        .iter()
        .map(|column| format!("{column} = new_values.{column}"))
        .collect();
    let bound = match ids {
        Ids::KeysetPage => format!(
            " AND memories.id BETWEEN {} AND {}",
            placeholders.next().unwrap_or_default(),
            placeholders.next().unwrap_or_default()
        ),
        Ids::Scattered => String::new(),
    };
    let sql = format!(
        "WITH new_values (id, {columns}) AS (VALUES {tuples}) \
         UPDATE memories SET {assignments} FROM new_values \
         WHERE memories.id = new_values.id{bound}",
        columns = columns.join(", "),
        tuples = tuples.join(", "),
        assignments = assignments.join(", "),
    );
    let values = rows.into_iter().flatten().chain(id_range);
    db.execute_raw(Statement::from_sql_and_values(backend, sql, values))
        .await?;
    Ok(())
}

/// The v3 model makes `metadata` NOT NULL with `{}` as its empty value.
/// SQLAlchemy's JSON type stores Python's `None` as the JSON text `null`,
/// so that counts as empty too.
async fn replace_null_metadata(manager: &SchemaManager<'_>) -> Result<(), DbErr> {
    let result = manager
        .get_connection()
        .execute_unprepared(
            "UPDATE memories SET metadata = '{}' \
             WHERE metadata IS NULL OR CAST(metadata AS TEXT) = 'null'",
        )
        .await?;
    tracing::info!(
        rows = result.rows_affected(),
        "replaced null memory metadata with {{}}"
    );
    Ok(())
}

/// 001's unique constraint on the full content goes anyway (PostgreSQL;
/// SQLite drops it with the table rebuild), and 001's secondary indexes are
/// cheaper to build again afterwards than to maintain row by row through the
/// backfill.
async fn drop_initial_indexes(manager: &SchemaManager<'_>) -> Result<(), DbErr> {
    for index in initial::memories_indexes() {
        let name = index.get_index_spec().get_name().unwrap_or_default();
        manager
            .drop_index(Index::drop().name(name).table(Memories::Table).to_owned())
            .await?;
    }
    if manager.get_database_backend() == DbBackend::Postgres {
        manager
            .get_connection()
            .execute_unprepared("ALTER TABLE memories DROP CONSTRAINT uq_memory_session_content")
            .await?;
    }
    Ok(())
}

/// PostgreSQL changes constraints in place, in one ALTER TABLE so the table
/// is scanned once to check them all, then builds the indexes.
async fn constrain_in_place(manager: &SchemaManager<'_>) -> Result<(), DbErr> {
    let mut actions: Vec<String> = BACKFILLED_COLUMNS
        .iter()
        .map(|column| format!("ALTER COLUMN {column} SET NOT NULL"))
        .collect();
    actions.push(
        "ADD CONSTRAINT uq_memory_session_content_hash \
         UNIQUE (session_id, content_type, content_hash)"
            .to_owned(),
    );
    actions.extend(
        CHECKS
            .iter()
            .map(|(name, predicate)| format!("ADD CONSTRAINT {name} CHECK ({predicate})")),
    );
    manager
        .get_connection()
        .execute_unprepared(&format!("ALTER TABLE memories {}", actions.join(", ")))
        .await?;
    for index in all_hashed_indexes() {
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

/// The Python system reads SQLite timestamps with SQLAlchemy's pattern, which
/// silently drops the time of RFC 3339 text: hand them back in its own
/// format, one keyset page at a time.
async fn rewrite_sqlite_timestamps_for_python(manager: &SchemaManager<'_>) -> Result<(), DbErr> {
    let db = manager.get_connection();
    let mut after_id: Option<String> = None;
    loop {
        let page = db
            .query_all(
                &Query::select()
                    .columns([
                        Memories::Id,
                        Memories::CreatedAt,
                        Memories::UpdatedAt,
                        Memories::LastAccessed,
                    ])
                    .from(Memories::Table)
                    .and_where_option(after_id.map(|id| Expr::col(Memories::Id).gt(id)))
                    .order_by(Memories::Id, Order::Asc)
                    .limit(BACKFILL_BATCH)
                    .to_owned(),
            )
            .await?;
        let Some(last) = page.last() else {
            return Ok(());
        };
        after_id = Some(last.try_get("", "id")?);
        let mut updates = Vec::with_capacity(page.len());
        for row in &page {
            let mut values = vec![Value::from(row.try_get::<String>("", "id")?)];
            for column in LEGACY_TIMESTAMPS {
                let python_text = legacy_timestamp(row, column)?
                    .map(|at| at.format(PYTHON_SQLITE_TIMESTAMP).to_string());
                values.push(python_text.into());
            }
            updates.push(values);
        }
        update_rows(db, &LEGACY_TIMESTAMPS, updates, Ids::KeysetPage).await?;
    }
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
pub(crate) fn all_hashed_indexes() -> Vec<IndexCreateStatement> {
    initial::memories_indexes()
        .into_iter()
        .chain(hashing_indexes())
        .collect()
}

/// The v3 `memories` table, built from the same changes PostgreSQL makes in
/// place so the two backends cannot drift: 001's columns, then the hashing
/// columns (where PostgreSQL's ADD COLUMN puts them), the backfilled columns
/// NOT NULL, the hash-based unique constraint and the checks.
pub(crate) fn hashed_memories_table() -> TableCreateStatement {
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
pub(crate) async fn rebuild_sqlite_memories(
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
pub(crate) async fn count(manager: &SchemaManager<'_>, sql: &str) -> Result<i64, DbErr> {
    let statement = Statement::from_string(manager.get_database_backend(), sql);
    manager
        .get_connection()
        .query_one_raw(statement)
        .await?
        .ok_or_else(|| DbErr::Migration(format!("no row from {sql}")))?
        .try_get_by_index(0)
}
