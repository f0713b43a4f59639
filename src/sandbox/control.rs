//! The sandbox control API (`/sandbox/control/...`), served only when `sandbox.control_api` is on:
//! scenario switches, counters, account revocation and the clock. See the module docs of
//! [`crate::sandbox`] for the exact JSON.

use std::sync::Arc;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, Request, State};
use axum::http::{Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::Response;
use axum::routing::{get, post};
use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_json::json;

use super::{MetaCallback, RevokeReason, Sandbox, ScenarioPatch, json};
use crate::domain::Platform;

/// The control routes (state applied by the caller).
pub(super) fn routes() -> Router<Arc<Sandbox>> {
    Router::new()
        .route("/control/clock/advance", post(advance_clock))
        .route("/control/{provider}/scenario", get(get_scenario).post(set_scenario))
        .route("/control/{provider}/reset", post(reset))
        .route("/control/{provider}/release", post(release))
        .route("/control/{provider}/stats", get(stats))
        .route("/control/{provider}/accounts", get(accounts))
        .route("/control/{provider}/accounts/{account_id}/revoke", post(revoke_account))
        .route("/control/tiktok/accounts/{account_id}/revoke-access-tokens", post(revoke_access_tokens))
        .route("/control/tiktok/accounts/{account_id}/withdraw-scopes", post(withdraw_scopes))
        .route("/control/instagram/accounts/{account_id}/data-deletion", post(request_data_deletion))
        .route("/control/instagram/accounts/{account_id}/account-type", post(switch_account_type))
        .route("/control/tiktok/grants", post(mint_grants))
        .route("/control/tiktok/live-refresh-tokens", get(live_refresh_tokens))
        .route_layer(axum::middleware::from_fn(json_only))
}

/// Refuses a control request that changes something unless it is sent as JSON (415): a page of
/// another site can make a browser post a form or plain text here (to move the clock of an
/// instance on a developer's machine, say), but not `application/json`, which needs a CORS
/// preflight that authlink never answers.
async fn json_only(req: Request, next: Next) -> Response {
    let json_body = req
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|v| v.trim().eq_ignore_ascii_case("application/json"));
    if req.method() != Method::GET && !json_body {
        return json(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            json!({ "error": "control requests that change something are sent with Content-Type: application/json" }),
        );
    }
    next.run(req).await
}

/// Body of `POST /control/tiktok/grants`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct MintRequest {
    count: usize,
    #[serde(default)]
    scopes: Option<Vec<String>>,
}

/// `POST /control/tiktok/grants {"count": n}`: n grants for synthetic accounts, as if n users had
/// authorised the app (for load and concurrency tests). Answers `{"grants": [{open_id,
/// access_token, refresh_token, expires_in, refresh_expires_in, scope}]}`.
async fn mint_grants(State(sb): State<Arc<Sandbox>>, bytes: Bytes) -> Response {
    let req: MintRequest = match body(&bytes, false) {
        Ok(r) => r,
        Err(res) => return *res,
    };
    if req.count == 0 || req.count > 20_000 {
        return bad_request("count must be between 1 and 20000");
    }
    let scopes = req.scopes.unwrap_or_else(|| vec!["user.info.basic".into(), "user.info.profile".into()]);
    json(StatusCode::OK, json!({ "grants": sb.mint_tiktok_grants(req.count, &scopes) }))
}

/// `GET /control/tiktok/live-refresh-tokens`: `{"sha256": [...]}` of every refresh token that
/// still works at the simulated provider.
async fn live_refresh_tokens(State(sb): State<Arc<Sandbox>>) -> Response {
    json(StatusCode::OK, json!({ "sha256": sb.live_tiktok_refresh_tokens() }))
}

fn bad_request(message: impl Into<String>) -> Response {
    json(StatusCode::BAD_REQUEST, json!({ "error": message.into() }))
}

/// The platform named in the path; `Err` is the 404 to answer.
fn platform(name: &str) -> Result<Platform, Box<Response>> {
    match name {
        "tiktok" => Ok(Platform::Tiktok),
        "instagram" => Ok(Platform::Instagram),
        _ => {
            let name: String = name.chars().take(40).collect();
            Err(Box::new(json(
                StatusCode::NOT_FOUND,
                json!({ "error": format!("unknown provider `{name}` (expected tiktok or instagram)") }),
            )))
        }
    }
}

/// Parses a JSON body; an empty body is `T::default()` when `empty_ok`.
fn body<T: DeserializeOwned + Default>(bytes: &[u8], empty_ok: bool) -> Result<T, Box<Response>> {
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return if empty_ok {
            Ok(T::default())
        } else {
            Err(Box::new(bad_request("a JSON body is required")))
        };
    }
    serde_json::from_slice(bytes).map_err(|e| Box::new(bad_request(format!("invalid JSON body: {e}"))))
}

fn to_json<T: serde::Serialize>(value: &T) -> Response {
    match serde_json::to_value(value) {
        Ok(v) => json(StatusCode::OK, v),
        Err(_) => json(StatusCode::INTERNAL_SERVER_ERROR, json!({ "error": "serialization failed" })),
    }
}

/// `GET /control/{provider}/scenario`.
async fn get_scenario(State(sb): State<Arc<Sandbox>>, Path(provider): Path<String>) -> Response {
    match platform(&provider) {
        Ok(p) => to_json(&sb.scenario(p)),
        Err(resp) => *resp,
    }
}

/// `POST /control/{provider}/scenario` with a [`ScenarioPatch`].
async fn set_scenario(
    State(sb): State<Arc<Sandbox>>,
    Path(provider): Path<String>,
    bytes: Bytes,
) -> Response {
    let p = match platform(&provider) {
        Ok(p) => p,
        Err(resp) => return *resp,
    };
    let patch: ScenarioPatch = match body(&bytes, false) {
        Ok(patch) => patch,
        Err(resp) => return *resp,
    };
    match sb.set_scenario(p, patch) {
        Ok(scenario) => {
            tracing::info!(provider = p.as_str(), "sandbox scenario changed");
            to_json(&scenario)
        }
        Err(message) => bad_request(message),
    }
}

/// `POST /control/{provider}/reset`.
async fn reset(State(sb): State<Arc<Sandbox>>, Path(provider): Path<String>) -> Response {
    match platform(&provider) {
        Ok(p) => {
            sb.reset(p);
            json(StatusCode::OK, json!({ "ok": true }))
        }
        Err(resp) => *resp,
    }
}

/// `POST /control/{provider}/release`: the calls `hold` failures keep waiting go on.
async fn release(State(sb): State<Arc<Sandbox>>, Path(provider): Path<String>) -> Response {
    match platform(&provider) {
        Ok(p) => {
            let released = sb.release(p);
            tracing::info!(provider = p.as_str(), released, "sandbox calls released");
            json(StatusCode::OK, json!({ "released": released }))
        }
        Err(resp) => *resp,
    }
}

/// `GET /control/{provider}/stats`.
async fn stats(State(sb): State<Arc<Sandbox>>, Path(provider): Path<String>) -> Response {
    match platform(&provider) {
        Ok(p) => to_json(&sb.stats(p)),
        Err(resp) => *resp,
    }
}

/// `GET /control/{provider}/accounts`: the fake accounts.
async fn accounts(Path(provider): Path<String>) -> Response {
    let list: Vec<serde_json::Value> = match platform(&provider) {
        Ok(Platform::Tiktok) => super::TIKTOK_ACCOUNTS
            .iter()
            .map(|a| {
                json!({
                    "account_id": a.open_id, "open_id": a.open_id, "union_id": a.union_id,
                    "username": a.username, "display_name": a.display_name,
                })
            })
            .collect(),
        Ok(Platform::Instagram) => super::INSTAGRAM_ACCOUNTS
            .iter()
            .map(|a| {
                json!({
                    "account_id": a.user_id.to_string(), "user_id": a.user_id, "id": a.app_scoped_id,
                    "username": a.username, "name": a.name, "account_type": a.account_type,
                })
            })
            .collect(),
        Err(resp) => return *resp,
    };
    json(StatusCode::OK, json!({ "accounts": list }))
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RevokeBody {
    #[serde(default)]
    reason: RevokeReason,
    /// Instagram, app removed: also send Meta's deauthorize callback (default: yes; `false`
    /// stands for a callback that never arrived).
    #[serde(default = "yes")]
    notify: bool,
}

fn yes() -> bool {
    true
}

/// `POST /control/{provider}/accounts/{account_id}/revoke`.
async fn revoke_account(
    State(sb): State<Arc<Sandbox>>,
    Path((provider, account_id)): Path<(String, String)>,
    bytes: Bytes,
) -> Response {
    let p = match platform(&provider) {
        Ok(p) => p,
        Err(resp) => return *resp,
    };
    let request: RevokeBody = match body(&bytes, true) {
        Ok(b) => b,
        Err(resp) => return *resp,
    };
    let revoked = sb.revoke_account(p, &account_id, request.reason);
    tracing::info!(provider = p.as_str(), revoked, "sandbox account revoked");
    let callback = if p == Platform::Instagram && request.reason == RevokeReason::AppRemoved && request.notify
    {
        sb.send_instagram_deauthorize(&account_id).await
    } else {
        None
    };
    json(StatusCode::OK, json!({ "revoked_tokens": revoked, "deauthorize_callback": callback }))
}

/// `POST /control/instagram/accounts/{user_id}/data-deletion`: sends Meta's signed data-deletion
/// request for the account, as Meta does when a user asks for their data to be deleted, and
/// checks the answer as Meta would: a 2xx whose JSON has `url` and `confirmation_code`, the URL
/// answering. Answers `{"status": n, "url": .., "confirmation_code": .., "status_page": n|null,
/// "valid": bool}`; 404 for an unknown account, 502 when authlink could not be reached.
async fn request_data_deletion(State(sb): State<Arc<Sandbox>>, Path(account_id): Path<String>) -> Response {
    let known = account_id
        .parse::<u64>()
        .ok()
        .is_some_and(|id| super::INSTAGRAM_ACCOUNTS.iter().any(|a| a.user_id == id));
    if !known {
        return json(StatusCode::NOT_FOUND, json!({ "error": "unknown sandbox instagram account" }));
    }
    let Some((status, answer)) = sb.send_instagram_callback(&account_id, MetaCallback::DataDeletion).await
    else {
        return json(StatusCode::BAD_GATEWAY, json!({ "error": "authlink could not be reached" }));
    };
    let field = |name: &str| {
        answer
            .as_ref()
            .and_then(|a| a.get(name))
            .and_then(serde_json::Value::as_str)
            .filter(|v| !v.is_empty())
            .map(str::to_string)
    };
    let (url, code) = (field("url"), field("confirmation_code"));
    let status_page = match &url {
        Some(u) => sb.status_of_own_page(u).await,
        None => None,
    };
    let valid = (200..300).contains(&status)
        && code.is_some()
        && status_page.is_some_and(|s| (200..300).contains(&s));
    tracing::info!(status, valid, "sandbox data-deletion request sent");
    json(
        StatusCode::OK,
        json!({
            "status": status,
            "url": url,
            "confirmation_code": code,
            "status_page": status_page,
            "valid": valid,
        }),
    )
}

/// `POST /control/tiktok/accounts/{open_id}/revoke-access-tokens`.
async fn revoke_access_tokens(State(sb): State<Arc<Sandbox>>, Path(account_id): Path<String>) -> Response {
    let revoked = sb.revoke_tiktok_access_tokens(&account_id);
    tracing::info!(revoked, "sandbox tiktok access tokens revoked");
    json(StatusCode::OK, json!({ "revoked_tokens": revoked }))
}

/// Body of `POST /control/tiktok/accounts/{open_id}/withdraw-scopes`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct WithdrawBody {
    scopes: Vec<String>,
}

/// `POST /control/tiktok/accounts/{open_id}/withdraw-scopes` `{"scopes": [..]}`.
async fn withdraw_scopes(
    State(sb): State<Arc<Sandbox>>,
    Path(account_id): Path<String>,
    bytes: Bytes,
) -> Response {
    let request: WithdrawBody = match body(&bytes, false) {
        Ok(b) => b,
        Err(resp) => return *resp,
    };
    if request.scopes.is_empty() {
        return bad_request("scopes must name at least one scope");
    }
    if let Some(why) = request.scopes.iter().find_map(|s| super::tiktok::unwithdrawable(s)) {
        return bad_request(why);
    }
    if !super::TIKTOK_ACCOUNTS.iter().any(|a| a.open_id == account_id)
        && !account_id.starts_with("sbx-oid-bulk-")
    {
        return json(StatusCode::NOT_FOUND, json!({ "error": "unknown sandbox tiktok account" }));
    }
    let grants = sb.withdraw_tiktok_scopes(&account_id, &request.scopes);
    tracing::info!(grants, "sandbox tiktok scopes withdrawn");
    json(StatusCode::OK, json!({ "grants": grants }))
}

/// Body of `POST /control/instagram/accounts/{user_id}/account-type`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct AccountTypeBody {
    account_type: String,
}

/// `POST /control/instagram/accounts/{user_id}/account-type` `{"account_type": ..}`.
async fn switch_account_type(
    State(sb): State<Arc<Sandbox>>,
    Path(account_id): Path<String>,
    bytes: Bytes,
) -> Response {
    let request: AccountTypeBody = match body(&bytes, false) {
        Ok(b) => b,
        Err(resp) => return *resp,
    };
    let Some(kind) = super::instagram::ACCOUNT_TYPES.into_iter().find(|k| *k == request.account_type) else {
        return bad_request("account_type must be BUSINESS, MEDIA_CREATOR or PERSONAL");
    };
    let switched = account_id.parse().is_ok_and(|id| sb.instagram_state().switch_account_type(id, kind));
    if !switched {
        return json(StatusCode::NOT_FOUND, json!({ "error": "unknown sandbox instagram account" }));
    }
    tracing::info!(account_type = kind, "sandbox instagram account type switched");
    json(StatusCode::OK, json!({ "account_type": kind }))
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct AdvanceBody {
    seconds: i64,
}

/// `POST /control/clock/advance` `{"seconds": n}`.
async fn advance_clock(State(sb): State<Arc<Sandbox>>, bytes: Bytes) -> Response {
    let request: AdvanceBody = match body(&bytes, false) {
        Ok(b) => b,
        Err(resp) => return *resp,
    };
    if request.seconds < 0 {
        return bad_request("seconds must not be negative: the clock only moves forward");
    }
    if request.seconds > crate::clock::MAX_OFFSET_MS / 1000 {
        return bad_request("seconds must be at most a hundred years (3153600000)");
    }
    sb.clock.advance(request.seconds);
    let now = sb.now();
    tracing::info!(seconds = request.seconds, "sandbox clock advanced");
    let rfc3339 = now.format(&time::format_description::well_known::Rfc3339).unwrap_or_default();
    json(StatusCode::OK, json!({ "now": rfc3339, "now_unix": now.unix_timestamp() }))
}
