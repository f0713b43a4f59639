//! The `sessions`, `login_failures` and `trusted_devices` tables: dashboard sign-ins, the sign-in
//! throttle, and the browsers a user has signed in from.
//!
//! A session (or a trusted browser) is found by the SHA-256 of the cookie's token; the token
//! itself is never stored.

use sqlx::AnyConnection;

use super::DbResult;

/// A session as stored.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct SessionRow {
    /// Id (UUIDv7).
    pub id: String,
    /// SHA-256 hex of the cookie's token.
    pub token_hash: String,
    /// The signed-in user.
    pub user_id: String,
    /// Sign-in time (ms).
    pub created_at: i64,
    /// Last request (ms), updated at most once a minute.
    pub last_seen_at: i64,
    /// End of the absolute lifetime (ms).
    pub expires_at: i64,
    /// The client address at sign-in.
    pub ip: Option<String>,
}

const COLUMNS: &str = "id, token_hash, user_id, created_at, last_seen_at, expires_at, ip";

/// Inserts a session.
pub async fn insert(conn: &mut AnyConnection, s: &SessionRow) -> DbResult<()> {
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "INSERT INTO sessions ({COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7)"
    )))
    .bind(&s.id)
    .bind(&s.token_hash)
    .bind(&s.user_id)
    .bind(s.created_at)
    .bind(s.last_seen_at)
    .bind(s.expires_at)
    .bind(&s.ip)
    .execute(conn)
    .await?;
    Ok(())
}

/// One session by token hash.
pub async fn get_by_token_hash(conn: &mut AnyConnection, hash: &str) -> DbResult<Option<SessionRow>> {
    Ok(sqlx::query_as(sqlx::AssertSqlSafe(format!("SELECT {COLUMNS} FROM sessions WHERE token_hash = $1")))
        .bind(hash)
        .fetch_optional(conn)
        .await?)
}

/// Records activity, at most once a minute per session to spare writes.
pub async fn touch(conn: &mut AnyConnection, id: &str, now_ms: i64) -> DbResult<()> {
    sqlx::query("UPDATE sessions SET last_seen_at = $2 WHERE id = $1 AND last_seen_at < $3")
        .bind(id)
        .bind(now_ms)
        .bind(now_ms - 60_000)
        .execute(conn)
        .await?;
    Ok(())
}

/// Deletes one session.
pub async fn delete(conn: &mut AnyConnection, id: &str) -> DbResult<()> {
    sqlx::query("DELETE FROM sessions WHERE id = $1").bind(id).execute(conn).await?;
    Ok(())
}

/// Deletes the session with this token hash (sign-out, or a new sign-in in the same browser).
pub async fn delete_by_token_hash(conn: &mut AnyConnection, hash: &str) -> DbResult<()> {
    sqlx::query("DELETE FROM sessions WHERE token_hash = $1").bind(hash).execute(conn).await?;
    Ok(())
}

/// Deletes every session of a user except `keep` (a password change keeps the current one).
pub async fn delete_for_user(conn: &mut AnyConnection, user_id: &str, keep: Option<&str>) -> DbResult<u64> {
    let done = sqlx::query("DELETE FROM sessions WHERE user_id = $1 AND ($2 IS NULL OR id <> $2)")
        .bind(user_id)
        .bind(keep)
        .execute(conn)
        .await?;
    Ok(done.rows_affected())
}

/// Deletes sessions past their absolute lifetime or idle for longer than `idle_ms`.
pub async fn purge_expired(conn: &mut AnyConnection, now_ms: i64, idle_ms: i64) -> DbResult<u64> {
    let done = sqlx::query("DELETE FROM sessions WHERE expires_at <= $1 OR last_seen_at <= $2")
        .bind(now_ms)
        .bind(now_ms - idle_ms)
        .execute(conn)
        .await?;
    Ok(done.rows_affected())
}

/// Records a failed sign-in.
pub async fn insert_failure(
    conn: &mut AnyConnection,
    id: &str,
    account_key: &str,
    ip: &str,
    now_ms: i64,
) -> DbResult<()> {
    sqlx::query("INSERT INTO login_failures (id, account_key, ip, created_at) VALUES ($1, $2, $3, $4)")
        .bind(id)
        .bind(account_key)
        .bind(ip)
        .bind(now_ms)
        .execute(conn)
        .await?;
    Ok(())
}

/// Failed sign-ins since `since_ms`: (for this account, from this address).
pub async fn count_failures(
    conn: &mut AnyConnection,
    account_key: &str,
    ip: &str,
    since_ms: i64,
) -> DbResult<(i64, i64)> {
    let (account,): (i64,) =
        sqlx::query_as("SELECT COUNT(*) FROM login_failures WHERE account_key = $1 AND created_at > $2")
            .bind(account_key)
            .bind(since_ms)
            .fetch_one(&mut *conn)
            .await?;
    let (ip,): (i64,) =
        sqlx::query_as("SELECT COUNT(*) FROM login_failures WHERE ip = $1 AND created_at > $2")
            .bind(ip)
            .bind(since_ms)
            .fetch_one(conn)
            .await?;
    Ok((account, ip))
}

/// Forgets the failures of an account (after a successful sign-in). The address's failures stay:
/// signing in to one's own account must not reset the counter of an address that guesses others.
pub async fn clear_account_failures(conn: &mut AnyConnection, account_key: &str) -> DbResult<()> {
    sqlx::query("DELETE FROM login_failures WHERE account_key = $1").bind(account_key).execute(conn).await?;
    Ok(())
}

/// Records an attempt for `account_key` from `ip` as a failure, unless the failures of either
/// since `since_ms` already reach their limits: `false` then, and nothing is written. Counting and
/// recording are one step for concurrent attempts (the caller's write transaction: SQLite's write
/// lock, and on PostgreSQL transaction-scoped advisory locks on the account and the address), so
/// that attempts sent all at once cannot all pass the count before any is recorded. The attempt
/// stays a failure unless the caller deletes it ([`delete_failure`]) or clears the account's.
#[allow(clippy::too_many_arguments)]
pub async fn reserve_attempt(
    tx: &mut AnyConnection,
    backend: super::Backend,
    id: &str,
    account_key: &str,
    ip: &str,
    now_ms: i64,
    since_ms: i64,
    limits: (i64, i64),
) -> DbResult<bool> {
    // In a fixed order (account, then address), so two attempts never wait on each other.
    for key in [format!("login-account:{account_key}"), format!("login-ip:{ip}")] {
        super::advisory_lock(tx, backend, &key).await?;
    }
    let (per_account, per_ip) = count_failures(tx, account_key, ip, since_ms).await?;
    if per_account >= limits.0 || per_ip >= limits.1 {
        return Ok(false);
    }
    insert_failure(tx, id, account_key, ip, now_ms).await?;
    Ok(true)
}

/// Deletes one recorded attempt (it turned out not to be a failure).
pub async fn delete_failure(conn: &mut AnyConnection, id: &str) -> DbResult<()> {
    sqlx::query("DELETE FROM login_failures WHERE id = $1").bind(id).execute(conn).await?;
    Ok(())
}

/// Deletes failures older than `before_ms` (they no longer count).
pub async fn purge_failures(conn: &mut AnyConnection, before_ms: i64) -> DbResult<u64> {
    let done = sqlx::query("DELETE FROM login_failures WHERE created_at <= $1")
        .bind(before_ms)
        .execute(conn)
        .await?;
    Ok(done.rows_affected())
}

/// A browser a user has signed in from (see `trusted_devices` in the migrations).
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct DeviceRow {
    /// Id (UUIDv7).
    pub id: String,
    /// SHA-256 hex of the cookie's token.
    pub token_hash: String,
    /// Whose browser it is.
    pub user_id: String,
    /// First sign-in from it (ms).
    pub created_at: i64,
    /// Last sign-in from it (ms).
    pub last_used_at: i64,
    /// When it stops being trusted (ms).
    pub expires_at: i64,
}

const DEVICE_COLUMNS: &str = "id, token_hash, user_id, created_at, last_used_at, expires_at";

/// Records a trusted browser, keeping at most `keep` of its user's (the most recently used).
pub async fn insert_device(conn: &mut AnyConnection, d: &DeviceRow, keep: i64) -> DbResult<()> {
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "INSERT INTO trusted_devices ({DEVICE_COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6)"
    )))
    .bind(&d.id)
    .bind(&d.token_hash)
    .bind(&d.user_id)
    .bind(d.created_at)
    .bind(d.last_used_at)
    .bind(d.expires_at)
    .execute(&mut *conn)
    .await?;
    sqlx::query(
        "DELETE FROM trusted_devices WHERE user_id = $1 AND id NOT IN \
         (SELECT id FROM trusted_devices WHERE user_id = $1 ORDER BY last_used_at DESC, id DESC LIMIT $2)",
    )
    .bind(&d.user_id)
    .bind(keep)
    .execute(conn)
    .await?;
    Ok(())
}

/// The trusted browser of a cookie's token hash, if it is still trusted at `now_ms`.
pub async fn device_by_token_hash(
    conn: &mut AnyConnection,
    hash: &str,
    now_ms: i64,
) -> DbResult<Option<DeviceRow>> {
    Ok(sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT {DEVICE_COLUMNS} FROM trusted_devices WHERE token_hash = $1 AND expires_at > $2"
    )))
    .bind(hash)
    .bind(now_ms)
    .fetch_optional(conn)
    .await?)
}

/// Records a sign-in from a trusted browser, which then stays trusted until `expires_at`.
pub async fn touch_device(conn: &mut AnyConnection, id: &str, now_ms: i64, expires_at: i64) -> DbResult<()> {
    sqlx::query("UPDATE trusted_devices SET last_used_at = $2, expires_at = $3 WHERE id = $1")
        .bind(id)
        .bind(now_ms)
        .bind(expires_at)
        .execute(conn)
        .await?;
    Ok(())
}

/// Forgets a user's trusted browsers (the user was disabled or given a new password by the
/// operator); returns how many.
pub async fn delete_devices(conn: &mut AnyConnection, user_id: &str) -> DbResult<u64> {
    let done =
        sqlx::query("DELETE FROM trusted_devices WHERE user_id = $1").bind(user_id).execute(conn).await?;
    Ok(done.rows_affected())
}

/// Forgets browsers no longer trusted.
pub async fn purge_devices(conn: &mut AnyConnection, now_ms: i64) -> DbResult<u64> {
    let done =
        sqlx::query("DELETE FROM trusted_devices WHERE expires_at <= $1").bind(now_ms).execute(conn).await?;
    Ok(done.rows_affected())
}
