//! 002: content hashing, TTL and soft delete (the reference design's
//! `002_add_content_hashing`, made safe on real data).
//!
//! Differences from the reference: hashes are always computed in Rust by
//! `engram_domain::text` (the reference's PostgreSQL SQL did not match its own
//! Python); the backfill reads the table a page at a time in storage order
//! instead of loading it, and the rows go with what it computed into a
//! staging table that is then copied back in one statement, never updated
//! row by row (PostgreSQL refills `memories` in place, SQLite rebuilds it);
//! on SQLite the legacy timestamps are rewritten into the text the service
//! writes and compares; legacy rows that normalize alike are merged (see
//! [`merge`]) instead of failing the new unique constraint; rows breaking the
//! new checks and oversized content on downgrade are refused with a clear
//! message; and everything runs in one transaction, so an interrupted run
//! leaves the database as it was.

mod merge;

use chrono::{DateTime, Utc};
use engram_domain::text;
use sea_orm_migration::prelude::*;
use sea_orm_migration::sea_orm::prelude::Json;
use sea_orm_migration::sea_orm::sea_query::sea_value_to_json_value;
use sea_orm_migration::sea_orm::{ConnectionTrait, DbBackend, QueryResult, Statement};

use crate::m20240101_000001_initial_schema as initial;
use crate::sqlite_rebuild::{rebuild_sqlite_table, with_large_page_cache};

/// Rows read and written per page.
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

/// What the backfill computes for every row.
const HASH_COLUMNS: [&str; 2] = ["content_hash", "semantic_hash"];

/// Temporary table of the PostgreSQL backfill: each row's id and hashes.
const POSTGRES_HASHES: &str = "memory_hashes";

/// Most bytes of hashes the PostgreSQL backfill sends per statement. sqlx
/// 0.9.0 leaves Nagle's algorithm on, so a message split over several writes
/// (a TLS record holds 16 KiB) can wait some 40 ms for the server's delayed
/// ACK; a statement that fits in one record never does.
const POSTGRES_MESSAGE_BYTES: usize = 15 * 1024;

/// Settings of the PostgreSQL upgrade, for its transaction only: the refill's
/// hash join and the index builds' sorts then stay in memory instead of
/// spilling to disk (server defaults: 4MB and 64MB).
const POSTGRES_SETTINGS: [(&str, &str); 2] =
    [("work_mem", "128MB"), ("maintenance_work_mem", "256MB")];

/// Index on the staging table's ids, for the merge (SQLite).
const STAGED_ID_INDEX: &str = "ix_memory_staged_id";

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
    Importance,
    LastAccessed,
    CreatedAt,
    UpdatedAt,
    ContentHash,
    SemanticHash,
    ExpiresAt,
    DeletedAt,
}

/// The rows with what the backfill computed, before they go back into
/// `memories`: temporary on PostgreSQL ([`refill_postgres_memories`]), the
/// table the rebuild copies on SQLite ([`upgrade_sqlite_by_rebuild`]).
#[derive(DeriveIden)]
struct MemoriesStaged;

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    // Both backends run DDL transactionally, so a refusal, a failure or a kill
    // at any step (including mid-backfill) leaves the database as it was.
    fn use_transaction(&self) -> Option<bool> {
        Some(true)
    }

    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        refuse_rows_failing_checks(manager).await?;
        match manager.get_database_backend() {
            DbBackend::Postgres => upgrade_postgres_in_place(manager).await,
            DbBackend::Sqlite => upgrade_sqlite_by_rebuild(manager).await,
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
                rebuild_sqlite_table(
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
/// end with a bare constraint error; say which check and how many rows. The
/// rows failing each check are counted in one pass over the table.
async fn refuse_rows_failing_checks(manager: &SchemaManager<'_>) -> Result<(), DbErr> {
    let counts: Vec<String> = CHECKS
        .iter()
        .map(|(_, predicate)| {
            format!("COALESCE(SUM(CASE WHEN NOT ({predicate}) THEN 1 ELSE 0 END), 0)")
        })
        .collect();
    let sql = format!("SELECT {} FROM memories", counts.join(", "));
    let row = manager
        .get_connection()
        .query_one_raw(Statement::from_string(manager.get_database_backend(), &sql))
        .await?
        .ok_or_else(|| DbErr::Migration(format!("no row from {sql}")))?;
    for (n, (name, predicate)) in CHECKS.into_iter().enumerate() {
        let failing: i64 = row.try_get_by_index(n)?;
        if failing > 0 {
            return Err(DbErr::Migration(format!(
                "cannot add {name}: {failing} memory row(s) fail `{predicate}`; \
                 correct or delete them, then migrate again"
            )));
        }
    }
    Ok(())
}

/// PostgreSQL changes `memories` in place: the new columns are added, the
/// backfill puts every row's hashes in a temporary table, the table is
/// refilled with them (see [`refill_postgres_memories`]) with no index to
/// maintain, then the constraints and indexes are built on the filled table.
async fn upgrade_postgres_in_place(manager: &SchemaManager<'_>) -> Result<(), DbErr> {
    let db = manager.get_connection();
    for (setting, value) in POSTGRES_SETTINGS {
        db.execute_unprepared(&format!("SET LOCAL {setting} = '{value}'"))
            .await?;
    }
    drop_initial_indexes(manager).await?;
    let primary_key = drop_primary_key(manager).await?;
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
    db.execute_unprepared(&format!(
        "CREATE TEMPORARY TABLE {POSTGRES_HASHES} (id text, content_hash text, semantic_hash text)"
    ))
    .await?;
    backfill(manager).await?;
    refill_postgres_memories(manager).await?;
    restore_primary_key(manager, primary_key).await?;
    merge::merge_rows_that_normalize_alike(manager).await?;
    constrain_in_place(manager).await
}

/// Writes every row once, with its hashes: copied with them into a temporary
/// table (which PostgreSQL does not log), then `memories` is truncated and
/// refilled from it. An UPDATE would leave a dead version of every row in
/// the table, and each index build and check after it would read twice the
/// pages: the steps after the backfill took 2.5 times as long, measured.
async fn refill_postgres_memories(manager: &SchemaManager<'_>) -> Result<(), DbErr> {
    let db = manager.get_connection();
    let staged = MemoriesStaged.to_string();
    // Every column the table has, not only those 002 knows: the refill must
    // not lose any.
    let columns: Vec<String> = db
        .query_all_raw(Statement::from_string(
            DbBackend::Postgres,
            "SELECT quote_ident(attname) AS name FROM pg_attribute \
             WHERE attrelid = 'memories'::regclass AND attnum > 0 AND NOT attisdropped \
             ORDER BY attnum",
        ))
        .await?
        .iter()
        .map(|row| row.try_get("", "name"))
        .collect::<Result<_, _>>()?;
    let sources: Vec<String> = staged_sources(&columns, &HASH_COLUMNS)
        .iter()
        .zip(&columns)
        .map(|(source, column)| format!("{source} AS {column}"))
        .collect();
    // Analyzed, the planner hash-joins the hashes against one pass over
    // `memories` instead of sorting both by id.
    db.execute_unprepared(&format!("ANALYZE {POSTGRES_HASHES}"))
        .await?;
    db.execute_unprepared(&format!(
        "CREATE TEMPORARY TABLE {staged} AS SELECT {sources} \
         FROM memories JOIN {POSTGRES_HASHES} AS hashed ON hashed.id = memories.id",
        sources = sources.join(", "),
    ))
    .await?;
    db.execute_unprepared(&format!("DROP TABLE {POSTGRES_HASHES}"))
        .await?;
    db.execute_unprepared("TRUNCATE memories").await?;
    let columns = columns.join(", ");
    let result = db
        .execute_unprepared(&format!(
            "INSERT INTO memories ({columns}) SELECT {columns} FROM {staged}"
        ))
        .await?;
    tracing::info!(rows = result.rows_affected(), "wrote memory hashes");
    db.execute_unprepared(&format!("DROP TABLE {staged}"))
        .await?;
    Ok(())
}

/// The primary key would cost the refill an index insert per row, in random
/// id order (several times the refill itself): it is dropped first and built
/// again afterwards in one sort, as it was. Returns its name and definition,
/// `None` if the table has none.
async fn drop_primary_key(manager: &SchemaManager<'_>) -> Result<Option<(String, String)>, DbErr> {
    let db = manager.get_connection();
    let Some(row) = db
        .query_one_raw(Statement::from_string(
            DbBackend::Postgres,
            "SELECT quote_ident(conname) AS name, pg_get_constraintdef(oid) AS definition \
             FROM pg_constraint WHERE conrelid = 'memories'::regclass AND contype = 'p'",
        ))
        .await?
    else {
        return Ok(None);
    };
    let name: String = row.try_get("", "name")?;
    let definition: String = row.try_get("", "definition")?;
    db.execute_unprepared(&format!("ALTER TABLE memories DROP CONSTRAINT {name}"))
        .await?;
    Ok(Some((name, definition)))
}

async fn restore_primary_key(
    manager: &SchemaManager<'_>,
    primary_key: Option<(String, String)>,
) -> Result<(), DbErr> {
    let Some((name, definition)) = primary_key else {
        return Ok(());
    };
    manager
        .get_connection()
        .execute_unprepared(&format!(
            "ALTER TABLE memories ADD CONSTRAINT {name} {definition}"
        ))
        .await?;
    Ok(())
}

/// SQLite cannot add constraints in place, so `memories` is rebuilt anyway:
/// the backfill writes each row, with its hashes and rewritten timestamps,
/// into an unconstrained staging table that then stands in for `memories`
/// through the merge and the rebuild. Each row is written twice (staged,
/// rebuilt) instead of updated in place at random and then copied.
async fn upgrade_sqlite_by_rebuild(manager: &SchemaManager<'_>) -> Result<(), DbErr> {
    with_large_page_cache(manager, stage_merge_and_rebuild_sqlite(manager)).await
}

async fn stage_merge_and_rebuild_sqlite(manager: &SchemaManager<'_>) -> Result<(), DbErr> {
    manager.create_table(staged_memories_table()).await?;
    backfill(manager).await?;
    manager
        .drop_table(Table::drop().table(Memories::Table).to_owned())
        .await?;
    manager
        .rename_table(
            Table::rename()
                .table(MemoriesStaged, Memories::Table)
                .to_owned(),
        )
        .await?;
    // The merge rewrites and deletes rows by id; the rebuild drops this index
    // with the table.
    manager
        .create_index(
            Index::create()
                .name(STAGED_ID_INDEX)
                .table(Memories::Table)
                .col(Memories::Id)
                .to_owned(),
        )
        .await?;
    merge::merge_rows_that_normalize_alike(manager).await?;
    rebuild_sqlite_table(manager, hashed_memories_table(), all_hashed_indexes()).await
}

/// The v3 columns with their types but no constraint, default or index, so
/// filling it costs no index work: the rebuild adds them.
fn staged_memories_table() -> TableCreateStatement {
    let mut table = Table::create().table(MemoriesStaged).to_owned();
    for column in hashed_memories_table().get_columns() {
        let name = Alias::new(column.get_column_name());
        table.col(match column.get_column_type() {
            Some(column_type) => ColumnDef::new_with_type(name, column_type.clone()),
            None => ColumnDef::new(name),
        });
    }
    table
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

/// Computes both hashes of every row in Rust, a page at a time in storage
/// order, and writes each page (see [`write_hashed_page`]). On SQLite it also
/// rewrites the row's legacy timestamps: the Python system wrote naive
/// `2024-01-15 10:00:00.123456` (or `2024-01-15 10:00:00` from the
/// `CURRENT_TIMESTAMP` default) while the service writes and compares RFC
/// 3339 UTC text, and SQLite compares both as plain text. Each value is read
/// by the same sqlx decoder the service reads with (naive = UTC) and written
/// back by the same encoder it writes with, so the text is exactly the
/// service's.
async fn backfill(manager: &SchemaManager<'_>) -> Result<(), DbErr> {
    let db = manager.get_connection();
    let pending = count(manager, "SELECT COUNT(*) FROM memories").await?;
    tracing::info!(pending, "backfilling memory hashes");
    let mut pages = LegacyPages::open(db).await?;
    let mut hashed = 0;
    loop {
        let page = pages.next(db).await?;
        if page.is_empty() {
            break;
        }
        let rows = page
            .iter()
            .map(|row| hashed_values(row, &pages))
            .collect::<Result<Vec<_>, _>>()?;
        write_hashed_page(db, rows).await?;
        let before = hashed;
        hashed += page.len();
        if before / PROGRESS_EVERY != hashed / PROGRESS_EVERY {
            tracing::info!(hashed, pending, "backfilled memory hashes");
        }
    }
    pages.close(db).await?;
    tracing::info!(hashed, "backfill done");
    Ok(())
}

/// `memories` a page at a time in storage order, so that reading it is one
/// sequential pass: a cursor on PostgreSQL, rowid ranges on SQLite (in `id`
/// order, random like the UUIDs, each page would be scattered over the table).
enum LegacyPages {
    Postgres,
    Sqlite { after_rowid: i64 },
}

impl LegacyPages {
    async fn open(db: &impl ConnectionTrait) -> Result<Self, DbErr> {
        match db.get_database_backend() {
            DbBackend::Postgres => {
                db.execute_unprepared(
                    "DECLARE legacy_memories NO SCROLL CURSOR FOR SELECT id, content FROM memories",
                )
                .await?;
                Ok(Self::Postgres)
            }
            DbBackend::Sqlite => Ok(Self::Sqlite { after_rowid: 0 }),
            backend => Err(unsupported(backend)),
        }
    }

    async fn next(&mut self, db: &impl ConnectionTrait) -> Result<Vec<QueryResult>, DbErr> {
        match self {
            Self::Postgres => {
                db.query_all_raw(Statement::from_string(
                    DbBackend::Postgres,
                    format!("FETCH {BACKFILL_BATCH} FROM legacy_memories"),
                ))
                .await
            }
            Self::Sqlite { after_rowid } => {
                let page = db
                    .query_all_raw(Statement::from_sql_and_values(
                        DbBackend::Sqlite,
                        format!(
                            "SELECT rowid AS source, id, content, {timestamps} FROM memories \
                             WHERE rowid > ? ORDER BY rowid LIMIT {BACKFILL_BATCH}",
                            timestamps = LEGACY_TIMESTAMPS.join(", ")
                        ),
                        [(*after_rowid).into()],
                    ))
                    .await?;
                if let Some(last) = page.last() {
                    *after_rowid = last.try_get("", "source")?;
                }
                Ok(page)
            }
        }
    }

    async fn close(self, db: &impl ConnectionTrait) -> Result<(), DbErr> {
        if let Self::Postgres = self {
            db.execute_unprepared("CLOSE legacy_memories").await?;
        }
        Ok(())
    }
}

/// What the backfill computes for a row of [`LegacyPages`]: the row's key
/// (`id` on PostgreSQL, `rowid` on SQLite), both hashes and, on SQLite, the
/// rewritten [`LEGACY_TIMESTAMPS`].
fn hashed_values(row: &QueryResult, pages: &LegacyPages) -> Result<Vec<Value>, DbErr> {
    let content: String = row.try_get("", "content")?;
    let key = match pages {
        LegacyPages::Postgres => Value::from(row.try_get::<String>("", "id")?),
        LegacyPages::Sqlite { .. } => Value::from(row.try_get::<i64>("", "source")?),
    };
    let (content_hash, semantic_hash) = text::content_hashes(&content);
    let mut values = vec![
        key,
        content_hash.into(),
        text::format_semantic_hash(semantic_hash).into(),
    ];
    if let LegacyPages::Sqlite { .. } = pages {
        for column in LEGACY_TIMESTAMPS {
            values.push(legacy_timestamp(row, column)?.into());
        }
    }
    Ok(values)
}

/// PostgreSQL: into the temporary [`POSTGRES_HASHES`], for the refill.
/// SQLite: the page's rows, joined by rowid with what was computed for them,
/// into the staging table, so each row is written once there.
async fn write_hashed_page(db: &impl ConnectionTrait, rows: Vec<Vec<Value>>) -> Result<(), DbErr> {
    match db.get_database_backend() {
        DbBackend::Postgres => {
            for page in json_pages(&rows, POSTGRES_MESSAGE_BYTES) {
                db.execute_raw(Statement::from_sql_and_values(
                    DbBackend::Postgres,
                    format!(
                        "INSERT INTO {POSTGRES_HASHES} (id, content_hash, semantic_hash) \
                         SELECT hashed ->> 0, hashed ->> 1, hashed ->> 2 \
                         FROM json_array_elements($1::json) AS page (hashed)"
                    ),
                    [page.into()],
                ))
                .await?;
            }
            Ok(())
        }
        backend => {
            let computed: Vec<&str> = HASH_COLUMNS.into_iter().chain(LEGACY_TIMESTAMPS).collect();
            let columns: Vec<String> = initial::memories_table()
                .get_columns()
                .iter()
                .map(|column| column.get_column_name())
                .chain(HASH_COLUMNS.map(String::from))
                .collect();
            let sources = staged_sources(&columns, &computed);
            let sql = format!(
                "WITH hashed (source, {computed}) AS (VALUES {tuples}) \
                 INSERT INTO {staged} ({columns}) SELECT {sources} \
                 FROM hashed JOIN memories ON memories.rowid = hashed.source",
                computed = computed.join(", "),
                tuples = values_list(&mut placeholders(backend), &rows),
                staged = MemoriesStaged.to_string(),
                columns = columns.join(", "),
                sources = sources.join(", "),
            );
            db.execute_raw(Statement::from_sql_and_values(
                backend,
                sql,
                rows.into_iter().flatten(),
            ))
            .await?;
            Ok(())
        }
    }
}

/// Where each of a staging table's `columns` comes from: what the backfill
/// `computed`, from `hashed`; metadata, from [`metadata_or_empty`]; the rest,
/// from `memories`.
fn staged_sources(columns: &[String], computed: &[&str]) -> Vec<String> {
    columns
        .iter()
        .map(|column| match column.as_str() {
            "metadata" => metadata_or_empty(),
            name if computed.contains(&name) => format!("hashed.{column}"),
            _ => format!("memories.{column}"),
        })
        .collect()
}

/// `rows` as JSON arrays of arrays of at most `budget` bytes each (a longer
/// row alone), in order.
fn json_pages(rows: &[Vec<Value>], budget: usize) -> Vec<String> {
    let mut pages = Vec::new();
    let mut page = String::new();
    for row in rows {
        let row =
            Json::from(row.iter().map(sea_value_to_json_value).collect::<Vec<_>>()).to_string();
        if !page.is_empty() && page.len() + row.len() + 2 > budget {
            page.push(']');
            pages.push(std::mem::take(&mut page));
        }
        page.push(if page.is_empty() { '[' } else { ',' });
        page.push_str(&row);
    }
    if !page.is_empty() {
        page.push(']');
        pages.push(page);
    }
    pages
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

/// The bind parameters of a raw statement, in order.
fn placeholders(backend: DbBackend) -> impl Iterator<Item = String> {
    (1..).map(move |n| placeholder(backend, n))
}

/// `(p, p), (p, p)`: a VALUES list for `rows`, taking its parameters from
/// `placeholders`.
fn values_list(placeholders: &mut impl Iterator<Item = String>, rows: &[Vec<Value>]) -> String {
    let tuples: Vec<String> = rows
        .iter()
        .map(|values| {
            let row: Vec<String> = placeholders.by_ref().take(values.len()).collect();
            format!("({})", row.join(", "))
        })
        .collect();
    tuples.join(", ")
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
    let mut placeholders = placeholders(backend);
    let tuples = values_list(&mut placeholders, &rows);
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
        assignments = assignments.join(", "),
    );
    let values = rows.into_iter().flatten().chain(id_range);
    db.execute_raw(Statement::from_sql_and_values(backend, sql, values))
        .await?;
    Ok(())
}

/// `metadata`, or `{}` where it is empty: the v3 model makes it NOT NULL with
/// `{}` as its empty value, and SQLAlchemy's JSON type stores Python's `None`
/// as the JSON text `null`, so that counts as empty too. Part of the one write
/// of every row, so it costs no pass of its own.
fn metadata_or_empty() -> String {
    "CASE WHEN memories.metadata IS NULL OR CAST(memories.metadata AS TEXT) = 'null' \
     THEN '{}' ELSE memories.metadata END"
        .to_owned()
}

/// 001's unique constraint on the full content goes anyway, and 001's
/// secondary indexes are cheaper to build again afterwards than to maintain
/// row by row through the backfill (PostgreSQL; SQLite drops them with the
/// legacy table).
async fn drop_initial_indexes(manager: &SchemaManager<'_>) -> Result<(), DbErr> {
    for index in initial::memories_indexes() {
        let name = index.get_index_spec().get_name().unwrap_or_default();
        manager
            .drop_index(Index::drop().name(name).table(Memories::Table).to_owned())
            .await?;
    }
    manager
        .get_connection()
        .execute_unprepared("ALTER TABLE memories DROP CONSTRAINT uq_memory_session_content")
        .await?;
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
