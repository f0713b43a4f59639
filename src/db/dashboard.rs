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

/// Newest first, one page. Only the filters given become conditions (rather than
/// `($1 IS NULL OR …)`), so that both engines can walk the `(workspace_id, status, id)` and
/// `(workspace_id, provider, id)` indexes in id order and stop after one page.
pub async fn connections(
    conn: &mut AnyConnection,
    f: &ConnectionSearch<'_>,
    limit: i64,
) -> DbResult<Vec<ConnectionItem>> {
    let mut sql = String::from(
        "SELECT id, workspace_id, link_id, provider, provider_account_id, username, display_name, status, \
         status_reason, sandbox, connected_at, access_expires_at, updated_at FROM connections WHERE 1 = 1",
    );
    let mut params: Vec<String> = Vec::new();
    let mut placeholder = |value: String| {
        params.push(value);
        format!("${}", params.len())
    };
    if let Some(w) = f.workspace_id {
        sql.push_str(&format!(" AND workspace_id = {}", placeholder(w.to_string())));
    }
    if let Some(s) = f.status {
        sql.push_str(&format!(" AND status = {}", placeholder(s.to_string())));
    }
    if let Some(p) = f.provider {
        sql.push_str(&format!(" AND provider = {}", placeholder(p.to_string())));
    }
    if let Some(search) = f.search {
        let pattern = placeholder(like_pattern(search));
        let exact = placeholder(search.to_string());
        sql.push_str(&format!(
            " AND (LOWER(COALESCE(username, '')) LIKE {pattern} ESCAPE '\\' \
             OR LOWER(COALESCE(display_name, '')) LIKE {pattern} ESCAPE '\\' OR provider_account_id = {exact})"
        ));
    }
    if let Some(b) = f.before {
        sql.push_str(&format!(" AND id < {}", placeholder(b.to_string())));
    }
    sql.push_str(&format!(" ORDER BY id DESC LIMIT ${}", params.len() + 1));
    let mut query = sqlx::query_as(&sql);
    for p in params {
        query = query.bind(p);
    }
    Ok(query.bind(limit).fetch_all(conn).await?)
}
