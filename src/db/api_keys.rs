//! The `api_keys` table. A key is shown once; only its visible prefix and its SHA-256 are kept.

use sqlx::AnyConnection;

use super::DbResult;

/// An API key as stored.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct ApiKeyRow {
    /// Id (UUIDv7).
    pub id: String,
    /// The workspace it is scoped to; `None` for a platform-admin key.
    pub workspace_id: Option<String>,
    /// A name to recognise it by.
    pub name: String,
    /// The visible start of the key (`alk_` + 12 characters).
    pub prefix: String,
    /// SHA-256 hex of the whole key.
    pub key_hash: String,
    /// Who created it.
    pub created_by: String,
    /// Creation time (ms).
    pub created_at: i64,
    /// Last authenticated use (ms).
    pub last_used_at: Option<i64>,
    /// Revocation time (ms).
    pub revoked_at: Option<i64>,
}

const COLUMNS: &str =
    "id, workspace_id, name, prefix, key_hash, created_by, created_at, last_used_at, revoked_at";

/// Inserts a key.
pub async fn insert(conn: &mut AnyConnection, k: &ApiKeyRow) -> DbResult<()> {
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "INSERT INTO api_keys ({COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)"
    )))
    .bind(&k.id)
    .bind(&k.workspace_id)
    .bind(&k.name)
    .bind(&k.prefix)
    .bind(&k.key_hash)
    .bind(&k.created_by)
    .bind(k.created_at)
    .bind(k.last_used_at)
    .bind(k.revoked_at)
    .execute(conn)
    .await?;
    Ok(())
}

/// One key by its visible prefix.
pub async fn get_by_prefix(conn: &mut AnyConnection, prefix: &str) -> DbResult<Option<ApiKeyRow>> {
    Ok(sqlx::query_as(sqlx::AssertSqlSafe(format!("SELECT {COLUMNS} FROM api_keys WHERE prefix = $1")))
        .bind(prefix)
        .fetch_optional(conn)
        .await?)
}

/// One key by id.
pub async fn get(conn: &mut AnyConnection, id: &str) -> DbResult<Option<ApiKeyRow>> {
    Ok(sqlx::query_as(sqlx::AssertSqlSafe(format!("SELECT {COLUMNS} FROM api_keys WHERE id = $1")))
        .bind(id)
        .fetch_optional(conn)
        .await?)
}

/// How many keys of a workspace (platform-admin keys with `None`) are not revoked.
pub async fn count_active(conn: &mut AnyConnection, workspace_id: Option<&str>) -> DbResult<i64> {
    let (n,): (i64,) = sqlx::query_as(
        "SELECT COUNT(*) FROM api_keys WHERE revoked_at IS NULL \
         AND (workspace_id = $1 OR ($1 IS NULL AND workspace_id IS NULL))",
    )
    .bind(workspace_id)
    .fetch_one(conn)
    .await?;
    Ok(n)
}

/// Keys of one workspace, or every key (`None`), oldest first.
pub async fn list(conn: &mut AnyConnection, workspace_id: Option<&str>) -> DbResult<Vec<ApiKeyRow>> {
    Ok(sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT {COLUMNS} FROM api_keys WHERE ($1 IS NULL OR workspace_id = $1) ORDER BY id"
    )))
    .bind(workspace_id)
    .fetch_all(conn)
    .await?)
}

/// Marks a key revoked (no effect if it already is).
pub async fn revoke(conn: &mut AnyConnection, id: &str, now_ms: i64) -> DbResult<()> {
    sqlx::query("UPDATE api_keys SET revoked_at = COALESCE(revoked_at, $2) WHERE id = $1")
        .bind(id)
        .bind(now_ms)
        .execute(conn)
        .await?;
    Ok(())
}

/// The keys `created_by` made (a `created_by` value: `user:<id>`, `api_key:<id>`), revoked ones
/// included, in one workspace or in any (`None`).
pub async fn made_by(
    conn: &mut AnyConnection,
    created_by: &str,
    workspace_id: Option<&str>,
) -> DbResult<Vec<ApiKeyRow>> {
    Ok(sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT {COLUMNS} FROM api_keys WHERE created_by = $1 \
         AND ($2 IS NULL OR workspace_id = $2) ORDER BY id"
    )))
    .bind(created_by)
    .bind(workspace_id)
    .fetch_all(conn)
    .await?)
}

/// Whether key `id` exists and is not revoked; on PostgreSQL its row stays locked (shared) until
/// the transaction ends, so that a revocation running meanwhile waits for it, or it for the
/// revocation (SQLite's write transactions run one at a time anyway).
pub async fn is_active_locked(conn: &mut AnyConnection, backend: super::Backend, id: &str) -> DbResult<bool> {
    let lock = if backend == super::Backend::Postgres { " FOR SHARE" } else { "" };
    let row: Option<(Option<i64>,)> =
        sqlx::query_as(sqlx::AssertSqlSafe(format!("SELECT revoked_at FROM api_keys WHERE id = $1{lock}")))
            .bind(id)
            .fetch_optional(conn)
            .await?;
    Ok(matches!(row, Some((None,))))
}

/// Records a use, at most once a minute per key to spare writes.
pub async fn touch(conn: &mut AnyConnection, id: &str, now_ms: i64) -> DbResult<()> {
    sqlx::query(
        "UPDATE api_keys SET last_used_at = $2 WHERE id = $1 AND (last_used_at IS NULL OR last_used_at < $3)",
    )
    .bind(id)
    .bind(now_ms)
    .bind(now_ms - 60_000)
    .execute(conn)
    .await?;
    Ok(())
}
