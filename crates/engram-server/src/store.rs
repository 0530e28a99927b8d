//! The memories table, read and written in transactions. All of Engram's SQL lives here.
//!
//! Writers of one session are serialized (PostgreSQL: transaction-scoped advisory locks;
//! SQLite: `BEGIN IMMEDIATE`), so the session cap and content checks hold under concurrency,
//! across replicas too. Exact duplicates are decided by the unique constraint, never by a
//! check before insert. Stores are written in groups (`crate::group_commit`): one
//! transaction and a few set-based statements for every store queued meanwhile. Accesses are
//! written behind (`crate::access`).

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::ops::Deref;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration as StdDuration;

use chrono::{DateTime, Duration, Utc};
use engram_domain::entity::{audit_event, memory as row, memory_request};
use engram_domain::filter::PurgeScope;
use engram_domain::memory::{ContentType, NewMemory, merge_into_twin};
use engram_domain::names::{MemoryName, SessionId, SessionScope};
use engram_domain::paging::PageCursor;
use engram_domain::ranking::{Ranked, choose_evictions, effective_importance, keep_first};
use engram_domain::{etag, limits, text};
use rusqlite::types::{Null, ToSqlOutput};
use sea_orm::sea_query::{Expr, Query, SelectStatement};
use sea_orm::{
    ActiveModelTrait, ActiveValue, ColumnTrait, Condition, ConnectOptions, ConnectionTrait,
    Database, DatabaseConnection, DatabaseTransaction, DbBackend, DbErr, EntityTrait,
    IntoActiveModel, PaginatorTrait, QueryFilter, QueryOrder, QuerySelect, QueryTrait,
    SqliteTransactionMode, Statement, TransactionOptions, TransactionTrait, Value,
};

use crate::access::{AccessTracker, Accesses, Tracked};
use crate::auth::Caller;
use crate::error::MemoryError;
use crate::group_commit::{PendingStore, StoreQueue};
use crate::live_sets::{LiveSets, Sketch, Version};
use crate::session_cache::{CachedMemory, SessionCache, SessionKey};
use crate::sqlite_writer::{Columns, DirectSqlite, SqliteTransaction, timestamp};

use row::{Column, Entity as Memories};

/// The rules the store applies, taken from the settings.
#[derive(Debug, Clone, Copy)]
pub struct Policy {
    pub max_entries: usize,
    pub similarity_max_distance: u32,
    pub soft_delete_retention: Duration,
    pub cleanup_after: Duration,
}

/// How long a request_id is remembered for retries.
const REQUEST_LOG_RETENTION_HOURS: i64 = 24;
/// Rows deleted per statement by the sweeper, so no sweep holds a long lock.
const SWEEP_BATCH: u64 = 1000;
/// How often counted accesses are written to the database: what a crash can lose.
const ACCESS_FLUSH_INTERVAL: StdDuration = StdDuration::from_secs(1);
/// Accesses written per statement.
const ACCESS_FLUSH_CHUNK: usize = 500;
/// Merged twins written per statement.
const MERGE_CHUNK: usize = 200;
/// Store groups PostgreSQL writes at once (see `Tables::concurrent_groups`).
const POSTGRES_CONCURRENT_GROUPS: usize = 2;
/// Kept responses inserted per statement (5 values each, well below every parameter limit).
const INSERT_CHUNK: usize = 256;
/// Oldest a cached session may be: what a lost change notification or another replica's
/// access counts can leave stale at worst.
const SESSION_CACHE_MAX_AGE: StdDuration = StdDuration::from_secs(10);
/// What the SQLite writer may remember of its sessions' live memories (`LiveSets`): about
/// 250,000 memories.
const WRITER_LIVE_SETS_BYTES: usize = 32 * 1024 * 1024;
/// How often SQLite's write-ahead log is copied into the database file beside the writer.
const CHECKPOINT_INTERVAL: StdDuration = StdDuration::from_millis(250);
/// How often the writer copies the rest itself, so that the log starts over (see
/// `writer_checkpoint_due`).
const WRITER_CHECKPOINT_INTERVAL: StdDuration = StdDuration::from_secs(1);
/// PostgreSQL channel on which replicas announce the sessions they changed.
const CHANGES_CHANNEL: &str = "engram_sessions";
/// The payload announcing that any session may have changed.
const EVERY_SESSION: &str = "*";

#[derive(Clone)]
pub struct MemoryStore {
    db: DatabaseConnection,
    /// Where stores and access counts are written (`connect_writer`).
    writer: Writer,
    policy: Policy,
    accesses: Arc<AccessTracker>,
    cache: Arc<SessionCache>,
    stores: StoreQueue,
}

/// What the group-commit writer needs: the database, the rules, the access counts and the
/// cache it must tell of the sessions it changed.
#[derive(Clone)]
pub struct Tables {
    writer: Writer,
    policy: Policy,
    accesses: Arc<AccessTracker>,
    cache: Arc<SessionCache>,
    /// SQLite only: its one writer remembers what its groups left live.
    live_sets: Option<Arc<Mutex<LiveSets>>>,
    /// SQLite: set when the checkpoint beside the writer has just copied the whole log.
    log_copied: Arc<AtomicBool>,
}

/// The connection store groups are written on (`connect_writer`).
#[derive(Clone)]
pub enum Writer {
    /// PostgreSQL: transactions on the pool.
    Pool(DatabaseConnection),
    /// SQLite: one connection of its own, driven on the writer's thread.
    Sqlite(Arc<DirectSqlite>),
}

impl Writer {
    /// Begins a write transaction holding the writer locks of `sessions` (see [`begin_write`];
    /// SQLite's `BEGIN IMMEDIATE` locks every session).
    async fn begin<'a>(
        &self,
        sessions: impl IntoIterator<Item = (&'a str, &'a str)>,
    ) -> Result<WriteTransaction<'_>, DbErr> {
        Ok(match self {
            Self::Pool(db) => WriteTransaction::Pooled(begin_write(db, sessions).await?),
            Self::Sqlite(sqlite) => WriteTransaction::Direct(sqlite.begin().await?),
        })
    }
}

/// A transaction of the writer: on the pool, or on the SQLite writer's own connection.
enum WriteTransaction<'a> {
    Pooled(DatabaseTransaction),
    Direct(SqliteTransaction<'a>),
}

impl WriteTransaction<'_> {
    fn backend(&self) -> DbBackend {
        match self {
            Self::Pooled(transaction) => transaction.get_database_backend(),
            Self::Direct(_) => DbBackend::Sqlite,
        }
    }

    async fn execute(&self, statement: Statement) -> Result<(), DbErr> {
        match self {
            Self::Pooled(transaction) => transaction.execute_raw(statement).await.map(|_| ()),
            Self::Direct(sqlite) => sqlite.execute(statement),
        }
    }

    async fn query<T: Columns>(&self, statement: Statement) -> Result<Vec<T>, DbErr> {
        match self {
            Self::Pooled(transaction) => transaction
                .query_all_raw(statement)
                .await?
                .iter()
                .map(|row| T::try_get_many_by_index(row).map_err(DbErr::from))
                .collect(),
            Self::Direct(sqlite) => sqlite.query(statement),
        }
    }

    /// Writes what merges changed into their twins (see `merge_into_twin`): the higher
    /// importance, the merged metadata, the later expiry, restored, updated now. PostgreSQL
    /// takes one set-based UPDATE a chunk; SQLite one prepared single-row UPDATE a merge (see
    /// [`insert_fresh`] for why).
    async fn write_merges(&self, merged: &[&row::Model]) -> Result<(), DbErr> {
        match self {
            Self::Pooled(transaction) => {
                for chunk in merged.chunks(MERGE_CHUNK) {
                    transaction.execute_raw(write_merges(chunk)).await?;
                }
                Ok(())
            }
            Self::Direct(sqlite) => {
                let sql = "UPDATE memories SET importance = ?, metadata = ?, expires_at = ?, \
                           deleted_at = NULL, updated_at = ? WHERE id = ?";
                let rows = merged.iter().map(|memory| {
                    [
                        memory.importance.into(),
                        memory.metadata.to_string().into(),
                        sqlite_time(&memory.expires_at),
                        timestamp(&memory.updated_at).into(),
                        memory.id.as_str().into(),
                    ]
                });
                sqlite.execute_each(sql, rows).map(drop)
            }
        }
    }

    async fn commit(self) -> Result<(), DbErr> {
        match self {
            Self::Pooled(transaction) => transaction.commit().await,
            Self::Direct(sqlite) => sqlite.commit(),
        }
    }
}

/// A live memory as the session cap and the near-duplicate check see it: no content, no
/// metadata, so a session's hundred memories load cheaply.
#[derive(Debug, Clone)]
struct LiveMemory {
    sketch: Sketch,
    /// Read from the database; not known of a memory the writer remembered (`LiveSets`).
    standing: Option<Standing>,
}

/// What ranks a live memory against the others of its session when it is over its cap.
#[derive(Debug, Clone, Copy)]
struct Standing {
    importance: f64,
    access_count: i32,
}

impl LiveMemory {
    fn from_model(memory: &row::Model) -> Self {
        Self {
            sketch: Sketch {
                id: memory.id.clone(),
                semantic_hash: memory
                    .semantic_hash
                    .as_deref()
                    .and_then(text::parse_semantic_hash),
                created_at: memory.created_at,
                expires_at: memory.expires_at,
            },
            standing: Some(Standing {
                importance: memory.importance,
                access_count: memory.access_count,
            }),
        }
    }

    fn is_visible_at(&self, now: DateTime<Utc>) -> bool {
        self.sketch.is_visible_at(now)
    }

    fn ranked(&self, now: DateTime<Utc>) -> Option<Ranked<'_>> {
        let Standing {
            importance,
            access_count,
        } = self.standing?;
        Some(Ranked {
            id: &self.sketch.id,
            created_at: self.sketch.created_at,
            effective_importance: effective_importance(
                importance,
                self.sketch.created_at,
                i64::from(access_count),
                now,
            ),
        })
    }
}

/// Neither deleted nor expired at `now` (what `live_at` selects).
fn is_live_at(memory: &row::Model, now: DateTime<Utc>) -> bool {
    memory.deleted_at.is_none() && memory.expires_at.is_none_or(|at| at > now)
}

impl Tracked for LiveMemory {
    fn id(&self) -> &str {
        &self.sketch.id
    }

    fn add_accesses(&mut self, accesses: Accesses) {
        if let Some(standing) = &mut self.standing {
            standing.access_count = accesses.added_to(standing.access_count);
        }
    }
}

/// One stored memory and what the store noticed about it.
#[derive(Debug, Clone)]
pub struct StoreOutcome {
    pub memory: row::Model,
    pub deduplicated: bool,
    pub similar: Vec<(row::Model, u32)>,
    pub evicted: Vec<String>,
}

/// A request sent with a request_id: its first response is kept and replayed.
pub struct RequestRecord {
    pub request_id: String,
    pub digest: String,
}

/// Changes of an UpdateMemory call; `None` leaves a field alone.
#[derive(Debug, Default)]
pub struct Changes {
    pub content: Option<String>,
    pub importance: Option<f64>,
    pub metadata: Option<serde_json::Map<String, serde_json::Value>>,
    pub expires_at: Option<DateTime<Utc>>,
}

/// What ListMemories asks for.
pub struct ListQuery {
    pub tenant: String,
    pub session: SessionId,
    pub content_types: Vec<ContentType>,
    pub show_deleted: bool,
    pub page_size: usize,
    pub after: Option<PageCursor>,
}

/// What RetrieveMemories asks for.
pub struct RetrieveQuery {
    pub tenant: String,
    pub session: SessionId,
    pub content_types: Vec<ContentType>,
    pub min_importance: f64,
    pub limit: usize,
}

/// Rows removed by one sweep.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct SweepReport {
    pub expired: u64,
    pub purged_deleted: u64,
    pub stale: u64,
    pub request_log: u64,
}

/// Opens the database pool (on SQLite with `SQLITE_PRAGMAS`).
pub async fn connect(url: &str, max_connections: u32) -> Result<DatabaseConnection, DbErr> {
    if let Some(directory) = sqlite_directory(url) {
        std::fs::create_dir_all(&directory).map_err(|error| {
            DbErr::Custom(format!("cannot create {}: {error}", directory.display()))
        })?;
    }
    Database::connect(connect_options(url, max_connections)).await
}

/// Every SQLite connection's settings. WAL with synchronous=NORMAL: a committed transaction
/// survives a crash of the process (not necessarily of the machine). Deleted rows are
/// overwritten with zeros, so erased text leaves no trace in free pages. sqlx's own default
/// turns on foreign keys; the writer's connection matches it.
const SQLITE_PRAGMAS: [(&str, &str); 4] = [
    ("journal_mode", "WAL"),
    ("synchronous", "NORMAL"),
    ("secure_delete", "on"),
    ("foreign_keys", "ON"),
];
/// The writer's connection besides:
/// - an 8 MiB page cache that stays warm, since no other connection's commit invalidates it
///   (small, as the writer remembers its sessions' live sets instead of reading their rows;
///   32 MiB cost RSS and no speed);
/// - no automatic checkpoints: its commits only append, and it checkpoints between groups
///   (`Tables::checkpoint`);
/// - temporary storage in memory (statement journals, the access flush's temporary table):
///   past 64 KiB a statement journal would spill into a file opened and deleted each time.
const SQLITE_WRITER_PRAGMAS: [(&str, &str); 3] = [
    ("cache_size", "-8192"),
    ("wal_autocheckpoint", "0"),
    ("temp_store", "memory"),
];
/// How long a SQLite connection waits for another's write lock.
const SQLITE_BUSY_TIMEOUT: StdDuration = StdDuration::from_secs(30);

/// The connection of the group-commit writer. On SQLite it is one connection of its own,
/// driven on the writer's thread (`sqlite_writer`); PostgreSQL writes through the pool.
pub fn connect_writer(url: &str, pool: &DatabaseConnection) -> Result<Writer, DbErr> {
    if pool.get_database_backend() != DbBackend::Sqlite {
        return Ok(Writer::Pool(pool.clone()));
    }
    let file = sqlite_file(url)
        .ok_or_else(|| DbErr::Custom("the SQLite writer needs a database file".to_owned()))?;
    let settings = pragma_lines(SQLITE_PRAGMAS.iter().chain(&SQLITE_WRITER_PRAGMAS));
    let sqlite = DirectSqlite::open_writer(&file, SQLITE_BUSY_TIMEOUT, &settings)?;
    Ok(Writer::Sqlite(Arc::new(sqlite)))
}

fn connect_options(url: &str, max_connections: u32) -> ConnectOptions {
    let mut options = ConnectOptions::new(url);
    options
        .max_connections(max_connections)
        .connect_timeout(StdDuration::from_secs(10))
        .acquire_timeout(StdDuration::from_secs(5))
        // Connections open on first use: the service starts (and reports NOT_SERVING)
        // while the database is still unreachable.
        .connect_lazy(true)
        .sqlx_logging(false)
        // Database spans name the operation; statements stay out of traces.
        .record_stmt_in_spans(false);
    if url.starts_with("sqlite:") {
        // A file connection does not go stale like a socket; a ping before each use would
        // cost every transaction a round trip to the connection's thread.
        options.test_before_acquire(false);
    }
    options.map_sqlx_sqlite_opts(|sqlite| {
        SQLITE_PRAGMAS.iter().fold(
            sqlite.busy_timeout(SQLITE_BUSY_TIMEOUT),
            |sqlite, (name, value)| sqlite.pragma(*name, *value),
        )
    });
    options
}

/// The directory of a file-backed SQLite URL, created before connecting.
fn sqlite_directory(url: &str) -> Option<PathBuf> {
    sqlite_file(url)?
        .parent()
        .filter(|parent| !parent.as_os_str().is_empty())
        .map(PathBuf::from)
}

fn sqlite_file(url: &str) -> Option<PathBuf> {
    let path = url
        .strip_prefix("sqlite://")
        .or_else(|| url.strip_prefix("sqlite:"))?;
    let path = path.split('?').next().unwrap_or_default();
    (!path.is_empty() && path != ":memory:").then(|| PathBuf::from(path))
}

/// Claims a SQLite database file for this process while the returned lock is held: the
/// session cache trusts that every write to the file is this process's own, so a second
/// server on the same file is refused (the lock goes with the process, even on SIGKILL).
pub fn claim_sqlite_file(url: &str) -> Result<Option<std::fs::File>, String> {
    let Some(file) = sqlite_file(url) else {
        return Ok(None);
    };
    let mut lock_path = file.into_os_string();
    lock_path.push(".serving");
    let lock_path = PathBuf::from(lock_path);
    let lock = std::fs::File::create(&lock_path)
        .map_err(|error| format!("cannot create {}: {error}", lock_path.display()))?;
    match lock.try_lock() {
        Ok(()) => Ok(Some(lock)),
        Err(std::fs::TryLockError::WouldBlock) => Err(format!(
            "another Engram process is serving this SQLite database ({} is locked); \
             SQLite is served by one process, PostgreSQL by any number of replicas",
            lock_path.display()
        )),
        Err(std::fs::TryLockError::Error(error)) => {
            Err(format!("cannot lock {}: {error}", lock_path.display()))
        }
    }
}

fn visible_at(now: DateTime<Utc>) -> Condition {
    Condition::any()
        .add(Column::ExpiresAt.is_null())
        .add(Column::ExpiresAt.gt(now))
}

fn live_at(now: DateTime<Utc>) -> Condition {
    Condition::all()
        .add(Column::DeletedAt.is_null())
        .add(visible_at(now))
}

/// Memories neither stored nor retrieved since `stale_before`. The creation time leads, so
/// the created_at index bounds each sweep to old rows: as a scan, a sweep of a million
/// memories read the whole table inside its delete, and SQLite's stores waited meanwhile.
fn stale_at(stale_before: DateTime<Utc>) -> Condition {
    Condition::all()
        .add(Column::CreatedAt.lt(stale_before))
        .add(
            Condition::any()
                .add(Column::LastAccessed.is_null())
                .add(Column::LastAccessed.lt(stale_before)),
        )
}

/// The ids of one batch of the sweeper's deletes.
fn sweep_batch(condition: Condition) -> SelectStatement {
    Query::select()
        .column(Column::Id)
        .from(Memories)
        .cond_where(condition)
        .limit(SWEEP_BATCH)
        .to_owned()
}

/// Session ids are scoped by tenant: every lookup names both.
fn in_session(tenant: &str, session: &SessionId) -> Condition {
    Condition::all()
        .add(Column::TenantId.eq(tenant))
        .add(Column::SessionId.eq(session.as_str()))
}

fn by_name(tenant: &str, name: &MemoryName) -> Condition {
    in_session(tenant, &name.session_id).add(Column::Id.eq(name.memory_id.as_str()))
}

impl MemoryStore {
    /// The store, its group-commit writer, its access flusher and, on PostgreSQL, the
    /// listener for other replicas' changes (all run on the caller's tokio runtime and stop
    /// with the last clone of the store). `cache_bytes` bounds the session cache (0: none).
    pub fn new(db: DatabaseConnection, writer: Writer, policy: Policy, cache_bytes: usize) -> Self {
        let accesses = Arc::new(AccessTracker::default());
        let log_copied = Arc::new(AtomicBool::new(false));
        if let Writer::Sqlite(sqlite) = &writer {
            tokio::spawn(checkpoint_every(
                sqlite.file().to_owned(),
                Arc::downgrade(&accesses),
                CHECKPOINT_INTERVAL,
                log_copied.clone(),
            ));
        }
        let postgres = db.get_database_backend() == DbBackend::Postgres;
        // SQLite is this process's own file: it sees every write. PostgreSQL is shared with
        // other replicas, so the cache serves only while their changes can be heard.
        let cache = Arc::new(SessionCache::new(
            cache_bytes,
            SESSION_CACHE_MAX_AGE,
            !postgres,
        ));
        if postgres && cache_bytes > 0 {
            tokio::spawn(listen_for_changes(db.clone(), Arc::downgrade(&cache)));
        }
        let stores = StoreQueue::start(Tables {
            writer: writer.clone(),
            policy,
            accesses: accesses.clone(),
            cache: cache.clone(),
            live_sets: (!postgres)
                .then(|| Arc::new(Mutex::new(LiveSets::new(WRITER_LIVE_SETS_BYTES)))),
            log_copied,
        });
        Self {
            db,
            writer,
            policy,
            accesses,
            cache,
            stores,
        }
    }

    pub fn connection(&self) -> &DatabaseConnection {
        &self.db
    }

    /// Writes the accesses counted so far (at shutdown; otherwise every second).
    pub async fn flush_accesses(&self) -> Result<(), DbErr> {
        flush_accesses(&self.writer, &self.accesses).await
    }

    /// Stores memories of one session atomically, committed together with the other stores
    /// queued meanwhile. `respond` builds the response from the outcomes; with a request
    /// record, that response is kept and a retry gets it back.
    pub async fn store<R, F>(
        &self,
        tenant: String,
        session: SessionId,
        memories: Vec<NewMemory>,
        now: DateTime<Utc>,
        record: Option<RequestRecord>,
        respond: F,
    ) -> Result<R, MemoryError>
    where
        R: prost::Message + Default + Send + Sync + 'static,
        F: Fn(Vec<StoreOutcome>) -> R + Send + Sync + 'static,
    {
        self.stores
            .store(tenant, session, memories, now, record, respond)
            .await
    }

    /// After a purge: SQLite's write-ahead log still holds pre-purge copies of the pages, so
    /// checkpoint it into the (securely deleted) database file and truncate it. PostgreSQL keeps
    /// dead tuples until VACUUM reuses their space; see README, Security, Erasure.
    async fn erase_freed_pages(&self) -> Result<(), DbErr> {
        if self.db.get_database_backend() == DbBackend::Sqlite {
            self.db
                .execute_unprepared("PRAGMA wal_checkpoint(TRUNCATE)")
                .await?;
        }
        Ok(())
    }

    pub async fn get(
        &self,
        tenant: &str,
        name: &MemoryName,
        now: DateTime<Utc>,
    ) -> Result<row::Model, MemoryError> {
        self.visible(&self.db, tenant, name, now).await
    }

    /// One page in (create time, id) order, and the cursor of the next page if there is one.
    pub async fn list(
        &self,
        query: ListQuery,
        now: DateTime<Utc>,
    ) -> Result<(Vec<row::Model>, Option<PageCursor>), MemoryError> {
        let mut select = Memories::find()
            .filter(in_session(&query.tenant, &query.session))
            .filter(visible_at(now));
        if !query.show_deleted {
            select = select.filter(Column::DeletedAt.is_null());
        }
        if !query.content_types.is_empty() {
            select = select.filter(
                Column::ContentType.is_in(query.content_types.iter().map(|kind| kind.as_str())),
            );
        }
        if let Some(after) = query.after {
            select = select.filter(
                Condition::any()
                    .add(Column::CreatedAt.gt(after.created_at))
                    .add(
                        Condition::all()
                            .add(Column::CreatedAt.eq(after.created_at))
                            .add(Column::Id.gt(after.id)),
                    ),
            );
        }
        let select = select
            .order_by_asc(Column::CreatedAt)
            .order_by_asc(Column::Id)
            .limit(query.page_size as u64 + 1);
        let mut page = self.accesses.read(|| select.clone().all(&self.db)).await?;
        let next = (page.len() > query.page_size).then(|| {
            page.truncate(query.page_size);
            let last = page.last().expect("a full page");
            PageCursor {
                created_at: last.created_at,
                id: last.id.clone(),
            }
        });
        Ok((page, next))
    }

    pub async fn update(
        &self,
        tenant: &str,
        name: &MemoryName,
        expected_etag: Option<&str>,
        changes: Changes,
        now: DateTime<Utc>,
    ) -> Result<row::Model, MemoryError> {
        let transaction = begin_write(&self.db, [(tenant, name.session_id.as_str())]).await?;
        let current = self
            .writable(&transaction, tenant, name, expected_etag, now)
            .await?;
        let mut updated = current.clone();
        if let Some(content) = changes.content {
            let (content_hash, semantic_hash) = text::content_hashes(&content);
            updated.content_hash = content_hash;
            updated.semantic_hash = Some(text::format_semantic_hash(semantic_hash));
            updated.content = content;
            let twin = Memories::find()
                .filter(in_session(tenant, &name.session_id))
                .filter(Column::ContentType.eq(updated.content_type.as_str()))
                .filter(Column::ContentHash.eq(updated.content_hash.as_str()))
                .filter(Column::Id.ne(updated.id.as_str()))
                .one(&transaction)
                .await?;
            if let Some(twin) = twin {
                return Err(MemoryError::ContentConflict {
                    existing: MemoryName::format(&twin.session_id, &twin.id),
                });
            }
        }
        if let Some(importance) = changes.importance {
            updated.importance = importance;
        }
        if let Some(metadata) = changes.metadata {
            updated.metadata = serde_json::Value::Object(metadata);
        }
        if let Some(expires_at) = changes.expires_at {
            updated.expires_at = Some(expires_at);
        }
        updated.updated_at = now;
        let updated = write_back(&transaction, updated).await?;
        transaction.commit().await?;
        self.changed(tenant, &name.session_id).await;
        Ok(updated)
    }

    /// Soft-deletes a memory and records who did, in the same transaction.
    pub async fn delete(
        &self,
        caller: &Caller,
        name: &MemoryName,
        expected_etag: Option<&str>,
        now: DateTime<Utc>,
    ) -> Result<row::Model, MemoryError> {
        let tenant = caller.tenant.as_str();
        let transaction = begin_write(&self.db, [(tenant, name.session_id.as_str())]).await?;
        let current = self
            .writable(&transaction, tenant, name, expected_etag, now)
            .await?;
        let deleted = write_back(
            &transaction,
            row::Model {
                deleted_at: Some(now),
                updated_at: now,
                ..current
            },
        )
        .await?;
        let event = AuditEvent {
            action: "DeleteMemory",
            resource: name.to_string(),
            filter: "",
            affected: 1,
        };
        event.write(&transaction, caller, now).await?;
        transaction.commit().await?;
        self.changed(tenant, &name.session_id).await;
        Ok(deleted)
    }

    pub async fn undelete(
        &self,
        tenant: &str,
        name: &MemoryName,
        now: DateTime<Utc>,
    ) -> Result<row::Model, MemoryError> {
        let transaction = begin_write(&self.db, [(tenant, name.session_id.as_str())]).await?;
        let current = self.visible(&transaction, tenant, name, now).await?;
        if current.deleted_at.is_none() {
            return Err(MemoryError::NotDeleted {
                name: name.to_string(),
            });
        }
        let restored = write_back(
            &transaction,
            row::Model {
                deleted_at: None,
                updated_at: now,
                ..current
            },
        )
        .await?;
        transaction.commit().await?;
        self.changed(tenant, &name.session_id).await;
        Ok(restored)
    }

    /// A visible memory (deleted or not), with the accesses not yet written, read through the
    /// pool or inside a write transaction.
    async fn visible<C: ConnectionTrait>(
        &self,
        connection: &C,
        tenant: &str,
        name: &MemoryName,
        now: DateTime<Utc>,
    ) -> Result<row::Model, MemoryError> {
        let found = self
            .accesses
            .read(|| async move {
                let memory = Memories::find()
                    .filter(by_name(tenant, name))
                    .filter(visible_at(now))
                    .one(connection)
                    .await?;
                Ok(Vec::from_iter(memory))
            })
            .await?;
        found
            .into_iter()
            .next()
            .ok_or_else(|| MemoryError::NotFound {
                name: name.to_string(),
            })
    }

    /// A visible, live memory whose etag matches when one is given.
    async fn writable(
        &self,
        transaction: &DatabaseTransaction,
        tenant: &str,
        name: &MemoryName,
        expected_etag: Option<&str>,
        now: DateTime<Utc>,
    ) -> Result<row::Model, MemoryError> {
        let current = self.visible(transaction, tenant, name, now).await?;
        if current.deleted_at.is_some() {
            return Err(MemoryError::Deleted {
                name: name.to_string(),
            });
        }
        if expected_etag.is_some_and(|expected| expected != etag::memory_etag(&current)) {
            return Err(MemoryError::EtagMismatch {
                name: name.to_string(),
            });
        }
        Ok(current)
    }

    /// Counts (and with `force`, deletes) what the scope selects among the caller's tenant's
    /// memories; returns the count and a sample. A forced purge leaves an audit record.
    pub async fn purge(
        &self,
        caller: &Caller,
        sessions: &SessionScope,
        scope: PurgeScope,
        force: bool,
        now: DateTime<Utc>,
    ) -> Result<(u64, Vec<String>), MemoryError> {
        let tenant = caller.tenant.as_str();
        let mut condition = match scope {
            PurgeScope::Expired => Condition::all().add(Column::ExpiresAt.lte(now)),
            PurgeScope::Deleted => Condition::all().add(Column::DeletedAt.is_not_null()),
            PurgeScope::Everything => Condition::all(),
        }
        .add(Column::TenantId.eq(tenant));
        let transaction = match sessions {
            SessionScope::One(session) => {
                condition = condition.add(Column::SessionId.eq(session.as_str()));
                begin_write(&self.db, [(tenant, session.as_str())]).await?
            }
            SessionScope::All => self.db.begin().await?,
        };
        let sample = Memories::find()
            .filter(condition.clone())
            .order_by_asc(Column::Id)
            .limit(limits::PURGE_SAMPLE_SIZE as u64)
            .all(&transaction)
            .await?
            .iter()
            .map(|memory| MemoryName::format(&memory.session_id, &memory.id))
            .collect();
        let count = if force {
            let purged = Memories::delete_many()
                .filter(condition)
                .exec(&transaction)
                .await?
                .rows_affected;
            let event = AuditEvent {
                action: "PurgeMemories",
                resource: sessions.name(),
                filter: scope.filter(),
                affected: purged,
            };
            event.write(&transaction, caller, now).await?;
            purged
        } else {
            Memories::find()
                .filter(condition)
                .count(&transaction)
                .await?
        };
        transaction.commit().await?;
        if force && count > 0 {
            match sessions {
                SessionScope::One(session) => self.changed(tenant, session).await,
                SessionScope::All => changed_everywhere(&self.db, &self.cache).await,
            }
            self.erase_freed_pages().await?;
        }
        Ok((count, sample))
    }

    /// The session's `limit` most important live memories, most important first, each counted
    /// as accessed and handed to `render` while the session is held, so nothing is copied twice.
    pub async fn retrieve(
        &self,
        query: RetrieveQuery,
        now: DateTime<Utc>,
        mut render: impl FnMut(&CachedMemory),
    ) -> Result<(), MemoryError> {
        let RetrieveQuery {
            tenant,
            session,
            content_types,
            min_importance,
            limit,
        } = query;
        let wanted = |memory: &row::Model| {
            content_types.is_empty()
                || content_types
                    .iter()
                    .any(|kind| kind.as_str() == memory.content_type)
        };
        let now_micros = now.timestamp_micros();
        let choose = |memories: &mut [CachedMemory]| {
            let mut ranking: Vec<(f64, usize)> = memories
                .iter()
                .enumerate()
                .filter(|(_, memory)| is_live_at(memory, now) && wanted(memory))
                .map(|(at, memory)| (memory.effective_importance_at(now_micros), at))
                .filter(|(importance, _)| *importance >= min_importance)
                .collect();
            // The session comes in recency order, so a position breaks ties as `by_rank`
            // does, without comparing times and ids.
            keep_first(&mut ranking, limit, |(a, at_a), (b, at_b)| {
                b.total_cmp(a).then(at_a.cmp(at_b))
            });
            let chosen: Vec<usize> = ranking.into_iter().map(|(_, at)| at).collect();
            let access = Accesses {
                count: 1,
                last: now,
            };
            for &at in &chosen {
                memories[at].add_accesses(access);
                render(&memories[at]);
            }
            self.accesses
                .record(chosen.iter().map(|&at| memories[at].id.as_str()), now);
        };
        Ok(self.with_session(&tenant, &session, now, choose).await?)
    }

    /// The session's live memories within `max_distance` of `semantic_hash`, nearest first,
    /// handed to `render` with their distance.
    pub async fn find_similar<T>(
        &self,
        tenant: &str,
        session: &SessionId,
        semantic_hash: u64,
        max_distance: u32,
        now: DateTime<Utc>,
        render: impl Fn(&row::Model, u32) -> T,
    ) -> Result<Vec<T>, MemoryError> {
        let near = |memories: &mut [CachedMemory]| {
            let live = memories
                .iter()
                .map(Deref::deref)
                .filter(|memory| is_live_at(memory, now));
            nearest(semantic_hash, live, max_distance)
                .into_iter()
                .map(|(memory, distance)| render(memory, distance))
                .collect()
        };
        Ok(self.with_session(tenant, session, now, near).await?)
    }

    /// Runs `use_memories` on the session's live memories, whole: from the session cache,
    /// or loaded (with the accesses not yet written) and offered to it.
    async fn with_session<R>(
        &self,
        tenant: &str,
        session: &SessionId,
        now: DateTime<Utc>,
        mut use_memories: impl FnMut(&mut [CachedMemory]) -> R,
    ) -> Result<R, DbErr> {
        let key: SessionKey = (tenant.to_owned(), session.as_str().to_owned());
        let ticket = match self.cache.with_cached(&key, &mut use_memories) {
            Ok(result) => return Ok(result),
            Err(ticket) => ticket,
        };
        let loaded = self
            .accesses
            .read(|| load_rows(&self.db, in_session(tenant, session).add(live_at(now))))
            .await?;
        Ok(self.cache.fill(key, ticket, loaded, use_memories))
    }

    /// Removes expired memories, soft-deleted ones past their purge_time, memories unused for
    /// memory_cleanup_days, and old request records. Safe to run on every replica at once.
    pub async fn sweep(&self, now: DateTime<Utc>) -> Result<SweepReport, DbErr> {
        let stale_before = now - self.policy.cleanup_after;
        let report = SweepReport {
            expired: self
                .delete_in_batches(Condition::all().add(Column::ExpiresAt.lte(now)))
                .await?,
            purged_deleted: self
                .delete_in_batches(
                    Condition::all()
                        .add(Column::DeletedAt.lte(now - self.policy.soft_delete_retention)),
                )
                .await?,
            stale: self.delete_in_batches(stale_at(stale_before)).await?,
            request_log: memory_request::Entity::delete_many()
                .filter(
                    memory_request::Column::CreatedAt
                        .lt(now - Duration::hours(REQUEST_LOG_RETENTION_HOURS)),
                )
                .exec(&self.db)
                .await?
                .rows_affected,
        };
        // Expired and deleted memories are in no cached session; stale ones were live.
        if report.stale > 0 {
            changed_everywhere(&self.db, &self.cache).await;
        }
        Ok(report)
    }

    async fn changed(&self, tenant: &str, session: &SessionId) {
        let key = (tenant.to_owned(), session.as_str().to_owned());
        sessions_changed(&self.db, &self.cache, &[key]).await;
    }

    async fn delete_in_batches(&self, condition: Condition) -> Result<u64, DbErr> {
        let mut total = 0;
        loop {
            let deleted = Memories::delete_many()
                .filter(Column::Id.in_subquery(sweep_batch(condition.clone())))
                .exec(&self.db)
                .await?
                .rows_affected;
            total += deleted;
            if deleted < SWEEP_BATCH {
                return Ok(total);
            }
        }
    }
}

/// A delete or purge as the audit log keeps it: who (the caller), when, what, how many.
/// Never content: names, the filter and a count only.
struct AuditEvent {
    action: &'static str,
    resource: String,
    filter: &'static str,
    affected: u64,
}

impl AuditEvent {
    /// Written in the transaction of the change itself, so neither exists without the other.
    async fn write(
        self,
        transaction: &DatabaseTransaction,
        caller: &Caller,
        now: DateTime<Utc>,
    ) -> Result<(), DbErr> {
        let Self {
            action,
            resource,
            filter,
            affected,
        } = self;
        audit_event::ActiveModel {
            id: ActiveValue::Set(uuid::Uuid::new_v4().to_string()),
            tenant_id: ActiveValue::Set(caller.tenant.clone()),
            principal: ActiveValue::Set(caller.principal.clone()),
            action: ActiveValue::Set(action.to_owned()),
            resource: ActiveValue::Set(resource),
            filter: ActiveValue::Set(filter.to_owned()),
            affected: ActiveValue::Set(i64::try_from(affected).unwrap_or(i64::MAX)),
            created_at: ActiveValue::Set(now),
        }
        .insert(transaction)
        .await?;
        Ok(())
    }
}

/// What a group left in its sessions: the rows it wrote, as committed, and the ids it evicted.
#[derive(Default)]
struct SessionChanges {
    rows: Vec<row::Model>,
    evicted: HashSet<String>,
    /// Each session's live memories as the group left them.
    live: HashMap<SessionKey, Vec<LiveMemory>>,
}

/// One call of a group as the writer sees it once its rows are written.
struct WrittenCall {
    /// Index of the call in the group.
    call: usize,
    /// The memory each of its requests ended as, and whether it was a twin's merge.
    stored: Vec<(row::Model, bool)>,
    /// Near-duplicates of each stored memory: (id, distance, the row if this group wrote it).
    similar: Vec<Vec<(String, u32, Option<row::Model>)>>,
    evicted: Vec<String>,
}

impl Tables {
    /// Groups written at once. SQLite has one writer at a time whatever Engram does;
    /// PostgreSQL overlaps one group's commit (a WAL flush) with the next groups' statements,
    /// while groups sharing a session still take turns on its advisory lock.
    pub(crate) fn concurrent_groups(&self) -> usize {
        match self.writer {
            Writer::Pool(_) => POSTGRES_CONCURRENT_GROUPS,
            Writer::Sqlite(_) => 1,
        }
    }

    /// Writes the counted accesses every second, on the writer's connection, until the
    /// store is dropped. On SQLite they are its own commits, which `LiveSets` tells apart
    /// from other connections'.
    pub(crate) fn access_flusher(&self) -> impl Future<Output = ()> + Send + 'static {
        flush_accesses_every(
            self.writer.clone(),
            Arc::downgrade(&self.accesses),
            ACCESS_FLUSH_INTERVAL,
        )
    }

    /// Whether the writer should checkpoint (`checkpoint`) now, `since` its last one that
    /// copied every frame (see `writer_checkpoint_due`).
    pub(crate) fn checkpoint_due(&self, since: StdDuration) -> bool {
        writer_checkpoint_due(since, self.log_copied.swap(false, Ordering::AcqRel))
    }

    /// SQLite: copies what is left of the write-ahead log into the database file, between
    /// two groups. It has to be the writer: SQLite starts the log over only when a write
    /// begins with every frame copied, which a checkpoint beside a busy writer never sees
    /// (the log grew by 1.4 GB in 20 s of stores). Returns whether every frame was copied.
    pub(crate) async fn checkpoint(&self) -> bool {
        match &self.writer {
            Writer::Pool(_) => true,
            Writer::Sqlite(sqlite) => {
                copied_every_frame(sqlite.query_between_transactions(checkpoint()).await)
            }
        }
    }

    /// Writes a group of store calls in one transaction, as if one after the other in
    /// queue order: every call sees the rows of the calls before it, its session cap and
    /// near-duplicates included. Returns each call's own failure (a reused request_id);
    /// an error fails the whole group, and nothing of it is committed.
    pub(crate) async fn write_group(
        &self,
        group: &mut [PendingStore],
    ) -> Result<Vec<Option<MemoryError>>, MemoryError> {
        let sessions = group
            .iter()
            .map(|call| (call.tenant.as_str(), call.session.as_str()));
        let transaction = self.writer.begin(sessions).await?;
        let (failures, writing, changes) = self.write_in(&transaction, group).await?;
        transaction.commit().await?;
        let sessions: BTreeSet<SessionKey> = writing
            .iter()
            .map(|&call| {
                let PendingStore {
                    tenant, session, ..
                } = &group[call];
                (tenant.clone(), session.as_str().to_owned())
            })
            .collect();
        if let Some(sets) = &self.live_sets {
            let mut sets = sets.lock().expect("live sets");
            for (key, members) in changes.live {
                let sketches = members.into_iter().map(|member| member.sketch);
                sets.remember(key, sketches.collect());
            }
        }
        match &self.writer {
            Writer::Sqlite(_) => {
                // One writer, whose groups commit one after the other: what a group wrote is
                // the next state of its sessions, so a cached session takes it, not a reload.
                for key in &sessions {
                    let rows = changes.rows.iter().filter(|memory| {
                        (&memory.tenant_id, &memory.session_id) == (&key.0, &key.1)
                            && !changes.evicted.contains(&memory.id)
                    });
                    self.cache.apply(key, rows.cloned(), &changes.evicted);
                }
            }
            Writer::Pool(db) => {
                for key in &sessions {
                    self.cache.invalidate(key);
                }
                // Off the group's path: its callers need not wait for a notification that
                // other replicas take in their own time anyway.
                let (db, payloads) = (db.clone(), announced(&sessions));
                tokio::spawn(async move { announce(&db, payloads.into_iter()).await });
            }
        }
        Ok(failures)
    }

    /// The group's statements, inside its transaction: each call's kept response or
    /// failure, the calls written, and what they changed.
    async fn write_in(
        &self,
        transaction: &WriteTransaction<'_>,
        group: &mut [PendingStore],
    ) -> Result<(Vec<Option<MemoryError>>, Vec<usize>, SessionChanges), MemoryError> {
        let mut failures: Vec<Option<MemoryError>> = group.iter().map(|_| None).collect();
        let replayed = replay_kept(transaction, group, &mut failures).await?;
        let writing: Vec<usize> = (0..group.len())
            .filter(|call| !replayed.contains(call) && failures[*call].is_none())
            .collect();
        let mut changes = SessionChanges::default();
        if !writing.is_empty() {
            let written;
            (written, changes) = self.write_calls(transaction, group, &writing).await?;
            self.respond(transaction, group, written).await?;
        }
        Ok((failures, writing, changes))
    }

    async fn write_calls(
        &self,
        transaction: &WriteTransaction<'_>,
        group: &[PendingStore],
        writing: &[usize],
    ) -> Result<(Vec<WrittenCall>, SessionChanges), MemoryError> {
        let fresh: Vec<Vec<row::Model>> = writing
            .iter()
            .map(|&call| {
                let call = &group[call];
                call.memories
                    .iter()
                    .map(|memory| fresh_row(&call.tenant, &call.session, memory, call.now))
                    .collect()
            })
            .collect();
        // Live memories before the group, by session; each call then adds its own.
        let (mut live, inserted, twins) = self
            .insert_and_read(transaction, group, writing, &fresh)
            .await?;
        let mut current: HashMap<TwinKey, row::Model> = twins
            .into_iter()
            .map(|memory| (twin_key(&memory), memory))
            .collect();

        // The rows this group wrote, as they are now, and which of them were merges.
        let mut touched: HashMap<String, row::Model> = HashMap::new();
        let mut merged: Vec<String> = Vec::new();
        let mut evicted_ids: HashSet<String> = HashSet::new();
        let mut written = Vec::with_capacity(writing.len());
        for (&call, fresh) in writing.iter().zip(fresh) {
            let PendingStore {
                tenant,
                session,
                memories,
                now,
                ..
            } = &group[call];
            let members = live
                .entry((tenant.clone(), session.as_str().to_owned()))
                .or_default();
            members.retain(|memory| memory.is_visible_at(*now));
            let mut stored = Vec::with_capacity(memories.len());
            for (memory, fresh) in memories.iter().zip(fresh) {
                let (now_stored, deduplicated) = if inserted.contains(&fresh.id) {
                    members.push(LiveMemory::from_model(&fresh));
                    (fresh, false)
                } else {
                    let twin = current.get(&twin_key(&fresh)).cloned().ok_or_else(|| {
                        DbErr::RecordNotFound(
                            "a fresh row was neither inserted nor found as a twin".to_owned(),
                        )
                    })?;
                    let twin = merge_into_twin(twin, memory, *now);
                    members.retain(|member| member.sketch.id != twin.id);
                    members.push(LiveMemory::from_model(&twin));
                    if !merged.contains(&twin.id) {
                        merged.push(twin.id.clone());
                    }
                    (twin, true)
                };
                current.insert(twin_key(&now_stored), now_stored.clone());
                touched.insert(now_stored.id.clone(), now_stored.clone());
                stored.push((now_stored, deduplicated));
            }
            let evicted = evict_over_cap(members, self.policy.max_entries, *now)?;
            evicted_ids.extend(evicted.iter().cloned());
            let similar = stored
                .iter()
                .map(|(memory, _)| {
                    let Some(hash) = memory
                        .semantic_hash
                        .as_deref()
                        .and_then(text::parse_semantic_hash)
                    else {
                        return Vec::new();
                    };
                    nearest(
                        hash,
                        members.iter().filter(|other| other.sketch.id != memory.id),
                        self.policy.similarity_max_distance,
                    )
                    .into_iter()
                    .map(|(near, distance)| {
                        let snapshot = touched.get(&near.sketch.id).cloned();
                        (near.sketch.id.clone(), distance, snapshot)
                    })
                    .collect()
                })
                .collect();
            written.push(WrittenCall {
                call,
                stored,
                similar,
                evicted: evicted
                    .iter()
                    .map(|id| MemoryName::format(session.as_str(), id))
                    .collect(),
            });
        }

        let merges: Vec<&row::Model> = merged
            .iter()
            .filter(|id| !evicted_ids.contains(*id))
            .map(|id| &touched[id])
            .collect();
        transaction.write_merges(&merges).await?;
        // Near-duplicates this group did not write are read whole before any eviction.
        let untouched: BTreeSet<&str> = written
            .iter()
            .flat_map(|call| call.similar.iter().flatten())
            .filter(|(_, _, snapshot)| snapshot.is_none())
            .map(|(id, _, _)| id.as_str())
            .collect();
        if !untouched.is_empty() {
            let rows = self
                .accesses
                .read(|| fetch_by_ids(transaction, &untouched))
                .await?;
            let rows: HashMap<String, row::Model> = rows
                .into_iter()
                .map(|memory| (memory.id.clone(), memory))
                .collect();
            for (id, _, snapshot) in written
                .iter_mut()
                .flat_map(|call| call.similar.iter_mut().flatten())
            {
                if snapshot.is_none() {
                    *snapshot = rows.get(id.as_str()).cloned();
                }
            }
        }
        if !evicted_ids.is_empty() {
            let evict = Memories::delete_many().filter(Column::Id.is_in(evicted_ids.iter()));
            transaction
                .execute(evict.build(transaction.backend()))
                .await?;
        }
        let changes = SessionChanges {
            rows: touched.into_values().collect(),
            evicted: evicted_ids,
            live,
        };
        Ok((written, changes))
    }

    /// The live memories of the group's sessions before it: remembered from the writer's
    /// last groups where that is exact (`LiveSets`), read for the others.
    async fn live_before(
        &self,
        transaction: &WriteTransaction<'_>,
        group: &[PendingStore],
        writing: &[usize],
    ) -> Result<HashMap<SessionKey, Vec<LiveMemory>>, DbErr> {
        let (incoming, earliest) = incoming(group, writing);
        let mut live: HashMap<SessionKey, Vec<LiveMemory>> = HashMap::new();
        if let Some(sets) = &self.live_sets {
            let version = writer_version(transaction).await?;
            let mut sets = sets.lock().expect("live sets");
            sets.at_version(version);
            for (key, room) in &incoming {
                if let Some(remembered) = sets.take(key, earliest, *room, self.policy.max_entries) {
                    let members = remembered.into_iter().map(|sketch| LiveMemory {
                        sketch,
                        standing: None,
                    });
                    live.insert(key.clone(), members.collect());
                }
            }
        }
        let unread: Vec<&SessionKey> = incoming
            .keys()
            .filter(|key| !live.contains_key(*key))
            .collect();
        if unread.is_empty() {
            return Ok(live);
        }
        let read = self
            .accesses
            .read(|| load_live(transaction, live_in_sessions(&unread, earliest)))
            .await?;
        for SessionLive(session, memory) in read {
            live.entry(session).or_default().push(memory);
        }
        Ok(live)
    }

    /// Inserts the group's fresh rows (see [`insert_fresh`]) and reads what its calls build
    /// on: the live memories of their sessions before the group (see [`Self::live_before`])
    /// and the twins of the rows that did not go in. Returns them and the ids inserted.
    async fn insert_and_read(
        &self,
        transaction: &WriteTransaction<'_>,
        group: &[PendingStore],
        writing: &[usize],
        fresh: &[Vec<row::Model>],
    ) -> Result<
        (
            HashMap<SessionKey, Vec<LiveMemory>>,
            HashSet<String>,
            Vec<row::Model>,
        ),
        DbErr,
    > {
        let rows = || fresh.iter().flatten();
        let postgres = match transaction {
            WriteTransaction::Pooled(postgres) => postgres,
            WriteTransaction::Direct(sqlite) => {
                let live = self.live_before(transaction, group, writing).await?;
                let inserted = insert_fresh(sqlite, rows())?;
                let keys = rows()
                    .filter(|memory| !inserted.contains(&memory.id))
                    .map(twin_key)
                    .collect();
                let twins = self
                    .accesses
                    .read(|| fetch_by_keys(transaction, &keys))
                    .await?;
                return Ok((live, inserted, twins));
            }
        };
        let (incoming, earliest) = incoming(group, writing);
        let sessions: Vec<&SessionKey> = incoming.keys().collect();
        let epoch = self.accesses.stable_epoch().await;
        let (inserted, mut read, mut twins) =
            insert_and_read_postgres(postgres, &sessions, earliest, rows()).await?;
        if !self.accesses.add_unwritten(epoch, &mut read)
            || !self.accesses.add_unwritten(epoch, &mut twins)
        {
            // An access flush committed meanwhile: read again, past this group's rows.
            read = self
                .accesses
                .read(|| load_live(transaction, live_in_sessions(&sessions, earliest)))
                .await?;
            read.retain(|SessionLive(_, memory)| !inserted.contains(memory.id()));
            let keys = rows().map(twin_key).collect();
            twins = self
                .accesses
                .read(|| fetch_by_keys(transaction, &keys))
                .await?;
        }
        // A twin committed after the statement began is not in its snapshot (the insert
        // waited for it): read those after it.
        let found: HashSet<TwinKey> = twins
            .iter()
            .chain(rows().filter(|memory| inserted.contains(&memory.id)))
            .map(twin_key)
            .collect();
        let missing: BTreeSet<TwinKey> = rows()
            .map(twin_key)
            .filter(|key| !found.contains(key))
            .collect();
        if !missing.is_empty() {
            let late = self
                .accesses
                .read(|| fetch_by_keys(transaction, &missing))
                .await?;
            twins.extend(late);
        }
        let mut live: HashMap<SessionKey, Vec<LiveMemory>> = HashMap::new();
        for SessionLive(session, memory) in read {
            live.entry(session).or_default().push(memory);
        }
        Ok((live, inserted, twins))
    }

    /// Hands each written call its outcomes; keeps the responses of those sent with a
    /// request_id.
    async fn respond(
        &self,
        transaction: &WriteTransaction<'_>,
        group: &mut [PendingStore],
        written: Vec<WrittenCall>,
    ) -> Result<(), MemoryError> {
        let mut kept_responses = Vec::new();
        for call in written {
            let pending = &mut group[call.call];
            let outcomes = call
                .stored
                .into_iter()
                .zip(call.similar)
                .map(|((memory, deduplicated), similar)| StoreOutcome {
                    memory,
                    deduplicated,
                    similar: similar
                        .into_iter()
                        .filter_map(|(_, distance, memory)| Some((memory?, distance)))
                        .collect(),
                    evicted: call.evicted.clone(),
                })
                .collect();
            let kept = pending.reply.receive(outcomes, pending.record.is_some());
            if let (Some(record), Some(response)) = (&pending.record, kept) {
                kept_responses.push(memory_request::ActiveModel {
                    tenant_id: ActiveValue::Set(pending.tenant.clone()),
                    request_id: ActiveValue::Set(record.request_id.clone()),
                    request_digest: ActiveValue::Set(record.digest.clone()),
                    response: ActiveValue::Set(response),
                    created_at: ActiveValue::Set(pending.now),
                });
            }
        }
        // One statement per chunk, not per call.
        for chunk in kept_responses.chunks(INSERT_CHUNK) {
            let keep = memory_request::Entity::insert_many(chunk.to_vec());
            transaction
                .execute(keep.build(transaction.backend()))
                .await?;
        }
        Ok(())
    }
}

/// A live memory and its session, as one query of several sessions returns them.
struct SessionLive(SessionKey, LiveMemory);

impl Tracked for SessionLive {
    fn id(&self) -> &str {
        self.1.id()
    }

    fn add_accesses(&mut self, accesses: Accesses) {
        self.1.add_accesses(accesses);
    }
}

/// The sessions the written calls store into, with how many memories each, and the
/// earliest time among the calls (what was live then is what a call may see).
fn incoming(
    group: &[PendingStore],
    writing: &[usize],
) -> (BTreeMap<SessionKey, usize>, DateTime<Utc>) {
    let mut incoming: BTreeMap<SessionKey, usize> = BTreeMap::new();
    for &call in writing {
        let PendingStore {
            tenant,
            session,
            memories,
            ..
        } = &group[call];
        *incoming
            .entry((tenant.clone(), session.as_str().to_owned()))
            .or_default() += memories.len();
    }
    let earliest = writing
        .iter()
        .map(|&call| group[call].now)
        .min()
        .expect("a call to write");
    (incoming, earliest)
}

/// The memories of `sessions` live at `now`.
fn live_in_sessions(sessions: &[&SessionKey], now: DateTime<Utc>) -> Condition {
    let mut by_tenant: BTreeMap<&str, BTreeSet<&str>> = BTreeMap::new();
    for (tenant, session) in sessions {
        by_tenant.entry(tenant).or_default().insert(session);
    }
    let of_sessions = by_tenant
        .into_iter()
        .fold(Condition::any(), |any, (tenant, sessions)| {
            any.add(
                Condition::all()
                    .add(Column::TenantId.eq(tenant))
                    .add(Column::SessionId.is_in(sessions)),
            )
        });
    Condition::all().add(of_sessions).add(live_at(now))
}

/// SQLite, inside the writer's transaction: the database version its connection sees, and
/// whether that connection is the one the writer marked (a TEMP table lives and dies with
/// its connection), so `LiveSets` can tell another connection's version from its own.
async fn writer_version(transaction: &WriteTransaction<'_>) -> Result<Version, DbErr> {
    const MARK: &str = "engram_writer_connection";
    let (data_version, marked) = transaction
        .query::<(i64, i64)>(Statement::from_string(
            DbBackend::Sqlite,
            format!(
                "SELECT data_version, \
                   EXISTS (SELECT 1 FROM temp.sqlite_master WHERE name = '{MARK}') \
                 FROM pragma_data_version"
            ),
        ))
        .await?
        .pop()
        .ok_or_else(|| DbErr::Custom("no data_version".to_owned()))?;
    let marked_connection = marked != 0;
    if !marked_connection {
        let mark = format!("CREATE TEMP TABLE {MARK} (marked INTEGER)");
        transaction
            .execute(Statement::from_string(DbBackend::Sqlite, mark))
            .await?;
    }
    Ok(Version {
        marked_connection,
        data_version,
    })
}

/// Opens a write transaction holding the writer locks of `sessions` (tenant, session id).
/// PostgreSQL takes one advisory lock per session, all in one statement and in key order, so
/// two replicas writing overlapping groups cannot deadlock; SQLite's `BEGIN IMMEDIATE` locks
/// them all.
async fn begin_write<'a>(
    db: &DatabaseConnection,
    sessions: impl IntoIterator<Item = (&'a str, &'a str)>,
) -> Result<DatabaseTransaction, DbErr> {
    let transaction = db
        .begin_with_options(TransactionOptions {
            sqlite_transaction_mode: Some(SqliteTransactionMode::Immediate),
            ..TransactionOptions::default()
        })
        .await?;
    if transaction.get_database_backend() == DbBackend::Postgres {
        // Tenants and session ids are letters, digits, `_` and `-`: `/` joins and a comma
        // separates them safely.
        let sessions: Vec<String> = sessions
            .into_iter()
            .map(|(tenant, session)| format!("{tenant}/{session}"))
            .collect();
        // An access flush names no session and takes no lock.
        if !sessions.is_empty() {
            transaction
                .execute_raw(Statement::from_sql_and_values(
                    DbBackend::Postgres,
                    "SELECT pg_advisory_xact_lock(key) FROM (\
                       SELECT DISTINCT hashtextextended('engram/session/' || session, 0) AS key \
                       FROM unnest(string_to_array($1, ',')) AS session ORDER BY key\
                     ) AS keys",
                    [sessions.join(",").into()],
                ))
                .await?;
        }
    }
    Ok(transaction)
}

/// Writes a changed memory back, all but its access tracking: those columns belong to the
/// access flusher, which adds to them without reading.
async fn write_back(
    transaction: &DatabaseTransaction,
    memory: row::Model,
) -> Result<row::Model, DbErr> {
    let (access_count, last_accessed) = (memory.access_count, memory.last_accessed);
    let mut changes = memory.into_active_model().reset_all();
    changes.access_count = ActiveValue::NotSet;
    changes.last_accessed = ActiveValue::NotSet;
    let written = changes.update(transaction).await?;
    Ok(row::Model {
        access_count,
        last_accessed,
        ..written
    })
}

/// The columns of a [`LiveMemory`] and its session.
type LiveRow = (
    String,
    String,
    String,
    Option<String>,
    f64,
    i32,
    DateTime<Utc>,
    Option<DateTime<Utc>>,
);

/// The live memories `condition` selects, with their sessions.
async fn load_live(
    connection: &WriteTransaction<'_>,
    condition: Condition,
) -> Result<Vec<SessionLive>, DbErr> {
    let rows = match connection {
        WriteTransaction::Direct(sqlite) => {
            live_from_json(&json_array(sqlite, LIVE_JSON_COLUMNS, condition)?)?
        }
        WriteTransaction::Pooled(transaction) => {
            Memories::find()
                .select_only()
                .columns([
                    Column::TenantId,
                    Column::SessionId,
                    Column::Id,
                    Column::SemanticHash,
                    Column::Importance,
                    Column::AccessCount,
                    Column::CreatedAt,
                    Column::ExpiresAt,
                ])
                .filter(condition)
                .into_tuple::<LiveRow>()
                .all(transaction)
                .await?
        }
    };
    Ok(rows.into_iter().map(session_live).collect())
}

fn session_live(row: LiveRow) -> SessionLive {
    let (tenant, session, id, hash, importance, access_count, created_at, expires_at) = row;
    let memory = LiveMemory {
        sketch: Sketch {
            id,
            semantic_hash: hash.as_deref().and_then(text::parse_semantic_hash),
            created_at,
            expires_at,
        },
        standing: Some(Standing {
            importance,
            access_count,
        }),
    };
    SessionLive((tenant, session), memory)
}

/// SQLite: what [`live_from_json`] reads.
const LIVE_JSON_COLUMNS: &str = "tenant_id, session_id, id, semantic_hash, \
    printf('%!.17g', importance), access_count, created_at, expires_at";

/// The live memories of one JSON array: SQLite's [`json_rows`], or PostgreSQL's
/// [`insert_and_read_postgres`].
fn live_from_json(json: &str) -> Result<Vec<LiveRow>, DbErr> {
    type LiveJson = (
        String,
        String,
        String,
        Option<String>,
        String,
        i32,
        String,
        Option<String>,
    );
    let rows: Vec<LiveJson> = serde_json::from_str(json).map_err(|_| unreadable("not JSON"))?;
    rows.into_iter()
        .map(
            |(tenant, session, id, hash, importance, access_count, created_at, expires_at)| {
                Ok((
                    tenant,
                    session,
                    id,
                    hash,
                    json_importance(&importance)?,
                    access_count,
                    json_timestamp(&created_at)?,
                    expires_at.as_deref().map(json_timestamp).transpose()?,
                ))
            },
        )
        .collect()
}

/// The whole memories `condition` selects; on SQLite as ONE JSON array (see [`json_rows`]).
async fn load_rows(
    connection: &impl ConnectionTrait,
    condition: Condition,
) -> Result<Vec<row::Model>, DbErr> {
    if connection.get_database_backend() != DbBackend::Sqlite {
        return Memories::find().filter(condition).all(connection).await;
    }
    let json: String = connection
        .query_one_raw(json_rows(ROW_JSON_COLUMNS, condition))
        .await?
        .ok_or_else(|| unreadable("no row"))?
        .try_get_by_index(0)?;
    rows_from_json(&json)
}

/// SQLite: what [`rows_from_json`] reads.
const ROW_JSON_COLUMNS: &str = "id, tenant_id, session_id, content_type, content, content_hash, \
    semantic_hash, json(metadata), printf('%!.17g', importance), expires_at, access_count, \
    last_accessed, created_at, updated_at, deleted_at";

/// The whole memories of one JSON array: SQLite's [`json_rows`], or PostgreSQL's
/// [`insert_and_read_postgres`].
fn rows_from_json(json: &str) -> Result<Vec<row::Model>, DbErr> {
    type RowJson = (
        String,
        String,
        String,
        String,
        String,
        String,
        Option<String>,
        serde_json::Value,
        String,
        Option<String>,
        i32,
        Option<String>,
        String,
        String,
        Option<String>,
    );
    let rows: Vec<RowJson> = serde_json::from_str(json).map_err(|_| unreadable("not JSON"))?;
    rows.into_iter()
        .map(|row| {
            let (
                id,
                tenant_id,
                session_id,
                content_type,
                content,
                content_hash,
                semantic_hash,
                metadata,
                importance,
                expires_at,
                access_count,
                last_accessed,
                created_at,
                updated_at,
                deleted_at,
            ) = row;
            Ok(row::Model {
                id,
                tenant_id,
                session_id,
                content_type,
                content,
                content_hash,
                semantic_hash,
                metadata,
                importance: json_importance(&importance)?,
                expires_at: expires_at.as_deref().map(json_timestamp).transpose()?,
                access_count,
                last_accessed: last_accessed.as_deref().map(json_timestamp).transpose()?,
                created_at: json_timestamp(&created_at)?,
                updated_at: json_timestamp(&updated_at)?,
                deleted_at: deleted_at.as_deref().map(json_timestamp).transpose()?,
            })
        })
        .collect()
}

/// SQLite: the `columns` of the rows `condition` selects as ONE JSON array. sqlx's SQLite
/// driver hands every row over from its worker thread (a wake-up each), so one array of a
/// session's hundred memories is far cheaper than a hundred rows. Importance travels as text
/// with 17 digits, so it arrives exactly as stored.
fn json_rows(columns: &str, condition: Condition) -> Statement {
    let query = Query::select()
        .expr(Expr::cust(format!(
            "json_group_array(json_array({columns}))"
        )))
        .from(Memories)
        .cond_where(condition)
        .to_owned();
    DbBackend::Sqlite.build(&query)
}

/// SQLite, on the writer's connection: the one JSON array [`json_rows`] selects.
fn json_array(
    sqlite: &SqliteTransaction<'_>,
    columns: &str,
    condition: Condition,
) -> Result<String, DbErr> {
    sqlite
        .query::<String>(json_rows(columns, condition))?
        .pop()
        .ok_or_else(|| unreadable("no row"))
}

fn unreadable(what: &str) -> DbErr {
    DbErr::Type(format!("unreadable memories: {what}"))
}

fn json_importance(text: &str) -> Result<f64, DbErr> {
    text.parse().map_err(|_| unreadable("importance"))
}

fn json_timestamp(text: &str) -> Result<DateTime<Utc>, DbErr> {
    parse_timestamp(text).ok_or_else(|| unreadable("timestamp"))
}

/// A timestamp as SQLite keeps it: RFC 3339 (what Engram writes), or the space-separated
/// text of rows the Python system wrote.
fn parse_timestamp(text: &str) -> Option<DateTime<Utc>> {
    DateTime::parse_from_rfc3339(text)
        .or_else(|_| DateTime::parse_from_str(text, "%Y-%m-%d %H:%M:%S%.f%#z"))
        .map(|at| at.with_timezone(&Utc))
        .or_else(|_| {
            chrono::NaiveDateTime::parse_from_str(text, "%Y-%m-%d %H:%M:%S%.f")
                .map(|at| at.and_utc())
        })
        .ok()
}

fn fresh_row(
    tenant: &str,
    session: &SessionId,
    memory: &NewMemory,
    now: DateTime<Utc>,
) -> row::Model {
    row::Model {
        id: uuid::Uuid::now_v7().to_string(),
        tenant_id: tenant.to_owned(),
        session_id: session.as_str().to_owned(),
        content_type: memory.content_type.as_str().to_owned(),
        content: memory.content.clone(),
        content_hash: memory.content_hash.clone(),
        semantic_hash: Some(text::format_semantic_hash(memory.semantic_hash)),
        metadata: serde_json::Value::Object(memory.metadata.clone()),
        importance: memory.importance,
        expires_at: Some(memory.expires_at),
        access_count: 0,
        last_accessed: None,
        created_at: now,
        updated_at: now,
        deleted_at: None,
    }
}

/// What the unique constraint compares: tenant, session, content type, content hash.
type TwinKey = (String, String, String, String);

fn twin_key(memory: &row::Model) -> TwinKey {
    (
        memory.tenant_id.clone(),
        memory.session_id.clone(),
        memory.content_type.clone(),
        memory.content_hash.clone(),
    )
}

/// The columns of `memories` in the order the statements written here list them.
macro_rules! memory_columns {
    () => {
        "id, tenant_id, session_id, content_type, content, content_hash, semantic_hash, \
         metadata, importance, expires_at, access_count, last_accessed, created_at, \
         updated_at, deleted_at"
    };
}

/// How many columns `memory_columns!` lists, and so how many values `sqlite_values` binds.
const MEMORY_COLUMNS: usize = 15;

/// SQLite: inserts the rows that have no twin yet, in order (a later row of the same content
/// is the earlier one's twin); returns the ids inserted. The unique constraint decides.
///
/// One prepared single-row statement, run once a row, and no `RETURNING`: a multi-row
/// `VALUES` list with `RETURNING` made SQLite fill two temporary tables a group, and closing
/// one walks its page cache; that cost the writer more than the one statement saved.
///
/// `INSERT OR IGNORE` rather than `ON CONFLICT DO NOTHING`: with the latter the CHECK and
/// NOT NULL constraints may still abort the statement midway, so SQLite copies every page
/// the insert touches to a statement journal first (about 5 % of the writer's time). Rows are
/// validated before they get here; one skipped for any other constraint has no twin either,
/// so `write_calls` fails its call rather than acknowledging it.
fn insert_fresh<'a>(
    transaction: &SqliteTransaction<'_>,
    rows: impl Iterator<Item = &'a row::Model>,
) -> Result<HashSet<String>, DbErr> {
    let sql = concat!(
        "INSERT OR IGNORE INTO memories (",
        memory_columns!(),
        ") VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
    );
    let rows: Vec<&row::Model> = rows.collect();
    let went_in = transaction.execute_each(sql, rows.iter().map(|memory| sqlite_values(memory)))?;
    let inserted = rows
        .into_iter()
        .zip(went_in)
        .filter(|(_, went_in)| *went_in);
    Ok(inserted.map(|(memory, _)| memory.id.clone()).collect())
}

/// A fresh row's fields as [`insert_fresh`] binds them, in `memory_columns!` order: as
/// sea-query's values would bind (`sqlite_writer::to_sqlite`), without copying them first.
fn sqlite_values(memory: &row::Model) -> [ToSqlOutput<'_>; MEMORY_COLUMNS] {
    let row::Model {
        id,
        tenant_id,
        session_id,
        content_type,
        content,
        content_hash,
        semantic_hash,
        metadata,
        importance,
        expires_at,
        access_count,
        last_accessed,
        created_at,
        updated_at,
        deleted_at,
    } = memory;
    let null = || ToSqlOutput::from(Null);
    [
        id.as_str().into(),
        tenant_id.as_str().into(),
        session_id.as_str().into(),
        content_type.as_str().into(),
        content.as_str().into(),
        content_hash.as_str().into(),
        semantic_hash.as_deref().map_or_else(null, Into::into),
        metadata.to_string().into(),
        (*importance).into(),
        sqlite_time(expires_at),
        (*access_count).into(),
        sqlite_time(last_accessed),
        timestamp(created_at).into(),
        timestamp(updated_at).into(),
        sqlite_time(deleted_at),
    ]
}

/// An optional timestamp as [`sqlite_values`] binds it: RFC 3339 text, or NULL.
fn sqlite_time(at: &Option<DateTime<Utc>>) -> ToSqlOutput<'static> {
    at.as_ref()
        .map_or(ToSqlOutput::from(Null), |at| timestamp(at).into())
}

/// PostgreSQL: [`insert_fresh`], and from the snapshot before it the live memories of
/// `sessions` at `now` and every row holding a key of the fresh rows, in ONE statement: one
/// trip to PostgreSQL and, as the rows travel as one JSON parameter, one plan whatever the
/// group's size. Each session and each key is its own index lookup (LATERAL): with the
/// sessions in one IN list, a table too young to have statistics was read by its tenant
/// alone, thousands of rows a group. Importance travels as text, which with sqlx's
/// `extra_float_digits` is the shortest that reads back exactly.
async fn insert_and_read_postgres<'a>(
    transaction: &DatabaseTransaction,
    sessions: &[&SessionKey],
    now: DateTime<Utc>,
    fresh: impl Iterator<Item = &'a row::Model>,
) -> Result<(HashSet<String>, Vec<SessionLive>, Vec<row::Model>), DbErr> {
    const STATEMENT: &str = concat!(
        "\
        WITH fresh AS (\
          SELECT * FROM jsonb_to_recordset($1::jsonb) AS f(\
            position integer, id text, tenant_id text, session_id text, content_type text, \
            content text, content_hash text, semantic_hash text, metadata json, \
            importance double precision, expires_at timestamptz, access_count integer, \
            last_accessed timestamptz, created_at timestamptz, updated_at timestamptz, \
            deleted_at timestamptz)\
        ), inserted AS (\
          INSERT INTO memories (",
        memory_columns!(),
        ") \
          SELECT ",
        memory_columns!(),
        " FROM fresh ORDER BY position \
          ON CONFLICT (tenant_id, session_id, content_type, content_hash) DO NOTHING \
          RETURNING id\
        ), live AS (\
          SELECT m.* FROM jsonb_to_recordset($2::jsonb) AS s(tenant_id text, session_id text) \
          CROSS JOIN LATERAL (\
            SELECT json_build_array(tenant_id, session_id, id, semantic_hash, \
              importance::text, access_count, created_at, expires_at) AS live \
            FROM memories \
            WHERE tenant_id = s.tenant_id AND session_id = s.session_id \
              AND deleted_at IS NULL AND (expires_at IS NULL OR expires_at > $3) \
            OFFSET 0) AS m\
        ), twins AS (\
          SELECT m.twin FROM fresh AS f \
          CROSS JOIN LATERAL (\
            SELECT json_build_array(id, tenant_id, session_id, content_type, content, \
              content_hash, semantic_hash, metadata, importance::text, expires_at, \
              access_count, last_accessed, created_at, updated_at, deleted_at) AS twin \
            FROM memories \
            WHERE tenant_id = f.tenant_id AND session_id = f.session_id \
              AND content_type = f.content_type AND content_hash = f.content_hash \
            OFFSET 0) AS m\
        ) \
        SELECT (SELECT coalesce(json_agg(id), '[]') FROM inserted)::text, \
          (SELECT coalesce(json_agg(live), '[]') FROM live)::text, \
          (SELECT coalesce(json_agg(twin), '[]') FROM twins)::text"
    );
    let fresh: Vec<serde_json::Value> = fresh
        .enumerate()
        .map(|(position, memory)| fresh_json(position, memory))
        .collect();
    let sessions: Vec<serde_json::Value> = sessions
        .iter()
        .map(|(tenant, session)| serde_json::json!({"tenant_id": tenant, "session_id": session}))
        .collect();
    let statement = Statement::from_sql_and_values(
        DbBackend::Postgres,
        STATEMENT,
        [
            serde_json::Value::Array(fresh).into(),
            serde_json::Value::Array(sessions).into(),
            now.into(),
        ],
    );
    let (inserted, live, twins) = transaction
        .query_one_raw(statement)
        .await?
        .ok_or_else(|| unreadable("no row"))?
        .try_get_many_by_index::<(String, String, String)>()?;
    let inserted: HashSet<String> =
        serde_json::from_str(&inserted).map_err(|_| unreadable("not JSON"))?;
    let live = live_from_json(&live)?
        .into_iter()
        .map(session_live)
        .collect();
    Ok((inserted, live, rows_from_json(&twins)?))
}

/// A fresh row as [`insert_and_read_postgres`] sends it, at its position in the group.
fn fresh_json(position: usize, memory: &row::Model) -> serde_json::Value {
    let row::Model {
        id,
        tenant_id,
        session_id,
        content_type,
        content,
        content_hash,
        semantic_hash,
        metadata,
        importance,
        expires_at,
        access_count,
        last_accessed,
        created_at,
        updated_at,
        deleted_at,
    } = memory;
    serde_json::json!({
        "position": position,
        "id": id,
        "tenant_id": tenant_id,
        "session_id": session_id,
        "content_type": content_type,
        "content": content,
        "content_hash": content_hash,
        "semantic_hash": semantic_hash,
        "metadata": metadata,
        "importance": importance,
        "expires_at": expires_at,
        "access_count": access_count,
        "last_accessed": last_accessed,
        "created_at": created_at,
        "updated_at": updated_at,
        "deleted_at": deleted_at,
    })
}

/// The rows holding these (tenant, session, content type, content hash) keys, deleted or not.
/// On the SQLite writer see [`rows_by_key`].
async fn fetch_by_keys(
    transaction: &WriteTransaction<'_>,
    keys: &BTreeSet<TwinKey>,
) -> Result<Vec<row::Model>, DbErr> {
    if keys.is_empty() {
        return Ok(Vec::new());
    }
    match transaction {
        WriteTransaction::Pooled(pooled) => {
            let mut any = Condition::any();
            for (tenant, session, content_type, content_hash) in keys {
                any = any.add(
                    Condition::all()
                        .add(Column::TenantId.eq(tenant.as_str()))
                        .add(Column::SessionId.eq(session.as_str()))
                        .add(Column::ContentType.eq(content_type.as_str()))
                        .add(Column::ContentHash.eq(content_hash.as_str())),
                );
            }
            load_rows(pooled, any).await
        }
        WriteTransaction::Direct(sqlite) => {
            let condition =
                "tenant_id = ? AND session_id = ? AND content_type = ? AND content_hash = ?";
            let keys = keys
                .iter()
                .map(|(tenant, session, content_type, content_hash)| {
                    [tenant, session, content_type, content_hash].map(String::as_str)
                });
            rows_by_key(sqlite, condition, keys)
        }
    }
}

/// The memories of `ids`. On the SQLite writer see [`rows_by_key`].
async fn fetch_by_ids(
    transaction: &WriteTransaction<'_>,
    ids: &BTreeSet<&str>,
) -> Result<Vec<row::Model>, DbErr> {
    match transaction {
        WriteTransaction::Pooled(pooled) => {
            let condition = Condition::all().add(Column::Id.is_in(ids.iter().copied()));
            load_rows(pooled, condition).await
        }
        WriteTransaction::Direct(sqlite) => {
            rows_by_key(sqlite, "id = ?", ids.iter().map(|id| [*id]))
        }
    }
}

/// SQLite, on the writer's connection: the memories of each key in turn, `condition` naming
/// a key's columns with `?`. One statement stays prepared; a statement of its own for every
/// number of keys was built, parsed and planned again in most groups.
fn rows_by_key<'k, const N: usize>(
    sqlite: &SqliteTransaction<'_>,
    condition: &str,
    keys: impl IntoIterator<Item = [&'k str; N]>,
) -> Result<Vec<row::Model>, DbErr> {
    let sql = format!(
        "SELECT json_group_array(json_array({ROW_JSON_COLUMNS})) FROM memories WHERE {condition}"
    );
    let mut rows = Vec::new();
    for key in keys {
        for json in sqlite.query_bound::<String>(&sql, key.map(ToSqlOutput::from))? {
            rows.extend(rows_from_json(&json)?);
        }
    }
    Ok(rows)
}

/// Answers calls sent with a request_id seen before: the kept response, or a failure when
/// the id came with another request. Returns the calls answered so.
async fn replay_kept(
    transaction: &WriteTransaction<'_>,
    group: &mut [PendingStore],
    failures: &mut [Option<MemoryError>],
) -> Result<HashSet<usize>, DbErr> {
    use memory_request::Column as Kept;
    let mut answered = HashSet::new();
    let of_group = group
        .iter()
        .filter_map(|call| Some((call.tenant.as_str(), call.record.as_ref()?)))
        .fold(Condition::any(), |any, (tenant, record)| {
            any.add(
                Condition::all()
                    .add(Kept::TenantId.eq(tenant))
                    .add(Kept::RequestId.eq(record.request_id.as_str())),
            )
        });
    if of_group.is_empty() {
        return Ok(answered);
    }
    let find_kept = memory_request::Entity::find()
        .select_only()
        .columns([
            Kept::TenantId,
            Kept::RequestId,
            Kept::RequestDigest,
            Kept::Response,
        ])
        .filter(of_group);
    let kept: HashMap<(String, String), (String, Vec<u8>)> = transaction
        .query::<(String, String, String, Vec<u8>)>(find_kept.build(transaction.backend()))
        .await?
        .into_iter()
        .map(|(tenant, request_id, digest, response)| ((tenant, request_id), (digest, response)))
        .collect();
    for (index, call) in group.iter_mut().enumerate() {
        let Some(earlier) = call.record.as_ref().and_then(|record| {
            kept.get(&(call.tenant.clone(), record.request_id.clone()))
                .map(|kept| (record, kept))
        }) else {
            continue;
        };
        let (record, (digest, response)) = earlier;
        answered.insert(index);
        if *digest != record.digest {
            failures[index] = Some(MemoryError::RequestIdReused);
        } else if let Err(failure) = call.reply.replay(response) {
            failures[index] = Some(failure);
        }
    }
    Ok(answered)
}

/// Removes the least important live memories beyond the cap from `live`; returns their ids.
/// Past the cap every member must have been read whole (`LiveSets::take` sees to it).
fn evict_over_cap(
    live: &mut Vec<LiveMemory>,
    cap: usize,
    now: DateTime<Utc>,
) -> Result<Vec<String>, DbErr> {
    if live.len() <= cap {
        return Ok(Vec::new());
    }
    let ranked: Vec<Ranked> = live
        .iter()
        .map(|memory| memory.ranked(now))
        .collect::<Option<_>>()
        .ok_or_else(|| DbErr::Custom("a session over its cap was not read whole".to_owned()))?;
    let evicted: Vec<String> = choose_evictions(&ranked, cap)
        .into_iter()
        .map(str::to_owned)
        .collect();
    live.retain(|memory| !evicted.contains(&memory.sketch.id));
    Ok(evicted)
}

/// What the near-duplicate search reads of a memory, whole or as the writer loads it.
trait Hashed {
    fn semantic_hash(&self) -> Option<u64>;
    fn created_at(&self) -> DateTime<Utc>;
}

impl Hashed for LiveMemory {
    fn semantic_hash(&self) -> Option<u64> {
        self.sketch.semantic_hash
    }

    fn created_at(&self) -> DateTime<Utc> {
        self.sketch.created_at
    }
}

impl Hashed for row::Model {
    fn semantic_hash(&self) -> Option<u64> {
        self.semantic_hash
            .as_deref()
            .and_then(text::parse_semantic_hash)
    }

    fn created_at(&self) -> DateTime<Utc> {
        self.created_at
    }
}

/// The memories within `max_distance` of `hash`, nearest first (then oldest first).
fn nearest<'a, T: Hashed>(
    hash: u64,
    candidates: impl Iterator<Item = &'a T>,
    max_distance: u32,
) -> Vec<(&'a T, u32)> {
    let mut near: Vec<(&T, u32)> = candidates
        .filter_map(|memory| {
            let distance = text::hamming_distance(hash, memory.semantic_hash()?);
            (distance <= max_distance).then_some((memory, distance))
        })
        .collect();
    near.sort_by(|(a, da), (b, db)| da.cmp(db).then(a.created_at().cmp(&b.created_at())));
    near
}

/// After a commit, before answering: drops the sessions from this replica's cache and
/// announces them to the others (PostgreSQL).
async fn sessions_changed(db: &DatabaseConnection, cache: &SessionCache, sessions: &[SessionKey]) {
    for key in sessions {
        cache.invalidate(key);
    }
    announce(db, announced(sessions).into_iter()).await;
}

/// What a notification carries for each changed session.
fn announced<'a>(sessions: impl IntoIterator<Item = &'a SessionKey>) -> Vec<String> {
    sessions
        .into_iter()
        .map(|(tenant, session)| format!("{tenant}/{session}"))
        .collect()
}

async fn changed_everywhere(db: &DatabaseConnection, cache: &SessionCache) {
    cache.invalidate_all();
    announce(db, [EVERY_SESSION.to_owned()].into_iter()).await;
}

/// Notifies the other replicas, after the commit: a NOTIFY inside the write transaction
/// would serialize every commit on PostgreSQL's notification lock. The change is committed
/// whatever happens here, so a failure is logged, not returned; the other replicas then see
/// the change within the cache's max age.
async fn announce(db: &DatabaseConnection, payloads: impl Iterator<Item = String>) {
    if db.get_database_backend() != DbBackend::Postgres {
        return;
    }
    // Tenants and session ids are letters, digits, `_` and `-`: a comma separates them.
    let payloads: Vec<String> = payloads.collect();
    let notify = Statement::from_sql_and_values(
        DbBackend::Postgres,
        "SELECT pg_notify($1, payload) FROM unnest(string_to_array($2, ',')) AS payload",
        [CHANGES_CHANNEL.into(), payloads.join(",").into()],
    );
    if let Err(error) = db.execute_raw(notify).await {
        tracing::warn!(%error, "announcing changed sessions to other replicas failed");
    }
}

/// PostgreSQL: drops the sessions other replicas announce. The cache serves only while this
/// listener is connected; after a lost connection it starts empty. Ends with the cache.
async fn listen_for_changes(db: DatabaseConnection, cache: Weak<SessionCache>) {
    use sea_orm::sqlx::postgres::PgListener;
    const RETRY: StdDuration = StdDuration::from_secs(5);
    let pool = db.get_postgres_connection_pool().clone();
    loop {
        let listening = async {
            let mut listener = PgListener::connect_with(&pool).await?;
            listener.listen(CHANGES_CHANNEL).await?;
            Ok::<_, sea_orm::sqlx::Error>(listener)
        }
        .await;
        let Some(serving) = cache.upgrade() else {
            return;
        };
        match listening {
            Ok(mut listener) => {
                serving.resume();
                drop(serving);
                loop {
                    let received = listener.try_recv().await;
                    let Some(cache) = cache.upgrade() else {
                        return;
                    };
                    match received {
                        Ok(Some(notification)) => match notification.payload() {
                            EVERY_SESSION => cache.invalidate_all(),
                            session => {
                                if let Some((tenant, session)) = session.split_once('/') {
                                    cache.invalidate(&(tenant.to_owned(), session.to_owned()));
                                }
                            }
                        },
                        // Reconnected: whatever was announced meanwhile is lost.
                        Ok(None) => cache.resume(),
                        Err(error) => {
                            cache.suspend();
                            tracing::warn!(%error, "lost the change notifications; serving uncached");
                            break;
                        }
                    }
                }
            }
            Err(error) => {
                serving.suspend();
                tracing::warn!(%error, "cannot listen for other replicas' changes; serving uncached");
            }
        }
        tokio::time::sleep(RETRY).await;
    }
}

/// SQLite: checkpoints the write-ahead log every `interval`, beside the writer (PASSIVE: never
/// waits for it), on a connection of its own (`open_checkpointer`, opened on the first round
/// and again after a failure), so that the copying runs off the writer's thread and its own
/// checkpoint (`Tables::checkpoint`) finds little left. After a round that copied the whole
/// log, `log_copied` tells the writer to checkpoint now. Ends when `store` is gone.
async fn checkpoint_every<T>(
    file: PathBuf,
    store: Weak<T>,
    interval: StdDuration,
    log_copied: Arc<AtomicBool>,
) {
    let mut ticks = tokio::time::interval(interval);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut checkpointer: Option<DirectSqlite> = None;
    loop {
        ticks.tick().await;
        if store.strong_count() == 0 {
            return;
        }
        let (file, opened) = (file.clone(), checkpointer.take());
        let round = tokio::task::spawn_blocking(move || {
            let sqlite = match opened {
                Some(sqlite) => sqlite,
                None => open_checkpointer(&file)?,
            };
            Ok::<_, DbErr>((copy_log_beside_writer(&sqlite), sqlite))
        })
        .await;
        match round {
            Ok(Ok((copied, sqlite))) => {
                checkpointer = Some(sqlite);
                if copied {
                    log_copied.store(true, Ordering::Release);
                }
            }
            Ok(Err(error)) => {
                tracing::warn!(%error, "opening the checkpoint connection failed; retrying");
            }
            Err(error) => tracing::warn!(%error, "a checkpoint round failed; retrying"),
        }
    }
}

/// The connection of the checkpoints beside the writer.
fn open_checkpointer(file: &Path) -> Result<DirectSqlite, DbErr> {
    let settings = pragma_lines(&SQLITE_PRAGMAS);
    DirectSqlite::open(file, SQLITE_BUSY_TIMEOUT, &settings)
}

/// `PRAGMA name = value;` lines, for `DirectSqlite::open`.
fn pragma_lines<'a>(pragmas: impl IntoIterator<Item = &'a (&'a str, &'a str)>) -> String {
    pragmas
        .into_iter()
        .map(|(name, value)| format!("PRAGMA {name} = {value};"))
        .collect()
}

/// Two PASSIVE checkpoints, the second copying only what was committed during the first,
/// then the copies synced to the database file. Whether every frame was copied and synced.
/// Blocks the calling thread.
fn copy_log_beside_writer(checkpointer: &DirectSqlite) -> bool {
    checkpoint_wal(checkpointer) && checkpoint_wal(checkpointer) && sync_data(checkpointer)
}

/// Whether the SQLite writer should checkpoint, `since` its last checkpoint that copied every
/// frame: once an interval has passed, right after the checkpoint beside it has
/// `copied_just_now` the whole log and synced it, when little is left to copy and sync while
/// the callers wait; or when that has not happened in two intervals (a long read holding
/// old frames).
fn writer_checkpoint_due(since: StdDuration, copied_just_now: bool) -> bool {
    since >= WRITER_CHECKPOINT_INTERVAL && copied_just_now
        || since >= 2 * WRITER_CHECKPOINT_INTERVAL
}

/// Flushes what checkpoints copied into the database file. SQLite syncs the file only after
/// a checkpoint that caught up with the writer, which beside a busy writer only the writer's
/// own does: it then spent 11 to 16 ms of every call's wait in that sync.
fn sync_data(checkpointer: &DirectSqlite) -> bool {
    let synced = checkpointer.sync_database_file();
    if let Err(error) = &synced {
        tracing::warn!(%error, "syncing the database file failed; retrying");
    }
    synced.is_ok()
}

/// A PASSIVE checkpoint of SQLite's write-ahead log.
fn checkpoint() -> Statement {
    Statement::from_string(DbBackend::Sqlite, "PRAGMA wal_checkpoint(PASSIVE)")
}

/// A PASSIVE checkpoint on the checkpointer's connection; whether it copied every frame.
fn checkpoint_wal(checkpointer: &DirectSqlite) -> bool {
    copied_every_frame(checkpointer.query_between_transactions_blocking(checkpoint()))
}

/// Whether a checkpoint's outcome (its row: busy, frames in the log, frames copied) copied
/// them all.
fn copied_every_frame(outcome: Result<Vec<(i64, i64, i64)>, DbErr>) -> bool {
    match outcome.as_deref() {
        Ok([(busy, frames, copied)]) => *busy == 0 && frames == copied,
        Ok(_) => false,
        Err(error) => {
            tracing::warn!(%error, "checkpointing the write-ahead log failed; retrying");
            false
        }
    }
}

/// Writes the counted accesses every `interval` until the tracker is dropped.
async fn flush_accesses_every(
    writer: Writer,
    accesses: Weak<AccessTracker>,
    interval: StdDuration,
) {
    let mut ticks = tokio::time::interval(interval);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        let Some(accesses) = accesses.upgrade() else {
            return;
        };
        if let Err(error) = flush_accesses(&writer, &accesses).await {
            tracing::warn!(%error, "writing access counts failed; retrying next interval");
        }
    }
}

/// Adds the counted accesses to the database in one transaction, a statement per chunk.
async fn flush_accesses(writer: &Writer, accesses: &AccessTracker) -> Result<(), DbErr> {
    let Some(counted) = accesses.begin_flush() else {
        return Ok(());
    };
    let written = async {
        let transaction = writer.begin(std::iter::empty()).await?;
        for chunk in counted.chunks(ACCESS_FLUSH_CHUNK) {
            transaction
                .execute(add_accesses(transaction.backend(), chunk))
                .await?;
        }
        accesses.committing();
        transaction.commit().await
    }
    .await;
    accesses.end_flush(written.is_ok());
    written
}

/// One UPDATE adding each memory's counted accesses and moving its last access forward.
fn add_accesses(backend: DbBackend, counted: &[(String, Accesses)]) -> Statement {
    let mut values: Vec<Value> = Vec::with_capacity(counted.len() * 3);
    for (id, accesses) in counted {
        values.push(id.clone().into());
        values.push(i64::from(accesses.count).into());
        values.push(accesses.last.into());
    }
    let rows = values_rows(backend, &["text", "integer", "timestamptz"], counted.len());
    let sql = match backend {
        DbBackend::Postgres => format!(
            "UPDATE memories AS m SET access_count = m.access_count + u.n, \
             last_accessed = GREATEST(m.last_accessed, u.at) \
             FROM (VALUES {rows}) AS u(id, n, at) WHERE m.id = u.id"
        ),
        _ => format!(
            "WITH u(id, n, at) AS (VALUES {rows}) \
             UPDATE memories SET access_count = access_count + u.n, \
             last_accessed = max(coalesce(last_accessed, u.at), u.at) \
             FROM u WHERE memories.id = u.id"
        ),
    };
    Statement::from_sql_and_values(backend, sql, values)
}

/// PostgreSQL: one UPDATE writing merges into their twins (`WriteTransaction::write_merges`).
fn write_merges(merged: &[&row::Model]) -> Statement {
    let mut values: Vec<Value> = Vec::with_capacity(merged.len() * 5);
    for memory in merged {
        values.push(memory.id.clone().into());
        values.push(memory.importance.into());
        values.push(memory.metadata.clone().into());
        values.push(memory.expires_at.into());
        values.push(memory.updated_at.into());
    }
    let rows = values_rows(
        DbBackend::Postgres,
        &[
            "text",
            "double precision",
            "json",
            "timestamptz",
            "timestamptz",
        ],
        merged.len(),
    );
    let sql = format!(
        "UPDATE memories AS m SET importance = u.importance, metadata = u.metadata, \
         expires_at = u.expires_at, deleted_at = NULL, updated_at = u.updated_at \
         FROM (VALUES {rows}) AS u(id, importance, metadata, expires_at, updated_at) \
         WHERE m.id = u.id"
    );
    Statement::from_sql_and_values(DbBackend::Postgres, sql, values)
}

/// `(?, ?), (?, ?)`: `rows` rows of parameters for a VALUES list. PostgreSQL numbers them
/// and casts each to its column's type (a VALUES list would otherwise type them as text).
fn values_rows(backend: DbBackend, postgres_types: &[&str], rows: usize) -> String {
    let columns = postgres_types.len();
    (0..rows)
        .map(|row| {
            let parameters: Vec<String> = postgres_types
                .iter()
                .enumerate()
                .map(|(column, kind)| match backend {
                    DbBackend::Postgres => format!("${}::{kind}", row * columns + column + 1),
                    _ => "?".to_owned(),
                })
                .collect();
            format!("({})", parameters.join(", "))
        })
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use migration::{Migrator, MigratorTrait};
    use sea_orm::EntityTrait;

    use super::*;

    /// A SQLite URL of a file in a directory removed when the returned guard is dropped.
    fn temporary_database() -> (tempfile::TempDir, String) {
        let directory = tempfile::tempdir().expect("temporary directory");
        let file = directory.path().join("engram.db");
        let url = format!("sqlite://{}?mode=rwc", file.display());
        (directory, url)
    }

    /// A migrated temporary SQLite database, its URL and a pool of `connections` on it.
    async fn migrated_database(
        connections: u32,
    ) -> (tempfile::TempDir, String, DatabaseConnection) {
        let (directory, url) = temporary_database();
        let pool = connect(&url, connections).await.expect("pool");
        Migrator::up(&pool, None).await.expect("migrations");
        (directory, url, pool)
    }

    fn memory(content: &str, importance: f64, now: DateTime<Utc>) -> NewMemory {
        NewMemory {
            content_type: ContentType::Fact,
            content: content.to_owned(),
            content_hash: text::content_hash(content),
            semantic_hash: text::semantic_hash(content),
            metadata: serde_json::Map::new(),
            importance,
            expires_at: now + Duration::days(30),
        }
    }

    #[test]
    fn the_writer_checkpoints_after_the_copy_beside_it_once_an_interval_passed() {
        let interval = WRITER_CHECKPOINT_INTERVAL;
        assert!(!writer_checkpoint_due(interval / 2, true), "too soon");
        assert!(
            !writer_checkpoint_due(interval + interval / 4, false),
            "waits for the copy beside it"
        );
        assert!(writer_checkpoint_due(interval + interval / 4, true));
        assert!(
            writer_checkpoint_due(2 * interval, false),
            "at the latest after two intervals"
        );
    }

    /// A checkpoint round as `checkpoint_every` runs it: on a thread that may block.
    async fn copy_round(checkpointer: &Arc<DirectSqlite>) -> bool {
        let checkpointer = checkpointer.clone();
        tokio::task::spawn_blocking(move || copy_log_beside_writer(&checkpointer))
            .await
            .expect("the round")
    }

    /// The writer is told to checkpoint only after a round beside it copied every frame:
    /// not while a reader's snapshot holds frames back.
    #[tokio::test]
    async fn the_copy_beside_the_writer_succeeds_only_when_every_frame_is_copied() {
        let (_directory, url, pool) = migrated_database(3).await;
        let file = sqlite_file(&url).expect("a database file");
        let checkpointer =
            Arc::new(open_checkpointer(&file).expect("the checkpointer's connection"));
        assert!(copy_round(&checkpointer).await, "the migrations' frames");

        let reader = pool.begin().await.expect("a read transaction");
        reader
            .execute_unprepared("SELECT COUNT(*) FROM memories")
            .await
            .expect("a snapshot");
        pool.execute_unprepared("CREATE TABLE scratch (x); INSERT INTO scratch VALUES (1)")
            .await
            .expect("frames after the snapshot");
        assert!(
            !copy_round(&checkpointer).await,
            "frames newer than a reader's snapshot cannot be copied yet"
        );

        reader.rollback().await.expect("the reader ends");
        assert!(copy_round(&checkpointer).await);
    }

    /// Whether some connection holds SQLite's shared lock on the database file, asked with an
    /// open-file-description lock: those conflict with the POSIX locks SQLite takes even
    /// within one process, so the answer is what another process would see.
    #[cfg(target_os = "linux")]
    fn shared_lock_held(probe: &std::fs::File) -> bool {
        use std::os::fd::AsRawFd;
        // SQLite's lock bytes: PENDING at 1 GiB, then RESERVED, then 510 SHARED bytes.
        const SHARED_FIRST: libc::off_t = 0x4000_0000 + 2;
        const SHARED_SIZE: libc::off_t = 510;
        // SAFETY: a zeroed flock is a valid argument; F_OFD_GETLK only fills it in.
        let mut lock: libc::flock = unsafe { std::mem::zeroed() };
        lock.l_type = libc::F_WRLCK as libc::c_short;
        lock.l_whence = libc::SEEK_SET as libc::c_short;
        lock.l_start = SHARED_FIRST;
        lock.l_len = SHARED_SIZE;
        // SAFETY: the descriptor is open for as long as `probe` lives.
        let asked = unsafe { libc::fcntl(probe.as_raw_fd(), libc::F_OFD_GETLK, &raw mut lock) };
        assert_eq!(asked, 0, "F_OFD_GETLK: {}", std::io::Error::last_os_error());
        lock.l_type != libc::F_UNLCK as libc::c_short
    }

    /// The checkpoint rounds beside the writer leave SQLite's locks in place. Closing any
    /// descriptor of a file drops every POSIX lock the process holds on it; a round that
    /// opened and closed the database file to sync it let another process (an operator's
    /// `sqlite3`, a backup tool) take itself for the last user and delete the write-ahead
    /// log and its index under the running service, whose reads then failed.
    #[cfg(target_os = "linux")]
    #[tokio::test]
    async fn a_checkpoint_round_keeps_the_locks_that_tell_other_processes_the_file_is_open() {
        let (_directory, url, pool) = migrated_database(1).await;
        let file = sqlite_file(&url).expect("a database file");
        let writer = connect_writer(&url, &pool).expect("the writer's connection");
        // Opened before the rounds and kept open, so that the probe drops no lock itself.
        let probe = std::fs::File::open(&file).expect("the database file");
        assert!(
            shared_lock_held(&probe),
            "the open connections' shared lock"
        );

        let checkpointer =
            Arc::new(open_checkpointer(&file).expect("the checkpointer's connection"));
        for _ in 0..2 {
            pool.execute_unprepared(
                "CREATE TABLE IF NOT EXISTS scratch (x); INSERT INTO scratch VALUES (1)",
            )
            .await
            .expect("frames to copy");
            assert!(
                copy_round(&checkpointer).await,
                "the round copies every frame"
            );
        }
        assert!(
            shared_lock_held(&probe),
            "after the rounds, another process must still see the database in use"
        );
        drop((writer, checkpointer));
    }

    /// The stale sweep looks for old rows in the created_at index instead of reading the
    /// whole table.
    #[tokio::test]
    async fn the_stale_sweep_searches_the_created_at_index() {
        let (_directory, _url, pool) = migrated_database(1).await;
        let (batch, values) =
            sweep_batch(stale_at(Utc::now())).build(sea_orm::sea_query::SqliteQueryBuilder);
        let plan = pool
            .query_all_raw(Statement::from_sql_and_values(
                DbBackend::Sqlite,
                format!("EXPLAIN QUERY PLAN {batch}"),
                values.0,
            ))
            .await
            .expect("the plan");
        let steps: Vec<String> = plan
            .iter()
            .map(|step| step.try_get::<String>("", "detail").expect("detail"))
            .collect();
        assert_eq!(
            steps,
            ["SEARCH memories USING INDEX ix_memory_created_at (created_at<?)"]
        );
    }

    /// The SQLite insert ignores every constraint, not only the unique one (`insert_fresh`):
    /// a row the CHECK refuses must fail its call, not be acknowledged, and must not fail
    /// the calls written beside it.
    #[tokio::test]
    async fn a_row_refused_by_a_check_fails_only_its_own_call() {
        let (_directory, url, pool) = migrated_database(2).await;
        let writer = connect_writer(&url, &pool).expect("writer");
        let policy = crate::server::policy(&crate::settings::Settings::default());
        let store = MemoryStore::new(pool.clone(), writer, policy, 0);
        let now = Utc::now();
        let call = |session: &str, memories: Vec<NewMemory>| {
            let (store, session) = (store.clone(), SessionId::parse(session).expect("id"));
            async move {
                store
                    .store("default".to_owned(), session, memories, now, None, |_| ())
                    .await
            }
        };

        let (refused, accepted) = tokio::join!(
            call(
                "refused",
                vec![
                    memory("kept only if valid", 0.5, now),
                    memory("out of range", 1.5, now)
                ],
            ),
            call("accepted", vec![memory("a valid fact", 0.5, now)]),
        );

        // Not Unavailable: a retry cannot cure it.
        assert!(
            matches!(refused, Err(MemoryError::Internal(_))),
            "an importance above 1 was acknowledged or reported as retryable: {refused:?}"
        );
        accepted.expect("the valid call beside it");
        let stored: Vec<String> = Memories::find()
            .all(&pool)
            .await
            .expect("rows")
            .into_iter()
            .map(|memory| memory.session_id)
            .collect();
        assert_eq!(
            stored,
            ["accepted"],
            "nothing of the refused call is stored"
        );
    }

    /// The writer binds a group's rows itself (`sqlite_values`): the pool reads every field
    /// back as written, each from its own column, and a twin of an earlier row stays out;
    /// the writer's lookups by key and by id (`rows_by_key`) read the same rows back.
    #[tokio::test]
    async fn the_writer_insert_reads_back_field_by_field_through_the_pool() {
        use chrono::TimeZone;
        let (_directory, url, pool) = migrated_database(2).await;
        let writer = connect_writer(&url, &pool).expect("writer");
        let Writer::Sqlite(sqlite) = &writer else {
            panic!("SQLite stores through the writer's own connection");
        };
        let at = |seconds: i64, nanoseconds: u32| {
            Utc.timestamp_opt(1_764_000_000 + seconds, nanoseconds)
                .unwrap()
        };
        let every_field_set = row::Model {
            id: "every-field-set".to_owned(),
            tenant_id: "tenant".to_owned(),
            session_id: "session".to_owned(),
            content_type: ContentType::Preference.as_str().to_owned(),
            content: "prefers 'green' tea, ünïcode".to_owned(),
            content_hash: text::content_hash("prefers green tea"),
            semantic_hash: Some(text::format_semantic_hash(text::semantic_hash("tea"))),
            metadata: serde_json::json!({"z": [1, "é\"\n"], "n": 0.1}),
            importance: 0.1,
            expires_at: Some(at(1, 123_456_789)),
            access_count: 7,
            last_accessed: Some(at(2, 0)),
            created_at: at(3, 5),
            updated_at: at(4, 0),
            deleted_at: Some(at(5, 0)),
        };
        let optional_fields_unset = row::Model {
            id: "optional-fields-unset".to_owned(),
            content_hash: text::content_hash("another fact"),
            semantic_hash: None,
            expires_at: None,
            last_accessed: None,
            deleted_at: None,
            ..every_field_set.clone()
        };
        let twin = row::Model {
            id: "twin".to_owned(),
            ..every_field_set.clone()
        };

        let transaction = sqlite.begin().await.expect("begin");
        let inserted = insert_fresh(
            &transaction,
            [&every_field_set, &optional_fields_unset, &twin].into_iter(),
        )
        .expect("insert");
        transaction.commit().expect("commit");

        let expected = [every_field_set, optional_fields_unset];
        assert_eq!(
            inserted,
            expected.iter().map(|memory| memory.id.clone()).collect()
        );
        let read = Memories::find()
            .order_by_asc(Column::Id)
            .all(&pool)
            .await
            .expect("rows");
        assert_eq!(read, expected);

        let unknown = (
            "tenant".to_owned(),
            "session".to_owned(),
            ContentType::Fact.as_str().to_owned(),
            twin.content_hash.clone(),
        );
        let keys: BTreeSet<TwinKey> = [twin_key(&twin), twin_key(&expected[1]), unknown].into();
        let transaction = WriteTransaction::Direct(sqlite.begin().await.expect("begin"));
        let mut twins = fetch_by_keys(&transaction, &keys).await.expect("twins");
        twins.sort_by(|a, b| a.id.cmp(&b.id));
        assert_eq!(
            twins, expected,
            "each key's row, whole, and none for a key not stored"
        );
        let ids = BTreeSet::from(["optional-fields-unset", "twin"]);
        let by_id = fetch_by_ids(&transaction, &ids).await.expect("by id");
        assert_eq!(by_id, expected[1..], "the row of each id stored");
    }

    async fn version_in_transaction(writer: &Writer) -> Version {
        let transaction = writer.begin(std::iter::empty()).await.expect("begin");
        let version = writer_version(&transaction).await.expect("version");
        transaction.commit().await.expect("commit");
        version
    }

    /// `LiveSets` trusts the writer connection's version only while it is the same
    /// connection and nobody else committed.
    #[tokio::test]
    async fn the_writer_version_tells_other_commits_and_other_connections() {
        let (_directory, url) = temporary_database();
        let pool = connect(&url, 2).await.expect("pool");
        pool.execute_unprepared("CREATE TABLE other (x INTEGER)")
            .await
            .expect("a table");
        let writer = connect_writer(&url, &pool).expect("writer");

        let first = version_in_transaction(&writer).await;
        assert!(!first.marked_connection, "a new connection is not marked");
        let again = version_in_transaction(&writer).await;
        assert_eq!(
            again,
            Version {
                marked_connection: true,
                ..first
            },
            "its own transactions move nothing"
        );

        pool.execute_unprepared("INSERT INTO other VALUES (1)")
            .await
            .expect("a commit beside the writer");
        let after = version_in_transaction(&writer).await;
        assert!(after.marked_connection);
        assert_ne!(after.data_version, first.data_version);

        let other_writer = connect_writer(&url, &pool).expect("another writer");
        assert!(
            !version_in_transaction(&other_writer)
                .await
                .marked_connection
        );
    }
}
