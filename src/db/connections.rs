//! The `connections` and `connection_events` tables: connected provider accounts, their sealed
//! tokens, status and history.

use sqlx::AnyConnection;

use super::DbResult;

/// A connection as stored.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct ConnectionRow {
    /// Id (UUIDv7).
    pub id: String,
    /// Owning workspace.
    pub workspace_id: String,
    /// The link it was last connected through.
    pub link_id: Option<String>,
    /// `tiktok` or `instagram`.
    pub provider: String,
    /// The provider's stable account id.
    pub provider_account_id: String,
    /// Instagram's app-scoped id.
    pub app_scoped_id: Option<String>,
    /// Handle.
    pub username: Option<String>,
    /// Display name.
    pub display_name: Option<String>,
    /// Avatar URL.
    pub avatar_url: Option<String>,
    /// Comma-separated granted scopes.
    pub scopes: String,
    /// Sealed for `connections/<id>/access_token`.
    pub access_token_sealed: Option<String>,
    /// Access token expiry (ms).
    pub access_expires_at: Option<i64>,
    /// Sealed for `connections/<id>/refresh_token`.
    pub refresh_token_sealed: Option<String>,
    /// Refresh token expiry (ms).
    pub refresh_expires_at: Option<i64>,
    /// Increases with each new token pair.
    pub token_generation: i64,
    /// `active`, `broken` or `disconnected`.
    pub status: String,
    /// Why it is broken or disconnected.
    pub status_reason: Option<String>,
    /// 1 when made against the sandbox.
    pub sandbox: i64,
    /// First connection (ms).
    pub connected_at: i64,
    /// Last token refresh (ms).
    pub last_refreshed_at: Option<i64>,
    /// How many times the account was connected again.
    pub reconnect_count: i64,
    /// Row creation (ms).
    pub created_at: i64,
    /// Last change (ms).
    pub updated_at: i64,
}

const COLUMNS: &str = "id, workspace_id, link_id, provider, provider_account_id, app_scoped_id, username, \
    display_name, avatar_url, scopes, access_token_sealed, access_expires_at, refresh_token_sealed, \
    refresh_expires_at, token_generation, status, status_reason, sandbox, connected_at, last_refreshed_at, \
    reconnect_count, created_at, updated_at";

/// Inserts a connection.
pub async fn insert(conn: &mut AnyConnection, c: &ConnectionRow) -> DbResult<()> {
    sqlx::query(&format!(
        "INSERT INTO connections ({COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, \
         $14, $15, $16, $17, $18, $19, $20, $21, $22, $23)"
    ))
    .bind(&c.id)
    .bind(&c.workspace_id)
    .bind(&c.link_id)
    .bind(&c.provider)
    .bind(&c.provider_account_id)
    .bind(&c.app_scoped_id)
    .bind(&c.username)
    .bind(&c.display_name)
    .bind(&c.avatar_url)
    .bind(&c.scopes)
    .bind(&c.access_token_sealed)
    .bind(c.access_expires_at)
    .bind(&c.refresh_token_sealed)
    .bind(c.refresh_expires_at)
    .bind(c.token_generation)
    .bind(&c.status)
    .bind(&c.status_reason)
    .bind(c.sandbox)
    .bind(c.connected_at)
    .bind(c.last_refreshed_at)
    .bind(c.reconnect_count)
    .bind(c.created_at)
    .bind(c.updated_at)
    .execute(conn)
    .await?;
    Ok(())
}

/// Writes every mutable column of `c`.
pub async fn update(conn: &mut AnyConnection, c: &ConnectionRow) -> DbResult<()> {
    sqlx::query(
        "UPDATE connections SET link_id = $2, app_scoped_id = $3, username = $4, display_name = $5, avatar_url = $6, \
         scopes = $7, access_token_sealed = $8, access_expires_at = $9, refresh_token_sealed = $10, \
         refresh_expires_at = $11, token_generation = $12, status = $13, status_reason = $14, sandbox = $15, \
         last_refreshed_at = $16, reconnect_count = $17, updated_at = $18 WHERE id = $1",
    )
    .bind(&c.id)
    .bind(&c.link_id)
    .bind(&c.app_scoped_id)
    .bind(&c.username)
    .bind(&c.display_name)
    .bind(&c.avatar_url)
    .bind(&c.scopes)
    .bind(&c.access_token_sealed)
    .bind(c.access_expires_at)
    .bind(&c.refresh_token_sealed)
    .bind(c.refresh_expires_at)
    .bind(c.token_generation)
    .bind(&c.status)
    .bind(&c.status_reason)
    .bind(c.sandbox)
    .bind(c.last_refreshed_at)
    .bind(c.reconnect_count)
    .bind(c.updated_at)
    .execute(conn)
    .await?;
    Ok(())
}

/// One connection by id.
pub async fn get(conn: &mut AnyConnection, id: &str) -> DbResult<Option<ConnectionRow>> {
    Ok(sqlx::query_as(&format!("SELECT {COLUMNS} FROM connections WHERE id = $1"))
        .bind(id)
        .fetch_optional(conn)
        .await?)
}

/// The connection of one provider account in one workspace.
pub async fn get_by_account(
    conn: &mut AnyConnection,
    workspace_id: &str,
    provider: &str,
    account_id: &str,
) -> DbResult<Option<ConnectionRow>> {
    Ok(sqlx::query_as(&format!(
        "SELECT {COLUMNS} FROM connections WHERE workspace_id = $1 AND provider = $2 AND provider_account_id = $3"
    ))
    .bind(workspace_id)
    .bind(provider)
    .bind(account_id)
    .fetch_optional(conn)
    .await?)
}

/// Filters for [`list`].
#[derive(Debug, Default, Clone)]
pub struct ConnectionFilter<'a> {
    /// Only this workspace.
    pub workspace_id: Option<&'a str>,
    /// Only this status.
    pub status: Option<&'a str>,
    /// Only this provider.
    pub provider: Option<&'a str>,
    /// Only connections last made through this link.
    pub link_id: Option<&'a str>,
    /// Connections older than this id (the cursor).
    pub before: Option<&'a str>,
}

/// Newest first, one page.
pub async fn list(
    conn: &mut AnyConnection,
    f: &ConnectionFilter<'_>,
    limit: i64,
) -> DbResult<Vec<ConnectionRow>> {
    Ok(sqlx::query_as(&format!(
        "SELECT {COLUMNS} FROM connections WHERE ($1 IS NULL OR workspace_id = $1) AND ($2 IS NULL OR status = $2) \
         AND ($3 IS NULL OR provider = $3) AND ($4 IS NULL OR link_id = $4) AND ($5 IS NULL OR id < $5) \
         ORDER BY id DESC LIMIT $6"
    ))
    .bind(f.workspace_id)
    .bind(f.status)
    .bind(f.provider)
    .bind(f.link_id)
    .bind(f.before)
    .bind(limit)
    .fetch_all(conn)
    .await?)
}

/// An event in a connection's history.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct EventRow {
    /// Id (UUIDv7).
    pub id: String,
    /// The connection.
    pub connection_id: String,
    /// Its workspace.
    pub workspace_id: String,
    /// `created`, `reconnected`, `refreshed`, `broken`, `disconnected`, ...
    pub kind: String,
    /// Readable detail.
    pub detail: Option<String>,
    /// When (ms).
    pub created_at: i64,
}

/// Appends an event.
pub async fn insert_event(conn: &mut AnyConnection, e: &EventRow) -> DbResult<()> {
    sqlx::query(
        "INSERT INTO connection_events (id, connection_id, workspace_id, kind, detail, created_at) \
         VALUES ($1, $2, $3, $4, $5, $6)",
    )
    .bind(&e.id)
    .bind(&e.connection_id)
    .bind(&e.workspace_id)
    .bind(&e.kind)
    .bind(&e.detail)
    .bind(e.created_at)
    .execute(conn)
    .await?;
    Ok(())
}

/// A connection's history, oldest first.
pub async fn events(conn: &mut AnyConnection, connection_id: &str) -> DbResult<Vec<EventRow>> {
    Ok(sqlx::query_as(
        "SELECT id, connection_id, workspace_id, kind, detail, created_at FROM connection_events \
         WHERE connection_id = $1 ORDER BY id",
    )
    .bind(connection_id)
    .fetch_all(conn)
    .await?)
}
