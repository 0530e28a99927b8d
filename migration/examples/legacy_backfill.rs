//! Benchmark (not a test): migrates a database of the Python system holding N legacy
//! memories (1% of them colliding with another after normalization) and reports, with the
//! process's peak RSS so far, the rows/s of 002 (content hashing) on its own, then the time
//! of `migrate_up` over the migrations after it and the rows/s of the whole upgrade.
//!
//!     cargo run --release -p migration --example legacy_backfill -- sqlite 1000000
//!     cargo run --release -p migration --example legacy_backfill -- postgres 1000000
//!
//! PostgreSQL: a throwaway database on the server of ENGRAM_TEST_PG_URL (default
//! postgres://postgres@127.0.0.1:5432/postgres), dropped afterwards.

use std::time::Instant;

use migration::sea_orm::{ConnectionTrait, Database, DatabaseConnection};
use migration::{Migrator, MigratorTrait};

const COLLISION_EVERY: u64 = 100;

#[tokio::main]
async fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "warn,migration=info,legacy_backfill=info".into()),
        )
        .init();
    let mut args = std::env::args().skip(1);
    let backend = args.next().unwrap_or_else(|| "sqlite".to_owned());
    let rows: u64 = args
        .next()
        .map_or(1_000_000, |rows| rows.parse().expect("ROWS is a number"));

    let directory = tempfile::tempdir().expect("temporary directory");
    let admin_url = std::env::var("ENGRAM_TEST_PG_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".to_owned());
    let database = format!("engram_bench_{}", uuid::Uuid::new_v4().simple());
    let url = match backend.as_str() {
        "sqlite" => format!(
            "sqlite://{}?mode=rwc",
            directory.path().join("engram.db").display()
        ),
        "postgres" => {
            execute(
                &connect(&admin_url).await,
                &format!("CREATE DATABASE {database}"),
            )
            .await;
            let (server, _) = admin_url.rsplit_once('/').expect("a database in the url");
            format!("{server}/{database}")
        }
        other => panic!("backend is sqlite or postgres, not {other}"),
    };

    let db = connect(&url).await;
    Migrator::up(&db, Some(1)).await.expect("schema 001");
    let started = Instant::now();
    for sql in legacy_fill(&backend, rows) {
        execute(&db, &sql).await;
    }
    let total = rows + rows / COLLISION_EVERY;
    println!(
        "filled {total} legacy rows in {:.1} s",
        started.elapsed().as_secs_f64()
    );

    let started = Instant::now();
    Migrator::up(&db, Some(1)).await.expect("migration 002");
    let hashing = started.elapsed().as_secs_f64();
    println!(
        "{backend}: 002 content hashing of {total} legacy rows in {hashing:.1} s = {:.0} rows/s; \
         peak RSS {} MiB",
        total as f64 / hashing,
        peak_rss_kib() / 1024
    );

    let remaining: Vec<String> = Migrator::get_pending_migrations(&db)
        .await
        .expect("pending migrations")
        .iter()
        .map(|migration| migration.name().to_owned())
        .collect();
    let started = Instant::now();
    migration::migrate_up(&db).await.expect("migrate up");
    let rest = started.elapsed().as_secs_f64();
    println!(
        "{backend}: then migrate up ({}) in {rest:.1} s; the whole upgrade {:.1} s = {:.0} rows/s; \
         peak RSS {} MiB",
        remaining.join(", "),
        hashing + rest,
        total as f64 / (hashing + rest),
        peak_rss_kib() / 1024
    );

    db.close().await.expect("close");
    if backend == "postgres" {
        execute(
            &connect(&admin_url).await,
            &format!("DROP DATABASE {database} WITH (FORCE)"),
        )
        .await;
    }
}

async fn connect(url: &str) -> DatabaseConnection {
    Database::connect(url)
        .await
        .unwrap_or_else(|error| panic!("connect to {url}: {error}"))
}

async fn execute(db: &DatabaseConnection, sql: &str) {
    db.execute_unprepared(sql)
        .await
        .unwrap_or_else(|error| panic!("{sql}: {error}"));
}

/// `rows` memories in 1000 sessions, and every COLLISION_EVERY-th one again in another
/// spelling; ids in no particular order (like the Python system's UUIDs), timestamps as
/// the Python system wrote them.
fn legacy_fill(backend: &str, rows: u64) -> Vec<String> {
    let (numbers, id, created_at) = match backend {
        "postgres" => (
            format!("SELECT n FROM generate_series(1, {rows}) AS n"),
            "md5(kind || '-' || n)::uuid::text",
            "timestamptz '2024-01-01 00:00:00+00' + n * interval '1 second'",
        ),
        _ => (
            format!(
                "WITH RECURSIVE numbers(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM numbers \
                 WHERE n < {rows}) SELECT n FROM numbers"
            ),
            "printf('%08x-0000-4000-800%d-%012x', n * 2654435761 % 4294967296, kind, n)",
            "strftime('%Y-%m-%d %H:%M:%f', 1704067200 + n, 'unixepoch') || '000'",
        ),
    };
    [(1, "'Legacy note number ' || n"), (2, "'  legacy NOTE number ' || n || '!!'")]
        .iter()
        .map(|(kind, content)| {
            let filter = if *kind == 1 {
                String::new()
            } else {
                format!("WHERE n % {COLLISION_EVERY} = 0")
            };
            format!(
                "INSERT INTO memories (id, session_id, content_type, content, metadata, \
                 importance, access_count, created_at, updated_at) \
                 SELECT {id}, 'session-' || (n % 1000), 'fact', {content}, '{{}}', 0.5, 1, \
                 {created_at}, {created_at} FROM (SELECT n, {kind} AS kind FROM ({numbers}) AS numbers) \
                 AS legacy {filter}"
            )
        })
        .collect()
}

/// VmHWM of this process (Linux), in KiB.
fn peak_rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find_map(|line| line.strip_prefix("VmHWM:"))
                .and_then(|value| value.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0)
}
