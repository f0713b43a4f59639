//! SQLite without a thread hand-off per statement, for the connect flow.
//!
//! sqlx's SQLite driver runs each connection on a thread of its own: every statement is sent to
//! that thread and its result sent back, two thread switches per statement. The connect flow's
//! transaction runs about ten statements while holding the database's one write lock, so those
//! switches, not the statements, set how many flows per second the single writer can store, and
//! half of the CPU of a page read went to them (see BENCHMARKS.md). Here statements run
//! synchronously (rusqlite, the same SQLite library sqlx links) on connections of their own, on
//! the calling thread: a whole write transaction once the write permit is held
//! ([`Db::write_flow`](super::Db::write_flow)), and the reads of the flow's pages
//! ([`Db::read_fast`](super::Db::read_fast)).
//!
//! The writer connection is used only while the sqlx writer connection is held too (so writes of
//! either kind queue on one permit, in order, and a transaction the sqlx connection left open is
//! rolled back first); statements are the same [`Stmt`] values the sqlx path
//! runs. Like sqlx's writer, it never checkpoints the WAL itself (the checkpoint loop does).

use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use rusqlite::{Connection, OpenFlags};

use super::stmt::{Exec, Row, Stmt};
use super::{DbError, DbResult};

/// The synchronous connections to one SQLite file.
#[derive(Debug)]
pub struct Lite {
    path: PathBuf,
    /// The writer connection while no transaction runs; opened on first use.
    writer: Mutex<Option<Connection>>,
    /// Reader connections not in use, at most [`IDLE_READERS`]; one is opened when none is free.
    readers: Mutex<Vec<Connection>>,
}

impl Lite {
    /// For the SQLite file at `path` (not opened until the first write).
    pub(super) fn new(path: PathBuf) -> Self {
        Self { path, writer: Mutex::new(None), readers: Mutex::new(Vec::new()) }
    }

    /// The database file.
    pub(super) fn path(&self) -> &std::path::Path {
        &self.path
    }

    /// Closes the idle connections (one in use is closed when it is done).
    pub(super) fn close(&self) {
        drop(self.writer.lock().unwrap_or_else(PoisonError::into_inner).take());
        self.readers.lock().unwrap_or_else(PoisonError::into_inner).clear();
    }

    /// A reader connection, for reads run in place (see [`Db::read_fast`](super::Db::read_fast)).
    pub(super) fn reader(self: &Arc<Self>) -> DbResult<LiteRead> {
        let free = self.readers.lock().unwrap_or_else(PoisonError::into_inner).pop();
        let conn = match free {
            Some(conn) => conn,
            None => {
                let conn = Self::open(&self.path)?;
                conn.execute_batch("PRAGMA query_only = ON;")?;
                conn
            }
        };
        Ok(LiteRead { conn: Some(conn), home: Arc::clone(self) })
    }

    /// Opens a connection with the settings of sqlx's writer connection (see `Db::connect`).
    fn open(path: &Path) -> DbResult<Connection> {
        let conn = Connection::open_with_flags(
            path,
            OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )?;
        conn.busy_timeout(BUSY_TIMEOUT)?;
        conn.execute_batch(
            "PRAGMA foreign_keys = ON; PRAGMA secure_delete = ON; PRAGMA journal_mode = WAL; \
             PRAGMA synchronous = NORMAL; PRAGMA wal_autocheckpoint = 0;",
        )?;
        conn.pragma_update(None, "journal_size_limit", super::WAL_SIZE_LIMIT)?;
        conn.set_prepared_statement_cache_capacity(64);
        Ok(conn)
    }

    /// Begins an immediate transaction on the writer connection, waiting up to `busy_timeout`
    /// for another process that holds SQLite's write lock (an `Unavailable` error after that).
    /// The caller holds the write permit (the sqlx writer connection) until the transaction ends.
    pub(super) fn begin(&self, busy_timeout: Duration) -> DbResult<LiteTx<'_>> {
        let taken = self.writer.lock().unwrap_or_else(PoisonError::into_inner).take();
        let conn = match taken {
            Some(conn) => conn,
            None => Self::open(&self.path)?,
        };
        // From here on the connection returns to `self` on drop, rolled back if need be.
        let mut tx = LiteTx { conn: Some(conn), home: self, open: true };
        let conn = tx.conn()?;
        conn.busy_timeout(busy_timeout)?;
        conn.execute_batch("BEGIN IMMEDIATE")?;
        Ok(tx)
    }
}

/// Reader connections kept for reuse. Readers are held for a few statements on a runtime thread,
/// so this many are rarely in use at once; any more are opened and then closed.
const IDLE_READERS: usize = 8;

/// How long a write waits for another process's write lock, as sqlx's connections do.
pub(super) const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// Runs `work` in `tx` and commits.
pub(super) async fn run<W: super::FlowWrite>(mut tx: LiteTx<'_>, work: W) -> Result<W::Output, W::Error> {
    let out = work.run(&mut tx).await?;
    tx.commit()?;
    Ok(out)
}

/// An immediate transaction on the writer connection; dropped without
/// [`commit`](LiteTx::commit), it is rolled back.
#[derive(Debug)]
pub struct LiteTx<'a> {
    conn: Option<Connection>,
    home: &'a Lite,
    /// Whether a transaction may be open on the connection.
    open: bool,
}

impl LiteTx<'_> {
    fn conn(&mut self) -> DbResult<&Connection> {
        self.conn.as_ref().ok_or_else(|| DbError::Other("the writer connection is gone".into()))
    }

    /// Commits the transaction.
    pub fn commit(mut self) -> DbResult<()> {
        self.conn()?.execute_batch("COMMIT")?;
        self.open = false;
        Ok(())
    }
}

impl Drop for LiteTx<'_> {
    fn drop(&mut self) {
        let Some(conn) = self.conn.take() else { return };
        if self.open && conn.execute_batch("ROLLBACK").is_err() && !conn.is_autocommit() {
            // Still inside a transaction it cannot end: dropped, so the next write opens a
            // new connection instead of meeting this one's lock.
            return;
        }
        *self.home.writer.lock().unwrap_or_else(PoisonError::into_inner) = Some(conn);
    }
}

/// Implements [`Exec`] for a holder of a synchronous connection (its `conn()`): the statement
/// runs before the future is returned, which is ready at once.
macro_rules! exec_in_place {
    ($ty:ty) => {
        impl Exec for $ty {
            fn execute(&mut self, s: &Stmt<'_>) -> impl Future<Output = DbResult<u64>> + Send {
                std::future::ready(self.conn().and_then(|c| s.lite_execute(c)))
            }

            fn fetch_optional<T: Row>(
                &mut self,
                s: &Stmt<'_>,
            ) -> impl Future<Output = DbResult<Option<T>>> + Send {
                std::future::ready(self.conn().and_then(|c| s.lite_fetch_optional(c)))
            }

            fn fetch_all<T: Row>(&mut self, s: &Stmt<'_>) -> impl Future<Output = DbResult<Vec<T>>> + Send {
                std::future::ready(self.conn().and_then(|c| s.lite_fetch_all(c)))
            }
        }
    };
}

exec_in_place!(LiteTx<'_>);
exec_in_place!(LiteRead);

/// A reader connection in use; back to the pool on drop.
#[derive(Debug)]
pub struct LiteRead {
    conn: Option<Connection>,
    home: Arc<Lite>,
}

impl LiteRead {
    pub(super) fn conn(&mut self) -> DbResult<&Connection> {
        self.conn.as_ref().ok_or_else(|| DbError::Other("the reader connection is gone".into()))
    }
}

impl Drop for LiteRead {
    fn drop(&mut self) {
        if let Some(conn) = self.conn.take() {
            // No statement is left half-read (each runs to its end, or is reset when its rows
            // are dropped), so the connection holds no read snapshot.
            let mut idle = self.home.readers.lock().unwrap_or_else(PoisonError::into_inner);
            if idle.len() < IDLE_READERS {
                idle.push(conn);
            }
        }
    }
}

impl From<rusqlite::Error> for DbError {
    fn from(e: rusqlite::Error) -> Self {
        use rusqlite::ErrorCode;
        match &e {
            rusqlite::Error::SqliteFailure(f, msg) => match f.code {
                // As on sqlx's path (`is_unavailable_code`): the database cannot do the work now.
                ErrorCode::DatabaseBusy
                | ErrorCode::DatabaseLocked
                | ErrorCode::CannotOpen
                | ErrorCode::ReadOnly
                | ErrorCode::SystemIoFailure
                | ErrorCode::DiskFull => DbError::Unavailable(e.into()),
                ErrorCode::ConstraintViolation
                    if matches!(
                        f.extended_code,
                        rusqlite::ffi::SQLITE_CONSTRAINT_UNIQUE | rusqlite::ffi::SQLITE_CONSTRAINT_PRIMARYKEY
                    ) =>
                {
                    DbError::Conflict(msg.clone().unwrap_or_else(|| f.to_string()))
                }
                _ => DbError::Other(e.into()),
            },
            _ => DbError::Other(e.into()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::connections::ConnectionRow;
    use super::super::links::LinkRow;
    use super::super::oauth_flows::FlowRow;
    use super::super::webhooks::EndpointRow;
    use super::super::{Db, FlowWrite, connections, links, oauth_flows, webhooks};
    use super::*;

    fn link() -> LinkRow {
        LinkRow {
            id: "l1".into(),
            workspace_id: "w1".into(),
            label: "label".into(),
            client_ref: Some("ref".into()),
            platforms: "tiktok,instagram".into(),
            expires_at: Some(11),
            max_uses: Some(12),
            redirect_url: Some("https://example.com/done".into()),
            token_hash: "hash".into(),
            token_sealed: "sealed".into(),
            created_by: "cli".into(),
            created_at: 13,
            updated_at: 14,
            revoked_at: Some(15),
            rotated_at: Some(16),
            last_used_at: Some(17),
            use_count: 18,
            hide_connections: 1,
        }
    }

    fn flow() -> FlowRow {
        FlowRow {
            id: "f1".into(),
            state_hash: "state".into(),
            browser_hash: "browser".into(),
            link_id: "l1".into(),
            workspace_id: "w1".into(),
            provider: "tiktok".into(),
            verifier_sealed: "verifier".into(),
            created_at: 21,
            expires_at: 22,
            consumed_at: Some(23),
            outcome: Some("connected".into()),
            connection_id: Some("c1".into()),
            detail: None,
            link_token_hash: Some("link token".into()),
        }
    }

    /// Every field a different value, so that two columns read in swapped order show.
    /// A migrated database holding workspace `w1` and [`link`].
    async fn db_with_link(dir: &tempfile::TempDir) -> Db {
        let db = crate::db::test_sqlite_migrated(dir).await;
        sqlx::query(
            "INSERT INTO workspaces (id, name, slug, created_at, updated_at) VALUES ('w1', 'W', 'w', 1, 2)",
        )
        .execute(&mut *db.writer().await.unwrap())
        .await
        .unwrap();
        let mut tx = db.begin_write().await.unwrap();
        links::insert(&mut tx, &link()).await.unwrap();
        tx.commit().await.unwrap();
        db
    }

    fn connection() -> ConnectionRow {
        ConnectionRow {
            id: "c1".into(),
            workspace_id: "w1".into(),
            link_id: Some("l1".into()),
            provider: "tiktok".into(),
            provider_account_id: "account".into(),
            app_scoped_id: Some("scoped".into()),
            username: Some("user".into()),
            display_name: Some("display".into()),
            avatar_url: Some("https://example.com/a.png".into()),
            scopes: "a,b".into(),
            access_token_sealed: Some("access".into()),
            access_expires_at: Some(31),
            refresh_token_sealed: Some("refresh".into()),
            refresh_expires_at: Some(32),
            token_generation: 33,
            status: "active".into(),
            status_reason: Some("reason".into()),
            sandbox: 1,
            connected_at: 34,
            last_refreshed_at: Some(35),
            reconnect_count: 36,
            created_at: 37,
            updated_at: 38,
            next_refresh_at: Some(39),
            lease_owner: None,
            lease_until: None,
            refresh_failures: 40,
            next_check_at: Some(41),
            last_checked_at: Some(42),
            expiring_notified_at: Some(43),
        }
    }

    fn endpoint() -> EndpointRow {
        EndpointRow {
            id: "e1".into(),
            workspace_id: "w1".into(),
            url: "https://example.com/hook".into(),
            secret_sealed: "secret".into(),
            previous_secret_sealed: Some("previous".into()),
            previous_secret_until: Some(51),
            events: "*".into(),
            enabled: 1,
            disabled_reason: Some("why".into()),
            description: Some("note".into()),
            created_at: 52,
            updated_at: 53,
        }
    }

    /// Writes the flow and the connection on the synchronous path; `fail` makes it fail after.
    struct Write {
        fail: bool,
    }

    impl FlowWrite for Write {
        type Output = ();
        type Error = DbError;

        async fn run<E: Exec>(self, conn: &mut E) -> DbResult<()> {
            oauth_flows::insert(conn, &flow()).await?;
            connections::insert(conn, &connection()).await?;
            if self.fail {
                return Err(DbError::Conflict("on purpose".into()));
            }
            Ok(())
        }
    }

    /// Reads every row type on the synchronous path.
    struct Read;

    type Rows = (Option<LinkRow>, Option<FlowRow>, Option<ConnectionRow>, Vec<EndpointRow>);

    impl FlowWrite for Read {
        type Output = Rows;
        type Error = DbError;

        async fn run<E: Exec>(self, conn: &mut E) -> DbResult<Rows> {
            Ok((
                links::get(conn, "l1").await?,
                oauth_flows::get(conn, "f1").await?,
                connections::get_by_account(conn, "w1", "tiktok", "account").await?,
                webhooks::list_endpoints(conn, Some("w1")).await?,
            ))
        }
    }

    async fn read_with_sqlx(db: &Db) -> Rows {
        let mut conn = db.read().await.unwrap();
        (
            links::get(&mut conn, "l1").await.unwrap(),
            oauth_flows::get(&mut conn, "f1").await.unwrap(),
            connections::get_by_account(&mut *conn, "w1", "tiktok", "account").await.unwrap(),
            webhooks::list_endpoints(&mut *conn, Some("w1")).await.unwrap(),
        )
    }

    fn shown(rows: &Rows) -> String {
        format!("{rows:?}")
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn both_paths_write_and_read_the_same_rows() {
        let dir = tempfile::tempdir().unwrap();
        let db = crate::db::test_sqlite_migrated(&dir).await;
        assert!(db.lite.is_some(), "a SQLite file gets the synchronous path");
        sqlx::query(
            "INSERT INTO workspaces (id, name, slug, display_name, logo_url, accent_color, allowed_redirects, \
             created_at, updated_at, logo_sha256, success_redirect) VALUES ('w1', 'W', 'w', 'Display', \
             'https://example.com/l.png', '#123456', 'https://example.com/', 1, 2, 'logo-sha', \
             'https://example.com/done')",
        )
        .execute(&mut *db.writer().await.unwrap())
        .await
        .unwrap();
        let mut tx = db.begin_write().await.unwrap();
        links::insert(&mut tx, &link()).await.unwrap();
        webhooks::insert_endpoint(&mut tx, &endpoint()).await.unwrap();
        tx.commit().await.unwrap();

        // A failed write leaves nothing behind, and the next one goes through.
        let failed = db.write_flow(Write { fail: true }).await;
        assert!(matches!(failed, Err(DbError::Conflict(_))), "{failed:?}");
        assert_eq!(shown(&read_with_sqlx(&db).await), shown(&(Some(link()), None, None, vec![endpoint()])));
        db.write_flow(Write { fail: false }).await.unwrap();

        let expected = (Some(link()), Some(flow()), Some(connection()), vec![endpoint()]);
        assert_eq!(shown(&read_with_sqlx(&db).await), shown(&expected));
        assert_eq!(shown(&db.write_flow(Read).await.unwrap()), shown(&expected));
        // The reads of the public pages, in place and through sqlx.
        let mut fast = db.read_fast().await.unwrap();
        assert!(matches!(fast, super::super::Reader::Lite(_)));
        let mut conn = db.read().await.unwrap();
        let fast_reads = (
            links::get_with_workspace(&mut fast, "l1").await.unwrap(),
            links::get_with_workspace_by_token_hash(&mut fast, "hash").await.unwrap(),
            links::public_by_token_hash(&mut fast, "hash").await.unwrap(),
            super::super::workspaces::get(&mut fast, "w1").await.unwrap(),
            connections::get(&mut fast, "c1").await.unwrap(),
        );
        let sqlx_reads = (
            links::get_with_workspace(&mut conn, "l1").await.unwrap(),
            links::get_with_workspace_by_token_hash(&mut conn, "hash").await.unwrap(),
            links::public_by_token_hash(&mut conn, "hash").await.unwrap(),
            super::super::workspaces::get(&mut conn, "w1").await.unwrap(),
            connections::get(&mut conn, "c1").await.unwrap(),
        );
        assert!(fast_reads.0.is_some() && fast_reads.2.is_some() && fast_reads.3.is_some());
        assert_eq!(format!("{fast_reads:?}"), format!("{sqlx_reads:?}"));
        // Reads only.
        let refused = fast.execute(&super::super::stmt::stmt!("DELETE FROM links")).await;
        assert!(refused.is_err(), "{refused:?}");
        drop((fast, conn));
        // The same row again: a unique violation is a conflict on this path too.
        let again = db.write_flow(Write { fail: false }).await;
        assert!(matches!(again, Err(DbError::Conflict(_))), "{again:?}");
        db.close().await;
    }

    /// Every mutable column changed: what `update_changed` writes.
    fn changed_connection() -> ConnectionRow {
        ConnectionRow {
            link_id: Some("l2".into()),
            app_scoped_id: Some("scoped2".into()),
            username: Some("user2".into()),
            display_name: Some("display2".into()),
            avatar_url: Some("https://example.com/b.png".into()),
            scopes: "c".into(),
            access_token_sealed: Some("access2".into()),
            access_expires_at: Some(61),
            refresh_token_sealed: None,
            refresh_expires_at: None,
            token_generation: 63,
            status: "broken".into(),
            status_reason: Some("reason2".into()),
            sandbox: 0,
            last_refreshed_at: Some(65),
            reconnect_count: 66,
            updated_at: 68,
            // A broken connection has no refresh scheduled.
            next_refresh_at: None,
            refresh_failures: 70,
            next_check_at: Some(71),
            last_checked_at: Some(72),
            expiring_notified_at: None,
            ..connection()
        }
    }

    /// An update writes every mutable column, and of the indexed ones those it is told changed,
    /// on both paths: a column left out keeps its value, the others all take theirs (a column
    /// dropped from the statement, or two swapped, shows).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_update_writes_the_indexed_columns_it_is_told_changed() {
        struct Update(connections::Indexed);
        impl FlowWrite for Update {
            type Output = ();
            type Error = DbError;
            async fn run<E: Exec>(self, conn: &mut E) -> DbResult<()> {
                connections::update_changed(conn, &changed_connection(), self.0).await
            }
        }
        let dir = tempfile::tempdir().unwrap();
        let db = db_with_link(&dir).await;
        let mut tx = db.begin_write().await.unwrap();
        links::insert(&mut tx, &LinkRow { id: "l2".into(), token_hash: "hash2".into(), ..link() })
            .await
            .unwrap();
        tx.commit().await.unwrap();
        db.write_flow(Write { fail: false }).await.unwrap();
        let stored = |db: &Db| {
            let db = db.clone();
            async move {
                let mut conn = db.read().await.unwrap();
                connections::get(&mut conn, "c1").await.unwrap().unwrap()
            }
        };

        // None of the indexed columns: they keep their values, every other column changes.
        let none = connections::Indexed { link_id: false, username: false, status: false };
        db.write_flow(Update(none)).await.unwrap();
        let expected = ConnectionRow {
            link_id: connection().link_id,
            username: connection().username,
            status: connection().status,
            ..changed_connection()
        };
        assert_eq!(format!("{:?}", stored(&db).await), format!("{expected:?}"));

        // One at a time, on the sqlx path this time.
        let mut tx = db.begin_write().await.unwrap();
        let link_only = connections::Indexed { link_id: true, ..none };
        connections::update_changed(&mut tx, &changed_connection(), link_only).await.unwrap();
        tx.commit().await.unwrap();
        let expected = ConnectionRow { link_id: Some("l2".into()), ..expected };
        assert_eq!(format!("{:?}", stored(&db).await), format!("{expected:?}"));

        db.write_flow(Update(connections::Indexed { username: true, ..none })).await.unwrap();
        let expected = ConnectionRow { username: Some("user2".into()), ..expected };
        assert_eq!(format!("{:?}", stored(&db).await), format!("{expected:?}"));

        db.write_flow(Update(connections::Indexed { status: true, ..none })).await.unwrap();
        assert_eq!(format!("{:?}", stored(&db).await), format!("{:?}", changed_connection()));
        // The per-status counters followed the status (their trigger fires on a named column).
        let counts: Vec<(String, i64)> =
            sqlx::query_as("SELECT status, n FROM connection_counts WHERE workspace_id = 'w1' AND n > 0")
                .fetch_all(&mut *db.read().await.unwrap())
                .await
                .unwrap();
        assert_eq!(counts, vec![("broken".to_string(), 1)]);
        db.close().await;
    }

    /// Writes on both paths at once queue on the one write permit: every one commits, none meets
    /// a locked database, and a sqlx transaction left open is rolled back before a synchronous
    /// write begins.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn writes_of_both_paths_queue_and_all_commit() {
        struct One(i64);
        impl FlowWrite for One {
            type Output = ();
            type Error = DbError;
            async fn run<E: Exec>(self, conn: &mut E) -> DbResult<()> {
                conn.execute(&super::super::stmt::stmt!("INSERT INTO t (x) VALUES ($1)", self.0)).await?;
                Ok(())
            }
        }
        let dir = tempfile::tempdir().unwrap();
        let db = crate::db::test_sqlite(&dir, 2).await;
        sqlx::query("CREATE TABLE t (x INTEGER NOT NULL)")
            .execute(&mut *db.writer().await.unwrap())
            .await
            .unwrap();
        // Left open on the sqlx writer connection.
        let mut tx = db.begin_write().await.unwrap();
        sqlx::query("INSERT INTO t (x) VALUES (-1)").execute(&mut *tx).await.unwrap();
        drop(tx);
        let mut tasks = Vec::new();
        for i in 0..40_i64 {
            let db = db.clone();
            tasks.push(tokio::spawn(async move {
                if i % 2 == 0 {
                    db.write_flow(One(i)).await
                } else {
                    let mut tx = db.begin_write().await?;
                    sqlx::query("INSERT INTO t (x) VALUES ($1)").bind(i).execute(&mut *tx).await?;
                    tx.commit().await
                }
            }));
        }
        for t in tasks {
            t.await.unwrap().unwrap();
        }
        let mut values: Vec<i64> =
            sqlx::query_scalar("SELECT x FROM t").fetch_all(&mut *db.read().await.unwrap()).await.unwrap();
        values.sort_unstable();
        assert_eq!(values, (0..40).collect::<Vec<_>>());
        db.close().await;
    }

    /// While another process holds SQLite's write lock, a write waits for it on the writer
    /// thread: the runtime that asked (here the test's only thread) goes on serving, and the
    /// write lands once the lock is released.
    #[tokio::test(flavor = "current_thread")]
    async fn a_write_waits_for_another_process_off_the_runtime() {
        let dir = tempfile::tempdir().unwrap();
        let db = crate::db::test_sqlite_migrated(&dir).await;
        sqlx::query(
            "INSERT INTO workspaces (id, name, slug, allowed_redirects, created_at, updated_at) \
             VALUES ('w1', 'W', 'w', '', 1, 1)",
        )
        .execute(&mut *db.writer().await.unwrap())
        .await
        .unwrap();
        links::insert(&mut db.writer().await.unwrap(), &link()).await.unwrap();
        // Another process: a connection of its own, holding the write lock.
        let other = Connection::open(dir.path().join("t.db")).unwrap();
        other.execute_batch("BEGIN IMMEDIATE").unwrap();
        let write = tokio::spawn({
            let db = db.clone();
            async move { db.write_flow(Write { fail: false }).await }
        });
        // Runs the write up to its first wait: the writer thread, since the lock is taken.
        tokio::task::yield_now().await;
        assert!(!write.is_finished(), "the write neither failed nor went through: {write:?}");
        // This thread is free: a read answers.
        let mut fast = db.read_fast().await.unwrap();
        assert!(links::get(&mut fast, "l1").await.unwrap().is_some());
        assert!(oauth_flows::get(&mut fast, "f1").await.unwrap().is_none());
        other.execute_batch("COMMIT").unwrap();
        write.await.unwrap().unwrap();
        assert!(oauth_flows::get(&mut fast, "f1").await.unwrap().is_some());
        drop(fast);
        db.close().await;
    }

    #[test]
    fn only_plain_writable_files_take_the_synchronous_path() {
        use super::super::sqlite_file;
        assert_eq!(sqlite_file("sqlite://data/a.db?mode=rwc"), Some(PathBuf::from("data/a.db")));
        assert_eq!(sqlite_file("sqlite:/abs/a.db"), Some(PathBuf::from("/abs/a.db")));
        assert_eq!(sqlite_file("sqlite::memory:"), None);
        assert_eq!(sqlite_file("sqlite://a.db?mode=ro"), None);
        assert_eq!(sqlite_file("sqlite://a%20b.db"), None);
    }

    /// A copy of a connection read before the provider answered does not overwrite the row
    /// once its tokens or status changed; an expiry announcement is made once per grant.
    /// An attempt that expired keeps no PKCE verifier, whether or not it ended; its row goes
    /// once it is past the retention.
    #[tokio::test]
    async fn expired_attempts_lose_their_verifier_then_their_row() {
        let dir = tempfile::tempdir().unwrap();
        let db = db_with_link(&dir).await;
        let open = FlowRow { consumed_at: None, outcome: None, connection_id: None, ..flow() };
        let mut tx = db.begin_write().await.unwrap();
        oauth_flows::insert(&mut *tx, &open).await.unwrap();
        tx.commit().await.unwrap();
        let stored = || async { oauth_flows::get(&mut *db.read().await.unwrap(), "f1").await.unwrap() };
        assert_eq!(oauth_flows::purge_expired(&mut db.writer().await.unwrap(), 22).await.unwrap(), 0);
        assert_eq!(stored().await.unwrap().verifier_sealed, "verifier", "not expired yet");
        assert_eq!(oauth_flows::purge_expired(&mut db.writer().await.unwrap(), 23).await.unwrap(), 0);
        assert_eq!(stored().await.unwrap().verifier_sealed, "", "expired: erased, the row kept");
        let past = 23 + oauth_flows::RETENTION_MS;
        assert_eq!(oauth_flows::purge_expired(&mut db.writer().await.unwrap(), past).await.unwrap(), 1);
        assert!(stored().await.is_none());
        db.close().await;
    }

    #[tokio::test]
    async fn stale_copies_do_not_overwrite_a_changed_connection() {
        let dir = tempfile::tempdir().unwrap();
        let db = db_with_link(&dir).await;
        let mut tx = db.begin_write().await.unwrap();
        connections::insert(&mut *tx, &connection()).await.unwrap();
        tx.commit().await.unwrap();
        let stored = || async {
            let mut conn = db.read().await.unwrap();
            connections::get(&mut conn, "c1").await.unwrap().unwrap()
        };
        let read = stored().await;
        // Meanwhile a refresh stores new tokens.
        let mut newer = read.clone();
        newer.token_generation += 1;
        newer.access_token_sealed = Some("newer".into());
        let mut tx = db.begin_write().await.unwrap();
        connections::update(&mut *tx, &newer).await.unwrap();
        tx.commit().await.unwrap();
        // The stale copy, guarded by what it was read with, is not written.
        let mut stale = read.clone();
        stale.refresh_failures = 7;
        let mut tx = db.begin_write().await.unwrap();
        let written = connections::update_if_unchanged(&mut *tx, &stale, read.token_generation, &read.status)
            .await
            .unwrap();
        tx.commit().await.unwrap();
        assert!(!written);
        let now = stored().await;
        assert_eq!(
            (now.access_token_sealed.as_deref(), now.refresh_failures),
            (Some("newer"), read.refresh_failures)
        );
        // A copy of the current row is.
        let mut current = now.clone();
        current.refresh_failures = 3;
        current.expiring_notified_at = None;
        let mut tx = db.begin_write().await.unwrap();
        assert!(
            connections::update_if_unchanged(&mut *tx, &current, now.token_generation, &now.status)
                .await
                .unwrap()
        );
        tx.commit().await.unwrap();
        assert_eq!(stored().await.refresh_failures, 3);
        // Announcements: not for replaced tokens, then once.
        let mut conn = db.writer().await.unwrap();
        assert!(
            !connections::mark_expiring_notified(&mut *conn, "c1", read.token_generation, 10).await.unwrap()
        );
        assert!(
            connections::mark_expiring_notified(&mut *conn, "c1", now.token_generation, 10).await.unwrap()
        );
        assert!(
            !connections::mark_expiring_notified(&mut *conn, "c1", now.token_generation, 11).await.unwrap()
        );
        drop(conn);
        assert_eq!(stored().await.expiring_notified_at, Some(10));
    }

    /// The scheduler claims only due refreshes of the providers it serves, in the mode it serves
    /// them (others never fill its batches); breaking a connection read before the provider answered writes only what
    /// breaking changes, and not at all once its tokens changed; a due health check is taken by
    /// one caller.
    #[tokio::test]
    async fn claims_and_breaks_touch_only_what_they_own() {
        let dir = tempfile::tempdir().unwrap();
        let db = db_with_link(&dir).await;
        let instagram = ConnectionRow {
            id: "c2".into(),
            provider: "instagram".into(),
            provider_account_id: "other".into(),
            next_refresh_at: Some(30),
            sandbox: 0,
            ..connection()
        };
        let mut tx = db.begin_write().await.unwrap();
        connections::insert(&mut *tx, &ConnectionRow { expiring_notified_at: None, ..connection() })
            .await
            .unwrap();
        connections::insert(&mut *tx, &instagram).await.unwrap();
        tx.commit().await.unwrap();
        let backend = db.backend();
        // Both due; Instagram's (made with the real Instagram) the older. A process that simulates
        // Instagram, and serves TikTok for real, claims neither; one serving the TikTok sandbox
        // only claims TikTok's.
        let mut conn = db.writer().await.unwrap();
        let claimed = connections::claim_due_refreshes(
            &mut conn,
            backend,
            "me",
            100,
            1000,
            5,
            "tiktok,instagram:sandbox",
        )
        .await
        .unwrap();
        assert!(claimed.is_empty(), "{claimed:?}");
        let claimed =
            connections::claim_due_refreshes(&mut conn, backend, "me", 100, 1000, 1, "tiktok:sandbox")
                .await
                .unwrap();
        assert_eq!(claimed, ["c1"]);
        let claimed = connections::claim_due_refreshes(
            &mut conn,
            backend,
            "other",
            100,
            1000,
            5,
            "instagram,tiktok:sandbox",
        )
        .await
        .unwrap();
        assert_eq!(claimed, ["c2"], "c1 is leased");
        // Health checks too, by the same names: both due (at 41).
        for (served, due) in [
            ("tiktok,instagram:sandbox", vec![]),
            ("tiktok:sandbox", vec!["c1"]),
            ("instagram,tiktok:sandbox", vec!["c1", "c2"]),
        ] {
            let mut found = connections::due_checks(&mut conn, 100, 5, served).await.unwrap();
            found.sort();
            assert_eq!(found, due, "{served}");
        }
        drop(conn);

        let stored = || async {
            let mut conn = db.read().await.unwrap();
            connections::get(&mut conn, "c1").await.unwrap().unwrap()
        };
        let read = stored().await;
        // Meanwhile an announcement is made and a check moves the schedule.
        let mut conn = db.writer().await.unwrap();
        assert!(
            connections::mark_expiring_notified(&mut *conn, "c1", read.token_generation, 60).await.unwrap()
        );
        assert!(connections::claim_check(&mut conn, "c1", 100, 500).await.unwrap());
        assert!(!connections::claim_check(&mut conn, "c1", 100, 600).await.unwrap(), "taken once");
        drop(conn);
        let mut tx = db.begin_write().await.unwrap();
        let written =
            connections::set_broken_if_unchanged(&mut *tx, "c1", "gone", 70, read.token_generation, "active")
                .await
                .unwrap();
        tx.commit().await.unwrap();
        assert!(written);
        let now = stored().await;
        assert_eq!((now.status.as_str(), now.status_reason.as_deref()), ("broken", Some("gone")));
        assert_eq!((now.next_refresh_at, now.next_check_at), (None, None));
        assert_eq!(now.expiring_notified_at, Some(60), "another writer's column is kept");
        assert_eq!(now.access_token_sealed, read.access_token_sealed);
        // Not over newer tokens, nor twice.
        let mut tx = db.begin_write().await.unwrap();
        let again = connections::set_broken_if_unchanged(
            &mut *tx,
            "c1",
            "again",
            80,
            read.token_generation,
            "active",
        )
        .await
        .unwrap();
        tx.commit().await.unwrap();
        assert!(!again);
        assert_eq!(stored().await.status_reason.as_deref(), Some("gone"));
        db.close().await;
    }
}
