//! `/api/v1/links`.

use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use serde::Deserialize;
use utoipa::IntoParams;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::{ApiJson, ApiQuery, ApiResult, Caller, Page, Problem, check_cursor, page_size};
use crate::service::attempts::{self, ConnectAttempt};
use crate::service::links::{self, LinkUpdate, LinkView, ListQuery, NewLink};
use crate::state::AppState;

pub(super) fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(list_links, create_link))
        .routes(routes!(get_link, update_link))
        .routes(routes!(revoke_link))
        .routes(routes!(rotate_link))
        .routes(routes!(list_attempts))
}

/// Pagination of a link's attempts.
#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub(super) struct AttemptListQuery {
    /// The `next_cursor` of the previous page.
    cursor: Option<String>,
    /// Page size, 1-200 (default 50).
    #[param(minimum = 1, maximum = 200)]
    limit: Option<i64>,
}

/// List the connect attempts made through a link, newest first: how each ended, in a code and
/// in words, with the reference its client's page showed. Attempts are kept for 30 days after
/// they expired.
#[utoipa::path(get, path = "/links/{id}/attempts", tag = "links", params(("id" = String, Path, description = "Link id"), AttemptListQuery),
    responses((status = 200, body = Page<ConnectAttempt>), (status = 401, body = Problem), (status = 404, body = Problem), (status = 422, body = Problem)))]
async fn list_attempts(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    ApiQuery(q): ApiQuery<AttemptListQuery>,
) -> ApiResult<Json<Page<ConnectAttempt>>> {
    let limit = page_size(q.limit)?;
    check_cursor(q.cursor.as_deref())?;
    let items = attempts::of_link(&state, &caller.scope, &id, q.cursor.as_deref(), limit + 1).await?;
    Ok(Json(Page::from_overfetch(items, limit, |a| a.id.clone())))
}

/// Filters and pagination of the link list.
#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub(super) struct LinkListQuery {
    /// Only this workspace (platform-admin keys); workspace keys always see their own.
    workspace_id: Option<String>,
    /// Case-insensitive substring of the label or client reference.
    q: Option<String>,
    /// The `next_cursor` of the previous page.
    cursor: Option<String>,
    /// Page size, 1-200 (default 50).
    #[param(minimum = 1, maximum = 200)]
    limit: Option<i64>,
}

/// List links, newest first.
#[utoipa::path(get, path = "/links", tag = "links", params(LinkListQuery),
    responses((status = 200, body = Page<LinkView>), (status = 401, body = Problem), (status = 404, body = Problem), (status = 422, body = Problem)))]
async fn list_links(
    State(state): State<AppState>,
    caller: Caller,
    ApiQuery(q): ApiQuery<LinkListQuery>,
) -> ApiResult<Json<Page<LinkView>>> {
    let limit = page_size(q.limit)?;
    check_cursor(q.cursor.as_deref())?;
    let items = links::list(
        &state,
        &caller.scope,
        &ListQuery { workspace_id: q.workspace_id, search: q.q, before: q.cursor, limit: limit + 1 },
    )
    .await?;
    Ok(Json(Page::from_overfetch(items, limit, |l| l.id.clone())))
}

/// Create a link. The answer's `url` is the link to send to the client.
#[utoipa::path(post, path = "/links", tag = "links", request_body = NewLink,
    responses((status = 201, body = LinkView), (status = 413, body = Problem), (status = 415, body = Problem), (status = 422, body = Problem)))]
async fn create_link(
    State(state): State<AppState>,
    caller: Caller,
    ApiJson(input): ApiJson<NewLink>,
) -> ApiResult<(StatusCode, Json<LinkView>)> {
    let link = links::create(&state, &caller.actor, &caller.scope, input).await?;
    Ok((StatusCode::CREATED, Json(link)))
}

/// Get one link.
#[utoipa::path(get, path = "/links/{id}", tag = "links", params(("id" = String, Path, description = "Link id")),
    responses((status = 200, body = LinkView), (status = 404, body = Problem)))]
async fn get_link(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> ApiResult<Json<LinkView>> {
    Ok(Json(links::get(&state, &caller.scope, &id).await?))
}

/// Change a link's label, client reference, platforms, expiry, use limit, success redirect or
/// whether its page lists the accounts connected through it.
#[utoipa::path(patch, path = "/links/{id}", tag = "links", request_body = LinkUpdate,
    params(("id" = String, Path, description = "Link id")),
    responses((status = 200, body = LinkView), (status = 404, body = Problem), (status = 422, body = Problem)))]
async fn update_link(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    ApiJson(input): ApiJson<LinkUpdate>,
) -> ApiResult<Json<LinkView>> {
    Ok(Json(links::update(&state, &caller.actor, &caller.scope, &id, input).await?))
}

/// Revoke a link: it stops working at once. Connections made through it stay.
#[utoipa::path(post, path = "/links/{id}/revoke", tag = "links", params(("id" = String, Path, description = "Link id")),
    responses((status = 200, body = LinkView), (status = 404, body = Problem)))]
async fn revoke_link(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> ApiResult<Json<LinkView>> {
    Ok(Json(links::revoke(&state, &caller.actor, &caller.scope, &id).await?))
}

/// Give a link a new token; the old URL stops working at once. Same id and history.
#[utoipa::path(post, path = "/links/{id}/rotate", tag = "links", params(("id" = String, Path, description = "Link id")),
    responses((status = 200, body = LinkView), (status = 404, body = Problem), (status = 409, body = Problem)))]
async fn rotate_link(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> ApiResult<Json<LinkView>> {
    Ok(Json(links::rotate(&state, &caller.actor, &caller.scope, &id).await?))
}
