//! Storage. The only module that writes SQL.
//!
//! authlink runs the same statements on SQLite and PostgreSQL through sqlx's `Any` driver: every
//! column is text, a 64-bit integer, or (for nothing yet) a blob, timestamps are milliseconds since
//! the epoch, and placeholders are `$1`, which both backends accept. Where the dialects differ
//! (connection set-up, locking), the split stays inside this module, keyed on [`Backend`].
//!
//! One submodule per aggregate; each function takes a connection (`&mut AnyConnection`) so that a
//! service can run several of them, and the audit entry, in one transaction.
//!
//! The statements of the connect flow, which runs on every client's visit, are written once as
//! [`stmt::Stmt`] values and take any [`stmt::Exec`]: sqlx's connection, or on a SQLite file a
//! synchronous connection ([`lite`]) that runs them without sqlx's thread switch per statement
//! (its writes through [`Db::write_flow`], its page reads through [`Db::read_fast`]).
//!
//! [`backup`] copies a SQLite file and restores such a copy (`authlink backup`, `restore`).

pub mod api_keys;
pub mod audit;
pub mod backup;
mod conn;
pub mod connections;
pub mod dashboard;
pub mod invitations;
pub mod key_checks;
pub mod links;
pub mod lite;
pub mod oauth_flows;
pub mod processes;
pub mod sealed;
pub mod sessions;
pub mod stmt;
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
use conn::Stash;
pub use conn::{Conn, WriteTx};

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
    Unavailable(#[source] BoxError),
    /// A uniqueness constraint refused the write.
    #[error("conflict: {0}")]
    Conflict(String),
    /// A value held a character the database cannot store (PostgreSQL refuses NUL in text).
    /// Text that is written is validated first and never holds one, so this comes from a key
    /// looked up, which then matches nothing.
    #[error("a value the database cannot hold: {0}")]
    InvalidText(#[source] BoxError),
    /// A migration failed.
    #[error("migration failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    /// Any other database error (a bug or a corrupt database).
    #[error("database error: {0}")]
    Other(#[source] BoxError),
}

/// The cause of a [`DbError`]: an error of sqlx or of rusqlite (see [`lite`]).
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

impl From<sqlx::Error> for DbError {
    fn from(e: sqlx::Error) -> Self {
        match &e {
            sqlx::Error::PoolTimedOut
            | sqlx::Error::PoolClosed
            | sqlx::Error::Io(_)
            | sqlx::Error::Tls(_)
            | sqlx::Error::WorkerCrashed => DbError::Unavailable(e.into()),
            sqlx::Error::Database(db) if db.is_unique_violation() => {
                DbError::Conflict(db.message().to_string())
            }
            sqlx::Error::Database(db) if is_unavailable_code(db.code().as_deref()) => {
                DbError::Unavailable(e.into())
            }
            // character_not_in_repertoire (NUL in text) and untranslatable_character.
            sqlx::Error::Database(db) if matches!(db.code().as_deref(), Some("22021" | "22P05")) => {
                DbError::InvalidText(e.into())
            }
            _ => DbError::Other(e.into()),
        }
    }
}

impl DbError {
    /// [`DbError::Unavailable`] for `e`.
    pub fn unavailable(e: impl Into<BoxError>) -> Self {
        DbError::Unavailable(e.into())
    }
}

/// Whether a database error code says the database cannot do the work now, but may later: on
/// PostgreSQL connection exceptions (class 08), insufficient resources (53: disk full, out of
/// memory, too many connections), the server going away (57P01-57P03), a read-only server (25006,
/// a demoted primary after a failover), a transaction to run again (40001, 40P01) and what the
/// session's time limits ended (57014 a statement, 55P03 a lock wait, 25P03 an idle
/// transaction); on SQLite
/// (whose codes come extended: the primary code is the low byte) busy, locked, read-only, an
/// I/O error, a full disk and a file it cannot open.
fn is_unavailable_code(code: Option<&str>) -> bool {
    let Some(code) = code else {
        return false;
    };
    // (A SQLSTATE has five characters, a SQLite code at most four digits.)
    if code.len() < 5 {
        // SQLITE_BUSY, SQLITE_LOCKED, SQLITE_READONLY, SQLITE_IOERR, SQLITE_FULL, SQLITE_CANTOPEN.
        return code.parse::<i32>().is_ok_and(|c| matches!(c & 0xff, 5 | 6 | 8 | 10 | 13 | 14));
    }
    code.starts_with("08")
        || code.starts_with("53")
        || matches!(
            code,
            "57P01" | "57P02" | "57P03" | "25006" | "40001" | "40P01" | "57014" | "55P03" | "25P03"
        )
}

/// The result type of this module.
pub type DbResult<T> = Result<T, DbError>;

/// The database handle shared by the whole process.
///
/// On SQLite, which allows one writer at a time, writes go through a pool of exactly one
/// connection (`writer`): writers queue in-process, in order, instead of meeting SQLite's busy
/// handler, which retries by sleeping in steps of milliseconds. Reads use the other pool and, in
/// WAL mode, never wait for the writer. Other processes on the same file (the CLI, a worker) still
/// meet the busy timeout. On PostgreSQL both are the same pool.
///
/// A writer holds SQLite's write lock from its first statement to its commit, and every statement
/// in between waits for the task to be polled again. Under load, the HTTP runtime's queue makes
/// that wait long, and every other writer waits behind it; so [`Db::on_writer`] runs a whole
/// write on a thread of its own, whose runtime does nothing else.
#[derive(Debug, Clone)]
pub struct Db {
    pool: AnyPool,
    writer: AnyPool,
    writer_thread: Option<WriterThread>,
    /// SQLite: connections kept between uses (see [`Conn`]), for reads and for the writer.
    stashes: Option<(Stash, Stash)>,
    acquire_timeout: Duration,
    backend: Backend,
    /// SQLite on a file: synchronous connections for the connect flow's writes
    /// ([`Db::write_flow`]).
    lite: Option<std::sync::Arc<lite::Lite>>,
    /// SQLite: how many checkpoints paused the writers to let the WAL start over.
    wal_restarts: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

/// A connection from [`Db::read_fast`].
#[derive(Debug)]
pub enum Reader {
    /// sqlx's.
    Sqlx(Conn),
    /// A synchronous SQLite connection.
    Lite(lite::LiteRead),
}

impl stmt::Exec for Reader {
    async fn execute(&mut self, s: &stmt::Stmt<'_>) -> DbResult<u64> {
        match self {
            Reader::Sqlx(conn) => s.execute(conn).await,
            Reader::Lite(conn) => s.lite_execute(conn.conn()?),
        }
    }

    async fn fetch_optional<T: stmt::Row>(&mut self, s: &stmt::Stmt<'_>) -> DbResult<Option<T>> {
        match self {
            Reader::Sqlx(conn) => s.fetch_optional(conn).await,
            Reader::Lite(conn) => s.lite_fetch_optional(conn.conn()?),
        }
    }

    async fn fetch_all<T: stmt::Row>(&mut self, s: &stmt::Stmt<'_>) -> DbResult<Vec<T>> {
        match self {
            Reader::Sqlx(conn) => s.fetch_all(conn).await,
            Reader::Lite(conn) => s.lite_fetch_all(conn.conn()?),
        }
    }
}

/// A write of the connect flow (a few statements that run on every flow), for
/// [`Db::write_flow`]: written once against [`Exec`](stmt::Exec), it runs on sqlx's connection
/// on PostgreSQL and on a synchronous connection on a SQLite file.
pub trait FlowWrite: Send + 'static {
    /// What it returns.
    type Output: Send + 'static;
    /// Its error.
    type Error: From<DbError> + Send + 'static;
    /// Whether it is one statement, which needs no transaction of its own on sqlx's path (where
    /// `BEGIN` and `COMMIT` would be two more round trips to PostgreSQL).
    const ONE_STATEMENT: bool = false;
    /// Runs its statements on `conn`, inside a transaction unless [`ONE_STATEMENT`](Self::ONE_STATEMENT).
    fn run<E: stmt::Exec>(
        self,
        conn: &mut E,
    ) -> impl Future<Output = Result<Self::Output, Self::Error>> + Send;
}

/// The thread that runs SQLite writes (see [`Db::on_writer`]). It stops when the last handle to
/// it is dropped.
#[derive(Debug, Clone)]
struct WriterThread {
    handle: tokio::runtime::Handle,
    _stop: std::sync::Arc<tokio::sync::oneshot::Sender<()>>,
}

impl WriterThread {
    fn start() -> DbResult<Self> {
        let (handle_tx, handle_rx) = std::sync::mpsc::channel();
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        std::thread::Builder::new()
            .name("authlink-db-writer".into())
            .spawn(move || {
                let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
                    Ok(rt) => rt,
                    Err(e) => {
                        let _ = handle_tx.send(Err(e));
                        return;
                    }
                };
                let _ = handle_tx.send(Ok(runtime.handle().clone()));
                // Runs the spawned writes until every `Db` handle is gone.
                let _ = runtime.block_on(stop_rx);
            })
            .map_err(|e| DbError::unavailable(sqlx::Error::Io(e)))?;
        let handle = handle_rx
            .recv()
            .map_err(|_| DbError::unavailable(sqlx::Error::WorkerCrashed))?
            .map_err(|e| DbError::unavailable(sqlx::Error::Io(e)))?;
        Ok(Self { handle, _stop: std::sync::Arc::new(stop_tx) })
    }
}

/// How often the SQLite WAL is copied back into the database file, when anything was written.
const CHECKPOINT_EVERY: Duration = Duration::from_millis(500);

/// WAL frames (pages of 4 KiB, so 64 MiB) past which a checkpoint pauses the writers to finish
/// (see [`checkpoint_loop`]). Each pause ends with disk flushes that every writer waits for: at
/// 4,096 frames the connect-flow benchmark met one every half second, and its callbacks' p99 rose
/// by half.
const WAL_RESTART_FRAMES: i64 = 16_384;

/// How many times a checkpoint holding the write permit looks again when a reader kept it from
/// copying the whole WAL (see [`checkpoint_loop`]).
const WAL_FINISH_TRIES: usize = 4;

/// The size the WAL file is cut back to when it starts over, after a burst made it longer.
const WAL_SIZE_LIMIT: &str = "134217728";

/// Copies the SQLite WAL back into the database file from a reader connection, off the writer's
/// path (`PASSIVE`: it waits for no one and no one waits for it). Runs on the writer thread until
/// the database closes or its last handle is dropped (which stops that thread).
///
/// The WAL only starts over (from its first page, instead of growing) when a checkpoint has
/// copied all of it; under a steady stream of writes a passive checkpoint never catches up, and
/// the WAL grew by about a gigabyte in ten seconds in the connect-flow benchmark. So when it is
/// longer than [`WAL_RESTART_FRAMES`] after the passive pass, the rest is copied holding the write
/// permit (writers wait for the few pages left, readers are not disturbed), and the next write
/// starts the WAL over.
///
/// That second pass is `PASSIVE` too, not `RESTART`: `RESTART` waits for readers still reading
/// an older snapshot from the WAL through the busy handler, which sleeps 1, 2, 5 ms and more
/// between its looks, and every writer would wait with it (no effect on the connect flow's p99
/// was measured, but a write permit is not to be held through sleeps). A passive pass copies
/// what no reader needs and returns; when a reader kept it from copying everything, it looks
/// again at once a few times (reads in place take microseconds), then gives up until the next
/// tick.
async fn checkpoint_loop(
    pool: AnyPool,
    writer: AnyPool,
    reads: Stash,
    writes: Stash,
    timeout: Duration,
    restarts: std::sync::Arc<std::sync::atomic::AtomicU64>,
) {
    let mut tick = tokio::time::interval(CHECKPOINT_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut seen = writes.taken();
    loop {
        tick.tick().await;
        if reads.is_closed() {
            return;
        }
        let taken = writes.taken();
        if taken == seen {
            continue;
        }
        seen = taken;
        let done = async {
            let mut conn = reads.take(&pool, timeout).await?;
            let (_busy, frames, _copied): (i64, i64, i64) =
                sqlx::query_as("PRAGMA wal_checkpoint(PASSIVE)").fetch_one(&mut *conn).await?;
            drop(conn);
            if frames > WAL_RESTART_FRAMES {
                let mut conn = writes.take(&writer, timeout).await?;
                for _ in 0..WAL_FINISH_TRIES {
                    let (_busy, frames, copied): (i64, i64, i64) =
                        sqlx::query_as("PRAGMA wal_checkpoint(PASSIVE)").fetch_one(&mut *conn).await?;
                    if copied == frames {
                        restarts.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        metrics::counter!("authlink_sqlite_wal_restarts_total").increment(1);
                        break;
                    }
                }
                drop(conn);
                // Taking the writer counted as a write: not one to check for next time.
                seen = writes.taken();
            }
            Ok::<_, DbError>(())
        }
        .await;
        if let Err(e) = done {
            tracing::warn!(error = %e, "SQLite checkpoint failed; retrying later");
        }
    }
}

/// The PostgreSQL session settings that bound a statement, an idle transaction and a lock wait
/// (`database.statement_timeout_secs` twice, `database.lock_timeout_secs`).
const SESSION_TIMEOUTS: [&str; 3] =
    ["statement_timeout", "idle_in_transaction_session_timeout", "lock_timeout"];

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
        let session_timeouts =
            [options.statement_timeout_secs, options.statement_timeout_secs, options.lock_timeout_secs];
        let connect_options = AnyConnectOptions::from_str(&url)
            .map_err(DbError::from)?
            .log_statements(tracing::log::LevelFilter::Trace)
            .log_slow_statements(tracing::log::LevelFilter::Warn, Duration::from_secs(1));
        // `checkpoints`: whether commits on these connections copy the WAL back into the
        // database file once it is long (SQLite's default). The writer's do not: a checkpoint
        // ends in a disk flush, and every other writer would wait for it; see `checkpoint_loop`.
        let connect = |max_connections: u32, checkpoints: bool| {
            let pool_options = AnyPoolOptions::new()
                .max_connections(max_connections)
                .min_connections(0)
                .acquire_timeout(Duration::from_secs(options.acquire_timeout_secs))
                // No round trip before every use: a connection that broke fails its query, which
                // is reported as unavailable (503), and the pool drops it (on PostgreSQL, one
                // idle a while is asked first; see below).
                .test_before_acquire(false);
            let pool_options = match backend {
                Backend::Sqlite => pool_options.after_connect(move |conn, _meta| {
                    Box::pin(async move {
                        conn.execute(
                            "PRAGMA foreign_keys = ON; PRAGMA busy_timeout = 5000; PRAGMA secure_delete = ON; \
                             PRAGMA journal_mode = WAL; PRAGMA synchronous = NORMAL;",
                        )
                        .await?;
                        if !checkpoints {
                            conn.execute(sqlx::AssertSqlSafe(format!(
                                "PRAGMA wal_autocheckpoint = 0; PRAGMA journal_size_limit = {WAL_SIZE_LIMIT};"
                            )))
                            .await?;
                        }
                        Ok(())
                    })
                }),
                // A connection idle for a while is asked whether it still lives before it is
                // handed out (one round trip): PostgreSQL may have ended it meanwhile (a restart,
                // a failover, an operator), and a dead one would fail its first statement, a
                // write's after the provider's code was exchanged. Busy connections are not asked.
                Backend::Postgres => pool_options
                    .before_acquire(|conn, meta| {
                        Box::pin(async move {
                            if meta.idle_for >= PING_AFTER_IDLE {
                                sqlx::Connection::ping(conn).await?;
                            }
                            Ok(true)
                        })
                    })
                    // The server ends what is stuck (a statement behind a lock a stuck transaction
                    // holds, a transaction left open), which answers 503 and frees the connection,
                    // instead of leaving requests' detached work and the jobs waiting without end.
                    .after_connect(move |conn, _meta| {
                        Box::pin(async move {
                            for (setting, secs) in SESSION_TIMEOUTS.into_iter().zip(session_timeouts) {
                                conn.execute(sqlx::AssertSqlSafe(format!("SET {setting} = '{secs}s'"))).await?;
                            }
                            Ok(())
                        })
                    }),
            };
            let connect_options = connect_options.clone();
            async move {
                tokio::time::timeout(
                    Duration::from_secs(options.acquire_timeout_secs.max(1) + 1),
                    pool_options.connect_with(connect_options),
                )
                .await
                .map_err(|_| DbError::unavailable(sqlx::Error::PoolTimedOut))?
                .map_err(DbError::from)
            }
        };
        let pool = match connect(options.max_connections, true).await {
            Ok(pool) => pool,
            // The pool only says that it timed out waiting for a connection: one made directly
            // says why ("connection refused", "password authentication failed").
            Err(DbError::Unavailable(timed_out)) => {
                let direct = tokio::time::timeout(
                    Duration::from_secs(options.acquire_timeout_secs.max(1)),
                    <sqlx::AnyConnection as sqlx::Connection>::connect_with(&connect_options),
                )
                .await;
                return Err(match direct {
                    Ok(Err(cause)) => DbError::from(cause),
                    _ => DbError::Unavailable(timed_out),
                });
            }
            Err(e) => return Err(e),
        };
        let (writer, writer_thread) = match backend {
            Backend::Sqlite => (connect(1, false).await?, Some(WriterThread::start()?)),
            Backend::Postgres => (pool.clone(), None),
        };
        let stashes = match backend {
            Backend::Sqlite => Some((Stash::new(options.max_connections), Stash::new(1))),
            Backend::Postgres => None,
        };
        let acquire_timeout = Duration::from_secs(options.acquire_timeout_secs);
        let wal_restarts = std::sync::Arc::default();
        if let (Some(thread), Some((reads, writes))) = (&writer_thread, &stashes) {
            thread.handle.spawn(checkpoint_loop(
                pool.clone(),
                writer.clone(),
                reads.clone(),
                writes.clone(),
                acquire_timeout,
                std::sync::Arc::clone(&wal_restarts),
            ));
        }
        let lite = match backend {
            Backend::Sqlite => sqlite_file(&url).map(|path| std::sync::Arc::new(lite::Lite::new(path))),
            Backend::Postgres => None,
        };
        Ok(Self { pool, writer, writer_thread, stashes, acquire_timeout, backend, lite, wal_restarts })
    }

    /// Applies the embedded migrations of this backend, one process at a time: on PostgreSQL
    /// under sqlx's advisory lock; on a SQLite file (where sqlx takes none) under an exclusive
    /// lock of the file `<database>-migrate.lock` beside it, so that a command run while `serve`
    /// starts does not apply the same migration a second time and fail.
    pub async fn migrate(&self) -> DbResult<()> {
        match self.backend {
            Backend::Sqlite => {
                let _lock = match &self.lite {
                    Some(lite) => migration_lock(lite.path()).await,
                    None => None,
                };
                SQLITE_MIGRATOR.run(&mut *self.writer().await?).await?;
            }
            Backend::Postgres => {
                // Migrations may rewrite a large table, or wait for a lock an older version's
                // requests hold: no time limit on their connection, which is closed after them
                // rather than handed out again without one.
                let mut conn = self.pool.acquire().await?;
                conn.close_on_drop();
                for setting in SESSION_TIMEOUTS {
                    conn.execute(sqlx::AssertSqlSafe(format!("SET {setting} = 0"))).await?;
                }
                POSTGRES_MIGRATOR.run(&mut *conn).await?;
            }
        }
        Ok(())
    }

    /// Whether the database answers a trivial query.
    pub async fn ping(&self) -> DbResult<()> {
        sqlx::query("SELECT 1").execute(&mut *self.read().await?).await?;
        Ok(())
    }

    /// A connection for reads (and, on PostgreSQL, for anything).
    pub async fn read(&self) -> DbResult<Conn> {
        match &self.stashes {
            Some((reads, _)) => reads.take(&self.pool, self.acquire_timeout).await,
            None => Ok(Conn::pooled(self.pool.acquire().await?)),
        }
    }

    /// A connection for the reads of the public pages of the connect flow. On a SQLite file it
    /// is a synchronous connection ([`lite`]) whose statements run in place, on the calling
    /// thread: in WAL mode a read waits for no writer, and a read of a few rows from the page
    /// cache takes less time than the two thread switches sqlx's driver spends on it. Elsewhere
    /// it is [`read`](Self::read)'s connection. Hold it for the reads only, not across waiting
    /// for anything else.
    pub async fn read_fast(&self) -> DbResult<Reader> {
        match &self.lite {
            Some(lite) => Ok(Reader::Lite(lite.reader()?)),
            None => Ok(Reader::Sqlx(self.read().await?)),
        }
    }

    /// A connection for a write outside a transaction (a single statement). On SQLite it is the
    /// one writer connection; hold it no longer than the statement.
    pub async fn writer(&self) -> DbResult<Conn> {
        match &self.stashes {
            Some((_, writer)) => writer.take(&self.writer, self.acquire_timeout).await,
            None => Ok(Conn::pooled(self.pool.acquire().await?)),
        }
    }

    /// SQLite: how many background checkpoints paused the writers so that the WAL could start
    /// over (see `checkpoint_loop`).
    pub fn wal_restarts(&self) -> u64 {
        self.wal_restarts.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The backend in use.
    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// Runs `write` (a future that writes, typically a whole transaction) on the SQLite writer
    /// thread, so that the write lock is held for the database's time only, not for the time the
    /// caller's runtime takes to get back to it; on PostgreSQL, where writers do not queue behind
    /// one lock, it runs in place. The write runs to its end even if the caller stops waiting.
    pub async fn on_writer<T: Send + 'static>(
        &self,
        write: impl std::future::Future<Output = T> + Send + 'static,
    ) -> DbResult<T> {
        let Some(thread) = &self.writer_thread else { return Ok(write.await) };
        match thread.handle.spawn(write).await {
            Ok(out) => Ok(out),
            Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
            Err(_) => Err(DbError::unavailable(sqlx::Error::PoolClosed)),
        }
    }

    /// [`on_writer`](Self::on_writer) for a write that needs the database itself (typically one
    /// statement on [`writer`](Self::writer)): `write` gets a handle to it.
    pub async fn write<T, F>(&self, write: impl FnOnce(Db) -> F) -> DbResult<T>
    where
        F: std::future::Future<Output = DbResult<T>> + Send + 'static,
        T: Send + 'static,
    {
        self.on_writer(write(self.clone())).await?
    }

    /// Runs `work` in one write transaction, which commits when `work` succeeds and is rolled
    /// back when it fails.
    ///
    /// On a SQLite file its statements run on a synchronous connection ([`lite`]), in place:
    /// once this process's write permit is held (awaited, like every writer here), the
    /// transaction runs without a thread switch and without yielding, so it holds SQLite's write
    /// lock for the statements' time only. If another process (the CLI, say) holds the write lock,
    /// the transaction waits for it on the writer thread instead of blocking this one. Elsewhere
    /// it is a sqlx transaction on the writer thread (see [`on_writer`](Self::on_writer)).
    pub async fn write_flow<W: FlowWrite>(&self, work: W) -> Result<W::Output, W::Error> {
        let Some(lite) = &self.lite else {
            let db = self.clone();
            return self
                .on_writer(async move {
                    if W::ONE_STATEMENT {
                        return work.run(&mut db.writer().await?).await;
                    }
                    let mut tx = db.begin_write().await?;
                    let out = work.run(&mut tx).await?;
                    tx.commit().await?;
                    Ok(out)
                })
                .await
                .map_err(W::Error::from)?;
        };
        // The write permit, held until the end: writes of both kinds queue on it, in order.
        let permit = self.writer().await?;
        match lite.begin(Duration::ZERO) {
            Ok(tx) => lite::run(tx, work).await,
            Err(DbError::Unavailable(_)) => {
                let lite = std::sync::Arc::clone(lite);
                self.on_writer(async move {
                    let _permit = permit;
                    lite::run(lite.begin(lite::BUSY_TIMEOUT)?, work).await
                })
                .await
                .map_err(W::Error::from)?
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Starts a transaction that takes the write lock at once on SQLite (`BEGIN IMMEDIATE`), so
    /// that a read-then-write never fails half-way with `SQLITE_BUSY`.
    pub async fn begin_write(&self) -> DbResult<WriteTx> {
        match &self.stashes {
            Some(_) => WriteTx::begin_immediate(self.writer().await?).await,
            None => Ok(WriteTx::pooled(self.pool.begin().await?)),
        }
    }

    /// Closes the pools, waiting for connections to be returned.
    pub async fn close(&self) {
        if let Some(lite) = &self.lite {
            lite.close();
        }
        if let Some((reads, writer)) = &self.stashes {
            reads.drain();
            writer.drain();
        }
        self.pool.close().await;
        self.writer.close().await;
    }
}

/// How long a PostgreSQL connection may have been idle before it is asked, when it is handed out
/// again, whether it still lives.
pub const PING_AFTER_IDLE: Duration = Duration::from_secs(1);

/// Makes sure the SQLite file's folder exists and the URL asks for create-if-missing. A new
/// database file (and a folder made for it) is readable by its owner only: it holds password
/// hashes, email addresses and webhook URLs besides the sealed values, and SQLite gives its WAL
/// and shared-memory files the database file's permissions. An existing file readable by others
/// is warned about.
fn prepare_sqlite_url(url: &str) -> DbResult<String> {
    let rest = url.trim_start_matches("sqlite://").trim_start_matches("sqlite:");
    let path = rest.split('?').next().unwrap_or_default();
    if path.is_empty() || path == ":memory:" {
        return Ok(url.to_string());
    }
    let io = |e| DbError::unavailable(sqlx::Error::Io(e));
    // Created only where SQLite would create it (no `mode=`, or `mode=rwc`): `mode=rw` is meant
    // to fail on a missing file. A path to decode is left to SQLite.
    let query = rest.split_once('?').map_or("", |(_, q)| q);
    let creates = query.split('&').all(|p| !p.starts_with("mode=") || p == "mode=rwc");
    if creates && !path.contains('%') {
        create_private_sqlite_file(Path::new(path)).map_err(io)?;
    } else if let Some(parent) = Path::new(path).parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent).map_err(io)?;
    }
    if url.contains("mode=") {
        Ok(url.to_string())
    } else if url.contains('?') {
        Ok(format!("{url}&mode=rwc"))
    } else {
        Ok(format!("{url}?mode=rwc"))
    }
}

/// Creates the SQLite file at `path` (and its folder) readable by its owner only, unless it
/// exists; an existing one readable by others is warned about. SQLite gives the WAL and
/// shared-memory files the database file's permissions.
pub(crate) fn create_private_sqlite_file(path: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::DirBuilder::new().recursive(true).mode(0o700).create(parent)?;
    }
    match std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(path) {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            if let Ok(meta) = std::fs::metadata(path)
                && meta.permissions().mode() & 0o077 != 0
            {
                tracing::warn!(
                    path = %path.display(),
                    mode = format!("{:o}", meta.permissions().mode() & 0o777),
                    "the SQLite database file can be read by other users of this host; `chmod 600` it \
                     (and its -wal and -shm files)"
                );
            }
            Ok(())
        }
        Err(e) => Err(e),
    }
}

/// The SQLite file a database URL names, for `authlink backup` and `restore`: `None` for
/// PostgreSQL, an in-memory database or a URL whose path needs decoding.
pub fn sqlite_path(url: &str) -> Option<std::path::PathBuf> {
    let rest = url.strip_prefix("sqlite://").or_else(|| url.strip_prefix("sqlite:"))?;
    let path = rest.split('?').next().unwrap_or_default();
    (!path.is_empty() && path != ":memory:" && !path.contains('%')).then(|| std::path::PathBuf::from(path))
}

/// The newest SQLite migration this build knows: a backup with a newer schema was made by a
/// newer authlink.
pub fn sqlite_schema_version() -> i64 {
    SQLITE_MIGRATOR.iter().map(|m| m.version).max().unwrap_or(0)
}

/// The file of a SQLite URL, when it names one that [`lite`] can open the same way (not an
/// in-memory database, not read-only, no percent-encoded path).
fn sqlite_file(url: &str) -> Option<std::path::PathBuf> {
    let query = url.split_once('?').map(|(_, q)| q).unwrap_or_default();
    let writable = query.split('&').all(|kv| !matches!(kv, "mode=memory" | "mode=ro" | "immutable=1"));
    sqlite_path(url).filter(|_| writable)
}

/// An exclusive lock of the file `<database>-migrate.lock` (created if need be), held until the
/// file is dropped; waits for another process that holds it. The lock needs no write access: a
/// file another user made (a command run as root, say) is opened read-only. Where it cannot be
/// had at all (a file system without locks), the migrations run without it, as before it, with a
/// warning.
async fn migration_lock(database: &std::path::Path) -> Option<std::fs::File> {
    let mut name = database.as_os_str().to_owned();
    name.push("-migrate.lock");
    let path = std::path::PathBuf::from(name);
    let shown = path.display().to_string();
    let locked = tokio::task::spawn_blocking(move || {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .or_else(|_| std::fs::File::open(&path))?;
        file.lock()?;
        Ok::<_, std::io::Error>(file)
    })
    .await
    .map_err(std::io::Error::other)
    .and_then(|locked| locked);
    locked
        .inspect_err(|e| {
            tracing::warn!(path = %shown, error = %e, "the migration lock cannot be taken; migrating without it");
        })
        .ok()
}

/// Takes a PostgreSQL advisory lock named `key` for the rest of the transaction on `conn`, so
/// that the writers that take it run one after the other (counted limits, claim rounds); SQLite's
/// write transactions already run one at a time, so there it does nothing.
pub async fn advisory_lock(conn: &mut sqlx::AnyConnection, backend: Backend, key: &str) -> DbResult<()> {
    if backend == Backend::Postgres {
        sqlx::query("SELECT pg_advisory_xact_lock(hashtextextended($1, 0))").bind(key).execute(conn).await?;
    }
    Ok(())
}

/// `key IN (subquery)` for claiming rows, with the subquery's row locking on PostgreSQL
/// (`FOR UPDATE SKIP LOCKED`) and written as `key = ANY(ARRAY(...))` there: PostgreSQL joins an
/// `IN (...)` against a scan of the whole table, but looks the ids of an array up in the primary
/// key. SQLite takes the write lock with the transaction and needs neither.
fn claimed_ids(backend: Backend, key: &str, subquery: &str) -> String {
    match backend {
        Backend::Postgres => format!("{key} = ANY(ARRAY({subquery} FOR UPDATE SKIP LOCKED))"),
        Backend::Sqlite => format!("{key} IN ({subquery})"),
    }
}

/// A new time-ordered id.
pub fn new_id() -> String {
    uuid::Uuid::now_v7().to_string()
}

/// Whether `s` looks like one of our ids (so malformed ids answer 404 without a query).
pub fn is_id(s: &str) -> bool {
    crate::domain::is_id_shaped(s)
}

/// A database on a new SQLite file in `dir`, with `max_connections` readers (tests).
#[cfg(test)]
pub(crate) async fn test_sqlite(dir: &tempfile::TempDir, max_connections: u32) -> Db {
    let url = SecretString::from(format!("sqlite://{}/t.db", dir.path().display()));
    Db::connect(&url, &DatabaseConfig { max_connections, acquire_timeout_secs: 2, ..Default::default() })
        .await
        .unwrap()
}

/// [`test_sqlite`] with every migration applied.
#[cfg(test)]
pub(crate) async fn test_sqlite_migrated(dir: &tempfile::TempDir) -> Db {
    let db = test_sqlite(dir, 2).await;
    db.migrate().await.unwrap();
    db
}

#[cfg(test)]
mod tests {
    use sqlx::Row;

    use super::*;

    /// Two processes starting at once on a new SQLite file (here two databases of one process,
    /// each with connections of its own) both migrate it: one after the other, the second finding
    /// nothing left to do, rather than both applying the first migration and one failing.
    #[tokio::test]
    async fn two_migrations_at_once_on_one_sqlite_file() {
        for _ in 0..3 {
            let dir = tempfile::tempdir().unwrap();
            let (a, b) = (test_sqlite(&dir, 2).await, test_sqlite(&dir, 2).await);
            let (first, second) = tokio::join!(a.migrate(), b.migrate());
            first.unwrap();
            second.unwrap();
            assert!(dir.path().join("t.db-migrate.lock").exists());
            a.close().await;
            b.close().await;
        }
    }

    /// A new database, its WAL and its shared-memory file are readable by their owner only,
    /// whatever the process's umask lets others read.
    #[tokio::test]
    async fn a_new_sqlite_database_is_private_to_its_owner() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let url = SecretString::from(format!("sqlite://{}/data/t.db", dir.path().display()));
        let db = Db::connect(
            &url,
            &DatabaseConfig { max_connections: 2, acquire_timeout_secs: 2, ..Default::default() },
        )
        .await
        .unwrap();
        db.migrate().await.unwrap();
        let mode =
            |name: &str| std::fs::metadata(dir.path().join(name)).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode("data"), 0o700);
        for name in ["data/t.db", "data/t.db-wal", "data/t.db-shm"] {
            assert_eq!(mode(name) & 0o077, 0, "{name}: {:o}", mode(name));
        }
        db.close().await;
    }

    #[test]
    fn errors_that_pass_are_unavailable_and_the_others_are_not() {
        for code in [
            "5", "261", "517", "6", "262", "8", "10", "266", "13", "14", "08000", "08004", "08006", "53100",
            "53200", "53300", "57P01", "25006", "40001", "40P01", "57014", "55P03", "25P03",
        ] {
            assert!(is_unavailable_code(Some(code)), "{code}");
        }
        for code in ["1", "19", "2067", "1555", "23505", "23503", "42P01", "22021"] {
            assert!(!is_unavailable_code(Some(code)), "{code}");
        }
        assert!(!is_unavailable_code(None));
    }

    #[tokio::test]
    async fn a_full_disk_is_unavailable_on_both_paths() {
        let dir = tempfile::tempdir().unwrap();
        let db = sqlite(&dir).await;
        let mut conn = db.writer().await.unwrap();
        let (pages,): (i64,) = sqlx::query_as("PRAGMA page_count").fetch_one(&mut *conn).await.unwrap();
        sqlx::query(sqlx::AssertSqlSafe(format!("PRAGMA max_page_count = {pages}")))
            .execute(&mut *conn)
            .await
            .unwrap();
        let full = DbError::from(
            sqlx::query(
                "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 100000) \
                 INSERT INTO t (x) SELECT i FROM n",
            )
            .execute(&mut *conn)
            .await
            .unwrap_err(),
        );
        assert!(matches!(full, DbError::Unavailable(_)), "{full:?}");
        drop(conn);
        let file = dir.path().join("full.db");
        let lite = rusqlite::Connection::open(&file).unwrap();
        lite.execute_batch("CREATE TABLE t (x); PRAGMA max_page_count = 2;").unwrap();
        let e = lite
            .execute_batch(
                "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 100000) \
                 INSERT INTO t (x) SELECT i FROM n",
            )
            .unwrap_err();
        assert!(matches!(DbError::from(e), DbError::Unavailable(_)));
    }

    async fn sqlite(dir: &tempfile::TempDir) -> Db {
        let db = test_sqlite(dir, 4).await;
        sqlx::query("CREATE TABLE t (x INTEGER NOT NULL)")
            .execute(&mut *db.writer().await.unwrap())
            .await
            .unwrap();
        db
    }

    async fn values(db: &Db) -> Vec<i64> {
        let rows = sqlx::query("SELECT x FROM t ORDER BY x")
            .fetch_all(&mut *db.read().await.unwrap())
            .await
            .unwrap();
        rows.iter().map(|r| r.get::<i64, _>(0)).collect()
    }

    #[tokio::test]
    async fn a_write_dropped_before_commit_is_rolled_back_before_the_next() {
        let dir = tempfile::tempdir().unwrap();
        let db = sqlite(&dir).await;
        let mut tx = db.begin_write().await.unwrap();
        sqlx::query("INSERT INTO t (x) VALUES (1)").execute(&mut *tx).await.unwrap();
        drop(tx);
        let mut tx = db.begin_write().await.unwrap();
        sqlx::query("INSERT INTO t (x) VALUES (2)").execute(&mut *tx).await.unwrap();
        tx.commit().await.unwrap();
        assert_eq!(values(&db).await, vec![2]);
        // A single statement on the writer after a committed transaction is not rolled back.
        sqlx::query("INSERT INTO t (x) VALUES (3)").execute(&mut *db.writer().await.unwrap()).await.unwrap();
        assert_eq!(values(&db).await, vec![2, 3]);
        tokio::time::timeout(Duration::from_secs(10), db.close()).await.expect("close returns");
    }

    /// Under writes that never pause, the WAL still starts over: the background checkpoint
    /// pauses the writers to finish once it is long, instead of growing it with every page ever
    /// written.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_wal_starts_over_under_a_steady_stream_of_writes() {
        let dir = tempfile::tempdir().unwrap();
        let db = test_sqlite(&dir, 2).await;
        sqlx::query("CREATE TABLE b (x BLOB NOT NULL)")
            .execute(&mut *db.writer().await.unwrap())
            .await
            .unwrap();
        let blob = vec![7u8; 64 * 1024];
        let mut rounds = 0_i64;
        // Bounded: 10,000 rounds write 650 MB of WAL frames, several restarts' worth.
        while db.wal_restarts() < 1 && rounds < 10_000 {
            // A 64 KiB row replaces the previous one: the file stays small, the WAL takes
            // sixteen pages or more each time.
            let mut tx = db.begin_write().await.unwrap();
            sqlx::query("DELETE FROM b").execute(&mut *tx).await.unwrap();
            sqlx::query("INSERT INTO b (x) VALUES ($1)").bind(&blob).execute(&mut *tx).await.unwrap();
            tx.commit().await.unwrap();
            rounds += 1;
        }
        assert!(db.wal_restarts() >= 1, "no restart in {rounds} rounds");
        // One more write starts the WAL over: it holds far fewer pages than were ever written.
        sqlx::query("DELETE FROM b").execute(&mut *db.writer().await.unwrap()).await.unwrap();
        let (_, frames, _): (i64, i64, i64) = sqlx::query_as("PRAGMA wal_checkpoint(PASSIVE)")
            .fetch_one(&mut *db.read().await.unwrap())
            .await
            .unwrap();
        assert!(frames < rounds * 16, "{frames} pages in the WAL after {rounds} rounds of 16 pages or more");
        db.close().await;
    }

    /// Migration 0011 on a database holding rows made before it: the three tables of the connect
    /// flow keep every row and column, lose their rowid (and the primary key's separate index),
    /// and keep their secondary indexes.
    #[test]
    fn the_flow_tables_lose_their_rowid_and_keep_their_rows() {
        let dir = tempfile::tempdir().unwrap();
        let db = rusqlite::Connection::open(dir.path().join("u.db")).unwrap();
        db.execute_batch("PRAGMA foreign_keys = ON").unwrap();
        let folder = Path::new(env!("CARGO_MANIFEST_DIR")).join("migrations").join("sqlite");
        let mut files: Vec<_> = std::fs::read_dir(&folder).unwrap().map(|e| e.unwrap().path()).collect();
        files.sort();
        let name = |f: &std::path::PathBuf| f.file_name().unwrap().to_string_lossy().to_string();
        let run = |f: &std::path::PathBuf| {
            let sql = std::fs::read_to_string(f).unwrap();
            db.execute_batch(&format!("BEGIN; {sql}; COMMIT;")).unwrap();
        };
        for file in files.iter().filter(|f| name(f).as_str() < "0011") {
            run(file);
        }
        db.execute_batch(
            "INSERT INTO workspaces (id, name, slug, created_at, updated_at) VALUES ('w', 'W', 'w', 1, 1);
             INSERT INTO links (id, workspace_id, label, platforms, token_hash, token_sealed, created_by, created_at,
               updated_at) VALUES ('l', 'w', 'L', 'tiktok', 'h', 's', 'cli', 1, 1);
             INSERT INTO connections (id, workspace_id, provider, provider_account_id, scopes, status, connected_at,
               created_at, updated_at) VALUES ('c', 'w', 'tiktok', 'a', 's', 'active', 1, 1, 1);
             INSERT INTO oauth_flows VALUES ('f1', 'sh1', 'bh1', 'l', 'w', 'tiktok', 'v1', 1, 2, 3, 'connected', 'c'),
               ('f2', 'sh2', 'bh2', 'l', 'w', 'instagram', 'v2', 4, 5, NULL, NULL, NULL);
             INSERT INTO connection_events VALUES ('e1', 'c', 'w', 'created', NULL, 6), ('e2', 'c', 'w', 'broken', 'why', 7);
             INSERT INTO audit_log VALUES ('a1', 'w', 'cli', NULL, 'link.create', 'link', 'l', '{\"x\":1}', 8),
               ('a2', NULL, 'system', 'job', 'key.rotate', 'key', 'k', '{}', 9);",
        )
        .unwrap();
        let tables = ["oauth_flows", "connection_events", "audit_log"];
        let dump = |table: &str| -> Vec<String> {
            let mut q = db.prepare(&format!("SELECT * FROM {table} ORDER BY id")).unwrap();
            let n = q.column_count();
            q.query_map([], |r| {
                Ok((0..n).map(|i| format!("{:?}", r.get_ref(i).unwrap())).collect::<Vec<_>>().join("|"))
            })
            .unwrap()
            .map(Result::unwrap)
            .collect()
        };
        let indexes = |table: &str| -> Vec<String> {
            let mut q = db
                .prepare(
                    "SELECT name FROM sqlite_master WHERE type = 'index' AND tbl_name = ?1 ORDER BY name",
                )
                .unwrap();
            q.query_map([table], |r| r.get(0)).unwrap().map(Result::unwrap).collect()
        };
        let before: Vec<_> = tables.iter().map(|t| (dump(t), indexes(t))).collect();
        for t in tables {
            assert!(db.prepare(&format!("SELECT rowid FROM {t}")).is_ok(), "{t} has a rowid before");
        }

        run(files.iter().find(|f| name(f).starts_with("0011")).unwrap());
        for (t, (rows, indexes_before)) in tables.iter().zip(before) {
            assert_eq!(rows.len(), 2, "{t}");
            assert_eq!(dump(t), rows, "{t} keeps its rows");
            assert!(db.prepare(&format!("SELECT rowid FROM {t}")).is_err(), "{t} has no rowid after");
            // The primary key's own index is gone; every other index is back under its name.
            let (auto_before, named_before): (Vec<_>, Vec<_>) =
                indexes_before.into_iter().partition(|i| i.starts_with("sqlite_autoindex_"));
            let (auto_after, named_after): (Vec<_>, Vec<_>) =
                indexes(t).into_iter().partition(|i| i.starts_with("sqlite_autoindex_"));
            assert_eq!(named_after, named_before, "{t}");
            assert_eq!(auto_after.len() + 1, auto_before.len(), "{t}: {auto_before:?} then {auto_after:?}");
        }
        // The state hash stays unique, and the foreign keys still hold.
        assert!(db.execute_batch("INSERT INTO oauth_flows VALUES ('f3', 'sh1', 'b', 'l', 'w', 'tiktok', 'v', 1, 2, NULL, NULL, NULL)").is_err());
        assert!(
            db.execute_batch("INSERT INTO connection_events VALUES ('e3', 'nope', 'w', 'created', NULL, 1)")
                .is_err()
        );
        let violations: i64 =
            db.query_row("SELECT count(*) FROM pragma_foreign_key_check", [], |r| r.get(0)).unwrap();
        assert_eq!(violations, 0);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_writers_queue_on_the_one_writer_and_all_commit() {
        let dir = tempfile::tempdir().unwrap();
        let db = sqlite(&dir).await;
        let mut tasks = Vec::new();
        for i in 0..40_i64 {
            let db = db.clone();
            tasks.push(tokio::spawn(async move {
                let store = db.clone();
                let write = async move {
                    let mut tx = store.begin_write().await?;
                    sqlx::query("INSERT INTO t (x) VALUES ($1)").bind(i).execute(&mut *tx).await?;
                    if i % 5 == 0 {
                        // Every fifth gives up half-way.
                        return Ok::<_, DbError>(());
                    }
                    tx.commit().await
                };
                // Half on the caller's runtime, half on the writer thread.
                if i % 2 == 0 { write.await } else { db.on_writer(write).await? }
            }));
        }
        for t in tasks {
            t.await.unwrap().unwrap();
        }
        let expected: Vec<i64> = (0..40).filter(|i| i % 5 != 0).collect();
        assert_eq!(values(&db).await, expected);
        tokio::time::timeout(Duration::from_secs(10), db.close()).await.expect("close returns");
    }
}
