//! Read-only queries behind the dashboard pages: the overview's counts and the connection list
//! with its filters and handle search.
//!
//! The list reads only the columns a listing shows, into its own row type, so that columns added
//! to `connections` for other features do not concern it. Every query is keyset-paginated on the
//! time-ordered id and served by the `(workspace_id, …, id)` indexes.

use sqlx::AnyConnection;

use super::DbResult;

/// How many connections of a workspace have one (provider, status) pair.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct StatusCount {
    /// `tiktok` or `instagram`.
    pub provider: String,
    /// `active`, `broken` or `disconnected`.
    pub status: String,
    /// How many.
    pub n: i64,
}

/// Connections of a workspace grouped by provider and status.
pub async fn connection_counts(conn: &mut AnyConnection, workspace_id: &str) -> DbResult<Vec<StatusCount>> {
    Ok(sqlx::query_as(
        "SELECT provider, status, COUNT(*) AS n FROM connections WHERE workspace_id = $1 \
         GROUP BY provider, status ORDER BY provider, status",
    )
    .bind(workspace_id)
    .fetch_all(conn)
    .await?)
}

/// Links of a workspace that are not revoked.
pub async fn unrevoked_link_count(conn: &mut AnyConnection, workspace_id: &str) -> DbResult<i64> {
    let (n,): (i64,) =
        sqlx::query_as("SELECT COUNT(*) FROM links WHERE workspace_id = $1 AND revoked_at IS NULL")
            .bind(workspace_id)
            .fetch_one(conn)
            .await?;
    Ok(n)
}

/// A connection as a listing shows it (never a token).
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct ConnectionItem {
    /// Id.
    pub id: String,
    /// Owning workspace.
    pub workspace_id: String,
    /// The link it was last connected through.
    pub link_id: Option<String>,
    /// `tiktok` or `instagram`.
    pub provider: String,
    /// The provider's account id.
    pub provider_account_id: String,
    /// Handle.
    pub username: Option<String>,
    /// Display name.
    pub display_name: Option<String>,
    /// `active`, `broken` or `disconnected`.
    pub status: String,
    /// Why it is broken or disconnected.
    pub status_reason: Option<String>,
    /// 1 when made against the sandbox.
    pub sandbox: i64,
    /// First connection (ms).
    pub connected_at: i64,
    /// Access token expiry (ms).
    pub access_expires_at: Option<i64>,
    /// Last change (ms).
    pub updated_at: i64,
}

/// Filters of [`connections`].
#[derive(Debug, Default, Clone)]
pub struct ConnectionSearch<'a> {
    /// Only this workspace (`None`: every workspace, for the platform admins' search).
    pub workspace_id: Option<&'a str>,
    /// Only this status.
    pub status: Option<&'a str>,
    /// Only this provider.
    pub provider: Option<&'a str>,
    /// Case-insensitive substring of the handle or display name, or the exact account id.
    pub search: Option<&'a str>,
    /// Connections older than this id (the cursor).
    pub before: Option<&'a str>,
}

/// Escapes `s` for a `LIKE … ESCAPE '\'` pattern and wraps it in `%`.
pub fn like_pattern(s: &str) -> String {
    let escaped = s.to_lowercase().replace('\\', "\\\\").replace('%', "\\%").replace('_', "\\_");
    format!("%{escaped}%")
}

/// Newest first, one page.
pub async fn connections(
    conn: &mut AnyConnection,
    f: &ConnectionSearch<'_>,
    limit: i64,
) -> DbResult<Vec<ConnectionItem>> {
    let pattern = f.search.map(like_pattern);
    Ok(sqlx::query_as(
        "SELECT id, workspace_id, link_id, provider, provider_account_id, username, display_name, status, \
         status_reason, sandbox, connected_at, access_expires_at, updated_at FROM connections \
         WHERE ($1 IS NULL OR workspace_id = $1) AND ($2 IS NULL OR status = $2) AND ($3 IS NULL OR provider = $3) \
         AND ($4 IS NULL OR LOWER(COALESCE(username, '')) LIKE $4 ESCAPE '\\' \
              OR LOWER(COALESCE(display_name, '')) LIKE $4 ESCAPE '\\' OR provider_account_id = $5) \
         AND ($6 IS NULL OR id < $6) ORDER BY id DESC LIMIT $7",
    )
    .bind(f.workspace_id)
    .bind(f.status)
    .bind(f.provider)
    .bind(pattern)
    .bind(f.search)
    .bind(f.before)
    .bind(limit)
    .fetch_all(conn)
    .await?)
}
