//! Writing and reading the audit log.

use serde::Serialize;
use time::OffsetDateTime;
use utoipa::ToSchema;

use super::{Actor, Scope, ServiceResult};
use crate::clock::from_millis;
use crate::db::audit::{AuditFilter, AuditRow};
use crate::db::stmt::Exec;
use crate::db::{self, new_id};
use crate::state::App;

/// Appends an audit entry on `conn` (normally inside the transaction of the change).
#[allow(clippy::too_many_arguments)]
pub async fn record(
    conn: &mut impl Exec,
    now_ms: i64,
    actor: &Actor,
    workspace_id: Option<&str>,
    action: &str,
    target_kind: &str,
    target_id: &str,
    details: serde_json::Value,
) -> ServiceResult<()> {
    let row = AuditRow {
        id: new_id(),
        workspace_id: workspace_id.map(str::to_string),
        actor_kind: actor.kind().to_string(),
        actor_id: actor.id().map(str::to_string),
        action: action.to_string(),
        target_kind: target_kind.to_string(),
        target_id: target_id.to_string(),
        details: details.to_string(),
        created_at: now_ms,
    };
    db::audit::insert(conn, &row).await?;
    Ok(())
}

/// An audit entry as the API shows it.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct AuditEntryView {
    /// Id; also the pagination cursor.
    pub id: String,
    /// The workspace concerned.
    pub workspace_id: Option<String>,
    /// `api_key`, `cli`, `user`, `client` or `system`.
    pub actor_kind: String,
    /// The API key or user id.
    pub actor_id: Option<String>,
    /// What happened, e.g. `link.revoked`.
    pub action: String,
    /// The kind of the changed object.
    pub target_kind: String,
    /// Its id.
    pub target_id: String,
    /// Details of the change.
    #[schema(value_type = Object)]
    pub details: serde_json::Value,
    /// When.
    #[serde(with = "time::serde::rfc3339")]
    #[schema(value_type = String, format = DateTime)]
    pub created_at: OffsetDateTime,
}

impl From<AuditRow> for AuditEntryView {
    fn from(r: AuditRow) -> Self {
        Self {
            id: r.id,
            workspace_id: r.workspace_id,
            actor_kind: r.actor_kind,
            actor_id: r.actor_id,
            action: r.action,
            target_kind: r.target_kind,
            target_id: r.target_id,
            details: serde_json::from_str(&r.details).unwrap_or(serde_json::Value::Null),
            created_at: from_millis(r.created_at),
        }
    }
}

/// Lists entries visible to `scope`, newest first.
pub async fn list(
    app: &App,
    scope: &Scope,
    workspace_id: Option<&str>,
    action: Option<&str>,
    target_id: Option<&str>,
    before: Option<&str>,
    limit: i64,
) -> ServiceResult<Vec<AuditEntryView>> {
    let mut conn = app.db.read().await?;
    let workspace = scope.listing_workspace(&mut conn, workspace_id).await?;
    let rows = db::audit::list(
        &mut conn,
        &AuditFilter { workspace_id: workspace.as_deref(), action, target_id, before },
        limit,
    )
    .await?;
    Ok(rows.into_iter().map(Into::into).collect())
}
