//! Scenarios shared by the SQLite and PostgreSQL tests. Each backend supplies
//! a [`Catalog`]: its schema as read from the database's own catalog, and the
//! shapes expected after 001 and after every migration.

use std::fmt::Debug;

use engram_domain::text;
use migration::sea_orm::prelude::Json;
use migration::sea_orm::{ConnectionTrait, DatabaseConnection, DbErr, Statement};
use migration::{Alias, Expr, Migrator, MigratorTrait, Query, Value};
use uuid::Uuid;

pub(crate) const INITIAL: &str = "m20240101_000001_initial_schema";
pub(crate) const ALL: [&str; 3] = [
    "m20240101_000001_initial_schema",
    "m20240115_000002_add_content_hashing",
    "m20261124_000003_request_log",
];

/// Legacy rows kept apart from the bulk ones so their hashes can be checked
/// against values computed by the reference Python (not by engram_domain).
const HELLO: &str = "Hello, World!";
const HELLO_CONTENT_HASH: &str = "09ca7e4eaa6e8ae9c7d261167129184883644d07dfba7cbfbc4c8a2e08360d5b";
const HELLO_SEMANTIC_HASH: &str = "0dba412420240608";
const UNICODE: &str = "ΟΔΟΣ Σ straße İstanbul 日本語 👋";
const UNICODE_CONTENT_HASH: &str =
    "92e650400bea51ceda4ab8921ea9d4516990f6b6fcf9fbb301af33002b86dee5";
const UNICODE_SEMANTIC_HASH: &str = "2241014120424d7a";

/// More than two backfill pages of 500.
const BULK_ROWS: usize = 1200;

/// A backend's schema read from its catalog (the seaql_migrations table excluded).
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
        }
    }
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

/// What a `memories` row holds besides [`Memory`]; timestamps as text so the
/// SQLite rebuild can be checked to copy them unchanged.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct StoredMemory {
    pub memory: Memory,
    pub last_accessed: Option<String>,
    pub created_at: String,
    pub updated_at: String,
}

pub(crate) async fn applied(db: &DatabaseConnection) -> Vec<String> {
    Migrator::get_applied_migrations(db)
        .await
        .expect("read seaql_migrations")
        .iter()
        .map(|migration| migration.name().to_owned())
        .collect()
}

/// Inserts rows into a 001 table (which has no hash columns).
pub(crate) async fn insert_legacy(db: &DatabaseConnection, memories: &[Memory]) {
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
            ]
            .map(Alias::new),
        )
        .to_owned();
    for memory in memories {
        insert.values_panic(common_values(memory));
    }
    db.execute(&insert).await.expect("insert legacy memories");
    // Gives the copy of a nullable timestamp something to preserve.
    db.execute_unprepared(
        "UPDATE memories SET last_accessed = CURRENT_TIMESTAMP WHERE access_count > 0",
    )
    .await
    .expect("set last_accessed");
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
    values.extend([Expr::val(content_hash), Expr::val(semantic_hash)]);
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

pub(crate) async fn stored_memories(db: &DatabaseConnection) -> Vec<StoredMemory> {
    let rows = query_all(
        db,
        "SELECT id, session_id, content_type, content, metadata, importance, access_count, \
         CAST(last_accessed AS TEXT) AS last_accessed, CAST(created_at AS TEXT) AS created_at, \
         CAST(updated_at AS TEXT) AS updated_at FROM memories ORDER BY id",
    )
    .await;
    rows.iter()
        .map(|row| {
            let get = |column: &str| -> String { row.try_get("", column).expect(column) };
            StoredMemory {
                memory: Memory {
                    id: get("id"),
                    session_id: get("session_id"),
                    content_type: get("content_type"),
                    content: get("content"),
                    metadata: row.try_get("", "metadata").expect("metadata"),
                    importance: row.try_get("", "importance").expect("importance"),
                    access_count: row.try_get("", "access_count").expect("access_count"),
                },
                last_accessed: row.try_get("", "last_accessed").expect("last_accessed"),
                created_at: get("created_at"),
                updated_at: get("updated_at"),
            }
        })
        .collect()
}

pub(crate) async fn query_all(
    db: &DatabaseConnection,
    sql: &str,
) -> Vec<migration::sea_orm::QueryResult> {
    db.query_all_raw(Statement::from_string(db.get_database_backend(), sql))
        .await
        .unwrap_or_else(|error| panic!("{sql}: {error}"))
}

/// Legacy rows exercising what the backfill must get right: NULL metadata,
/// Unicode and Python-only whitespace, several keyset pages, plus `extra`.
pub(crate) fn legacy_memories(extra: &[Memory]) -> Vec<Memory> {
    let mut memories = vec![
        Memory {
            metadata: None,
            access_count: 3,
            ..Memory::new("s1", "preference", HELLO)
        },
        Memory {
            metadata: Some(json(r#"{"lang": ["el", "de"]}"#)),
            ..Memory::new("s1", "fact", UNICODE)
        },
        Memory {
            metadata: None,
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

/// Migrating up from nothing yields the final schema, whose constraints hold.
pub(crate) async fn up_from_empty_builds_the_final_schema<C: Catalog>(db: &DatabaseConnection) {
    Migrator::up(db, None).await.expect("migrate up");
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
    let stored: Vec<u8> = rows[0].try_get("", "response").expect("response bytes");
    assert_eq!(stored, response, "the response round-trips byte for byte");
}

/// 001 with legacy rows -> up: every row hashed as the reference does and
/// NULL metadata replaced; -> down to 001: the 001 shape and rows are back;
/// -> up again: the final schema again.
pub(crate) async fn legacy_rows_survive_up_and_down<C: Catalog>(
    db: &DatabaseConnection,
    legacy: &[Memory],
) {
    Migrator::up(db, Some(1)).await.expect("migrate up to 001");
    assert_eq!(C::read(db).await, C::after_initial());
    insert_legacy(db, legacy).await;
    let before = stored_memories(db).await;
    assert_eq!(before.len(), legacy.len());

    Migrator::up(db, None).await.expect("migrate up from 001");
    assert_eq!(C::read(db).await, C::after_all());
    assert_hashes_match_contents(db, legacy.len()).await;
    assert_eq!(stored_memories(db).await, with_empty_metadata(&before));

    Migrator::down(db, Some(2))
        .await
        .expect("migrate down to 001");
    assert_eq!(applied(db).await, [INITIAL]);
    assert_eq!(C::read(db).await, C::after_initial());
    // NULL metadata stays '{}': the upgrade cannot know which rows had NULL.
    assert_eq!(stored_memories(db).await, with_empty_metadata(&before));

    Migrator::up(db, None)
        .await
        .expect("migrate up again after down");
    assert_eq!(C::read(db).await, C::after_all());
}

fn with_empty_metadata(rows: &[StoredMemory]) -> Vec<StoredMemory> {
    let mut rows = rows.to_vec();
    for row in &mut rows {
        row.memory.metadata.get_or_insert_with(|| json("{}"));
    }
    rows
}

async fn assert_hashes_match_contents(db: &DatabaseConnection, expected_rows: usize) {
    let rows = query_all(
        db,
        "SELECT content, content_hash, semantic_hash FROM memories",
    )
    .await;
    assert_eq!(rows.len(), expected_rows);
    let mut hashes = std::collections::HashMap::new();
    for row in &rows {
        let content: String = row.try_get("", "content").expect("content");
        let content_hash: String = row.try_get("", "content_hash").expect("content_hash");
        let semantic_hash: String = row.try_get("", "semantic_hash").expect("semantic_hash");
        assert_eq!(
            content_hash,
            text::content_hash(&content),
            "content_hash of {content:?}"
        );
        assert_eq!(
            semantic_hash,
            text::format_semantic_hash(text::semantic_hash(&content)),
            "semantic_hash of {content:?}"
        );
        hashes.insert(content, (content_hash, semantic_hash));
    }
    // Values from the reference Python, independent of engram_domain.
    for (content, content_hash, semantic_hash) in [
        (HELLO, HELLO_CONTENT_HASH, HELLO_SEMANTIC_HASH),
        (UNICODE, UNICODE_CONTENT_HASH, UNICODE_SEMANTIC_HASH),
    ] {
        assert_eq!(
            hashes[content],
            (content_hash.to_owned(), semantic_hash.to_owned())
        );
    }
}

/// Contents equal after normalization in one session and type cannot both
/// live under the new unique constraint: the upgrade must refuse and leave
/// the 001 database exactly as it was.
pub(crate) async fn up_refuses_contents_that_normalize_alike<C: Catalog>(db: &DatabaseConnection) {
    Migrator::up(db, Some(1)).await.expect("migrate up to 001");
    insert_legacy(
        db,
        &[
            Memory::new("s1", "fact", "Likes tea"),
            Memory::new("s1", "fact", "likes  TEA!"),
            // Same text in another session or type is no duplicate.
            Memory::new("s2", "fact", "Likes tea"),
            Memory::new("s1", "preference", "Likes tea"),
        ],
    )
    .await;
    let before = stored_memories(db).await;

    let error = Migrator::up(db, None)
        .await
        .expect_err("duplicates must stop the upgrade");
    let message = error.to_string();
    assert!(
        message.contains("1 group(s) of memories")
            && message.contains("uq_memory_session_content_hash"),
        "unclear refusal: {message}"
    );
    assert_eq!(applied(db).await, [INITIAL]);
    assert_eq!(C::read(db).await, C::after_initial());
    assert_eq!(stored_memories(db).await, before);
}
