//! `engram migrate` as its own process against databases the Python system left behind:
//! killed mid-backfill and run again, and (PostgreSQL) two runs started together.

mod common;

use std::io::{BufRead, BufReader, Read};
use std::os::unix::process::ExitStatusExt;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc::{Receiver, RecvTimeoutError, channel};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{Backend, TestDatabase};
use engram_domain::text;
use migration::sea_orm::{
    ConnectionTrait, Database, DatabaseConnection, DbBackend, Statement, TransactionTrait,
};
use migration::{MIGRATION_LOCK_NAME, Migrator, MigratorTrait, SchemaManager};

/// Large enough that the backfill logs progress (every 50,000 rows) well before it ends.
const LEGACY_ROWS: i64 = 200_000;
/// Every this many rows, one more row whose content normalizes like it (then merged).
const COLLISION_EVERY: i64 = 10_000;
const ALL: [&str; 5] = [
    "m20240101_000001_initial_schema",
    "m20240115_000002_add_content_hashing",
    "m20261124_000003_request_log",
    "m20261124_000004_tenancy",
    "m20261124_000005_lean_indexes",
];
const APPLYING_002: &str = "Applying migration 'm20240115_000002_add_content_hashing'";
/// A guard against a hung process, never an expectation of speed.
const PATIENCE: Duration = Duration::from_secs(300);

/// A database as the Python system left it: Alembic at 001, no sea-orm bookkeeping, and
/// `rows` legacy memories (timestamps as the Python system wrote them) plus the collisions.
async fn python_database(backend: Backend, rows: i64) -> TestDatabase {
    let database = TestDatabase::create(backend).await;
    let db = Database::connect(database.url()).await.expect("connect");
    Migrator::up(&db, Some(1)).await.expect("schema 001");
    let fill = match backend {
        Backend::Postgres => format!(
            "INSERT INTO memories (id, session_id, content_type, content, metadata, importance, \
             access_count, created_at, updated_at) \
             SELECT md5(n::text)::uuid::text, 'session-' || (n % 1000), 'fact', \
             'Legacy note number ' || n, json_build_object('n', n), 0.5, 1, \
             timestamptz '2024-01-01 00:00:00+00' + n * interval '1 second', \
             timestamptz '2024-01-01 00:00:00+00' + n * interval '1 second' \
             FROM generate_series(1, {rows}) AS n; \
             INSERT INTO memories (id, session_id, content_type, content, metadata, importance, \
             access_count, created_at, updated_at) \
             SELECT md5('dup' || n)::uuid::text, 'session-' || (n % 1000), 'fact', \
             '  legacy NOTE number ' || n || '!!', '{{}}', 0.9, 2, \
             timestamptz '2025-01-01 00:00:00+00', timestamptz '2025-01-01 00:00:00+00' \
             FROM generate_series({COLLISION_EVERY}, {rows}, {COLLISION_EVERY}) AS n"
        ),
        // SQLAlchemy wrote naive text with six fraction digits.
        Backend::Sqlite => format!(
            "WITH RECURSIVE n(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM n WHERE n < {rows}) \
             INSERT INTO memories (id, session_id, content_type, content, metadata, importance, \
             access_count, created_at, updated_at) \
             SELECT printf('%08x-0000-4000-8000-%012x', n, n), 'session-' || (n % 1000), 'fact', \
             'Legacy note number ' || n, json_object('n', n), 0.5, 1, \
             strftime('%Y-%m-%d %H:%M:%f', 1704067200 + n, 'unixepoch') || '000', \
             strftime('%Y-%m-%d %H:%M:%f', 1704067200 + n, 'unixepoch') || '000' FROM n; \
             WITH RECURSIVE n(n) AS (SELECT {COLLISION_EVERY} UNION ALL \
             SELECT n + {COLLISION_EVERY} FROM n WHERE n + {COLLISION_EVERY} <= {rows}) \
             INSERT INTO memories (id, session_id, content_type, content, metadata, importance, \
             access_count, created_at, updated_at) \
             SELECT printf('%08x-0000-4000-9000-%012x', n, n), 'session-' || (n % 1000), 'fact', \
             '  legacy NOTE number ' || n || '!!', '{{}}', 0.9, 2, \
             '2025-01-01 00:00:00.000000', '2025-01-01 00:00:00' FROM n"
        ),
    };
    for sql in [
        fill.as_str(),
        "DROP TABLE seaql_migrations",
        "CREATE TABLE alembic_version (version_num VARCHAR(32) NOT NULL, \
         CONSTRAINT alembic_version_pkc PRIMARY KEY (version_num))",
        "INSERT INTO alembic_version (version_num) VALUES ('001_initial_schema')",
    ] {
        db.execute_unprepared(sql)
            .await
            .unwrap_or_else(|error| panic!("{sql}: {error}"));
    }
    db.close().await.expect("close");
    database
}

/// One `engram migrate` process, its stdout and stderr collected line by line.
struct MigrateRun {
    child: Child,
    lines: Receiver<String>,
    log: Arc<Mutex<String>>,
    readers: Vec<std::thread::JoinHandle<()>>,
}

impl MigrateRun {
    fn start(database_url: &str) -> Self {
        let mut child = Command::new(env!("CARGO_BIN_EXE_engram"))
            .args(["migrate", "--database-url", database_url])
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn engram migrate");
        let log = Arc::new(Mutex::new(String::new()));
        let (sender, lines) = channel();
        let streams: [Box<dyn Read + Send>; 2] = [
            Box::new(child.stdout.take().expect("stdout")),
            Box::new(child.stderr.take().expect("stderr")),
        ];
        let readers = streams
            .into_iter()
            .map(|stream| {
                let (log, sender) = (log.clone(), sender.clone());
                std::thread::spawn(move || {
                    for line in BufReader::new(stream).lines().map_while(Result::ok) {
                        log.lock().expect("log").push_str(&format!("{line}\n"));
                        let _ = sender.send(line);
                    }
                })
            })
            .collect();
        Self {
            child,
            lines,
            log,
            readers,
        }
    }

    fn log(&self) -> String {
        self.log.lock().expect("log").clone()
    }

    /// Blocks until the process prints a line containing `text`.
    fn wait_for_line(&self, text: &str) {
        let deadline = Instant::now() + PATIENCE;
        loop {
            match self
                .lines
                .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            {
                Ok(line) if line.contains(text) => return,
                Ok(_) => {}
                Err(RecvTimeoutError::Timeout | RecvTimeoutError::Disconnected) => {
                    panic!("engram never printed {text:?}; its log:\n{}", self.log())
                }
            }
        }
    }

    fn wait(&mut self) -> ExitStatus {
        let deadline = Instant::now() + PATIENCE;
        loop {
            if let Some(status) = self.child.try_wait().expect("wait") {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "engram migrate hung; its log:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn succeeds(mut self) -> String {
        let status = self.wait();
        // The readers finish once the exited process's pipes close: the log is complete.
        for reader in self.readers.drain(..) {
            reader.join().expect("log reader");
        }
        assert!(
            status.success(),
            "engram migrate failed ({status}); its log:\n{}",
            self.log()
        );
        self.log()
    }
}

impl Drop for MigrateRun {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn applied(db: &DatabaseConnection) -> Vec<String> {
    Migrator::get_applied_migrations(db)
        .await
        .expect("seaql_migrations")
        .iter()
        .map(|migration| migration.name().to_owned())
        .collect()
}

async fn single_i64(db: &DatabaseConnection, sql: &str) -> i64 {
    db.query_one_raw(Statement::from_string(db.get_database_backend(), sql))
        .await
        .expect(sql)
        .expect("a row")
        .try_get_by_index(0)
        .expect("an integer")
}

/// The end state of one correct migration of [`python_database`]: every migration
/// recorded once, each collision merged into its older twin, every hash the service's.
async fn assert_correctly_migrated(db: &DatabaseConnection, rows: i64) {
    assert_eq!(applied(db).await, ALL);
    assert_eq!(single_i64(db, "SELECT COUNT(*) FROM memories").await, rows);
    let merged = single_i64(
        db,
        "SELECT COUNT(*) FROM memories WHERE content LIKE 'Legacy note number %' \
         AND importance = 0.9 AND access_count = 3",
    )
    .await;
    assert_eq!(
        merged,
        rows / COLLISION_EVERY,
        "each collision merged into the older row"
    );
    let mut checked = 0;
    let mut after = String::new();
    loop {
        let page = db
            .query_all_raw(Statement::from_sql_and_values(
                db.get_database_backend(),
                match db.get_database_backend() {
                    DbBackend::Postgres => {
                        "SELECT id, content, content_hash, semantic_hash FROM memories \
                         WHERE id > $1 ORDER BY id LIMIT 10000"
                    }
                    _ => {
                        "SELECT id, content, content_hash, semantic_hash FROM memories \
                         WHERE id > ? ORDER BY id LIMIT 10000"
                    }
                },
                [after.clone().into()],
            ))
            .await
            .expect("a page of memories");
        let Some(last) = page.last() else { break };
        after = last.try_get("", "id").expect("id");
        for row in &page {
            let content: String = row.try_get("", "content").expect("content");
            let content_hash: String = row.try_get("", "content_hash").expect("content_hash");
            let semantic_hash: String = row.try_get("", "semantic_hash").expect("semantic_hash");
            assert_eq!(content_hash, text::content_hash(&content), "{content}");
            assert_eq!(
                semantic_hash,
                text::format_semantic_hash(text::semantic_hash(&content)),
                "{content}"
            );
        }
        checked += page.len();
    }
    assert_eq!(checked as i64, rows);
}

/// SIGKILL while 002 backfills: its transaction never commits, so the database is left
/// adopted at 001 with no trace of 002, and the next run migrates it completely.
async fn killed_mid_backfill_then_run_again_finishes(backend: Backend) {
    let database = python_database(backend, LEGACY_ROWS).await;

    let mut first = MigrateRun::start(database.url());
    first.wait_for_line("backfilled memory hashes");
    first.child.kill().expect("SIGKILL engram migrate");
    let status = first.wait();
    assert_eq!(
        status.signal(),
        Some(9),
        "engram migrate ended before the kill ({status}); its log:\n{}",
        first.log()
    );

    let db = Database::connect(database.url()).await.expect("connect");
    assert_eq!(
        applied(&db).await,
        ALL[..1],
        "the adoption committed, 002 did not"
    );
    let has_hashes = SchemaManager::new(&db)
        .has_column("memories", "content_hash")
        .await
        .expect("catalog");
    assert!(!has_hashes, "the killed 002 left a column behind");
    assert_eq!(
        single_i64(&db, "SELECT COUNT(*) FROM memories").await,
        LEGACY_ROWS + LEGACY_ROWS / COLLISION_EVERY
    );
    db.close().await.expect("close");

    let log = MigrateRun::start(database.url()).succeeds();
    assert!(
        log.contains(APPLYING_002),
        "the second run applied 002; its log:\n{log}"
    );
    let db = Database::connect(database.url()).await.expect("connect");
    assert_correctly_migrated(&db, LEGACY_ROWS).await;
}

/// Two runs started together: both wait on the migration lock (held here until both
/// are queued, so they really overlap), then one migrates and the other finds nothing
/// left to do.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_runs_started_together_make_one_migration() {
    let rows = 50_000;
    let database = python_database(Backend::Postgres, rows).await;
    let db = Database::connect(database.url()).await.expect("connect");
    let holder = db.begin().await.expect("begin");
    holder
        .execute_raw(Statement::from_sql_and_values(
            DbBackend::Postgres,
            "SELECT pg_advisory_xact_lock(hashtextextended($1, 0))",
            [MIGRATION_LOCK_NAME.into()],
        ))
        .await
        .expect("take the migration lock");

    let mut runs = [
        MigrateRun::start(database.url()),
        MigrateRun::start(database.url()),
    ];
    let deadline = Instant::now() + PATIENCE;
    while single_i64(
        &db,
        "SELECT COUNT(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted \
         AND database = (SELECT oid FROM pg_database WHERE datname = current_database())",
    )
    .await
        < 2
    {
        let exited = runs
            .iter_mut()
            .any(|run| run.child.try_wait().expect("wait").is_some());
        assert!(
            !exited && Instant::now() < deadline,
            "the runs did not both queue on the migration lock; their logs:\n{}\n{}",
            runs[0].log(),
            runs[1].log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    holder.commit().await.expect("release the migration lock");

    let logs = runs.map(MigrateRun::succeeds);
    let migrated = logs.iter().filter(|log| log.contains(APPLYING_002)).count();
    assert_eq!(
        migrated, 1,
        "exactly one run applied 002; their logs:\n{}\n{}",
        logs[0], logs[1]
    );
    assert!(
        logs.iter().any(|log| log.contains("No pending migrations")),
        "the other run found nothing to do; their logs:\n{}\n{}",
        logs[0],
        logs[1]
    );
    assert_correctly_migrated(&db, rows).await;
}

on_both_backends!(killed_mid_backfill_then_run_again_finishes);
