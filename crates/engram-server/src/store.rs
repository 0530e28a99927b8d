//! The memories table, read and written in transactions. All of Engram's SQL lives here.
//!
//! Writers of one session are serialized (PostgreSQL: a transaction-scoped advisory lock;
//! SQLite: `BEGIN IMMEDIATE`), so the session cap and content checks hold under concurrency.
//! Exact duplicates are decided by the unique constraint, never by a check before insert.

use std::path::PathBuf;
use std::time::Duration as StdDuration;

use chrono::{DateTime, Duration, Utc};
use engram_domain::entity::{memory as row, memory_request};
use engram_domain::filter::PurgeScope;
use engram_domain::memory::{ContentType, NewMemory, merge_into_twin};
use engram_domain::names::{MemoryName, SessionId, SessionScope};
use engram_domain::paging::PageCursor;
use engram_domain::ranking::{Ranked, choose_evictions, effective_importance, rank_descending};
use engram_domain::{etag, limits, text};
use sea_orm::sea_query::{Expr, ExprTrait, Query};
use sea_orm::sqlx::sqlite::{SqliteJournalMode, SqliteSynchronous};
use sea_orm::{
    ActiveModelTrait, ColumnTrait, Condition, ConnectOptions, ConnectionTrait, Database,
    DatabaseConnection, DatabaseTransaction, DbBackend, DbErr, EntityTrait, IntoActiveModel,
    PaginatorTrait, QueryFilter, QueryOrder, QuerySelect, SqliteTransactionMode, Statement,
    TransactionOptions, TransactionTrait, TryInsertResult,
};

use crate::error::MemoryError;

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

#[derive(Clone)]
pub struct MemoryStore {
    db: DatabaseConnection,
    policy: Policy,
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
    pub session: SessionId,
    pub content_types: Vec<ContentType>,
    pub show_deleted: bool,
    pub page_size: usize,
    pub after: Option<PageCursor>,
}

/// Rows removed by one sweep.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct SweepReport {
    pub expired: u64,
    pub purged_deleted: u64,
    pub stale: u64,
    pub request_log: u64,
}

/// Opens the database pool. SQLite runs in WAL mode with synchronous=NORMAL: a committed
/// transaction survives a crash of the process (not necessarily of the machine).
pub async fn connect(url: &str, max_connections: u32) -> Result<DatabaseConnection, DbErr> {
    if let Some(directory) = sqlite_directory(url) {
        std::fs::create_dir_all(&directory).map_err(|error| {
            DbErr::Custom(format!("cannot create {}: {error}", directory.display()))
        })?;
    }
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
        .record_stmt_in_spans(false)
        .map_sqlx_sqlite_opts(|sqlite| {
            sqlite
                .journal_mode(SqliteJournalMode::Wal)
                .synchronous(SqliteSynchronous::Normal)
                .busy_timeout(StdDuration::from_secs(30))
        });
    Database::connect(options).await
}

/// The directory of a file-backed SQLite URL, created before connecting.
fn sqlite_directory(url: &str) -> Option<PathBuf> {
    let path = url
        .strip_prefix("sqlite://")
        .or_else(|| url.strip_prefix("sqlite:"))?;
    let path = path.split('?').next().unwrap_or_default();
    if path.is_empty() || path == ":memory:" {
        return None;
    }
    PathBuf::from(path)
        .parent()
        .filter(|parent| !parent.as_os_str().is_empty())
        .map(PathBuf::from)
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

fn in_session(session: &SessionId) -> Condition {
    Condition::all().add(Column::SessionId.eq(session.as_str()))
}

fn by_name(name: &MemoryName) -> Condition {
    in_session(&name.session_id).add(Column::Id.eq(name.memory_id.as_str()))
}

impl MemoryStore {
    pub fn new(db: DatabaseConnection, policy: Policy) -> Self {
        Self { db, policy }
    }

    pub fn connection(&self) -> &DatabaseConnection {
        &self.db
    }

    /// A write transaction holding the session's writer lock.
    async fn begin_session_write(&self, session: &SessionId) -> Result<DatabaseTransaction, DbErr> {
        let transaction = self
            .db
            .begin_with_options(TransactionOptions {
                sqlite_transaction_mode: Some(SqliteTransactionMode::Immediate),
                ..TransactionOptions::default()
            })
            .await?;
        if transaction.get_database_backend() == DbBackend::Postgres {
            transaction
                .execute_raw(Statement::from_sql_and_values(
                    DbBackend::Postgres,
                    "SELECT pg_advisory_xact_lock(hashtextextended($1, 0))",
                    [format!("engram/session/{}", session.as_str()).into()],
                ))
                .await?;
        }
        Ok(transaction)
    }

    /// Stores memories of one session atomically. `respond` builds the response from the
    /// outcomes; with a request record, that response is kept and a retry gets it back.
    pub async fn store<R: prost::Message + Default>(
        &self,
        session: &SessionId,
        memories: &[NewMemory],
        now: DateTime<Utc>,
        record: Option<RequestRecord>,
        respond: impl FnOnce(Vec<StoreOutcome>) -> R,
    ) -> Result<R, MemoryError> {
        let transaction = self.begin_session_write(session).await?;
        if let Some(record) = &record
            && let Some(replayed) = replay(&transaction, record).await?
        {
            return Ok(replayed);
        }
        let mut stored = Vec::with_capacity(memories.len());
        for memory in memories {
            stored.push(insert_or_merge(&transaction, session, memory, now).await?);
        }
        let mut live = Memories::find()
            .filter(in_session(session))
            .filter(live_at(now))
            .all(&transaction)
            .await?;
        let evicted = self
            .evict_over_cap(&transaction, session, &mut live, now)
            .await?;
        let outcomes = stored
            .into_iter()
            .map(|(memory, deduplicated)| StoreOutcome {
                similar: self.similar_to(&memory, &live, self.policy.similarity_max_distance),
                evicted: evicted.clone(),
                memory,
                deduplicated,
            })
            .collect();
        let response = respond(outcomes);
        if let Some(record) = record {
            memory_request::ActiveModel {
                request_id: sea_orm::Set(record.request_id),
                request_digest: sea_orm::Set(record.digest),
                response: sea_orm::Set(response.encode_to_vec()),
                created_at: sea_orm::Set(now),
            }
            .insert(&transaction)
            .await?;
        }
        transaction.commit().await?;
        Ok(response)
    }

    /// Hard-deletes the least important live memories beyond the cap; returns their names.
    async fn evict_over_cap(
        &self,
        transaction: &DatabaseTransaction,
        session: &SessionId,
        live: &mut Vec<row::Model>,
        now: DateTime<Utc>,
    ) -> Result<Vec<String>, DbErr> {
        if live.len() <= self.policy.max_entries {
            return Ok(Vec::new());
        }
        let ranked: Vec<Ranked> = live.iter().map(|memory| ranked(memory, now)).collect();
        let evicted: Vec<String> = choose_evictions(&ranked, self.policy.max_entries)
            .into_iter()
            .map(str::to_owned)
            .collect();
        Memories::delete_many()
            .filter(Column::Id.is_in(evicted.clone()))
            .exec(transaction)
            .await?;
        live.retain(|memory| !evicted.contains(&memory.id));
        Ok(evicted
            .iter()
            .map(|id| MemoryName::format(session.as_str(), id))
            .collect())
    }

    /// Live memories of the session within `max_distance` of `memory`, nearest first.
    fn similar_to(
        &self,
        memory: &row::Model,
        live: &[row::Model],
        max_distance: u32,
    ) -> Vec<(row::Model, u32)> {
        let Some(hash) = memory
            .semantic_hash
            .as_deref()
            .and_then(text::parse_semantic_hash)
        else {
            return Vec::new();
        };
        nearest(
            hash,
            live.iter().filter(|other| other.id != memory.id),
            max_distance,
        )
    }

    pub async fn get(
        &self,
        name: &MemoryName,
        now: DateTime<Utc>,
    ) -> Result<row::Model, MemoryError> {
        Memories::find()
            .filter(by_name(name))
            .filter(visible_at(now))
            .one(&self.db)
            .await?
            .ok_or_else(|| MemoryError::NotFound {
                name: name.to_string(),
            })
    }

    /// One page in (create time, id) order, and the cursor of the next page if there is one.
    pub async fn list(
        &self,
        query: ListQuery,
        now: DateTime<Utc>,
    ) -> Result<(Vec<row::Model>, Option<PageCursor>), MemoryError> {
        let mut select = Memories::find()
            .filter(in_session(&query.session))
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
        let mut page = select
            .order_by_asc(Column::CreatedAt)
            .order_by_asc(Column::Id)
            .limit(query.page_size as u64 + 1)
            .all(&self.db)
            .await?;
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
        name: &MemoryName,
        expected_etag: Option<&str>,
        changes: Changes,
        now: DateTime<Utc>,
    ) -> Result<row::Model, MemoryError> {
        let transaction = self.begin_session_write(&name.session_id).await?;
        let current = self
            .writable(&transaction, name, expected_etag, now)
            .await?;
        let mut updated = current.clone();
        if let Some(content) = changes.content {
            updated.content_hash = text::content_hash(&content);
            updated.semantic_hash = Some(text::format_semantic_hash(text::semantic_hash(&content)));
            updated.content = content;
            let twin = Memories::find()
                .filter(in_session(&name.session_id))
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
        let updated = updated
            .into_active_model()
            .reset_all()
            .update(&transaction)
            .await?;
        transaction.commit().await?;
        Ok(updated)
    }

    pub async fn delete(
        &self,
        name: &MemoryName,
        expected_etag: Option<&str>,
        now: DateTime<Utc>,
    ) -> Result<row::Model, MemoryError> {
        let transaction = self.begin_session_write(&name.session_id).await?;
        let current = self
            .writable(&transaction, name, expected_etag, now)
            .await?;
        let deleted = row::Model {
            deleted_at: Some(now),
            updated_at: now,
            ..current
        }
        .into_active_model()
        .reset_all()
        .update(&transaction)
        .await?;
        transaction.commit().await?;
        Ok(deleted)
    }

    pub async fn undelete(
        &self,
        name: &MemoryName,
        now: DateTime<Utc>,
    ) -> Result<row::Model, MemoryError> {
        let transaction = self.begin_session_write(&name.session_id).await?;
        let current = Memories::find()
            .filter(by_name(name))
            .filter(visible_at(now))
            .one(&transaction)
            .await?
            .ok_or_else(|| MemoryError::NotFound {
                name: name.to_string(),
            })?;
        if current.deleted_at.is_none() {
            return Err(MemoryError::NotDeleted {
                name: name.to_string(),
            });
        }
        let restored = row::Model {
            deleted_at: None,
            updated_at: now,
            ..current
        }
        .into_active_model()
        .reset_all()
        .update(&transaction)
        .await?;
        transaction.commit().await?;
        Ok(restored)
    }

    /// A visible, live memory whose etag matches when one is given.
    async fn writable(
        &self,
        transaction: &DatabaseTransaction,
        name: &MemoryName,
        expected_etag: Option<&str>,
        now: DateTime<Utc>,
    ) -> Result<row::Model, MemoryError> {
        let current = Memories::find()
            .filter(by_name(name))
            .filter(visible_at(now))
            .one(transaction)
            .await?
            .ok_or_else(|| MemoryError::NotFound {
                name: name.to_string(),
            })?;
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

    /// Counts (and with `force`, deletes) what the scope selects; returns the count and a sample.
    pub async fn purge(
        &self,
        sessions: &SessionScope,
        scope: PurgeScope,
        force: bool,
        now: DateTime<Utc>,
    ) -> Result<(u64, Vec<String>), MemoryError> {
        let mut condition = match scope {
            PurgeScope::Expired => Condition::all().add(Column::ExpiresAt.lte(now)),
            PurgeScope::Deleted => Condition::all().add(Column::DeletedAt.is_not_null()),
            PurgeScope::Everything => Condition::all(),
        };
        let transaction = match sessions {
            SessionScope::One(session) => {
                condition = condition.add(Column::SessionId.eq(session.as_str()));
                self.begin_session_write(session).await?
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
            Memories::delete_many()
                .filter(condition)
                .exec(&transaction)
                .await?
                .rows_affected
        } else {
            Memories::find()
                .filter(condition)
                .count(&transaction)
                .await?
        };
        transaction.commit().await?;
        Ok((count, sample))
    }

    /// The most important live memories, with their access recorded.
    pub async fn retrieve(
        &self,
        session: &SessionId,
        content_types: &[ContentType],
        min_importance: f64,
        limit: usize,
        now: DateTime<Utc>,
    ) -> Result<Vec<row::Model>, MemoryError> {
        let mut select = Memories::find()
            .filter(in_session(session))
            .filter(live_at(now));
        if !content_types.is_empty() {
            select = select
                .filter(Column::ContentType.is_in(content_types.iter().map(|kind| kind.as_str())));
        }
        let candidates = select.all(&self.db).await?;
        let mut ranking: Vec<Ranked> = candidates
            .iter()
            .map(|memory| ranked(memory, now))
            .filter(|memory| memory.effective_importance >= min_importance)
            .collect();
        rank_descending(&mut ranking);
        let chosen: Vec<&str> = ranking.iter().take(limit).map(|memory| memory.id).collect();
        if chosen.is_empty() {
            return Ok(Vec::new());
        }
        Memories::update_many()
            .col_expr(Column::AccessCount, Expr::col(Column::AccessCount).add(1))
            .col_expr(Column::LastAccessed, Expr::value(now))
            .filter(Column::Id.is_in(chosen.iter().copied()))
            .exec(&self.db)
            .await?;
        let mut by_rank = Vec::with_capacity(chosen.len());
        for id in &chosen {
            let memory = candidates
                .iter()
                .find(|memory| memory.id == *id)
                .expect("chosen from candidates");
            by_rank.push(row::Model {
                access_count: memory.access_count.saturating_add(1),
                last_accessed: Some(now),
                ..memory.clone()
            });
        }
        Ok(by_rank)
    }

    pub async fn find_similar(
        &self,
        session: &SessionId,
        semantic_hash: u64,
        max_distance: u32,
        now: DateTime<Utc>,
    ) -> Result<Vec<(row::Model, u32)>, MemoryError> {
        let live = Memories::find()
            .filter(in_session(session))
            .filter(live_at(now))
            .all(&self.db)
            .await?;
        Ok(nearest(semantic_hash, live.iter(), max_distance))
    }

    /// Removes expired memories, soft-deleted ones past their purge_time, memories unused for
    /// memory_cleanup_days, and old request records. Safe to run on every replica at once.
    pub async fn sweep(&self, now: DateTime<Utc>) -> Result<SweepReport, DbErr> {
        let stale_before = now - self.policy.cleanup_after;
        Ok(SweepReport {
            expired: self
                .delete_in_batches(Condition::all().add(Column::ExpiresAt.lte(now)))
                .await?,
            purged_deleted: self
                .delete_in_batches(
                    Condition::all()
                        .add(Column::DeletedAt.lte(now - self.policy.soft_delete_retention)),
                )
                .await?,
            stale: self
                .delete_in_batches(
                    Condition::any()
                        .add(Column::LastAccessed.lt(stale_before))
                        .add(
                            Condition::all()
                                .add(Column::LastAccessed.is_null())
                                .add(Column::CreatedAt.lt(stale_before)),
                        ),
                )
                .await?,
            request_log: memory_request::Entity::delete_many()
                .filter(
                    memory_request::Column::CreatedAt
                        .lt(now - Duration::hours(REQUEST_LOG_RETENTION_HOURS)),
                )
                .exec(&self.db)
                .await?
                .rows_affected,
        })
    }

    async fn delete_in_batches(&self, condition: Condition) -> Result<u64, DbErr> {
        let mut total = 0;
        loop {
            let batch = Query::select()
                .column(Column::Id)
                .from(Memories)
                .cond_where(condition.clone())
                .limit(SWEEP_BATCH)
                .to_owned();
            let deleted = Memories::delete_many()
                .filter(Column::Id.in_subquery(batch))
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

/// Inserts the memory, or merges it into the twin the unique constraint found.
async fn insert_or_merge(
    transaction: &DatabaseTransaction,
    session: &SessionId,
    memory: &NewMemory,
    now: DateTime<Utc>,
) -> Result<(row::Model, bool), MemoryError> {
    let fresh = row::Model {
        id: uuid::Uuid::new_v4().to_string(),
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
    };
    let inserted = Memories::insert(fresh.clone().into_active_model().reset_all())
        .on_conflict_do_nothing_on([Column::SessionId, Column::ContentType, Column::ContentHash])
        .exec_without_returning(transaction)
        .await?;
    if matches!(inserted, TryInsertResult::Inserted(1)) {
        return Ok((fresh, false));
    }
    let twin = Memories::find()
        .filter(in_session(session))
        .filter(Column::ContentType.eq(memory.content_type.as_str()))
        .filter(Column::ContentHash.eq(memory.content_hash.as_str()))
        .one(transaction)
        .await?
        .ok_or_else(|| {
            DbErr::RecordNotFound(
                "the conflicting memory vanished inside the transaction".to_owned(),
            )
        })?;
    let merged = merge_into_twin(twin, memory, now)
        .into_active_model()
        .reset_all()
        .update(transaction)
        .await?;
    Ok((merged, true))
}

/// The kept response of an earlier request with the same request_id, if any.
async fn replay<R: prost::Message + Default>(
    transaction: &DatabaseTransaction,
    record: &RequestRecord,
) -> Result<Option<R>, MemoryError> {
    let Some(earlier) = memory_request::Entity::find_by_id(record.request_id.as_str())
        .one(transaction)
        .await?
    else {
        return Ok(None);
    };
    if earlier.request_digest != record.digest {
        return Err(MemoryError::RequestIdReused);
    }
    R::decode(earlier.response.as_slice())
        .map(Some)
        .map_err(|error| {
            MemoryError::Internal(DbErr::Custom(format!("undecodable kept response: {error}")))
        })
}

fn ranked(memory: &row::Model, now: DateTime<Utc>) -> Ranked<'_> {
    Ranked {
        id: &memory.id,
        created_at: memory.created_at,
        effective_importance: effective_importance(
            memory.importance,
            memory.created_at,
            i64::from(memory.access_count),
            now,
        ),
    }
}

/// Memories within `max_distance` of `hash`, nearest first (then oldest first).
fn nearest<'a>(
    hash: u64,
    candidates: impl Iterator<Item = &'a row::Model>,
    max_distance: u32,
) -> Vec<(row::Model, u32)> {
    let mut near: Vec<(row::Model, u32)> = candidates
        .filter_map(|memory| {
            let other = text::parse_semantic_hash(memory.semantic_hash.as_deref()?)?;
            let distance = text::hamming_distance(hash, other);
            (distance <= max_distance).then(|| (memory.clone(), distance))
        })
        .collect();
    near.sort_by(|(a, da), (b, db)| da.cmp(db).then(a.created_at.cmp(&b.created_at)));
    near
}
