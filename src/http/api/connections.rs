//! `/api/v1/connections`.

use axum::Json;
use axum::extract::{Path, State};
use axum::http::{HeaderValue, header};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use utoipa::IntoParams;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::{ApiError, ApiQuery, ApiResult, Caller, Page, Problem, check_cursor, page_size};
use crate::domain::{FieldError, Platform};
use crate::service::ServiceError;
use crate::service::connections::{
    self, AccessTokenView, ConnectionDetail, ConnectionStatus, ConnectionView, ListQuery,
};
use crate::state::AppState;

pub(super) fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(list_connections))
        .routes(routes!(get_connection))
        .routes(routes!(disconnect_connection))
        .routes(routes!(get_access_token))
        .routes(routes!(refresh_connection))
        .routes(routes!(check_connection))
}

/// Filters and pagination of the connection list.
#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub(super) struct ConnectionListQuery {
    /// Only this workspace (platform-admin keys).
    workspace_id: Option<String>,
    /// `active`, `broken` or `disconnected`.
    #[param(value_type = Option<ConnectionStatus>)]
    status: Option<String>,
    /// `tiktok` or `instagram`.
    #[param(value_type = Option<Platform>)]
    provider: Option<String>,
    /// Only connections last connected through this link (a reconnect through another link of
    /// the workspace moves a connection to that link).
    link_id: Option<String>,
    /// The `next_cursor` of the previous page.
    cursor: Option<String>,
    /// Page size, 1-200 (default 50).
    #[param(minimum = 1, maximum = 200)]
    limit: Option<i64>,
}

/// List connections, newest first. Never returns tokens.
#[utoipa::path(get, path = "/connections", tag = "connections", params(ConnectionListQuery),
    responses((status = 200, body = Page<ConnectionView>), (status = 401, body = Problem), (status = 422, body = Problem)))]
async fn list_connections(
    State(state): State<AppState>,
    caller: Caller,
    ApiQuery(q): ApiQuery<ConnectionListQuery>,
) -> ApiResult<Json<Page<ConnectionView>>> {
    // An empty value is not a filter to skip: it is refused, like any value not in the list.
    let status = match q.status.as_deref() {
        None => None,
        Some("active") => Some(ConnectionStatus::Active),
        Some("broken") => Some(ConnectionStatus::Broken),
        Some("disconnected") => Some(ConnectionStatus::Disconnected),
        Some(_) => {
            return Err(ServiceError::Validation(vec![FieldError::new(
                "status",
                "must be active, broken or disconnected",
            )])
            .into());
        }
    };
    let provider: Option<Platform> = match q.provider.as_deref() {
        None => None,
        Some(p) => Some(p.parse().map_err(|e: FieldError| {
            ServiceError::Validation(vec![FieldError::new("provider", e.message)])
        })?),
    };
    let limit = page_size(q.limit)?;
    check_cursor(q.cursor.as_deref())?;
    let items = connections::list(
        &state,
        &caller.scope,
        &ListQuery {
            workspace_id: q.workspace_id,
            status,
            provider,
            link_id: q.link_id,
            before: q.cursor,
            limit: limit + 1,
        },
    )
    .await?;
    Ok(Json(Page::from_overfetch(items, limit, |c| c.id.clone())))
}

/// Get one connection with its history. Never returns tokens.
#[utoipa::path(get, path = "/connections/{id}", tag = "connections",
    params(("id" = String, Path, description = "Connection id")),
    responses((status = 200, body = ConnectionDetail), (status = 404, body = Problem)))]
async fn get_connection(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> ApiResult<Json<ConnectionDetail>> {
    Ok(Json(connections::get(&state, &caller.scope, &id).await?))
}

/// Disconnect: revokes the grant at the provider where possible (refreshing first an active
/// connection's access token about to run out, or one the provider refuses), marks the
/// connection disconnected and erases its tokens. A dead grant, a refusal a refresh does not
/// cure, tokens that fail to open with the key they name, or a provider not enabled on this
/// instance do not stop it: the status reason then says the grant may still be listed in the
/// account's settings. A provider that cannot revoke it for now does (503), since the tokens
/// erased are the only way to revoke the grant later.
#[utoipa::path(post, path = "/connections/{id}/disconnect", tag = "connections",
    params(("id" = String, Path, description = "Connection id")),
    responses((status = 200, body = ConnectionView), (status = 404, body = Problem),
        (status = 409, body = Problem, description = "Not disconnected: the client reconnected the account after the disconnect was asked for (if the earlier grant was revoked meanwhile, the connection's health check is due at once), or new tokens were stored while the grant was being revoked with the ones before, or (a broken connection) it changed while its token was refreshed to revoke the grant"),
        (status = 503, body = Problem, description = "Not disconnected: the provider could not revoke the grant right now (down, slow or rate-limited) or refused authlink's own settings, the access token could not be refreshed first, a refresh of the connection is under way, the stored tokens need a master key this process does not hold, the connection was made with the real provider and this instance simulates it, or the database cannot be reached. Or the request did not finish in time: the disconnect goes on and may finish")))]
async fn disconnect_connection(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> ApiResult<Json<ConnectionView>> {
    // Run to its end even if the caller goes away: the grant may already be revoked.
    let st = state.clone();
    let Caller { actor, scope, .. } = caller;
    Ok(Json(state.detached(async move { connections::disconnect(&st, &actor, &scope, &id).await }).await?))
}

/// A valid access token, refreshed first when it would expire within five minutes. Every read is
/// written to the audit log. 409 when the connection is broken or disconnected, or when it must
/// be refreshed first and its provider is not enabled on this instance (or runs here in the other
/// mode than the one that made the connection, sandbox or real); 503 when the provider is temporarily unavailable, or a refresh
/// in flight elsewhere outlasts what the request's time allows, and the current token has less
/// than a minute left (with more, it is returned as it is).
#[utoipa::path(get, path = "/connections/{id}/access-token", tag = "connections",
    params(("id" = String, Path, description = "Connection id")),
    responses((status = 200, body = AccessTokenView), (status = 404, body = Problem), (status = 409, body = Problem), (status = 503, body = Problem)))]
async fn get_access_token(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    // Run to its end even if the caller goes away: a refresh's rotated token must be stored.
    let st = state.clone();
    let Caller { actor, scope, .. } = caller;
    let token =
        state.detached(async move { connections::access_token(&st, &actor, &scope, &id).await }).await?;
    let mut res = Json(token).into_response();
    res.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    Ok(res)
}

/// The result of a refresh or health check run on demand.
#[derive(Debug, serde::Serialize, utoipa::ToSchema)]
pub(super) struct RunResult {
    /// `refreshed`, `current` (nothing to do), `too_early` (refresh only: the provider does not
    /// refresh this token yet, as Instagram before a token is 24 hours old, so it was not asked
    /// and nothing changed; not a failure), `transient` (retried later) or `broken`.
    outcome: &'static str,
    /// What happened, in words.
    detail: Option<String>,
    /// The connection afterwards.
    connection: ConnectionView,
}

/// An outcome's word and detail, as [`RunResult`] gives them.
fn outcome_words(outcome: crate::service::refresh::Outcome) -> (&'static str, Option<String>) {
    use crate::service::refresh::Outcome;
    match outcome {
        Outcome::Refreshed(_) => ("refreshed", None),
        Outcome::Current(_) => ("current", None),
        Outcome::Transient(reason) => ("transient", Some(reason)),
        Outcome::Broken(reason) => ("broken", Some(reason)),
    }
}

async fn run_result(
    state: &AppState,
    caller: &Caller,
    id: &str,
    (outcome, detail): (&'static str, Option<String>),
    action: &str,
) -> ApiResult<Json<RunResult>> {
    let connection = connections::get(state, &caller.scope, id).await?.connection;
    let mut conn = state.db.writer().await.map_err(ServiceError::from)?;
    crate::service::audit::record(
        &mut conn,
        state.now_ms(),
        &caller.actor,
        Some(&connection.workspace_id),
        action,
        "connection",
        id,
        serde_json::json!({"outcome": outcome}),
    )
    .await?;
    Ok(Json(RunResult { outcome, detail, connection }))
}

/// Refresh the tokens now (through the same single-flight path as the scheduler). A token the
/// provider does not refresh yet (Instagram: under 24 hours old) is left as it is, with the
/// outcome `too_early` and a detail saying from when it can be refreshed. A refresh that another
/// request or the scheduler finished while this one waited for it is this one's answer, with the
/// outcome `current`: the tokens rotate once.
#[utoipa::path(post, path = "/connections/{id}/refresh", tag = "connections",
    params(("id" = String, Path, description = "Connection id")),
    responses((status = 200, body = RunResult), (status = 404, body = Problem),
        (status = 409, body = Problem, description = "The connection is broken or disconnected (the client must reconnect through a link), or its provider is not enabled, or runs on this instance in the other mode than the one that made the connection (sandbox or real): its tokens are not sent there")))]
async fn refresh_connection(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> ApiResult<Json<RunResult>> {
    use crate::service::refresh::Requested;
    let seen = connections::get_active_row(&state, &caller.scope, &id).await?.token_generation;
    let (st, conn_id) = (state.clone(), id.clone());
    let requested = state
        .detached(async move { crate::service::refresh::refresh_requested(&st, &conn_id, Some(seen)).await })
        .await?;
    let words = match requested {
        Requested::Done(outcome) => outcome_words(outcome),
        Requested::NotYet { message, .. } => ("too_early", Some(message)),
    };
    run_result(&state, &caller, &id, words, "connection.refresh_requested").await
}

/// Run the health check now: a cheap profile call that catches revoked grants.
#[utoipa::path(post, path = "/connections/{id}/check", tag = "connections",
    params(("id" = String, Path, description = "Connection id")),
    responses((status = 200, body = RunResult), (status = 404, body = Problem),
        (status = 409, body = Problem, description = "The connection is broken or disconnected (the client must reconnect through a link), or its provider is not enabled, or runs on this instance in the other mode than the one that made the connection (sandbox or real): its tokens are not sent there")))]
async fn check_connection(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> ApiResult<Json<RunResult>> {
    connections::get_active_row(&state, &caller.scope, &id).await?;
    let (st, conn_id) = (state.clone(), id.clone());
    let outcome = state.detached(async move { crate::service::refresh::check(&st, &conn_id).await }).await?;
    run_result(&state, &caller, &id, outcome_words(outcome), "connection.check_requested").await
}
