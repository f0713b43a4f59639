//! `/api/v1/audit-events`.

use axum::Json;
use axum::extract::State;
use serde::Deserialize;
use utoipa::IntoParams;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::{ApiQuery, ApiResult, Caller, Page, Problem, check_cursor, page_size};
use crate::service::audit::{self, AuditEntryView};
use crate::state::AppState;

pub(super) fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(list_audit_events))
}

/// Filters and pagination of the audit log.
#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub(super) struct AuditQuery {
    /// Only this workspace (platform-admin keys).
    workspace_id: Option<String>,
    /// Only this action, e.g. `link.revoked`.
    action: Option<String>,
    /// Only entries about this object id.
    target_id: Option<String>,
    /// The `next_cursor` of the previous page.
    cursor: Option<String>,
    /// Page size, 1-200 (default 50).
    #[param(minimum = 1, maximum = 200)]
    limit: Option<i64>,
}

/// List audit entries, newest first.
#[utoipa::path(get, path = "/audit-events", tag = "audit", params(AuditQuery),
    responses((status = 200, body = Page<AuditEntryView>), (status = 401, body = Problem), (status = 422, body = Problem)))]
async fn list_audit_events(
    State(state): State<AppState>,
    caller: Caller,
    ApiQuery(q): ApiQuery<AuditQuery>,
) -> ApiResult<Json<Page<AuditEntryView>>> {
    let limit = page_size(q.limit)?;
    check_cursor(q.cursor.as_deref())?;
    let items = audit::list(
        &state,
        &caller.scope,
        q.workspace_id.as_deref(),
        q.action.as_deref(),
        q.target_id.as_deref(),
        q.cursor.as_deref(),
        limit + 1,
    )
    .await?;
    Ok(Json(Page::from_overfetch(items, limit, |a| a.id.clone())))
}
