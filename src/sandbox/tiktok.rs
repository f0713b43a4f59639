//! The simulated TikTok Login Kit for Web (providers.md §2): authorize page, token endpoint
//! (code and rotating refresh grants), user info and revoke.

use std::collections::HashMap;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{RawQuery, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::Response;
use serde_json::{Map, Value, json};
use time::{Duration, OffsetDateTime};

use super::pages::{self, AccountChoice, ConsentPage};
use super::{
    ApiErrorShape, Endpoint, ErrorState, FailNext, FailureKind, Lifetimes, MAX_CODES, MAX_TOKENS,
    OauthErrorStatus, Params, RefreshRotation, Sandbox, Scenario, Scripted, Stats, TIKTOK_CLIENT_KEY,
    TIKTOK_CLIENT_SECRET, Tamper, found, json, log_id, proxy_html_error, prune, random_b64, split_commas,
    split_scopes, url_with_query, with_retry_after,
};
use crate::crypto::constant_time_eq;
use crate::domain::Platform;

const PROVIDER: &str = "TikTok";
const SLUG: &str = "tiktok";
/// How long an authorization code lives.
const CODE_LIFETIME: Duration = Duration::minutes(10);
/// The scope every grant includes.
const REQUIRED_SCOPE: &str = "user.info.basic";

/// The scopes the sandbox knows, with what the consent page says about them.
const SCOPES: [(&str, &str); 6] = [
    ("user.info.basic", "Read your profile info (avatar, display name)"),
    ("user.info.profile", "Read your profile details (username, bio, verified status)"),
    ("user.info.stats", "Read your stats (likes, followers, following, videos)"),
    ("video.list", "Read your public videos"),
    ("video.upload", "Upload videos to your drafts"),
    ("video.publish", "Post videos to your account"),
];

/// The user-info fields and the scope each needs (§2.7).
const FIELDS: [(&str, &str); 14] = [
    ("open_id", "user.info.basic"),
    ("union_id", "user.info.basic"),
    ("avatar_url", "user.info.basic"),
    ("avatar_url_100", "user.info.basic"),
    ("avatar_large_url", "user.info.basic"),
    ("display_name", "user.info.basic"),
    ("bio_description", "user.info.profile"),
    ("profile_deep_link", "user.info.profile"),
    ("is_verified", "user.info.profile"),
    ("username", "user.info.profile"),
    ("follower_count", "user.info.stats"),
    ("following_count", "user.info.stats"),
    ("likes_count", "user.info.stats"),
    ("video_count", "user.info.stats"),
];

/// A fake TikTok account.
#[derive(Debug, Clone, Copy)]
pub struct TikTokAccount {
    /// The stable `open_id`.
    pub open_id: &'static str,
    /// The `union_id`.
    pub union_id: &'static str,
    /// The handle, without `@`.
    pub username: &'static str,
    /// The display name.
    pub display_name: &'static str,
    /// Follower count (for `user.info.stats`).
    pub followers: u64,
}

/// The fake accounts offered on the consent page; the first is the default.
pub const TIKTOK_ACCOUNTS: [TikTokAccount; 3] = [
    TikTokAccount {
        open_id: "sbx-oid-creator-0001",
        union_id: "sbx-uid-creator-0001",
        username: "sandbox.creator",
        display_name: "Sandbox Creator",
        followers: 48_213,
    },
    TikTokAccount {
        open_id: "sbx-oid-brand-0002",
        union_id: "sbx-uid-brand-0002",
        username: "sandbox.brand",
        display_name: "Sandbox Brand Studio",
        followers: 1_204_577,
    },
    TikTokAccount {
        open_id: "sbx-oid-newbie-0003",
        union_id: "sbx-uid-newbie-0003",
        username: "sandbox.newbie",
        display_name: "Sandbox Newbie",
        followers: 12,
    },
];

/// Why `scope` cannot be withdrawn from a grant, if it cannot: it is unknown, or it is the
/// scope every grant holds.
pub(super) fn unwithdrawable(scope: &str) -> Option<String> {
    if scope == REQUIRED_SCOPE {
        Some(format!("{REQUIRED_SCOPE} cannot be withdrawn: every grant holds it"))
    } else if !SCOPES.iter().any(|(k, _)| *k == scope) {
        Some(format!("unknown TikTok scope `{scope}`"))
    } else {
        None
    }
}

/// One of the accounts the consent page offers.
fn account(open_id: &str) -> Option<&'static TikTokAccount> {
    TIKTOK_ACCOUNTS.iter().find(|a| a.open_id == open_id)
}

/// The profile of an account the sandbox knows: one of [`TIKTOK_ACCOUNTS`], or a synthetic one
/// for the grants minted in bulk by the control API (`sbx-oid-bulk-<n>`), so that their health
/// checks and profile calls work like any other's.
fn profile(open_id: &str) -> Option<Profile> {
    if let Some(a) = account(open_id) {
        return Some(Profile {
            open_id: a.open_id.into(),
            union_id: a.union_id.into(),
            username: a.username.into(),
            display_name: a.display_name.into(),
            followers: a.followers,
        });
    }
    let n: u64 = open_id.strip_prefix("sbx-oid-bulk-")?.parse().ok()?;
    Some(Profile {
        open_id: open_id.into(),
        union_id: format!("sbx-uid-bulk-{n}"),
        username: format!("sandbox.bulk.{n}"),
        display_name: format!("Sandbox Bulk {n}"),
        followers: n % 10_000,
    })
}

/// What the user-info endpoint tells of an account.
#[derive(Debug, Clone)]
struct Profile {
    open_id: String,
    union_id: String,
    username: String,
    display_name: String,
    followers: u64,
}

/// The simulated provider's state.
#[derive(Debug, Default)]
pub(super) struct TikTokState {
    pub(super) scenario: Scenario,
    pub(super) stats: Stats,
    /// When the user-info requests of the last minute came (ms), for its rate limit.
    user_info_window: std::collections::VecDeque<i64>,
    codes: HashMap<String, Code>,
    grants: HashMap<u64, Grant>,
    next_grant: u64,
    access_tokens: HashMap<String, AccessToken>,
    refresh_tokens: HashMap<String, RefreshToken>,
}

#[derive(Debug)]
struct Code {
    open_id: String,
    scopes: Vec<String>,
    /// The scopes the app asked for (the granted ones and those the user switched off).
    requested: Vec<String>,
    redirect_uri: String,
    challenge: Option<String>,
    expires_at: OffsetDateTime,
    used: bool,
}

/// One authorization: the tokens it produced share its fate.
#[derive(Debug)]
struct Grant {
    open_id: String,
    scopes: Vec<String>,
    /// The scopes the app asked for: a field of another scope is the app's mistake
    /// (`scope_permission_missed`), one of these the user's choice (`scope_not_authorized`).
    requested: Vec<String>,
    revoked: bool,
}

#[derive(Debug)]
struct AccessToken {
    grant: u64,
    expires_at: OffsetDateTime,
    /// Killed alone (the grant and its refresh token live on).
    revoked: bool,
}

#[derive(Debug)]
struct RefreshToken {
    grant: u64,
    expires_at: OffsetDateTime,
    /// Rotated out by a refresh: dead, and its reuse is counted.
    rotated: bool,
}

/// A freshly issued token pair.
struct Issued {
    access_token: String,
    access_lifetime: i64,
    /// The refresh token and its lifetime in seconds, when the answer carries one.
    refresh: Option<(String, i64)>,
}

impl TikTokState {
    fn lifetimes(&self) -> (i64, i64) {
        match self.scenario.lifetimes {
            Lifetimes::Long => (86_400, 31_536_000),
            Lifetimes::Short => (7_200, 15_552_000),
        }
    }

    fn issue(&mut self, grant: u64, now: OffsetDateTime) -> Issued {
        let (_, refresh_lifetime) = self.lifetimes();
        prune(&mut self.refresh_tokens, MAX_TOKENS, |t| t.expires_at <= now, |t| t.expires_at);
        let mut issued = self.issue_access(grant, now);
        let refresh_token = format!("rft.{}", random_b64::<32>());
        self.refresh_tokens.insert(
            refresh_token.clone(),
            RefreshToken { grant, expires_at: now + Duration::seconds(refresh_lifetime), rotated: false },
        );
        issued.refresh = Some((refresh_token, refresh_lifetime));
        issued
    }

    /// A new access token of `grant`, and no refresh token.
    fn issue_access(&mut self, grant: u64, now: OffsetDateTime) -> Issued {
        let (access_lifetime, _) = self.lifetimes();
        prune(&mut self.access_tokens, MAX_TOKENS, |t| t.expires_at <= now, |t| t.expires_at);
        let access_token = format!("act.{}", random_b64::<32>());
        self.access_tokens.insert(
            access_token.clone(),
            AccessToken { grant, expires_at: now + Duration::seconds(access_lifetime), revoked: false },
        );
        Issued { access_token, access_lifetime, refresh: None }
    }

    /// The grant behind a live access token.
    fn live_grant(&self, access_token: &str, now: OffsetDateTime) -> Option<&Grant> {
        let t = self.access_tokens.get(access_token)?;
        let g = self.grants.get(&t.grant)?;
        (t.expires_at > now && !t.revoked && !g.revoked).then_some(g)
    }

    /// Kills the live access tokens of `open_id`'s grants, leaving the grants and their refresh
    /// tokens alive. Returns how many died.
    pub(super) fn revoke_access_tokens(&mut self, open_id: &str, now: OffsetDateTime) -> usize {
        let grants: Vec<u64> = self
            .grants
            .iter()
            .filter(|(_, g)| g.open_id == open_id && !g.revoked)
            .map(|(id, _)| *id)
            .collect();
        let mut killed = 0;
        for t in self.access_tokens.values_mut() {
            if grants.contains(&t.grant) && !t.revoked && t.expires_at > now {
                t.revoked = true;
                killed += 1;
            }
        }
        killed
    }

    /// Takes `scopes` away from `open_id`'s live grants, as a user unticking permissions in the
    /// app's settings does: the grants, their tokens and their other scopes live on, and the next
    /// refresh reports the smaller `scope`. Returns how many grants changed.
    pub(super) fn withdraw_scopes(&mut self, open_id: &str, scopes: &[String]) -> usize {
        let mut changed = 0;
        for g in self.grants.values_mut().filter(|g| g.open_id == open_id && !g.revoked) {
            let before = g.scopes.len();
            g.scopes.retain(|s| !scopes.contains(s));
            if g.scopes.len() != before {
                changed += 1;
            }
        }
        changed
    }

    /// Issues `count` grants for synthetic accounts (`sbx-oid-bulk-<n>`) without a consent
    /// flow, for load and concurrency tests: as if that many users had authorised the app.
    pub(super) fn mint_grants(
        &mut self,
        count: usize,
        scopes: &[String],
        now: OffsetDateTime,
    ) -> Vec<serde_json::Value> {
        let mut out = Vec::with_capacity(count);
        for _ in 0..count {
            let grant = self.next_grant;
            self.next_grant += 1;
            let open_id = format!("sbx-oid-bulk-{grant}");
            self.grants.insert(
                grant,
                Grant {
                    open_id: open_id.clone(),
                    scopes: scopes.to_vec(),
                    requested: scopes.to_vec(),
                    revoked: false,
                },
            );
            let issued = self.issue(grant, now);
            let (refresh_token, refresh_lifetime) = issued.refresh.unwrap_or_default();
            out.push(serde_json::json!({
                "open_id": open_id,
                "access_token": issued.access_token,
                "refresh_token": refresh_token,
                "expires_in": issued.access_lifetime,
                "refresh_expires_in": refresh_lifetime,
                "scope": scopes.join(","),
            }));
        }
        out
    }

    /// SHA-256 (hex) of every refresh token that still works: the provider's view of which
    /// refresh token each grant holds, to compare with what the client stored.
    pub(super) fn live_refresh_token_hashes(&self, now: OffsetDateTime) -> Vec<String> {
        self.refresh_tokens
            .iter()
            .filter(|(_, t)| {
                !t.rotated && t.expires_at > now && self.grants.get(&t.grant).is_some_and(|g| !g.revoked)
            })
            .map(|(token, _)| crate::crypto::sha256_hex(token.as_bytes()))
            .collect()
    }

    pub(super) fn revoke_account(&mut self, open_id: &str, now: OffsetDateTime) -> usize {
        let mut killed = 0;
        let grants: Vec<u64> = self
            .grants
            .iter()
            .filter(|(_, g)| g.open_id == open_id && !g.revoked)
            .map(|(id, _)| *id)
            .collect();
        for id in grants {
            killed += self.access_tokens.values().filter(|t| t.grant == id && t.expires_at > now).count();
            killed += self
                .refresh_tokens
                .values()
                .filter(|t| t.grant == id && !t.rotated && t.expires_at > now)
                .count();
            if let Some(g) = self.grants.get_mut(&id) {
                g.revoked = true;
            }
        }
        killed
    }
}

/// The validated authorize parameters.
struct AuthorizeParams {
    scopes: Vec<String>,
    redirect_uri: String,
    state: Option<String>,
    challenge: Option<String>,
}

/// Checks an authorize request (GET query or consent POST): `Err((param, message))` names the
/// offending parameter.
fn validate(
    sb: &Sandbox,
    p: &Params,
    pkce_optional: bool,
) -> Result<AuthorizeParams, (&'static str, String)> {
    if p.get("client_key") != Some(TIKTOK_CLIENT_KEY) {
        return Err(("client_key", "The client_key is missing or does not belong to any app.".into()));
    }
    let redirect_uri = p.get("redirect_uri").unwrap_or_default();
    if redirect_uri != sb.tiktok_redirect_uri {
        return Err((
            "redirect_uri",
            format!(
                "The redirect_uri is missing or is not registered for this app. The only registered \
                 redirect URI is {}.",
                sb.tiktok_redirect_uri
            ),
        ));
    }
    if p.get("response_type") != Some("code") {
        return Err(("response_type", "response_type must be code.".into()));
    }
    let scopes = split_commas(p.get("scope").unwrap_or_default());
    if scopes.is_empty() {
        return Err(("scope", "At least one scope is required.".into()));
    }
    if let Some(unknown) = scopes.iter().find(|s| !SCOPES.iter().any(|(k, _)| k == s)) {
        return Err(("scope", format!("The scope {unknown} is not known or not approved for this app.")));
    }
    let challenge = p.get("code_challenge").filter(|c| !c.is_empty());
    match challenge {
        None if pkce_optional => {}
        None => return Err(("code_challenge", "code_challenge is required.".into())),
        Some(c) if c.len() == 64 && c.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)) => {}
        // A base64url S256 challenge (the RFC 7636 form) is taken here and fails at the token
        // endpoint, where it cannot match TikTok's hex form of the verifier (§2.9).
        Some(c)
            if c.len() == 43 && c.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_') => {}
        Some(_) => {
            return Err((
                "code_challenge",
                "Code verifier or code challenge is invalid. The code_challenge must be the lowercase hex \
                 SHA-256 of the verifier (64 characters)."
                    .into(),
            ));
        }
    }
    if challenge.is_some() && p.get("code_challenge_method") != Some("S256") {
        return Err(("code_challenge_method", "code_challenge_method must be S256.".into()));
    }
    Ok(AuthorizeParams {
        scopes,
        redirect_uri: redirect_uri.to_string(),
        state: p.get("state").map(str::to_string),
        challenge: challenge.map(str::to_string),
    })
}

/// `GET /tiktok/v2/auth/authorize/`: the consent page, or an error page naming the parameter.
pub(super) async fn authorize_page(State(sb): State<Arc<Sandbox>>, RawQuery(query): RawQuery) -> Response {
    let mut p = Params::from_query(query.as_deref());
    let mut callback_error = None;
    match scripted_failure(&sb, Endpoint::Authorize).await {
        Some(Scripted::Answer(resp)) => return resp,
        Some(Scripted::Tamper(t)) => t.apply(Platform::Tiktok, &mut p),
        Some(Scripted::CallbackError(error)) => callback_error = Some(error),
        // (Refused on the authorize page when scripted.)
        Some(Scripted::AnswerLate(_)) | None => {}
    }
    let (pkce_optional, deny_all, error_state) = {
        let mut st = sb.tiktok_state();
        st.stats.authorize_requests += 1;
        if let Some(c) = p.get("code_challenge") {
            st.stats.record_challenge(c);
        }
        (st.scenario.pkce_optional, st.scenario.deny_all, st.scenario.error_state)
    };
    let req = match validate(&sb, &p, pkce_optional) {
        Ok(req) => req,
        Err((param, message)) => {
            tracing::debug!(param, "sandbox tiktok: authorize request refused");
            return pages::error_page(PROVIDER, SLUG, param, &message);
        }
    };
    // A scripted callback error: back to the (checked) redirect URI at once, as TikTok answers
    // a request it cannot serve, with no consent screen.
    if let Some(error) = callback_error {
        let description = format!("The authorization request failed: {error}.");
        let mut params = vec![("error", error.as_str()), ("error_description", description.as_str())];
        if let Some(s) = req.state.as_deref().filter(|_| error_state == ErrorState::Echo) {
            params.push(("state", s));
        }
        tracing::debug!(%error, "sandbox tiktok: scripted callback error");
        return found(&url_with_query(&req.redirect_uri, &params, None));
    }
    let names = [
        "client_key",
        "scope",
        "redirect_uri",
        "state",
        "response_type",
        "code_challenge",
        "code_challenge_method",
    ];
    let hidden = pages::hidden_fields(&p, &names);
    let accounts = TIKTOK_ACCOUNTS
        .iter()
        .map(|a| AccountChoice {
            value: a.open_id.to_string(),
            handle: format!("@{}", a.username),
            name: a.display_name.to_string(),
            note: format!("{} followers · open_id {}", a.followers, a.open_id),
            avatar: format!("{}/sandbox/avatars/{}.svg", sb.public_base, a.username.replace('.', "-")),
        })
        .collect();
    let scopes = pages::scope_choices(&req.scopes, &SCOPES, REQUIRED_SCOPE);
    let page = ConsentPage {
        provider: PROVIDER,
        slug: SLUG,
        client_param: "client_key",
        client_id: TIKTOK_CLIENT_KEY.to_string(),
        redirect_uri: req.redirect_uri,
        action: format!("{}/sandbox/tiktok/v2/auth/authorize/", sb.public_base),
        hidden,
        accounts,
        scopes,
        deny_all,
    };
    pages::render(StatusCode::OK, &page)
}

/// `POST /tiktok/v2/auth/authorize/`: the consent decision; redirects to the client.
pub(super) async fn authorize_decision(
    State(sb): State<Arc<Sandbox>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let p = match Params::from_body(&headers, &body, false) {
        Ok(p) => p,
        Err(e) => return pages::error_page(PROVIDER, SLUG, "body", &e),
    };
    let (pkce_optional, deny_all, error_state) = {
        let st = sb.tiktok_state();
        (st.scenario.pkce_optional, st.scenario.deny_all, st.scenario.error_state)
    };
    let req = match validate(&sb, &p, pkce_optional) {
        Ok(req) => req,
        Err((param, message)) => return pages::error_page(PROVIDER, SLUG, param, &message),
    };
    let allow = match p.get("decision") {
        Some("allow") => !deny_all,
        Some("deny") => false,
        _ => return pages::error_page(PROVIDER, SLUG, "decision", "decision must be allow or deny."),
    };
    let account = match p.get("account") {
        None => &TIKTOK_ACCOUNTS[0],
        Some(id) => match account(id) {
            Some(a) => a,
            None => return pages::error_page(PROVIDER, SLUG, "account", "Unknown sandbox account."),
        },
    };
    let state = req.state.as_deref();
    if !allow {
        let mut params =
            vec![("error", "access_denied"), ("error_description", "The user denied the request.")];
        if let Some(s) = state.filter(|_| error_state == ErrorState::Echo) {
            params.push(("state", s));
        }
        tracing::debug!("sandbox tiktok: consent denied");
        return found(&url_with_query(&req.redirect_uri, &params, None));
    }
    let ticked: Vec<String> = p.all("granted").flat_map(split_scopes).collect();
    let any_ticked = p.all("granted").next().is_some();
    let granted: Vec<String> = req
        .scopes
        .iter()
        .filter(|s| !any_ticked || *s == REQUIRED_SCOPE || ticked.contains(s))
        .cloned()
        .collect();
    // `*` and `!` appear in real TikTok codes; they catch clients that encode twice.
    let code = format!(
        "{}*{}!{}",
        random_b64::<24>(),
        random_b64::<6>(),
        1000 + u16::from_le_bytes(crate::crypto::random_bytes::<2>()) % 9000
    );
    let now = sb.now();
    {
        let mut st = sb.tiktok_state();
        prune(&mut st.codes, MAX_CODES, |c| c.expires_at <= now, |c| c.expires_at);
        st.codes.insert(
            code.clone(),
            Code {
                open_id: account.open_id.to_string(),
                scopes: granted.clone(),
                requested: req.scopes.clone(),
                redirect_uri: req.redirect_uri.clone(),
                challenge: req.challenge,
                expires_at: now + CODE_LIFETIME,
                used: false,
            },
        );
    }
    tracing::debug!(scopes = granted.len(), "sandbox tiktok: consent given, code issued");
    let scopes = granted.join(",");
    let mut params = vec![("code", code.as_str()), ("scopes", scopes.as_str())];
    if let Some(s) = state {
        params.push(("state", s));
    }
    found(&url_with_query(&req.redirect_uri, &params, None))
}

/// An OAuth-style error answer.
fn oauth_error(status: StatusCode, error: &str, description: &str, now: OffsetDateTime) -> Response {
    json(status, json!({ "error": error, "error_description": description, "log_id": log_id(now) }))
}

/// An API-style error answer, in the shape the `api_error_shape` switch names (§2.8).
fn api_error(
    shape: ApiErrorShape,
    status: StatusCode,
    code: &str,
    message: &str,
    now: OffsetDateTime,
) -> Response {
    let error = json!({ "code": code, "message": message, "log_id": log_id(now) });
    let body = match shape {
        ApiErrorShape::Nested => json!({ "data": {}, "error": error }),
        ApiErrorShape::NestedNoData => json!({ "error": error }),
        ApiErrorShape::Flat => error,
    };
    json(status, body)
}

/// Counts a call, then applies the next scripted failure for `endpoint`, if any. `None` means
/// "answer normally" (after the delay of a `slow` failure).
async fn scripted_failure(sb: &Sandbox, endpoint: Endpoint) -> Option<Scripted> {
    let (failure, retry_after, slow_ms, shape) = {
        let mut st = sb.tiktok_state();
        match endpoint {
            Endpoint::Token => st.stats.token_calls += 1,
            Endpoint::Refresh => st.stats.refresh_calls += 1,
            Endpoint::Profile => st.stats.profile_calls += 1,
            Endpoint::Revoke => st.stats.revoke_calls += 1,
            // Counted by the page itself, with every other authorize request.
            Endpoint::ExchangeLongLived | Endpoint::Authorize => {}
        }
        let f = st.scenario.take_failure(endpoint)?;
        (f, st.scenario.retry_after_secs, st.scenario.slow_ms, st.scenario.api_error_shape)
    };
    let tamper = Tamper::of(&failure);
    let FailNext { kind, status, error, .. } = failure;
    tracing::debug!(?endpoint, ?kind, "sandbox tiktok: scripted failure");
    let now = sb.now();
    let api = endpoint == Endpoint::Profile;
    let resp = match kind {
        FailureKind::CallbackError => {
            return Some(Scripted::CallbackError(error.unwrap_or_else(|| "server_error".into())));
        }
        FailureKind::Slow => {
            tokio::time::sleep(std::time::Duration::from_millis(slow_ms)).await;
            return None;
        }
        FailureKind::Hold => {
            sb.hold(Platform::Tiktok, std::time::Duration::from_millis(slow_ms)).await;
            return None;
        }
        FailureKind::SlowAnswer => {
            return Some(Scripted::AnswerLate(std::time::Duration::from_millis(slow_ms)));
        }
        FailureKind::InvalidClient
        | FailureKind::RedirectUriMismatch
        | FailureKind::PkceMismatch
        | FailureKind::RequestError => return tamper.map(Scripted::Tamper),
        FailureKind::HtmlError => proxy_html_error(status),
        FailureKind::RateLimit | FailureKind::GraphRateLimit => {
            let resp = if api {
                api_error(
                    shape,
                    StatusCode::TOO_MANY_REQUESTS,
                    "rate_limit_exceeded",
                    "Rate limit exceeded.",
                    now,
                )
            } else {
                oauth_error(StatusCode::TOO_MANY_REQUESTS, "rate_limit_exceeded", "Rate limit exceeded.", now)
            };
            with_retry_after(resp, retry_after)
        }
        FailureKind::ServerError if api => {
            api_error(shape, StatusCode::INTERNAL_SERVER_ERROR, "internal_error", "Internal error.", now)
        }
        FailureKind::ServerError => {
            oauth_error(StatusCode::INTERNAL_SERVER_ERROR, "server_error", "Internal server error.", now)
        }
        // (User info only: the control API refuses them elsewhere.)
        FailureKind::ScopeNotAuthorized => api_error(
            shape,
            StatusCode::UNAUTHORIZED,
            "scope_not_authorized",
            "The user did not authorize the scope required for completing this request.",
            now,
        ),
        // An OAuth error (the control API refuses it on user info, whose API has no such code).
        FailureKind::TemporarilyUnavailable => oauth_error(
            StatusCode::SERVICE_UNAVAILABLE,
            "temporarily_unavailable",
            "The service is temporarily unavailable. Try again later.",
            now,
        ),
        FailureKind::ScopePermissionMissed => api_error(
            shape,
            StatusCode::BAD_REQUEST,
            "scope_permission_missed",
            "The fields requested need a scope that was not granted to the app.",
            now,
        ),
        FailureKind::InvalidGrant | FailureKind::BadCode | FailureKind::AccessTokenInvalid if api => {
            api_error(
                shape,
                StatusCode::UNAUTHORIZED,
                "access_token_invalid",
                "The access token is invalid or not found in the request.",
                now,
            )
        }
        FailureKind::InvalidGrant | FailureKind::BadCode | FailureKind::AccessTokenInvalid => {
            sb.tiktok_state().stats.invalid_grant += 1;
            let description = match (kind, endpoint) {
                (FailureKind::BadCode, _) => "Authorization code is expired.",
                (_, Endpoint::Refresh) => "Refresh token is invalid or expired.",
                _ => "Authorization code is invalid or was already used.",
            };
            oauth_error(StatusCode::BAD_REQUEST, "invalid_grant", description, now)
        }
    };
    Some(Scripted::Answer(resp))
}

/// Applies the `oauth_error_status` switch to an answer of an OAuth endpoint (token, refresh,
/// revoke): with `ok`, a JSON error answer gets status 200 (a proxy's HTML page keeps its own).
fn oauth_status(sb: &Sandbox, mut resp: Response) -> Response {
    let ok = sb.tiktok_state().scenario.oauth_error_status == OauthErrorStatus::Ok;
    let is_json = resp
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/json"));
    if ok && is_json && !resp.status().is_success() {
        *resp.status_mut() = StatusCode::OK;
    }
    resp
}

/// Checks `client_key` and `client_secret` of a form.
fn client_ok(p: &Params) -> bool {
    p.get("client_key") == Some(TIKTOK_CLIENT_KEY)
        && constant_time_eq(
            p.get("client_secret").unwrap_or_default().as_bytes(),
            TIKTOK_CLIENT_SECRET.as_bytes(),
        )
}

/// `POST /tiktok/v2/oauth/token/`: `authorization_code` and `refresh_token` grants.
pub(super) async fn token(State(sb): State<Arc<Sandbox>>, headers: HeaderMap, body: Bytes) -> Response {
    let resp = token_answer_to(&sb, &headers, &body).await;
    oauth_status(&sb, resp)
}

async fn token_answer_to(sb: &Sandbox, headers: &HeaderMap, body: &[u8]) -> Response {
    let parsed = Params::from_body(headers, body, false);
    let grant_type = parsed.as_ref().ok().and_then(|p| p.get("grant_type")).unwrap_or_default().to_string();
    let endpoint = if grant_type == "refresh_token" { Endpoint::Refresh } else { Endpoint::Token };
    let (tamper, late) = match scripted_failure(sb, endpoint).await {
        Some(Scripted::Answer(resp)) => return resp,
        Some(Scripted::Tamper(t)) => (Some(t), None),
        Some(Scripted::AnswerLate(delay)) => (None, Some(delay)),
        Some(Scripted::CallbackError(_)) | None => (None, None),
    };
    let resp = handle_token_call(sb, parsed, &grant_type, tamper);
    if let Some(delay) = late {
        tokio::time::sleep(delay).await;
    }
    resp
}

/// The token endpoint's answer to a call, its scripted failure applied.
fn handle_token_call(
    sb: &Sandbox,
    parsed: Result<Params, String>,
    grant_type: &str,
    tamper: Option<Tamper>,
) -> Response {
    let now = sb.now();
    let mut p = match parsed {
        Ok(p) => p,
        Err(e) => return oauth_error(StatusCode::BAD_REQUEST, "invalid_request", &e, now),
    };
    let verifier_tampered = matches!(tamper, Some(Tamper::CodeVerifier));
    if let Some(t) = tamper {
        t.apply(Platform::Tiktok, &mut p);
    }
    if !client_ok(&p) {
        return oauth_error(
            StatusCode::UNAUTHORIZED,
            "invalid_client",
            "Client key or secret is incorrect.",
            now,
        );
    }
    match grant_type {
        "authorization_code" => exchange_code(sb, &p, verifier_tampered, now),
        "refresh_token" => refresh(sb, &p, now),
        "" => oauth_error(StatusCode::BAD_REQUEST, "invalid_request", "grant_type is required.", now),
        _ => oauth_error(
            StatusCode::BAD_REQUEST,
            "unsupported_grant_type",
            "The grant_type is not supported.",
            now,
        ),
    }
}

/// The code exchange; `verifier_tampered`: a scripted `pkce_mismatch`, which fails even for a
/// code issued without a challenge.
fn exchange_code(sb: &Sandbox, p: &Params, verifier_tampered: bool, now: OffsetDateTime) -> Response {
    let Some(code) = p.get("code").filter(|c| !c.is_empty()) else {
        return oauth_error(StatusCode::BAD_REQUEST, "invalid_request", "code is required.", now);
    };
    let mut st = sb.tiktok_state();
    let invalid = match st.codes.get(code) {
        None => Some("Authorization code is invalid."),
        Some(c) if c.used => Some("Authorization code has been used."),
        Some(c) if c.expires_at <= now => Some("Authorization code is expired."),
        Some(_) => None,
    };
    if let Some(description) = invalid {
        st.stats.invalid_grant += 1;
        tracing::debug!(description, "sandbox tiktok: code refused");
        return oauth_error(StatusCode::BAD_REQUEST, "invalid_grant", description, now);
    }
    let Some(c) = st.codes.get_mut(code) else {
        return oauth_error(StatusCode::BAD_REQUEST, "invalid_grant", "Authorization code is invalid.", now);
    };
    // A code is spent by its first presentation with valid client credentials, whatever follows.
    c.used = true;
    if p.get("redirect_uri") != Some(c.redirect_uri.as_str()) {
        return oauth_error(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            "The redirect_uri does not match the one in the authorization request.",
            now,
        );
    }
    let verifier = p.get("code_verifier").unwrap_or_default();
    let well_formed = (43..=128).contains(&verifier.len())
        && verifier.bytes().all(|b| b.is_ascii_alphanumeric() || b"-._~".contains(&b));
    let mismatch = match &c.challenge {
        Some(challenge) => {
            !well_formed || !constant_time_eq(s256_hex(verifier).as_bytes(), challenge.as_bytes())
        }
        None => verifier_tampered,
    };
    if mismatch {
        return oauth_error(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            "Code verifier or code challenge is invalid.",
            now,
        );
    }
    let open_id = c.open_id.clone();
    let scopes = c.scopes.clone();
    let requested = c.requested.clone();
    let grant = st.next_grant;
    st.next_grant += 1;
    st.grants
        .insert(grant, Grant { open_id: open_id.clone(), scopes: scopes.clone(), requested, revoked: false });
    let issued = st.issue(grant, now);
    drop(st);
    tracing::debug!("sandbox tiktok: code exchanged");
    token_answer(&issued, &open_id, &scopes)
}

fn refresh(sb: &Sandbox, p: &Params, now: OffsetDateTime) -> Response {
    let Some(rt) = p.get("refresh_token").filter(|t| !t.is_empty()) else {
        return oauth_error(StatusCode::BAD_REQUEST, "invalid_request", "refresh_token is required.", now);
    };
    let mut st = sb.tiktok_state();
    let verdict = match st.refresh_tokens.get(rt) {
        None => Err("Refresh token is invalid."),
        Some(t) if t.rotated => Err("Refresh token has already been used."),
        Some(t) if st.grants.get(&t.grant).is_none_or(|g| g.revoked) => Err("Refresh token is revoked."),
        Some(t) if t.expires_at <= now => Err("Refresh token is expired."),
        Some(t) => Ok(t.grant),
    };
    let grant = match verdict {
        Ok(grant) => grant,
        Err(description) => {
            st.stats.invalid_grant += 1;
            if st.refresh_tokens.get(rt).is_some_and(|t| t.rotated) {
                st.stats.refresh_token_reuse += 1;
            }
            tracing::debug!(description, "sandbox tiktok: refresh refused");
            return oauth_error(StatusCode::BAD_REQUEST, "invalid_grant", description, now);
        }
    };
    let (open_id, scopes) = match st.grants.get(&grant) {
        Some(g) => (g.open_id.clone(), g.scopes.clone()),
        None => {
            return oauth_error(StatusCode::BAD_REQUEST, "invalid_grant", "Refresh token is invalid.", now);
        }
    };
    let rotation = st.scenario.refresh_rotation;
    let issued = match rotation {
        // Rotation without grace: the token sent dies now.
        RefreshRotation::Rotate => {
            if let Some(t) = st.refresh_tokens.get_mut(rt) {
                t.rotated = true;
            }
            st.issue(grant, now)
        }
        // The token sent lives on, and comes back (with what is left of its life) or not at all.
        RefreshRotation::Keep | RefreshRotation::Omit => {
            let left = st.refresh_tokens.get(rt).map_or(0, |t| (t.expires_at - now).whole_seconds());
            let mut issued = st.issue_access(grant, now);
            if rotation == RefreshRotation::Keep {
                issued.refresh = Some((rt.to_string(), left));
            }
            issued
        }
    };
    drop(st);
    tracing::debug!(?rotation, "sandbox tiktok: token refreshed");
    token_answer(&issued, &open_id, &scopes)
}

/// The S256 challenge of `verifier` as TikTok Login Kit for Web expects it: the SHA-256 digest in
/// lower-case hex (providers.md §2.3). Computed here, apart from the adapter's own code, so that a
/// mistake there is not repeated on this side.
fn s256_hex(verifier: &str) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(verifier.as_bytes()))
}

/// The flat success answer of §2.4.
fn token_answer(issued: &Issued, open_id: &str, scopes: &[String]) -> Response {
    let mut body = json!({
        "access_token": issued.access_token,
        "expires_in": issued.access_lifetime,
        "open_id": open_id,
        "scope": scopes.join(","),
        "token_type": "Bearer",
    });
    if let Some((token, lifetime)) = &issued.refresh {
        body["refresh_token"] = json!(token);
        body["refresh_expires_in"] = json!(lifetime);
    }
    json(StatusCode::OK, body)
}

/// The bearer token of a request.
fn bearer(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim()).filter(|t| !t.is_empty())
}

/// `GET /tiktok/v2/user/info/?fields=...`.
pub(super) async fn user_info(
    State(sb): State<Arc<Sandbox>>,
    headers: HeaderMap,
    RawQuery(query): RawQuery,
) -> Response {
    if let Some(Scripted::Answer(resp)) = scripted_failure(&sb, Endpoint::Profile).await {
        return resp;
    }
    let now = sb.now();
    let shape = sb.tiktok_state().scenario.api_error_shape;
    // 600 requests a minute per endpoint, in a one-minute sliding window (§2.8).
    let wait_ms = {
        let mut st = sb.tiktok_state();
        let limit = st.scenario.rate_limit_per_min as usize;
        let now_ms = crate::clock::to_millis(now);
        let window = &mut st.user_info_window;
        while window.front().is_some_and(|t| *t <= now_ms - 60_000) {
            window.pop_front();
        }
        if limit > 0 && window.len() >= limit {
            window.front().map(|oldest| oldest + 60_000 - now_ms)
        } else {
            if limit > 0 {
                window.push_back(now_ms);
            }
            None
        }
    };
    if let Some(wait_ms) = wait_ms {
        let resp = api_error(
            shape,
            StatusCode::TOO_MANY_REQUESTS,
            "rate_limit_exceeded",
            "Rate limit exceeded.",
            now,
        );
        return with_retry_after(resp, u64::try_from(wait_ms.max(1_000) / 1_000).unwrap_or(60));
    }
    let p = Params::from_query(query.as_deref());
    let token_invalid = || {
        api_error(
            shape,
            StatusCode::UNAUTHORIZED,
            "access_token_invalid",
            "The access token is invalid or not found in the request.",
            now,
        )
    };
    let Some(token) = bearer(&headers) else {
        return token_invalid();
    };
    let (open_id, scopes, requested) = {
        let st = sb.tiktok_state();
        match st.live_grant(token, now) {
            Some(g) => (g.open_id.clone(), g.scopes.clone(), g.requested.clone()),
            None => {
                tracing::debug!("sandbox tiktok: user info with a dead token");
                return token_invalid();
            }
        }
    };
    let fields = split_commas(p.get("fields").unwrap_or_default());
    if fields.is_empty() {
        return api_error(
            shape,
            StatusCode::BAD_REQUEST,
            "invalid_params",
            "The fields parameter is required.",
            now,
        );
    }
    let mut user = Map::new();
    let Some(acct) = profile(&open_id) else {
        return api_error(
            shape,
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal_error",
            "Unknown account.",
            now,
        );
    };
    for field in &fields {
        let Some((_, scope)) = FIELDS.iter().find(|(f, _)| f == field) else {
            return api_error(
                shape,
                StatusCode::BAD_REQUEST,
                "invalid_params",
                &format!("Invalid field: {field}."),
                now,
            );
        };
        // A scope the app asked for and the user switched off (or withdrew since): the user's
        // choice, 401; one the app never asked for: the app's mistake, 400 (§2.8).
        if !scopes.iter().any(|s| s == scope) {
            return if requested.iter().any(|s| s == scope) {
                api_error(
                    shape,
                    StatusCode::UNAUTHORIZED,
                    "scope_not_authorized",
                    "The user did not authorize the scope required for completing this request.",
                    now,
                )
            } else {
                api_error(
                    shape,
                    StatusCode::BAD_REQUEST,
                    "scope_permission_missed",
                    "The fields requested need a scope that was not granted to the app.",
                    now,
                )
            };
        }
        user.insert(field.clone(), field_value(&sb, &acct, field));
    }
    json(
        StatusCode::OK,
        json!({ "data": { "user": user }, "error": { "code": "ok", "message": "", "log_id": log_id(now) } }),
    )
}

fn field_value(sb: &Sandbox, a: &Profile, field: &str) -> Value {
    let avatar = format!("{}/sandbox/avatars/{}.svg", sb.public_base, a.username.replace('.', "-"));
    match field {
        "open_id" => a.open_id.as_str().into(),
        "union_id" => a.union_id.as_str().into(),
        "avatar_url" | "avatar_url_100" | "avatar_large_url" => avatar.into(),
        "display_name" => a.display_name.as_str().into(),
        "bio_description" => format!("{} (authlink sandbox account)", a.display_name).into(),
        "profile_deep_link" => format!("https://www.tiktok.com/@{}", a.username).into(),
        "is_verified" => false.into(),
        "username" => a.username.as_str().into(),
        "follower_count" => a.followers.into(),
        "following_count" => 42.into(),
        "likes_count" => (a.followers * 7).into(),
        "video_count" => 17.into(),
        _ => Value::Null,
    }
}

/// `POST /tiktok/v2/oauth/revoke/`: kills both tokens of the grant (and every other token it
/// produced). An unknown token is answered like a known one (RFC 7009 §2.2).
pub(super) async fn revoke(State(sb): State<Arc<Sandbox>>, headers: HeaderMap, body: Bytes) -> Response {
    let resp = revoke_answer_to(&sb, &headers, &body).await;
    oauth_status(&sb, resp)
}

async fn revoke_answer_to(sb: &Sandbox, headers: &HeaderMap, body: &[u8]) -> Response {
    let tamper = match scripted_failure(sb, Endpoint::Revoke).await {
        Some(Scripted::Answer(resp)) => return resp,
        Some(Scripted::Tamper(t)) => Some(t),
        // (Refused on the revoke endpoint when scripted.)
        Some(Scripted::CallbackError(_) | Scripted::AnswerLate(_)) | None => None,
    };
    let now = sb.now();
    let mut p = match Params::from_body(headers, body, false) {
        Ok(p) => p,
        Err(e) => return oauth_error(StatusCode::BAD_REQUEST, "invalid_request", &e, now),
    };
    if let Some(t) = tamper {
        t.apply(Platform::Tiktok, &mut p);
    }
    if !client_ok(&p) {
        return oauth_error(
            StatusCode::UNAUTHORIZED,
            "invalid_client",
            "Client key or secret is incorrect.",
            now,
        );
    }
    let Some(token) = p.get("token").filter(|t| !t.is_empty()) else {
        return oauth_error(StatusCode::BAD_REQUEST, "invalid_request", "token is required.", now);
    };
    let mut st = sb.tiktok_state();
    let grant = st.access_tokens.get(token).map(|t| t.grant);
    if let Some(g) = grant.and_then(|g| st.grants.get_mut(&g)) {
        g.revoked = true;
        tracing::debug!("sandbox tiktok: grant revoked");
    }
    json(StatusCode::OK, json!({}))
}
