//! The `audit_log` table: who changed what, when. Append-only.

use sqlx::AnyConnection;

use super::DbResult;

/// An audit entry as stored.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct AuditRow {
    /// Id (UUIDv7, so entries sort by time).
    pub id: String,
    /// The workspace concerned (none for platform-wide changes).
    pub workspace_id: Option<String>,
    /// `api_key`, `cli`, `user`, `client` or `system`.
    pub actor_kind: String,
    /// The API key id or user id, when there is one.
    pub actor_id: Option<String>,
    /// What happened, e.g. `link.created`.
    pub action: String,
    /// The kind of the changed object, e.g. `link`.
    pub target_kind: String,
    /// Its id.
    pub target_id: String,
    /// JSON details (never secrets).
    pub details: String,
    /// When (ms).
    pub created_at: i64,
}

/// Appends an entry.
pub async fn insert(conn: &mut AnyConnection, a: &AuditRow) -> DbResult<()> {
    sqlx::query(
        "INSERT INTO audit_log (id, workspace_id, actor_kind, actor_id, action, target_kind, target_id, details, created_at) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
    )
    .bind(&a.id)
    .bind(&a.workspace_id)
    .bind(&a.actor_kind)
    .bind(&a.actor_id)
    .bind(&a.action)
    .bind(&a.target_kind)
    .bind(&a.target_id)
    .bind(&a.details)
    .bind(a.created_at)
    .execute(conn)
    .await?;
    Ok(())
}

/// Filters for [`list`].
#[derive(Debug, Default, Clone)]
pub struct AuditFilter<'a> {
    /// Only this workspace.
    pub workspace_id: Option<&'a str>,
    /// Only this action.
    pub action: Option<&'a str>,
    /// Only this target.
    pub target_id: Option<&'a str>,
    /// Entries older than this id (the cursor).
    pub before: Option<&'a str>,
}

/// Newest first, one page.
pub async fn list(conn: &mut AnyConnection, f: &AuditFilter<'_>, limit: i64) -> DbResult<Vec<AuditRow>> {
    Ok(sqlx::query_as(
        "SELECT id, workspace_id, actor_kind, actor_id, action, target_kind, target_id, details, created_at \
         FROM audit_log WHERE ($1 IS NULL OR workspace_id = $1) AND ($2 IS NULL OR action = $2) \
         AND ($3 IS NULL OR target_id = $3) AND ($4 IS NULL OR id < $4) ORDER BY id DESC LIMIT $5",
    )
    .bind(f.workspace_id)
    .bind(f.action)
    .bind(f.target_id)
    .bind(f.before)
    .bind(limit)
    .fetch_all(conn)
    .await?)
}
