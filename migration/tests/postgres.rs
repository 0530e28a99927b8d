//! The migrations against a real PostgreSQL server: `ENGRAM_TEST_PG_URL`
//! (an administrative URL) or the local default. Each test gets a database
//! of its own.

mod common;

use common::{ALL, Catalog, INITIAL, Memory, applied, insert_hashed, query_all, sorted};
use migration::sea_orm::{ConnectionTrait, Database, DatabaseConnection};
use migration::{Migrator, MigratorTrait};
use uuid::Uuid;

const DEFAULT_ADMIN_URL: &str = "postgres://postgres@127.0.0.1:5432/postgres";

/// A database `engram_mig_<random hex>` for one test, dropped when the test
/// ends, whether it passed or not.
struct FreshDatabase {
    admin_url: String,
    name: String,
}

impl FreshDatabase {
    async fn create() -> Self {
        let admin_url =
            std::env::var("ENGRAM_TEST_PG_URL").unwrap_or_else(|_| DEFAULT_ADMIN_URL.to_owned());
        let name = format!("engram_mig_{}", Uuid::new_v4().simple());
        let admin = connect(&admin_url).await;
        admin
            .execute_unprepared(&format!("CREATE DATABASE {name}"))
            .await
            .expect("create the test database");
        Self { admin_url, name }
    }

    async fn connect(&self) -> DatabaseConnection {
        connect(&with_database(&self.admin_url, &self.name)).await
    }
}

impl Drop for FreshDatabase {
    fn drop(&mut self) {
        // Drop cannot await, and the test's runtime may be unwinding from a
        // panic: run the cleanup on a runtime of its own, on another thread.
        let admin_url = self.admin_url.clone();
        let sql = format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name);
        let dropped = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            runtime.block_on(async {
                let admin = Database::connect(&admin_url).await?;
                admin.execute_unprepared(&sql).await.map(drop)
            })?;
            Ok::<_, Box<dyn std::error::Error + Send + Sync>>(())
        })
        .join();
        if !matches!(dropped, Ok(Ok(()))) {
            eprintln!("could not drop the test database {}", self.name);
        }
    }
}

async fn connect(url: &str) -> DatabaseConnection {
    Database::connect(url)
        .await
        .unwrap_or_else(|error| panic!("cannot connect to postgresql at {url}: {error}"))
}

/// `url` with its database name replaced, keeping any query string.
fn with_database(url: &str, database: &str) -> String {
    let (address, query) = url
        .split_once('?')
        .map_or((url, None), |(a, q)| (a, Some(q)));
    let path_start = address.find("://").map_or(0, |scheme_end| scheme_end + 3);
    let server = match address[path_start..].find('/') {
        Some(slash) => &address[..path_start + slash],
        None => address,
    };
    match query {
        Some(query) => format!("{server}/{database}?{query}"),
        None => format!("{server}/{database}"),
    }
}

/// The schema as PostgreSQL's catalog reports it: `information_schema.columns`,
/// `pg_indexes` (with partial-index predicates) and `pg_constraint`.
#[derive(Debug, PartialEq)]
struct PgCatalog {
    columns: Vec<String>,
    indexes: Vec<String>,
    constraints: Vec<String>,
}

impl Catalog for PgCatalog {
    async fn read(db: &DatabaseConnection) -> Self {
        let columns = query_all(
            db,
            "SELECT table_name::text, column_name::text, data_type::text, \
             character_maximum_length::int AS length, is_nullable::text, column_default::text \
             FROM information_schema.columns \
             WHERE table_schema = 'public' \
             AND table_name NOT IN ('seaql_migrations', 'alembic_version') \
             ORDER BY table_name, ordinal_position",
        )
        .await
        .iter()
        .map(|row| {
            let get = |column: &str| -> String { row.try_get("", column).unwrap() };
            let length: Option<i32> = row.try_get("", "length").unwrap();
            let default: Option<String> = row.try_get("", "column_default").unwrap();
            format!(
                "{}.{} {}{}{}{}",
                get("table_name"),
                get("column_name"),
                get("data_type"),
                length
                    .map(|length| format!("({length})"))
                    .unwrap_or_default(),
                if get("is_nullable") == "NO" {
                    " NOT NULL"
                } else {
                    ""
                },
                default
                    .map(|value| format!(" DEFAULT {value}"))
                    .unwrap_or_default(),
            )
        })
        .collect();
        let indexes = query_all(
            db,
            "SELECT indexdef FROM pg_indexes \
             WHERE schemaname = 'public' \
             AND tablename NOT IN ('seaql_migrations', 'alembic_version') ORDER BY indexdef",
        )
        .await
        .iter()
        .map(|row| row.try_get("", "indexdef").unwrap())
        .collect();
        let constraints = query_all(
            db,
            "SELECT conrelid::regclass::text || ' ' || conname || ' ' || pg_get_constraintdef(oid) \
             AS line FROM pg_constraint \
             WHERE connamespace = 'public'::regnamespace \
             AND conrelid::regclass::text NOT IN ('seaql_migrations', 'alembic_version') \
             ORDER BY line",
        )
        .await
        .iter()
        .map(|row| row.try_get("", "line").unwrap())
        .collect();
        Self {
            columns,
            indexes,
            constraints,
        }
    }

    fn after_initial() -> Self {
        Self {
            columns: initial_memories_columns("memories.metadata json"),
            indexes: sorted([
                "CREATE UNIQUE INDEX memories_pkey ON public.memories USING btree (id)",
                "CREATE UNIQUE INDEX uq_memory_session_content ON public.memories \
                 USING btree (session_id, content_type, content)",
                "CREATE INDEX ix_memories_session_id ON public.memories USING btree (session_id)",
                "CREATE INDEX ix_memory_created_at ON public.memories USING btree (created_at)",
            ]),
            constraints: sorted([
                "memories memories_pkey PRIMARY KEY (id)",
                "memories uq_memory_session_content UNIQUE (session_id, content_type, content)",
            ]),
        }
    }

    fn after_all() -> Self {
        const TENANT: &str = "character varying(64) NOT NULL DEFAULT 'default'::character varying";
        let mut columns: Vec<String> = [
            "audit_events.id character varying(36) NOT NULL",
            "audit_events.tenant_id character varying(64) NOT NULL",
            "audit_events.principal character varying(255) NOT NULL",
            "audit_events.action character varying(64) NOT NULL",
            "audit_events.resource text NOT NULL",
            "audit_events.filter text NOT NULL",
            "audit_events.affected bigint NOT NULL",
            "audit_events.created_at timestamp with time zone NOT NULL",
        ]
        .map(String::from)
        .to_vec();
        columns.extend(initial_memories_columns("memories.metadata json NOT NULL"));
        columns.extend([
            "memories.content_hash character varying(64) NOT NULL".to_owned(),
            "memories.semantic_hash character varying(64)".to_owned(),
            "memories.expires_at timestamp with time zone".to_owned(),
            "memories.deleted_at timestamp with time zone".to_owned(),
            format!("memories.tenant_id {TENANT}"),
            "memory_requests.request_id character varying(36) NOT NULL".to_owned(),
            "memory_requests.request_digest character varying(64) NOT NULL".to_owned(),
            "memory_requests.response bytea NOT NULL".to_owned(),
            "memory_requests.created_at timestamp with time zone NOT NULL".to_owned(),
            format!("memory_requests.tenant_id {TENANT}"),
        ]);
        Self {
            columns,
            indexes: sorted([
                "CREATE INDEX ix_audit_events_tenant_created ON public.audit_events \
                 USING btree (tenant_id, created_at)",
                "CREATE UNIQUE INDEX audit_events_pkey ON public.audit_events USING btree (id)",
                "CREATE UNIQUE INDEX memories_pkey ON public.memories USING btree (id)",
                "CREATE UNIQUE INDEX uq_memory_tenant_session_content_hash ON public.memories \
                 USING btree (tenant_id, session_id, content_type, content_hash)",
                "CREATE INDEX ix_memory_created_at ON public.memories USING btree (created_at)",
                "CREATE INDEX ix_memory_expiring ON public.memories USING btree (expires_at) \
                 WHERE (expires_at IS NOT NULL)",
                "CREATE INDEX ix_memory_deleted ON public.memories USING btree (deleted_at) \
                 WHERE (deleted_at IS NOT NULL)",
                "CREATE UNIQUE INDEX memory_requests_pkey ON public.memory_requests \
                 USING btree (tenant_id, request_id)",
                "CREATE INDEX ix_memory_requests_created_at ON public.memory_requests \
                 USING btree (created_at)",
            ]),
            constraints: sorted([
                "audit_events audit_events_pkey PRIMARY KEY (id)",
                "memories memories_pkey PRIMARY KEY (id)",
                "memories uq_memory_tenant_session_content_hash \
                 UNIQUE (tenant_id, session_id, content_type, content_hash)",
                "memories ck_memory_importance_range CHECK (((importance >= (0.0)::double precision) \
                 AND (importance <= (1.0)::double precision)))",
                "memories ck_memory_access_count_positive CHECK ((access_count >= 0))",
                "memory_requests memory_requests_pkey PRIMARY KEY (tenant_id, request_id)",
            ]),
        }
    }
}

fn initial_memories_columns(metadata: &str) -> Vec<String> {
    [
        "memories.id character varying(36) NOT NULL",
        "memories.session_id character varying(255) NOT NULL",
        "memories.content_type character varying(50) NOT NULL DEFAULT 'context'::character varying",
        "memories.content text NOT NULL",
        metadata,
        "memories.importance double precision NOT NULL DEFAULT 0.5",
        "memories.access_count integer NOT NULL DEFAULT 0",
        "memories.last_accessed timestamp with time zone",
        "memories.created_at timestamp with time zone NOT NULL DEFAULT CURRENT_TIMESTAMP",
        "memories.updated_at timestamp with time zone NOT NULL DEFAULT CURRENT_TIMESTAMP",
    ]
    .map(String::from)
    .to_vec()
}

#[tokio::test]
async fn up_from_empty_builds_the_final_schema() {
    let database = FreshDatabase::create().await;
    let db = database.connect().await;
    common::up_from_empty_builds_the_final_schema::<PgCatalog>(&db).await;
}

#[tokio::test]
async fn legacy_rows_survive_up_and_down() {
    let database = FreshDatabase::create().await;
    let db = database.connect().await;
    let legacy = common::legacy_memories(&[]);
    common::legacy_rows_survive_up_and_down::<PgCatalog>(&db, &legacy).await;
}

#[tokio::test]
async fn tenancy_scopes_duplicates_and_guards_its_downgrade() {
    let database = FreshDatabase::create().await;
    let db = database.connect().await;
    common::tenancy_scopes_duplicates_and_guards_its_downgrade::<PgCatalog>(&db).await;
}

#[tokio::test]
async fn backfill_matches_the_python_fixtures() {
    let database = FreshDatabase::create().await;
    let db = database.connect().await;
    common::backfill_matches_the_python_fixtures(&db).await;
}

#[tokio::test]
async fn up_merges_contents_that_normalize_alike() {
    let database = FreshDatabase::create().await;
    let db = database.connect().await;
    common::up_merges_contents_that_normalize_alike(&db).await;
}

#[tokio::test]
async fn up_refuses_rows_failing_the_new_checks() {
    let database = FreshDatabase::create().await;
    let db = database.connect().await;
    common::up_refuses_rows_failing_the_new_checks::<PgCatalog>(&db).await;
}

#[tokio::test]
async fn adopts_a_python_database_at_001() {
    let database = FreshDatabase::create().await;
    let db = database.connect().await;
    common::adopts_a_python_database_at_001::<PgCatalog>(&db).await;
}

#[tokio::test]
async fn adopts_a_python_database_at_002() {
    let database = FreshDatabase::create().await;
    let db = database.connect().await;
    common::adopts_a_python_database_at_002::<PgCatalog>(&db).await;
}

#[tokio::test]
async fn refuses_unknown_schemas_untouched() {
    for (setup, message) in common::UNKNOWN_SCHEMAS {
        let database = FreshDatabase::create().await;
        let db = database.connect().await;
        common::refuses_unknown_schemas_untouched::<PgCatalog>(&db, setup, message).await;
    }
}

/// 001's unique constraint on the full content cannot index long values on
/// PostgreSQL, so the downgrade must refuse up front, counting in bytes.
#[tokio::test]
async fn down_refuses_content_too_long_for_the_initial_unique_constraint() {
    let database = FreshDatabase::create().await;
    let db = database.connect().await;
    Migrator::up(&db, None).await.expect("migrate up");
    Migrator::down(&db, Some(3))
        .await
        .expect("roll back the indexes, tenancy and the request log");
    let at_limit = Memory::new("s1", "fact", &"x".repeat(2600));
    // 1301 characters but 2602 bytes.
    let too_long = Memory::new("s1", "fact", &"é".repeat(1301));
    for memory in [&at_limit, &too_long] {
        insert_hashed(&db, memory)
            .await
            .expect("v3 stores long content");
    }

    let error = migration::migrate_down(&db)
        .await
        .expect_err("long content must stop the downgrade");
    let message = error.to_string();
    assert!(
        message.contains("1 memory row(s) have content over 2600 bytes")
            && message.contains("uq_memory_session_content"),
        "unclear refusal: {message}"
    );
    assert_eq!(applied(&db).await, ALL[..2]);
    let columns = query_all(
        &db,
        "SELECT column_name FROM information_schema.columns \
         WHERE table_name = 'memories' AND column_name = 'content_hash'",
    )
    .await;
    assert_eq!(columns.len(), 1, "the refused downgrade changed nothing");

    db.execute_unprepared(&format!(
        "DELETE FROM memories WHERE id = '{}'",
        too_long.id
    ))
    .await
    .expect("delete the long memory");
    migration::migrate_down(&db)
        .await
        .expect("downgrade once the long memory is gone");
    assert_eq!(applied(&db).await, [INITIAL]);
    assert_eq!(common::stored_memories(&db).await.len(), 1);
}
