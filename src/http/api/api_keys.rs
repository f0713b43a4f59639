//! `/api/v1/api-keys`.

use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::{ApiJson, ApiQuery, ApiResult, Caller, Problem, WorkspaceQuery};
use crate::service::api_keys::{self, ApiKeyView, CreatedApiKey, NewApiKey};
use crate::state::AppState;

pub(super) fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(list_api_keys, create_api_key)).routes(routes!(revoke_api_key))
}

/// List API keys (never the secrets), oldest first. Without `workspace_id` a platform-admin key
/// sees every key, the platform-admin keys included.
#[utoipa::path(get, path = "/api-keys", tag = "api-keys", params(WorkspaceQuery),
    responses((status = 200, body = Vec<ApiKeyView>), (status = 401, body = Problem)))]
async fn list_api_keys(
    State(state): State<AppState>,
    caller: Caller,
    ApiQuery(q): ApiQuery<WorkspaceQuery>,
) -> ApiResult<Json<Vec<ApiKeyView>>> {
    Ok(Json(api_keys::list(&state, &caller.scope, q.workspace_id.as_deref()).await?))
}

/// Create an API key. The answer's `secret` is shown this once.
#[utoipa::path(post, path = "/api-keys", tag = "api-keys", request_body = NewApiKey,
    responses((status = 201, body = CreatedApiKey), (status = 403, body = Problem), (status = 422, body = Problem),
        (status = 409, body = Problem, description = "As many keys as allowed are active (50 per workspace, and 50 platform-admin keys); revoke one first")))]
async fn create_api_key(
    State(state): State<AppState>,
    caller: Caller,
    ApiJson(input): ApiJson<NewApiKey>,
) -> ApiResult<(StatusCode, Json<CreatedApiKey>)> {
    let key = api_keys::create(&state, &caller.actor, &caller.scope, input).await?;
    Ok((StatusCode::CREATED, Json(key)))
}

/// Revoke an API key: requests with it get 401 from now on.
#[utoipa::path(post, path = "/api-keys/{id}/revoke", tag = "api-keys",
    params(("id" = String, Path, description = "API key id")),
    responses((status = 200, body = ApiKeyView), (status = 404, body = Problem)))]
async fn revoke_api_key(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> ApiResult<Json<ApiKeyView>> {
    Ok(Json(api_keys::revoke(&state, &caller.actor, &caller.scope, &id).await?))
}
