//! `/api/v1/workspaces`.

use axum::Json;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
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
    responses((status = 201, body = WorkspaceView,
            headers(("ETag" = String, description = "The workspace's version, for `If-Match`"))),
        (status = 403, body = Problem), (status = 422, body = Problem)))]
async fn create_workspace(
    State(state): State<AppState>,
    caller: Caller,
    ApiJson(input): ApiJson<NewWorkspace>,
) -> ApiResult<(StatusCode, [(header::HeaderName, HeaderValue); 1], Json<WorkspaceView>)> {
    let w = workspaces::create(&state, &caller.actor, &caller.scope, input).await?;
    Ok((StatusCode::CREATED, [etag(&w)], Json(w)))
}

/// The `ETag` header of a workspace's version.
fn etag(w: &WorkspaceView) -> (header::HeaderName, HeaderValue) {
    // A quoted decimal number is always a valid header value.
    (header::ETAG, HeaderValue::from_str(&w.etag()).unwrap_or(HeaderValue::from_static("\"0\"")))
}

/// The versions an `If-Match` header lets a change apply to: `None` without the header or with
/// `*` (any version), else the strong entity tags it lists. Weak and malformed tags match no
/// version (RFC 9110 compares strongly for `If-Match`), so such a header fails the precondition.
fn if_match(headers: &HeaderMap) -> Option<Vec<i64>> {
    let values: Vec<&str> =
        headers.get_all(header::IF_MATCH).iter().map(|v| v.to_str().unwrap_or("\u{0}")).collect();
    if values.is_empty() {
        return None;
    }
    let tags: Vec<&str> = values.iter().flat_map(|v| v.split(',')).map(str::trim).collect();
    if tags.contains(&"*") {
        return None;
    }
    Some(
        tags.iter()
            .filter_map(|t| t.strip_prefix('"')?.strip_suffix('"'))
            .filter(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
            .filter_map(|n| n.parse().ok())
            .collect(),
    )
}

/// Get one workspace by id or slug.
/// One workspace, with its version in the `ETag` header.
#[utoipa::path(get, path = "/workspaces/{id}", tag = "workspaces",
    params(("id" = String, Path, description = "Workspace id or slug")),
    responses((status = 200, body = WorkspaceView,
            headers(("ETag" = String, description = "The workspace's version, for `If-Match`"))),
        (status = 404, body = Problem)))]
async fn get_workspace(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> ApiResult<([(header::HeaderName, HeaderValue); 1], Json<WorkspaceView>)> {
    let w = workspaces::get(&state, &caller.scope, &id).await?;
    Ok(([etag(&w)], Json(w)))
}

/// Update a workspace's name, branding or success-redirect allow-list. A new logo URL is fetched
/// and checked before anything is saved (see `Branding.logo_url`). With `If-Match` (the `ETag`
/// of a read), a workspace changed since that read is left alone and the answer is 412; without
/// it, a change saved while this one ran (a logo fetch takes up to ten seconds) makes this one
/// 409 rather than be undone by it.
#[utoipa::path(patch, path = "/workspaces/{id}", tag = "workspaces", request_body = WorkspaceUpdate,
    params(("id" = String, Path, description = "Workspace id or slug"),
        ("If-Match" = Option<String>, Header,
            description = "The `ETag` the change was made from (or `*`); another version makes the answer 412")),
    responses((status = 200, body = WorkspaceView,
            headers(("ETag" = String, description = "The workspace's new version"))),
        (status = 404, body = Problem), (status = 409, body = Problem), (status = 412, body = Problem),
        (status = 422, body = Problem)))]
async fn update_workspace(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    headers: HeaderMap,
    ApiJson(input): ApiJson<WorkspaceUpdate>,
) -> ApiResult<([(header::HeaderName, HeaderValue); 1], Json<WorkspaceView>)> {
    let based_on = if_match(&headers);
    let w = workspaces::update(&state, &caller.actor, &caller.scope, &id, input, based_on.as_deref()).await?;
    Ok(([etag(&w)], Json(w)))
}
