//! Statements as values, so that one statement (its SQL and its arguments, written once) runs on
//! either path to the database: sqlx's `Any` driver (PostgreSQL, and SQLite everywhere but the
//! connect flow's writes) or the synchronous SQLite connections of [`lite`](super::lite).
//!
//! Arguments are numbered `$1`, `$2`, … in the SQL, as everywhere in this module; on SQLite a
//! `$N` parameter is bound by its number, as sqlx does, wherever it first appears.

use sqlx::AnyConnection;
use sqlx::any::AnyRow;

use super::DbResult;

/// A statement that takes this long is logged (as sqlx logs its own; see `Db::connect`).
const SLOW_STATEMENT: std::time::Duration = std::time::Duration::from_secs(1);

/// One argument of a [`Stmt`].
#[derive(Debug, Clone, Copy)]
pub enum Arg<'a> {
    /// Text.
    Text(&'a str),
    /// Text or NULL.
    OptText(Option<&'a str>),
    /// A 64-bit integer.
    Int(i64),
    /// A 64-bit integer or NULL.
    OptInt(Option<i64>),
}

impl<'a> From<&'a str> for Arg<'a> {
    fn from(v: &'a str) -> Self {
        Arg::Text(v)
    }
}

impl<'a> From<&'a String> for Arg<'a> {
    fn from(v: &'a String) -> Self {
        Arg::Text(v)
    }
}

impl<'a> From<Option<&'a str>> for Arg<'a> {
    fn from(v: Option<&'a str>) -> Self {
        Arg::OptText(v)
    }
}

impl<'a> From<&'a Option<String>> for Arg<'a> {
    fn from(v: &'a Option<String>) -> Self {
        Arg::OptText(v.as_deref())
    }
}

impl From<i64> for Arg<'_> {
    fn from(v: i64) -> Self {
        Arg::Int(v)
    }
}

impl From<Option<i64>> for Arg<'_> {
    fn from(v: Option<i64>) -> Self {
        Arg::OptInt(v)
    }
}

/// A statement and its arguments (`args[0]` is `$1`).
#[derive(Debug, Clone)]
pub struct Stmt<'a> {
    sql: &'a str,
    args: Vec<Arg<'a>>,
}

/// `Stmt::new(sql, [a, b, …])` with each argument converted to an [`Arg`].
macro_rules! stmt {
    ($sql:expr $(, $arg:expr)* $(,)?) => {
        $crate::db::stmt::Stmt::new($sql, vec![$($crate::db::stmt::Arg::from($arg)),*])
    };
}
pub(crate) use stmt;

impl<'a> Stmt<'a> {
    /// A statement with its arguments.
    pub fn new(sql: &'a str, args: Vec<Arg<'a>>) -> Self {
        Self { sql, args }
    }

    fn sqlx(&self) -> sqlx::query::Query<'a, sqlx::Any, sqlx::any::AnyArguments> {
        let mut q = sqlx::query(sqlx::AssertSqlSafe(self.sql));
        for arg in &self.args {
            q = match *arg {
                Arg::Text(v) => q.bind(v),
                Arg::OptText(v) => q.bind(v),
                Arg::Int(v) => q.bind(v),
                Arg::OptInt(v) => q.bind(v),
            };
        }
        q
    }

    /// Runs it through sqlx; the number of rows changed.
    pub async fn execute(&self, conn: &mut AnyConnection) -> DbResult<u64> {
        Ok(self.sqlx().execute(conn).await?.rows_affected())
    }

    /// Runs it through sqlx; its first row, if any.
    pub async fn fetch_optional<T>(&self, conn: &mut AnyConnection) -> DbResult<Option<T>>
    where
        T: for<'r> sqlx::FromRow<'r, AnyRow> + Send + Unpin,
    {
        let row = self.sqlx().fetch_optional(conn).await?;
        Ok(row.map(|r| T::from_row(&r)).transpose()?)
    }

    /// Runs it through sqlx; every row.
    pub async fn fetch_all<T>(&self, conn: &mut AnyConnection) -> DbResult<Vec<T>>
    where
        T: for<'r> sqlx::FromRow<'r, AnyRow> + Send + Unpin,
    {
        let rows = self.sqlx().fetch_all(conn).await?;
        Ok(rows.iter().map(T::from_row).collect::<Result<_, _>>()?)
    }

    /// Prepares it (from the connection's cache) on a synchronous SQLite connection and binds
    /// each `$N` parameter to `args[N - 1]`.
    fn lite<'c>(&self, conn: &'c rusqlite::Connection) -> rusqlite::Result<rusqlite::CachedStatement<'c>> {
        let mut stmt = conn.prepare_cached(self.sql)?;
        for index in 1..=stmt.parameter_count() {
            let number = stmt
                .parameter_name(index)
                .and_then(|name| name.strip_prefix('$'))
                .and_then(|n| n.parse::<usize>().ok())
                .ok_or(rusqlite::Error::InvalidParameterName(format!("parameter {index} is not $N")))?;
            let arg = self
                .args
                .get(number.wrapping_sub(1))
                .ok_or(rusqlite::Error::InvalidParameterCount(number, self.args.len()))?;
            match *arg {
                Arg::Text(v) => stmt.raw_bind_parameter(index, v)?,
                Arg::OptText(v) => stmt.raw_bind_parameter(index, v)?,
                Arg::Int(v) => stmt.raw_bind_parameter(index, v)?,
                Arg::OptInt(v) => stmt.raw_bind_parameter(index, v)?,
            }
        }
        Ok(stmt)
    }

    /// Runs it on a synchronous SQLite connection; the number of rows changed.
    pub fn lite_execute(&self, conn: &rusqlite::Connection) -> DbResult<u64> {
        self.timed(|| {
            let mut stmt = self.lite(conn)?;
            let mut rows = stmt.raw_query();
            while rows.next()?.is_some() {}
            drop(rows);
            Ok(conn.changes())
        })
    }

    /// Runs it on a synchronous SQLite connection; its first row, if any.
    pub fn lite_fetch_optional<T: FromLite>(&self, conn: &rusqlite::Connection) -> DbResult<Option<T>> {
        self.timed(|| {
            let mut stmt = self.lite(conn)?;
            let mut rows = stmt.raw_query();
            let first = match rows.next()? {
                Some(row) => Some(T::from_lite(row)?),
                None => None,
            };
            // A statement that changes rows (`UPDATE … RETURNING`) runs to its end.
            while rows.next()?.is_some() {}
            Ok(first)
        })
    }

    /// Runs it on a synchronous SQLite connection; every row.
    pub fn lite_fetch_all<T: FromLite>(&self, conn: &rusqlite::Connection) -> DbResult<Vec<T>> {
        self.timed(|| {
            let mut stmt = self.lite(conn)?;
            let mut rows = stmt.raw_query();
            let mut out = Vec::new();
            while let Some(row) = rows.next()? {
                out.push(T::from_lite(row)?);
            }
            Ok(out)
        })
    }

    /// Runs `run`, logging the statement (its SQL, never its arguments) when it took a second
    /// or more, as sqlx does for its own.
    fn timed<T>(&self, run: impl FnOnce() -> DbResult<T>) -> DbResult<T> {
        let started = std::time::Instant::now();
        let out = run();
        let elapsed = started.elapsed();
        if elapsed >= SLOW_STATEMENT {
            tracing::warn!(sql = self.sql, elapsed_ms = elapsed.as_millis() as u64, "slow statement");
        }
        out
    }
}

/// A row type read from a synchronous SQLite connection: its fields in the order of the
/// statement's columns (the same order its `sqlx::FromRow` reads them by name; the tests of
/// [`lite`](super::lite) compare the two).
pub trait FromLite: Sized {
    /// How many columns it reads.
    const COLUMNS: usize;

    /// Reads one row, its first field from column `first`.
    fn from_lite_at(row: &rusqlite::Row<'_>, first: usize) -> rusqlite::Result<Self>;

    /// Reads one row.
    fn from_lite(row: &rusqlite::Row<'_>) -> rusqlite::Result<Self> {
        Self::from_lite_at(row, 0)
    }
}

/// Implements [`FromLite`] for a struct whose fields are read in the order given.
macro_rules! from_lite {
    ($ty:ty { $($field:ident),* $(,)? }) => {
        impl $crate::db::stmt::FromLite for $ty {
            const COLUMNS: usize = [$(stringify!($field)),*].len();

            fn from_lite_at(row: &rusqlite::Row<'_>, first: usize) -> rusqlite::Result<Self> {
                let mut column = first;
                let mut next = || {
                    column += 1;
                    column - 1
                };
                // Fields of a struct expression are evaluated in the order written.
                Ok(Self { $($field: row.get(next())?),* })
            }
        }
    };
}
pub(crate) use from_lite;

/// A connection that runs [`Stmt`]s: sqlx's (`AnyConnection`, and the [`Conn`](super::Conn) and
/// [`WriteTx`](super::WriteTx) that deref to one) or a synchronous SQLite transaction
/// ([`LiteTx`](super::lite::LiteTx)), whose futures are ready at once.
pub trait Exec: Send {
    /// Runs `s`; the number of rows changed.
    fn execute(&mut self, s: &Stmt<'_>) -> impl Future<Output = DbResult<u64>> + Send;
    /// Runs `s`; its first row, if any.
    fn fetch_optional<T: Row>(&mut self, s: &Stmt<'_>) -> impl Future<Output = DbResult<Option<T>>> + Send;
    /// Runs `s`; every row.
    fn fetch_all<T: Row>(&mut self, s: &Stmt<'_>) -> impl Future<Output = DbResult<Vec<T>>> + Send;
}

/// A row type both paths can read.
pub trait Row: for<'r> sqlx::FromRow<'r, AnyRow> + FromLite + Send + Unpin {}

impl<T: for<'r> sqlx::FromRow<'r, AnyRow> + FromLite + Send + Unpin> Row for T {}

impl Exec for AnyConnection {
    fn execute(&mut self, s: &Stmt<'_>) -> impl Future<Output = DbResult<u64>> + Send {
        s.execute(self)
    }

    fn fetch_optional<T: Row>(&mut self, s: &Stmt<'_>) -> impl Future<Output = DbResult<Option<T>>> + Send {
        s.fetch_optional(self)
    }

    fn fetch_all<T: Row>(&mut self, s: &Stmt<'_>) -> impl Future<Output = DbResult<Vec<T>>> + Send {
        s.fetch_all(self)
    }
}

/// Implements [`Exec`] for a type that derefs to an `AnyConnection`.
macro_rules! exec_by_deref {
    ($ty:ty) => {
        impl Exec for $ty {
            fn execute(&mut self, s: &Stmt<'_>) -> impl Future<Output = DbResult<u64>> + Send {
                s.execute(&mut **self)
            }

            fn fetch_optional<T: Row>(
                &mut self,
                s: &Stmt<'_>,
            ) -> impl Future<Output = DbResult<Option<T>>> + Send {
                s.fetch_optional(&mut **self)
            }

            fn fetch_all<T: Row>(&mut self, s: &Stmt<'_>) -> impl Future<Output = DbResult<Vec<T>>> + Send {
                s.fetch_all(&mut **self)
            }
        }
    };
}

exec_by_deref!(super::Conn);
exec_by_deref!(super::WriteTx);
