//! `/api/v1/workspaces`.

use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use serde::Deserialize;
use utoipa::IntoParams;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::{ApiJson, ApiQuery, ApiResult, Caller, Page, Problem, check_cursor, page_size};
use crate::service::workspaces::{self, NewWorkspace, WorkspaceUpdate, WorkspaceView};
use crate::state::AppState;

pub(super) fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(list_workspaces, create_workspace))
        .routes(routes!(get_workspace, update_workspace))
}

/// Pagination parameters.
#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub(super) struct PageQuery {
    /// The `next_cursor` of the previous page.
    cursor: Option<String>,
    /// Page size, 1-200 (default 50).
    #[param(minimum = 1, maximum = 200)]
    limit: Option<i64>,
}

/// List the workspaces the key can see (all of them for a platform-admin key).
#[utoipa::path(get, path = "/workspaces", tag = "workspaces", params(PageQuery),
    responses((status = 200, body = Page<WorkspaceView>), (status = 401, body = Problem), (status = 422, body = Problem)))]
async fn list_workspaces(
    State(state): State<AppState>,
    caller: Caller,
    ApiQuery(q): ApiQuery<PageQuery>,
) -> ApiResult<Json<Page<WorkspaceView>>> {
    let limit = page_size(q.limit)?;
    check_cursor(q.cursor.as_deref())?;
    let items = workspaces::list(&state, &caller.scope, q.cursor.as_deref(), limit + 1).await?;
    Ok(Json(Page::from_overfetch(items, limit, |w| w.id.clone())))
}

/// Create a workspace (platform-admin keys only).
#[utoipa::path(post, path = "/workspaces", tag = "workspaces", request_body = NewWorkspace,
    responses((status = 201, body = WorkspaceView), (status = 403, body = Problem), (status = 422, body = Problem)))]
async fn create_workspace(
    State(state): State<AppState>,
    caller: Caller,
    ApiJson(input): ApiJson<NewWorkspace>,
) -> ApiResult<(StatusCode, Json<WorkspaceView>)> {
    let w = workspaces::create(&state, &caller.actor, &caller.scope, input).await?;
    Ok((StatusCode::CREATED, Json(w)))
}

/// Get one workspace by id or slug.
#[utoipa::path(get, path = "/workspaces/{id}", tag = "workspaces",
    params(("id" = String, Path, description = "Workspace id or slug")),
    responses((status = 200, body = WorkspaceView), (status = 404, body = Problem)))]
async fn get_workspace(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> ApiResult<Json<WorkspaceView>> {
    Ok(Json(workspaces::get(&state, &caller.scope, &id).await?))
}

/// Update a workspace's name, branding or success-redirect allow-list. A new logo URL is fetched
/// and checked before anything is saved (see `Branding.logo_url`); a change that ran meanwhile
/// makes this one 409 rather than be undone by it.
#[utoipa::path(patch, path = "/workspaces/{id}", tag = "workspaces", request_body = WorkspaceUpdate,
    params(("id" = String, Path, description = "Workspace id or slug")),
    responses((status = 200, body = WorkspaceView), (status = 404, body = Problem), (status = 409, body = Problem),
        (status = 422, body = Problem)))]
async fn update_workspace(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    ApiJson(input): ApiJson<WorkspaceUpdate>,
) -> ApiResult<Json<WorkspaceView>> {
    Ok(Json(workspaces::update(&state, &caller.actor, &caller.scope, &id, input).await?))
}
