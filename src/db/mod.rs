//! Storage. The only module that writes SQL.
//!
//! authlink runs the same statements on SQLite and PostgreSQL through sqlx's `Any` driver: every
//! column is text, a 64-bit integer, or (for nothing yet) a blob, timestamps are milliseconds since
//! the epoch, and placeholders are `$1`, which both backends accept. Where the dialects differ
//! (connection set-up, locking), the split stays inside this module, keyed on [`Backend`].
//!
//! One submodule per aggregate; each function takes a connection (`&mut AnyConnection`) so that a
//! service can run several of them, and the audit entry, in one transaction.

pub mod api_keys;
pub mod audit;
pub mod connections;
pub mod dashboard;
pub mod key_checks;
pub mod links;
pub mod oauth_flows;
pub mod sessions;
pub mod users;
pub mod webhooks;
pub mod workspaces;

use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

use secrecy::{ExposeSecret, SecretString};
use sqlx::any::{AnyConnectOptions, AnyPoolOptions};
use sqlx::{AnyPool, ConnectOptions, Executor};

use crate::config::DatabaseConfig;

/// Which database engine a [`Db`] talks to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// An embedded SQLite file (WAL mode).
    Sqlite,
    /// A PostgreSQL server.
    Postgres,
}

/// A storage failure, classified for the HTTP and CLI layers.
#[derive(Debug, thiserror::Error)]
pub enum DbError {
    /// The database cannot be reached (or no connection was free in time): a 503.
    #[error("the database is unavailable: {0}")]
    Unavailable(#[source] sqlx::Error),
    /// A uniqueness constraint refused the write.
    #[error("conflict: {0}")]
    Conflict(String),
    /// A migration failed.
    #[error("migration failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    /// Any other database error (a bug or a corrupt database).
    #[error("database error: {0}")]
    Other(#[source] sqlx::Error),
}

impl From<sqlx::Error> for DbError {
    fn from(e: sqlx::Error) -> Self {
        match &e {
            sqlx::Error::PoolTimedOut
            | sqlx::Error::PoolClosed
            | sqlx::Error::Io(_)
            | sqlx::Error::Tls(_)
            | sqlx::Error::WorkerCrashed => DbError::Unavailable(e),
            sqlx::Error::Database(db) if db.is_unique_violation() => {
                DbError::Conflict(db.message().to_string())
            }
            sqlx::Error::Database(db) if is_unavailable_code(db.code().as_deref()) => DbError::Unavailable(e),
            _ => DbError::Other(e),
        }
    }
}

/// PostgreSQL "server is going away" codes and SQLite's busy/locked codes.
fn is_unavailable_code(code: Option<&str>) -> bool {
    matches!(code, Some("57P01" | "57P02" | "57P03" | "53300" | "08006" | "08001" | "08003" | "5" | "6"))
}

/// The result type of this module.
pub type DbResult<T> = Result<T, DbError>;

/// The database handle shared by the whole process.
#[derive(Debug, Clone)]
pub struct Db {
    pool: AnyPool,
    backend: Backend,
}

static SQLITE_MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/sqlite");
static POSTGRES_MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/postgres");

impl Db {
    /// Connects to `url`. For SQLite, the file and its folder are created when missing; every
    /// connection runs in WAL mode with foreign keys on and a busy timeout.
    pub async fn connect(url: &SecretString, options: &DatabaseConfig) -> DbResult<Self> {
        sqlx::any::install_default_drivers();
        let url = url.expose_secret();
        let backend = if url.starts_with("sqlite:") { Backend::Sqlite } else { Backend::Postgres };
        let url = match backend {
            Backend::Sqlite => prepare_sqlite_url(url)?,
            Backend::Postgres => url.to_string(),
        };
        let connect_options = AnyConnectOptions::from_str(&url)
            .map_err(DbError::Other)?
            .log_statements(tracing::log::LevelFilter::Trace)
            .log_slow_statements(tracing::log::LevelFilter::Warn, Duration::from_secs(1));
        let pool_options = AnyPoolOptions::new()
            .max_connections(options.max_connections)
            .min_connections(0)
            .acquire_timeout(Duration::from_secs(options.acquire_timeout_secs))
            .test_before_acquire(true);
        let pool_options = match backend {
            Backend::Sqlite => pool_options.after_connect(|conn, _meta| {
                Box::pin(async move {
                    conn.execute(
                        "PRAGMA foreign_keys = ON; PRAGMA busy_timeout = 5000; PRAGMA secure_delete = ON; \
                         PRAGMA journal_mode = WAL; PRAGMA synchronous = NORMAL;",
                    )
                    .await?;
                    Ok(())
                })
            }),
            Backend::Postgres => pool_options,
        };
        let pool = tokio::time::timeout(
            Duration::from_secs(options.acquire_timeout_secs.max(1) + 1),
            pool_options.connect_with(connect_options),
        )
        .await
        .map_err(|_| DbError::Unavailable(sqlx::Error::PoolTimedOut))??;
        Ok(Self { pool, backend })
    }

    /// Applies the embedded migrations of this backend.
    pub async fn migrate(&self) -> DbResult<()> {
        match self.backend {
            Backend::Sqlite => SQLITE_MIGRATOR.run(&self.pool).await?,
            Backend::Postgres => POSTGRES_MIGRATOR.run(&self.pool).await?,
        }
        Ok(())
    }

    /// Whether the database answers a trivial query.
    pub async fn ping(&self) -> DbResult<()> {
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
    }

    /// The connection pool.
    pub fn pool(&self) -> &AnyPool {
        &self.pool
    }

    /// The backend in use.
    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// Starts a transaction that takes the write lock at once on SQLite (`BEGIN IMMEDIATE`), so
    /// that a read-then-write never fails half-way with `SQLITE_BUSY`.
    pub async fn begin_write(&self) -> DbResult<sqlx::Transaction<'static, sqlx::Any>> {
        let tx = match self.backend {
            Backend::Sqlite => self.pool.begin_with("BEGIN IMMEDIATE").await?,
            Backend::Postgres => self.pool.begin().await?,
        };
        Ok(tx)
    }

    /// Closes the pool, waiting for connections to be returned.
    pub async fn close(&self) {
        self.pool.close().await;
    }
}

/// Makes sure the SQLite file's folder exists and the URL asks for create-if-missing.
fn prepare_sqlite_url(url: &str) -> DbResult<String> {
    let rest = url.trim_start_matches("sqlite://").trim_start_matches("sqlite:");
    let path = rest.split('?').next().unwrap_or_default();
    if path.is_empty() || path == ":memory:" {
        return Ok(url.to_string());
    }
    if let Some(parent) = Path::new(path).parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent).map_err(|e| DbError::Unavailable(sqlx::Error::Io(e)))?;
    }
    if url.contains("mode=") {
        Ok(url.to_string())
    } else if url.contains('?') {
        Ok(format!("{url}&mode=rwc"))
    } else {
        Ok(format!("{url}?mode=rwc"))
    }
}

/// Lets the current transaction commit without waiting for the server's disk flush
/// (PostgreSQL `synchronous_commit = off`; nothing on SQLite, where WAL with
/// `synchronous = NORMAL` already behaves so). For records that must survive a crash of our
/// process but not of the database server.
pub async fn relax_commit(conn: &mut sqlx::AnyConnection, backend: Backend) -> DbResult<()> {
    if backend == Backend::Postgres {
        sqlx::query("SET LOCAL synchronous_commit = off").execute(conn).await?;
    }
    Ok(())
}

/// A new time-ordered id.
pub fn new_id() -> String {
    uuid::Uuid::now_v7().to_string()
}

/// Whether `s` looks like one of our ids (so malformed ids answer 404 without a query).
pub fn is_id(s: &str) -> bool {
    uuid::Uuid::parse_str(s).is_ok() && s.len() == 36
}

/// Clamps a page size to 1..=200 (default 50).
pub fn page_limit(limit: Option<i64>) -> i64 {
    limit.unwrap_or(50).clamp(1, 200)
}
