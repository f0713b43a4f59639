//! The `key_checks` table: proof that the configured master key is the one the data was sealed
//! with, and which keys no stored value needs any more.

use sqlx::AnyConnection;

use super::DbResult;

/// A stored key check value.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct KeyCheck {
    /// The key's id.
    pub kid: String,
    /// The key check value (a sealed constant).
    pub check_value: String,
    /// When the key first sealed data here.
    pub created_at: i64,
    /// When a re-wrap found no value sealed with this key any more.
    pub retired_at: Option<i64>,
}

/// Every stored key check, oldest first.
pub async fn all(conn: &mut AnyConnection) -> DbResult<Vec<KeyCheck>> {
    Ok(sqlx::query_as(
        "SELECT kid, check_value, created_at, retired_at FROM key_checks ORDER BY created_at, kid",
    )
    .fetch_all(conn)
    .await?)
}

/// Locks the key checks for the rest of the write transaction on PostgreSQL, so that processes
/// starting together, and a re-wrap retiring keys, check and change them one at a time (SQLite's
/// write transactions already run one at a time). Without the session's time limits for the
/// transaction: a re-wrap's retirement counts every sealed value while it holds the lock, and a
/// process starting meanwhile waits for it rather than failing.
pub async fn lock(conn: &mut AnyConnection, backend: super::Backend) -> DbResult<()> {
    if backend == super::Backend::Postgres {
        sqlx::query("SET LOCAL lock_timeout = 0").execute(&mut *conn).await?;
        sqlx::query("SET LOCAL statement_timeout = 0").execute(&mut *conn).await?;
        sqlx::query("LOCK TABLE key_checks IN EXCLUSIVE MODE").execute(conn).await?;
    }
    Ok(())
}

/// Records the check value of a key (once: a process that finds it recorded meanwhile leaves
/// it).
pub async fn insert(conn: &mut AnyConnection, kid: &str, check: &str, now_ms: i64) -> DbResult<bool> {
    let done = sqlx::query(
        "INSERT INTO key_checks (kid, check_value, created_at) VALUES ($1, $2, $3) ON CONFLICT (kid) DO NOTHING",
    )
    .bind(kid)
    .bind(check)
    .bind(now_ms)
    .execute(conn)
    .await?;
    Ok(done.rows_affected() > 0)
}

/// Forgets a key: its check value goes (once it is retired, removed from the configuration and
/// no value needs it).
pub async fn forget(conn: &mut AnyConnection, kid: &str) -> DbResult<()> {
    sqlx::query("DELETE FROM key_checks WHERE kid = $1 AND retired_at IS NOT NULL")
        .bind(kid)
        .execute(conn)
        .await?;
    Ok(())
}

/// Marks a key retired (`Some`) or in use again (`None`).
pub async fn set_retired(conn: &mut AnyConnection, kid: &str, retired_at: Option<i64>) -> DbResult<()> {
    sqlx::query("UPDATE key_checks SET retired_at = $1 WHERE kid = $2")
        .bind(retired_at)
        .bind(kid)
        .execute(conn)
        .await?;
    Ok(())
}

/// Marks `kid` needed again if it was retired; whether it was.
pub async fn unretire(conn: &mut AnyConnection, kid: &str) -> DbResult<bool> {
    let done =
        sqlx::query("UPDATE key_checks SET retired_at = NULL WHERE kid = $1 AND retired_at IS NOT NULL")
            .bind(kid)
            .execute(conn)
            .await?;
    Ok(done.rows_affected() > 0)
}
