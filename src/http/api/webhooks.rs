//! `/api/v1/webhooks`: endpoints, their delivery logs, redelivery and test events.

use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::{ApiJson, ApiQuery, ApiResult, Caller, Page, Problem, WorkspaceQuery, check_cursor, page_size};
use crate::service::webhooks::{
    self, Current, DeliveryView, EndpointUpdate, EndpointView, EndpointWithSecret, NewEndpoint,
};
use crate::state::AppState;

pub(super) fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(list_webhooks, create_webhook))
        .routes(routes!(get_webhook, update_webhook, remove_webhook))
        .routes(routes!(rotate_webhook_secret))
        .routes(routes!(test_webhook))
        .routes(routes!(list_deliveries))
        .routes(routes!(redeliver))
}

/// List webhook endpoints (never their secrets).
#[utoipa::path(get, path = "/webhooks", tag = "webhooks", params(WorkspaceQuery),
    responses((status = 200, body = Vec<EndpointView>), (status = 401, body = Problem), (status = 422, body = Problem)))]
async fn list_webhooks(
    State(state): State<AppState>,
    caller: Caller,
    ApiQuery(q): ApiQuery<WorkspaceQuery>,
) -> ApiResult<Json<Vec<EndpointView>>> {
    Ok(Json(webhooks::list(&state, &caller.scope, q.workspace_id.as_deref()).await?))
}

/// Add an endpoint. The answer's `secret` (`whsec_…`) is shown this once.
#[utoipa::path(post, path = "/webhooks", tag = "webhooks", request_body = NewEndpoint,
    responses((status = 201, body = EndpointWithSecret), (status = 422, body = Problem),
        (status = 409, body = Problem, description = "The workspace has as many endpoints as allowed (20); remove one first")))]
async fn create_webhook(
    State(state): State<AppState>,
    caller: Caller,
    ApiJson(input): ApiJson<NewEndpoint>,
) -> ApiResult<(StatusCode, Json<EndpointWithSecret>)> {
    Ok((StatusCode::CREATED, Json(webhooks::create(&state, &caller.actor, &caller.scope, input).await?)))
}

/// Get one endpoint.
#[utoipa::path(get, path = "/webhooks/{id}", tag = "webhooks", params(("id" = String, Path, description = "Endpoint id")),
    responses((status = 200, body = EndpointView), (status = 404, body = Problem)))]
async fn get_webhook(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> ApiResult<Json<EndpointView>> {
    Ok(Json(EndpointView::from(&webhooks::get_row(&state, &caller.scope, &id).await?)))
}

/// Change an endpoint's URL, events, enabled flag or description.
#[utoipa::path(patch, path = "/webhooks/{id}", tag = "webhooks", request_body = EndpointUpdate,
    params(("id" = String, Path, description = "Endpoint id")),
    responses((status = 200, body = EndpointView), (status = 404, body = Problem), (status = 422, body = Problem)))]
async fn update_webhook(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    ApiJson(input): ApiJson<EndpointUpdate>,
) -> ApiResult<Json<EndpointView>> {
    Ok(Json(webhooks::update(&state, &caller.actor, &caller.scope, &id, input).await?))
}

/// Remove an endpoint: no more deliveries; its delivery log stays readable.
#[utoipa::path(delete, path = "/webhooks/{id}", tag = "webhooks", params(("id" = String, Path, description = "Endpoint id")),
    responses((status = 200, body = EndpointView), (status = 404, body = Problem)))]
async fn remove_webhook(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> ApiResult<Json<EndpointView>> {
    Ok(Json(webhooks::remove(&state, &caller.actor, &caller.scope, &id).await?))
}

/// How a rotation treats the current secret.
#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub(super) struct RotateQuery {
    /// `true` when the current secret leaked: it stops signing now (and so does one rotated out
    /// less than a day ago), allowed at any time. Default `false`: it keeps signing for 24 hours.
    stop_current_now: Option<bool>,
}

/// Rotate the signing secret. The new one is shown this once; the old one keeps signing (as a
/// second signature) for 24 hours, unless `stop_current_now=true`.
#[utoipa::path(post, path = "/webhooks/{id}/rotate-secret", tag = "webhooks",
    params(("id" = String, Path, description = "Endpoint id"), RotateQuery),
    responses((status = 200, body = EndpointWithSecret), (status = 404, body = Problem),
        (status = 409, body = Problem, description = "Rotated less than a day ago: the secret before still signs until then (`stop_current_now=true` rotates anyway)"),
        (status = 422, body = Problem)))]
async fn rotate_webhook_secret(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    ApiQuery(q): ApiQuery<RotateQuery>,
) -> ApiResult<Json<EndpointWithSecret>> {
    let current = if q.stop_current_now == Some(true) { Current::StopsNow } else { Current::KeepsSigning };
    Ok(Json(webhooks::rotate_secret(&state, &caller.actor, &caller.scope, &id, current).await?))
}

/// The id of a queued test event.
#[derive(Debug, Serialize, ToSchema)]
pub(super) struct TestEvent {
    /// The `webhook-id` of the test event.
    event_id: String,
}

/// Send a `webhook.test` event to this endpoint.
#[utoipa::path(post, path = "/webhooks/{id}/test", tag = "webhooks", params(("id" = String, Path, description = "Endpoint id")),
    responses((status = 202, body = TestEvent), (status = 404, body = Problem),
        (status = 409, body = Problem, description = "The endpoint is disabled")))]
async fn test_webhook(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> ApiResult<(StatusCode, Json<TestEvent>)> {
    let event_id = webhooks::send_test(&state, &caller.actor, &caller.scope, &id).await?;
    Ok((StatusCode::ACCEPTED, Json(TestEvent { event_id })))
}

/// Pagination of the delivery log.
#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub(super) struct DeliveryQuery {
    /// The `next_cursor` of the previous page.
    cursor: Option<String>,
    /// Page size, 1-200 (default 50).
    #[param(minimum = 1, maximum = 200)]
    limit: Option<i64>,
}

/// The delivery log of an endpoint, newest first, with every attempt (status, response code,
/// latency). A removed endpoint's log stays readable here.
#[utoipa::path(get, path = "/webhooks/{id}/deliveries", tag = "webhooks", params(("id" = String, Path, description = "Endpoint id"), DeliveryQuery),
    responses((status = 200, body = Page<DeliveryView>), (status = 401, body = Problem), (status = 404, body = Problem), (status = 422, body = Problem)))]
async fn list_deliveries(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    ApiQuery(q): ApiQuery<DeliveryQuery>,
) -> ApiResult<Json<Page<DeliveryView>>> {
    let limit = page_size(q.limit)?;
    check_cursor(q.cursor.as_deref())?;
    let items = webhooks::deliveries(&state, &caller.scope, &id, q.cursor.as_deref(), limit + 1).await?;
    Ok(Json(Page::from_overfetch(items, limit, |d| d.id.clone())))
}

/// Deliver an event again, now, with the same `webhook-id`, on a fresh retry schedule.
#[utoipa::path(post, path = "/webhook-deliveries/{id}/redeliver", tag = "webhooks",
    params(("id" = String, Path, description = "Delivery id")),
    responses((status = 200, body = DeliveryView), (status = 404, body = Problem),
        (status = 409, body = Problem, description = "The endpoint is disabled, or an attempt of this delivery is under way")))]
async fn redeliver(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> ApiResult<Json<DeliveryView>> {
    Ok(Json(webhooks::redeliver(&state, &caller.actor, &caller.scope, &id).await?))
}
