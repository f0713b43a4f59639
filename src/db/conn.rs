//! The connections [`Db`](super::Db) hands out, and the write transaction.
//!
//! sqlx's pool checks every connection it takes back with a round trip to the connection
//! (`ping`), from a task it spawns for that. For SQLite, whose connections live on threads of
//! their own, that is a second thread hand-off per use, as costly as the query it follows, and
//! the single writer connection is unusable until it is done. So on SQLite a used connection goes
//! back into a [`Stash`] in front of the pool instead, and the next user takes it from there at
//! no cost. A connection returns to the pool once it has been in use for [`STASH_MAX_AGE`], and
//! whenever a panic unwinds through its user, so that sqlx still checks (and replaces) it
//! regularly. PostgreSQL connections go back to the pool at once, as sqlx intends: a network
//! connection can break between uses, and the check catches that.

use std::ops::{Deref, DerefMut};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use sqlx::pool::PoolConnection;
use sqlx::{Any, AnyConnection, AnyPool};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::DbResult;

/// How long a SQLite connection is reused from the stash before it goes back to the pool once.
const STASH_MAX_AGE: Duration = Duration::from_secs(30);

#[derive(Debug)]
struct Stashed {
    conn: PoolConnection<Any>,
    since: Instant,
    /// A write transaction was begun on it and not seen to commit: roll back before reuse.
    in_tx: bool,
}

/// Connections kept out of a SQLite pool between uses, with as many permits as the pool has
/// connections: takers queue on the permits, in order.
#[derive(Debug, Clone)]
pub(super) struct Stash {
    idle: Arc<Mutex<Vec<Stashed>>>,
    permits: Arc<Semaphore>,
    /// Set when the database closes: connections go back to the pool from then on.
    closed: Arc<AtomicBool>,
    /// How many times a connection was taken.
    taken: Arc<AtomicU64>,
}

impl Stash {
    pub(super) fn new(size: u32) -> Self {
        Self {
            idle: Arc::default(),
            permits: Arc::new(Semaphore::new(usize::try_from(size).unwrap_or(1).max(1))),
            closed: Arc::default(),
            taken: Arc::default(),
        }
    }

    /// A connection: a stashed one if there is one, else a new one from `pool`.
    pub(super) async fn take(&self, pool: &AnyPool, timeout: Duration) -> DbResult<Conn> {
        let permit = tokio::time::timeout(timeout, Arc::clone(&self.permits).acquire_owned())
            .await
            .map_err(|_| super::DbError::unavailable(sqlx::Error::PoolTimedOut))?
            .map_err(|_| super::DbError::unavailable(sqlx::Error::PoolClosed))?;
        self.taken.fetch_add(1, Ordering::Relaxed);
        let mut permit = Some(permit);
        loop {
            let entry = self.idle.lock().unwrap_or_else(PoisonError::into_inner).pop();
            let Some(entry) = entry else { break };
            let mut conn = Conn {
                conn: Some(entry.conn),
                since: entry.since,
                // Kept until the rollback is seen to succeed, in case this future is dropped.
                in_tx: entry.in_tx,
                home: Some(self.clone()),
                _permit: permit.take(),
            };
            let rolled_back = !entry.in_tx || sqlx::query("ROLLBACK").execute(&mut *conn).await.is_ok();
            if rolled_back {
                conn.in_tx = false;
            }
            if rolled_back && entry.since.elapsed() < STASH_MAX_AGE {
                return Ok(conn);
            }
            // Old enough to be checked, or the rollback failed (no transaction was open after
            // all, its commit having gone through, or the connection is broken): the pool takes
            // it and checks it.
            permit = conn.release_to_pool();
        }
        self.fresh(pool, permit).await
    }

    async fn fresh(&self, pool: &AnyPool, permit: Option<OwnedSemaphorePermit>) -> DbResult<Conn> {
        let conn = pool.acquire().await?;
        Ok(Conn {
            conn: Some(conn),
            since: Instant::now(),
            in_tx: false,
            home: Some(self.clone()),
            _permit: permit,
        })
    }

    /// How many times a connection was taken so far.
    pub(super) fn taken(&self) -> u64 {
        self.taken.load(Ordering::Relaxed)
    }

    /// Whether [`drain`](Self::drain) was called.
    pub(super) fn is_closed(&self) -> bool {
        self.closed.load(Ordering::SeqCst)
    }

    /// Returns every stashed connection to the pool, and those in use when they are dropped
    /// (before the pool closes, which waits for them).
    pub(super) fn drain(&self) {
        self.closed.store(true, Ordering::SeqCst);
        self.idle.lock().unwrap_or_else(PoisonError::into_inner).clear();
    }
}

/// A database connection in use; derefs to the connection. Dropping it returns it.
#[derive(Debug)]
pub struct Conn {
    conn: Option<PoolConnection<Any>>,
    since: Instant,
    in_tx: bool,
    /// The stash it returns to (SQLite); `None`: straight back to the pool.
    home: Option<Stash>,
    /// Released after the connection is back in the stash (fields drop in order).
    _permit: Option<OwnedSemaphorePermit>,
}

impl Conn {
    /// A connection that goes straight back to its pool.
    pub(super) fn pooled(conn: PoolConnection<Any>) -> Self {
        Self { conn: Some(conn), since: Instant::now(), in_tx: false, home: None, _permit: None }
    }

    /// Hands the connection to the pool now (which checks it), keeping the permit.
    fn release_to_pool(mut self) -> Option<OwnedSemaphorePermit> {
        self.home = None;
        drop(self.conn.take());
        self._permit.take()
    }
}

impl Deref for Conn {
    type Target = AnyConnection;

    fn deref(&self) -> &AnyConnection {
        self.conn.as_deref().unwrap_or_else(|| unreachable!("a connection is present until drop"))
    }
}

impl DerefMut for Conn {
    fn deref_mut(&mut self) -> &mut AnyConnection {
        self.conn.as_deref_mut().unwrap_or_else(|| unreachable!("a connection is present until drop"))
    }
}

impl Drop for Conn {
    fn drop(&mut self) {
        let (Some(conn), Some(home)) = (self.conn.take(), self.home.as_ref()) else { return };
        if std::thread::panicking() || home.closed.load(Ordering::SeqCst) {
            // Its user stopped half-way in an unknown state, or the database is closing: the
            // pool takes it (and checks it).
            return;
        }
        let mut idle = home.idle.lock().unwrap_or_else(PoisonError::into_inner);
        // Checked again under the lock, which `drain` takes after setting the flag.
        if !home.closed.load(Ordering::SeqCst) {
            idle.push(Stashed { conn, since: self.since, in_tx: self.in_tx });
        }
    }
}

/// A write transaction from [`Db::begin_write`](super::Db::begin_write); derefs to its
/// connection. Dropped without [`commit`](WriteTx::commit), it is rolled back.
#[derive(Debug)]
pub struct WriteTx(Inner);

#[derive(Debug)]
enum Inner {
    /// PostgreSQL: sqlx's transaction.
    Pooled(sqlx::Transaction<'static, Any>),
    /// SQLite: `BEGIN IMMEDIATE` on the stashed writer connection; a transaction left open is
    /// rolled back by the connection's next taker, before anything else.
    Stashed(Conn),
}

impl WriteTx {
    pub(super) fn pooled(tx: sqlx::Transaction<'static, Any>) -> Self {
        Self(Inner::Pooled(tx))
    }

    pub(super) async fn begin_immediate(mut conn: Conn) -> DbResult<Self> {
        // Marked first: if this future is dropped while BEGIN runs, the next taker rolls back.
        conn.in_tx = true;
        sqlx::query("BEGIN IMMEDIATE").execute(&mut *conn).await?;
        Ok(Self(Inner::Stashed(conn)))
    }

    /// Commits the transaction.
    pub async fn commit(self) -> DbResult<()> {
        match self.0 {
            Inner::Pooled(tx) => tx.commit().await?,
            Inner::Stashed(mut conn) => {
                sqlx::query("COMMIT").execute(&mut *conn).await?;
                conn.in_tx = false;
            }
        }
        Ok(())
    }
}

impl Deref for WriteTx {
    type Target = AnyConnection;

    fn deref(&self) -> &AnyConnection {
        match &self.0 {
            Inner::Pooled(tx) => tx,
            Inner::Stashed(conn) => conn,
        }
    }
}

impl DerefMut for WriteTx {
    fn deref_mut(&mut self) -> &mut AnyConnection {
        match &mut self.0 {
            Inner::Pooled(tx) => tx,
            Inner::Stashed(conn) => conn,
        }
    }
}
