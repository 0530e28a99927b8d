//! Scenarios shared by the SQLite and PostgreSQL tests. Each backend supplies
//! a [`Catalog`]: its schema as read from the database's own catalog, and the
//! shapes expected after 001 and after every migration.

use std::collections::{BTreeSet, HashMap};
use std::fmt::Debug;

use chrono::{DateTime, TimeZone, Utc};
use engram_domain::text;
use migration::sea_orm::prelude::Json;
use migration::sea_orm::{
    ConnectionTrait, DatabaseConnection, DbBackend, DbErr, QueryResult, Statement,
};
use migration::{Alias, Expr, Migrator, MigratorTrait, Query, SchemaManager, Value};
use uuid::Uuid;

pub(crate) const INITIAL: &str = "m20240101_000001_initial_schema";
pub(crate) const ALL: [&str; 5] = [
    "m20240101_000001_initial_schema",
    "m20240115_000002_add_content_hashing",
    "m20261124_000003_request_log",
    "m20261124_000004_tenancy",
    "m20261124_000005_lean_indexes",
];

/// The corpus `scripts/gen_hash_fixtures.py` hashed with the reference
/// Python: input, normalized, content_hash and semantic_hash per line.
const PYTHON_FIXTURES: &str =
    include_str!("../../../crates/engram-domain/tests/fixtures/python_hashes.jsonl");

/// More than two backfill pages of 1000.
const BULK_ROWS: usize = 2500;

/// A backend's schema read from its catalog (the bookkeeping tables
/// `seaql_migrations` and `alembic_version` excluded).
pub(crate) trait Catalog: Debug + PartialEq + Sized {
    async fn read(db: &DatabaseConnection) -> Self;
    /// The shape 001 alone creates.
    fn after_initial() -> Self;
    /// The shape every migration together creates.
    fn after_all() -> Self;
}

/// A row of `memories` in the columns every version has.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Memory {
    pub id: String,
    pub session_id: String,
    pub content_type: String,
    pub content: String,
    pub metadata: Option<Json>,
    pub importance: f64,
    pub access_count: i32,
    pub last_accessed: Option<DateTime<Utc>>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

impl Memory {
    pub fn new(session_id: &str, content_type: &str, content: &str) -> Self {
        Self {
            id: Uuid::new_v4().to_string(),
            session_id: session_id.to_owned(),
            content_type: content_type.to_owned(),
            content: content.to_owned(),
            metadata: Some(json(r#"{"source": "test"}"#)),
            importance: 0.5,
            access_count: 0,
            last_accessed: None,
            created_at: at("2024-01-10 09:30:00.250000"),
            updated_at: at("2024-01-10 09:30:00.250000"),
        }
    }
}

/// A UTC instant written as the Python system wrote it to SQLite.
pub(crate) fn at(python_text: &str) -> DateTime<Utc> {
    Utc.from_utc_datetime(
        &chrono::NaiveDateTime::parse_from_str(python_text, "%Y-%m-%d %H:%M:%S%.f")
            .unwrap_or_else(|error| panic!("{python_text}: {error}")),
    )
}

/// Catalog lines in a stable order.
pub(crate) fn sorted<const N: usize>(lines: [&str; N]) -> Vec<String> {
    let mut lines = lines.map(String::from).to_vec();
    lines.sort();
    lines
}

pub(crate) fn json(text: &str) -> Json {
    text.parse().expect("test metadata is valid json")
}

pub(crate) async fn applied(db: &DatabaseConnection) -> Vec<String> {
    Migrator::get_applied_migrations(db)
        .await
        .expect("read seaql_migrations")
        .iter()
        .map(|migration| migration.name().to_owned())
        .collect()
}

/// Inserts rows into a 001 table (which has no hash columns), timestamps as
/// the Python system wrote them: SQLAlchemy's naive text with microseconds
/// on SQLite, or the `CURRENT_TIMESTAMP` default's text without (used here
/// for whole seconds); `timestamptz` on PostgreSQL.
pub(crate) async fn insert_legacy(db: &DatabaseConnection, memories: &[Memory]) {
    for chunk in memories.chunks(500) {
        let mut insert = Query::insert()
            .into_table(Alias::new("memories"))
            .columns(
                [
                    "id",
                    "session_id",
                    "content_type",
                    "content",
                    "metadata",
                    "importance",
                    "access_count",
                    "last_accessed",
                    "created_at",
                    "updated_at",
                ]
                .map(Alias::new),
            )
            .to_owned();
        for memory in chunk {
            let mut values = common_values(memory).to_vec();
            let backend = db.get_database_backend();
            values.extend([
                legacy_timestamp(backend, memory.last_accessed),
                legacy_timestamp(backend, Some(memory.created_at)),
                legacy_timestamp(backend, Some(memory.updated_at)),
            ]);
            insert.values_panic(values);
        }
        db.execute(&insert).await.expect("insert legacy memories");
    }
}

fn legacy_timestamp(backend: DbBackend, at: Option<DateTime<Utc>>) -> Expr {
    match backend {
        DbBackend::Sqlite => Expr::val(at.map(|at| {
            let format = if at.timestamp_subsec_micros() == 0 {
                "%Y-%m-%d %H:%M:%S"
            } else {
                "%Y-%m-%d %H:%M:%S%.6f"
            };
            at.format(format).to_string()
        })),
        _ => Expr::val(at),
    }
}

/// Inserts one row into the v3 table with the hashes computed the service's way.
pub(crate) async fn insert_hashed(db: &DatabaseConnection, memory: &Memory) -> Result<(), DbErr> {
    let content_hash = text::content_hash(&memory.content);
    insert_with_hash(db, memory, Some(content_hash)).await
}

async fn insert_with_hash(
    db: &DatabaseConnection,
    memory: &Memory,
    content_hash: Option<String>,
) -> Result<(), DbErr> {
    let semantic_hash = text::format_semantic_hash(text::semantic_hash(&memory.content));
    let mut values = common_values(memory).to_vec();
    // Bound as chrono values: the text sqlx writes is the service's.
    values.extend([
        Expr::val(memory.created_at),
        Expr::val(memory.updated_at),
        Expr::val(content_hash),
        Expr::val(semantic_hash),
    ]);
    let insert = Query::insert()
        .into_table(Alias::new("memories"))
        .columns(
            [
                "id",
                "session_id",
                "content_type",
                "content",
                "metadata",
                "importance",
                "access_count",
                "created_at",
                "updated_at",
                "content_hash",
                "semantic_hash",
            ]
            .map(Alias::new),
        )
        .values_panic(values)
        .to_owned();
    db.execute(&insert).await.map(|_| ())
}

fn common_values(memory: &Memory) -> [Expr; 7] {
    [
        Expr::val(memory.id.as_str()),
        Expr::val(memory.session_id.as_str()),
        Expr::val(memory.content_type.as_str()),
        Expr::val(memory.content.as_str()),
        Expr::val(Value::Json(memory.metadata.clone().map(Box::new))),
        Expr::val(memory.importance),
        Expr::val(memory.access_count),
    ]
}

/// Every row of `memories` in id order, timestamps read as the service reads them.
pub(crate) async fn stored_memories(db: &DatabaseConnection) -> Vec<Memory> {
    let rows = query_all(
        db,
        "SELECT id, session_id, content_type, content, metadata, importance, access_count, \
         last_accessed, created_at, updated_at FROM memories",
    )
    .await;
    let mut memories: Vec<Memory> = rows
        .iter()
        .map(|row| Memory {
            id: get(row, "id"),
            session_id: get(row, "session_id"),
            content_type: get(row, "content_type"),
            content: get(row, "content"),
            metadata: get(row, "metadata"),
            importance: get(row, "importance"),
            access_count: get(row, "access_count"),
            last_accessed: get(row, "last_accessed"),
            created_at: get(row, "created_at"),
            updated_at: get(row, "updated_at"),
        })
        .collect();
    // In Rust's order: PostgreSQL's collation may order ids differently.
    memories.sort_by(|a, b| a.id.cmp(&b.id));
    memories
}

pub(crate) fn get<T: migration::sea_orm::TryGetable>(row: &QueryResult, column: &str) -> T {
    row.try_get("", column)
        .unwrap_or_else(|error| panic!("{column}: {error}"))
}

pub(crate) async fn query_all(db: &DatabaseConnection, sql: &str) -> Vec<QueryResult> {
    db.query_all_raw(Statement::from_string(db.get_database_backend(), sql))
        .await
        .unwrap_or_else(|error| panic!("{sql}: {error}"))
}

pub(crate) async fn has_table(db: &DatabaseConnection, table: &str) -> bool {
    SchemaManager::new(db)
        .has_table(table)
        .await
        .expect("read the catalog")
}

/// Legacy rows exercising what the backfill must get right: NULL metadata
/// (SQL NULL and SQLAlchemy's JSON `null`), Unicode and Python-only
/// whitespace, timestamps with and without microseconds, several keyset
/// pages, plus `extra`.
pub(crate) fn legacy_memories(extra: &[Memory]) -> Vec<Memory> {
    let mut memories = vec![
        Memory {
            metadata: None,
            access_count: 3,
            last_accessed: Some(at("2024-01-12 18:00:00")),
            ..Memory::new("s1", "preference", "Hello, World!")
        },
        Memory {
            metadata: Some(json(r#"{"lang": ["el", "de"]}"#)),
            created_at: at("2024-01-11 08:00:00"),
            updated_at: at("2024-01-11 08:00:00.000001"),
            ..Memory::new("s1", "fact", "ΟΔΟΣ Σ straße İstanbul 日本語 👋")
        },
        Memory {
            metadata: Some(Json::Null),
            ..Memory::new("s2", "context", "  tabs\tand\u{1f}unit\u{3000}separators  ")
        },
        Memory::new("s2", "context", "...!?"),
    ];
    memories.extend((0..BULK_ROWS).map(|n| Memory {
        importance: 0.25,
        ..Memory::new("bulk", "fact", &format!("note {n}"))
    }));
    memories.extend_from_slice(extra);
    memories
}

/// Asserts `actual == expected` (both in id order), printing only the rows
/// that differ: the tables hold thousands.
#[track_caller]
pub(crate) fn assert_same_memories(actual: &[Memory], expected: &[Memory]) {
    let differing: Vec<String> = actual
        .iter()
        .zip(expected)
        .filter(|(actual, expected)| actual != expected)
        .take(3)
        .map(|(actual, expected)| format!("stored   {actual:?}\nexpected {expected:?}"))
        .collect();
    assert!(
        differing.is_empty() && actual.len() == expected.len(),
        "{} rows stored, {} expected; first differences:\n{}",
        actual.len(),
        expected.len(),
        differing.join("\n")
    );
}

/// `rows` as they are after the upgrade replaced empty metadata by `{}`.
fn with_empty_metadata(rows: &[Memory]) -> Vec<Memory> {
    let mut rows = rows.to_vec();
    for row in &mut rows {
        if matches!(row.metadata, None | Some(Json::Null)) {
            row.metadata = Some(json("{}"));
        }
    }
    rows.sort_by(|a, b| a.id.cmp(&b.id));
    rows
}

/// Migrating up from nothing yields the final schema, whose constraints hold.
pub(crate) async fn up_from_empty_builds_the_final_schema<C: Catalog>(db: &DatabaseConnection) {
    migration::migrate_up(db).await.expect("migrate up");
    assert_eq!(applied(db).await, ALL);
    assert_eq!(C::read(db).await, C::after_all());
    constraints_reject_bad_rows(db).await;
    request_log_accepts_a_response(db).await;
}

async fn constraints_reject_bad_rows(db: &DatabaseConnection) {
    let original = Memory::new("s1", "fact", "Hello World");
    insert_hashed(db, &original)
        .await
        .expect("a valid memory is accepted");

    // Same normalized content, so the same content_hash: rejected in the same
    // session and type, accepted under another type.
    let same_text = Memory::new("s1", "fact", "hello   WORLD.");
    expect_violation(
        insert_hashed(db, &same_text).await,
        "unique constraint",
        "content_hash",
    );
    insert_hashed(
        db,
        &Memory {
            content_type: "preference".into(),
            ..same_text.clone()
        },
    )
    .await
    .expect("the same text under another content_type is accepted");

    for importance in [0.0, 1.0] {
        let edge = Memory {
            importance,
            ..Memory::new("s1", "fact", &format!("edge {importance}"))
        };
        insert_hashed(db, &edge)
            .await
            .expect("importance at the range edge is accepted");
    }
    for importance in [-0.01, 1.01] {
        let out_of_range = Memory {
            importance,
            ..Memory::new("s1", "fact", "out of range")
        };
        expect_violation(
            insert_hashed(db, &out_of_range).await,
            "check constraint",
            "ck_memory_importance_range",
        );
    }
    let negative = Memory {
        access_count: -1,
        ..Memory::new("s1", "fact", "negative")
    };
    expect_violation(
        insert_hashed(db, &negative).await,
        "check constraint",
        "ck_memory_access_count_positive",
    );
    let unhashed = Memory::new("s1", "fact", "unhashed");
    expect_violation(
        insert_with_hash(db, &unhashed, None).await,
        "not null constraint",
        "content_hash",
    );
    let no_metadata = Memory {
        metadata: None,
        ..Memory::new("s1", "fact", "no metadata")
    };
    expect_violation(
        insert_hashed(db, &no_metadata).await,
        "not null constraint",
        "metadata",
    );

    assert_eq!(
        stored_memories(db).await.len(),
        4,
        "only the accepted rows are stored"
    );
}

/// Asserts a database error of `kind` ("unique constraint", ...) naming `subject`.
fn expect_violation(result: Result<(), DbErr>, kind: &str, subject: &str) {
    let error = result.expect_err(&format!("expected a {kind} violation on {subject}"));
    // PostgreSQL says "not-null", SQLite "NOT NULL".
    let message = error
        .to_string()
        .to_lowercase()
        .replace("not-null", "not null");
    assert!(
        message.contains(kind) && message.contains(subject),
        "expected a {kind} violation on {subject}, got: {error}"
    );
}

async fn request_log_accepts_a_response(db: &DatabaseConnection) {
    let response = vec![0_u8, 159, 146, 150, 255];
    let insert = Query::insert()
        .into_table(Alias::new("memory_requests"))
        .columns(["request_id", "request_digest", "response", "created_at"].map(Alias::new))
        .values_panic([
            Expr::val(Uuid::new_v4().to_string()),
            Expr::val("d".repeat(64)),
            Expr::val(response.clone()),
            Expr::current_timestamp(),
        ])
        .to_owned();
    db.execute(&insert)
        .await
        .expect("insert a request log entry");
    let rows = query_all(db, "SELECT response FROM memory_requests").await;
    let stored: Vec<u8> = get(&rows[0], "response");
    assert_eq!(stored, response, "the response round-trips byte for byte");
}

/// 001 with legacy rows -> up: every row hashed as the service hashes and
/// empty metadata replaced; -> down to 001: the 001 shape and rows are back;
/// -> up again: the final schema again.
pub(crate) async fn legacy_rows_survive_up_and_down<C: Catalog>(
    db: &DatabaseConnection,
    legacy: &[Memory],
) {
    Migrator::up(db, Some(1)).await.expect("migrate up to 001");
    assert_eq!(C::read(db).await, C::after_initial());
    insert_legacy(db, legacy).await;
    assert_eq!(stored_memories(db).await.len(), legacy.len());

    migration::migrate_up(db)
        .await
        .expect("migrate up from 001");
    assert_eq!(C::read(db).await, C::after_all());
    assert_hashes_match_contents(db, legacy.len()).await;
    assert_eq!(
        tenants(db).await,
        [migration::DEFAULT_TENANT],
        "legacy rows belong to the default tenant"
    );
    assert_same_memories(&stored_memories(db).await, &with_empty_metadata(legacy));

    Migrator::down(db, Some(3))
        .await
        .expect("roll back the indexes, tenancy and the request log");
    migration::migrate_down(db)
        .await
        .expect("migrate down to 001");
    assert_eq!(applied(db).await, [INITIAL]);
    assert_eq!(C::read(db).await, C::after_initial());
    // Empty metadata stays '{}': the upgrade cannot know which rows had NULL.
    assert_same_memories(&stored_memories(db).await, &with_empty_metadata(legacy));

    migration::migrate_up(db)
        .await
        .expect("migrate up again after down");
    assert_eq!(C::read(db).await, C::after_all());
    assert_same_memories(&stored_memories(db).await, &with_empty_metadata(legacy));
}

async fn assert_hashes_match_contents(db: &DatabaseConnection, expected_rows: usize) {
    let rows = query_all(
        db,
        "SELECT content, content_hash, semantic_hash FROM memories",
    )
    .await;
    assert_eq!(rows.len(), expected_rows);
    for row in &rows {
        let content: String = get(row, "content");
        assert_eq!(
            get::<String>(row, "content_hash"),
            text::content_hash(&content),
            "content_hash of {content:?}"
        );
        assert_eq!(
            get::<String>(row, "semantic_hash"),
            text::format_semantic_hash(text::semantic_hash(&content)),
            "semantic_hash of {content:?}"
        );
    }
}

/// One line of the Python fixtures.
struct PythonHashes {
    input: String,
    content_hash: String,
    semantic_hash: String,
}

fn python_fixtures() -> Vec<PythonHashes> {
    PYTHON_FIXTURES
        .lines()
        .map(|line| {
            let record: serde_json::Value = serde_json::from_str(line).expect("fixture json");
            let field = |name: &str| record[name].as_str().expect(name).to_owned();
            PythonHashes {
                input: field("input"),
                content_hash: field("content_hash"),
                semantic_hash: field("semantic_hash"),
            }
        })
        .collect()
}

/// Every input of the Python fixtures becomes a legacy row twice: alone in
/// a session of its own, and together with all the others in one session,
/// where the inputs that normalize alike collide and merge. After the
/// upgrade every stored hash is the one CPython computed for that content.
/// PostgreSQL text cannot hold NUL, so inputs with one are SQLite-only (the
/// Python system could not have stored them on PostgreSQL either).
pub(crate) async fn backfill_matches_the_python_fixtures(db: &DatabaseConnection) {
    Migrator::up(db, Some(1)).await.expect("migrate up to 001");
    let fixtures: Vec<PythonHashes> = python_fixtures()
        .into_iter()
        .filter(|fixture| {
            db.get_database_backend() == DbBackend::Sqlite || !fixture.input.contains('\0')
        })
        .collect();
    assert!(fixtures.len() > 3000, "fixture file looks truncated");
    let expected: HashMap<&str, (&str, &str)> = fixtures
        .iter()
        .map(|fixture| {
            (
                fixture.input.as_str(),
                (
                    fixture.content_hash.as_str(),
                    fixture.semantic_hash.as_str(),
                ),
            )
        })
        .collect();
    let alone = fixtures
        .iter()
        .enumerate()
        .map(|(line, fixture)| Memory::new(&format!("fixture-{line}"), "fact", &fixture.input));
    let together = fixtures
        .iter()
        .map(|fixture| Memory::new("fixtures", "fact", &fixture.input));
    let legacy: Vec<Memory> = alone.chain(together).collect();
    insert_legacy(db, &legacy).await;

    migration::migrate_up(db)
        .await
        .expect("migrate up from 001");

    let rows = query_all(
        db,
        "SELECT session_id, content, content_hash, semantic_hash FROM memories",
    )
    .await;
    let distinct_hashes: BTreeSet<&str> = expected.values().map(|(hash, _)| *hash).collect();
    assert_eq!(
        rows.len(),
        fixtures.len() + distinct_hashes.len(),
        "each fixture alone, plus one row per distinct hash in the shared session"
    );
    let mut mismatches = Vec::new();
    for row in &rows {
        let content: String = get(row, "content");
        let stored = (
            get::<String>(row, "content_hash"),
            get::<String>(row, "semantic_hash"),
        );
        let Some(&(content_hash, semantic_hash)) = expected.get(content.as_str()) else {
            panic!("a stored content is no fixture input: {content:?}");
        };
        if stored != (content_hash.to_owned(), semantic_hash.to_owned()) {
            mismatches.push(format!(
                "{content:?}: stored {stored:?}, python ({content_hash}, {semantic_hash})"
            ));
        }
    }
    assert!(
        mismatches.is_empty(),
        "{} hashes differ from python:\n{}",
        mismatches.len(),
        mismatches.join("\n")
    );
}

/// Contents equal after normalization in one session and type collide under
/// the new unique constraint: the upgrade keeps the oldest row (then the
/// smallest id) with the highest importance, the summed access count, the
/// latest access and update, and the metadata merged newest-wins, and deletes
/// the others.
pub(crate) async fn up_merges_contents_that_normalize_alike(db: &DatabaseConnection) {
    Migrator::up(db, Some(1)).await.expect("migrate up to 001");
    let oldest = Memory {
        id: "00000000-0000-4000-8000-00000000000c".into(),
        importance: 0.3,
        access_count: 2,
        metadata: Some(json(r#"{"source": "chat", "lang": "en"}"#)),
        last_accessed: Some(at("2024-02-01 12:00:00.5")),
        created_at: at("2024-01-01 09:00:00"),
        updated_at: at("2024-01-01 09:00:00"),
        ..Memory::new("s1", "fact", "Likes tea")
    };
    let newer = Memory {
        id: "00000000-0000-4000-8000-00000000000a".into(),
        importance: 0.8,
        access_count: 5,
        metadata: Some(json(r#"{"lang": "de", "tier": "gold"}"#)),
        last_accessed: Some(at("2024-01-20 12:00:00")),
        created_at: at("2024-01-02 09:00:00.000001"),
        updated_at: at("2024-03-01 10:00:00"),
        ..Memory::new("s1", "fact", "likes  TEA!")
    };
    let newest = Memory {
        id: "00000000-0000-4000-8000-00000000000b".into(),
        importance: 0.6,
        access_count: 1,
        metadata: None,
        last_accessed: None,
        created_at: at("2024-01-03 09:00:00"),
        updated_at: at("2024-01-03 09:00:00"),
        ..Memory::new("s1", "fact", "\u{3000}LIKES\u{1f}tea...")
    };
    // Same creation time: the smaller id is kept.
    let tie_kept = Memory {
        id: "00000000-0000-4000-8000-000000000001".into(),
        ..Memory::new("s3", "context", "Same time")
    };
    let tie_merged = Memory {
        id: "00000000-0000-4000-8000-000000000002".into(),
        ..Memory::new("s3", "context", "same time.")
    };
    // The same text in another session or type is no duplicate.
    let other_session = Memory::new("s2", "fact", "Likes tea");
    let other_type = Memory::new("s1", "preference", "Likes tea");
    insert_legacy(
        db,
        &[
            oldest.clone(),
            newer.clone(),
            newest.clone(),
            tie_kept.clone(),
            tie_merged.clone(),
            other_session.clone(),
            other_type.clone(),
        ],
    )
    .await;

    migration::migrate_up(db)
        .await
        .expect("migrate up from 001");

    let merged = Memory {
        importance: 0.8,
        access_count: 8,
        metadata: Some(json(r#"{"source": "chat", "lang": "de", "tier": "gold"}"#)),
        last_accessed: Some(at("2024-02-01 12:00:00.5")),
        updated_at: at("2024-03-01 10:00:00"),
        ..oldest
    };
    let mut expected = vec![merged, tie_kept, other_session, other_type];
    expected.sort_by(|a, b| a.id.cmp(&b.id));
    assert_eq!(stored_memories(db).await, expected);
    assert_eq!(applied(db).await, ALL);
}

/// Rows that break a check 002 adds stop the upgrade up front, named by
/// check and count, and leave the 001 database as it was.
pub(crate) async fn up_refuses_rows_failing_the_new_checks<C: Catalog>(db: &DatabaseConnection) {
    Migrator::up(db, Some(1)).await.expect("migrate up to 001");
    let legacy = [
        Memory {
            importance: 1.5,
            ..Memory::new("s1", "fact", "too important")
        },
        Memory::new("s1", "fact", "fine"),
    ];
    insert_legacy(db, &legacy).await;

    let error = migration::migrate_up(db)
        .await
        .expect_err("an out-of-range importance must stop the upgrade");
    let message = error.to_string();
    assert!(
        message.contains("cannot add ck_memory_importance_range: 1 memory row(s) fail"),
        "unclear refusal: {message}"
    );
    assert_eq!(applied(db).await, [INITIAL]);
    assert_eq!(C::read(db).await, C::after_initial());
    assert_same_memories(&stored_memories(db).await, &with_empty_metadata(&legacy));
}

/// Turns a database migrated to Engram's first `migrations` into one as the
/// Python system left it: Alembic's table at `revision`, no seaql_migrations.
pub(crate) async fn as_python_system_left_it(
    db: &DatabaseConnection,
    migrations: u32,
    revision: &str,
) {
    Migrator::up(db, Some(migrations))
        .await
        .expect("build the legacy schema");
    for sql in [
        "DROP TABLE seaql_migrations".to_owned(),
        // Alembic's own DDL for its version table.
        "CREATE TABLE alembic_version (version_num VARCHAR(32) NOT NULL, \
         CONSTRAINT alembic_version_pkc PRIMARY KEY (version_num))"
            .to_owned(),
        format!("INSERT INTO alembic_version (version_num) VALUES ('{revision}')"),
    ] {
        db.execute_unprepared(&sql)
            .await
            .unwrap_or_else(|error| panic!("{sql}: {error}"));
    }
}

async fn alembic_revisions(db: &DatabaseConnection) -> Vec<String> {
    query_all(db, "SELECT version_num FROM alembic_version")
        .await
        .iter()
        .map(|row| get(row, "version_num"))
        .collect()
}

/// Alembic at 001 is recorded as Engram's 001, then 002 and 003 run on its
/// rows; alembic_version is left for the Python system's tools.
pub(crate) async fn adopts_a_python_database_at_001<C: Catalog>(db: &DatabaseConnection) {
    as_python_system_left_it(db, 1, "001_initial_schema").await;
    let legacy = legacy_memories(&[]);
    insert_legacy(db, &legacy).await;

    let error = migration::migrate_down(db)
        .await
        .expect_err("a database not yet adopted has nothing to downgrade");
    assert!(
        error
            .to_string()
            .contains("still at the python system's alembic revision \"001_initial_schema\""),
        "unclear refusal: {error}"
    );
    assert!(!has_table(db, "seaql_migrations").await);

    migration::migrate_up(db)
        .await
        .expect("adopt and migrate up");
    assert_eq!(applied(db).await, ALL);
    assert_eq!(C::read(db).await, C::after_all());
    assert_hashes_match_contents(db, legacy.len()).await;
    assert_same_memories(&stored_memories(db).await, &with_empty_metadata(&legacy));
    assert_eq!(alembic_revisions(db).await, ["001_initial_schema"]);

    migration::migrate_up(db)
        .await
        .expect("a second run finds nothing to do");
    assert_eq!(applied(db).await, ALL);
}

/// Alembic at 002 (the Python system's own content hashing) counts as
/// Engram's 001 and 002: only 003 runs, and the rows stay as they were.
pub(crate) async fn adopts_a_python_database_at_002<C: Catalog>(db: &DatabaseConnection) {
    as_python_system_left_it(db, 2, "002_add_content_hashing").await;
    let memory = Memory::new("s1", "fact", "already hashed");
    insert_hashed(db, &memory).await.expect("insert a v3 row");

    migration::migrate_up(db)
        .await
        .expect("adopt and migrate up");
    assert_eq!(applied(db).await, ALL);
    assert_eq!(C::read(db).await, C::after_all());
    assert_eq!(stored_memories(db).await, [memory]);
}

/// A database Engram cannot place is refused with what was found, and
/// nothing changes: not even sea-orm's bookkeeping table appears.
pub(crate) async fn refuses_unknown_schemas_untouched<C: Catalog>(
    db: &DatabaseConnection,
    setup: UnknownSchema,
    expected_message: &str,
) {
    match setup {
        UnknownSchema::AlembicRevision(revision) => {
            as_python_system_left_it(db, 1, revision).await;
        }
        UnknownSchema::HalfUpgradedByPython => {
            as_python_system_left_it(db, 1, "001_initial_schema").await;
            db.execute_unprepared("ALTER TABLE memories ADD COLUMN content_hash VARCHAR(64)")
                .await
                .expect("add the leftover column");
        }
        UnknownSchema::NoBookkeeping => {
            Migrator::up(db, Some(1)).await.expect("migrate up to 001");
            db.execute_unprepared("DROP TABLE seaql_migrations")
                .await
                .expect("drop the bookkeeping");
        }
    }
    insert_legacy(db, &[Memory::new("s1", "fact", "precious")]).await;
    let catalog = C::read(db).await;
    let rows = stored_memories(db).await;

    let error = migration::migrate_up(db)
        .await
        .expect_err("an unknown schema must be refused");
    let message = error.to_string();
    assert!(
        message.contains(expected_message) && message.contains("nothing was changed"),
        "unclear refusal: {message}"
    );
    assert!(!has_table(db, "seaql_migrations").await);
    assert_eq!(C::read(db).await, catalog);
    assert_eq!(stored_memories(db).await, rows);
}

/// The database shapes [`refuses_unknown_schemas_untouched`] is run on.
pub(crate) enum UnknownSchema {
    AlembicRevision(&'static str),
    HalfUpgradedByPython,
    NoBookkeeping,
}

/// Each unknown shape with the words its refusal must contain.
pub(crate) const UNKNOWN_SCHEMAS: [(UnknownSchema, &str); 3] = [
    (
        UnknownSchema::AlembicRevision("003_something_newer"),
        "alembic_version holds [\"003_something_newer\"]",
    ),
    (
        UnknownSchema::HalfUpgradedByPython,
        "memories already has [\"content_hash\"]",
    ),
    (
        UnknownSchema::NoBookkeeping,
        "found a memories table but no migration bookkeeping",
    ),
];

/// The distinct tenants of `memories`.
async fn tenants(db: &DatabaseConnection) -> Vec<String> {
    query_all(
        db,
        "SELECT DISTINCT tenant_id FROM memories ORDER BY tenant_id",
    )
    .await
    .iter()
    .map(|row| get(row, "tenant_id"))
    .collect()
}

/// 004 scopes exact duplicates by tenant, and its downgrade refuses, changing
/// nothing, while another tenant's memories exist: folded into one space they
/// would be readable across tenants.
pub(crate) async fn tenancy_scopes_duplicates_and_guards_its_downgrade<C: Catalog>(
    db: &DatabaseConnection,
) {
    migration::migrate_up(db).await.expect("migrate up");
    Migrator::down(db, Some(1)).await.expect("roll back 005");
    assert_eq!(applied(db).await, ALL[..4]);
    let tenancy_schema = C::read(db).await;
    let memory = Memory::new("s1", "fact", "Hello World");
    insert_hashed(db, &memory)
        .await
        .expect("a default-tenant memory");
    let foreign_id = Uuid::new_v4().to_string();
    let same_in_acme = Statement::from_sql_and_values(
        db.get_database_backend(),
        format!(
            "INSERT INTO memories (id, tenant_id, session_id, content_type, content, metadata, \
             content_hash, created_at, updated_at) VALUES ({})",
            (1..=9)
                .map(|n| match db.get_database_backend() {
                    DbBackend::Postgres => format!("${n}"),
                    _ => "?".to_owned(),
                })
                .collect::<Vec<_>>()
                .join(", ")
        ),
        [
            Value::from(foreign_id.as_str()),
            "acme".into(),
            "s1".into(),
            "fact".into(),
            "Hello World".into(),
            Value::Json(Some(Box::new(json("{}")))),
            text::content_hash("Hello World").into(),
            memory.created_at.into(),
            memory.updated_at.into(),
        ],
    );
    db.execute_raw(same_in_acme)
        .await
        .expect("the same session and content under another tenant is no duplicate");
    assert_eq!(tenants(db).await, ["acme", "default"]);

    let error = migration::migrate_down(db)
        .await
        .expect_err("another tenant's memory must stop the downgrade");
    assert!(
        error
            .to_string()
            .contains("1 memory row(s) belong to tenants other than \"default\""),
        "unclear refusal: {error}"
    );
    assert_eq!(applied(db).await, ALL[..4]);
    assert_eq!(C::read(db).await, tenancy_schema);
    assert_eq!(stored_memories(db).await.len(), 2);

    db.execute_unprepared(&format!("DELETE FROM memories WHERE id = '{foreign_id}'"))
        .await
        .expect("purge the other tenant");
    migration::migrate_down(db)
        .await
        .expect("downgrade once only the default tenant is left");
    assert_eq!(applied(db).await, ALL[..3]);
    assert_eq!(stored_memories(db).await, std::slice::from_ref(&memory));
    migration::migrate_up(db).await.expect("migrate up again");
    assert_eq!(C::read(db).await, C::after_all());
    assert_eq!(stored_memories(db).await, [memory]);
    assert_eq!(tenants(db).await, [migration::DEFAULT_TENANT]);
}
