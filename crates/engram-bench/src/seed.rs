//! Grows the memories table to a million rows in seconds: set-based INSERT ... SELECT over a
//! generated series, straight into the database (the service would take minutes). The rows
//! are live filler memories of their own sessions, 100 a session, never retrieved. On
//! PostgreSQL the table is then vacuumed, analyzed and checkpointed.

use sea_orm::{ConnectionTrait, Database, DatabaseConnection, DbBackend, Statement};

use crate::server::Failure;

/// Rows per statement: each is one transaction, short enough not to stall the server.
const ROWS_PER_STATEMENT: u64 = 50_000;
/// Filler memories per filler session, the default session cap.
const ROWS_PER_SESSION: u64 = 100;

pub async fn count(db: &DatabaseConnection) -> Result<u64, Failure> {
    let row = db
        .query_one_raw(Statement::from_string(
            db.get_database_backend(),
            "SELECT COUNT(*) AS n FROM memories",
        ))
        .await?
        .ok_or("COUNT returned no row")?;
    Ok(row.try_get::<i64>("", "n")? as u64)
}

/// Adds filler memories until the table holds `total` rows; returns how many it added.
pub async fn fill_to(url: &str, total: u64) -> Result<u64, Failure> {
    let db = Database::connect(url).await?;
    let missing = total.saturating_sub(count(&db).await?);
    let mut added = 0;
    while added < missing {
        let rows = ROWS_PER_STATEMENT.min(missing - added);
        db.execute_unprepared(&insert_filler(db.get_database_backend(), added, rows))
            .await?;
        added += rows;
    }
    settle(&db).await?;
    Ok(added)
}

/// PostgreSQL: what autovacuum and the checkpointer would do to a table that grew this much
/// before it is queried in earnest (statistics, visibility map, dirty pages written), so the
/// measurement sees a settled table rather than the bulk load's write-back. SQLite needs none.
async fn settle(db: &DatabaseConnection) -> Result<(), Failure> {
    if db.get_database_backend() == DbBackend::Postgres {
        db.execute_unprepared("VACUUM (ANALYZE) memories").await?;
        db.execute_unprepared("CHECKPOINT").await?;
    }
    Ok(())
}

/// Rows `first .. first + rows` of the filler; ids, hashes and sessions derive from the row
/// number so a second fill never collides with the first.
fn insert_filler(backend: DbBackend, first: u64, rows: u64) -> String {
    let last = first + rows - 1;
    let columns = "id, session_id, content_type, content, content_hash, semantic_hash, metadata, \
                   importance, expires_at, access_count, last_accessed, created_at, updated_at, deleted_at";
    match backend {
        DbBackend::Postgres => format!(
            "INSERT INTO memories ({columns}) \
             SELECT md5('filler' || g)::uuid::text, 'filler-' || (g / {ROWS_PER_SESSION}), 'fact', \
                    'Filler memory number ' || g, md5('filler' || g) || md5('content' || g), \
                    lpad(to_hex((g * 2654435761) % 4294967296), 16, '0'), '{{\"source\":\"seed\"}}', \
                    0.5, now() + interval '30 days', 0, NULL, now(), now(), NULL \
             FROM generate_series({first}::bigint, {last}::bigint) AS g \
             ON CONFLICT DO NOTHING"
        ),
        // SQLite stores timestamps as RFC 3339 text, as the service writes them.
        _ => format!(
            "WITH RECURSIVE g(n) AS (SELECT {first} UNION ALL SELECT n + 1 FROM g WHERE n < {last}) \
             INSERT OR IGNORE INTO memories ({columns}) \
             SELECT printf('%08x-0000-4000-8000-%012x', n / 4096, n), 'filler-' || (n / {ROWS_PER_SESSION}), 'fact', \
                    'Filler memory number ' || n, printf('%064x', n), printf('%016x', (n * 2654435761) % 4294967296), \
                    '{{\"source\":\"seed\"}}', 0.5, strftime('%Y-%m-%dT%H:%M:%f+00:00', 'now', '+30 days'), 0, NULL, \
                    strftime('%Y-%m-%dT%H:%M:%f+00:00', 'now'), strftime('%Y-%m-%dT%H:%M:%f+00:00', 'now'), NULL \
             FROM g"
        ),
    }
}
