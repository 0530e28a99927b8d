//! Legacy rows whose contents differ only by case, whitespace or trailing
//! punctuation were distinct under 001's unique (session, type, content) and
//! collide under 002's unique (session, type, content_hash). Each such group
//! becomes one memory, as if the later rows had been stored as duplicates of
//! the first: the oldest row (by `created_at`, then `id`) is kept with its
//! content and creation time; it gets the highest importance, the sum of the
//! access counts, the latest `last_accessed` and `updated_at`, and metadata
//! merged oldest to newest so a newer row's keys win (the service's dedupe
//! rule). The other rows are deleted. Every merge is logged by ids and counts,
//! never by content or session.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use engram_domain::validate;
use sea_orm_migration::prelude::{
    DbErr, Expr, ExprTrait, Index, Order, Query, SchemaManager, SelectStatement,
};
use sea_orm_migration::sea_orm::prelude::Json;
use sea_orm_migration::sea_orm::{ConnectionTrait, QueryResult, Statement, Value};

use super::{Ids, Memories, placeholders, update_rows, values_list};

/// A scratch index over the new unique key, so finding the groups and reading
/// each group's rows are index scans; dropped once the groups are merged.
const SCRATCH_INDEX: &str = "ix_memory_merge_scratch";

/// Collision groups per page. Each statement of a page then fits in one TLS
/// record, which sqlx 0.9.0 sends without waiting for a delayed ACK (see
/// `POSTGRES_MESSAGE_BYTES`).
const MERGE_BATCH: u64 = 100;

/// What decides a merge, read from one legacy row (content is not needed).
#[derive(Debug, Clone, PartialEq)]
pub(super) struct LegacyRow {
    pub id: String,
    pub importance: f64,
    pub access_count: i32,
    pub metadata: Json,
    pub last_accessed: Option<DateTime<Utc>>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

/// A group of colliding rows after merging: `kept` with its new values, and
/// the ids of the rows merged into it.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct MergedGroup {
    pub kept: LegacyRow,
    pub merged_ids: Vec<String>,
}

/// Merges the rows of one collision group (see the module documentation).
/// `None` for an empty group.
pub(super) fn merge_group(mut rows: Vec<LegacyRow>) -> Option<MergedGroup> {
    rows.sort_by(|a, b| a.created_at.cmp(&b.created_at).then(a.id.cmp(&b.id)));
    let mut rows = rows.into_iter();
    let mut kept = rows.next()?;
    let mut merged_ids = Vec::new();
    let mut access_count = i64::from(kept.access_count);
    for newer in rows {
        kept.importance = kept.importance.max(newer.importance);
        access_count += i64::from(newer.access_count);
        // `Ord::max` spelled out: sea-query's ExprTrait has a `max` too.
        kept.last_accessed = Ord::max(kept.last_accessed, newer.last_accessed);
        kept.updated_at = Ord::max(kept.updated_at, newer.updated_at);
        kept.metadata = merge_metadata(kept.metadata, newer.metadata);
        merged_ids.push(newer.id);
    }
    kept.access_count = i32::try_from(access_count).unwrap_or(i32::MAX);
    Some(MergedGroup { kept, merged_ids })
}

/// Objects merge key by key with the newer value winning; anything else
/// (legacy metadata that is not an object) is replaced by the newer value.
fn merge_metadata(older: Json, newer: Json) -> Json {
    match (older, newer) {
        (Json::Object(older), Json::Object(newer)) => {
            Json::Object(validate::merge_metadata(&older, &newer))
        }
        (_, newer) => newer,
    }
}

/// The new unique key.
type GroupKey = (String, String, String);

const KEY_COLUMNS: [Memories; 3] = [
    Memories::SessionId,
    Memories::ContentType,
    Memories::ContentHash,
];

/// The columns of a kept row the merge rewrites.
const MERGED_COLUMNS: [&str; 5] = [
    "importance",
    "access_count",
    "metadata",
    "last_accessed",
    "updated_at",
];

fn read_key(row: &QueryResult) -> Result<GroupKey, DbErr> {
    Ok((
        row.try_get("", "session_id")?,
        row.try_get("", "content_type")?,
        row.try_get("", "content_hash")?,
    ))
}

/// Finds the collision groups with a GROUP BY, a keyset page of keys at a
/// time, reads the rows of a page's groups in one query and writes its
/// merges in one update and one delete; memory stays bounded by a page.
pub(super) async fn merge_rows_that_normalize_alike(
    manager: &SchemaManager<'_>,
) -> Result<(), DbErr> {
    let db = manager.get_connection();
    let mut scratch = Index::create()
        .name(SCRATCH_INDEX)
        .table(Memories::Table)
        .to_owned();
    for column in KEY_COLUMNS {
        scratch.col(column);
    }
    manager.create_index(scratch).await?;
    let (mut groups, mut deleted) = (0_usize, 0_usize);
    let mut after: Option<GroupKey> = None;
    loop {
        let keys = db
            .query_all(&colliding_keys_after(after.as_ref()))
            .await?
            .iter()
            .map(read_key)
            .collect::<Result<Vec<_>, _>>()?;
        let Some(last) = keys.last() else { break };
        after = Some(last.clone());
        let mut rows_by_key: BTreeMap<GroupKey, Vec<LegacyRow>> = BTreeMap::new();
        for row in db.query_all_raw(rows_of_groups(db, keys)).await? {
            rows_by_key
                .entry(read_key(&row)?)
                .or_default()
                .push(read_legacy_row(&row)?);
        }
        let merges: Vec<MergedGroup> = rows_by_key.into_values().filter_map(merge_group).collect();
        for merged in &merges {
            tracing::info!(
                kept_id = %merged.kept.id,
                merged = merged.merged_ids.len(),
                merged_ids = ?merged.merged_ids,
                "merged legacy memories whose contents normalize alike"
            );
        }
        groups += merges.len();
        deleted += merges
            .iter()
            .map(|merged| merged.merged_ids.len())
            .sum::<usize>();
        write_merges(db, merges).await?;
    }
    manager
        .drop_index(
            Index::drop()
                .name(SCRATCH_INDEX)
                .table(Memories::Table)
                .to_owned(),
        )
        .await?;
    tracing::info!(
        groups,
        deleted,
        "merged legacy memories that collide under uq_memory_session_content_hash"
    );
    Ok(())
}

/// The next page of keys shared by more than one row, in key order after `after`.
fn colliding_keys_after(after: Option<&GroupKey>) -> SelectStatement {
    Query::select()
        .columns(KEY_COLUMNS)
        .from(Memories::Table)
        .and_where_option(after.map(|(session_id, content_type, content_hash)| {
            Expr::tuple(KEY_COLUMNS.map(Expr::col)).gt(Expr::tuple([
                Expr::val(session_id.as_str()),
                Expr::val(content_type.as_str()),
                Expr::val(content_hash.as_str()),
            ]))
        }))
        .group_by_columns(KEY_COLUMNS)
        .and_having(Expr::col(Memories::Id).count().gt(1))
        .order_by_columns(KEY_COLUMNS.map(|column| (column, Order::Asc)))
        .limit(MERGE_BATCH)
        .to_owned()
}

/// Every row of the groups `keys`, joined from a VALUES list: both backends
/// then look each key up in the scratch index (SQLite would scan the table
/// for a row-value `IN`).
fn rows_of_groups(db: &impl ConnectionTrait, keys: Vec<GroupKey>) -> Statement {
    let backend = db.get_database_backend();
    let keys: Vec<Vec<Value>> = keys
        .into_iter()
        .map(|(session_id, content_type, content_hash)| {
            vec![session_id.into(), content_type.into(), content_hash.into()]
        })
        .collect();
    let sql = format!(
        "WITH merge_keys (session_id, content_type, content_hash) AS (VALUES {}) \
         SELECT m.session_id, m.content_type, m.content_hash, m.id, m.importance, \
         m.access_count, m.metadata, m.last_accessed, m.created_at, m.updated_at \
         FROM merge_keys JOIN memories AS m ON m.session_id = merge_keys.session_id \
         AND m.content_type = merge_keys.content_type AND m.content_hash = merge_keys.content_hash",
        values_list(&mut placeholders(backend), &keys)
    );
    Statement::from_sql_and_values(backend, sql, keys.into_iter().flatten())
}

fn read_legacy_row(row: &QueryResult) -> Result<LegacyRow, DbErr> {
    Ok(LegacyRow {
        id: row.try_get("", "id")?,
        importance: row.try_get("", "importance")?,
        access_count: row.try_get("", "access_count")?,
        metadata: row.try_get("", "metadata")?,
        last_accessed: row.try_get("", "last_accessed")?,
        created_at: row.try_get("", "created_at")?,
        updated_at: row.try_get("", "updated_at")?,
    })
}

/// Rewrites the kept rows in one statement, then deletes the merged ones a
/// page of ids at a time.
async fn write_merges(db: &impl ConnectionTrait, merges: Vec<MergedGroup>) -> Result<(), DbErr> {
    let mut merged_ids = Vec::new();
    let mut kept_rows = Vec::with_capacity(merges.len());
    for MergedGroup {
        kept,
        merged_ids: ids,
    } in merges
    {
        merged_ids.extend(ids);
        kept_rows.push(vec![
            kept.id.into(),
            kept.importance.into(),
            kept.access_count.into(),
            kept.metadata.into(),
            kept.last_accessed.into(),
            kept.updated_at.into(),
        ]);
    }
    update_rows(db, &MERGED_COLUMNS, kept_rows, Ids::Scattered).await?;
    for ids in merged_ids.chunks(MERGE_BATCH as usize) {
        db.execute(
            &Query::delete()
                .from_table(Memories::Table)
                .and_where(Expr::col(Memories::Id).is_in(ids.iter().map(String::as_str)))
                .to_owned(),
        )
        .await?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn at(seconds: i64) -> DateTime<Utc> {
        DateTime::from_timestamp(1_705_312_800 + seconds, 0).expect("a valid instant")
    }

    fn row(id: &str, created: i64) -> LegacyRow {
        LegacyRow {
            id: id.to_owned(),
            importance: 0.5,
            access_count: 1,
            metadata: json!({}),
            last_accessed: None,
            created_at: at(created),
            updated_at: at(created),
        }
    }

    #[test]
    fn keeps_the_oldest_row_and_merges_the_rest_into_it() {
        let oldest = LegacyRow {
            importance: 0.2,
            access_count: 3,
            metadata: json!({"source": "chat", "lang": "en"}),
            last_accessed: Some(at(50)),
            ..row("c", 0)
        };
        let middle = LegacyRow {
            importance: 0.9,
            access_count: 4,
            metadata: json!({"lang": "de", "tier": "gold"}),
            last_accessed: None,
            updated_at: at(500),
            ..row("a", 10)
        };
        let newest = LegacyRow {
            importance: 0.4,
            access_count: 5,
            metadata: json!({"tier": "silver"}),
            last_accessed: Some(at(90)),
            ..row("b", 20)
        };
        let merged = merge_group(vec![newest, oldest.clone(), middle]).expect("a group");
        assert_eq!(
            merged,
            MergedGroup {
                kept: LegacyRow {
                    importance: 0.9,
                    access_count: 12,
                    metadata: json!({"source": "chat", "lang": "de", "tier": "silver"}),
                    last_accessed: Some(at(90)),
                    updated_at: at(500),
                    ..oldest
                },
                merged_ids: vec!["a".to_owned(), "b".to_owned()],
            }
        );
    }

    #[test]
    fn equal_creation_times_keep_the_smallest_id() {
        let merged = merge_group(vec![row("b", 0), row("a", 0)]).expect("a group");
        assert_eq!(merged.kept.id, "a");
        assert_eq!(merged.merged_ids, ["b"]);
    }

    #[test]
    fn access_counts_saturate_instead_of_overflowing() {
        let big = LegacyRow {
            access_count: i32::MAX,
            ..row("a", 0)
        };
        let merged = merge_group(vec![big, row("b", 1)]).expect("a group");
        assert_eq!(merged.kept.access_count, i32::MAX);
    }

    #[test]
    fn metadata_that_is_not_an_object_is_replaced_by_the_newer_value() {
        assert_eq!(
            merge_metadata(json!(["legacy"]), json!({"a": 1})),
            json!({"a": 1})
        );
        assert_eq!(merge_metadata(json!({"a": 1}), json!("x")), json!("x"));
    }

    #[test]
    fn a_single_row_is_kept_unchanged() {
        let only = row("a", 0);
        assert_eq!(
            merge_group(vec![only.clone()]),
            Some(MergedGroup {
                kept: only,
                merged_ids: vec![]
            })
        );
        assert_eq!(merge_group(vec![]), None);
    }
}
