//! The migrations against a real SQLite database file.

mod common;

use common::{Catalog, Memory, at, get, insert_hashed, query_all, sorted};
use migration::sea_orm::{ConnectionTrait, Database, DatabaseConnection, DbBackend, Statement};
use migration::{Migrator, MigratorTrait};
use tempfile::TempDir;

/// A fresh database file, deleted with the returned directory.
async fn fresh_database() -> (TempDir, DatabaseConnection) {
    let dir = tempfile::tempdir().expect("create a temporary directory");
    let url = format!(
        "sqlite://{}?mode=rwc",
        dir.path().join("engram.db").display()
    );
    let db = Database::connect(&url)
        .await
        .expect("open the sqlite database");
    (dir, db)
}

/// The schema as SQLite's catalog reports it: `pragma table_info`,
/// `pragma index_list`/`index_info` with each index's WHERE clause from
/// `sqlite_master`, and the named table constraints from `sqlite_master`.
#[derive(Debug, PartialEq)]
struct SqliteCatalog {
    columns: Vec<String>,
    indexes: Vec<String>,
    constraints: Vec<String>,
}

impl Catalog for SqliteCatalog {
    async fn read(db: &DatabaseConnection) -> Self {
        let mut catalog = Self {
            columns: vec![],
            indexes: vec![],
            constraints: vec![],
        };
        let tables = query_all(
            db,
            "SELECT name, sql FROM sqlite_master WHERE type = 'table' \
             AND name NOT LIKE 'sqlite_%' AND name NOT IN ('seaql_migrations', 'alembic_version') \
             ORDER BY name",
        )
        .await;
        for table in &tables {
            let name: String = table.try_get("", "name").unwrap();
            let sql: String = table.try_get("", "sql").unwrap();
            catalog.columns.extend(columns(db, &name).await);
            catalog.indexes.extend(indexes(db, &name).await);
            catalog.constraints.extend(table_constraints(&name, &sql));
        }
        catalog.indexes.sort();
        catalog
    }

    fn after_initial() -> Self {
        Self {
            columns: initial_memories_columns("memories.metadata json_text"),
            indexes: sorted([
                "ix_memories_session_id ON memories (session_id) unique=0 origin=c",
                "ix_memory_created_at ON memories (created_at) unique=0 origin=c",
                "sqlite_autoindex_memories_1 ON memories (id) unique=1 origin=pk",
                "sqlite_autoindex_memories_2 ON memories (session_id, content_type, content) unique=1 origin=u",
            ]),
            constraints: vec![
                r#"memories CONSTRAINT "uq_memory_session_content" UNIQUE ("session_id", "content_type", "content")"#
                    .to_owned(),
            ],
        }
    }

    fn after_all() -> Self {
        let mut columns: Vec<String> = [
            "audit_events.id varchar(36) NOT NULL PRIMARY KEY",
            "audit_events.tenant_id varchar(64) NOT NULL",
            "audit_events.principal varchar(255) NOT NULL",
            "audit_events.action varchar(64) NOT NULL",
            "audit_events.resource TEXT NOT NULL",
            "audit_events.filter TEXT NOT NULL",
            "audit_events.affected INTEGER NOT NULL",
            "audit_events.created_at timestamp_with_timezone_text NOT NULL",
        ]
        .map(String::from)
        .to_vec();
        columns.extend(initial_memories_columns(
            "memories.metadata json_text NOT NULL",
        ));
        columns.extend(
            [
                "memories.content_hash varchar(64) NOT NULL",
                "memories.semantic_hash varchar(64)",
                "memories.expires_at timestamp_with_timezone_text",
                "memories.deleted_at timestamp_with_timezone_text",
                "memories.tenant_id varchar(64) NOT NULL DEFAULT 'default'",
                "memory_requests.request_id varchar(36) NOT NULL PRIMARY KEY",
                "memory_requests.request_digest varchar(64) NOT NULL",
                "memory_requests.response BLOB NOT NULL",
                "memory_requests.created_at timestamp_with_timezone_text NOT NULL",
                "memory_requests.tenant_id varchar(64) NOT NULL DEFAULT 'default' PRIMARY KEY",
            ]
            .map(String::from),
        );
        Self {
            columns,
            indexes: sorted([
                "ix_audit_events_tenant_created ON audit_events (tenant_id, created_at) unique=0 origin=c",
                "sqlite_autoindex_audit_events_1 ON audit_events (id) unique=1 origin=pk",
                "ix_memory_created_at ON memories (created_at) unique=0 origin=c",
                "ix_memory_expiring ON memories (expires_at) unique=0 origin=c \
                 WHERE expires_at IS NOT NULL",
                "ix_memory_deleted ON memories (deleted_at) unique=0 origin=c \
                 WHERE deleted_at IS NOT NULL",
                "sqlite_autoindex_memories_1 ON memories (id) unique=1 origin=pk",
                "sqlite_autoindex_memories_2 ON memories \
                 (tenant_id, session_id, content_type, content_hash) unique=1 origin=u",
                "ix_memory_requests_created_at ON memory_requests (created_at) unique=0 origin=c",
                "sqlite_autoindex_memory_requests_1 ON memory_requests (tenant_id, request_id) \
                 unique=1 origin=pk",
            ]),
            constraints: [
                r#"memories CONSTRAINT "uq_memory_tenant_session_content_hash" UNIQUE ("tenant_id", "session_id", "content_type", "content_hash")"#,
                r#"memories CONSTRAINT "ck_memory_importance_range" CHECK (importance >= 0.0 AND importance <= 1.0)"#,
                r#"memories CONSTRAINT "ck_memory_access_count_positive" CHECK (access_count >= 0)"#,
            ]
            .map(String::from)
            .to_vec(),
        }
    }
}

fn initial_memories_columns(metadata: &str) -> Vec<String> {
    [
        "memories.id varchar(36) NOT NULL PRIMARY KEY",
        "memories.session_id varchar(255) NOT NULL",
        "memories.content_type varchar(50) NOT NULL DEFAULT 'context'",
        "memories.content TEXT NOT NULL",
        metadata,
        "memories.importance double NOT NULL DEFAULT 0.5",
        "memories.access_count INTEGER NOT NULL DEFAULT 0",
        "memories.last_accessed timestamp_with_timezone_text",
        "memories.created_at timestamp_with_timezone_text NOT NULL DEFAULT CURRENT_TIMESTAMP",
        "memories.updated_at timestamp_with_timezone_text NOT NULL DEFAULT CURRENT_TIMESTAMP",
    ]
    .map(String::from)
    .to_vec()
}

async fn columns(db: &DatabaseConnection, table: &str) -> Vec<String> {
    let sql = format!(
        "SELECT name, type, \"notnull\", dflt_value, pk FROM pragma_table_info('{table}') ORDER BY cid"
    );
    query_all(db, &sql)
        .await
        .iter()
        .map(|row| {
            let name: String = row.try_get("", "name").unwrap();
            let declared: String = row.try_get("", "type").unwrap();
            let not_null: bool = row.try_get("", "notnull").unwrap();
            let default: Option<String> = row.try_get("", "dflt_value").unwrap();
            let primary_key: bool = row.try_get("", "pk").unwrap();
            format!(
                "{table}.{name} {declared}{}{}{}",
                if not_null { " NOT NULL" } else { "" },
                default
                    .map(|value| format!(" DEFAULT {value}"))
                    .unwrap_or_default(),
                if primary_key { " PRIMARY KEY" } else { "" },
            )
        })
        .collect()
}

async fn indexes(db: &DatabaseConnection, table: &str) -> Vec<String> {
    let sql = format!(
        "SELECT list.name, list.\"unique\", list.origin, master.sql \
         FROM pragma_index_list('{table}') AS list \
         LEFT JOIN sqlite_master AS master ON master.name = list.name"
    );
    let mut lines = vec![];
    for row in query_all(db, &sql).await {
        let name: String = row.try_get("", "name").unwrap();
        let unique: i32 = row.try_get("", "unique").unwrap();
        let origin: String = row.try_get("", "origin").unwrap();
        // Automatic indexes have no SQL; the others may carry a WHERE clause.
        let sql: Option<String> = row.try_get("", "sql").unwrap();
        let predicate = sql
            .as_deref()
            .and_then(|sql| sql.split_once(" WHERE "))
            .map(|(_, predicate)| format!(" WHERE {predicate}"))
            .unwrap_or_default();
        let columns = index_columns(db, &name).await.join(", ");
        lines.push(format!(
            "{name} ON {table} ({columns}) unique={unique} origin={origin}{predicate}"
        ));
    }
    lines
}

async fn index_columns(db: &DatabaseConnection, index: &str) -> Vec<String> {
    let sql = format!("SELECT name FROM pragma_index_info('{index}') ORDER BY seqno");
    query_all(db, &sql)
        .await
        .iter()
        .map(|row| row.try_get("", "name").unwrap())
        .collect()
}

/// The `CONSTRAINT ...` clauses of a `CREATE TABLE` statement, which SQLite
/// keeps only as the statement's text.
fn table_constraints(table: &str, create_sql: &str) -> Vec<String> {
    let body = create_sql
        .trim_end()
        .strip_suffix(')')
        .unwrap_or(create_sql)
        .trim_end();
    body.split(", CONSTRAINT ")
        .skip(1)
        .map(|clause| format!("{table} CONSTRAINT {clause}"))
        .collect()
}

#[tokio::test]
async fn up_from_empty_builds_the_final_schema() {
    let (_dir, db) = fresh_database().await;
    common::up_from_empty_builds_the_final_schema::<SqliteCatalog>(&db).await;
}

#[tokio::test]
async fn legacy_rows_survive_up_and_down() {
    let (_dir, db) = fresh_database().await;
    // SQLite indexes any length, so 001 could hold content PostgreSQL cannot.
    let long = Memory::new("s3", "fact", &"long legacy text ".repeat(6_000));
    let legacy = common::legacy_memories(&[long]);
    common::legacy_rows_survive_up_and_down::<SqliteCatalog>(&db, &legacy).await;
}

#[tokio::test]
async fn tenancy_scopes_duplicates_and_guards_its_downgrade() {
    let (_dir, db) = fresh_database().await;
    common::tenancy_scopes_duplicates_and_guards_its_downgrade::<SqliteCatalog>(&db).await;
}

#[tokio::test]
async fn backfill_matches_the_python_fixtures() {
    let (_dir, db) = fresh_database().await;
    common::backfill_matches_the_python_fixtures(&db).await;
}

#[tokio::test]
async fn up_merges_contents_that_normalize_alike() {
    let (_dir, db) = fresh_database().await;
    common::up_merges_contents_that_normalize_alike(&db).await;
}

#[tokio::test]
async fn up_refuses_rows_failing_the_new_checks() {
    let (_dir, db) = fresh_database().await;
    common::up_refuses_rows_failing_the_new_checks::<SqliteCatalog>(&db).await;
}

#[tokio::test]
async fn adopts_a_python_database_at_001() {
    let (_dir, db) = fresh_database().await;
    common::adopts_a_python_database_at_001::<SqliteCatalog>(&db).await;
}

#[tokio::test]
async fn adopts_a_python_database_at_002() {
    let (_dir, db) = fresh_database().await;
    common::adopts_a_python_database_at_002::<SqliteCatalog>(&db).await;
}

#[tokio::test]
async fn refuses_unknown_schemas_untouched() {
    for (setup, message) in common::UNKNOWN_SCHEMAS {
        let (_dir, db) = fresh_database().await;
        common::refuses_unknown_schemas_untouched::<SqliteCatalog>(&db, setup, message).await;
    }
}

/// (created_at as the Python system wrote it, as the service writes it).
const TIMESTAMP_TEXTS: [(&str, &str); 4] = [
    // SQLAlchemy's DateTime: naive, always six fraction digits.
    (
        "2024-01-15 10:00:00.123456",
        "2024-01-15T10:00:00.123456+00:00",
    ),
    ("2024-01-15 09:00:00.000000", "2024-01-15T09:00:00+00:00"),
    (
        "2024-01-15 11:00:00.120000",
        "2024-01-15T11:00:00.120+00:00",
    ),
    // The CURRENT_TIMESTAMP server default: no fraction.
    ("2024-01-15 10:00:00", "2024-01-15T10:00:00+00:00"),
];

/// SQLite compares timestamps as text, and the Python system's naive text
/// (`2024-01-15 10:00:00`) sorts before any RFC 3339 text of the same day
/// (`2024-01-15T09:00:00+00:00`). After the upgrade every legacy timestamp is
/// exactly the text the service writes for that instant (naive = UTC), so
/// ordering and comparisons with the service's bound values are right; the
/// downgrade hands the Python system its own text back.
#[tokio::test]
async fn legacy_timestamps_become_the_services_text_and_back() {
    let (_dir, db) = fresh_database().await;
    Migrator::up(&db, Some(1)).await.expect("migrate up to 001");
    for (n, (python_text, _)) in TIMESTAMP_TEXTS.iter().enumerate() {
        let last_accessed = if n == 0 {
            "NULL"
        } else {
            "'2024-01-16 08:00:00'"
        };
        db.execute_unprepared(&format!(
            "INSERT INTO memories (id, session_id, content, created_at, updated_at, last_accessed) \
             VALUES ('{n}', 's1', 'legacy {n}', '{python_text}', '{python_text}', {last_accessed})"
        ))
        .await
        .expect("insert a legacy row");
    }

    migration::migrate_up(&db)
        .await
        .expect("migrate up from 001");
    let texts = timestamp_texts(&db).await;
    for (n, (_, service_text)) in TIMESTAMP_TEXTS.iter().enumerate() {
        let last_accessed = (n > 0).then(|| "2024-01-16T08:00:00+00:00".to_owned());
        assert_eq!(
            texts[n],
            (
                n.to_string(),
                service_text.to_string(),
                service_text.to_string(),
                last_accessed
            )
        );
    }

    // The service binds chrono values; sqlx writes the same text for the same instant.
    let probe = Memory {
        id: "probe".into(),
        created_at: at("2024-01-15 10:00:00.123456"),
        ..Memory::new("s2", "fact", "written by the service")
    };
    insert_hashed(&db, &probe).await.expect("insert a probe");
    let probe_text: String = get(
        &query_all(&db, "SELECT created_at FROM memories WHERE id = 'probe'").await[0],
        "created_at",
    );
    assert_eq!(probe_text, TIMESTAMP_TEXTS[0].1);

    // Legacy text would sort every legacy row before the probe.
    let chronological = ids(
        &db,
        "SELECT id FROM memories ORDER BY created_at, id",
        vec![],
    )
    .await;
    assert_eq!(chronological, ["1", "3", "0", "probe", "2"]);
    let later = ids(
        &db,
        "SELECT id FROM memories WHERE created_at > ? ORDER BY id",
        vec![at("2024-01-15 09:59:59").into()],
    )
    .await;
    assert_eq!(later, ["0", "2", "3", "probe"]);

    db.execute_unprepared("DELETE FROM memories WHERE id = 'probe'")
        .await
        .expect("delete the probe");
    Migrator::down(&db, Some(3))
        .await
        .expect("roll back the indexes, tenancy and the request log");
    migration::migrate_down(&db)
        .await
        .expect("migrate down to 001");
    let texts = timestamp_texts(&db).await;
    for (n, (python_text, _)) in TIMESTAMP_TEXTS.iter().enumerate() {
        let python_text = if python_text.len() == 19 {
            format!("{python_text}.000000")
        } else {
            python_text.to_string()
        };
        let last_accessed = (n > 0).then(|| "2024-01-16 08:00:00.000000".to_owned());
        assert_eq!(
            texts[n],
            (
                n.to_string(),
                python_text.clone(),
                python_text,
                last_accessed
            )
        );
    }
}

/// (id, created_at, updated_at, last_accessed) as stored text, by id.
async fn timestamp_texts(db: &DatabaseConnection) -> Vec<(String, String, String, Option<String>)> {
    query_all(
        db,
        "SELECT id, created_at, updated_at, last_accessed FROM memories ORDER BY id",
    )
    .await
    .iter()
    .map(|row| {
        (
            get(row, "id"),
            get(row, "created_at"),
            get(row, "updated_at"),
            get(row, "last_accessed"),
        )
    })
    .collect()
}

async fn ids(db: &DatabaseConnection, sql: &str, values: Vec<migration::Value>) -> Vec<String> {
    db.query_all_raw(Statement::from_sql_and_values(
        DbBackend::Sqlite,
        sql,
        values,
    ))
    .await
    .expect(sql)
    .iter()
    .map(|row| get(row, "id"))
    .collect()
}
