//! The SQLite writer's own connection, driven on the thread that calls it. sqlx runs every
//! SQLite connection on a thread of its own, so each statement of a store group cost two
//! thread wake-ups, and the writer and that thread spent much of each group waiting for the
//! other. Most statements stay sea-query's, built as for any SQLite connection; a group's
//! inserts and merges bind their rows' fields directly (`SqliteTransaction::execute_each`).
//!
//! The store groups and the access flushes share the connection, one transaction at a time:
//! its own commits leave `PRAGMA data_version` as it was, so the writer keeps trusting what
//! it remembers of its sessions (`LiveSets`). The checkpoints beside the writer run on a
//! connection of this kind too, which syncs the database file through SQLite's own handle.
//! The writer's own connection writes its log through `batched_log`, a commit at a time.

use std::ffi::CStr;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use chrono::{DateTime, SecondsFormat, Utc};
use rusqlite::types::{FromSql, ToSqlOutput, Value as Sqlite};
use rusqlite::{Connection, OpenFlags, Row, ToSql, ffi};
use sea_orm::{DbErr, RuntimeErr, Statement, TryGetableMany, Value};

use crate::batched_log;

/// Prepared statements kept: a group's read of its sessions' live memories and its eviction
/// vary with its number of sessions and of evicted rows.
const STATEMENT_CACHE: usize = 128;

pub struct DirectSqlite {
    file: PathBuf,
    connection: Mutex<Connection>,
    /// Held for a whole transaction, or for a statement run between transactions.
    turn: tokio::sync::Mutex<()>,
}

/// A write transaction on the connection (`BEGIN IMMEDIATE`): rolled back unless committed.
pub struct SqliteTransaction<'a> {
    sqlite: &'a DirectSqlite,
    _turn: tokio::sync::MutexGuard<'a, ()>,
    open: bool,
}

impl DirectSqlite {
    /// Opens the database file, which must exist (the pool created it and ran the
    /// migrations), applies `settings` (SQL run once, such as `PRAGMA` lines) and waits up
    /// to `busy_timeout` for another connection's write lock.
    pub fn open(file: &Path, busy_timeout: Duration, settings: &str) -> Result<Self, DbErr> {
        Self::open_on(None, file, busy_timeout, settings)
    }

    /// [`Self::open`] for the group-commit writer, whose log frames are written a commit at
    /// a time (`batched_log`).
    pub fn open_writer(file: &Path, busy_timeout: Duration, settings: &str) -> Result<Self, DbErr> {
        Self::open_on(batched_log::register(), file, busy_timeout, settings)
    }

    /// [`Self::open`] with `vfs`, or SQLite's default VFS.
    fn open_on(
        vfs: Option<&CStr>,
        file: &Path,
        busy_timeout: Duration,
        settings: &str,
    ) -> Result<Self, DbErr> {
        let flags = OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX;
        let connection = match vfs {
            Some(vfs) => Connection::open_with_flags_and_vfs(file, flags, vfs),
            None => Connection::open_with_flags(file, flags),
        }
        .map_err(database_error)?;
        connection
            .busy_timeout(busy_timeout)
            .map_err(database_error)?;
        connection.set_prepared_statement_cache_capacity(STATEMENT_CACHE);
        connection.execute_batch(settings).map_err(database_error)?;
        Ok(Self {
            file: file.to_owned(),
            connection: Mutex::new(connection),
            turn: tokio::sync::Mutex::new(()),
        })
    }

    /// The database file.
    pub fn file(&self) -> &Path {
        &self.file
    }

    /// Waits for the connection's turn and begins a write transaction. `BEGIN IMMEDIATE`
    /// takes the database's write lock at once, waiting up to the busy timeout for it.
    pub async fn begin(&self) -> Result<SqliteTransaction<'_>, DbErr> {
        let turn = self.turn.lock().await;
        self.execute_unprepared("BEGIN IMMEDIATE")?;
        Ok(SqliteTransaction {
            sqlite: self,
            _turn: turn,
            open: true,
        })
    }

    /// The rows of a statement run on its own, between transactions (a checkpoint).
    pub async fn query_between_transactions<T: Columns>(
        &self,
        statement: Statement,
    ) -> Result<Vec<T>, DbErr> {
        let _turn = self.turn.lock().await;
        self.query(statement)
    }

    /// [`Self::query_between_transactions`] from a thread that may block (not the runtime's).
    pub fn query_between_transactions_blocking<T: Columns>(
        &self,
        statement: Statement,
    ) -> Result<Vec<T>, DbErr> {
        let _turn = self.turn.blocking_lock();
        self.query(statement)
    }

    /// Flushes the database file to disk through the connection's own file handle (blocks).
    /// Opening the file anew to sync it would not do: closing any descriptor of a file drops
    /// every POSIX lock the process holds on it, SQLite's included, and another process could
    /// then take itself for the database's last user and delete the write-ahead log.
    pub fn sync_database_file(&self) -> Result<(), DbErr> {
        let connection = self.connection.lock().expect("the connection");
        let mut file: *mut ffi::sqlite3_file = std::ptr::null_mut();
        // SAFETY: the handle is this open connection's, used by no one else while its lock is
        // held; FILE_POINTER only writes the main database's file object into `file`.
        let found = unsafe {
            ffi::sqlite3_file_control(
                connection.handle(),
                c"main".as_ptr(),
                ffi::SQLITE_FCNTL_FILE_POINTER,
                (&raw mut file).cast(),
            )
        };
        if found != ffi::SQLITE_OK || file.is_null() {
            return Err(sqlite_code_error("finding the database file", found));
        }
        // SAFETY: `file` is the connection's file object, valid while the connection is; its
        // methods are checked for before use, and the lock keeps other users out.
        let synced = unsafe {
            match (*file).pMethods.as_ref().and_then(|methods| methods.xSync) {
                Some(sync) => sync(file, ffi::SQLITE_SYNC_NORMAL | ffi::SQLITE_SYNC_DATAONLY),
                None => ffi::SQLITE_MISUSE,
            }
        };
        match synced {
            ffi::SQLITE_OK => Ok(()),
            code => Err(sqlite_code_error("syncing the database file", code)),
        }
    }

    /// Ends a transaction in the log's writes (`batched_log::settle`).
    fn settle_log(&self, committed: bool) -> Result<(), DbErr> {
        let connection = self.connection.lock().expect("the connection");
        // SAFETY: the handle is this open connection's, used by no one else while its lock
        // is held.
        match unsafe { batched_log::settle(connection.handle(), committed) } {
            ffi::SQLITE_OK => Ok(()),
            code => Err(sqlite_code_error("writing the log", code)),
        }
    }

    /// Runs a statement that reads nothing (rows it returns are stepped through and dropped).
    fn execute(&self, statement: Statement) -> Result<(), DbErr> {
        let (sql, values) = bindable(statement);
        self.run(&sql, values, |_| Ok(()))
    }

    fn execute_unprepared(&self, sql: &str) -> Result<(), DbErr> {
        self.execute(Statement::from_string(sea_orm::DbBackend::Sqlite, sql))
    }

    /// The rows of a statement, each read into `T` column by column.
    fn query<T: Columns>(&self, statement: Statement) -> Result<Vec<T>, DbErr> {
        let (sql, values) = bindable(statement);
        self.query_bound(&sql, values)
    }

    fn query_bound<T: Columns>(
        &self,
        sql: &str,
        values: impl IntoIterator<Item = Result<impl ToSql, DbErr>>,
    ) -> Result<Vec<T>, DbErr> {
        let mut read = Vec::new();
        self.run(sql, values, |row| {
            read.push(T::from_sqlite(row).map_err(database_error)?);
            Ok(())
        })?;
        Ok(read)
    }

    fn run(
        &self,
        sql: &str,
        values: impl IntoIterator<Item = Result<impl ToSql, DbErr>>,
        mut each_row: impl FnMut(&Row<'_>) -> Result<(), DbErr>,
    ) -> Result<(), DbErr> {
        let connection = self.connection.lock().expect("the writer's connection");
        let mut prepared = connection.prepare_cached(sql).map_err(database_error)?;
        bind(&mut prepared, values)?;
        let mut rows = prepared.raw_query();
        while let Some(row) = rows.next().map_err(database_error)? {
            each_row(row)?;
        }
        Ok(())
    }
}

/// Binds `values` to the parameters of `prepared` in order, from the first.
fn bind(
    prepared: &mut rusqlite::Statement<'_>,
    values: impl IntoIterator<Item = Result<impl ToSql, DbErr>>,
) -> Result<(), DbErr> {
    for (index, value) in values.into_iter().enumerate() {
        prepared
            .raw_bind_parameter(index + 1, value?)
            .map_err(database_error)?;
    }
    Ok(())
}

impl SqliteTransaction<'_> {
    pub fn execute(&self, statement: Statement) -> Result<(), DbErr> {
        self.sqlite.execute(statement)
    }

    pub fn query<T: Columns>(&self, statement: Statement) -> Result<Vec<T>, DbErr> {
        self.sqlite.query(statement)
    }

    /// The rows of `sql` with `values` bound in order, for a statement built here rather
    /// than by sea-query, whose values need no copy into sea-query values first. Bind as
    /// [`to_sqlite`] does (see [`timestamp`]).
    pub fn query_bound<'v, T: Columns>(
        &self,
        sql: &str,
        values: impl IntoIterator<Item = ToSqlOutput<'v>>,
    ) -> Result<Vec<T>, DbErr> {
        self.sqlite.query_bound(sql, values.into_iter().map(Ok))
    }

    /// Runs `sql` once for each of `rows`, its values bound in order as [`Self::query_bound`]
    /// binds them: one prepared statement, stepped once a row. Returns whether each run
    /// changed a row.
    pub fn execute_each<'v, R>(
        &self,
        sql: &str,
        rows: impl IntoIterator<Item = R>,
    ) -> Result<Vec<bool>, DbErr>
    where
        R: IntoIterator<Item = ToSqlOutput<'v>>,
    {
        let connection = self
            .sqlite
            .connection
            .lock()
            .expect("the writer's connection");
        let mut prepared = connection.prepare_cached(sql).map_err(database_error)?;
        rows.into_iter()
            .map(|values| {
                bind(&mut prepared, values.into_iter().map(Ok))?;
                Ok(prepared.raw_execute().map_err(database_error)? > 0)
            })
            .collect()
    }

    pub fn commit(mut self) -> Result<(), DbErr> {
        self.sqlite.execute_unprepared("COMMIT")?;
        self.open = false;
        self.sqlite.settle_log(true)
    }
}

impl Drop for SqliteTransaction<'_> {
    fn drop(&mut self) {
        if self.open {
            // Nothing of it stays. A failed statement or COMMIT may have ended the
            // transaction already; then there is nothing to roll back.
            let _ = self.sqlite.execute_unprepared("ROLLBACK");
            let _ = self.sqlite.settle_log(false);
        }
    }
}

/// What a row reads into, from the writer's connection or from a pooled one.
pub trait Columns: TryGetableMany {
    fn from_sqlite(row: &Row<'_>) -> rusqlite::Result<Self>;
}

impl Columns for String {
    fn from_sqlite(row: &Row<'_>) -> rusqlite::Result<Self> {
        row.get(0)
    }
}

macro_rules! columns_of_tuple {
    ($($column:ident $index:tt),+) => {
        impl<$($column),+> Columns for ($($column),+)
        where
            $($column: FromSql + sea_orm::TryGetable),+
        {
            fn from_sqlite(row: &Row<'_>) -> rusqlite::Result<Self> {
                Ok(($(row.get::<_, $column>($index)?),+))
            }
        }
    };
}

columns_of_tuple!(A 0, B 1);
columns_of_tuple!(A 0, B 1, C 2);
columns_of_tuple!(A 0, B 1, C 2, D 3);

/// A sea-query statement's SQL, and its values as [`to_sqlite`] binds them.
fn bindable(statement: Statement) -> (String, impl Iterator<Item = Result<Sqlite, DbErr>>) {
    let values = statement.values.map_or_else(Vec::new, |values| values.0);
    (statement.sql, values.into_iter().map(to_sqlite))
}

/// A parameter as sqlx's SQLite driver binds it, so the pool's connections read what the
/// writer wrote exactly as their own writes: timestamps as RFC 3339 text, JSON as its text.
fn to_sqlite(value: Value) -> Result<Sqlite, DbErr> {
    let value = match value {
        Value::Bool(value) => value.map(|value| Sqlite::Integer(value.into())),
        Value::Int(value) => value.map(|value| Sqlite::Integer(value.into())),
        Value::BigInt(value) => value.map(Sqlite::Integer),
        Value::Double(value) => value.map(Sqlite::Real),
        Value::String(value) => value.map(Sqlite::Text),
        Value::Bytes(value) => value.map(Sqlite::Blob),
        Value::Json(value) => value.map(|value| Sqlite::Text(value.to_string())),
        Value::ChronoDateTimeUtc(value) => value.map(|value| Sqlite::Text(timestamp(&value))),
        _ => {
            return Err(DbErr::Custom(
                "a parameter of a type the SQLite writer does not bind".to_owned(),
            ));
        }
    };
    Ok(value.unwrap_or(Sqlite::Null))
}

/// A timestamp as sqlx's SQLite driver binds it: RFC 3339 text.
pub fn timestamp(value: &DateTime<Utc>) -> String {
    value.to_rfc3339_opts(SecondsFormat::AutoSi, false)
}

/// A failed call of SQLite's C interface, by its result code.
fn sqlite_code_error(what: &str, code: std::ffi::c_int) -> DbErr {
    database_error(rusqlite::Error::SqliteFailure(
        ffi::Error::new(code),
        Some(what.to_owned()),
    ))
}

/// SQLITE_BUSY and SQLITE_LOCKED mean another connection held its write lock past the busy
/// timeout: a retry can cure them, as it can a lost connection.
fn database_error(error: rusqlite::Error) -> DbErr {
    let busy = matches!(
        error.sqlite_error_code(),
        Some(rusqlite::ErrorCode::DatabaseBusy | rusqlite::ErrorCode::DatabaseLocked)
    );
    let error = RuntimeErr::Internal(format!("SQLite: {error}"));
    if busy {
        DbErr::Conn(error)
    } else {
        DbErr::Exec(error)
    }
}

#[cfg(test)]
mod tests {
    use chrono::{TimeZone, Utc};
    use sea_orm::{ConnectionTrait, Database, DbBackend};

    use super::*;

    fn insert(via: &str, position: usize, value: Value) -> Statement {
        Statement::from_sql_and_values(
            DbBackend::Sqlite,
            "INSERT INTO bound (via, position, value) VALUES (?, ?, ?)",
            [via.into(), (position as i64).into(), value],
        )
    }

    /// The pool's connections compare and read what the writer wrote as their own writes:
    /// the same storage class and the same bytes for every kind of parameter a group binds.
    #[tokio::test]
    async fn binds_every_parameter_as_the_pools_connections_do() {
        let directory = tempfile::tempdir().expect("temporary directory");
        let file = directory.path().join("binding.db");
        let pool = Database::connect(format!("sqlite://{}?mode=rwc", file.display()))
            .await
            .expect("a sqlx connection");
        pool.execute_unprepared("CREATE TABLE bound (via TEXT, position INTEGER, value)")
            .await
            .expect("a table");
        let writer = DirectSqlite::open(&file, Duration::from_secs(5), "").expect("open");
        let at = Utc.timestamp_opt(1_764_000_000, 123_456_789).unwrap();
        let values: Vec<Value> = vec![
            at.into(),
            Utc.timestamp_opt(1_764_000_000, 0).unwrap().into(),
            serde_json::json!({"z": [1, "é\"\n"], "a": null, "n": 0.1}).into(),
            true.into(),
            0.1f64.into(),
            (-7i32).into(),
            i64::MAX.into(),
            "text with 'quotes' and ünïcode".into(),
            vec![0u8, 255, 10].into(),
            Option::<String>::None.into(),
            Option::<chrono::DateTime<Utc>>::None.into(),
        ];
        for (position, value) in values.iter().enumerate() {
            pool.execute_raw(insert("sqlx", position, value.clone()))
                .await
                .expect("sqlx binds");
            writer
                .execute(insert("writer", position, value.clone()))
                .expect("the writer binds");
        }
        let differing: Vec<(i64, String)> = writer
            .query(Statement::from_string(
                DbBackend::Sqlite,
                "SELECT w.position, typeof(w.value) || ' ' || quote(w.value) || ' vs ' || \
                   typeof(s.value) || ' ' || quote(s.value) \
                 FROM bound AS w JOIN bound AS s USING (position) \
                 WHERE w.via = 'writer' AND s.via = 'sqlx' \
                   AND (w.value IS NOT s.value OR typeof(w.value) != typeof(s.value))",
            ))
            .expect("compare");
        assert_eq!(differing, vec![], "bound otherwise than sqlx binds");
        let rows: Vec<(String, i64)> = writer
            .query(Statement::from_string(
                DbBackend::Sqlite,
                "SELECT via, COUNT(*) FROM bound GROUP BY via ORDER BY via",
            ))
            .expect("count");
        let written = values.len() as i64;
        assert_eq!(
            rows,
            vec![("sqlx".into(), written), ("writer".into(), written)]
        );
    }

    #[test]
    fn refuses_a_parameter_it_cannot_bind_without_running_the_statement() {
        let directory = tempfile::tempdir().expect("temporary directory");
        let file = directory.path().join("refusal.db");
        // An empty file is an empty database.
        std::fs::File::create(&file).expect("a database file");
        let writer = DirectSqlite::open(&file, Duration::from_secs(5), "").expect("open");
        writer
            .execute_unprepared("CREATE TABLE bound (via TEXT, position INTEGER, value)")
            .expect("a table");
        let refused = writer.execute(insert("writer", 0, Value::Float(Some(1.5))));
        assert!(
            matches!(&refused, Err(DbErr::Custom(why)) if why.contains("does not bind")),
            "{refused:?}"
        );
        let rows: Vec<String> = writer
            .query(Statement::from_string(
                DbBackend::Sqlite,
                "SELECT CAST(COUNT(*) AS TEXT) FROM bound",
            ))
            .expect("count");
        assert_eq!(rows, vec!["0".to_owned()]);
    }
}
