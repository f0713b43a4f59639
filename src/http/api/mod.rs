//! The JSON API, `/api/v1`.
//!
//! Authentication is a bearer API key in the `Authorization` header (never a cookie, never the
//! URL), so the API needs no CSRF defence. Requests are limited per key, and requests without a
//! valid key per client address (429 with `Retry-After`; see [`ratelimit::ApiLimits`]). Errors
//! are RFC 9457 problem documents with a stable `code`. The OpenAPI 3.1 document is generated
//! from the handlers by utoipa and served at `/api/v1/openapi.json`; the routes and the document
//! come from the same registrations, so they cannot drift apart.

mod api_keys;
mod audit;
mod connections;
mod links;
mod webhooks;
mod workspaces;

use axum::extract::rejection::JsonRejection;
use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::request::Parts;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::{Json, Router};
use serde::Serialize;
use serde::de::DeserializeOwned;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi, ToSchema};
use utoipa_axum::router::OpenApiRouter;

use crate::db::DbError;
use crate::domain::{self, FieldError};
use crate::http::ratelimit::{self, ApiLimits};
use crate::service::{self, Actor, Scope, ServiceError};
use crate::state::AppState;

#[derive(OpenApi)]
#[openapi(
    info(
        title = "authlink API",
        description = "Manage workspaces, auth links, connections and API keys. Authenticate with \
                       `Authorization: Bearer <API key>`; a workspace key sees its own workspace \
                       only, a platform-admin key sees every workspace.",
    ),
    modifiers(&BearerAuth),
    security(("bearer" = [])),
    components(schemas(Problem, FieldError)),
    tags(
        (name = "workspaces", description = "Agencies (tenants)"),
        (name = "links", description = "Reusable auth links"),
        (name = "connections", description = "Connected provider accounts"),
        (name = "api-keys", description = "API keys"),
        (name = "audit", description = "The audit log"),
        (name = "webhooks", description = "Signed event notifications (Standard Webhooks)"),
    )
)]
struct ApiDoc;

struct BearerAuth;

impl Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(
                HttpBuilder::new().scheme(HttpAuthScheme::Bearer).bearer_format("alk_…").build(),
            ),
        );
    }
}

/// The API routes and the OpenAPI document built from them.
pub fn routes() -> (Router<AppState>, utoipa::openapi::OpenApi) {
    let (router, mut doc) = OpenApiRouter::with_openapi(ApiDoc::openapi())
        .merge(workspaces::router())
        .merge(links::router())
        .merge(connections::router())
        .merge(api_keys::router())
        .merge(audit::router())
        .merge(webhooks::router())
        .split_for_parts();
    complete_responses(&mut doc);
    (router, doc)
}

/// Lists on every operation the answers its shared parts can give, so that the document names
/// every status a client can meet: 401 (every operation needs a key), 429 (the rate limits), 503
/// (the database cannot be reached, or the request ran past `http.request_timeout_secs`), 422
/// for query parameters that do not fit, 404 for a `workspace_id` filter naming no workspace of
/// the key's, and 400, 413, 415 and 422 for a body. Every error answer is a problem document,
/// `application/problem+json`.
fn complete_responses(doc: &mut utoipa::openapi::OpenApi) {
    use utoipa::openapi::path::ParameterIn;
    use utoipa::openapi::{ContentBuilder, Ref, RefOr, ResponseBuilder};

    let problem = |description: &str| {
        RefOr::T(
            ResponseBuilder::new()
                .description(description)
                .content(
                    PROBLEM_JSON,
                    ContentBuilder::new().schema(Some(Ref::from_schema_name("Problem"))).build(),
                )
                .build(),
        )
    };
    for item in doc.paths.paths.values_mut() {
        let operations = [&mut item.get, &mut item.post, &mut item.put, &mut item.patch, &mut item.delete];
        for op in operations.into_iter().flatten() {
            let has_body = op.request_body.is_some();
            let query = || op.parameters.iter().flatten().filter(|p| p.parameter_in == ParameterIn::Query);
            let has_query = query().next().is_some();
            let names_workspace = query().any(|p| p.name == "workspace_id");
            let mut shared = vec![
                ("401", "No valid API key: missing, malformed, unknown or revoked"),
                (
                    "429",
                    "Too many requests for this key (or, without a valid key, from this address); see `Retry-After`",
                ),
                (
                    "503",
                    "The database cannot be reached, or the request did not finish in time; try again shortly",
                ),
                (
                    "500",
                    "An error of authlink's own (a bug, or stored data it cannot read); the server log says more",
                ),
            ];
            // Every operation refuses a query parameter it does not take.
            shared.push(if has_query || has_body {
                ("422", "Some fields or query parameters are invalid; see `errors`")
            } else {
                ("422", "The request has a query parameter this operation does not take; see `errors`")
            });
            if names_workspace {
                shared.push(("404", "No such workspace among the key's"));
            }
            if has_body {
                shared.push(("400", "The body is not valid JSON"));
                shared.push(("413", "The body is too large"));
                shared.push(("415", "The body is not sent as `application/json`"));
            }
            for (status, description) in shared {
                op.responses.responses.entry(status.to_string()).or_insert_with(|| problem(description));
            }
            for (status, response) in &mut op.responses.responses {
                if status.starts_with('2') {
                    continue;
                }
                if let RefOr::T(response) = response {
                    if let Some(content) = response.content.shift_remove("application/json") {
                        response.content.insert(PROBLEM_JSON.to_string(), content);
                    }
                    if response.description.is_empty() {
                        response.description = status_description(status).to_string();
                    }
                }
            }
        }
    }
}

/// The media type of problem documents (RFC 9457).
const PROBLEM_JSON: &str = "application/problem+json";

/// A description for an error status the handler's annotation left without one.
fn status_description(status: &str) -> &'static str {
    match status {
        "403" => "The key may not do this",
        "404" => "No such object in the key's workspaces",
        "409" => "The change conflicts with the object's current state",
        "422" => "Some fields are invalid; see `errors`",
        "503" => {
            "A provider or the database cannot be reached, or the request did not finish in time; try again shortly"
        }
        _ => "An error; see the problem document",
    }
}

/// The page size of a listing: 1 to 200, 50 when not given. Anything else is refused rather than
/// silently changed, so that a client never mistakes a short page for the end of the list.
pub fn page_size(limit: Option<i64>) -> ApiResult<i64> {
    match limit {
        None => Ok(50),
        Some(n @ 1..=200) => Ok(n),
        Some(_) => Err(ServiceError::Validation(vec![FieldError::new("limit", "must be 1 to 200")]).into()),
    }
}

/// Checks a listing's cursor: a `next_cursor` given back, which is an id. Anything else is
/// refused, rather than answered with a first or an empty page a client could not tell from
/// the real ones.
pub fn check_cursor(cursor: Option<&str>) -> ApiResult<()> {
    match cursor {
        // Ids are given back in lower case; an upper-case one would compare differently on
        // SQLite (bytes) and PostgreSQL (its collation).
        Some(c) if !crate::db::is_id(c) || c.bytes().any(|b| b.is_ascii_uppercase()) => {
            Err(ServiceError::Validation(vec![FieldError::new(
                "cursor",
                "must be the next_cursor of a previous page",
            )])
            .into())
        }
        _ => Ok(()),
    }
}

/// The OpenAPI document (also used by the tests and `authlink openapi`).
pub fn openapi() -> utoipa::openapi::OpenApi {
    let (_, mut doc) = routes();
    doc.servers = Some(vec![utoipa::openapi::Server::new("/api/v1")]);
    doc
}

/// The query parameters each operation takes, by path as the document names them
/// (`/connections/{id}`) and method: what [`refuse_unknown_query`] lets through.
type QueryNames = std::collections::HashMap<String, Vec<(axum::http::Method, Vec<String>)>>;

fn query_names(doc: &utoipa::openapi::OpenApi) -> QueryNames {
    use axum::http::Method;
    use utoipa::openapi::path::ParameterIn;
    let mut names = QueryNames::new();
    for (path, item) in &doc.paths.paths {
        let operations = [
            (Method::GET, &item.get),
            (Method::POST, &item.post),
            (Method::PUT, &item.put),
            (Method::PATCH, &item.patch),
            (Method::DELETE, &item.delete),
        ];
        for (method, op) in operations {
            let Some(op) = op else { continue };
            let taken = op.parameters.iter().flatten().filter(|p| p.parameter_in == ParameterIn::Query);
            names.entry(path.clone()).or_default().push((method, taken.map(|p| p.name.clone()).collect()));
        }
    }
    names
}

/// The query parameters of a request that its operation does not take: refused (422) once the
/// caller is known ([`Caller`]), so that a request without a valid key still gets its 401.
#[derive(Debug, Clone)]
struct UnknownQuery(Vec<FieldError>);

/// Notes the query parameters the operation does not take (as the document lists them), for a
/// 422: a misspelt filter would otherwise be ignored, and the answer would list everything.
async fn refuse_unknown_query(
    axum::extract::State(names): axum::extract::State<std::sync::Arc<QueryNames>>,
    matched: Option<axum::extract::MatchedPath>,
    mut request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    if let (Some(query), Some(matched)) = (request.uri().query(), matched) {
        let path = matched.as_str().strip_prefix("/api/v1").unwrap_or(matched.as_str());
        let operation = names.get(path).and_then(|ops| ops.iter().find(|(m, _)| m == request.method()));
        if let Some((_, taken)) = operation {
            let unknown: Vec<FieldError> = url::form_urlencoded::parse(query.as_bytes())
                .filter(|(name, _)| !taken.iter().any(|t| t == name))
                .map(|(name, _)| {
                    FieldError::new(domain::truncate(&name, 40), "is not a query parameter of this operation")
                })
                .collect();
            if !unknown.is_empty() {
                request.extensions_mut().insert(UnknownQuery(unknown));
            }
        }
    }
    next.run(request).await
}

/// The `/api/v1` router.
pub fn router(_state: AppState) -> Router<AppState> {
    let (router, _) = routes();
    let doc = openapi();
    let json = serde_json::to_string_pretty(&doc).unwrap_or_default();
    let names = std::sync::Arc::new(query_names(&doc));
    router
        .route_layer(axum::middleware::from_fn_with_state(names, refuse_unknown_query))
        .route(
            "/openapi.json",
            axum::routing::get(move || {
                let json = json.clone();
                async move { ([(header::CONTENT_TYPE, "application/json")], json) }
            }),
        )
        .fallback(|| async { ApiError::new(StatusCode::NOT_FOUND, "not_found", "No such API route.") })
        .method_not_allowed_fallback(method_not_allowed)
        // Answers carry secrets (a new key, a webhook secret, a link's URL, an access token):
        // none is kept by a cache on the way or in the client's.
        .layer(tower_http::set_header::SetResponseHeaderLayer::overriding(
            header::CACHE_CONTROL,
            HeaderValue::from_static("no-store"),
        ))
}

/// 405 `method_not_allowed` for a method an API route does not take (axum adds `Allow`).
async fn method_not_allowed(method: axum::http::Method) -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        format!("This route does not take {method}; `Allow` lists the methods it takes."),
    )
}

/// 503 `request_timeout`: the request did not finish within `http.request_timeout_secs`.
pub fn timed_out() -> Response {
    ApiError::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "request_timeout",
        "The request did not finish in time. Try again shortly.",
    )
    .into_response()
}

/// 500 `internal`: an internal error, told nothing more.
pub fn internal_error() -> Response {
    ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", "An internal error occurred.")
        .into_response()
}

/// An RFC 9457 problem document.
#[derive(Debug, Serialize, ToSchema)]
pub struct Problem {
    /// A URI naming the problem type: `https://authlink.dev/problems/` and the `code`, with
    /// hyphens.
    #[serde(rename = "type")]
    pub type_: String,
    /// A short summary.
    pub title: String,
    /// The HTTP status.
    pub status: u16,
    /// What went wrong in this case.
    pub detail: String,
    /// A stable machine-readable code, e.g. `validation_failed`, `not_found`.
    pub code: String,
    /// For validation failures: one entry per invalid field.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub errors: Vec<FieldError>,
}

/// An API failure, answered as a problem document.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    code: &'static str,
    detail: String,
    errors: Vec<FieldError>,
    /// Seconds for `Retry-After` (429, and 503 when the database cannot be reached).
    retry_after: Option<u64>,
}

impl ApiError {
    /// A problem with `status`, stable `code` and a detail for people.
    pub fn new(status: StatusCode, code: &'static str, detail: impl Into<String>) -> Self {
        Self { status, code, detail: detail.into(), errors: Vec::new(), retry_after: None }
    }

    /// 422 `validation_failed`: `detail` for people, one entry per invalid field.
    fn invalid(detail: &str, errors: Vec<FieldError>) -> Self {
        Self { errors, ..Self::new(StatusCode::UNPROCESSABLE_ENTITY, "validation_failed", detail) }
    }

    fn rate_limited(wait_secs: u64) -> Self {
        let mut e = Self::new(
            StatusCode::TOO_MANY_REQUESTS,
            "rate_limited",
            format!("Too many requests; try again in {wait_secs} seconds."),
        );
        e.retry_after = Some(wait_secs);
        e
    }

    fn unauthorized() -> Self {
        Self::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "A valid API key is required: send `Authorization: Bearer <key>`.",
        )
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = Problem {
            type_: format!("https://authlink.dev/problems/{}", self.code.replace('_', "-")),
            title: self.status.canonical_reason().unwrap_or("Error").to_string(),
            status: self.status.as_u16(),
            detail: self.detail,
            code: self.code.to_string(),
            errors: self.errors,
        };
        let mut res = (self.status, Json(body)).into_response();
        res.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static(PROBLEM_JSON));
        // Also on the problems answered outside the API's router (an undecodable path, a panic,
        // a request out of time): no API answer is kept by a cache.
        res.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
        if self.status == StatusCode::UNAUTHORIZED {
            res.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        if let Some(wait) = self.retry_after {
            res.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(wait));
        }
        res
    }
}

impl From<ServiceError> for ApiError {
    fn from(e: ServiceError) -> Self {
        match e {
            ServiceError::NotFound(what) => {
                ApiError::new(StatusCode::NOT_FOUND, "not_found", format!("No such {what}."))
            }
            ServiceError::Validation(errors) => {
                ApiError::invalid("Some fields are invalid; see `errors`.", errors)
            }
            ServiceError::Forbidden(why) => ApiError::new(StatusCode::FORBIDDEN, "forbidden", why),
            ServiceError::Conflict(why) => ApiError::new(StatusCode::CONFLICT, "conflict", why),
            ServiceError::Stale(why) => {
                ApiError::new(StatusCode::PRECONDITION_FAILED, "precondition_failed", why)
            }
            ServiceError::Unavailable(why) => {
                ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "provider_unavailable", why)
            }
            ServiceError::Db(DbError::Unavailable(e)) => {
                tracing::error!(error = %e, "database unavailable");
                ApiError {
                    retry_after: Some(5),
                    ..ApiError::new(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "database_unavailable",
                        "The service's database cannot do this right now (unreachable, or busy past its time \
                         limits). Try again shortly.",
                    )
                }
            }
            ServiceError::Db(DbError::Conflict(e)) => {
                tracing::warn!(error = %e, "unexpected conflict");
                ApiError::new(StatusCode::CONFLICT, "conflict", "The change conflicts with existing data.")
            }
            other => {
                tracing::error!(error = %other, "internal error");
                ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", "An internal error occurred.")
            }
        }
    }
}

/// The result type of API handlers.
pub type ApiResult<T> = Result<T, ApiError>;

/// A JSON body whose rejections are problem documents: 415 without a JSON content type, 413
/// when too large, 400 for malformed JSON, 422 for well-formed JSON of the wrong shape.
pub struct ApiJson<T>(pub T);

impl<S, T> FromRequest<S> for ApiJson<T>
where
    S: Send + Sync,
    T: DeserializeOwned,
{
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        match Json::<T>::from_request(req, state).await {
            Ok(Json(v)) => Ok(ApiJson(v)),
            Err(rejection) => Err(match rejection {
                JsonRejection::MissingJsonContentType(_) => ApiError::new(
                    StatusCode::UNSUPPORTED_MEDIA_TYPE,
                    "unsupported_media_type",
                    "Send the body as JSON with `Content-Type: application/json`.",
                ),
                JsonRejection::JsonDataError(e) => ApiError::invalid(
                    "The body does not have the expected fields.",
                    vec![FieldError::new("body", e.body_text())],
                ),
                JsonRejection::JsonSyntaxError(_) => {
                    ApiError::new(StatusCode::BAD_REQUEST, "malformed_json", "The body is not valid JSON.")
                }
                JsonRejection::BytesRejection(e) if e.status() == StatusCode::PAYLOAD_TOO_LARGE => {
                    ApiError::new(
                        StatusCode::PAYLOAD_TOO_LARGE,
                        "payload_too_large",
                        "The body is too large.",
                    )
                }
                other => ApiError::new(other.status(), "bad_request", other.body_text()),
            }),
        }
    }
}

/// axum's `Query`, with its rejection (a parameter that does not parse, like `limit=abc`) as a
/// problem document: 422 `validation_failed` naming the query, like a body that does not fit.
#[derive(Debug)]
pub struct ApiQuery<T>(pub T);

impl<S, T> FromRequestParts<S> for ApiQuery<T>
where
    S: Send + Sync,
    T: DeserializeOwned,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        // No filter, cursor or id holds a control character; PostgreSQL refuses text with NUL
        // in it, and a search for a line break finds nothing anyway.
        let query = parts.uri.query().unwrap_or_default();
        let bad: Vec<FieldError> = url::form_urlencoded::parse(query.as_bytes())
            .filter(|(_, value)| value.chars().any(char::is_control))
            .map(|(name, _)| {
                FieldError::new(domain::truncate(&name, 40), "must not contain control characters")
            })
            .collect();
        if !bad.is_empty() {
            return Err(ApiError::invalid("Some query parameters are invalid; see `errors`.", bad));
        }
        match axum::extract::Query::<T>::from_request_parts(parts, state).await {
            Ok(axum::extract::Query(v)) => Ok(ApiQuery(v)),
            Err(rejection) => Err(ApiError::invalid(
                "Some query parameters are invalid; see `errors`.",
                vec![FieldError::new("query", rejection.body_text())],
            )),
        }
    }
}

/// Which workspace to list (`GET /webhooks`, `GET /api-keys`).
#[derive(Debug, serde::Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub(super) struct WorkspaceQuery {
    /// Only this workspace, by id or slug (platform-admin keys); workspace keys always see their
    /// own.
    pub(super) workspace_id: Option<String>,
}

/// The authenticated API caller.
#[derive(Debug, Clone)]
pub struct Caller {
    /// Who, for the audit log.
    pub actor: Actor,
    /// What they may see.
    pub scope: Scope,
}

impl FromRequestParts<AppState> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, Self::Rejection> {
        let limits = parts.extensions.get::<ApiLimits>().cloned();
        let client = ratelimit::client_ip_of(&parts.headers, &parts.extensions);
        let now = std::time::Instant::now();
        // An address whose requests without a valid key used up their bucket gets 429 for any
        // request without one until it refills; a valid key this instance has seen before still
        // passes (with its own budget), so that whoever shares the address (a NAT, a proxy)
        // cannot lock a key's owner out.
        let limited = match (&limits, client) {
            (Some(limits), Some(ip)) => limits.failures.peek(ratelimit::ClientNet::of(ip), now).err(),
            _ => None,
        };
        let key = parts
            .headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|h| h.strip_prefix("Bearer ").or_else(|| h.strip_prefix("bearer ")))
            .map(str::trim);
        // While the address is refused, only a key this instance has seen valid, whole (its
        // public prefix is no secret), is looked up: other keys cost no database read.
        let looked_up = key.filter(|k| limited.is_none() || limits.as_ref().is_some_and(|l| l.knows_key(k)));
        let found = match looked_up {
            Some(key) => service::api_keys::authenticate(state, key).await?,
            None => None,
        };
        if let (Some(_), Some(l), Some(k)) = (&found, &limits, key) {
            l.remember_key(k);
        }
        let Some((actor, scope)) = found else {
            if let (Some(wait), Some(ip)) = (limited, client) {
                tracing::warn!(client = %ip, "API requests without a valid key rate-limited");
                return Err(ApiError::rate_limited(wait));
            }
            if key.is_some() {
                tracing::info!("API request with an unknown, malformed or revoked key");
            }
            if let (Some(limits), Some(ip)) = (&limits, client) {
                let _ = limits.failures.check(ratelimit::ClientNet::of(ip), now);
            }
            return Err(ApiError::unauthorized());
        };
        if let (Some(limits), Actor::ApiKey { id }) = (&limits, &actor) {
            limits.per_key.check(id.clone(), now).map_err(|wait| {
                tracing::warn!(api_key_id = %id, "API requests rate-limited");
                ApiError::rate_limited(wait)
            })?;
        }
        if let Some(UnknownQuery(unknown)) = parts.extensions.remove::<UnknownQuery>() {
            return Err(ApiError::invalid("Some query parameters are invalid; see `errors`.", unknown));
        }
        Ok(Caller { actor, scope })
    }
}

/// A page of results with the cursor of the next page.
#[derive(Debug, Serialize, ToSchema)]
pub struct Page<T> {
    /// The items.
    pub data: Vec<T>,
    /// Pass as `cursor` to get the next page; `null` on the last page.
    pub next_cursor: Option<String>,
}

impl<T> Page<T> {
    /// Trims a `limit + 1` fetch to `limit` and derives the cursor from the last item.
    pub fn from_overfetch(mut items: Vec<T>, limit: i64, cursor_of: impl Fn(&T) -> String) -> Self {
        let limit = usize::try_from(limit).unwrap_or(usize::MAX);
        let more = items.len() > limit;
        items.truncate(limit);
        let next_cursor = if more { items.last().map(cursor_of) } else { None };
        Page { data: items, next_cursor }
    }
}
