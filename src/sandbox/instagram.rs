//! The simulated Instagram API with Instagram Login (providers.md §3): authorize page, code →
//! short-lived token, long-lived exchange, refresh of the long-lived token, and `/me`.

use std::collections::HashMap;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Path, RawQuery, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Map, Value, json};
use time::{Duration, OffsetDateTime};

use super::pages::{self, AccountChoice, ConsentPage};
use super::{
    Endpoint, ErrorState, ExchangeUserId, FailNext, FailureKind, INSTAGRAM_CLIENT_ID,
    INSTAGRAM_CLIENT_SECRET, MAX_CODES, MAX_TOKENS, MeShape, Params, PersonalAccount, RevokeReason, Sandbox,
    Scenario, Scripted, Stats, Tamper, TokenShape, TooEarly, found, json, proxy_html_error, prune,
    random_b64, split_scopes, url_with_query, with_retry_after,
};
use crate::crypto::constant_time_eq;
use crate::domain::Platform;

const PROVIDER: &str = "Instagram";
const SLUG: &str = "instagram";
/// How long an authorization code lives.
const CODE_LIFETIME: Duration = Duration::hours(1);
/// How long a short-lived token lives.
const SHORT_LIVED_SECS: i64 = 3_600;
/// How long a long-lived token lives (the documented `expires_in`, a little under 60 days).
const LONG_LIVED_SECS: i64 = 5_183_944;
/// The scope every grant includes.
const REQUIRED_SCOPE: &str = "instagram_business_basic";

/// The scopes the sandbox knows, with what the consent page says about them.
const SCOPES: [(&str, &str); 5] = [
    ("instagram_business_basic", "Access your profile and media"),
    ("instagram_business_content_publish", "Publish content"),
    ("instagram_business_manage_messages", "Manage and access messages"),
    ("instagram_business_manage_comments", "Manage and access comments"),
    ("instagram_business_manage_insights", "Access insights"),
];

/// The `/me` fields the sandbox knows.
const FIELDS: [&str; 9] = [
    "id",
    "user_id",
    "username",
    "name",
    "account_type",
    "profile_picture_url",
    "followers_count",
    "follows_count",
    "media_count",
];

/// A fake Instagram account.
#[derive(Debug, Clone, Copy)]
pub struct InstagramAccount {
    /// The professional-account id (`user_id`), above 2^53 like real ones.
    pub user_id: u64,
    /// The app-scoped id (`/me` `id`).
    pub app_scoped_id: &'static str,
    /// The handle.
    pub username: &'static str,
    /// The display name.
    pub name: &'static str,
    /// `BUSINESS`, `MEDIA_CREATOR` or `PERSONAL` (which authlink must refuse).
    pub account_type: &'static str,
    /// Follower count.
    pub followers: u64,
}

/// The fake accounts offered on the consent page; the first is the default. The user ids are
/// odd numbers above 2^53, which an `f64` cannot hold: a client that parses them as floats gets
/// them wrong.
pub const INSTAGRAM_ACCOUNTS: [InstagramAccount; 3] = [
    InstagramAccount {
        user_id: 17_841_400_000_000_001,
        app_scoped_id: "27640875392278831",
        username: "sandbox.business",
        name: "Sandbox Business",
        account_type: "BUSINESS",
        followers: 20_481,
    },
    InstagramAccount {
        user_id: 17_841_400_000_000_003,
        app_scoped_id: "27640875392278833",
        username: "sandbox.creator",
        name: "Sandbox Creator",
        account_type: "MEDIA_CREATOR",
        followers: 305_112,
    },
    InstagramAccount {
        user_id: 17_841_400_000_000_005,
        app_scoped_id: "27640875392278835",
        username: "sandbox.personal",
        name: "Sandbox Personal",
        account_type: "PERSONAL",
        followers: 87,
    },
];

fn account(user_id: u64) -> Option<&'static InstagramAccount> {
    INSTAGRAM_ACCOUNTS.iter().find(|a| a.user_id == user_id)
}

/// The simulated provider's state.
#[derive(Debug, Default)]
pub(super) struct InstagramState {
    pub(super) scenario: Scenario,
    pub(super) stats: Stats,
    codes: HashMap<String, Code>,
    tokens: HashMap<String, Token>,
    /// Accounts whose type was switched in the app since (the control API): user id to type.
    account_types: HashMap<u64, &'static str>,
}

/// The account types Instagram reports: the two professional ones, and personal.
pub(super) const ACCOUNT_TYPES: [&str; 3] = ["BUSINESS", "MEDIA_CREATOR", "PERSONAL"];

impl InstagramState {
    /// The type of the account `a` now.
    fn account_type(&self, a: &InstagramAccount) -> &'static str {
        self.account_types.get(&a.user_id).copied().unwrap_or(a.account_type)
    }

    /// Switches the account `user_id` to `kind` (one of [`ACCOUNT_TYPES`]), as its owner does in
    /// the Instagram app; its tokens live on. `false` for an unknown account.
    pub(super) fn switch_account_type(&mut self, user_id: u64, kind: &'static str) -> bool {
        if account(user_id).is_none() {
            return false;
        }
        self.account_types.insert(user_id, kind);
        true
    }
}

#[derive(Debug)]
struct Code {
    user_id: u64,
    scopes: Vec<String>,
    redirect_uri: String,
    expires_at: OffsetDateTime,
    used: bool,
}

#[derive(Debug)]
struct Token {
    user_id: u64,
    long_lived: bool,
    issued_at: OffsetDateTime,
    expires_at: OffsetDateTime,
    /// The Graph subcode once the account's tokens were killed (458 app removed, 460 password).
    revoked: Option<u16>,
}

impl InstagramState {
    fn issue(&mut self, user_id: u64, long_lived: bool, now: OffsetDateTime) -> (String, i64) {
        prune(&mut self.tokens, MAX_TOKENS, |t| t.expires_at <= now, |t| t.expires_at);
        let lifetime = if long_lived { LONG_LIVED_SECS } else { SHORT_LIVED_SECS };
        let token = format!("IGAA{}", random_b64::<48>());
        self.tokens.insert(
            token.clone(),
            Token {
                user_id,
                long_lived,
                issued_at: now,
                expires_at: now + Duration::seconds(lifetime),
                revoked: None,
            },
        );
        (token, lifetime)
    }

    /// The live token, or the Graph error for a dead one.
    fn check_token(&self, token: &str, now: OffsetDateTime) -> Result<&Token, Box<Response>> {
        let Some(t) = self.tokens.get(token) else {
            return Err(Box::new(graph_error(
                StatusCode::BAD_REQUEST,
                190,
                None,
                "Invalid OAuth access token - Cannot parse access token",
                false,
            )));
        };
        if let Some(sub) = t.revoked {
            let message = if sub == 460 {
                "Error validating access token: The session has been invalidated because the user changed \
                 their password or Facebook has changed the session for security reasons."
            } else {
                "Error validating access token: The user has not authorized application."
            };
            return Err(Box::new(graph_error(StatusCode::BAD_REQUEST, 190, Some(sub), message, false)));
        }
        if t.expires_at <= now {
            return Err(Box::new(graph_error(
                StatusCode::BAD_REQUEST,
                190,
                Some(463),
                "Error validating access token: Session has expired.",
                false,
            )));
        }
        Ok(t)
    }

    pub(super) fn revoke_account(
        &mut self,
        account_id: &str,
        reason: RevokeReason,
        now: OffsetDateTime,
    ) -> usize {
        let Ok(user_id) = account_id.parse::<u64>() else {
            return 0;
        };
        let sub = match reason {
            RevokeReason::AppRemoved => 458,
            RevokeReason::PasswordChanged => 460,
        };
        let mut killed = 0;
        for t in self.tokens.values_mut().filter(|t| t.user_id == user_id && t.revoked.is_none()) {
            if t.expires_at > now {
                killed += 1;
            }
            t.revoked = Some(sub);
        }
        killed
    }
}

/// A Graph error (§3.7).
fn graph_error(
    status: StatusCode,
    code: u32,
    subcode: Option<u16>,
    message: &str,
    transient: bool,
) -> Response {
    let mut err = json!({
        "message": message,
        "type": "OAuthException",
        "code": code,
        "fbtrace_id": format!("Sbx{}", random_b64::<9>()),
    });
    if let Some(s) = subcode {
        err["error_subcode"] = s.into();
    }
    if transient {
        err["is_transient"] = true.into();
    }
    json(status, json!({ "error": err }))
}

/// The code-exchange error shape (§3.3), 400 `OAuthException`: not the Graph shape.
fn exchange_error(message: &str) -> Response {
    exchange_error_with(StatusCode::BAD_REQUEST, "OAuthException", 400, message)
}

/// The code-exchange error shape with another status, type or code. Only the 400 `OAuthException`
/// is documented; the others keep its three fields, with the types Instagram's older API used for
/// rate limits and permissions.
fn exchange_error_with(status: StatusCode, error_type: &str, code: u32, message: &str) -> Response {
    json(status, json!({ "error_type": error_type, "code": code, "error_message": message }))
}

/// The validated authorize parameters.
struct AuthorizeParams {
    scopes: Vec<String>,
    redirect_uri: String,
    state: Option<String>,
}

/// Checks an authorize request (GET query or consent POST).
fn validate(sb: &Sandbox, p: &Params) -> Result<AuthorizeParams, (&'static str, String)> {
    if p.get("client_id") != Some(INSTAGRAM_CLIENT_ID) {
        return Err(("client_id", "Invalid platform app: the client_id is missing or unknown.".into()));
    }
    let redirect_uri = p.get("redirect_uri").unwrap_or_default();
    if redirect_uri != sb.instagram_redirect_uri {
        return Err((
            "redirect_uri",
            format!(
                "Invalid redirect_uri: it must exactly match a valid OAuth redirect URI of the app. The only \
                 registered one is {}.",
                sb.instagram_redirect_uri
            ),
        ));
    }
    if p.get("response_type") != Some("code") {
        return Err(("response_type", "response_type must be code.".into()));
    }
    let scopes = split_scopes(p.get("scope").unwrap_or_default());
    if let Some(unknown) = scopes.iter().find(|s| !SCOPES.iter().any(|(k, _)| k == s)) {
        return Err(("scope", format!("Invalid scope: {unknown}.")));
    }
    if !scopes.iter().any(|s| s == REQUIRED_SCOPE) {
        return Err(("scope", format!("The scope must include {REQUIRED_SCOPE}.")));
    }
    Ok(AuthorizeParams {
        scopes,
        redirect_uri: redirect_uri.to_string(),
        state: p.get("state").filter(|s| !s.is_empty()).map(str::to_string),
    })
}

/// `GET /instagram/oauth/authorize`: the consent page, or an error page naming the parameter.
pub(super) async fn authorize_page(State(sb): State<Arc<Sandbox>>, RawQuery(query): RawQuery) -> Response {
    let mut p = Params::from_query(query.as_deref());
    match scripted_failure(&sb, Endpoint::Authorize).await {
        Some(Scripted::Answer(resp)) => return resp,
        Some(Scripted::Tamper(t)) => t.apply(Platform::Instagram, &mut p),
        // (Refused for Instagram when scripted.)
        Some(Scripted::CallbackError(_) | Scripted::AnswerLate(_)) | None => {}
    }
    let deny_all = {
        let mut st = sb.instagram_state();
        st.stats.authorize_requests += 1;
        if let Some(c) = p.get("code_challenge") {
            st.stats.record_challenge(c);
        }
        st.scenario.deny_all
    };
    let req = match validate(&sb, &p) {
        Ok(req) => req,
        Err((param, message)) => {
            tracing::debug!(param, "sandbox instagram: authorize request refused");
            return pages::error_page(PROVIDER, SLUG, param, &message);
        }
    };
    let hidden = pages::hidden_fields(&p, &["client_id", "redirect_uri", "response_type", "scope", "state"]);
    let types: Vec<&str> = {
        let st = sb.instagram_state();
        INSTAGRAM_ACCOUNTS.iter().map(|a| st.account_type(a)).collect()
    };
    let accounts = INSTAGRAM_ACCOUNTS
        .iter()
        .zip(types)
        .map(|(a, account_type)| AccountChoice {
            value: a.user_id.to_string(),
            handle: format!("@{}", a.username),
            name: a.name.to_string(),
            note: match account_type {
                "BUSINESS" => "Business account".to_string(),
                "MEDIA_CREATOR" => "Creator account".to_string(),
                _ => "Personal account (not professional: apps should refuse it)".to_string(),
            },
            avatar: format!("{}/sandbox/avatars/ig-{}.svg", sb.public_base, a.username.replace('.', "-")),
        })
        .collect();
    let scopes = pages::scope_choices(&req.scopes, &SCOPES, REQUIRED_SCOPE);
    let page = ConsentPage {
        provider: PROVIDER,
        slug: SLUG,
        client_param: "client_id",
        client_id: INSTAGRAM_CLIENT_ID.to_string(),
        redirect_uri: req.redirect_uri,
        action: format!("{}/sandbox/instagram/oauth/authorize", sb.public_base),
        hidden,
        accounts,
        scopes,
        deny_all,
    };
    pages::render(StatusCode::OK, &page)
}

/// `POST /instagram/oauth/authorize`: the consent decision; redirects to the client.
pub(super) async fn authorize_decision(
    State(sb): State<Arc<Sandbox>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let p = match Params::from_body(&headers, &body, false) {
        Ok(p) => p,
        Err(e) => return pages::error_page(PROVIDER, SLUG, "body", &e),
    };
    let (deny_all, error_state, personal) = {
        let st = sb.instagram_state();
        (st.scenario.deny_all, st.scenario.error_state, st.scenario.personal_account)
    };
    let req = match validate(&sb, &p) {
        Ok(req) => req,
        Err((param, message)) => return pages::error_page(PROVIDER, SLUG, param, &message),
    };
    let allow = match p.get("decision") {
        Some("allow") => !deny_all,
        Some("deny") => false,
        _ => return pages::error_page(PROVIDER, SLUG, "decision", "decision must be allow or deny."),
    };
    let account = match p.get("account") {
        None => &INSTAGRAM_ACCOUNTS[0],
        Some(id) => match id.parse().ok().and_then(account) {
            Some(a) => a,
            None => return pages::error_page(PROVIDER, SLUG, "account", "Unknown sandbox account."),
        },
    };
    let state = req.state.as_deref();
    if !allow {
        let mut params = vec![
            ("error", "access_denied"),
            ("error_reason", "user_denied"),
            ("error_description", "The user denied your request."),
        ];
        if let Some(s) = state.filter(|_| error_state == ErrorState::Echo) {
            params.push(("state", s));
        }
        tracing::debug!("sandbox instagram: consent denied");
        return found(&url_with_query(&req.redirect_uri, &params, None));
    }
    // Instagram Login serves professional accounts only; whether a personal one is refused at
    // login, and how, is unconfirmed (§3.10): here, on Instagram's own page, with no way back.
    if personal == PersonalAccount::RefuseLogin && sb.instagram_state().account_type(account) == "PERSONAL" {
        tracing::debug!("sandbox instagram: login of a personal account refused");
        return pages::error_page(
            PROVIDER,
            SLUG,
            "account",
            "This is a personal account. Apps that use Instagram Login work with professional accounts only: \
             switch it to a Business or Creator account in the Instagram app, then try again.",
        );
    }
    let ticked: Vec<String> = p.all("granted").flat_map(split_scopes).collect();
    let any_ticked = p.all("granted").next().is_some();
    let granted: Vec<String> = req
        .scopes
        .iter()
        .filter(|s| !any_ticked || *s == REQUIRED_SCOPE || ticked.contains(s))
        .cloned()
        .collect();
    let code = format!("AQ{}", random_b64::<96>());
    let now = sb.now();
    {
        let mut st = sb.instagram_state();
        prune(&mut st.codes, MAX_CODES, |c| c.expires_at <= now, |c| c.expires_at);
        st.codes.insert(
            code.clone(),
            Code {
                user_id: account.user_id,
                scopes: granted,
                redirect_uri: req.redirect_uri.clone(),
                expires_at: now + CODE_LIFETIME,
                used: false,
            },
        );
    }
    tracing::debug!("sandbox instagram: consent given, code issued");
    let mut params = vec![("code", code.as_str())];
    if let Some(s) = state {
        params.push(("state", s));
    }
    // Instagram appends `#_` to the redirect.
    found(&url_with_query(&req.redirect_uri, &params, Some("_")))
}

/// Counts a call, then applies the next scripted failure for `endpoint`, if any.
async fn scripted_failure(sb: &Sandbox, endpoint: Endpoint) -> Option<Scripted> {
    let (failure, retry_after, slow_ms) = {
        let mut st = sb.instagram_state();
        match endpoint {
            Endpoint::Token => st.stats.token_calls += 1,
            Endpoint::Refresh => st.stats.refresh_calls += 1,
            Endpoint::Profile => st.stats.profile_calls += 1,
            Endpoint::ExchangeLongLived => st.stats.exchange_long_lived_calls += 1,
            Endpoint::Revoke => st.stats.revoke_calls += 1,
            // Counted by the page itself, with every other authorize request.
            Endpoint::Authorize => {}
        }
        let f = st.scenario.take_failure(endpoint)?;
        (f, st.scenario.retry_after_secs, st.scenario.slow_ms)
    };
    tracing::debug!(?endpoint, kind = ?failure.kind, "sandbox instagram: scripted failure");
    if let Some(tamper) = Tamper::of(&failure) {
        return Some(Scripted::Tamper(tamper));
    }
    let resp = match failure.kind {
        FailureKind::Slow => {
            tokio::time::sleep(std::time::Duration::from_millis(slow_ms)).await;
            return None;
        }
        FailureKind::Hold => {
            sb.hold(Platform::Instagram, std::time::Duration::from_millis(slow_ms)).await;
            return None;
        }
        // The code exchange has its own error shape (§3.3), whatever the failure.
        _ if endpoint == Endpoint::Token => exchange_failure(sb, failure.kind, failure.status, retry_after),
        _ => graph_failure(sb, &failure, retry_after),
    };
    Some(Scripted::Answer(resp))
}

/// A scripted failure of the code exchange, in its `{error_type, code, error_message}` shape.
fn exchange_failure(sb: &Sandbox, kind: FailureKind, status: Option<u16>, retry_after: u64) -> Response {
    match kind {
        // (`slow` never gets here: it answers normally after its delay; nor do the request
        // faults, which the endpoint's own checks answer.)
        FailureKind::HtmlError
        | FailureKind::Slow
        | FailureKind::Hold
        | FailureKind::SlowAnswer
        | FailureKind::InvalidClient
        | FailureKind::RedirectUriMismatch
        | FailureKind::PkceMismatch
        | FailureKind::RequestError
        | FailureKind::CallbackError => proxy_html_error(status),
        FailureKind::RateLimit => with_retry_after(
            exchange_error_with(
                StatusCode::TOO_MANY_REQUESTS,
                "OAuthRateLimitException",
                429,
                "The maximum number of requests per hour has been exceeded.",
            ),
            retry_after,
        ),
        FailureKind::GraphRateLimit => exchange_error_with(
            StatusCode::BAD_REQUEST,
            "OAuthRateLimitException",
            4,
            "Application request limit reached",
        ),
        FailureKind::ServerError => exchange_error_with(
            StatusCode::INTERNAL_SERVER_ERROR,
            "OAuthException",
            500,
            "An unexpected error has occurred. Please retry your request later.",
        ),
        FailureKind::TemporarilyUnavailable => exchange_error_with(
            StatusCode::SERVICE_UNAVAILABLE,
            "OAuthException",
            503,
            "Service temporarily unavailable",
        ),
        FailureKind::ScopeNotAuthorized | FailureKind::ScopePermissionMissed => exchange_error_with(
            StatusCode::BAD_REQUEST,
            "OAuthPermissionsException",
            400,
            "This request requires a permission that was not granted to the app.",
        ),
        FailureKind::InvalidGrant | FailureKind::BadCode | FailureKind::AccessTokenInvalid => {
            sb.instagram_state().stats.invalid_grant += 1;
            exchange_error("Matching code was not found or was already used")
        }
    }
}

/// A scripted failure of a Graph endpoint, in the Graph error shape (§3.7).
fn graph_failure(sb: &Sandbox, failure: &FailNext, retry_after: u64) -> Response {
    let status = failure.status;
    match failure.kind {
        // (`slow` never gets here: it answers normally after its delay; nor do the request
        // faults, which only the code exchange and the authorize page take.)
        FailureKind::HtmlError
        | FailureKind::Slow
        | FailureKind::Hold
        | FailureKind::SlowAnswer
        | FailureKind::InvalidClient
        | FailureKind::RedirectUriMismatch
        | FailureKind::PkceMismatch
        | FailureKind::RequestError
        | FailureKind::CallbackError => proxy_html_error(status),
        // §3.10: "the sandbox should also offer plain 429": the status and `Retry-After` alone,
        // no Graph error (the Graph-coded limits are `graph_rate_limit`).
        FailureKind::RateLimit => with_retry_after(
            (
                StatusCode::TOO_MANY_REQUESTS,
                [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
                "Too Many Requests",
            )
                .into_response(),
            retry_after,
        ),
        // §3.10: 400 or 403 with code 4 (application), 17 (user), 32 (page) or 613 (a call
        // limit), without `Retry-After`.
        FailureKind::GraphRateLimit => {
            let status = status.and_then(|s| StatusCode::from_u16(s).ok()).unwrap_or(StatusCode::BAD_REQUEST);
            let (code, message) = match failure.code.unwrap_or(4) {
                17 => (17, "User request limit reached"),
                32 => (32, "Page request limit reached"),
                613 => (613, "Calls to this api have exceeded the rate limit."),
                _ => (4, "Application request limit reached"),
            };
            graph_error(status, code, None, message, false)
        }
        // §3.7: codes 1 and 2 are transient; only 2 is sent with `is_transient` here, so that
        // an adapter must know the codes themselves.
        FailureKind::ServerError => {
            let status = status
                .and_then(|s| StatusCode::from_u16(s).ok())
                .unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
            match failure.code.unwrap_or(2) {
                1 => graph_error(status, 1, None, "An unknown error occurred", false),
                _ => graph_error(
                    status,
                    2,
                    None,
                    "An unexpected error has occurred. Please retry your request later.",
                    true,
                ),
            }
        }
        FailureKind::TemporarilyUnavailable => {
            graph_error(StatusCode::SERVICE_UNAVAILABLE, 2, None, "Service temporarily unavailable", true)
        }
        FailureKind::ScopeNotAuthorized => graph_error(
            StatusCode::BAD_REQUEST,
            10,
            None,
            "Application does not have permission for this action",
            false,
        ),
        FailureKind::ScopePermissionMissed => {
            graph_error(StatusCode::BAD_REQUEST, 200, None, "Permissions error", false)
        }
        FailureKind::AccessTokenInvalid => {
            sb.instagram_state().stats.invalid_grant += 1;
            graph_error(
                StatusCode::BAD_REQUEST,
                190,
                None,
                "Invalid OAuth access token - Cannot parse access token",
                false,
            )
        }
        FailureKind::InvalidGrant | FailureKind::BadCode => {
            sb.instagram_state().stats.invalid_grant += 1;
            graph_error(
                StatusCode::BAD_REQUEST,
                190,
                Some(463),
                "Error validating access token: Session has expired.",
                false,
            )
        }
    }
}

/// `POST /instagram/oauth/access_token`: code → short-lived token.
pub(super) async fn access_token(
    State(sb): State<Arc<Sandbox>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let tamper = match scripted_failure(&sb, Endpoint::Token).await {
        Some(Scripted::Answer(resp)) => return resp,
        Some(Scripted::Tamper(t)) => Some(t),
        // (`callback_error` and `slow_answer` are refused for Instagram when scripted.)
        Some(Scripted::CallbackError(_) | Scripted::AnswerLate(_)) | None => None,
    };
    let now = sb.now();
    let mut p = match Params::from_body(&headers, &body, true) {
        Ok(p) => p,
        Err(e) => return exchange_error(&format!("Invalid request: {e}")),
    };
    if let Some(t) = tamper {
        t.apply(Platform::Instagram, &mut p);
    }
    if p.get("client_id") != Some(INSTAGRAM_CLIENT_ID) {
        return exchange_error("Invalid platform app");
    }
    if !constant_time_eq(
        p.get("client_secret").unwrap_or_default().as_bytes(),
        INSTAGRAM_CLIENT_SECRET.as_bytes(),
    ) {
        return exchange_error("Error validating client secret.");
    }
    if p.get("grant_type") != Some("authorization_code") {
        return exchange_error("Invalid grant_type: only authorization_code is supported");
    }
    let code = p.get("code").unwrap_or_default();
    let mut st = sb.instagram_state();
    let usable = st.codes.get(code).is_some_and(|c| !c.used && c.expires_at > now);
    let Some(c) = st.codes.get_mut(code).filter(|_| usable) else {
        st.stats.invalid_grant += 1;
        tracing::debug!("sandbox instagram: code refused");
        return exchange_error("Matching code was not found or was already used");
    };
    c.used = true;
    if p.get("redirect_uri") != Some(c.redirect_uri.as_str()) {
        return exchange_error(
            "Error validating verification code. Please make sure your redirect_uri is identical to the one \
             you used in the OAuth dialog request",
        );
    }
    let user_id = c.user_id;
    let scopes = c.scopes.clone();
    let (token, _) = st.issue(user_id, false, now);
    let shape = st.scenario.token_shape;
    // Which id the answer names is unconfirmed (§3.6): the professional one, or the app-scoped
    // one (a number above 2^53 too, as the doc's example).
    let answered: u64 = match st.scenario.exchange_user_id {
        ExchangeUserId::Professional => user_id,
        ExchangeUserId::AppScoped => {
            account(user_id).and_then(|a| a.app_scoped_id.parse().ok()).unwrap_or(user_id)
        }
    };
    drop(st);
    tracing::debug!("sandbox instagram: code exchanged for a short-lived token");
    let body = match shape {
        TokenShape::Flat => json!({ "access_token": token, "user_id": answered, "permissions": scopes }),
        TokenShape::Wrapped => json!({ "data": [{
            "access_token": token,
            "user_id": answered.to_string(),
            "permissions": scopes.join(","),
        }] }),
    };
    json(StatusCode::OK, body)
}

/// `GET /instagram/graph/access_token?grant_type=ig_exchange_token&client_secret&access_token`.
pub(super) async fn exchange_long_lived(
    State(sb): State<Arc<Sandbox>>,
    RawQuery(query): RawQuery,
) -> Response {
    if let Some(Scripted::Answer(resp)) = scripted_failure(&sb, Endpoint::ExchangeLongLived).await {
        return resp;
    }
    let now = sb.now();
    let p = Params::from_query(query.as_deref());
    if p.get("grant_type") != Some("ig_exchange_token") {
        return graph_error(
            StatusCode::BAD_REQUEST,
            100,
            None,
            "Unsupported grant_type: expected ig_exchange_token",
            false,
        );
    }
    if !constant_time_eq(
        p.get("client_secret").unwrap_or_default().as_bytes(),
        INSTAGRAM_CLIENT_SECRET.as_bytes(),
    ) {
        return graph_error(StatusCode::BAD_REQUEST, 101, None, "Error validating client secret.", false);
    }
    let mut st = sb.instagram_state();
    let user_id = match st.check_token(p.get("access_token").unwrap_or_default(), now) {
        Ok(t) if t.long_lived => {
            return graph_error(
                StatusCode::BAD_REQUEST,
                100,
                None,
                "The access token is already long-lived; only short-lived tokens can be exchanged",
                false,
            );
        }
        Ok(t) => t.user_id,
        Err(resp) => {
            st.stats.invalid_grant += 1;
            return *resp;
        }
    };
    let (token, lifetime) = st.issue(user_id, true, now);
    drop(st);
    tracing::debug!("sandbox instagram: long-lived token issued");
    json(StatusCode::OK, json!({ "access_token": token, "token_type": "bearer", "expires_in": lifetime }))
}

/// `GET /instagram/graph/refresh_access_token?grant_type=ig_refresh_token&access_token`.
pub(super) async fn refresh(State(sb): State<Arc<Sandbox>>, RawQuery(query): RawQuery) -> Response {
    if let Some(Scripted::Answer(resp)) = scripted_failure(&sb, Endpoint::Refresh).await {
        return resp;
    }
    let now = sb.now();
    let p = Params::from_query(query.as_deref());
    if p.get("grant_type") != Some("ig_refresh_token") {
        return graph_error(
            StatusCode::BAD_REQUEST,
            100,
            None,
            "Unsupported grant_type: expected ig_refresh_token",
            false,
        );
    }
    let mut st = sb.instagram_state();
    let user_id = match st.check_token(p.get("access_token").unwrap_or_default(), now) {
        Ok(t) if !t.long_lived => {
            return graph_error(
                StatusCode::BAD_REQUEST,
                100,
                None,
                "Only long-lived access tokens can be refreshed",
                false,
            );
        }
        // Too early: the token stays valid whatever the answer says (which is unconfirmed, so
        // it is a switch: a request error by default, or code 190).
        Ok(t) if now - t.issued_at < min_refresh_age(&st.scenario) => {
            return match st.scenario.refresh_too_early {
                TooEarly::Code100 => graph_error(
                    StatusCode::BAD_REQUEST,
                    100,
                    None,
                    "The access token cannot be refreshed yet: it must be at least 24 hours old",
                    false,
                ),
                TooEarly::Code190 => graph_error(
                    StatusCode::BAD_REQUEST,
                    190,
                    None,
                    "Error validating access token: the access token is too new to be refreshed",
                    false,
                ),
            };
        }
        Ok(t) => t.user_id,
        Err(resp) => {
            st.stats.invalid_grant += 1;
            return *resp;
        }
    };
    // The old token stays valid until its own expiry.
    let (token, lifetime) = st.issue(user_id, true, now);
    drop(st);
    tracing::debug!("sandbox instagram: long-lived token refreshed");
    json(StatusCode::OK, json!({ "access_token": token, "token_type": "bearer", "expires_in": lifetime }))
}

/// The youngest a long-lived token may be to be refreshed.
fn min_refresh_age(scenario: &Scenario) -> Duration {
    Duration::seconds(i64::try_from(scenario.refresh_min_age_secs).unwrap_or(i64::MAX))
}

/// `GET /instagram/graph/{version}/me?fields=...`, token as `access_token=` or Bearer.
pub(super) async fn me(
    State(sb): State<Arc<Sandbox>>,
    Path(version): Path<String>,
    headers: HeaderMap,
    RawQuery(query): RawQuery,
) -> Response {
    if let Some(Scripted::Answer(resp)) = scripted_failure(&sb, Endpoint::Profile).await {
        return resp;
    }
    let now = sb.now();
    let valid_version = version.strip_prefix('v').is_some_and(|v| {
        !v.is_empty() && v.split('.').all(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
    });
    if !valid_version {
        return graph_error(
            StatusCode::BAD_REQUEST,
            2500,
            None,
            "Unknown path components: unknown API version",
            false,
        );
    }
    let p = Params::from_query(query.as_deref());
    let bearer = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map(|(_, t)| t.trim().to_string());
    let token = p.get("access_token").map(str::to_string).or(bearer).unwrap_or_default();
    let (user_id, account_type) = {
        let mut st = sb.instagram_state();
        match st.check_token(&token, now) {
            Ok(t) => {
                let user_id = t.user_id;
                (user_id, account(user_id).map(|a| st.account_type(a)))
            }
            Err(resp) => {
                st.stats.invalid_grant += 1;
                tracing::debug!("sandbox instagram: /me with a dead token");
                return *resp;
            }
        }
    };
    let (Some(a), Some(account_type)) = (account(user_id), account_type) else {
        return graph_error(
            StatusCode::INTERNAL_SERVER_ERROR,
            1,
            None,
            "An unknown error has occurred.",
            true,
        );
    };
    let fields = split_scopes(p.get("fields").unwrap_or("id"));
    let mut me = Map::new();
    me.insert("id".into(), a.app_scoped_id.into());
    for field in &fields {
        if !FIELDS.contains(&field.as_str()) {
            return graph_error(
                StatusCode::BAD_REQUEST,
                100,
                None,
                &format!("Tried accessing nonexisting field ({field}) on node type (User)"),
                false,
            );
        }
        let value: Value = match field.as_str() {
            "id" => a.app_scoped_id.into(),
            // Graph returns ids as strings.
            "user_id" => a.user_id.to_string().into(),
            "username" => a.username.into(),
            "name" => a.name.into(),
            "account_type" => account_type.into(),
            "profile_picture_url" => {
                format!("{}/sandbox/avatars/ig-{}.svg", sb.public_base, a.username.replace('.', "-")).into()
            }
            "followers_count" => a.followers.into(),
            "follows_count" => 314.into(),
            _ => 27.into(),
        };
        me.insert(field.clone(), value);
    }
    let body = match sb.instagram_state().scenario.me_shape {
        MeShape::Flat => Value::Object(me),
        MeShape::Wrapped => json!({ "data": [Value::Object(me)] }),
    };
    json(StatusCode::OK, body)
}
