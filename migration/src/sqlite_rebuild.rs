//! SQLite cannot add or drop constraints in place, so a migration that changes
//! them rebuilds the table (https://www.sqlite.org/lang_altertable.html#otheralter).

use std::future::Future;

use sea_orm_migration::prelude::*;
use sea_orm_migration::sea_orm::{ConnectionTrait, DbBackend, Statement};

/// Page cache, in KiB, of the SQLite connection while it rebuilds (the default
/// is 2 MiB): the rebuilt table's primary key takes inserts all over (the ids
/// are random), and a small cache writes and rereads its pages again and again.
const REBUILD_CACHE_KIB: i64 = 64 * 1024;

/// Runs `work` with the connection's page cache raised for it, and puts the
/// cache size back after, whatever `work` returned.
pub(crate) async fn with_large_page_cache<T>(
    manager: &SchemaManager<'_>,
    work: impl Future<Output = Result<T, DbErr>>,
) -> Result<T, DbErr> {
    let db = manager.get_connection();
    let cache_size: i64 = db
        .query_one_raw(Statement::from_string(
            DbBackend::Sqlite,
            "PRAGMA cache_size",
        ))
        .await?
        .ok_or_else(|| DbErr::Migration("no row from PRAGMA cache_size".to_owned()))?
        .try_get_by_index(0)?;
    db.execute_unprepared(&format!("PRAGMA cache_size = -{REBUILD_CACHE_KIB}"))
        .await?;
    let outcome = work.await;
    let restored = db
        .execute_unprepared(&format!("PRAGMA cache_size = {cache_size}"))
        .await;
    outcome.and_then(|value| restored.map(|_| value))
}

/// Rebuilds the table `target` names into `target`'s shape: creates it under a
/// scratch name, copies the columns it declares from the current table, swaps
/// it in and recreates `indexes` (dropping the old table dropped its indexes).
/// Every column `target` declares must exist in the current table. The copy
/// goes in the order of `target`'s unique key, so that index fills from one
/// end instead of at random places (a third faster at a million rows).
pub(crate) async fn rebuild_sqlite_table(
    manager: &SchemaManager<'_>,
    mut target: TableCreateStatement,
    indexes: Vec<IndexCreateStatement>,
) -> Result<(), DbErr> {
    let table = match target.get_table_name() {
        Some(TableRef::Table(TableName(_, name), _)) => name.to_string(),
        _ => {
            return Err(DbErr::Migration(
                "a rebuilt table needs a plain name".to_owned(),
            ));
        }
    };
    let scratch = Alias::new(format!("{table}_rebuild"));
    let columns: Vec<Alias> = target
        .get_columns()
        .iter()
        .map(|column| Alias::new(column.get_column_name()))
        .collect();
    let unique_key: Vec<(Alias, Order)> = target
        .get_indexes()
        .iter()
        .find(|index| index.is_unique_key())
        .map(|index| index.get_index_spec().get_column_names())
        .unwrap_or_default()
        .into_iter()
        .map(|column| (Alias::new(column), Order::Asc))
        .collect();
    manager
        .create_table(target.table(scratch.clone()).to_owned())
        .await?;
    let copy = Query::insert()
        .into_table(scratch.clone())
        .columns(columns.clone())
        .select_from(
            Query::select()
                .columns(columns)
                .from(Alias::new(&table))
                .order_by_columns(unique_key)
                .to_owned(),
        )
        .map_err(|error| DbErr::Migration(format!("cannot build the {table} copy: {error}")))?
        .to_owned();
    manager.execute(copy).await?;
    manager
        .drop_table(Table::drop().table(Alias::new(&table)).to_owned())
        .await?;
    manager
        .rename_table(
            Table::rename()
                .table(scratch, Alias::new(&table))
                .to_owned(),
        )
        .await?;
    for index in indexes {
        manager.create_index(index).await?;
    }
    Ok(())
}
