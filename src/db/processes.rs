//! The `processes` table: the running `serve` and `worker` processes and the key each seals
//! with, kept fresh by a heartbeat (see [`crate::service::processes`]).

use sqlx::AnyConnection;

use super::{Backend, DbResult};

/// The database's clock, in ms since the Unix epoch: heartbeats are written and judged by one
/// clock, whatever the clocks of the hosts that run the processes say.
pub async fn db_now_ms(conn: &mut AnyConnection, backend: Backend) -> DbResult<i64> {
    let sql = match backend {
        Backend::Postgres => "SELECT CAST(EXTRACT(EPOCH FROM clock_timestamp()) * 1000 AS BIGINT)",
        Backend::Sqlite => "SELECT CAST((julianday('now') - 2440587.5) * 86400000.0 AS INTEGER)",
    };
    let (now,): (i64,) = sqlx::query_as(sqlx::AssertSqlSafe(sql)).fetch_one(conn).await?;
    Ok(now)
}

/// A process as recorded.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct ProcessRow {
    /// Random id, new at every start.
    pub id: String,
    /// `serve` or `worker`.
    pub role: String,
    /// The host name it runs on.
    pub host: String,
    /// Its process id there.
    pub pid: i64,
    /// The id of the master key it seals new values with.
    pub active_kid: String,
    /// When it started (wall-clock ms).
    pub started_at: i64,
    /// Its last heartbeat (wall-clock ms).
    pub seen_at: i64,
}

/// Records `p`.
pub async fn insert(conn: &mut AnyConnection, p: &ProcessRow) -> DbResult<()> {
    sqlx::query(
        "INSERT INTO processes (id, role, host, pid, active_kid, started_at, seen_at) \
         VALUES ($1, $2, $3, $4, $5, $6, $7)",
    )
    .bind(&p.id)
    .bind(&p.role)
    .bind(&p.host)
    .bind(p.pid)
    .bind(&p.active_kid)
    .bind(p.started_at)
    .bind(p.seen_at)
    .execute(conn)
    .await?;
    Ok(())
}

/// Records a heartbeat of process `id` at `seen_at` (ms). `false` when it is not recorded (it
/// was forgotten after a long silence, or removed): then nothing is written.
pub async fn beat(conn: &mut AnyConnection, id: &str, seen_at: i64) -> DbResult<bool> {
    let done = sqlx::query("UPDATE processes SET seen_at = $2 WHERE id = $1")
        .bind(id)
        .bind(seen_at)
        .execute(conn)
        .await?;
    Ok(done.rows_affected() == 1)
}

/// Forgets a process (it stopped).
pub async fn remove(conn: &mut AnyConnection, id: &str) -> DbResult<()> {
    sqlx::query("DELETE FROM processes WHERE id = $1").bind(id).execute(conn).await?;
    Ok(())
}

/// Forgets processes not seen since `before` (ms): stopped without saying so.
pub async fn purge(conn: &mut AnyConnection, before: i64) -> DbResult<u64> {
    Ok(sqlx::query("DELETE FROM processes WHERE seen_at < $1")
        .bind(before)
        .execute(conn)
        .await?
        .rows_affected())
}

/// Every recorded process, most recently seen first.
pub async fn all(conn: &mut AnyConnection) -> DbResult<Vec<ProcessRow>> {
    Ok(sqlx::query_as(
        "SELECT id, role, host, pid, active_kid, started_at, seen_at FROM processes ORDER BY seen_at DESC, id",
    )
    .fetch_all(conn)
    .await?)
}
