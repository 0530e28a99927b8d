//! Databases written by the Python system carry Alembic's bookkeeping
//! (`alembic_version`) instead of sea-orm's (`seaql_migrations`). Before
//! migrating, Engram works out which of its migrations such a database has
//! already had, records them in `seaql_migrations`, and refuses, touching
//! nothing, any database whose schema it cannot name.

use std::time::{SystemTime, UNIX_EPOCH};

use sea_orm_migration::prelude::*;
use sea_orm_migration::sea_orm::{DatabaseConnection, TransactionTrait};

use crate::Migrator;

/// Alembic revisions of the Python system, with how many of Engram's
/// migrations (in order) each one amounts to.
pub const ALEMBIC_REVISIONS: [(&str, usize); 2] =
    [("001_initial_schema", 1), ("002_add_content_hashing", 2)];

/// Columns 002 adds; an Alembic 001 database that already has one was left
/// half-upgraded by the Python system's 002 (which commits mid-way).
const HASHING_COLUMNS: [&str; 4] = ["content_hash", "semantic_hash", "expires_at", "deleted_at"];

/// What keeps a database's schema version.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Bookkeeping {
    /// Engram's own `seaql_migrations` rows (or an empty database).
    Engram,
    /// An Alembic revision of the Python system that amounts to Engram's first
    /// `applied` migrations.
    Alembic { revision: String, applied: usize },
}

/// Reads the bookkeeping, refusing a database Engram cannot place.
pub(crate) async fn inspect(db: &DatabaseConnection) -> Result<Bookkeeping, DbErr> {
    let manager = SchemaManager::new(db);
    // `engram migrate status` creates an empty seaql_migrations: only rows count.
    if manager.has_table("seaql_migrations").await? && has_rows(db, "seaql_migrations").await? {
        return Ok(Bookkeeping::Engram);
    }
    let has_memories = manager.has_table("memories").await?;
    if !manager.has_table("alembic_version").await? {
        if has_memories {
            return Err(refusal(
                "found a memories table but no migration bookkeeping \
                 (neither seaql_migrations nor alembic_version), so its schema version is unknown",
            ));
        }
        return Ok(Bookkeeping::Engram);
    }
    let revisions: Vec<String> = db
        .query_all(
            &Query::select()
                .column(Alias::new("version_num"))
                .from(Alias::new("alembic_version"))
                .order_by(Alias::new("version_num"), Order::Asc)
                .to_owned(),
        )
        .await?
        .iter()
        .map(|row| row.try_get("", "version_num"))
        .collect::<Result<_, _>>()?;
    let known = match revisions.as_slice() {
        [revision] => ALEMBIC_REVISIONS
            .iter()
            .find(|(known, _)| known == revision),
        _ => None,
    };
    let Some(&(revision, applied)) = known else {
        let expected: Vec<&str> = ALEMBIC_REVISIONS.iter().map(|(name, _)| *name).collect();
        return Err(refusal(&format!(
            "alembic_version holds {revisions:?}, but engram adopts only a single revision out \
             of {expected:?}"
        )));
    };
    if !has_memories {
        return Err(refusal(&format!(
            "alembic_version says {revision:?} but there is no memories table"
        )));
    }
    if applied == 1 {
        let mut leftovers = Vec::new();
        for column in HASHING_COLUMNS {
            if manager.has_column("memories", column).await? {
                leftovers.push(column);
            }
        }
        if !leftovers.is_empty() {
            return Err(refusal(&format!(
                "alembic_version says {revision:?} but memories already has {leftovers:?}, \
                 left by an interrupted 002_add_content_hashing of the python system; drop \
                 those columns (or finish that migration with alembic) first"
            )));
        }
    }
    Ok(Bookkeeping::Alembic {
        revision: revision.to_owned(),
        applied,
    })
}

/// Records Engram's first `applied` migrations as applied, in one
/// transaction. `alembic_version` stays as it was, for the Python system's
/// tools.
pub(crate) async fn adopt(
    db: &DatabaseConnection,
    revision: &str,
    applied: usize,
) -> Result<(), DbErr> {
    let applied_at = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |since| since.as_secs() as i64);
    let names: Vec<String> = Migrator::migrations()
        .iter()
        .take(applied)
        .map(|migration| migration.name().to_owned())
        .collect();
    let transaction = db.begin().await?;
    Migrator::install(&transaction).await?;
    let mut insert = Query::insert()
        .into_table(Alias::new("seaql_migrations"))
        .columns([Alias::new("version"), Alias::new("applied_at")])
        .to_owned();
    for name in &names {
        insert.values_panic([Expr::val(name.as_str()), Expr::val(applied_at)]);
    }
    transaction.execute(&insert).await?;
    transaction.commit().await?;
    tracing::info!(
        alembic_revision = revision,
        recorded = ?names,
        "adopted a database of the python system"
    );
    Ok(())
}

async fn has_rows(db: &DatabaseConnection, table: &str) -> Result<bool, DbErr> {
    let first = Query::select()
        .expr(Expr::val(1))
        .from(Alias::new(table))
        .limit(1)
        .to_owned();
    Ok(db.query_one(&first).await?.is_some())
}

fn refusal(found: &str) -> DbErr {
    DbErr::Migration(format!("refusing to migrate: {found}; nothing was changed"))
}
